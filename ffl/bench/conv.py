"""PlainNet-5's convolutions for K networks: ``python -m ffl.bench conv``.

:func:`conv_layers` times each layer's forward + backward four ways: the engine's grouped
convolution, im2col + ``bmm`` (:func:`im2col_conv3x3`), one dense convolution of the same FLOPs (the
device's ceiling for these shapes) and :mod:`ffl.implicit_conv`'s Triton kernels.
:func:`conv_sweep` (``conv --sweep``) times those kernels under a grid of blockings and
:func:`best_tiles` keeps the ones that beat the default (``--tiles-out``: a tile table). The
agreement checks: :func:`implicit_agreement` (one layer against the grouped convolution) and
:func:`engine_agreement` (the batched engine with the Triton kernels against the plain loop).
"""
from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ffl import implicit_conv, triton_support
from ffl.batched import bn_backend, conv_backend
from ffl.bench.timing import _models, _timeit
from ffl.engine import NetworkData, TrainConfig, precision_scope, train_batched, train_loop

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
