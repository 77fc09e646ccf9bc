"""``python -m ffl.bench zoo``: how fast the zoo engine trains networks, as ratios measured in one run.

Every figure is a ratio against something measured in the same process on the same device:

(a) ``loop_ratio_small`` / ``loop_ratio_paper``: time of a plain PyTorch loop over K models
    (:func:`ffl.engine.train_loop`) ÷ time of the batched engine (:func:`ffl.engine.train_batched`)
    for the same models, data and steps — small MLPs (hidden 32, K = 50) and paper-size MLP-4
    (3072-500-500-500-2). Also PlainNet-5 (grouped convolution) against the loop and against
    ``torch.func.vmap`` over ``functional_call``, and GRU-2 (the hand-written batched GRU) on
    NameData-shaped sequences with batch 1 (``loop_ratio_gru``).
(b) ``gemm_fraction``: GFLOP/s achieved by the batched MLP-4 training step (forward, weight and
    input gradients counted; optimizer, data gathering and all overheads included in the time)
    ÷ GFLOP/s of plain GEMMs with exactly the step's shapes, run back to back with nothing else.
(c) networks per second at paper size (MLP-4: 100 epochs; PlainNet-5: 50 epochs; 1,000 training
    images per task, batch 128), projected from measured steps/s, and the implied time for a
    5,000-network zoo.

The table goes to stdout, then one JSON line (the last line) with all figures. Loop and engine
are timed alternately (best of 3 rounds on CPU), so a burst of load on a shared machine hits both.
``--precision`` (fp32, tf32, bf16) sets the arithmetic of every figure.

Other subcommands: ``zoo-time`` (a CIFAR-100-scale zoo at paper epochs, chunk by chunk),
``conv`` (PlainNet-5's convolutions for K networks: grouped vs im2col + ``bmm`` vs one ordinary
convolution of the same FLOPs), ``profile`` (``torch.profiler`` kernel table of engine steps) and
``ffl`` (the feature-learning stage streamed over a zoo on disk, :mod:`ffl.kernels`: per index the
time reading networks, the kernel time and the protocols' time, peak memory, the GEMM fraction, and
the projection to N = 5,000 from the measured rates; the zoo has random, untrained weights in the
real format, which the feature stage cannot tell apart; ``--budget-s`` skips indices that would
overrun, the plan with its multiply-adds is printed before the long work).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.profiler import ProfilerActivity, profile

from ffl import implicit_conv, triton_support
from ffl.batched import bn_backend, conv_backend, kernel_settings
from ffl.cli import Command, run_command_line
from ffl.data import N_LETTERS, load_task
from ffl.chain import measure
from ffl.experiment import protocol_rows
from ffl.features import FeatureConfig, ProjectionConfig, Representation
from ffl.files import write_json_atomic
from ffl.kernels import KernelStats, StreamConfig, ZooFeatures, block_sizes, explicit_is_cheaper
from ffl.protocols import ProtocolSplit
from ffl.engine import (PRECISIONS, NetworkData, TrainConfig, init_stacked, precision_scope, total_steps,
                        train_batched, train_loop, tune_malloc)
from ffl.models import build_model
from ffl.provenance import hardware, run_info
from ffl.zoo import (Zoo, ZooSpec, chunk_inputs, chunks, default_batch_networks, default_cache_dir, finalize_zoo,
                     prepare_zoo, run_seed, data_seed, spec_from_profile, write_piece)

PAPER_TRAIN_PER_TASK = 1000  # CIFAR-100: 2 classes × 500 training images
PAPER_EPOCHS = {"mlp": 100, "cnn": 50}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _models(arch: str, K: int, ncls: int = 2, **kw) -> list[torch.nn.Module]:
    out = []
    for k in range(K):
        torch.manual_seed(1000 + k)
        out.append(build_model(arch, ncls, **kw))
    return out


def _data(n: int, device: torch.device, U: int = 2, shape=(3, 32, 32)) -> NetworkData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(U, n, *shape, generator=g)
    y = torch.randint(0, 2, (U, n), generator=g)
    return NetworkData(x.to(device), y.to(device), x[:, :64].to(device), y[:, :64].to(device), [n] * U, [64] * U)


def _mlp_flops_per_sample(widths: list[int]) -> int:
    """Training FLOPs of one sample through an MLP: forward 2·Σ in·out, weight gradient 2·Σ in·out,
    input gradient 2·Σ in·out except the first layer."""
    macs = [a * b for a, b in zip(widths[:-1], widths[1:])]
    return 2 * sum(macs) + 2 * sum(macs) + 2 * sum(macs[1:])


def _timeit_interleaved(fns: dict[str, Callable[[Any], Any]], device: torch.device, repeat: int,
                        setup: Callable[[], Any]) -> dict[str, float]:
    """Best wall time of each of ``fns`` over ``repeat`` rounds (after one warm-up round), the
    functions alternating within each round: a burst of load on a shared machine then hits all of
    them, not only the one that happened to run during it."""
    best = dict.fromkeys(fns, math.inf)
    for i in range(repeat + 1):
        for name, fn in fns.items():
            arg = setup()
            _sync(device)
            t = time.perf_counter()
            fn(arg)
            _sync(device)
            if i:
                best[name] = min(best[name], time.perf_counter() - t)
    return best


def _timeit(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Best wall time of ``repeat`` calls (after one warm-up call)."""
    return _timeit_interleaved({"fn": lambda _: fn()}, device, repeat, lambda: None)["fn"]


def loop_vs_batched(arch: str, K: int, steps: int, device: torch.device, repeat: int, batch: int = 128,
                    augment: bool = False, shape=(3, 32, 32), precision: str = "fp32", **kw) -> dict[str, float]:
    """Seconds for ``steps`` steps of K networks: plain loop vs batched engine (same everything),
    timed alternately (best of ``repeat`` rounds each)."""
    data = _data(max(batch * steps, batch), device, shape=shape)
    cfg = TrainConfig(lr=0.01, momentum=0.9, weight_decay=1e-4, batch_size=batch, epochs=1, lr_step_epochs=[],
                      augment=augment, precision=precision)
    tidx = [k % 2 for k in range(K)]
    seeds = list(range(K))
    proto = _models(arch, K, **kw)  # initialization is not training: built once, copied untimed
    t = _timeit_interleaved({
        "batched": lambda ms: train_batched(ms, data, tidx, seeds, cfg, device=device, evaluate=False, max_steps=steps),
        "loop": lambda ms: train_loop(ms, data, tidx, seeds, cfg, device=device, evaluate=False, max_steps=steps),
    }, device, repeat, lambda: copy.deepcopy(proto))
    return {"batched_s": t["batched"], "loop_s": t["loop"], "ratio": t["loop"] / t["batched"]}


