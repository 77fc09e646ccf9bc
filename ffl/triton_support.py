"""Running this project's Triton kernels (:mod:`ffl.implicit_conv`, :mod:`ffl.fused_bn`):
compiled on CUDA, interpreted on CPU, or compiled for an H100 without one.

Triton's interpreter runs a kernel's Python source on NumPy; here it is chosen per kernel
(:func:`kernels`), not process-wide through ``TRITON_INTERPRET``, so that one test process can
check the interpreted kernels against PyTorch and also compile them for sm_90 (:func:`ptx_for_hopper`).
"""
from __future__ import annotations

import contextlib
import functools

import torch

try:  # Triton ships with PyTorch's CUDA wheels; a CPU-only install may lack it
    import triton
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["BACKENDS", "available", "runs_on", "row_splits", "programs_to_fill", "kernels", "ptx_for_hopper", "triton"]

BACKENDS = ("torch", "triton", "interpret")


def available(backend: str) -> bool:
    """Whether ``backend`` can run here: ``torch`` (PyTorch's own operations) always, ``interpret``
    with Triton installed, ``triton`` with Triton and a CUDA GPU."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return True
    return triton is not None and (backend == "interpret" or torch.cuda.is_available())


def runs_on(backend: str, where: torch.Tensor | torch.device | str) -> bool:
    """Whether ``backend`` runs its Triton kernels for a tensor (or on a device) ``where``:
    ``triton`` on CUDA, ``interpret`` anywhere; ``torch`` never (PyTorch's own operations run
    instead)."""
    if backend != "triton":
        return backend == "interpret"
    return where.is_cuda if isinstance(where, torch.Tensor) else torch.device(where).type == "cuda"


def programs_to_fill(device: torch.device, interpret: bool) -> int:
    """Programs that keep the GPU busy: 4 per multiprocessor; 1 interpreted (one split)."""
    return 1 if interpret else 4 * torch.cuda.get_device_properties(device).multi_processor_count


def row_splits(rows: int, tiles: int, block: int, programs: int, min_blocks: int = 1) -> tuple[int, int]:
    """(splits, rows per split) of a reduction over ``rows`` split across programs: about
    ``programs`` programs in all (``tiles`` per split), each split a whole number of ``block``-row
    blocks and at least ``min_blocks`` of them. The kernels sum the splits in a fixed order."""
    splits = max(1, min(triton.cdiv(rows, min_blocks * block), triton.cdiv(programs, tiles)))
    per_split = triton.cdiv(triton.cdiv(rows, splits), block) * block
    return triton.cdiv(rows, per_split), per_split


@functools.cache
def kernels(functions: tuple, interpret: bool) -> tuple:
    """Triton kernels from their Python source, compiled (CUDA) or interpreted (CPU)."""
    if interpret:
        return tuple(_Interpreted(f) for f in functions)
    return tuple(triton.jit(f) for f in functions)


class _Interpreted:
    """A kernel run by Triton's interpreter. Triton's own helpers (``tl.sum``, ``tl.cdiv``, ...)
    were compiled-mode functions when Triton was imported without ``TRITON_INTERPRET``; while the
    kernel runs, calls to them run their Python source in the interpreter as well."""

    def __init__(self, fn) -> None:
        from triton.runtime.interpreter import InterpretedFunction
        self.kernel = InterpretedFunction(fn)

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with _helpers_interpreted():
                return launch(*args, **kwargs)
        return run


_INTERPRETED_HELPERS: dict = {}


@contextlib.contextmanager
def _helpers_interpreted():
    """While an interpreted kernel runs: Triton's helpers run their rewritten Python source, and
    ``triton.language.core`` (the namespace they see) is patched the way the interpreter patches
    the kernel's own ``triton.language`` — before it and undone after it, so that compiled kernels
    built later in the process see the language untouched. (Uses the interpreter's internals.)"""
    import triton.language.standard as standard
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    def call(self, *args, **kwargs):
        if self.fn not in _INTERPRETED_HELPERS:
            _INTERPRETED_HELPERS[self.fn] = interpreter.InterpretedFunction(self.fn).rewrite()
        return _INTERPRETED_HELPERS[self.fn](*args, **kwargs)

    scope = interpreter._patch_lang(standard.sum.fn)
    original = JITFunction.__call__
    JITFunction.__call__ = call
    try:
        yield
    finally:
        JITFunction.__call__ = original
        scope.restore()


def ptx_for_hopper(kernel, pointers: dict[str, str], constants: dict, aligned: list[str],
                   scalars: dict[str, str] | None = None, warps: int = 4, stages: int = 3) -> str:
    """PTX of a compiled-mode kernel (from :func:`kernels`) built for sm_90 (H100) by Triton's own
    compiler and ptxas, no GPU needed: what the kernel becomes there (tensor-core instructions,
    asynchronous copies, vector loads). ``pointers``: argument → element type (``"*bf16"``);
    ``constants``: the constexpr arguments (and any specialized to 1); ``aligned``: arguments the
    JIT would specialize as multiples of 16; other arguments are ``i32`` unless ``scalars`` says."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = {**(scalars or {}), **pointers}
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in kernel.arg_names}
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    return compiled.asm["ptx"]
