"""Benchmarks of the engine, the convolutions and feature learning: ``python -m ffl.bench
zoo|zoo-time|conv|profile|chunks|ffl``. The measurements go to docs/performance.md.

One idea per module; every public name is re-exported here:

* :mod:`ffl.bench.engine` — the zoo engine: batched vs a plain loop, GEMM fraction, networks per
  second (``zoo``), a CIFAR-100-scale zoo timed chunk by chunk (``zoo-time``), the profiler's
  kernel table of engine steps (``profile``), PlainNet-5 training against the chunk size K on CPU
  (``chunks``);
* :mod:`ffl.bench.conv` — PlainNet-5's convolutions for K networks (``conv``), the Triton
  kernels' blocking sweep and tile tables (``conv --sweep``), agreement checks;
* :mod:`ffl.bench.features` — the feature-learning stage streamed over a zoo on disk (``ffl``);
* :mod:`ffl.bench.random_zoo` — zoos of random weights in the real format, which ``ffl`` times;
* :mod:`ffl.bench.timing` — what they share: timing on a shared machine, GEMM rates, seeded
  models and random data;
* :mod:`ffl.bench.cli` — the command line (:func:`main`, :data:`COMMANDS`).
"""
from ffl.bench.cli import COMMANDS, main
from ffl.bench.conv import (PLAINNET5_CONVS, SWEEP_TOLERANCE, best_tiles, conv_layers, conv_sweep, engine_agreement,
                            im2col_conv3x3, implicit_agreement)
from ffl.bench.engine import _mlp_flops_per_sample  # noqa: F401 (the tests check the FLOP count)
from ffl.bench.engine import (PAPER_EPOCHS, PAPER_TRAIN_PER_TASK, bench_zoo, chunk_sweep, gemm_reference_gflops,
                              loop_vs_batched, print_table, profile_step, step_rate, vmap_step_time, zoo_time)
from ffl.bench.features import PAPER_SHAPES, QUICK_SHAPES, bench_ffl, print_ffl
from ffl.bench.random_zoo import RANDOM_MARK, random_weight_zoo

__all__ = [
    "COMMANDS", "main",
    "PLAINNET5_CONVS", "SWEEP_TOLERANCE", "best_tiles", "conv_layers", "conv_sweep", "engine_agreement",
    "im2col_conv3x3", "implicit_agreement",
    "PAPER_EPOCHS", "PAPER_TRAIN_PER_TASK", "bench_zoo", "chunk_sweep", "gemm_reference_gflops", "loop_vs_batched", "print_table",
    "profile_step", "step_rate", "vmap_step_time", "zoo_time",
    "PAPER_SHAPES", "QUICK_SHAPES", "bench_ffl", "print_ffl",
    "RANDOM_MARK", "random_weight_zoo",
]