def vmap_step_time(arch: str, K: int, steps: int, device: torch.device, repeat: int, batch: int = 128, **kw) -> float:
    """Seconds for ``steps`` SGD steps of K networks with ``torch.func.vmap(functional_call)``
    (BatchNorm without running statistics: vmap cannot update them in place)."""
    ms = _models(arch, K, **kw)
    for m in ms:
        torch.func.replace_all_batch_norm_modules_(m)
    params, buffers = stack_module_state(ms)
    params = {k: v.to(device) for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    base = ms[0].to("meta")
    x = torch.randn(K, batch, 3, 32, 32, device=device)
    y = torch.randint(0, 2, (K, batch), device=device)

    def loss(p, b, xb, yb):
        return F.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

    g = vmap(grad(loss), in_dims=(0, 0, 0, 0), randomness="different")

    def run():
        nonlocal params
        for _ in range(steps):
            gr = g(params, buffers, x, y)
            params = {k: v - 0.01 * gr[k] for k, v in params.items()}

    return _timeit(run, device, repeat)


def _steps_config(batch: int, augment: bool, precision: str) -> TrainConfig:
    """Endless epochs at a constant lr: the run length is set by ``max_steps``."""
    return TrainConfig(lr=0.01, momentum=0.9, weight_decay=1e-4, batch_size=batch, epochs=10**6, lr_step_epochs=[],
                       augment=augment, precision=precision)


def _run_steps(models: list[torch.nn.Module], data: NetworkData, cfg: TrainConfig, device: torch.device,
               warmup: int, steps: int, start: Callable[[], None], stop: Callable[[], None],
               compile: bool = False) -> None:
    """Train ``warmup + steps`` engine steps; ``start()`` after step ``warmup`` and ``stop()`` after
    the last one, each once the device has finished the steps before it."""
    K = len(models)

    def on_step(step: int, total: int) -> None:
        if step in (warmup, warmup + steps):
            _sync(device)
            (start if step == warmup else stop)()

    train_batched(models, data, [k % 2 for k in range(K)], list(range(K)), cfg, device=device,
                  evaluate=False, max_steps=warmup + steps, on_step=on_step, compile=compile)


def step_rate(arch: str, K: int, steps: int, device: torch.device, repeat: int, batch: int = 128,
              augment: bool = False, precision: str = "fp32", **kw) -> float:
    """Optimizer steps per second of the batched engine for K networks (setup and the first step
    excluded)."""
    data = _data(batch * 2, device)
    cfg = _steps_config(batch, augment, precision)
    proto = _models(arch, K, **kw)
    best = math.inf
    for _ in range(max(1, repeat)):
        stamps: list[float] = []
        _run_steps(proto, data, cfg, device, 1, steps, lambda: stamps.append(time.perf_counter()),
                   lambda: stamps.append(time.perf_counter()))
        best = min(best, stamps[1] - stamps[0])
    return steps / best


def gemm_reference_gflops(widths: list[int], batch: int, K: int, device: torch.device, repeat: int,
                          precision: str = "fp32") -> float:
    """GFLOP/s of plain GEMMs with exactly the shapes of one MLP training step (per layer: forward
    (B×in)(in×out), weight gradient (out×B)(B×in), input gradient (B×out)(out×in) except the first
    layer), run back to back for K networks with nothing else: ``torch.mm`` per network on CPU,
    ``torch.bmm`` over the K networks on CUDA (one network's GEMMs cannot fill a GPU); in the
    arithmetic of ``precision`` (bf16: bfloat16 operands)."""
    cuda = device.type == "cuda"
    nb = K if cuda else 1
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append((torch.randn(nb, batch, a, device=device, dtype=dt), torch.randn(nb, b, a, device=device, dtype=dt),
                       torch.randn(nb, batch, b, device=device, dtype=dt), i > 0))
    mm = torch.bmm if cuda else (lambda p, q: torch.mm(p[0], q[0]))
    flops = K * _mlp_flops_per_sample(widths) * batch

    def run():
        for _ in range(1 if cuda else K):
            for x, w, g, dgrad in layers:
                mm(x, w.transpose(1, 2))
                mm(g.transpose(1, 2), x)
                if dgrad:
                    mm(g, w)

    with precision_scope(precision, device):
        t = _timeit(run, device, max(repeat, 3))
    return flops / t / 1e9


def bench_zoo(device: str = "cpu", quick: bool = False, repeat: int | None = None,
              precision: str = "fp32") -> dict[str, Any]:
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    rep = repeat or (1 if quick or cuda else 3)
    pr = {"precision": precision}
    res: dict[str, Any] = {"device": device, "threads": torch.get_num_threads(), "quick": quick, **pr}
    try:
        res["hardware"] = hardware(device)
    except Exception:  # noqa: BLE001
        res["hardware"] = device
    rows: list[tuple[str, str, str]] = []

    # (a) loop vs batched
    K_small = 50
    s_small = 5 if quick else 30
    r = loop_vs_batched("mlp", K_small, s_small, dev, rep, hidden=(32, 32, 32), in_features=192, shape=(3, 8, 8), **pr)
    res.update(loop_ratio_small=r["ratio"], small_batched_s=r["batched_s"], small_loop_s=r["loop_s"])
    rows.append((f"MLP 192-32-32-32-2 (3x8x8 input), K={K_small}, {s_small} steps",
                 f"loop {r['loop_s']:.3f} s / batched {r['batched_s']:.3f} s", f"{r['ratio']:.2f}x"))
    if not quick:
        r = loop_vs_batched("mlp", K_small, s_small, dev, rep, hidden=(32, 32, 32), **pr)
        res.update(loop_ratio_small_cifar=r["ratio"])
        rows.append((f"MLP 3072-32-32-32-2 (CIFAR input), K={K_small}, {s_small} steps",
                     f"loop {r['loop_s']:.3f} s / batched {r['batched_s']:.3f} s", f"{r['ratio']:.2f}x"))
    K_paper = 64 if cuda else (4 if quick else 16)
    s_paper = 2 if quick else (20 if cuda else 12)
    r = loop_vs_batched("mlp", K_paper, s_paper, dev, rep, **pr)
    res.update(loop_ratio_paper=r["ratio"], paper_batched_s=r["batched_s"], paper_loop_s=r["loop_s"], paper_K=K_paper)
    rows.append((f"MLP-4 3072-500-500-500-2, K={K_paper}, {s_paper} steps",
                 f"loop {r['loop_s']:.3f} s / batched {r['batched_s']:.3f} s", f"{r['ratio']:.2f}x"))
    K_cnn = 64 if cuda else (2 if quick else 8)
    s_cnn = 2 if quick else (10 if cuda else 3)
    r = loop_vs_batched("cnn", K_cnn, s_cnn, dev, 1, augment=True, **pr)
    res.update(loop_ratio_cnn=r["ratio"], cnn_batched_s=r["batched_s"], cnn_loop_s=r["loop_s"], cnn_K=K_cnn)
    conv = "grouped conv" if cuda else "per-network conv"
    rows.append((f"PlainNet-5 ({conv}, aug), K={K_cnn}, {s_cnn} steps",
                 f"loop {r['loop_s']:.3f} s / batched {r['batched_s']:.3f} s", f"{r['ratio']:.2f}x"))
    K_gru = 64 if cuda else (2 if quick else 32)
    s_gru = 3 if quick else 30
    r_gru = loop_vs_batched("gru", K_gru, s_gru, dev, 1, batch=1, shape=(15, N_LETTERS), **pr)
    res.update(loop_ratio_gru=r_gru["ratio"], gru_batched_s=r_gru["batched_s"], gru_loop_s=r_gru["loop_s"])
    rows.append((f"GRU-2 (NameData: 15 chars, batch 1), K={K_gru}, {s_gru} steps",
                 f"loop {r_gru['loop_s']:.3f} s / batched {r_gru['batched_s']:.3f} s", f"{r_gru['ratio']:.2f}x"))
    if not quick:
        try:
            if cuda:
                torch.cuda.empty_cache()
            t_v = vmap_step_time("cnn", K_cnn, s_cnn, dev, 1)
            res.update(vmap_s=t_v, grouped_vs_vmap=t_v / r["batched_s"])
            rows.append((f"PlainNet-5 torch.func.vmap (no aug), K={K_cnn}, {s_cnn} steps",
                         f"vmap {t_v:.3f} s / batched {r['batched_s']:.3f} s", f"{t_v / r['batched_s']:.2f}x"))
        except Exception as e:  # noqa: BLE001 - vmap is only a comparison
            res["vmap_error"] = repr(e)[:200]

    # (b) GFLOP/s of batched MLP-4 training vs plain GEMMs of the same shapes
    K_g = 512 if cuda else K_paper
    s_g = 3 if quick else (20 if cuda else 8)
    widths = [3072, 500, 500, 500, 2]
    sps = gemm = 0.0
    for _ in range(rep):  # alternately, best of each: a burst of load then hits both
        sps = max(sps, step_rate("mlp", K_g, s_g, dev, 1, **pr))
        gemm = max(gemm, gemm_reference_gflops(widths, 128, K_g, dev, 1, **pr))
    achieved = _mlp_flops_per_sample(widths) * 128 * K_g * sps / 1e9
    res.update(gflops_engine=achieved, gflops_gemm=gemm, gemm_fraction=achieved / gemm)
    rows.append((f"MLP-4 training GFLOP/s, K={K_g}", f"engine {achieved:.1f} / plain GEMMs of the step {gemm:.1f}",
                 f"{achieved / gemm:.2f}"))

    # (c) networks per second at paper size
    spe = math.ceil(PAPER_TRAIN_PER_TASK / 128)
    nps_mlp = sps * K_g / (PAPER_EPOCHS["mlp"] * spe)
    K_c = 256 if cuda else (2 if quick else 8)
    s_c = 2 if quick else (10 if cuda else 3)
    sps_c = step_rate("cnn", K_c, s_c, dev, 1, augment=True, **pr)
    nps_cnn = sps_c * K_c / (PAPER_EPOCHS["cnn"] * spe)
    res.update(nets_per_s_mlp4=nps_mlp, nets_per_s_plainnet5=nps_cnn,
               zoo5000_mlp4_s=5000 / nps_mlp, zoo5000_plainnet5_s=5000 / nps_cnn)
    rows.append((f"MLP-4 paper training (100 ep), K={K_g}", f"{sps:.2f} steps/s",
                 f"{nps_mlp:.3g} nets/s; 5,000 in {_hms(5000 / nps_mlp)}"))
    rows.append((f"PlainNet-5 paper training (50 ep, aug), K={K_c}", f"{sps_c:.2f} steps/s",
                 f"{nps_cnn:.3g} nets/s; 5,000 in {_hms(5000 / nps_cnn)}"))
    res["table"] = rows
    return res


PLAINNET5_CONVS = ((3, 32, 32), (32, 64, 16), (64, 128, 8), (128, 256, 4))  # (in, out, H = W) per unit


def im2col_conv3x3(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """K 3×3 convolutions (padding 1) as one batched GEMM: x (K, B, H, W, C) per network (NHWC),
    w (K, Cout, C, 3, 3) → (K, B, H, W, Cout). The columns are the 9 shifted views side by side."""
    K, B, H, W, C = x.shape
    xp = F.pad(x, (0, 0, 1, 1, 1, 1))
    cols = torch.cat([xp[:, :, dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)], dim=-1)
    wm = w.permute(0, 3, 4, 2, 1).reshape(K, 9 * C, -1)
    return torch.bmm(cols.view(K, B * H * W, 9 * C), wm).view(K, B, H, W, -1)


def _conv3x3_flops(K: int, batch: int, cin: int, cout: int, hw: int) -> int:
    """Multiply-adds ×2 of one pass of K networks' 3×3 convolutions (padding 1) over hw × hw maps."""
    return 2 * K * batch * hw * hw * cin * 9 * cout


def conv_layers(device: str = "cuda", K: int = 126, batch: int = 128, precision: str = "bf16",
                repeat: int = 3, convs=PLAINNET5_CONVS, implicit_on_cpu: bool = False) -> list[dict[str, Any]]:
    """Forward + backward TFLOP/s of PlainNet-5's convolutions for K networks, three ways:
    ``grouped`` (what the engine runs: one cuDNN convolution with groups=K), ``im2col_bmm``
    (:func:`im2col_conv3x3`) and ``dense`` — one ordinary convolution over all K·B images with a
    single weight: the same FLOPs, the device's convolution ceiling for these shapes — and
    ``implicit`` (:mod:`ffl.implicit_conv`'s batched implicit GEMM) where Triton runs (CUDA; on CPU
    its interpreter, with ``implicit_on_cpu``: tests only)."""
    dev = torch.device(device)
    implicit = ("triton" if dev.type == "cuda" else "interpret" if implicit_on_cpu else None)
    implicit = implicit if implicit is not None and triton_support.available(implicit) else None
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    # the engine's layouts: NHWC for bf16 on CUDA and always on CPU (ffl.batched.BatchedConv2d)
    cl = torch.channels_last if precision == "bf16" or dev.type == "cpu" else torch.contiguous_format
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    with precision_scope(precision, dev):
        for li, (cin, cout, hw) in enumerate(convs):
            dgrad = li > 0
            flops = _conv3x3_flops(K, batch, cin, cout, hw) * (3 if dgrad else 2) // 2

            def make(shape, mf=None):
                t = torch.randn(*shape, device=dev, dtype=dt)
                return (t.contiguous(memory_format=mf) if mf is not None else t).requires_grad_(True)

            cases = {
                "grouped": (lambda a: F.conv2d(a[0], a[1], padding=1, groups=K),
                            lambda: (make((batch, K * cin, hw, hw), cl), make((K * cout, cin, 3, 3), cl))),
                "implicit": (lambda a: implicit_conv.batched_conv2d(a[0], a[1], padding=1, backend=implicit),
                             lambda: (make((batch, K * cin, hw, hw), torch.channels_last), make((K, cout, cin, 3, 3)))),
                "im2col_bmm": (lambda a: im2col_conv3x3(a[0], a[1]),
                               lambda: (make((K, batch, hw, hw, cin)), make((K, cout, cin, 3, 3)))),
                "dense": (lambda a: F.conv2d(a[0], a[1], padding=1),
                          lambda: (make((K * batch, cin, hw, hw), cl), make((cout, cin, 3, 3), cl))),
            }
            row: dict[str, Any] = {"layer": li + 1, "in": cin, "out": cout, "hw": hw, "K": K, "batch": batch}
            if implicit is None:
                del cases["implicit"]
            for name, (fn, setup) in cases.items():
                args = setup()
                args[0].requires_grad_(dgrad)
                grad = None

                def step():
                    nonlocal grad
                    y = fn(args)
                    if grad is None:
                        grad = torch.randn_like(y)
                    y.backward(grad)
                    args[1].grad = None
                    args[0].grad = None

                try:
                    t = _timeit(step, dev, repeat)
                    row[f"{name}_tflops"] = flops / t / 1e12
                except torch.cuda.OutOfMemoryError as e:
                    row[f"{name}_error"] = repr(e)[:120]
                args = None  # free this case's tensors before the next
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            if implicit is not None:
                row.update(implicit_agreement(cin, cout, hw, implicit, dt, dev))
            rows.append(row)
    return rows


def _sweep_candidates(kind: str, C: int, O: int, flat: bool) -> list[implicit_conv.Tiles]:
    """A small grid of blockings around :func:`ffl.implicit_conv.default_tiles` (duplicates after
    capping at the layer's channel counts removed). With 16–64 channels the grid adds flat steps
    of 64 and 128 (tap, channel) pairs, several taps per step (``Tiles.flat``)."""
    cap = lambda n, lim: max(16, min(lim, 1 << max(int(n) - 1, 0).bit_length()))  # noqa: E731
    rows = (64, 128) if kind == "forward" else (32, 64, 128)
    cols = (64, 128) if kind == "forward" else (32, 64)
    seen: dict[tuple, implicit_conv.Tiles] = {}

    def add(bm: int, bn: int, bc: int, as_flat: bool | None) -> None:
        bn_ = cap(O, bn)
        warps = 8 if bm * bn_ >= 128 * 128 or (as_flat and bm * bc >= 128 * 128) else 4
        seen.setdefault((bm, bn_, bc, as_flat), implicit_conv.Tiles(bm, bn_, bc, warps, flat=as_flat))

    for bm in rows:
        for bn in cols:
            for bc in ((32,) if flat else (32, 64)):
                # the weight gradient's tile is BC × BN: BC = 64 even for 32 channels can buy
                # Hopper's wgmma (64-row tiles) with half of it masked, so it is not capped
                add(bm, bn, bc if flat or kind == "weight_grad" else cap(C, bc), None)
            if not flat and C <= 64 and bm >= 64:
                for bc in (64, 128):
                    add(bm, bn, bc, True)
    return list(seen.values())


def conv_sweep(device: str = "cuda", K: int = 126, batch: int = 128, precision: str = "bf16", repeat: int = 3,
               convs=PLAINNET5_CONVS, after_pass: Callable[[list[dict[str, Any]]], None] | None = None,
               ) -> list[dict[str, Any]]:
    """TFLOP/s of :mod:`ffl.implicit_conv`'s kernels under a small grid of blockings, per layer of
    PlainNet-5 and per pass (forward; input gradient, which is the forward kernel on the flipped
    weights; weight gradient), K networks: the measurements to choose ``default_tiles`` by.
    ``after_pass(rows so far)`` runs after each pass (a sweep cut off by a time limit still leaves
    what it measured)."""
    dev = torch.device(device)
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    interpret = dev.type != "cuda"
    rows = []
    with precision_scope(precision, dev):
        for li, (cin, cout, hw) in enumerate(convs):
            gen = torch.Generator(device="cpu").manual_seed(li)
            make = lambda *shape: torch.randn(*shape, generator=gen).to(dev, dt)  # noqa: E731
            x = make(batch, K * cin, hw, hw).contiguous(memory_format=torch.channels_last)
            g = make(batch, K * cout, hw, hw).contiguous(memory_format=torch.channels_last)
            wt = make(K, 3, 3, cin, cout)
            wt_flipped = make(K, 3, 3, cout, cin)
            flop = _conv3x3_flops(K, batch, cin, cout, hw)
            passes = {
                "forward": (cin, cout, lambda t: implicit_conv._forward(x, wt, None, K, (1, 1), interpret, tiles=t)),
                "input_grad": (cout, cin, lambda t: implicit_conv._forward(g, wt_flipped, None, K, (1, 1), interpret,
                                                                            tiles=t)),
                "weight_grad": (cin, cout, lambda t: implicit_conv._weight_grad(x, g, K, 3, 3, (1, 1), interpret,
                                                                                 tiles=t)),
            }
            if li == 0:
                del passes["input_grad"]  # the images need no gradient
            for name, (c_in, c_out, run) in passes.items():
                kind = "weight_grad" if name == "weight_grad" else "forward"
                default = implicit_conv.default_tiles(kind, c_in, c_out, 3, 3, interpret, dt)
                reference = run(default).float()
                for tiles in [default] + [t for t in _sweep_candidates(kind, c_in, c_out, c_in < 16) if t != default]:
                    row = {"layer": li + 1, "pass": name, "in": cin, "out": cout, "hw": hw, "K": K,
                           "key": [kind, implicit_conv.dtype_name(dt), c_in, c_out, 3, 3],
                           "tiles": dataclasses.asdict(tiles),
                           "default": tiles == default}
                    try:
                        row["tflops"] = flop / _timeit(lambda: run(tiles), dev, repeat) / 1e12
                        # the same sums in another blocking: differences are rounding only
                        row["rel_diff_vs_default"] = float((run(tiles).float() - reference).abs().max()
                                                           / reference.abs().max())
                    except Exception as e:  # noqa: BLE001 - a blocking that does not fit is a result too
                        row["error"] = f"{type(e).__name__}: {e}"[:160]
                    rows.append(row)
                    print(json.dumps(row, sort_keys=True), flush=True)
                if after_pass is not None:
                    after_pass(rows)
    return rows


#: largest difference from the default blocking's result (relative to its largest entry) that a
#: blocking may show and still be chosen: summation order alone, rounded to the output's dtype
SWEEP_TOLERANCE = {"fp32": 1e-4, "tf32": 1e-2, "bf16": 2e-2}


def best_tiles(rows: list[dict[str, Any]], precision: str, min_gain: float = 0.05) -> list[dict[str, Any]]:
    """Per convolution shape of a :func:`conv_sweep`, the fastest blocking that computed the same
    convolution (within :data:`SWEEP_TOLERANCE`), kept only if it beats the default blocking by
    ``min_gain`` (a smaller lead is timing noise): entries for
    :func:`ffl.implicit_conv.write_tile_table`, with both TFLOP/s. Shapes whose default stays are
    left out."""
    by_key: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        by_key.setdefault(tuple(r["key"]), []).append(r)
    out = []
    for key, group in by_key.items():
        default = next((r for r in group if r["default"] and "tflops" in r), None)
        ok = [r for r in group if "tflops" in r and r["rel_diff_vs_default"] <= SWEEP_TOLERANCE[precision]]
        if default is None or not ok:
            continue
        best = max(ok, key=lambda r: r["tflops"])
        if best["default"] or best["tflops"] < (1 + min_gain) * default["tflops"]:
            continue
        kind, dtype, C, O, kh, kw = key
        out.append({"kind": kind, "dtype": dtype, "C": C, "O": O, "kh": kh, "kw": kw, **best["tiles"],
                    "tflops": round(best["tflops"], 2), "default_tflops": round(default["tflops"], 2),
                    "layer": best["layer"], "pass": best["pass"]})
    return out


def engine_agreement(device: str = "cuda", conv_backend_name: str = "triton", precisions=("fp32", "bf16"),
                     archs=("cnn", "resnet5"), size: int = 32, n: int = 96, epochs: int = 3,
                     bn_backend_name: str = "torch") -> dict[str, Any]:
    """The batched engine with ``conv_backend_name`` (and ``bn_backend_name`` for ConvNet's fused
    BatchNorm) against the plain loop (one network at a time, PyTorch's operations): largest
    weight difference after a few epochs of 4 small networks on 2 random tasks (momentum, weight
    decay, a learning-rate step, crop+flip)."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    tasks = [types.SimpleNamespace(
        x_train=torch.randn(n, 3, size, size, generator=gen), y_train=torch.randint(0, 2, (n,), generator=gen),
        x_test=torch.randn(n // 3, 3, size, size, generator=gen), y_test=torch.randint(0, 2, (n // 3,), generator=gen))
        for _ in range(2)]
    data = NetworkData.from_tasks(tasks, dev)
    out: dict[str, Any] = {"conv_backend": conv_backend_name, "bn_backend": bn_backend_name}
    for precision in precisions:
        for arch in archs:
            cfg = TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-4, epochs=epochs, lr_step_epochs=[epochs - 1],
                              batch_size=32, augment=True, precision=precision)
            with conv_backend(conv_backend_name), bn_backend(bn_backend_name):
                a = train_batched(_models(arch, 4, widths=(8, 16, 32, 64)), data, [0, 1, 0, 1], [7, 8, 9, 10], cfg, device=dev)
            b = train_loop(_models(arch, 4, widths=(8, 16, 32, 64)), data, [0, 1, 0, 1], [7, 8, 9, 10], cfg, device=dev)
            diff = max(float((a.state[k].double() - b.state[k].double()).abs().max())
                       for k in a.state if a.state[k].is_floating_point())
            out[f"{arch}_{precision}"] = {"max_abs_weight_diff": diff, "steps": a.steps,
                                          "test_acc_batched": a.test_acc, "test_acc_loop": b.test_acc}
            print(f"{arch} {precision} (conv {conv_backend_name}, BatchNorm {bn_backend_name}): "
                  f"max |w_batched - w_loop| = {diff:.2e} "
                  f"after {a.steps} steps", flush=True)
    return out


def implicit_agreement(cin: int, cout: int, hw: int, backend: str, dtype: torch.dtype, device: torch.device,
                       K: int = 4, batch: int = 16) -> dict[str, float]:
    """Largest differences between :mod:`ffl.implicit_conv` and the grouped convolution on one
    3×3 layer of K networks (output, input gradient, weight gradient), each relative to the
    largest entry of the grouped result."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, K * cin, hw, hw, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(K, cout, cin, 3, 3, generator=gen).to(device, dtype) / (3 * cin ** 0.5)
    g = torch.randn(batch, K * cout, hw, hw, generator=gen).to(device, dtype)
    out = {}
    results = []
    for b in ("torch", backend):
        xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = implicit_conv.batched_conv2d(xb, wb, padding=1, backend=b)
        y.backward(g)
        results.append((y.detach(), xb.grad, wb.grad))
    for name, ref, got in zip(("y", "dx", "dw"), results[0], results[1]):
        out[f"implicit_rel_err_{name}"] = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
    return out


def profile_step(arch: str = "cnn", device: str = "cuda", K: int = 126, precision: str = "bf16",
                 steps: int = 5, warmup: int = 5, augment: bool = True, compile: bool = False,
                 row_limit: int = 25) -> str:
    """``torch.profiler`` table (device time per kernel) of ``steps`` engine steps of K networks
    at paper size, after ``warmup`` untimed steps."""
    dev = torch.device(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    prof = profile(activities=acts)
    _run_steps(_models(arch, K), _data(256, dev), _steps_config(128, augment, precision), dev, warmup, steps,
               prof.start, prof.stop, compile=compile)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)


class _Budget(Exception):
    pass


def _zoo_tasks(dataset: str, tasks: int, data_root: str | None):
    """CIFAR-100 tasks if the files are there, else synthetic tasks of CIFAR-100's shapes (1,000
    training / 200 test images of 3×32×32 per task). Returns (loader(t) -> TaskData, label)."""
    if dataset == "cifar100":
        try:
            load_task("cifar100", 0, data_root=data_root)
            return (lambda t: load_task("cifar100", t, data_root=data_root)), "cifar100"
        except FileNotFoundError:
            pass
    return (lambda t: load_task("synthetic", t, n_train=1000, n_test=200)), "synthetic (CIFAR-100 shapes: 1000/200 per task, 3x32x32)"


def zoo_time(arch: str, device: str = "cuda", *, tasks: int = 50, runs: int = 100, budget_s: float = 120.0,
             batch_networks: int | None = None, data_root: str | None = None, epochs: int | None = None,
             precision: str = "fp32", compile: bool = False, max_chunks: int | None = None) -> dict[str, Any]:
    """Time a CIFAR-100-scale zoo (tasks × runs networks, paper hyper-parameters) with the engine:
    seeded init, data on the device, training, final train/test evaluation, weights back to CPU
    (no disk writes). Chunks are trained until ``budget_s`` is spent (or ``max_chunks`` are done); a
    chunk that would not finish is stopped and the rest extrapolated from its measured step rate
    (clearly reported). The projection uses complete chunks only when there are any, so one-off
    costs of the first chunk (cuDNN autotuning, compilation) are reported apart (``first_chunk_s``).
    The hyper-parameters are the ``paper`` profile's (``profiles/paper.yaml``)."""
    dev = torch.device(device)
    spec = spec_from_profile("paper", "cifar100", arch=arch, dataset="cifar100", tasks=list(range(tasks)), runs=runs,
                             precision=precision,
                             **({"epochs": epochs, "lr_step_epochs": [int(epochs * 0.6)]} if epochs else {}))
    cfg = spec.train_config()
    loader, data_label = _zoo_tasks("cifar100", tasks, data_root)
    K = batch_networks or default_batch_networks(spec, dev)
    all_chunks = chunks(spec, K)
    t_start = time.perf_counter()
    cache: dict[int, Any] = {}
    done_nets = 0
    done_time = 0.0
    out: dict[str, Any] = {"arch": arch, "device": device, "data": data_label, "networks": spec.num_networks,
                           "batch_networks": K, "chunks": len(all_chunks), "epochs": cfg.epochs,
                           "precision": precision, "compile": compile, "chunk_log": []}
    for ci, chunk in enumerate(all_chunks):
        t0 = time.perf_counter()
        needed = sorted({p.task for p in chunk})
        for t in needed:
            if t not in cache:
                cache[t] = loader(t)
        inp = chunk_inputs(spec, chunk, cache, dev)
        K_chunk = len(inp.seeds)
        stacked = init_stacked(inp.build, inp.seeds)
        t_init = time.perf_counter() - t0
        total = total_steps(cfg, inp.data.n_train[0])
        marks: dict[str, float] = {}
        remaining = budget_s - (time.perf_counter() - t_start)

        def on_step(step: int, tot: int) -> None:
            if step == 1:
                _sync(dev)
                marks["first"] = time.perf_counter()
            if step == 6:  # steady state: after cuDNN's autotuning of the first steps
                _sync(dev)
                marks["warm"] = time.perf_counter()
            marks["step"] = step
            if step > 1 and step % 10 == 0:  # a sync every step would stall the CPU on the GPU
                _sync(dev)
                if time.perf_counter() - t0 > remaining and step < tot:
                    marks["stopped"] = time.perf_counter()
                    raise _Budget

        try:
            try:
                res = train_batched((inp.build(), stacked), inp.data, inp.task_index, inp.data_seeds, cfg, device=dev,
                                    on_step=on_step, compile=compile)
            except torch.cuda.OutOfMemoryError:
                if K == 1:
                    raise
                stacked = inp = None  # free the chunk before retrying with half of it
                torch.cuda.empty_cache()
                print(f"[{time.strftime('%H:%M:%S')}] out of memory with K={K}; retrying with K={K // 2}", flush=True)
                return zoo_time(arch, device, tasks=tasks, runs=runs, budget_s=budget_s, batch_networks=K // 2,
                                data_root=data_root, epochs=epochs, precision=precision, compile=compile,
                                max_chunks=max_chunks)
            _sync(dev)
            dt = time.perf_counter() - t0
            done_nets += K_chunk
            done_time += dt
            entry = {"chunk": ci, "K": K_chunk, "seconds": dt, "init_s": t_init, "steps": total,
                     "mean_test_acc": sum(res.test_acc) / len(res.test_acc)}
            out["chunk_log"].append(entry)
            print(f"[{time.strftime('%H:%M:%S')}] {arch} chunk {ci + 1}/{len(all_chunks)}: {K_chunk} nets, "
                  f"{total} steps in {dt:.1f} s (init {t_init:.1f} s), mean test acc {entry['mean_test_acc']:.3f}", flush=True)
            del res
        except _Budget:
            steps = int(marks["step"])
            if "warm" in marks and steps > 12:
                rate = (steps - 6) / (marks["stopped"] - marks["warm"])
                proj_chunk = (marks["warm"] - t0) + (total - 6) / rate
            else:
                rate = (steps - 1) / (marks["stopped"] - marks["first"])
                proj_chunk = (marks["first"] - t0) + (total - 1) / rate
            out["chunk_log"].append({"chunk": ci, "K": K_chunk, "partial_steps": steps, "steps": total,
                                     "steps_per_s": rate, "projected_chunk_s": proj_chunk, "init_s": t_init})
            print(f"[{time.strftime('%H:%M:%S')}] {arch} chunk {ci + 1}: budget reached after {steps}/{total} steps "
                  f"({rate:.2f} steps/s); chunk projected at {proj_chunk:.1f} s", flush=True)
            done_time += proj_chunk
            done_nets += K_chunk
            out["extrapolated_from_partial_chunk"] = True
        del stacked, inp
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if time.perf_counter() - t_start > budget_s or (max_chunks and ci + 1 >= max_chunks):
            break
    full = [c for c in out["chunk_log"] if "seconds" in c]
    if len(full) > 1:  # steady state: complete chunks after the first (autotuning, compilation)
        out["first_chunk_s"] = full[0]["seconds"]
        per_net = sum(c["seconds"] for c in full[1:]) / sum(c["K"] for c in full[1:])
        out["projection"] = "complete chunks after the first, plus the first chunk's extra time"
        extra = full[0]["seconds"] - per_net * full[0]["K"]
    else:
        per_net, extra = done_time / done_nets, 0.0
        out["projection"] = "all timed chunks (partial ones extrapolated)"
    out.update(networks_timed=done_nets, seconds_timed=done_time, nets_per_s=1 / per_net,
               projected_zoo_s=per_net * spec.num_networks + extra,
               measured_fully=done_nets == spec.num_networks and not out.get("extrapolated_from_partial_chunk", False))
    return out



# --------------------------------------------------------------------------------------------
# ffl: the feature-learning stage over a zoo on disk
# --------------------------------------------------------------------------------------------

PAPER_SHAPES = {"mlp": {"hidden": [500, 500, 500]}, "cnn": {}}
QUICK_SHAPES = {"mlp": {"hidden": [16, 16, 16]}, "cnn": {"widths": [4, 8, 8, 8]}}  # tests only


#: the file that marks a zoo of :func:`random_weight_zoo` (random weights, never trained)
RANDOM_MARK = "random_weights.json"


def random_weight_zoo(arch: str, root: str | os.PathLike, *, tasks: int, runs: int,
                      model_kwargs: dict[str, Any] | None = None, seed: int = 0, task_share: float = 0.5,
                      batch_networks: int = 100) -> Zoo:
    """A zoo in the real on-disk format whose weights are random, not trained (seeded): network
    (t, r) has weights s·(a·B_t + √(1-a²)·E_tr) with B_t shared by the task's runs, E_tr its own, a =
    ``task_share`` and s = 1/√fan-in (BatchNorm: γ ≈ 1, running variance ≈ 1). The feature stage
    does not care whether weights were trained; the task share gives the protocols something to
    find. Loaded, not rebuilt, when ``root`` holds it already."""
    spec = ZooSpec(arch=arch, dataset="synthetic", tasks=list(range(tasks)), runs=runs,
                   model_kwargs=dict(model_kwargs or {}), seed=seed, epochs=1)  # never trained: RANDOM_MARK says so
    root = Path(root)
    if (root / "manifest.json").is_file():
        return Zoo.load(root)

    k = prepare_zoo(spec, root, batch_networks=batch_networks)
    kw = dict(spec.model_kwargs)
    if arch == "mlp":
        kw.setdefault("in_features", 3072)
    template = build_model(arch, 2, **kw).state_dict()
    own = math.sqrt(1 - task_share ** 2)
    for chunk in chunks(spec, k):
        for piece in chunk:
            g = torch.Generator().manual_seed(seed * 1_000_003 + piece.task)
            base = {name: torch.randn(t.shape, generator=g) for name, t in template.items() if t.is_floating_point()}
            g.manual_seed(seed * 1_000_003 + piece.task * 100_003 + piece.r0 + 1)
            n = piece.r1 - piece.r0
            state = {}
            for name, t in template.items():
                if not t.is_floating_point():
                    state[name] = torch.zeros(n, *t.shape, dtype=t.dtype)
                    continue
                x = task_share * base[name] + own * torch.randn(n, *t.shape, generator=g)
                if t.dim() >= 2:
                    state[name] = x / math.sqrt(math.prod(t.shape[1:]))
                elif name.endswith("running_var"):
                    state[name] = 1 + 0.1 * x.abs()
                elif name.endswith("weight"):  # BatchNorm γ
                    state[name] = 1 + 0.1 * x
                else:
                    state[name] = 0.1 * x
            # the seeds a trained zoo would record (every load checks them); these weights come from ``g``
            nets = [{"task": piece.task, "run": r, "seed": run_seed(spec.seed, piece.task, r),
                     "data_seed": data_seed(spec.seed, piece.task, r), "num_classes": 2, "classes": ["0", "1"],
                     "shard": f"shards/{piece.name}.safetensors", "row": r - piece.r0, "train_acc": 0.0,
                     "test_acc": 0.0} for r in range(piece.r0, piece.r1)]
            write_piece(root, spec, piece, state, slice(0, n), nets, _jsonable_kw(kw))
    zoo = finalize_zoo(root)
    assert zoo is not None
    write_json_atomic(root / RANDOM_MARK, {"weights": f"random, untrained (task share {task_share})"})
    return zoo


def _jsonable_kw(kw: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(kw))


def _gemm_rate(shape: tuple[int, int, int, int], precision: str, device: torch.device, seconds: float = 1.0) -> float:
    """Multiply-adds per second of plain GEMMs of ``shape`` (batch, m, k, n) in ``precision``
    (float32 outputs; bf16: bf16 operands), back to back for about ``seconds``."""
    b, m, k, n = shape
    x = torch.randn(b, m, k, device=device)
    y = torch.randn(b, k, n, device=device)
    if precision == "bf16" and device.type == "cuda":
        x2, y2 = x.bfloat16().squeeze(0), y.bfloat16().squeeze(0)
        fn = (lambda: torch.mm(x2, y2, out_dtype=torch.float32)) if b == 1 else (lambda: torch.bmm(x.bfloat16(), y.bfloat16()))
    else:
        fn = (lambda: x[0] @ y[0]) if b == 1 else (lambda: torch.bmm(x, y))
    with _tf32(precision, device):
        fn()
        _sync(device)
        reps, t0 = 0, time.perf_counter()
        while True:
            fn()
            reps += 1
            _sync(device)
            dt = time.perf_counter() - t0
            if dt > seconds or reps >= 200:
                break
    return reps * b * m * k * n / dt


class _tf32:
    def __init__(self, precision: str, device: torch.device) -> None:
        self.on = precision == "tf32" and device.type == "cuda"

    def __enter__(self):
        if self.on:
            self.old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        if self.on:
            torch.backends.cuda.matmul.allow_tf32 = self.old


def _host_peak() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _planned_pass(num: int, per_net: int, cfg: StreamConfig) -> dict[str, Any]:
    """Block sizes, networks read and feature formations per job of one
    :func:`ffl.kernels.streamed_inners` pass over ``num`` networks of ``per_net`` bytes."""
    sizes = block_sizes(num, per_net, cfg)
    nb = len(sizes)
    # row block 0 reads every block; row block a ≥ 1 is carried over and reads the blocks after it
    reads = num + sum(sum(sizes[a + 1:]) for a in range(1, nb - 1))
    formed = num if nb == 1 else sum(sizes[a] + sizes[b] for a in range(nb) for b in range(a + 1, nb))
    return {"sizes": sizes, "reads": reads, "formed": formed}


def _planned_macs(sizes: list[int], shape: tuple[int, ...]) -> tuple[str, float]:
    """(mode, multiply-adds) of one job's kernel over blocks of ``sizes`` networks."""
    num, nb = sum(sizes), len(sizes)
    products = (num * num + sum(b * b for b in sizes)) / 2  # diagonal blocks in full, the others once
    if len(shape) == 1:
        return "vectors", products * shape[0]
    d, n = shape
    tri = d * (d + 1) / 2
    if explicit_is_cheaper(sizes[:2], d, n):
        forms = num if nb == 1 else (nb - 1) * num  # every pair of blocks forms both blocks' slabs
        return "explicit", forms * tri * n + products * tri
    return "implicit", products * d * n * n


def bench_ffl(arch: str, networks: int, *, device: str = "cpu", precision: str = "fp32", tasks: int | None = None,
              zoo_root: str | os.PathLike | None = None, block_bytes: int = 2 << 30, slab_bytes: int = 256 << 20,
              budget_s: float = 1e9, project_to: int = 5000, chains_only: bool = False,
              quick: bool = False, passes: str = "one") -> dict[str, Any]:
    """Time and peak memory of the feature-learning stage (one streamed pass computing the kernel
    of every index, then both protocols at each) for ``networks`` networks of paper shape (random
    weights, see :func:`random_weight_zoo`), and its GEMM fraction: the time plain GEMMs of the
    stage's own shapes (timed in this run) would take for the stage's multiply-adds ÷ the stage's
    wall time. Indices whose planned kernel time (at a probe GEMM rate) would overrun ``budget_s``
    are left out and reported. Per index: seconds forming features, seconds of kernel work,
    seconds of protocols, multiply-adds; reading is shared. The projection to ``project_to``
    networks scales each part by its planned work. ``quick``: narrow networks (tests)."""
    dev = torch.device(device)
    tasks = tasks or max(2, networks // 100)
    runs = networks // tasks
    cfg = StreamConfig(device=device, precision=precision, block_bytes=block_bytes, slab_bytes=slab_bytes,
                       passes=passes)
    shapes = QUICK_SHAPES if quick else PAPER_SHAPES
    root = Path(zoo_root or default_cache_dir() / "bench-zoos"
                / f"{arch}-{tasks}x{runs}{'-quick' if quick else ''}")
    t0 = time.perf_counter()
    zoo = random_weight_zoo(arch, root, tasks=tasks, runs=runs, model_kwargs=shapes[arch])
    # a zoo given by ``zoo_root`` may be a trained one (a chapter's): say which was timed
    trained = not (Path(zoo.root) / RANDOM_MARK).is_file()
    weights = (f"trained: {zoo.spec.dataset}, {len(zoo.spec.tasks)} tasks x {zoo.spec.runs} runs" if trained
               else "random, untrained (seeded; real zoo format)")
    tasks, runs = len(zoo.spec.tasks), zoo.spec.runs
    out: dict[str, Any] = {"arch": arch, "networks": len(zoo), "tasks": tasks, "runs": runs, "device": device,
                           "precision": precision, "weights": weights,
                           "block_bytes": block_bytes, "slab_bytes": slab_bytes, "zoo_build_s": time.perf_counter() - t0,
                           "hardware": hardware(device), "threads": torch.get_num_threads()}
    _log(f"{arch}: zoo of {len(zoo)} networks ({weights}) at {root} ({out['zoo_build_s']:.1f} s)")
    source = ZooFeatures(zoo, FeatureConfig(), device=device, chunk_bytes=slab_bytes)
    kinds = ("chain",) if chains_only else ("chain", "layer")
    jobs = [(kind, index) for kind in kinds for index in source.indices(kind)]
    # the plan, before the long work: multiply-adds per index at N and at project_to
    probe_shape = (1, 1024, 4096, 1024) if dev.type == "cuda" else (1, 512, 4096, 512)
    rate0 = _gemm_rate(probe_shape, precision, dev, 0.5)
    out["probe_gemm_macs_per_s"] = rate0
    one = passes == "one"

    def per_net(job: tuple[str, int], held: list[tuple[str, int]]) -> int:
        """Bytes per network of a block: weights + the largest features (one pass), or the job's
        features alone (a pass per index)."""
        return source.read_bytes + max(source.feature_bytes(*j) for j in held) if one else source.feature_bytes(*job)

    plan, kept, planned_s = {}, [], 0.0
    for kind, index in jobs:
        name, shape = f"{kind} {index}", source.shapes[(kind, index)]
        mode, macs = _planned_macs(_planned_pass(len(zoo), per_net((kind, index), kept + [(kind, index)]), cfg)["sizes"],
                                   shape)
        plan[name] = {"shape": list(shape), "mode": mode, "macs": macs}
        if planned_s + macs / rate0 > budget_s:
            _log(f"plan {name}: left out, {macs:.3g} MACs ≥ {macs / rate0:.0f} s would overrun the budget")
            continue
        kept.append((kind, index))
        planned_s += macs / rate0
    here = {f"{k} {i}": _planned_pass(len(zoo), per_net((k, i), kept), cfg) for k, i in kept}
    there = {f"{k} {i}": _planned_pass(project_to, per_net((k, i), kept), cfg) for k, i in kept}
    for kind, index in kept:
        name = f"{kind} {index}"
        shape = source.shapes[(kind, index)]
        plan[name].update(mode=_planned_macs(here[name]["sizes"], shape)[0],
                          macs=_planned_macs(here[name]["sizes"], shape)[1],
                          macs_at_projection=_planned_macs(there[name]["sizes"], shape)[1])
        _log(f"plan {name}: shape {shape}, {plan[name]['mode']}, {len(here[name]['sizes'])} block(s); "
             f"{plan[name]['macs']:.3g} MACs at N={len(zoo)} (≥ {plan[name]['macs'] / rate0:.1f} s at the probe GEMM "
             f"rate); N={project_to}: {plan[name]['macs_at_projection']:.3g} MACs "
             f"(≥ {plan[name]['macs_at_projection'] / rate0:.1f} s)")
    reads = {where: (next(iter(p.values()))["reads"] if one else sum(v["reads"] for v in p.values()))
             for where, p in (("here", here), ("there", there))}
    blocks = max(len(v["sizes"]) for v in here.values())
    out["plan"] = plan
    out["pass"] = {"passes": passes, "blocks": blocks, "reads": reads["here"], "reads_at_projection": reads["there"]}
    _log(f"{'one pass' if one else 'a pass per index'}: ≤ {blocks} block(s), {reads['here']} networks read "
         f"(N={project_to}: {reads['there']})" + ("" if one else "; features are formed as they are read"))
    projection, split, stats = ProjectionConfig(), ProtocolSplit(), KernelStats()
    protocols_s: dict[str, float] = {}
    rows: list[dict[str, Any]] = []

    def stage() -> None:
        kernels = source.kernels(kept, cfg, stats=stats, progress=lambda msg: _log(f"kernels: {msg}"))
        for (kind, index), inner in kernels.items():
            rep = Representation.of_kernel(inner, source.shapes[(kind, index)])
            t_p = time.perf_counter()
            rows.extend(protocol_rows(rep, kind, index, zoo, projection, split))
            protocols_s[f"{kind} {index}"] = time.perf_counter() - t_p

    m = measure(stage, device=device)
    per_index = {name: {"features_s": v["features"], "kernel_s": v["kernel"], "protocols_s": protocols_s[name],
                        "macs": v["macs"], "blocks": stats.blocks[name], "mode": stats.modes[name]}
                 for name, v in stats.jobs.items()}
    for name, v in per_index.items():
        _log(f"{name}: {v['mode']}, features {v['features_s']:.1f} s, kernel {v['kernel_s']:.1f} s "
             f"({v['macs'] / max(v['kernel_s'], 1e-9) / 1e9:.1f} GMAC/s), protocols {v['protocols_s']:.1f} s")
    out["stage_s"] = m.seconds
    out["peak_bytes"] = m.peak_bytes  # CPU: resident-set high-water mark above the start; CUDA: device
    out["host_peak_rss_bytes"] = _host_peak()
    out["per_index"] = per_index
    out["skipped"] = [name for name in plan if name not in per_index]
    out["seconds"] = {"read": stats.seconds["read"], "features": stats.seconds["load"] - stats.seconds["read"],
                      "kernel": stats.seconds["kernel"], "protocols": sum(protocols_s.values())}
    out["seconds"]["other"] = max(0.0, m.seconds - sum(out["seconds"].values()))
    out["macs"] = dict(stats.macs)
    # GEMM fraction: the stage's multiply-adds at the rate of plain GEMMs of its own shapes
    rates = {kind: _gemm_rate(shape, precision, dev) for kind, shape in stats.gemm_shapes.items()}
    out["gemm_shapes"] = {k: list(v) for k, v in stats.gemm_shapes.items()}
    out["gemm_macs_per_s"] = rates
    gemm_s = sum(stats.macs[k] / rates[k] for k in rates)
    out["gemm_s"] = gemm_s
    out["gemm_fraction"] = gemm_s / m.seconds if m.seconds > 0 else 0.0
    # projection to project_to networks, part by part: kernel work by planned multiply-adds, reading
    # by networks read, features by networks formed, protocols ∝ N² (their GEMMs) 
    n = len(zoo)
    proj = {"read": out["seconds"]["read"] * reads["there"] / reads["here"]}
    for name, v in per_index.items():
        proj[name] = (plan[name]["macs_at_projection"] / max(v["macs"], 1) * v["kernel_s"]
                      + v["features_s"] * there[name]["formed"] / here[name]["formed"]
                      + v["protocols_s"] * (project_to / n) ** 2)
    out["project_to"] = project_to
    out["projected_s"] = proj
    out["projected_total_s"] = sum(proj.values())
    out["results"] = rows
    return out


def print_ffl(res: dict[str, Any], file=sys.stdout) -> None:
    gib = 2 ** 30
    print(f"ffl.bench ffl: {res['arch']}, {res['networks']} networks ({res['weights']}) on {res['hardware']} "
          f"({res['device']}, {res['precision']}, {res['threads']} threads); passes: {res['pass']['passes']}, "
          f"≤ {res['pass']['blocks']} block(s), {res['pass']['reads']} networks read", file=file)
    print(f"  {'index':9s} {'mode':9s} {'features s':>10s} {'kernel s':>9s} {'GMAC/s':>8s} "
          f"{'protocols s':>11s} {'proj. s':>8s}", file=file)
    for name, v in res["per_index"].items():
        print(f"  {name:9s} {v['mode']:9s} {v['features_s']:10.1f} {v['kernel_s']:9.1f} "
              f"{v['macs'] / max(v['kernel_s'], 1e-9) / 1e9:8.1f} {v['protocols_s']:11.1f} {res['projected_s'][name]:8.1f}",
              file=file)
    peak, s = res["peak_bytes"], res["seconds"]
    print(f"  stage {res['stage_s']:.1f} s (read {s['read']:.1f}, features {s['features']:.1f}, kernel {s['kernel']:.1f}, "
          f"protocols {s['protocols']:.1f}, other {s['other']:.1f}); peak memory "
          f"{'n/a' if peak is None else f'{peak / gib:.2f} GiB'} above start, host RSS max "
          f"{res['host_peak_rss_bytes'] / gib:.2f} GiB; GEMM fraction {res['gemm_fraction']:.2f} "
          f"(plain GEMMs of the stage's shapes: {res['gemm_s']:.1f} s)", file=file)
    if res["skipped"]:
        print(f"  left out (budget): {', '.join(res['skipped'])}", file=file)
    print(f"  projected at N={res['project_to']}: {res['projected_total_s']:.0f} s on this device "
          f"(reading {res['projected_s']['read']:.0f} s)", file=file)


def _hms(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def print_table(res: dict[str, Any], file=sys.stdout) -> None:
    rows = [("measure", "measured", "ratio / result"), *res["table"]]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    print(f"ffl.bench zoo on {res['hardware']} ({res['device']}, {res['threads']} threads)", file=file)
    for j, r in enumerate(rows):
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)), file=file)
        if j == 0:
            print("  ".join("-" * x for x in w), file=file)


def _common(ap) -> None:
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32", help="arithmetic (ffl.engine.PRECISIONS)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--repeat", type=int, default=None)


def _setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_malloc()  # before anything runs, so the loop baseline gets the same allocator settings


def _zoo_arguments(ap) -> None:
    _common(ap)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests)")


