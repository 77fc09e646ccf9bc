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

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ffl.chain import chain_factors, layer_features
from ffl.features import FeatureConfig
from ffl.models import build_model

PRODUCT_PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class StreamConfig:
    """How a kernel is streamed: where (``device``), in what arithmetic (``precision`` of the
    products, one of :data:`PRODUCT_PRECISIONS`; sums are float64), and in how much memory
    (``block_bytes`` of float32 features per block, two blocks held; ``slab_bytes`` for one slab
    of Gram rows or one implicit product tile; ``chunk`` terms per reduced-precision product)."""

    device: str = "cpu"
    precision: str = "fp32"
    block_bytes: int = 2 << 30
    slab_bytes: int = 256 << 20
    chunk: int = 1 << 16

    def __post_init__(self) -> None:
        if self.precision not in PRODUCT_PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {PRODUCT_PRECISIONS}")
        if self.precision == "tf32" and torch.device(self.device).type != "cuda":
            raise ValueError("tf32 products need a CUDA device")
        if min(self.block_bytes, self.slab_bytes, self.chunk) < 1:
            raise ValueError("block_bytes, slab_bytes and chunk must be positive")


@dataclass
class KernelStats:
    """What streaming did: ``networks_read`` (a network read twice counts twice), ``blocks`` per
    index, multiply-adds by kind (``form``: Gram slabs from factors; ``product``: explicit kernel
    products; ``implicit``: ‖C_iᵀ C_j‖² products), seconds by stage (``load``: reading networks and
    forming their features; ``kernel``: everything after)."""

    networks_read: int = 0
    blocks: dict[str, int] = field(default_factory=dict)
    macs: dict[str, float] = field(default_factory=lambda: {"form": 0.0, "product": 0.0, "implicit": 0.0})
    seconds: dict[str, float] = field(default_factory=lambda: {"load": 0.0, "kernel": 0.0})
    modes: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: the largest GEMM of each kind, as (batch, m, k, n): the shape a reference rate is timed at
    gemm_shapes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    def note(self, kind: str, batch: int, m: int, k: int, n: int) -> None:
        self.macs[kind] += batch * m * k * n
        if batch * m * k * n > math.prod(self.gemm_shapes.get(kind, (0,))):
            self.gemm_shapes[kind] = (batch, m, k, n)


# ----------------------------------------------------------------------------- features of a zoo


