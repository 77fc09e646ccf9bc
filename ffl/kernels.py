"""Feature-learning kernels streamed from a zoo on disk, in bounded memory (§3.3).

Θ in kernel form (:mod:`ffl.features`) needs only the N × N inner products K_ij = ⟨x_i, x_j⟩ of
the networks' features at one index; once K (float64, N = 5,000: 200 MB) is known both protocols
run on it alone. This module computes K without ever holding the zoo, its factors or its Grams:

* networks are read block by block (``StreamConfig.block_bytes`` of features per block; at most
  two blocks are held at once), their features formed on ``StreamConfig.device``;
* a pair of blocks (I, J) gives K[I, I], K[I, J], K[J, J] (the diagonal ones the first time only),
  visiting column blocks in reverse so the last one read becomes the next row block;
* chain Grams G = C Cᵀ (d² entries) are formed a slab of rows at a time
  (``StreamConfig.slab_bytes``), only the upper triangle, off-diagonal entries weighted by √2 so
  that slab inner products add up to ⟨G_i, G_j⟩_F; or, where cheaper, ⟨G_i, G_j⟩ = ‖C_iᵀ C_j‖²_F
  without G ("implicit"). The choice is made per pair of blocks by counting multiply-adds, as
  :func:`ffl.features._gram_inner_matrix` does for one block;
* products run in ``StreamConfig.precision`` (fp32; on CUDA also tf32 or bf16 inputs, always
  float32 outputs) over contraction chunks of at most ``StreamConfig.chunk`` terms, and the chunks
  are summed in float64.

Memory: two blocks of features, one slab per block, one implicit product tile and the N × N
float64 kernel, whatever the zoo's size. :class:`KernelStats` counts what was done (networks
read, blocks, multiply-adds by kind) for ``python -m ffl.bench ffl``.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ffl.features import FeatureConfig
from ffl.models import build_model

PRODUCT_PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class StreamConfig:
    """How a kernel is streamed: where (``device``), in what arithmetic (``precision`` of the
    products, one of :data:`PRODUCT_PRECISIONS`; sums are float64), and in how much memory
    (``block_bytes`` per block for its networks' weights and features, two blocks held;
    ``slab_bytes`` for one slab of Gram rows or one implicit product tile; ``chunk`` terms per
    reduced-precision product), and in how many ``passes`` over the zoo: ``"one"`` reads each
    block once for every index (blocks hold weights, features are formed per index), or
    ``"per_index"`` reads the zoo again for each index (blocks hold one index's features only, so
    they are larger and explicit Gram slabs are formed fewer times: cheaper where forming, not
    reading, is what costs — a CPU)."""

    device: str = "cpu"
    precision: str = "fp32"
    block_bytes: int = 2 << 30
    slab_bytes: int = 256 << 20
    chunk: int = 1 << 16
    passes: str = "one"

    @classmethod
    def for_device(cls, device: str | torch.device) -> "StreamConfig":
        """The defaults on a CPU; on a GPU, blocks of 30 % of its free memory each (two are held)
        and 2 GiB slabs, float32 products as on the CPU. Free memory counts what PyTorch's caching
        allocator holds unused (after a zoo was trained in this process, most of the GPU): blocks
        sized without it would be a few times smaller, and the zoo is read about B/2 times over
        for B blocks."""
        device = torch.device(device)
        if device.type != "cuda":
            return cls(device=str(device), passes="per_index")
        torch.cuda.empty_cache()  # cached, unused memory back to the driver, so it counts as free
        free, _ = torch.cuda.mem_get_info(device)
        return cls(device=str(device), block_bytes=int(0.3 * free), slab_bytes=2 << 30)

    def __post_init__(self) -> None:
        if self.precision not in PRODUCT_PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {PRODUCT_PRECISIONS}")
        if self.precision == "tf32" and torch.device(self.device).type != "cuda":
            raise ValueError("tf32 products need a CUDA device")
        if self.passes not in ("one", "per_index"):
            raise ValueError(f"unknown passes {self.passes!r}; choose 'one' or 'per_index'")
        if min(self.block_bytes, self.slab_bytes, self.chunk) < 1:
            raise ValueError("block_bytes, slab_bytes and chunk must be positive")


@dataclass
class KernelStats:
    """What streaming did: ``networks_read`` (a network read twice counts twice), ``blocks`` per
    index, multiply-adds by kind (``form``: Gram slabs from factors; ``product``: explicit kernel
    products; ``implicit``: ‖C_iᵀ C_j‖² products; ``features``: forming features, chain products
    counted by :class:`torch.utils.flop_counter.FlopCounterMode`), seconds by stage (``load``: reading networks and
    forming their features, of which ``read``: reading; ``kernel``: everything after)."""

    networks_read: int = 0
    blocks: dict[str, int] = field(default_factory=dict)
    macs: dict[str, float] = field(default_factory=lambda: {"form": 0.0, "product": 0.0, "implicit": 0.0})
    seconds: dict[str, float] = field(default_factory=lambda: {"load": 0.0, "read": 0.0, "kernel": 0.0})
    #: per job: seconds forming its features (part of ``load``), seconds and multiply-adds of its kernel
    jobs: dict[str, dict[str, float]] = field(default_factory=dict)
    modes: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: the largest GEMM of each kind, as (batch, m, k, n): the shape a reference rate is timed at
    gemm_shapes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    def note(self, kind: str, batch: int, m: int, k: int, n: int, *, macs: float | None = None) -> None:
        """Count ``macs`` multiply-adds (default: those of the GEMM batch × (m, k) @ (k, n)) of
        ``kind``, whose reference GEMM shape is the largest such shape noted."""
        self.macs[kind] = self.macs.get(kind, 0.0) + (batch * m * k * n if macs is None else macs)
        if batch * m * k * n > math.prod(self.gemm_shapes.get(kind, (0,))):
            self.gemm_shapes[kind] = (batch, m, k, n)


# ----------------------------------------------------------------------------- features of a zoo


class _Apply(nn.Module):
    """``fn(model)`` as a module's forward, so that :func:`torch.func.functional_call` can run it
    on another network's weights."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self) -> torch.Tensor:
        return self.fn(self.model)