def _zoo(args) -> int:
    _setup(args)
    load0 = os.getloadavg()[0]
    res = bench_zoo(args.device, quick=args.quick, repeat=args.repeat, precision=args.precision)
    res.update(loadavg_1min_start=load0, loadavg_1min_end=os.getloadavg()[0])
    print_table(res)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items() if k != "table"},
                     sort_keys=True))
    return 0


def _zoo_time_arguments(ap) -> None:
    _common(ap)
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=None, help="override the paper's epochs")
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--batch-networks", type=int, default=None)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--compile", action="store_true", help="train through torch.compile")
    ap.add_argument("--max-chunks", type=int, default=None, help="stop after this many chunks")
    _backend_arguments(ap)


def _backend_arguments(ap) -> None:
    ap.add_argument("--conv-backend", choices=triton_support.BACKENDS, default="torch",
                    help="convolutions: torch (grouped, cuDNN) or triton (ffl.implicit_conv)")
    ap.add_argument("--bn-backend", choices=triton_support.BACKENDS, default="torch",
                    help="PlainNet's BatchNorm + activation + max-pool: torch or triton (ffl.fused_bn)")
    ap.add_argument("--conv-tiles", default=None, metavar="FILE",
                    help="the Triton convolution's blockings from a table (conv --sweep --tiles-out FILE)")


