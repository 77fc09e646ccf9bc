"""Batched implicit-GEMM convolution: the convolutions of K networks in one kernel launch (§4's
CNN zoos, trained by :mod:`ffl.engine`).

A zoo chunk's activations sit in the folded layout of :mod:`ffl.batched`, ``(B, K*C, H, W)``.
cuDNN runs the grouped convolution over that layout (K networks as groups) as one small kernel
per group; this module runs it as one implicit GEMM per network, all networks in one launch. For
network ``k`` and a ``kh×kw`` kernel with stride 1 the output is the GEMM

    Y_k[(b, p), o] = Σ_{tap, c} X_k[(b, p + tap − pad), c] · W_k[o, c, tap]

over rows ``(b, p)`` (batch × output pixels) and a reduction over taps × input channels. The
input's rows are gathered on the fly from the shifted pixels ("implicit": no im2col copy), so
the convolution reads the activation once per tap from cache rather than materializing nine
copies. The backward uses the same two ideas: the input gradient is the forward kernel applied
to the output gradient with the kernel flipped and transposed; the weight gradient is a GEMM per
tap reducing over rows, split across programs and summed in a fixed order (deterministic).

The kernels are written in Triton. On CUDA they are compiled; on CPU Triton's interpreter runs the
same kernel source on NumPy, which is how the tests check them against ``F.conv2d`` without a GPU.
:func:`batched_conv2d` with ``backend="torch"`` is the reference: PyTorch's grouped convolution.
Only stride 1, dilation 1 and zero padding are covered, which are the paper's CNNs' convolutions
(3×3, padding 1; ResNet-5's 1×1 projections); :func:`supported` says whether a layer qualifies.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from ffl.files import write_json_atomic
from ffl.triton_support import BACKENDS, available, kernels, programs_to_fill, row_splits, triton

if triton is not None:
    import triton.language as tl

__all__ = ["BACKENDS", "Tiles", "TileKey", "available", "supported", "batched_conv2d", "default_tiles",
           "measured_tiles", "read_tile_table", "write_tile_table"]


def supported(stride, dilation, groups, padding_mode: str = "zeros") -> bool:
    """Whether a convolution with these settings (per network) is one this module computes."""
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return pair(stride) == (1, 1) and pair(dilation) == (1, 1) and groups == 1 and padding_mode == "zeros"


# --------------------------------------------------------------------------------------------
# Kernels (Triton source; compiled for CUDA or interpreted on CPU)
# --------------------------------------------------------------------------------------------


def _conv_forward_kernel(
    X, WT, BIAS, Y,
    NB, H, W, HO, WO, C, O,
    sxb, sxh, sxw, sxc,
    syb, syh, syw, syc,
    PH, PW,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, FLAT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
):
    """One (BM rows × BN output channels) tile of network ``program_id(1)``'s output. ``WT`` is the
    weight as (K, KH, KW, C, O), contiguous; X and Y are addressed through their strides.

    The reduction runs over (tap, channel). A step is a block of BC channels of one tap (``FLAT``
    off), or a block of BC consecutive (tap, channel) pairs (``FLAT``, see :class:`Tiles`): with
    PlainNet's 3 input channels 27 products then fill one 32-wide step instead of nine 16-wide
    steps holding 3 each."""
    k = tl.program_id(1)
    num_n = (O + BN - 1) // BN
    pm = tl.program_id(0) // num_n
    pn = tl.program_id(0) % num_n
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    m_ok = rm < NB * HO * WO
    n_ok = rn < O
    ow = rm % WO
    oh = (rm // WO) % HO
    b = (rm // (WO * HO)).to(tl.int64)
    x_net = X + k.to(tl.int64) * C * sxc
    w_net = WT + k.to(tl.int64) * KH * KW * C * O
    acc = tl.full((BM, BN), 0.0, tl.float32)
    if FLAT:
        for r0 in range(0, KH * KW * C, BC):
            rr = r0 + tl.arange(0, BC)  # (tap, channel) pairs, tap-major: WT's own order
            r_ok = rr < KH * KW * C
            tap = rr // C
            ih = oh[:, None] + (tap // KW)[None, :] - PH
            iw = ow[:, None] + (tap % KW)[None, :] - PW
            ok = m_ok[:, None] & r_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_net + b[:, None] * sxb + ih * sxh + iw * sxw + (rr % C)[None, :] * sxc, mask=ok, other=0.0)
            w = tl.load(w_net + rr[:, None] * O + rn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    else:
        num_c = (C + BC - 1) // BC
        # one loop over (tap, channel block), so that Triton pipelines loads across taps
        for r in range(0, KH * KW * num_c):
            tap = r // num_c
            rc = (r % num_c) * BC + tl.arange(0, BC)
            c_ok = rc < C
            ih = oh + tap // KW - PH
            iw = ow + tap % KW - PW
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_net + (b * sxb + ih * sxh + iw * sxw)[:, None] + rc[None, :] * sxc,
                        mask=row_ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(w_net + tap * C * O + rc[:, None] * O + rn[None, :], mask=c_ok[:, None] & n_ok[None, :],
                        other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + k * O + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = Y + k.to(tl.int64) * O * syc + (b * syb + oh * syh + ow * syw)[:, None] + rn[None, :] * syc
    tl.store(out, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _conv_weight_grad_kernel(
    X, G, DW,
    NB, H, W, HO, WO, C, O,
    sxb, sxh, sxw, sxc,
    sgb, sgh, sgw, sgc,
    PH, PW, ROWS_PER_SPLIT,
    KH: tl.constexpr, KW: tl.constexpr, PRECISION: tl.constexpr, FLAT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr,
):
    """One (BC (tap, input channel) pairs × BN output channels) tile of network
    ``program_id(1)``'s weight gradient, summed over the rows of split ``program_id(2)``; written
    to DW[split, k, tap, c, o] (the splits are summed afterwards). A tile's pairs are BC channels
    of one tap, or with ``FLAT`` (few channels) BC consecutive pairs, as in the forward kernel."""
    k = tl.program_id(1)
    split = tl.program_id(2)
    num_n = (O + BN - 1) // BN
    pn = tl.program_id(0) % num_n
    if FLAT:
        rr = (tl.program_id(0) // num_n) * BC + tl.arange(0, BC)
        r_ok = rr < KH * KW * C
        rc = rr % C
        dy = (rr // C) // KW
        dx = (rr // C) % KW
    else:
        num_c = (C + BC - 1) // BC
        tap = tl.program_id(0) // (num_c * num_n)
        rc = ((tl.program_id(0) // num_n) % num_c) * BC + tl.arange(0, BC)
        r_ok = rc < C
        rr = tap * C + rc
        dy = tap // KW
        dx = tap % KW
    rn = pn * BN + tl.arange(0, BN)
    n_ok = rn < O
    M = NB * HO * WO
    row_end = tl.minimum(M, (split + 1) * ROWS_PER_SPLIT)
    x_net = X + k.to(tl.int64) * C * sxc
    g_net = G + k.to(tl.int64) * O * sgc
    acc = tl.full((BC, BN), 0.0, tl.float32)
    for m0 in range(0, ROWS_PER_SPLIT, BM):
        rm = split * ROWS_PER_SPLIT + m0 + tl.arange(0, BM)
        m_ok = rm < row_end
        ow = rm % WO
        oh = (rm // WO) % HO
        b = (rm // (WO * HO)).to(tl.int64)
        if FLAT:
            ih = oh[:, None] + dy[None, :] - PH
            iw = ow[:, None] + dx[None, :] - PW
            ok = m_ok[:, None] & r_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_net + b[:, None] * sxb + ih * sxh + iw * sxw + rc[None, :] * sxc, mask=ok, other=0.0)
        else:
            ih = oh + dy - PH
            iw = ow + dx - PW
            row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a = tl.load(x_net + (b * sxb + ih * sxh + iw * sxw)[:, None] + rc[None, :] * sxc,
                        mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        g = tl.load(g_net + (b * sgb + oh * sgh + ow * sgw)[:, None] + rn[None, :] * sgc,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
    K = tl.num_programs(1)
    out = DW + (split * K + k).to(tl.int64) * KH * KW * C * O + rr[:, None] * O + rn[None, :]
    tl.store(out, acc, mask=r_ok[:, None] & n_ok[None, :])


def _flat(C: int) -> bool:
    """Whether the reduction steps over (tap, channel) pairs rather than channels of one tap."""
    return C < 16


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _kernels(interpret: bool) -> tuple:
    return kernels((_conv_forward_kernel, _conv_weight_grad_kernel), interpret)


def _precision(dtype: torch.dtype) -> str:
    """Triton's ``input_precision`` for FP32 operands: TF32 exactly when PyTorch's matmul would use
    it (the engine's ``tf32`` precision), IEEE FP32 otherwise; ignored for bf16/fp16 operands."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(batch, row, column, channel) strides of a (B, channels, H, W) tensor."""
    sb, sc, sh, sw = t.stride()
    return sb, sh, sw, sc


@dataclasses.dataclass(frozen=True)
class Tiles:
    """A kernel launch's blocking: BM rows (pixels) × BN output channels per program, BC reduction
    entries per step, Triton's warps and pipeline stages; for the weight gradient BM is the row
    block and the tile is BC × BN. ``flat``: the reduction steps over consecutive (tap, channel)
    pairs (True) or over the channels of one tap (False); None: flat below 16 channels. Flat steps
    fill a tile of 64 with 32 channels, which makes the weight gradient's tile Hopper's wgmma
    shape without masking half of it."""

    BM: int
    BN: int
    BC: int
    warps: int = 4
    stages: int = 3
    flat: bool | None = None

    def is_flat(self, C: int) -> bool:
        return _flat(C) if self.flat is None else self.flat

    def launch(self, interpret: bool) -> dict[str, int]:
        return {"BM": self.BM, "BN": self.BN, "BC": self.BC,
                **({} if interpret else {"num_warps": self.warps, "num_stages": self.stages})}


#: a convolution a blocking is measured for: (kind, dtype, C, O, kh, kw); ``kind`` ``forward``
#: (also the input gradient, which is the forward kernel on the flipped weights) or ``weight_grad``,
#: ``dtype`` the operands' (``bfloat16``, ``float16``, ``float32``): the fastest tile, even one that
#: fits the GPU's shared memory, depends on it
TileKey = tuple[str, str, int, int, int, int]
KINDS = ("forward", "weight_grad")
DTYPES = ("bfloat16", "float16", "float32")
_WARPS = (1, 2, 4, 8, 16)
_measured: dict[TileKey, Tiles] = {}


def default_tiles(kind: str, C: int, O: int, kh: int, kw: int, interpret: bool = False,
                  dtype: torch.dtype = torch.float32) -> Tiles:
    """The blocking used unless one is given (``kind``: ``forward`` or ``weight_grad``; ``dtype``:
    the operands'): the measured one for this convolution inside :func:`measured_tiles`, else one
    chosen by reasoning, small in the interpreter (speed). ``python -m ffl.bench conv --sweep
    --tiles-out FILE`` measures alternatives on a GPU and writes the fastest as a table."""
    measured = _measured.get((kind, dtype_name(dtype), C, O, kh, kw))
    if measured is not None:
        return measured
    if interpret:
        BM, BN, BC = 16, _pow2(O, 16, 32), _pow2(C, 16, 32)
    else:
        BM, BN, BC = 64, _pow2(O, 16, 128 if kind == "forward" else 64), _pow2(C, 16, 64)
    return Tiles(BM, BN, _pow2(kh * kw * C, 16, 32) if _flat(C) else BC)


@contextlib.contextmanager
def measured_tiles(table: Mapping[TileKey, Tiles]) -> Iterator[None]:
    """Use ``table``'s blockings (see :func:`read_tile_table`) for the shapes it has, inside the
    block; other shapes keep :func:`default_tiles`' choice. Blockings change speed and the order
    of the weight gradient's sums (rounding), never what is computed."""
    global _measured
    before, _measured = _measured, dict(table)
    try:
        yield
    finally:
        _measured = before


def dtype_name(dtype: torch.dtype) -> str:
    """A tile table's name of an operand dtype: ``bfloat16``, ``float16``, ``float32``."""
    return str(dtype).removeprefix("torch.")


def _tiles_entry(entry: object, where: str) -> tuple[TileKey, Tiles]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping, got {entry!r}")
    missing = [k for k in ("kind", "dtype", "C", "O", "kh", "kw", "BM", "BN", "BC") if k not in entry]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    if entry["kind"] not in KINDS:
        raise ValueError(f"{where}: kind {entry['kind']!r} is not one of {', '.join(KINDS)}")
    if entry["dtype"] not in DTYPES:
        raise ValueError(f"{where}: dtype {entry['dtype']!r} is not one of {', '.join(DTYPES)}")
    ints = {k: entry[k] for k in ("C", "O", "kh", "kw", "BM", "BN", "BC")}
    ints.update(warps=entry.get("warps", 4), stages=entry.get("stages", 3))
    bad = [k for k, v in ints.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise ValueError(f"{where}: {', '.join(bad)} must be positive integers")
    blocks = [k for k in ("BM", "BN", "BC") if ints[k] < 16 or ints[k] & (ints[k] - 1)]
    if blocks:  # tl.dot takes power-of-two tiles of at least 16
        raise ValueError(f"{where}: {', '.join(blocks)} must be powers of two, at least 16")
    if ints["warps"] not in _WARPS:
        raise ValueError(f"{where}: warps must be one of {_WARPS}")
    flat = entry.get("flat")
    if flat not in (None, True, False):
        raise ValueError(f"{where}: flat must be true, false or null, got {flat!r}")
    key = (entry["kind"], entry["dtype"], ints["C"], ints["O"], ints["kh"], ints["kw"])
    return key, Tiles(ints["BM"], ints["BN"], ints["BC"], ints["warps"], ints["stages"], flat)


def _tile_table(entries: list, where: str) -> dict[TileKey, Tiles]:
    """Entries of a tile table, checked one by one (``where``: how an error names the table)."""
    table: dict[TileKey, Tiles] = {}
    for i, entry in enumerate(entries):
        key, tiles = _tiles_entry(entry, f"{where}tiles[{i}]")
        if key in table:
            raise ValueError(f"{where}tiles[{i}]: a second blocking for {key}")
        table[key] = tiles
    return table


def read_tile_table(path: str | Path) -> dict[TileKey, Tiles]:
    """The blockings of a table written by :func:`write_tile_table` (JSON: ``{"about": {...},
    "tiles": [{"kind", "dtype", "C", "O", "kh", "kw", "BM", "BN", "BC", "warps", "stages",
    "flat", ...}]}``; other fields of an entry, such as the measured TFLOP/s, are ignored). A
    malformed table is an error naming the file and the entry."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the tile table {path}: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("tiles"), list):
        raise ValueError(f"{path}: expected an object with a list 'tiles'")
    return _tile_table(doc["tiles"], f"{path}, ")


def write_tile_table(path: str | Path, entries: list[dict], about: Mapping[str, object]) -> Path:
    """Write a tile table: ``entries`` as :func:`read_tile_table` reads them (checked first, so
    nothing is written for a bad one), ``about`` says where and how they were measured."""
    _tile_table(entries, "")
    write_json_atomic(path, {"about": dict(about), "tiles": entries})
    return Path(path)


def _forward(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, K: int, padding: tuple[int, int],
             interpret: bool, tiles: Tiles | None = None) -> torch.Tensor:
    """Y = conv(x, w) per network; ``wt``: the weight as (K, kh, kw, C, O), contiguous."""
    B, KC, H, W = x.shape
    _, kh, kw, C, O = wt.shape
    ph, pw = padding
    HO, WO = H + 2 * ph - kh + 1, W + 2 * pw - kw + 1
    y = torch.empty((B, K * O, HO, WO), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    tiles = tiles or default_tiles("forward", C, O, kh, kw, interpret, x.dtype)
    grid = (triton.cdiv(B * HO * WO, tiles.BM) * triton.cdiv(O, tiles.BN), K)
    forward, _ = _kernels(interpret)
    _launchable(forward, interpret)[grid](
        x, wt, bias if bias is not None else wt, y,
        B, H, W, HO, WO, C, O, *_strides(x), *_strides(y), ph, pw,
        KH=kh, KW=kw, HAS_BIAS=bias is not None, PRECISION=_precision(x.dtype), FLAT=tiles.is_flat(C),
        **tiles.launch(interpret),
    )
    return y


def _weight_grad(x: torch.Tensor, g: torch.Tensor, K: int, kh: int, kw: int, padding: tuple[int, int],
                 interpret: bool, programs: int | None = None, tiles: Tiles | None = None) -> torch.Tensor:
    """dW (K, O, C, kh, kw) in FP32 from the input x and the output gradient g. The rows are split
    so that about ``programs`` programs run (default: 4 per multiprocessor on CUDA, 1 interpreted)."""
    B, KC, H, W = x.shape
    C, O = KC // K, g.shape[1] // K
    HO, WO = g.shape[2], g.shape[3]
    tiles = tiles or default_tiles("weight_grad", C, O, kh, kw, interpret, x.dtype)
    steps = triton.cdiv(kh * kw * C, tiles.BC) if tiles.is_flat(C) else kh * kw * triton.cdiv(C, tiles.BC)
    blocks = steps * triton.cdiv(O, tiles.BN)
    # enough programs to fill the GPU, each reducing a long run of rows; the splits are summed below
    if programs is None:
        programs = programs_to_fill(x.device, interpret)
    splits, per_split = row_splits(B * HO * WO, blocks * K, tiles.BM, programs, min_blocks=8)
    dw = torch.empty((splits, K, kh, kw, C, O), dtype=torch.float32, device=x.device)
    _, weight_grad = _kernels(interpret)
    _launchable(weight_grad, interpret)[(blocks, K, splits)](
        x, g, dw, B, H, W, HO, WO, C, O, *_strides(x), *_strides(g), padding[0], padding[1], per_split,
        KH=kh, KW=kw, PRECISION=_precision(x.dtype), FLAT=tiles.is_flat(C), **tiles.launch(interpret),
    )
    return dw.sum(0).permute(0, 4, 3, 1, 2).contiguous()


def _launchable(kernel, interpret: bool):
    """Compiled kernels launch through ``torch.library.wrap_triton`` (inside the custom ops below,
    which lets ``torch.compile`` trace around them); interpreted ones directly."""
    return kernel if interpret else torch.library.wrap_triton(kernel)


def _forward_op(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None, K: int, ph: int, pw: int) -> torch.Tensor:
    return _forward(x, wt, bias, K, (ph, pw), False)


def _weight_grad_op(x: torch.Tensor, g: torch.Tensor, K: int, kh: int, kw: int, ph: int, pw: int) -> torch.Tensor:
    return _weight_grad(x, g, K, kh, kw, (ph, pw), False)


@functools.cache
def _ops():
    """The CUDA path as custom operators (torch.compile sees them as opaque nodes), registered on
    first use: registering imports torch's compiler stack, about a second at every import else."""
    torch.library.triton_op("ffl::implicit_conv_forward", _forward_op, mutates_args=())
    torch.library.triton_op("ffl::implicit_conv_weight_grad", _weight_grad_op, mutates_args=())
    return torch.ops.ffl


def _conv(x, wt, bias, K: int, padding: tuple[int, int], interpret: bool) -> torch.Tensor:
    if interpret:
        return _forward(x, wt, bias, K, padding, True)
    return _ops().implicit_conv_forward(x, wt, bias, K, *padding)


def _dweight(x, g, K: int, kh: int, kw: int, padding: tuple[int, int], interpret: bool) -> torch.Tensor:
    if interpret:
        return _weight_grad(x, g, K, kh, kw, padding, True)
    return _ops().implicit_conv_weight_grad(x, g, K, kh, kw, *padding)


class _ImplicitConv(torch.autograd.Function):
    """Autograd for the Triton path: x (B, K*C, H, W), weight (K, O, C, kh, kw), bias (K, O)."""

    @staticmethod
    def forward(ctx, x, weight, bias, K, padding, interpret):
        ctx.x_format = _memory_format(x)
        # channels innermost: each row of a tile is then one contiguous, vectorizable load
        x = x.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, weight)
        ctx.K, ctx.padding, ctx.interpret, ctx.has_bias = K, padding, interpret, bias is not None
        wt = weight.permute(0, 3, 4, 2, 1).contiguous()
        return _conv(x, wt, bias.contiguous() if bias is not None else None, K, padding, interpret)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        K, (ph, pw), interpret = ctx.K, ctx.padding, ctx.interpret
        kh, kw = weight.shape[3], weight.shape[4]
        g = g.contiguous(memory_format=torch.channels_last)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            # dX = conv(g, W flipped in space, input and output channels swapped), padding k−1−p
            wt_flipped = weight.flip(3, 4).permute(0, 3, 4, 1, 2).contiguous()
            gx = _conv(g, wt_flipped, None, K, (kh - 1 - ph, kw - 1 - pw), interpret)
            gx = gx.contiguous(memory_format=ctx.x_format)
        if ctx.needs_input_grad[1]:
            gw = _dweight(x, g, K, kh, kw, (ph, pw), interpret).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3), dtype=torch.float32).view(K, -1)
        return gx, gw, gb, None, None, None


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() \
        else torch.contiguous_format


