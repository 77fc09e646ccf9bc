"""One paper section's experiment, end to end: profile → zoo → features → protocols → table.

Notebooks call :func:`run_experiment`; it validates its inputs before any work, trains (or loads)
the zoo, and evaluates both protocols for unaligned layers and aligned chains at every index.
Zoos and results are cached on disk, keyed by everything that determines them, so re-running a
notebook is cheap.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

import ffl
from ffl.data import DATASETS
from ffl.features import FeatureConfig, ProjectionConfig, Representation, zoo_representations
from ffl.kernels import KernelStats, StreamConfig, ZooFeatures, streamed_inner
from ffl.models import ARCHS
from ffl.profiles import available_profiles, load_profile
from ffl.protocols import ProtocolSplit, classification_protocol, retrieval_protocol
from ffl.files import atomic_path
from ffl.zoo import Zoo, spec_from_profile, train_zoo

FEATURE_KINDS = ("layer", "chain")


def default_cache_dir() -> Path:
    """``$FFL_CACHE`` or ``./cache``: where zoos and results land."""
    return Path(os.environ.get("FFL_CACHE", "cache")).resolve()


def check_choices(*, arch: str, dataset: str, profile: str, section: str) -> dict[str, Any]:
    """Fail at once, with the valid choices, on an unknown arch/dataset/profile; return the
    profile's settings for ``section``."""
    if profile not in available_profiles():
        raise ValueError(f"unknown profile {profile!r}; choose one of {available_profiles()}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")
    settings = load_profile(profile).get(section)
    if settings is None:
        raise ValueError(f"profile {profile!r} has no settings for {section!r}")
    if arch not in settings["zoo"]["arch"]:
        raise ValueError(
            f"profile {profile!r} defines no {arch!r} zoo for {section!r}; "
            f"it has {sorted(settings['zoo']['arch'])}"
        )
    return settings


def _key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_zoo(
    zoo: Zoo,
    projection: ProjectionConfig,
    split: ProtocolSplit,
    *,
    features: FeatureConfig | None = None,
    progress: bool = True,
    stream: StreamConfig | None = None,
    in_memory: bool = False,
    stats: KernelStats | None = None,
) -> pd.DataFrame:
    """Both protocols, for layer and chain features at every index: a long table with columns
    ``index, feature, protocol, metric, value``.

    The zoo is streamed from disk (:mod:`ffl.kernels`): per index, the N × N kernel is computed
    block by block in the memory ``stream`` allows (default :class:`ffl.kernels.StreamConfig`), and
    both protocols run on it. ``in_memory=True`` instead loads every network and stacks every
    index's features at once (:func:`ffl.features.zoo_representations`; small zoos, reference).
    ``stats`` (a :class:`ffl.kernels.KernelStats`) collects what the streaming did."""
    if in_memory:
        models = [zoo.model(i) for i in range(len(zoo))]
        reps = ((kind, index, lambda rep=rep: rep) for kind in FEATURE_KINDS
                for index, rep in enumerate(zoo_representations(models, kind, features), 1))
    else:
        source = ZooFeatures(zoo, features, device=(stream or StreamConfig()).device)
        stats = stats if stats is not None else KernelStats()

        def streamed(kind: str, index: int) -> Representation:
            shape = source.shapes[(kind, index)]
            inner = streamed_inner(lambda nets: source.load(kind, index, nets), len(zoo), shape, stream,
                                   stats=stats, name=f"{kind} {index}")
            return Representation(inner_products=inner, inner_dim=shape[0] ** 2 if len(shape) == 2 else shape[0])

        reps = ((kind, index, lambda kind=kind, index=index: streamed(kind, index))
                for kind in FEATURE_KINDS for index in source.indices(kind))
    rows = []
    for kind, index, make in tqdm(list(reps), desc="protocols", disable=not progress):
        rows.extend(protocol_rows(make(), kind, index, zoo, projection, split))
    return pd.DataFrame(rows)


def protocol_rows(rep: Representation, kind: str, index: int, zoo: Zoo, projection: ProjectionConfig,
                  split: ProtocolSplit) -> list[dict[str, Any]]:
    """The rows of :func:`evaluate_zoo`'s table for one feature at one index: both protocols."""
    rows = []
    for protocol, fn in (("classification", classification_protocol), ("retrieval", retrieval_protocol)):
        for metric, value in fn(rep, zoo.tasks, zoo.runs, projection, split).items():
            rows.append({"index": index, "feature": kind, "protocol": protocol,
                         "metric": metric, "value": value, "dim": rep.dim})
    return rows


@dataclasses.dataclass
class Experiment:
    """A section's zoo, its results table, and what made them (``seconds``: wall time per stage
    of this run; a stage read from the cache counts as ``cached``)."""

    zoo: Zoo
    results: pd.DataFrame
    settings: dict[str, Any]
    split: ProtocolSplit = dataclasses.field(default_factory=ProtocolSplit)
    features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)
    seconds: dict[str, float | str] = dataclasses.field(default_factory=dict)


def run_experiment(
    section: str,
    *,
    arch: str,
    profile: str,
    dataset: str,
    data_root: str | None = None,
    download: bool = False,
    seed: int = 0,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Experiment:
    """Train or load the zoo of a paper section and evaluate it (cached)."""
    settings = check_choices(arch=arch, dataset=dataset, profile=profile, section=section)
    spec = spec_from_profile(profile, section, arch=arch, dataset=dataset, data_root=data_root,
                             download=download, seed=seed)
    projection = ProjectionConfig.from_dict({"seed": seed, **settings.get("projection", {})})
    split = ProtocolSplit(**{"seed": seed, **settings.get("split", {})})
    features = FeatureConfig.from_dict(settings.get("features"))

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    spec_dict = spec.identity()  # where the data lives does not change the zoo
    zoo_root = cache / "zoos" / f"{arch}-{dataset}-{_key(spec_dict)}"
    seconds: dict[str, float | str] = {}
    start = time.perf_counter()
    zoo_was_cached = (zoo_root / "manifest.json").is_file()  # complete zoos only have one
    zoo = train_zoo(spec, zoo_root, device=device, progress=progress)
    seconds["zoo"] = "cached" if zoo_was_cached else round(time.perf_counter() - start, 1)

    result_key = _key({"zoo": spec_dict, "projection": dataclasses.asdict(projection),
                       "split": dataclasses.asdict(split), "features": dataclasses.asdict(features),
                       "ffl": ffl.__version__})
    result_file = cache / "results" / f"{section}-{arch}-{dataset}-{result_key}.csv"
    if result_file.is_file():
        results = pd.read_csv(result_file)
        seconds["features and protocols"] = "cached"
    else:
        start = time.perf_counter()
        results = evaluate_zoo(zoo, projection, split, features=features, progress=progress)
        seconds["features and protocols"] = round(time.perf_counter() - start, 1)
        with atomic_path(result_file) as staged:  # a killed run leaves no half-written table
            results.to_csv(staged, index=False)
    return Experiment(zoo=zoo, results=results, settings=settings, split=split, features=features,
                      seconds=seconds)