class ZooFeatures:
    """Features of a zoo's networks at any index, read from its shards on demand.

    ``read(nets)`` returns a block: the networks' state dicts stacked on ``device`` (read once per
    block, shard by shard); ``featurize(block, kind, index)`` the float32 features of that block —
    chain factors C_index (B, d, n) for ``kind="chain"``, flattened layer weights (B, D) for
    ``kind="layer"``, the tensors :func:`ffl.features.zoo_representations` stacks — computed for
    all networks of the block at once (:func:`torch.func.vmap` of :func:`ffl.chain.chain_factors`
    / :func:`ffl.chain.layer_features` over the stacked weights), ``chunk_bytes`` of features at a
    time. ``load(kind, index, nets)`` is both in one call.
    """

    def __init__(self, zoo, features: FeatureConfig | None = None, device: str | torch.device = "cpu",
                 chunk_bytes: int = 256 << 20) -> None:
        self.zoo = zoo
        self.features = features or FeatureConfig()
        self.device = torch.device(device)
        self.chunk_bytes = chunk_bytes
        classes = {int(n["num_classes"]) for n in zoo.manifest["networks"]}
        if len(classes) != 1:
            raise ValueError(f"streamed features need networks of one shape; this zoo's have {sorted(classes)} classes")
        with torch.device("meta"):  # parameters on the meta device: no initialization cost
            self._template = build_model(zoo.spec.arch, classes.pop(), **zoo.manifest["build_kwargs"])
        first = self.read([0])
        self.read_bytes = sum(v.numel() * v.element_size() for v in first.values())  # per network
        self.shapes = {(kind, l): tuple(x.shape[1:]) for kind in ("chain", "layer")
                       for l, x in enumerate(self._all(first, kind), 1)}

    def indices(self, kind: str) -> list[int]:
        return sorted(l for k, l in self.shapes if k == kind)

    def feature_bytes(self, kind: str, index: int) -> int:
        """float32 bytes of one network's features at this index."""
        return 4 * math.prod(self.shapes[(kind, index)])

    def read(self, nets: Sequence[int]) -> dict[str, torch.Tensor]:
        """State dicts of networks ``nets`` stacked on ``device``."""
        return {k: v.to(self.device, non_blocking=True) for k, v in self.zoo.stacked(nets).items()}

    def _batched(self, block: dict[str, torch.Tensor], fn: Callable[[nn.Module], object]):
        apply = _Apply(self._template, fn)
        state = {f"model.{k}": v for k, v in block.items()}
        with torch.no_grad():
            return torch.func.vmap(lambda s: torch.func.functional_call(apply, s, ()))(state)

    def _all(self, block: dict[str, torch.Tensor], kind: str) -> list[torch.Tensor]:
        return self._batched(block, lambda m: self.features.of(m, kind))

    def featurize(self, block: dict[str, torch.Tensor], kind: str, index: int) -> torch.Tensor:
        """float32 features of every network of ``block`` at ``index`` (B, *shape)."""
        shape = self.shapes[(kind, index)]
        num = next(iter(block.values())).shape[0]
        out = torch.empty(num, *shape, dtype=torch.float32, device=self.device)
        # a chain's earlier factors live while it is formed: chunks bound them
        step = max(1, self.chunk_bytes // (self.feature_bytes(kind, index) * (index if kind == "chain" else 1)))
        for a in range(0, num, step):
            part = {k: v[a : a + step] for k, v in block.items()}
            out[a : a + step] = self._batched(part, lambda m: self.features.of(m, kind, upto=index)[index - 1])
        return out

    def load(self, kind: str, index: int, nets: Sequence[int]) -> torch.Tensor:
        """Features of networks ``nets`` at one index, read and formed ``chunk_bytes`` of weights at
        a time (only the features of all of them are held)."""
        out = torch.empty(len(nets), *self.shapes[(kind, index)], dtype=torch.float32, device=self.device)
        step = max(1, self.chunk_bytes // self.read_bytes)
        for a in range(0, len(nets), step):
            out[a : a + step] = self.featurize(self.read(nets[a : a + step]), kind, index)
        return out

    def kernels(self, jobs: Sequence[tuple[str, int]], config: StreamConfig | None = None, *,
                stats: KernelStats | None = None,
                progress: Callable[[str], None] | None = None) -> dict[tuple[str, int], torch.Tensor]:
        """The N × N float64 kernels ⟨x_i, x_j⟩ of every (kind, index) in ``jobs``: in one pass over
        the zoo (:func:`streamed_inners`: each block of networks read once for all jobs) or one pass
        per job, as ``config.passes`` says."""
        names = {f"{kind} {index}": (kind, index) for kind, index in jobs}
        if (config or StreamConfig()).passes == "one":
            out = streamed_inners(self.read, lambda block, name: self.featurize(block, *names[name]), len(self.zoo),
                                  {name: self.shapes[job] for name, job in names.items()}, config,
                                  read_bytes=self.read_bytes, stats=stats, progress=progress)
            return {names[name]: k for name, k in out.items()}
        return {job: streamed_inner(lambda nets, job=job: self.load(*job, nets), len(self.zoo), self.shapes[job],
                                    config, stats=stats, name=name,
                                    progress=None if progress is None else lambda msg, n=name: progress(f"{n}: {msg}"))
                for name, job in names.items()}


# ----------------------------------------------------------------------------- products


@contextmanager
def _precision(precision: str, device: torch.device):
    if device.type != "cuda":
        yield
        return
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False  # float32 accumulation
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flags


def _mm(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b with float32 output; bf16 rounds the inputs (on CPU emulated: bf16 inputs, float32
    products, as tensor cores do)."""
    if precision != "bf16":
        return a @ b
    if a.is_cuda:
        return torch.mm(a.bfloat16(), b.bfloat16(), out_dtype=torch.float32)
    return a.bfloat16().float() @ b.bfloat16().float()


def _chunked_inner(a: torch.Tensor, b: torch.Tensor | None, cfg: StreamConfig,
                   stats: KernelStats) -> torch.Tensor:
    """a @ bᵀ (b = a when None) over chunks of the contraction, each in ``cfg.precision``, summed in
    float64."""
    out = torch.zeros(a.shape[0], (a if b is None else b).shape[0], dtype=torch.float64, device=a.device)
    for c0 in range(0, a.shape[1], cfg.chunk):
        x = a[:, c0 : c0 + cfg.chunk]
        y = x if b is None else b[:, c0 : c0 + cfg.chunk]
        out += _mm(x, y.T, cfg.precision)
        stats.note("product", 1, x.shape[0], x.shape[1], y.shape[0])
    return out


def _triangle_weights(rows: range, d: int, device: torch.device) -> torch.Tensor:
    """Weights of Gram entries (a, b), a in ``rows``, b ≥ rows.start: 0 below the diagonal, 1 on
    it, √2 above (so that Σ over these slabs of products = ⟨G_i, G_j⟩_F)."""
    a = torch.arange(rows.start, rows.stop, device=device)[:, None]
    b = torch.arange(rows.start, d, device=device)[None, :]
    return torch.where(b > a, math.sqrt(2.0), (b == a).float())


def _explicit_pair(xi: torch.Tensor, xj: torch.Tensor | None, cfg: StreamConfig,
                   stats: KernelStats, need: tuple[bool, bool, bool]) -> list[torch.Tensor | None]:
    """K_II, K_IJ, K_JJ from factor blocks via upper-triangle Gram slabs (entries not needed: None)."""
    d, n = xi.shape[1], xi.shape[2]
    blocks = [xi] if xj is None else [xi, xj]
    total = sum(len(x) for x in blocks)
    rows_per_slab = max(1, min(d, cfg.slab_bytes // (4 * d * max(1, total))))
    out = [torch.zeros(len(xi), len(xi), dtype=torch.float64, device=xi.device) if need[0] else None,
           None if xj is None or not need[1] else torch.zeros(len(xi), len(xj), dtype=torch.float64, device=xi.device),
           None if xj is None or not need[2] else torch.zeros(len(xj), len(xj), dtype=torch.float64, device=xi.device)]
    for r0 in range(0, d, rows_per_slab):
        rows = range(r0, min(d, r0 + rows_per_slab))
        w = _triangle_weights(rows, d, xi.device)
        slabs = []
        for x in blocks:  # (B, r, d - r0) rows of every G = C Cᵀ, triangle only
            s = _mm_batched(x[:, rows.start : rows.stop], x[:, r0:].transpose(1, 2), cfg.precision)
            slabs.append((s * w).flatten(1))
            stats.note("form", len(x), len(rows), n, d - r0)
        si = slabs[0]
        sj = slabs[1] if xj is not None else None
        if out[0] is not None:
            out[0] += _chunked_inner(si, None, cfg, stats)
        if out[1] is not None:
            out[1] += _chunked_inner(si, sj, cfg, stats)
        if out[2] is not None:
            out[2] += _chunked_inner(sj, None, cfg, stats)
        del slabs, si, sj
    return out


def _mm_batched(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    if precision != "bf16":
        return a @ b
    return a.bfloat16().float() @ b.bfloat16().float()  # bf16-rounded inputs, float32 products


def _implicit_block(xi: torch.Tensor, xj: torch.Tensor, cfg: StreamConfig, stats: KernelStats) -> torch.Tensor:
    """⟨G_i, G_j⟩ = ‖C_iᵀ C_j‖²_F for all i in block I, j in block J, by tiles of one big product."""
    bi, d, n = xi.shape
    bj, m = xj.shape[0], xj.shape[2]
    fj = xj.permute(1, 0, 2).reshape(d, bj * m)  # (d, B_J m)
    rows = max(1, cfg.slab_bytes // (4 * bj * m * n))
    out = torch.empty(bi, bj, dtype=torch.float64, device=xi.device)
    for a0 in range(0, bi, rows):
        fi = xi[a0 : a0 + rows].permute(0, 2, 1).reshape(-1, d)  # (rows n, d)
        p = _mm(fi, fj, cfg.precision).view(-1, n, bj, m)
        out[a0 : a0 + rows] = p.square().sum(dim=(1, 3), dtype=torch.float64)
        stats.note("implicit", 1, fi.shape[0], d, fj.shape[1])
    return out


def explicit_is_cheaper(sizes: Sequence[int], d: int, n: int) -> bool:
    """Multiply-adds of slab-formed Grams (each block's triangle once, products of every needed
    pair) against ‖C_iᵀ C_j‖² for every needed pair."""
    pairs = sum(a * b for a in sizes for b in sizes) / 2
    explicit = sum(sizes) * d * d * n / 2 + pairs * d * d / 2
    return explicit < pairs * d * n * n


# ----------------------------------------------------------------------------- the kernel


def streamed_inner(
    load: Callable[[Sequence[int]], torch.Tensor],
    num: int,
    shape: tuple[int, ...],
    config: StreamConfig | None = None,
    *,
    stats: KernelStats | None = None,
    name: str = "",
    progress: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """The N × N float64 matrix of ⟨x_i, x_j⟩ for networks 0 … num-1 whose features ``load(nets)``
    returns as a float32 block: vectors (B, D), or chain factors (B, d, n) with x = vec(C Cᵀ).
    One job of :func:`streamed_inners`."""
    return streamed_inners(load, lambda block, _: block, num, {name: shape}, config, stats=stats,
                           progress=progress)[name]


def block_sizes(num: int, per_net: int, config: StreamConfig) -> list[int]:
    """Networks per block for ``num`` networks of ``per_net`` bytes each (the last block may be
    short)."""
    size = max(1, min(num, config.block_bytes // per_net))
    return [min(size, num - a) for a in range(0, num, size)]


def streamed_inners(
    read: Callable[[Sequence[int]], Any],
    features: Callable[[Any, str], torch.Tensor],
    num: int,
    shapes: dict[str, tuple[int, ...]],
    config: StreamConfig | None = None,
    *,
    read_bytes: int = 0,
    stats: KernelStats | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """For every job ``name`` of ``shapes``, the N × N float64 matrix of ⟨x_i, x_j⟩ over networks
    0 … num-1, in one pass: ``read(nets)`` returns a block (``read_bytes`` per network), and
    ``features(block, name)`` the block's float32 features for that job — vectors (B, D) or chain
    factors (B, d, n), x = vec(C Cᵀ).

    A block holds as many networks as ``config.block_bytes`` allows for their read data plus their
    largest job's features; two blocks are held at once (see module doc), and each block pair
    serves every job before the next is read."""
    cfg = config or StreamConfig()
    stats = stats if stats is not None else KernelStats()
    device = torch.device(cfg.device)
    sizes = block_sizes(num, read_bytes + max(4 * math.prod(s) for s in shapes.values()), cfg)
    blocks = [list(range(a, a + s)) for a, s in zip(itertools.accumulate([0, *sizes]), sizes)]
    sizes = [len(b) for b in blocks[:2]]
    kernels = {}
    for name, shape in shapes.items():
        stats.blocks[name] = len(blocks)
        stats.shapes[name] = tuple(shape)
        stats.modes[name] = ("vectors" if len(shape) == 1 else
                             "explicit" if explicit_is_cheaper(sizes, shape[0], shape[1]) else "implicit")
        stats.jobs.setdefault(name, {"features": 0.0, "kernel": 0.0, "macs": 0.0})
        kernels[name] = torch.zeros(num, num, dtype=torch.float64)

    def timed(fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0

    def counted(name: str, batch: int, fn, *args):
        with FlopCounterMode(display=False) as flops:  # chain products are GEMMs too
            out, dt = timed(fn, *args)
        macs = flops.get_total_flops() / 2
        if macs:  # timed for the GEMM fraction as C_{l-1} W_l products of the factor's shape
            d, n = shapes[name] if len(shapes[name]) == 2 else (shapes[name][0], 1)
            stats.note("features", batch, d, n, n, macs=macs)
        return out, dt

    def read_block(nets: list[int]):  # a read may form features too (one job per pass)
        block, dt = counted(next(iter(shapes)), len(nets), read, nets)
        stats.seconds["load"] += dt
        stats.seconds["read"] += dt
        stats.networks_read += len(nets)
        return block

    def job_features(block, name: str) -> torch.Tensor:
        x, dt = counted(name, len(blocks[0]), features, block, name)
        stats.seconds["load"] += dt
        stats.jobs[name]["features"] += dt
        return x

    def put(name: str, ia: list[int], ib: list[int], block: torch.Tensor) -> None:
        block = block.cpu()
        kernels[name][ia[0] : ia[-1] + 1, ib[0] : ib[-1] + 1] = block
        kernels[name][ib[0] : ib[-1] + 1, ia[0] : ia[-1] + 1] = block.T

    def pair(name: str, xi: torch.Tensor, xj: torch.Tensor | None, need: tuple[bool, bool, bool]) -> list:
        mode = stats.modes[name]
        if mode == "vectors":
            fn = lambda: [_chunked_inner(xi, None, cfg, stats) if need[0] else None,  # noqa: E731
                          None if xj is None else _chunked_inner(xi, xj, cfg, stats),
                          None if xj is None or not need[2] else _chunked_inner(xj, None, cfg, stats)]
        elif mode == "explicit":
            fn = lambda: _explicit_pair(xi, xj, cfg, stats, need)  # noqa: E731
        else:
            fn = lambda: [_implicit_block(xi, xi, cfg, stats) if need[0] else None,  # noqa: E731
                          None if xj is None else _implicit_block(xi, xj, cfg, stats),
                          None if xj is None or not need[2] else _implicit_block(xj, xj, cfg, stats)]
        macs = sum(stats.macs.values())
        out, dt = timed(fn)
        stats.seconds["kernel"] += dt
        stats.jobs[name]["kernel"] += dt
        stats.jobs[name]["macs"] += sum(stats.macs.values()) - macs
        return out

    def alone(rows: list[int], block) -> None:  # a block's kernel with itself, every job
        for name in shapes:
            put(name, rows, rows, pair(name, job_features(block, name), None, (True, False, False))[0])

    done: set[int] = set()
    with _precision(cfg.precision, device):
        carried = None
        for a, rows in enumerate(blocks):
            wa = carried if carried is not None else read_block(rows)
            carried = None
            if len(blocks) == 1:
                alone(rows, wa)
                break
            for b in reversed(range(a + 1, len(blocks))):  # the last one read is the next row block
                wb = read_block(blocks[b])
                for name in shapes:
                    xi, xj = job_features(wa, name), job_features(wb, name)
                    kii, kij, kjj = pair(name, xi, xj, (a not in done, True, b not in done))
                    del xi, xj
                    for blk, ia, ib in ((kii, rows, rows), (kij, rows, blocks[b]), (kjj, blocks[b], blocks[b])):
                        if blk is not None:
                            put(name, ia, ib, blk)
                done.update((a, b))
                if progress is not None:
                    progress(f"blocks ({a + 1}, {b + 1}) of {len(blocks)}")
                carried = wb if b == a + 1 else None
                del wb
            if a == len(blocks) - 1 and a not in done:  # only reached with one block left unpaired
                alone(rows, wa)
    return kernels
