"""The zoo engine's speed: ``python -m ffl.bench zoo``, ``zoo-time`` and ``profile``.

``zoo`` (:func:`bench_zoo`) gives every figure as a ratio against something measured in the same
process on the same device:

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

The table goes to stdout (:func:`print_table`), then one JSON line (the last line) with all
figures. Loop and engine are timed alternately (best of 3 rounds on CPU), so a burst of load on a
shared machine hits both. ``--precision`` (fp32, tf32, bf16) sets the arithmetic of every figure.

``zoo-time`` (:func:`zoo_time`): a CIFAR-100-scale zoo at paper epochs, chunk by chunk, projected
from the chunks that fit a time budget. ``profile`` (:func:`profile_step`): the ``torch.profiler``
kernel table of engine steps.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.profiler import ProfilerActivity, profile

from ffl.bench.conv import _conv3x3_flops
from ffl.bench.timing import _data, _gemm_rate, _models, _sync, _timeit, _timeit_interleaved
from ffl.data import N_LETTERS, load_task
from ffl.engine import (NetworkData, TrainConfig, init_stacked, precision_scope, total_steps, train_batched,
                        train_loop)
from ffl.provenance import hardware
from ffl.zoo import chunk_inputs, chunks, default_batch_networks, spec_from_profile

PAPER_TRAIN_PER_TASK = 1000  # CIFAR-100: 2 classes × 500 training images
PAPER_EPOCHS = {"mlp": 100, "cnn": 50}

def _mlp_flops_per_sample(widths: list[int]) -> int:
    """Training FLOPs of one sample through an MLP: forward 2·Σ in·out, weight gradient 2·Σ in·out,
    input gradient 2·Σ in·out except the first layer."""
    macs = [a * b for a, b in zip(widths[:-1], widths[1:])]
    return 2 * sum(macs) + 2 * sum(macs) + 2 * sum(macs[1:])

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


def chunk_sweep(widths: list[int], chunks: tuple[int, ...] = (8, 16, 32, 64), *, batch: int = 16, steps: int = 8,
                repeat: int = 2, device: str = "cpu") -> list[dict[str, Any]]:
    """Milliseconds per network-step of PlainNet-5 (``widths``) training in the batched engine for
    each chunk size K (networks per engine batch), the sizes alternating within each round (best
    of ``repeat``; one warm-up step excluded), with the model's GFLOP/s as a fraction of a
    1024³ GEMM's measured in the same run: what :func:`ffl.zoo.default_batch_networks` sizes CPU
    chunks by (docs/performance.md)."""
    dev = torch.device(device)
    data = _data(batch * 4, dev)
    cfg = _steps_config(batch, True, "fp32")
    protos = {K: _models("cnn", K, widths=widths) for K in chunks}
    # forward and backward (twice the forward) of the convolutions; PlainNet-5 pools after units 1-3
    flops = 3 * sum(_conv3x3_flops(1, batch, c_in, c_out, 32 >> min(layer, 3))
                    for layer, (c_in, c_out) in enumerate(zip([3, *widths], widths)))
    gemm = _gemm_rate((1, 1024, 1024, 1024), "fp32", dev) * 2
    best = dict.fromkeys(chunks, math.inf)
    for _ in range(max(1, repeat)):
        for K in chunks:
            stamps: list[float] = []
            _run_steps(protos[K], data, cfg, dev, 1, steps, lambda: stamps.append(time.perf_counter()),
                       lambda: stamps.append(time.perf_counter()))
            best[K] = min(best[K], (stamps[1] - stamps[0]) / steps / K)
    gemm = max(gemm, _gemm_rate((1, 1024, 1024, 1024), "fp32", dev) * 2)
    return [{"widths": "-".join(map(str, widths)), "K": K, "ms_per_network_step": 1e3 * t,
             "model_gflops": flops / t / 1e9, "gemm_gflops": gemm / 1e9, "fraction_of_gemm": flops / t / gemm}
            for K, t in best.items()]


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