class ZooFeatures:
    """Features of a zoo's networks at any index, read from its shards on demand.

    ``load(kind, index, nets)`` returns the float32 features of networks ``nets`` on ``device``:
    chain factors C_index (B, d, n) for ``kind="chain"``, flattened layer weights (B, D) for
    ``kind="layer"`` — the same tensors :func:`ffl.features.zoo_representations` stacks.
    """

    def __init__(self, zoo, features: FeatureConfig | None = None, device: str | torch.device = "cpu") -> None:
        self.zoo = zoo
        self.features = features or FeatureConfig()
        self.device = torch.device(device)
        self._templates: dict[int, nn.Module] = {}
        first = self._compute(0, "chain", None)
        layers = self._compute(0, "layer", None)
        self.shapes = {("chain", l): tuple(c.shape) for l, c in enumerate(first, 1)}
        self.shapes.update({("layer", l): tuple(v.shape) for l, v in enumerate(layers, 1)})

    def indices(self, kind: str) -> list[int]:
        return sorted(l for k, l in self.shapes if k == kind)

    def _model(self, i: int) -> nn.Module:
        net = self.zoo.manifest["networks"][i]
        ncls = int(net["num_classes"])
        if ncls not in self._templates:  # parameters on the meta device: no initialization cost
            with torch.device("meta"):
                self._templates[ncls] = build_model(self.zoo.spec.arch, ncls, **self.zoo.manifest["build_kwargs"])
        model = self._templates[ncls]
        state = {k: v.to(self.device, non_blocking=True) for k, v in self.zoo.state_dict(i).items()}
        model.load_state_dict(state, assign=True)
        return model.eval()

    def _compute(self, i: int, kind: str, index: int | None) -> list[torch.Tensor]:
        f, model = self.features, self._model(i)
        with torch.no_grad():
            if kind == "chain":
                return chain_factors(model, normalize=f.chain_normalize, fold_bn=f.fold_bn,
                                     gru_lags=f.gru_lags, upto=index)
            if kind == "layer":
                return layer_features(model, fold_bn=f.fold_bn, normalize=f.layer_normalize,
                                      gru_recurrent=f.gru_recurrent)
        raise ValueError(f"unknown feature kind {kind!r}; choose 'chain' or 'layer'")

    def load(self, kind: str, index: int, nets: Sequence[int]) -> torch.Tensor:
        out = torch.empty(len(nets), *self.shapes[(kind, index)], dtype=torch.float32, device=self.device)
        for row, i in enumerate(nets):
            out[row] = self._compute(int(i), kind, index)[index - 1]
        return out


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

    Blocks hold ``config.block_bytes`` of features; two are held at once (see module doc)."""
    cfg = config or StreamConfig()
    stats = stats if stats is not None else KernelStats()
    device = torch.device(cfg.device)
    per_net = 4 * math.prod(shape)
    size = max(1, min(num, cfg.block_bytes // per_net))
    blocks = [list(range(a, min(num, a + size))) for a in range(0, num, size)]
    stats.blocks[name] = len(blocks)
    stats.shapes[name] = tuple(shape)
    factors = len(shape) == 2
    if factors:
        sizes = [len(b) for b in blocks[:2]]
        explicit = explicit_is_cheaper(sizes, shape[0], shape[1])
        stats.modes[name] = "explicit" if explicit else "implicit"
    else:
        stats.modes[name] = "vectors"
    kernel = torch.zeros(num, num, dtype=torch.float64)

    def read(nets: list[int]) -> torch.Tensor:
        t0 = time.perf_counter()
        x = load(nets)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.seconds["load"] += time.perf_counter() - t0
        stats.networks_read += len(nets)
        return x

    def put(ia: list[int], ib: list[int], block: torch.Tensor) -> None:
        block = block.cpu()
        kernel[ia[0] : ia[-1] + 1, ib[0] : ib[-1] + 1] = block
        kernel[ib[0] : ib[-1] + 1, ia[0] : ia[-1] + 1] = block.T

    def pair(xi: torch.Tensor, xj: torch.Tensor | None, need: tuple[bool, bool, bool]) -> list:
        t0 = time.perf_counter()
        if not factors:
            out = [_chunked_inner(xi, None, cfg, stats) if need[0] else None,
                   None if xj is None else _chunked_inner(xi, xj, cfg, stats),
                   None if xj is None or not need[2] else _chunked_inner(xj, None, cfg, stats)]
        elif explicit:
            out = _explicit_pair(xi, xj, cfg, stats, need)
        else:
            out = [_implicit_block(xi, xi, cfg, stats) if need[0] else None,
                   None if xj is None else _implicit_block(xi, xj, cfg, stats),
                   None if xj is None or not need[2] else _implicit_block(xj, xj, cfg, stats)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.seconds["kernel"] += time.perf_counter() - t0
        return out

    done: set[int] = set()
    with _precision(cfg.precision, device):
        carried: torch.Tensor | None = None
        for a, rows in enumerate(blocks):
            xi = carried if carried is not None else read(rows)
            carried = None
            if len(blocks) == 1:
                put(rows, rows, pair(xi, None, (True, False, False))[0])
                break
            for b in reversed(range(a + 1, len(blocks))):  # the last one read is the next row block
                xj = read(blocks[b])
                kii, kij, kjj = pair(xi, xj, (a not in done, True, b not in done))
                for blk, ia, ib in ((kii, rows, rows), (kij, rows, blocks[b]), (kjj, blocks[b], blocks[b])):
                    if blk is not None:
                        put(ia, ib, blk)
                done.update((a, b))
                if progress is not None:
                    progress(f"{name}: blocks ({a + 1}, {b + 1}) of {len(blocks)}")
                carried = xj if b == a + 1 else None
                del xj
            if a == len(blocks) - 1 and a not in done:  # only reached with one block left unpaired
                put(rows, rows, pair(xi, None, (True, False, False))[0])
    return kernel