def _kernel_settings(args) -> contextlib.ExitStack:
    """The backends and blockings a command's arguments ask for, set for the ``with`` block. A bad
    tile table fails here, before anything runs."""
    table = implicit_conv.read_tile_table(args.conv_tiles) if args.conv_tiles else None
    return kernel_settings(args.conv_backend, args.bn_backend, table)


def _zoo_time(args) -> int:
    _setup(args)
    with _kernel_settings(args):
        res = zoo_time(args.arch, args.device, tasks=args.tasks, runs=args.runs, budget_s=args.budget_s,
                       batch_networks=args.batch_networks, data_root=args.data_root, epochs=args.epochs,
                       precision=args.precision, compile=args.compile, max_chunks=args.max_chunks)
    res.update(conv_backend=args.conv_backend, bn_backend=args.bn_backend, conv_tiles=args.conv_tiles)
    print(json.dumps(res, sort_keys=True))
    return 0


def _conv_arguments(ap) -> None:
    _common(ap)
    ap.add_argument("--batch-networks", type=int, default=126, help="K networks")
    ap.add_argument("--widths", default=None, help="PlainNet-5 widths, e.g. 8,16,32,64 (the laptop's; default: the "
                                                   "paper's 32,64,128,256)")
    ap.add_argument("--batch", type=int, default=128, help="images per network per step")
    ap.add_argument("--gemm", action="store_true",
                    help="also time a 2048³ GEMM in the same run and give each case as a fraction of its rate")
    ap.add_argument("--sweep", action="store_true",
                    help="time ffl.implicit_conv's kernels under a grid of blockings instead (one JSON line each)")
    ap.add_argument("--tiles-out", default=None, metavar="FILE",
                    help="with --sweep: write the blockings that beat the default by 5%% as a tile table")