def batched_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   padding: int | tuple[int, int] = 0, backend: str = "torch") -> torch.Tensor:
    """The convolutions of K networks on the folded layout (stride 1, dilation 1, zero padding).

    ``x``: (B, K*C, H, W), network k's channels at ``k*C:(k+1)*C``; ``weight``: (K, O, C, kh, kw);
    ``bias``: (K, O) or None. Returns (B, K*O, H', W'), the same as the grouped convolution
    ``F.conv2d(x, weight.reshape(K*O, C, kh, kw), bias.reshape(-1), padding=padding, groups=K)``.
    ``backend``: ``torch`` (that grouped convolution), ``triton`` (the kernels of this module on
    CUDA; output in channels-last memory format) or ``interpret`` (the same kernels run by Triton's
    interpreter on CPU: slow, for tests). Under autocast the Triton path computes in the autocast
    dtype with FP32 accumulation, as cuDNN does.
    """
    if not available(backend):
        raise RuntimeError(f"convolution backend {backend!r} is not available here "
                           f"(Triton {'installed' if triton is not None else 'missing'}, "
                           f"CUDA {'available' if torch.cuda.is_available() else 'unavailable'})")
    if x.dim() != 4 or weight.dim() != 5:
        raise ValueError(f"expected x (B, K*C, H, W) and weight (K, O, C, kh, kw); got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    K, O, C, kh, kw = weight.shape
    if x.shape[1] != K * C:
        raise ValueError(f"x has {x.shape[1]} channels; weight {tuple(weight.shape)} needs K*C = {K * C}")
    padding = tuple(padding) if isinstance(padding, (tuple, list)) else (int(padding), int(padding))
    if backend == "torch":
        b = bias.reshape(-1) if bias is not None else None
        return F.conv2d(x, weight.reshape(K * O, C, kh, kw), b, padding=padding, groups=K)
    interpret = backend == "interpret"
    if not interpret and x.device.type != "cuda":
        raise ValueError(f"backend 'triton' needs CUDA tensors; x is on {x.device}")
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if interpret and (x.dtype, weight.dtype) != (torch.float32, torch.float32):
        raise TypeError("Triton's interpreter multiplies float32 only (its bf16 dot is wrong); got "
                        f"{x.dtype} and {weight.dtype}")
    if x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton path takes float32, bfloat16 or float16 x and weight of one dtype; got "
                        f"{x.dtype} and {weight.dtype}")
    with torch.autocast(x.device.type, enabled=False):
        return _ImplicitConv.apply(x, weight, bias, K, padding, interpret)

