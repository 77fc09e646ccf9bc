"""The feature-learning stage over a zoo on disk: ``python -m ffl.bench ffl`` (:func:`bench_ffl`).

The stage is streamed as the chapters run it (:mod:`ffl.kernels`): per index the time reading
networks, forming features, the kernel work and the protocols; peak memory; the GEMM fraction;
and the projection to N = 5,000 from the measured rates. The zoo has random, untrained weights in
the real format (:mod:`ffl.bench.random_zoo`), which the feature stage cannot tell apart. The plan
with its multiply-adds is printed before the long work (:func:`_planned_pass`,
:func:`_planned_macs`), ``budget_s`` leaves out indices that would overrun, and
:func:`print_ffl` prints the result.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ffl.bench.random_zoo import RANDOM_MARK, random_weight_zoo
from ffl.bench.timing import _gemm_rate
from ffl.chain import measure
from ffl.experiment import protocol_rows
from ffl.features import FeatureConfig, ProjectionConfig, Representation
from ffl.kernels import KernelStats, StreamConfig, ZooFeatures, block_sizes, explicit_is_cheaper
from ffl.protocols import ProtocolSplit
from ffl.provenance import hardware
from ffl.zoo import default_cache_dir

PAPER_SHAPES = {"mlp": {"hidden": [500, 500, 500]}, "cnn": {}}
QUICK_SHAPES = {"mlp": {"hidden": [16, 16, 16]}, "cnn": {"widths": [4, 8, 8, 8]}}  # tests only

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