def _conv(args) -> int:
    _setup(args)
    if args.tiles_out and not args.sweep:
        raise SystemExit("--tiles-out needs --sweep")
    if args.tiles_out and not Path(args.tiles_out).resolve().parent.is_dir():
        raise SystemExit(f"--tiles-out {args.tiles_out}: its folder does not exist (checked before the sweep)")
    if args.sweep:
        batch = 128  # PlainNet-5's training batch
        about = run_info(args.device, K=args.batch_networks, batch=batch, precision=args.precision,
                         triton=getattr(triton_support.triton, "__version__", None),
                         measured="python -m ffl.bench conv --sweep")

        def write_table(rows: list[dict[str, Any]]) -> None:  # after every pass: a cut-off sweep keeps its table
            chosen = best_tiles(rows, args.precision)
            implicit_conv.write_tile_table(args.tiles_out, chosen, {**about, "passes_measured": len(
                {(r["layer"], r["pass"]) for r in rows})})
            print(f"{len(chosen)} blocking(s) beat the default by 5% or more so far: {args.tiles_out}", flush=True)

        conv_sweep(args.device, K=args.batch_networks, batch=batch, precision=args.precision, repeat=args.repeat or 3,
                   after_pass=write_table if args.tiles_out else None)
        return 0
    convs = PLAINNET5_CONVS
    if args.widths:
        widths = [int(w) for w in args.widths.split(",")]
        convs = tuple((c_in, c_out, 32 >> i) for i, (c_in, c_out) in enumerate(zip([3, *widths], widths)))
    gemm = 2 * _gemm_rate((1, 2048, 2048, 2048), args.precision, torch.device(args.device)) / 1e12 if args.gemm else None
    for row in conv_layers(args.device, K=args.batch_networks, batch=args.batch, precision=args.precision,
                           repeat=args.repeat or 3, convs=convs):
        if gemm:
            row["gemm_tflops"] = gemm
            row.update({k.replace("_tflops", "_gemm_fraction"): v / gemm for k, v in list(row.items())
                        if k.endswith("_tflops") and k != "gemm_tflops"})
        print(json.dumps(row, sort_keys=True), flush=True)
    return 0


