"""Initial weights of K networks, built in parallel and byte-identical to a serial loop.

Network k is the model ``build()`` makes right after ``torch.manual_seed(seeds[k])``
(:func:`init_stacked`). A serial loop over thousands of models dominates a GPU chunk's setup, so
forked worker processes build slices of the chunk into one anonymous shared mapping
(:func:`_shared_empty`); :func:`start_init_stacked` starts them and returns at once
(:class:`PendingInit`), so :mod:`ffl.zoo` builds the next chunk's weights while the engine trains
this one. Few or small models, one worker, no ``fork`` or too little memory (:func:`_memory_fits`):
built serially, in the calling process. :mod:`ffl.engine` re-exports the public names.
"""
from __future__ import annotations

import mmap
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["PendingInit", "start_init_stacked", "init_stacked"]


def _init_worker(args) -> None:
    build, seeds, lo, hi, shared, errors = args
    torch.set_num_threads(1)
    try:
        for k in range(lo, hi):
            torch.manual_seed(int(seeds[k]))
            for name, t in build().state_dict().items():
                shared[name][k].copy_(t)
    except BaseException as e:
        if errors is not None:  # a forked worker: its parent raises with this message
            errors.put(f"{type(e).__name__}: {e}"[:2000])  # small: the pipe must not fill
        raise


def _memory_fits(nbytes: int) -> bool:
    """Whether the host's available memory can hold ``nbytes`` with room to spare."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return avail > 1.25 * nbytes


def _shared_empty(K: int, shapes: dict[str, tuple[torch.Size, torch.dtype]]) -> dict[str, torch.Tensor]:
    """Uninitialized (K, *shape) tensors in one anonymous shared mapping, which forked workers
    write into. Not ``share_memory_()``: its files live in /dev/shm, a 64 MB mount in many
    containers, and a chunk of paper-size MLP-4s needs gigabytes."""
    sizes = [(name, K * torch.Size(shape).numel(), dtype) for name, (shape, dtype) in shapes.items()]
    offsets, total = [], 0
    for _, numel, dtype in sizes:
        offsets.append(total)
        total += -(-numel * dtype.itemsize // 64) * 64  # each tensor 64-byte aligned
    buffer = mmap.mmap(-1, max(total, 1))  # MAP_SHARED | MAP_ANONYMOUS
    return {name: torch.frombuffer(buffer, dtype=dtype, count=numel, offset=off).view(K, *shapes[name][0])
            for (name, numel, dtype), off in zip(sizes, offsets)}


class PendingInit:
    """Initial weights of K models that :func:`start_init_stacked` started; :meth:`result`
    returns them once built (it joins the forked workers, or builds them serially now)."""

    def __init__(self, build: Callable[[], nn.Module], seeds: list[int],
                 shapes: dict[str, tuple[torch.Size, torch.dtype]], shared: dict[str, torch.Tensor] | None = None,
                 procs: Sequence = (), errors=None) -> None:
        self.build, self.seeds, self.shapes = build, seeds, shapes
        self.shared, self.procs, self.errors = shared, list(procs), errors

    def result(self) -> dict[str, torch.Tensor]:
        if self.shared is None:  # serial: built now, in this process (as a plain loop would)
            out = {n: torch.empty((len(self.seeds), *shape), dtype=dtype) for n, (shape, dtype) in self.shapes.items()}
            threads = torch.get_num_threads()  # the worker's one thread is for the init only
            try:
                _init_worker((self.build, self.seeds, 0, len(self.seeds), out, None))
            finally:
                torch.set_num_threads(threads)
            return out
        for p in self.procs:
            p.join()
        bad = [p.exitcode for p in self.procs if p.exitcode != 0]
        if bad:
            why = []
            while not self.errors.empty():
                why.append(self.errors.get())
            raise RuntimeError(f"model initialization workers failed with exit codes {bad}"
                               + (": " + "; ".join(why) if why else ""))
        return self.shared

    def cancel(self) -> None:
        """Stop the workers (their weights are not needed any more)."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join()


def start_init_stacked(build: Callable[[], nn.Module], seeds: Sequence[int], *,
                       workers: int | None = None) -> PendingInit:
    """Start building the initial weights of :func:`init_stacked` and return at once: ``workers``
    forked processes fill shared memory while the caller goes on (e.g. trains the previous chunk).
    Where :func:`init_stacked` would build them serially (few or small models, one worker, no
    ``fork``, too little memory) nothing starts: :meth:`PendingInit.result` builds them."""
    seeds = [int(s) for s in seeds]
    K = len(seeds)
    torch.manual_seed(seeds[0])
    first = build().state_dict()
    shapes = {n: (t.shape, t.dtype) for n, t in first.items()}
    workers = workers if workers is not None else min(os.cpu_count() or 1, 16)
    per = sum(t.numel() for t in first.values()) * K
    need = sum(t.numel() * t.element_size() for t in first.values()) * K
    del first
    if workers <= 1 or K < 4 or per < 1 << 22 or "fork" not in mp.get_all_start_methods() or not _memory_fits(need):
        return PendingInit(build, seeds, shapes)
    shared = _shared_empty(K, shapes)
    bounds = [(K * i // workers, K * (i + 1) // workers) for i in range(workers)]
    ctx = mp.get_context("fork")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_init_worker, args=((build, seeds, lo, hi, shared, errors),))
             for lo, hi in bounds if hi > lo]
    for p in procs:
        p.start()
    return PendingInit(build, seeds, shapes, shared, procs, errors)


def init_stacked(build: Callable[[], nn.Module], seeds: Sequence[int], *, workers: int | None = None) -> dict[str, torch.Tensor]:
    """Initial ``state_dict``s of K models, stacked: model k is ``build()`` right after
    ``torch.manual_seed(seeds[k])`` (exactly the bytes of a serial loop), built by ``workers``
    forked processes writing into shared memory (a serial loop dominates a GPU chunk's setup)."""
    return start_init_stacked(build, seeds, workers=workers).result()
