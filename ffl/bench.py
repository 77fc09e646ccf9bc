"""``python -m ffl.bench zoo``: how fast the zoo engine trains networks, as ratios measured in one run.

Every figure is a ratio against something measured in the same process on the same device:

(a) ``loop_ratio_small`` / ``loop_ratio_paper``: time of a plain PyTorch loop over K models
    (:func:`ffl.engine.train_loop`) ÷ time of the batched engine (:func:`ffl.engine.train_batched`)
    for the same models, data and steps — small MLPs (hidden 32, K = 50) and paper-size MLP-4
    (3072-500-500-500-2). Also PlainNet-5 (grouped convolution) against the loop and against
    ``torch.func.vmap`` over ``functional_call``.
(b) ``gemm_fraction``: GFLOP/s achieved by the batched MLP-4 training step (forward, weight and
    input gradients counted; optimizer, data gathering and all overheads included in the time)
    ÷ GFLOP/s of plain GEMMs with exactly the step's shapes, run back to back with nothing else.
(c) networks per second at paper size (MLP-4: 100 epochs; PlainNet-5: 50 epochs; 1,000 training
    images per task, batch 128), projected from measured steps/s, and the implied time for a
    5,000-network zoo.

The table goes to stdout, then one JSON line (the last line) with all figures.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ffl.engine import NetworkData, TrainConfig, stack_models, train_batched, train_loop
from ffl.models import build_model

PAPER_TRAIN_PER_TASK = 1000  # CIFAR-100: 2 classes × 500 training images
PAPER_EPOCHS = {"mlp": 100, "cnn": 50}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Best wall time of ``repeat`` calls (after one warm-up call)."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


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


def loop_vs_batched(arch: str, K: int, steps: int, device: torch.device, repeat: int, batch: int = 128,
                    augment: bool = False, shape=(3, 32, 32), **kw) -> dict[str, float]:
    """Seconds for ``steps`` steps of K networks: plain loop vs batched engine (same everything)."""
    data = _data(max(batch * steps, batch), device, shape=shape)
    cfg = TrainConfig(lr=0.01, batch_size=batch, epochs=1, lr_step_epochs=[], augment=augment)
    tidx = [k % 2 for k in range(K)]
    seeds = list(range(K))
    t_b = _timeit(lambda: train_batched(_models(arch, K, **kw), data, tidx, seeds, cfg, device=device,
                                        evaluate=False, max_steps=steps), device, repeat)
    t_l = _timeit(lambda: train_loop(_models(arch, K, **kw), data, tidx, seeds, cfg, device=device,
                                     evaluate=False, max_steps=steps), device, repeat)
    # model construction (CPU init) is the same in both and not part of training: time it alone
    t_init = _timeit(lambda: _models(arch, K, **kw), torch.device("cpu"), repeat)
    return {"batched_s": t_b - t_init, "loop_s": t_l - t_init, "ratio": (t_l - t_init) / (t_b - t_init)}


def vmap_step_time(arch: str, K: int, steps: int, device: torch.device, repeat: int, batch: int = 128, **kw) -> float:
    """Seconds for ``steps`` SGD steps of K networks with ``torch.func.vmap(functional_call)``
    (BatchNorm without running statistics: vmap cannot update them in place)."""
    from torch.func import functional_call, grad, stack_module_state, vmap

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


def step_rate(arch: str, K: int, steps: int, device: torch.device, repeat: int, batch: int = 128,
              augment: bool = False, **kw) -> float:
    """Optimizer steps per second of the batched engine for K networks (setup excluded)."""
    data = _data(batch * 2, device)
    cfg = TrainConfig(lr=0.01, batch_size=batch, epochs=10**6, lr_step_epochs=[], augment=augment)
    stamps: list[float] = []

    def on_step(step: int, total: int) -> None:
        if step == 1 or step == steps + 1:
            _sync(device)
            stamps.append(time.perf_counter())

    def run():
        stamps.clear()
        train_batched(_models(arch, K, **kw), data, [k % 2 for k in range(K)], list(range(K)), cfg,
                      device=device, evaluate=False, max_steps=steps + 1, on_step=on_step)

    best = math.inf
    for _ in range(max(1, repeat)):
        run()
        best = min(best, stamps[1] - stamps[0])
    return steps / best


def gemm_reference_gflops(widths: list[int], batch: int, K: int, device: torch.device, repeat: int) -> float:
    """GFLOP/s of plain GEMMs with exactly the shapes of one MLP training step (per layer: forward
    (B×in)(in×out), weight gradient (out×B)(B×in), input gradient (B×out)(out×in) except the first
    layer), run back to back for K networks with nothing else: ``torch.mm`` per network on CPU,
    ``torch.bmm`` over the K networks on CUDA (one network's GEMMs cannot fill a GPU)."""
    cuda = device.type == "cuda"
    nb = K if cuda else 1
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append((torch.randn(nb, batch, a, device=device), torch.randn(nb, b, a, device=device),
                       torch.randn(nb, batch, b, device=device), i > 0))
    mm = torch.bmm if cuda else (lambda p, q: torch.mm(p[0], q[0]))
    flops = K * _mlp_flops_per_sample(widths) * batch

    def run():
        for _ in range(1 if cuda else K):
            for x, w, g, dgrad in layers:
                mm(x, w.transpose(1, 2))
                mm(g.transpose(1, 2), x)
                if dgrad:
                    mm(g, w)

    t = _timeit(run, device, max(repeat, 3))
    return flops / t / 1e9


def bench_zoo(device: str = "cpu", quick: bool = False, repeat: int | None = None) -> dict[str, Any]:
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    rep = repeat or (1 if quick else 2)
    res: dict[str, Any] = {"device": device, "threads": torch.get_num_threads(), "quick": quick}
    try:
        from ffl.provenance import hardware

        res["hardware"] = hardware(device)
    except Exception:  # noqa: BLE001
        res["hardware"] = device
    rows: list[tuple[str, str, str]] = []

    # (a) loop vs batched
    K_small = 50
    s_small = 5 if quick else 30
    r = loop_vs_batched("mlp", K_small, s_small, dev, rep, hidden=(32, 32, 32), in_features=192, shape=(3, 8, 8))
    res.update(loop_ratio_small=r["ratio"], small_batched_s=r["batched_s"], small_loop_s=r["loop_s"])
    rows.append((f"MLP 192-32-32-32-2 (3x8x8 input), K={K_small}, {s_small} steps",
                 f"loop {r['loop_s']:.3f} s / batched {r['batched_s']:.3f} s", f"{r['ratio']:.2f}x"))
    if not quick:
        r = loop_vs_batched("mlp", K_small, s_small, dev, rep, hidden=(32, 32, 32))
        res.update(loop_ratio_small_cifar=r["ratio"])
        rows.append((f"MLP 3072-32-32-32-2 (CIFAR input), K={K_small}, {s_small} steps",
                     f"loop {r['loop_s']:.3f} s / batched {r['batched_s']:.3f} s", f"{r['ratio']:.2f}x"))
    K_paper = 256 if cuda else (4 if quick else 16)
    s_paper = 2 if quick else (20 if cuda else 6)
    r = loop_vs_batched("mlp", K_paper, s_paper, dev, rep)
    res.update(loop_ratio_paper=r["ratio"], paper_batched_s=r["batched_s"], paper_loop_s=r["loop_s"], paper_K=K_paper)
    rows.append((f"MLP-4 3072-500-500-500-2, K={K_paper}, {s_paper} steps",
                 f"loop {r['loop_s']:.3f} s / batched {r['batched_s']:.3f} s", f"{r['ratio']:.2f}x"))
    K_cnn = 64 if cuda else (2 if quick else 8)
    s_cnn = 2 if quick else (10 if cuda else 3)
    r = loop_vs_batched("cnn", K_cnn, s_cnn, dev, rep, augment=True)
    res.update(loop_ratio_cnn=r["ratio"], cnn_batched_s=r["batched_s"], cnn_loop_s=r["loop_s"], cnn_K=K_cnn)
    rows.append((f"PlainNet-5 (grouped conv, aug), K={K_cnn}, {s_cnn} steps",
                 f"loop {r['loop_s']:.3f} s / batched {r['batched_s']:.3f} s", f"{r['ratio']:.2f}x"))
    if not quick:
        try:
            t_v = vmap_step_time("cnn", K_cnn, s_cnn, dev, rep)
            res.update(vmap_s=t_v, grouped_vs_vmap=t_v / r["batched_s"])
            rows.append((f"PlainNet-5 torch.func.vmap (no aug), K={K_cnn}, {s_cnn} steps",
                         f"vmap {t_v:.3f} s / batched {r['batched_s']:.3f} s", f"{t_v / r['batched_s']:.2f}x"))
        except Exception as e:  # noqa: BLE001 - vmap is only a comparison
            res["vmap_error"] = repr(e)[:200]

    # (b) GFLOP/s of batched MLP-4 training vs plain GEMMs of the same shapes
    K_g = K_paper
    s_g = 3 if quick else (20 if cuda else 8)
    widths = [3072, 500, 500, 500, 2]
    sps = step_rate("mlp", K_g, s_g, dev, rep)
    achieved = _mlp_flops_per_sample(widths) * 128 * K_g * sps / 1e9
    gemm = gemm_reference_gflops(widths, 128, K_g, dev, rep)
    res.update(gflops_engine=achieved, gflops_gemm=gemm, gemm_fraction=achieved / gemm)
    rows.append((f"MLP-4 training GFLOP/s, K={K_g}", f"engine {achieved:.1f} / plain GEMMs of the step {gemm:.1f}",
                 f"{achieved / gemm:.2f}"))

    # (c) networks per second at paper size
    spe = math.ceil(PAPER_TRAIN_PER_TASK / 128)
    nps_mlp = sps * K_g / (PAPER_EPOCHS["mlp"] * spe)
    K_c = 256 if cuda else (2 if quick else 8)
    s_c = 2 if quick else (10 if cuda else 3)
    sps_c = step_rate("cnn", K_c, s_c, dev, rep, augment=True)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ffl.bench", description="ffl benchmarks")
    ap.add_argument("what", choices=["zoo"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests)")
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convolutions on CUDA")
    args = ap.parse_args(argv)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    res = bench_zoo(args.device, quick=args.quick, repeat=args.repeat)
    res["tf32"] = bool(args.tf32)
    print_table(res)
    out = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items() if k != "table"}
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
