r"""Beyond the paper (ours): FFL against weight matching and linear CKA on one zoo, under the
paper's protocols (§4) — the same splits and queries (:func:`ffl.protocols.classification_split`,
:func:`ffl.protocols.retrieval_split`) for every method.

Similarities of two networks a, b at index l:

* ``chain`` — FFL: cosine of the chain Grams G_l (§3.2), from the kernel :mod:`ffl.kernels` streams;
* ``layer`` — the paper's unaligned baseline: cosine of the raw layer features W_l;
* ``weight_matching`` — b's hidden neurons aligned to a's (:mod:`ffl.weight_matching`, Git Re-Basin),
  then the cosine of layer l's features of a and the aligned b (MLP, PlainNet; no GRU rule there);
* ``cka`` — linear CKA (:mod:`ffl.cka`) of hidden layer l's activations on a fixed probe batch
  (index L, the last: the outputs), unbiased or biased HSIC. For N networks the N × N matrix is one
  product: CKA(K, L) = ⟨u(K), u(L)⟩ / (‖u(K)‖ ‖u(L)‖), u = double centring HKH (biased) or the
  U-centring of K with a zero diagonal (unbiased; Székely & Rizzo 2014, = Song et al.'s HSIC₁).

Two ways each: **unsupervised** (no training; classification gives a network the task of its most
similar Θ-training network, top-1; retrieval ranks the gallery, CMC and mAP), and **with Θ** learned
as §3.3 (:func:`ffl.experiment.protocol_rows`) where a method gives a vector to read: chains and raw
layers. Weight matching and CKA score pairs and give no vector, so no Θ.

Cost per pair: the method's wall time in this run over the pairs it scored — FFL and raw layers:
the index's kernel (all N(N+1)/2 pairs); weight matching: the matchings of the pairs the protocols
need; CKA: the probe forward passes of all N networks plus the index's N × N product.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from ffl.cka import hidden_activations
from ffl.data import load_task
from ffl.experiment import code_hash, protocol_rows, read_results, write_results
from ffl.features import FeatureConfig, ProjectionConfig, Representation
from ffl.kernels import StreamConfig, ZooFeatures
from ffl.metrics import cmc, mean_average_precision, top1
from ffl.models import GRUNet
from ffl.permute import permute_hidden
from ffl.profile_settings import Section
from ffl.protocols import ProtocolSplit, classification_split, retrieval_split
from ffl.weight_matching import match_permutations
from ffl.zoo import Zoo, ZooSpec, cached_zoo_root, default_cache_dir, train_zoo

METHODS = {"chain": "FFL chain", "layer": "raw layer", "weight_matching": "weight matching", "cka": "CKA"}
COLUMNS = ["method", "mode", "index", "protocol", "metric", "value", "reference", "scored", "pairs", "us_per_pair"]


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """``probe_size`` inputs for CKA (equally many from each zoo task's test set, drawn with
    ``seed``), ``unbiased`` HSIC; weight matching's ``max_sweeps`` and, for classification,
    ``references_per_task``: each test network matched against that many Θ-training runs per task
    (the first in split order; None: all)."""

    probe_size: int = 256
    unbiased: bool = True
    max_sweeps: int = 100
    references_per_task: int | None = None

    @classmethod
    def from_section(cls, section: dict[str, Any] | None) -> "BaselineConfig":
        """From a profile's ``beyond:`` section (``probe: {size, unbiased}``, ``weight_matching:
        {max_sweeps, references_per_task}``)."""
        section = section or {}
        probe, wm = dict(section.get("probe") or {}), dict(section.get("weight_matching") or {})
        cfg = cls(probe_size=int(probe.pop("size", 256)), unbiased=bool(probe.pop("unbiased", True)),
                  max_sweeps=int(wm.pop("max_sweeps", 100)), references_per_task=wm.pop("references_per_task", None))
        if probe or wm:
            raise ValueError(f"unknown beyond settings {sorted(probe) + sorted(wm)}")
        if cfg.probe_size < 4 or cfg.max_sweeps < 1 or (cfg.references_per_task or 1) < 1:
            raise ValueError(f"probe size must be >= 4, max_sweeps and references_per_task >= 1: {cfg}")
        return cfg


def unsupervised_protocols(sim: torch.Tensor, tasks: torch.Tensor, runs: torch.Tensor,
                           split: ProtocolSplit) -> dict[str, dict[str, float]]:
    """Both protocols without Θ from an N × N similarity (NaN: a pair not scored, never chosen):
    nearest Θ-training network's task (top-1), and the gallery ranked for each query (CMC, mAP)."""
    labels = torch.searchsorted(tasks.unique(), tasks)
    train, test = classification_split(tasks, runs, split)
    s = sim[test][:, train].double().nan_to_num(nan=-math.inf)
    scores = torch.full((len(test), int(labels.max()) + 1), -math.inf, dtype=torch.float64)
    scores.scatter_reduce_(1, labels[train].expand(len(test), -1), s, reduce="amax")
    _, query, gallery = retrieval_split(tasks, runs, split)
    s = sim[query][:, gallery].double()
    out = {f"rank{k}": v for k, v in cmc(s, tasks[query], tasks[gallery], (1, 5, 10)).items()}
    out["mAP"] = mean_average_precision(s, tasks[query], tasks[gallery])
    return {"classification": {"top1": top1(scores, labels[test])}, "retrieval": out}


