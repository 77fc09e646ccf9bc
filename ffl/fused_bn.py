"""BatchNorm → activation → 2×2 max-pool of a conv unit, one pass over the activation each way
(the CNN zoos of §4, trained by :mod:`ffl.engine`).

A PlainNet unit (:class:`ffl.models.ConvNet`) follows its convolution with BatchNorm on the batch's
statistics, ReLU (or leaky ReLU) and, for the first units, a 2×2 max-pool. Run as four PyTorch
operations these read and write the full-resolution activation about seven times forward and
nine backward, and on a GPU they are memory-bound (about as long as the convolutions of a zoo
chunk). Here they are three Triton kernels over the folded, channels-last activation ``y``
(rows = batch × pixels, columns = the K networks' channels):

* statistics: per channel, mean and variance over rows, each program a range of rows summed
  about a shift (its first block's mean), the ranges combined in a fixed order (Chan et al.);
* forward: ``p = maxpool(act(y·scale + shift))`` with ``scale = γ/σ``, ``shift = β − μ·scale``;
* backward, twice over the pooled pixels: once to sum ``dz`` and ``dz·ŷ`` per channel (``dz``:
  the pooled gradient routed to each window's first maximum, times the activation's slope), once
  to write ``dy = scale·(dz − mean(dz) − ŷ·mean(dz·ŷ))``, BatchNorm's training-mode gradient.

Nothing is saved but ``y`` and per-channel vectors; the backward recomputes the rest. Running
statistics are updated as ``nn.BatchNorm2d`` does (unbiased variance). Evaluation mode, other
activations and odd spatial sizes keep the PyTorch operations (:func:`supported`). On CPU the same
kernels run in Triton's interpreter (FP32), which is how the tests compare them with PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ffl.triton_support import available, kernels, programs_to_fill, row_splits, triton

if triton is not None:
    import triton.language as tl

__all__ = ["supported", "bn_act_pool", "reference"]


def supported(y: torch.Tensor, activation: torch.nn.Module, pool: bool, training: bool) -> bool:
    """Whether :func:`bn_act_pool` computes this unit: training mode, ReLU or leaky ReLU, and for
    a pool even height and width (every element in exactly one window)."""
    act_ok = type(activation) in (torch.nn.ReLU, torch.nn.LeakyReLU)
    return training and act_ok and y.dim() == 4 and (not pool or (y.shape[2] % 2 == 0 and y.shape[3] % 2 == 0))


def _slope(activation: torch.nn.Module) -> float:
    return float(activation.negative_slope) if isinstance(activation, torch.nn.LeakyReLU) else 0.0


# --------------------------------------------------------------------------------------------
# Kernels. y is (R, C) row-major: the channels-last (B, C, H, W) activation, R = B·H·W.
# --------------------------------------------------------------------------------------------


def _stats_kernel(Y, SHIFT_OUT, S1, S2, R, C, ROWS_PER_PROGRAM, BR: tl.constexpr, BCH: tl.constexpr):
    """Program (split, channel block): Σ(y − s) and Σ(y − s)² over its rows, s = the mean of its
    first BR rows (a shift close to the mean keeps the squares from cancelling)."""
    split = tl.program_id(0)
    rc = tl.program_id(1) * BCH + tl.arange(0, BCH)
    c_ok = rc < C
    r0 = split * ROWS_PER_PROGRAM
    r_end = tl.minimum(R, r0 + ROWS_PER_PROGRAM)
    rr = r0 + tl.arange(0, BR)
    ok = (rr < r_end)[:, None] & c_ok[None, :]
    first = tl.load(Y + rr.to(tl.int64)[:, None] * C + rc[None, :], mask=ok, other=0.0).to(tl.float32)
    n_first = tl.minimum(r_end - r0, BR)
    shift = tl.sum(first, 0) / n_first
    s1 = tl.full((BCH,), 0.0, tl.float32)
    s2 = tl.full((BCH,), 0.0, tl.float32)
    for m0 in range(0, ROWS_PER_PROGRAM, BR):
        rr = r0 + m0 + tl.arange(0, BR)
        ok = (rr < r_end)[:, None] & c_ok[None, :]
        v = tl.load(Y + rr.to(tl.int64)[:, None] * C + rc[None, :], mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, v - shift[None, :], 0.0)
        s1 += tl.sum(d, 0)
        s2 += tl.sum(d * d, 0)
    out = split * C + rc
    tl.store(SHIFT_OUT + out, shift, mask=c_ok)
    tl.store(S1 + out, s1, mask=c_ok)
    tl.store(S2 + out, s2, mask=c_ok)


def _forward_kernel(Y, P, SCALE, SHIFT, NB, H, W, C, SLOPE, POOL: tl.constexpr, BR: tl.constexpr,
                    BCH: tl.constexpr):
    """Program (block of output pixels, channel block): p = max over the window of
    act(y·scale + shift); the window is 2×2 (``POOL``) or the pixel itself."""
    S: tl.constexpr = 2 if POOL else 1
    HO = H // S
    WO = W // S
    rp = tl.program_id(0) * BR + tl.arange(0, BR)
    rc = tl.program_id(1) * BCH + tl.arange(0, BCH)
    ok = (rp < NB * HO * WO)[:, None] & (rc < C)[None, :]
    scale = tl.load(SCALE + rc, mask=rc < C, other=0.0)[None, :]
    shift = tl.load(SHIFT + rc, mask=rc < C, other=0.0)[None, :]
    wo = rp % WO
    ho = (rp // WO) % HO
    b = (rp // (WO * HO)).to(tl.int64)
    best = tl.full((BR, BCH), float("-inf"), tl.float32)
    for dy in tl.static_range(S):
        for dx in tl.static_range(S):
            row = (b * H + ho * S + dy) * W + wo * S + dx
            z = tl.load(Y + row[:, None] * C + rc[None, :], mask=ok, other=0.0).to(tl.float32) * scale + shift
            best = tl.maximum(best, tl.where(z > 0, z, z * SLOPE))
    tl.store(P + rp.to(tl.int64)[:, None] * C + rc[None, :], best.to(P.dtype.element_ty), mask=ok)


def _backward_kernel(Y, GP, DY, SUM_DZ, SUM_DZX, SCALE, SHIFT, MEAN, INVSTD, MEAN_DZ, MEAN_DZX,
                     NB, H, W, C, SLOPE, PIXELS_PER_PROGRAM,
                     POOL: tl.constexpr, WRITE: tl.constexpr, BR: tl.constexpr, BCH: tl.constexpr):
    """Program (split, channel block), over its range of output pixels: dz at each window element
    (the pooled gradient at the window's first maximum, times the activation's slope there).
    ``WRITE`` off: Σdz and Σdz·ŷ per channel into row ``split`` of SUM_DZ/SUM_DZX. ``WRITE`` on:
    dy = scale·(dz − mean(dz) − ŷ·mean(dz·ŷ)) into DY."""
    S: tl.constexpr = 2 if POOL else 1
    HO = H // S
    WO = W // S
    split = tl.program_id(0)
    rc = tl.program_id(1) * BCH + tl.arange(0, BCH)
    c_ok = rc < C
    scale = tl.load(SCALE + rc, mask=c_ok, other=0.0)[None, :]
    shift = tl.load(SHIFT + rc, mask=c_ok, other=0.0)[None, :]
    mean = tl.load(MEAN + rc, mask=c_ok, other=0.0)[None, :]
    invstd = tl.load(INVSTD + rc, mask=c_ok, other=0.0)[None, :]
    if WRITE:
        mean_dz = tl.load(MEAN_DZ + rc, mask=c_ok, other=0.0)[None, :]
        mean_dzx = tl.load(MEAN_DZX + rc, mask=c_ok, other=0.0)[None, :]
    sum_dz = tl.full((BCH,), 0.0, tl.float32)
    sum_dzx = tl.full((BCH,), 0.0, tl.float32)
    p_end = tl.minimum(NB * HO * WO, (split + 1) * PIXELS_PER_PROGRAM)
    for p0 in range(0, PIXELS_PER_PROGRAM, BR):
        rp = split * PIXELS_PER_PROGRAM + p0 + tl.arange(0, BR)
        ok = (rp < p_end)[:, None] & c_ok[None, :]
        gp = tl.load(GP + rp.to(tl.int64)[:, None] * C + rc[None, :], mask=ok, other=0.0).to(tl.float32)
        wo = rp % WO
        ho = (rp // WO) % HO
        b = (rp // (WO * HO)).to(tl.int64)
        # the window's first maximum (row-major, strict >), as max_pool2d picks it
        best = tl.full((BR, BCH), float("-inf"), tl.float32)
        arg = tl.full((BR, BCH), 0, tl.int32)
        for i in tl.static_range(S * S):
            row = (b * H + ho * S + i // S) * W + wo * S + i % S
            z = tl.load(Y + row[:, None] * C + rc[None, :], mask=ok, other=0.0).to(tl.float32) * scale + shift
            a = tl.where(z > 0, z, z * SLOPE)
            arg = tl.where(a > best, i, arg)
            best = tl.maximum(best, a)
        for i in tl.static_range(S * S):
            row = (b * H + ho * S + i // S) * W + wo * S + i % S
            v = tl.load(Y + row[:, None] * C + rc[None, :], mask=ok, other=0.0).to(tl.float32)
            z = v * scale + shift
            dz = tl.where(ok & (arg == i), gp * tl.where(z > 0, 1.0, SLOPE), 0.0)
            x_hat = (v - mean) * invstd
            if WRITE:
                dy = scale * (dz - mean_dz - x_hat * mean_dzx)
                tl.store(DY + row[:, None] * C + rc[None, :], dy.to(DY.dtype.element_ty), mask=ok)
            else:
                sum_dz += tl.sum(dz, 0)
                sum_dzx += tl.sum(dz * x_hat, 0)
    if not WRITE:
        tl.store(SUM_DZ + split * C + rc, sum_dz, mask=c_ok)
        tl.store(SUM_DZX + split * C + rc, sum_dzx, mask=c_ok)


_KERNELS = (_stats_kernel, _forward_kernel, _backward_kernel)


def _blocks(interpret: bool) -> dict[str, int]:
    return {"BR": 16, "BCH": 16} if interpret else {"BR": 64, "BCH": 64, "num_warps": 4}


def _splits(rows: int, channel_blocks: int, BR: int, interpret: bool, programs: int | None,
            device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) over ``channel_blocks`` column blocks of BR-row tiles
    (:func:`ffl.triton_support.row_splits`; ``programs`` default: enough to fill the GPU)."""
    programs = programs_to_fill(device, interpret) if programs is None else programs
    return row_splits(rows, channel_blocks, BR, programs)