def _profile_arguments(ap) -> None:
    _common(ap)
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--batch-networks", type=int, default=126, help="K networks")
    ap.add_argument("--compile", action="store_true", help="train through torch.compile")
    _backend_arguments(ap)


def _profile(args) -> int:
    _setup(args)
    with _kernel_settings(args):
        print(profile_step(args.arch, args.device, K=args.batch_networks, precision=args.precision,
                           compile=args.compile, augment=args.arch != "mlp"))
    return 0


def _ffl_arguments(ap) -> None:
    _common(ap)
    ap.add_argument("--arch", choices=tuple(PAPER_SHAPES), action="append",
                    help="mlp (MLP-4) and/or cnn (PlainNet-5); repeatable (default: both)")
    ap.add_argument("--networks", type=int, default=1000, help="zoo size N (tasks = N/100)")
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--memory-gib", type=float, default=2.0, help="weights + features per block (two are held)")
    ap.add_argument("--slab-mib", type=float, default=256.0, help="one Gram slab / implicit tile")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip indices projected to overrun this")
    ap.add_argument("--zoo-root", default=None, help="DIR/<arch>: the zoo to time, e.g. a link to a chapter's trained one; random weights are written there if it holds none (default under $FFL_CACHE)")
    ap.add_argument("--project-to", type=int, default=5000)
    ap.add_argument("--chains-only", action="store_true")
    ap.add_argument("--passes", choices=("one", "per_index"), default=None,
                    help="over the zoo: one for every index, or one per index (default: per_index on a CPU, one on a GPU)")
    ap.add_argument("--quick", action="store_true", help="narrow networks (tests)")


