"""What the benchmarks share: timing on a shared machine (the device synchronized, the best of
several rounds, rivals timed alternately), the rate of plain GEMMs of a given shape, and the seeded
models and random data that the engine benchmarks train."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from ffl.engine import NetworkData
from ffl.models import build_model

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