def _batch_stats(y: torch.Tensor, interpret: bool, programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (FP32) of channels-last y over batch and pixels."""
    B, C, H, W = y.shape
    R = B * H * W
    blk = _blocks(interpret)
    cb = triton.cdiv(C, blk["BCH"])
    splits, per = _splits(R, cb, blk["BR"], interpret, programs, y.device)
    shift, s1, s2 = (torch.empty(splits, C, device=y.device, dtype=torch.float32) for _ in range(3))
    kernels(_KERNELS, interpret)[0][(splits, cb)](y, shift, s1, s2, R, C, per, **blk)
    # rows per split, made on the device: a copy from host memory would wait for the GPU's queue
    counts = (R - per * torch.arange(splits, device=y.device, dtype=torch.float32)).clamp(max=per)[:, None]
    part_mean = shift + s1 / counts
    part_m2 = s2 - s1 * s1 / counts
    mean = (counts * part_mean).sum(0) / R
    m2 = part_m2.sum(0) + (counts * (part_mean - mean) ** 2).sum(0)
    return mean, (m2 / R).clamp_min(0)


class _BNActPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, bias, eps, slope, pool, interpret, programs):
        y = y.contiguous(memory_format=torch.channels_last)
        mean, var = _batch_stats(y, interpret, programs)
        invstd = torch.rsqrt(var + eps)
        scale = weight.float() * invstd
        shift = bias.float() - mean * scale
        B, C, H, W = y.shape
        s = 2 if pool else 1
        p = torch.empty(B, C, H // s, W // s, dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
        blk = _blocks(interpret)
        grid = (triton.cdiv(B * (H // s) * (W // s), blk["BR"]), triton.cdiv(C, blk["BCH"]))
        kernels(_KERNELS, interpret)[1][grid](y, p, scale, shift, B, H, W, C, slope, POOL=pool, **blk)
        ctx.save_for_backward(y, weight, scale, shift, mean, invstd)
        ctx.slope, ctx.pool, ctx.interpret, ctx.programs = slope, pool, interpret, programs
        ctx.mark_non_differentiable(mean, var)
        return p, mean, var

    @staticmethod
    def backward(ctx, gp, _mean, _var):
        y, weight, scale, shift, mean, invstd = ctx.saved_tensors
        gp = gp.contiguous(memory_format=torch.channels_last)
        B, C, H, W = y.shape
        s = 2 if ctx.pool else 1
        pixels = B * (H // s) * (W // s)
        blk = _blocks(ctx.interpret)
        cb = triton.cdiv(C, blk["BCH"])
        splits, per = _splits(pixels, cb, blk["BR"], ctx.interpret, ctx.programs, y.device)
        sum_dz, sum_dzx = (torch.empty(splits, C, device=y.device, dtype=torch.float32) for _ in range(2))
        backward = kernels(_KERNELS, ctx.interpret)[2]
        args = (scale, shift, mean, invstd)
        backward[(splits, cb)](y, gp, y, sum_dz, sum_dzx, *args, scale, scale, B, H, W, C, ctx.slope, per,
                               POOL=ctx.pool, WRITE=False, **blk)
        dbias, dweight = sum_dz.sum(0), sum_dzx.sum(0)  # Σdz, Σdz·ŷ (fixed order: deterministic)
        n = B * H * W
        dy = torch.empty_like(y)
        backward[(splits, cb)](y, gp, dy, sum_dz, sum_dzx, *args, dbias / n, dweight / n, B, H, W, C, ctx.slope,
                               per, POOL=ctx.pool, WRITE=True, **blk)
        return dy, dweight.to(weight.dtype), dbias.to(weight.dtype), None, None, None, None, None


def bn_act_pool(y: torch.Tensor, bn, activation: torch.nn.Module, pool: bool, *, backend: str = "triton",
                programs: int | None = None) -> torch.Tensor:
    """``max_pool2d(act(bn(y)), 2)`` (or without the pool) for a BatchNorm ``bn`` in training mode
    over the channels of ``y`` (B, C, H, W): a :class:`ffl.batched.BatchedBatchNorm` (K·C channels)
    or an ``nn.BatchNorm2d``, whose running statistics are updated. ``backend``: ``triton`` (CUDA)
    or ``interpret`` (CPU, FP32; tests). ``programs`` overrides how many programs share the rows."""
    if backend not in ("triton", "interpret") or not available(backend):
        raise RuntimeError(f"fused BatchNorm backend {backend!r} is not available here")
    if not supported(y, activation, pool, bn.training):
        raise ValueError("bn_act_pool needs training mode, ReLU or leaky ReLU, and even sizes under a pool")
    if not bn.affine:
        raise ValueError("bn_act_pool needs an affine BatchNorm")
    interpret = backend == "interpret"
    if interpret and y.dtype != torch.float32:
        raise TypeError(f"Triton's interpreter computes float32 only here; got {y.dtype}")
    with torch.autocast(y.device.type, enabled=False):
        p, mean, var = _BNActPool.apply(y, bn.weight.reshape(-1), bn.bias.reshape(-1), bn.eps, _slope(activation),
                                        pool, interpret, programs)
    if bn.running_mean is not None:
        n = y.shape[0] * y.shape[2] * y.shape[3]
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            m = bn.momentum
            rm, rv = bn.running_mean.view(-1), bn.running_var.view(-1)
            rm.mul_(1 - m).add_(mean.to(rm.dtype), alpha=m)
            rv.mul_(1 - m).add_((var * (n / max(n - 1, 1))).to(rv.dtype), alpha=m)
    return p


def reference(y: torch.Tensor, bn, activation: torch.nn.Module, pool: bool) -> torch.Tensor:
    """The same unit as PyTorch operations (what :func:`bn_act_pool` replaces, and what runs where
    it does not apply)."""
    h = activation(bn(y))
    return F.max_pool2d(h, 2) if pool else h