def probe_batches(spec: ZooSpec, size: int, seed: int = 0) -> list[torch.Tensor]:
    """The CKA probe: ``size`` test inputs, ⌈size / T⌉ drawn (seeded) from each of the zoo's T tasks
    in turn; one batch for images, one per name length for NameData (no padding reaches a GRU)."""
    gen = torch.Generator().manual_seed(seed)
    per = math.ceil(size / len(spec.tasks))
    xs, lengths = [], []
    for t in spec.tasks:
        data = load_task(spec.dataset, t, data_root=spec.data_root, download=spec.download, seed=spec.seed,
                         **spec.data_kwargs)
        pick = torch.randperm(len(data.x_test), generator=gen)[:per]
        xs.extend(data.x_test[pick])
        lengths.extend(data.lengths_test[pick].tolist() if data.lengths_test is not None else [None] * len(pick))
    xs, lengths = xs[:size], lengths[:size]
    if lengths[0] is None:
        return [torch.stack(xs)]
    return [torch.stack([x[:n] for x, m in zip(xs, lengths) if m == n]) for n in sorted(set(lengths))]


@torch.no_grad()
def probe_activations(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Hidden layer 1 … L−1's activations on the probe (:func:`ffl.cka.hidden_activations`), then the
    outputs (index L), each (probe size, features)."""
    per = []
    for x in batches:
        out = []
        handle = model.register_forward_hook(lambda m, i, o: out.append(o))
        try:
            acts = hidden_activations(model, x)
        finally:
            handle.remove()
        per.append([a.reshape(len(x), -1).double() for a in (*acts, *out)])
    return [torch.cat(layer) for layer in zip(*per)]


def centred_kernel(x: torch.Tensor, *, unbiased: bool) -> torch.Tensor:
    """The unit vector u(K) of :mod:`ffl.baselines`' CKA for activations ``x`` (n, p): the upper
    triangle of HKH (biased) or of K's U-centring (unbiased), off-diagonal entries weighted by √2."""
    x = x - x.mean(0)
    k, n = x @ x.T, len(x)
    if unbiased:
        k.diagonal().zero_()
        r = k.sum(0)
        k = k - r[:, None] / (n - 2) - r[None, :] / (n - 2) + r.sum() / ((n - 1) * (n - 2))
        k.diagonal().zero_()
    else:
        k = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()
    i, j = torch.triu_indices(n, n)
    u = k[i, j] * (1.0 + (math.sqrt(2.0) - 1.0) * (i != j).double())  # float64: ⟨u(K), u(L)⟩ = ⟨K', L'⟩_F
    return u / u.norm().clamp_min(1e-300)


def cka_matrices(models: list[nn.Module], batches: list[torch.Tensor], *, unbiased: bool
                 ) -> tuple[list[torch.Tensor], float, list[float]]:
    """N × N linear CKA per index, the probe forward seconds (all networks) and each index's product seconds."""
    start = time.perf_counter()
    vectors = [[centred_kernel(a, unbiased=unbiased) for a in probe_activations(m, batches)] for m in models]
    forward = time.perf_counter() - start
    out, seconds = [], []
    for l in range(len(vectors[0])):
        start = time.perf_counter()
        v = torch.stack([per[l] for per in vectors])
        out.append(v @ v.T)
        seconds.append(time.perf_counter() - start)
    return out, forward, seconds


def weight_matching_pairs(models: list[nn.Module], pairs: list[tuple[int, int]], features: FeatureConfig, *,
                          max_sweeps: int = 100, seed: int = 0, progress: bool = False
                          ) -> tuple[dict[tuple[int, int], list[float]], dict[tuple[int, int], float]]:
    """For each pair (a, b): b aligned to a by weight matching, the cosine of a's and the aligned b's
    layer features at every index; and each pair's seconds (matching and cosines)."""
    own = [[f.double() for f in features.of(m, "layer")] for m in models]
    sims, seconds = {}, {}
    threads = torch.get_num_threads()
    # matrices of at most a few hundred rows: one thread, since a thread team's hand-offs on every small op
    # cost more than the op, and far more on shared cores
    torch.set_num_threads(1)
    try:
        for a, b in tqdm(pairs, desc="weight matching", disable=not progress):
            start = time.perf_counter()
            perms, _ = match_permutations(models[a], models[b], seed=seed, max_sweeps=max_sweeps)
            aligned = features.of(permute_hidden(models[b], perms), "layer")
            sims[(a, b)] = [float(fa @ fb.double() / (fa.norm() * fb.norm()).clamp_min(1e-300))
                            for fa, fb in zip(own[a], aligned)]
            seconds[(a, b)] = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return sims, seconds


def _needed_pairs(tasks: torch.Tensor, runs: torch.Tensor, split: ProtocolSplit, per_task: int | None
                  ) -> dict[str, list[tuple[int, int]]]:
    train, test = classification_split(tasks, runs, split)
    if per_task is not None:
        train = torch.cat([train[tasks[train] == t][:per_task] for t in tasks.unique()])
    _, query, gallery = retrieval_split(tasks, runs, split)
    return {"classification": [(int(a), int(b)) for a in test for b in train],
            "retrieval": [(int(a), int(b)) for a in query for b in gallery]}


def _rows(method: str, mode: str, index: int, out: dict[str, dict[str, float]], sizes: dict[str, tuple[int, int]],
          pairs: dict[str, int], us: dict[str, float]) -> list[dict[str, Any]]:
    return [dict(method=method, mode=mode, index=index, protocol=p, metric=m, value=v, reference=sizes[p][0],
                 scored=sizes[p][1], pairs=pairs[p], us_per_pair=us[p]) for p, metrics in out.items()
            for m, v in metrics.items()]


def compare_methods(zoo: Zoo, *, split: ProtocolSplit, projection: ProjectionConfig, features: FeatureConfig,
                    config: BaselineConfig, probe: list[torch.Tensor], progress: bool = True) -> pd.DataFrame:
    """Every method on ``zoo`` in both protocols, unsupervised and (chains, raw layers) with Θ: a long
    table with :data:`COLUMNS` (``reference``/``scored``: Θ-training or compared networks per scored
    network / gallery, and test networks / queries; ``pairs`` scored; ``us_per_pair``: see module doc)."""
    tasks, runs, n = zoo.tasks, zoo.runs, len(zoo)
    train, test = classification_split(tasks, runs, split)
    _, query, gallery = retrieval_split(tasks, runs, split)
    sizes = {"classification": (len(train), len(test)), "retrieval": (len(gallery), len(query))}
    rows: list[dict[str, Any]] = []
    zoo.verify()
    stream = StreamConfig.for_device("cpu")
    source = ZooFeatures(zoo, features, device="cpu", chunk_bytes=stream.slab_bytes)
    all_pairs = n * (n + 1) // 2
    for kind in ("chain", "layer"):
        for index in tqdm(source.indices(kind), desc=f"{kind} kernels", disable=not progress):
            start = time.perf_counter()
            k = source.kernels([(kind, index)], stream)[(kind, index)]
            rep = Representation.of_kernel(k, source.shapes[(kind, index)])
            sim = rep.kernel(torch.arange(n), torch.arange(n))
            us = 1e6 * (time.perf_counter() - start) / all_pairs
            both = {p: all_pairs for p in sizes}
            rows += _rows(kind, "unsupervised", index, unsupervised_protocols(sim, tasks, runs, split), sizes, both,
                          {p: us for p in sizes})
            for r in protocol_rows(rep, kind, index, zoo, projection, split):
                if r["metric"].startswith("theta_"):  # Θ's own fit: not a score of the method
                    continue
                rows += _rows(kind, "learned", index, {r["protocol"]: {r["metric"]: r["value"]}}, sizes, both,
                              {p: us for p in sizes})
    models = [zoo.model(i) for i in range(n)]
    cka, forward, seconds = cka_matrices(models, probe, unbiased=config.unbiased)
    for index, (sim, s) in enumerate(zip(cka, seconds), 1):
        us = 1e6 * (forward + s) / all_pairs
        rows += _rows("cka", "unsupervised", index, unsupervised_protocols(sim, tasks, runs, split), sizes,
                      {p: all_pairs for p in sizes}, {p: us for p in sizes})
    if not isinstance(models[0], GRUNet):  # ffl.weight_matching has no rule for a GRU's gates
        needed = _needed_pairs(tasks, runs, split, config.references_per_task)
        unique = list(dict.fromkeys(needed["classification"] + needed["retrieval"]))
        sims, secs = weight_matching_pairs(models, unique, features, max_sweeps=config.max_sweeps,
                                           seed=split.seed, progress=progress)
        wm_sizes = {**sizes, "classification": (len(needed["classification"]) // len(test), len(test))}
        us = {p: 1e6 * sum(secs[q] for q in needed[p]) / len(needed[p]) for p in needed}
        for index in range(1, len(next(iter(sims.values()))) + 1):
            sim = torch.full((n, n), math.nan, dtype=torch.float64)
            for (a, b), values in sims.items():
                sim[a, b] = values[index - 1]
            rows += _rows("weight_matching", "unsupervised", index, unsupervised_protocols(sim, tasks, runs, split),
                          wm_sizes, {p: len(needed[p]) for p in needed}, us)
    return pd.DataFrame(rows, columns=COLUMNS)


@dataclasses.dataclass
class MethodComparison:
    """One zoo's :func:`compare_methods` table, the zoo, and the seconds of each stage (``cached``)."""

    zoo: Zoo
    results: pd.DataFrame
    config: BaselineConfig
    seconds: dict[str, float | str]


def run_comparison(section: Section, *, arch: str, dataset: str, config: BaselineConfig,
                   data_root: str | None = None, download: bool = False, seed: int = 0,
                   cache_dir: str | Path | None = None, progress: bool = True) -> MethodComparison:
    """The zoo of ``section`` (as :func:`ffl.experiment.check_choices` returned it for ``arch`` and
    ``dataset``; trained, or loaded from the cache its chapter fills: the same spec, the same folder)
    and every method on it (cached under the zoo's weights and every setting)."""
    spec = section.spec(arch=arch, dataset=dataset, data_root=data_root, download=download, seed=seed)
    split = section.split_for(seed)
    projection = section.projection_for(arch, seed=seed)
    features = section.features_for(arch)
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir)
    root = cached_zoo_root(spec, cache)
    seconds: dict[str, float | str] = {}
    start, was_cached = time.perf_counter(), (root / "manifest.json").is_file()
    zoo = train_zoo(spec, root, progress=progress)
    seconds["zoo"] = "cached" if was_cached else round(time.perf_counter() - start, 1)
    made_by = {"zoo": spec.identity(), "zoo_weights": zoo.weights_sha256, "split": dataclasses.asdict(split),
               "projection": dataclasses.asdict(projection), "features": dataclasses.asdict(features),
               "config": dataclasses.asdict(config), "code": code_hash()}
    key = hashlib.sha256(json.dumps(made_by, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache / "results" / f"beyond-{section.name}-{arch}-{dataset}-{key}.csv"
    results = read_results(path, made_by, kinds=None, key=("method", "mode", "index", "protocol", "metric"))
    if results is not None:
        seconds["methods"] = "cached"
    else:
        start = time.perf_counter()
        probe = probe_batches(spec, config.probe_size, seed)
        results = compare_methods(zoo, split=split, projection=projection, features=features, config=config,
                                  probe=probe, progress=progress)
        seconds["methods"] = round(time.perf_counter() - start, 1)
        write_results(path, results, made_by)
    return MethodComparison(zoo, results, config, seconds)