def _ffl(args) -> int:
    _setup(args)
    precision = args.precision if args.device != "cpu" or args.precision != "tf32" else "fp32"
    summary = {}
    for arch in args.arch or ["mlp", "cnn"]:
        root = None if args.zoo_root is None else Path(args.zoo_root) / arch
        res = bench_ffl(arch, args.networks, device=args.device, precision=precision, tasks=args.tasks, zoo_root=root,
                        block_bytes=int(args.memory_gib * 2 ** 30), slab_bytes=int(args.slab_mib * 2 ** 20),
                        budget_s=args.budget_s, project_to=args.project_to, chains_only=args.chains_only,
                        quick=args.quick, passes=args.passes or StreamConfig.for_device(args.device).passes)
        print_ffl(res)
        print(json.dumps({k: v for k, v in res.items() if k != "results"}, sort_keys=True, default=str), flush=True)
        summary[arch] = {k: res[k] for k in ("networks", "stage_s", "peak_bytes", "host_peak_rss_bytes", "gemm_fraction",
                                             "projected_total_s", "seconds", "skipped")}
    print(json.dumps({"ffl": summary, "device": args.device, "precision": precision}, sort_keys=True, default=str))
    return 0


COMMANDS = (
    Command("zoo", "engine vs plain loop, GEMM fraction, networks per second (ratios)", _zoo_arguments, _zoo),
    Command("zoo-time", "time a CIFAR-100-scale zoo at the paper profile's epochs", _zoo_time_arguments, _zoo_time),
    Command("conv", "PlainNet-5 convolutions for K networks: grouped vs im2col+bmm vs dense", _conv_arguments, _conv),
    Command("profile", "torch.profiler kernel table of engine steps", _profile_arguments, _profile),
    Command("ffl", "feature learning streamed over a zoo on disk: time, peak memory, GEMM fraction",
            _ffl_arguments, _ffl),
)


def main(argv: list[str] | None = None) -> int:
    return run_command_line("python -m ffl.bench", "ffl benchmarks", COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
