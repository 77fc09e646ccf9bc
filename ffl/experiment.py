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
import torch
from tqdm import tqdm

import ffl
from ffl.checks import as_bool, as_data_root, as_device, as_float, as_int, as_seed
from ffl.data import DATASETS
from ffl.features import FeatureConfig, ProjectionConfig, zoo_representations
from ffl.models import ARCHS
from ffl.profiles import available_profiles, load_profile
from ffl.protocols import (ProtocolSplit, classification_protocol, classification_split, retrieval_protocol,
                           retrieval_split)
from ffl.files import atomic_path
from ffl.zoo import Zoo, ZooSpec, spec_from_profile, train_zoo

FEATURE_KINDS = ("layer", "chain")


def default_cache_dir() -> Path:
    """``$FFL_CACHE`` or ``./cache``: where zoos and results land."""
    return Path(os.environ.get("FFL_CACHE", "cache")).resolve()


_UNSET: Any = object()


def check_parameters(*, seed: Any = _UNSET, device: Any = _UNSET, download: Any = _UNSET,
                     data_root: Any = _UNSET) -> dict[str, Any]:
    """The run parameters of a chapter, checked for type and range (see :mod:`ffl.checks`) and
    returned normalized (``download="true"``, as papermill's ``-p`` passes it, becomes ``True``);
    parameters not given are not checked."""
    checks = {"seed": as_seed, "device": as_device, "download": lambda v: as_bool("download", v),
              "data_root": as_data_root}
    given = {"seed": seed, "device": device, "download": download, "data_root": data_root}
    return {name: checks[name](value) for name, value in given.items() if value is not _UNSET}


def check_choices(*, arch: str, dataset: str, profile: str, section: str, seed: Any = _UNSET,
                  device: Any = _UNSET, download: Any = _UNSET, data_root: Any = _UNSET) -> dict[str, Any]:
    """Fail at once, with the valid choices, on an unknown arch/dataset/profile or a bad run
    parameter (``seed`` an integer >= 0, ``device`` one this machine has, ``download`` a bool,
    ``data_root`` a folder path or None; see :func:`check_parameters`); also check the section's
    zoo spec (every training field's type and range). Return the profile's settings for
    ``section``. Nothing is written."""
    check_parameters(seed=seed, device=device, download=download, data_root=data_root)
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
    spec = spec_from_profile(profile, section, arch=arch, dataset=dataset)  # the spec's fields, checked
    _check_evaluation_settings(profile, section, settings, spec)
    return settings


def _check_evaluation_settings(profile: str, section: str, settings: dict[str, Any], spec: ZooSpec) -> None:
    """The section's ``projection``, ``split`` and ``features`` settings: known keys, numbers in
    range, and protocol splits that the zoo's tasks × runs allow (before the zoo is trained)."""
    where = f"profile {profile!r}, section {section!r}"
    try:
        projection = ProjectionConfig.from_dict(settings.get("projection"))
        split = ProtocolSplit(**settings.get("split", {}))
        tasks = torch.tensor(spec.tasks).repeat_interleave(spec.runs)  # the zoo's order: task-major
        runs = torch.arange(spec.runs).repeat(len(spec.tasks))
        classification_split(tasks, runs, split)
        retrieval_split(tasks, runs, split)
        FeatureConfig.from_dict(settings.get("features"))
        as_float("projection lr", projection.lr, positive=True)
        as_float("projection momentum", projection.momentum, minimum=0.0, below=1.0)
        as_float("projection weight_decay", projection.weight_decay, minimum=0.0)
        as_float("projection lr_gamma", projection.lr_gamma, positive=True)
        as_int("projection epochs", projection.epochs, minimum=1)
        as_int("projection batch_size", projection.batch_size, minimum=1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_zoo(
    zoo: Zoo,
    projection: ProjectionConfig,
    split: ProtocolSplit,
    *,
    features: FeatureConfig | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Both protocols, for layer and chain features at every index: a long table with columns
    ``index, feature, protocol, metric, value``."""
    models = [zoo.model(i) for i in range(len(zoo))]
    rows = []
    jobs = [(kind, rep) for kind in FEATURE_KINDS
            for rep in enumerate(zoo_representations(models, kind, features), 1)]
    for kind, (index, rep) in tqdm(jobs, desc="protocols", disable=not progress):
        for protocol, fn in (("classification", classification_protocol), ("retrieval", retrieval_protocol)):
            for metric, value in fn(rep, zoo.tasks, zoo.runs, projection, split).items():
                rows.append({"index": index, "feature": kind, "protocol": protocol,
                             "metric": metric, "value": value, "dim": rep.dim})
    return pd.DataFrame(rows)


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
    params = check_parameters(seed=seed, device=device, download=download, data_root=data_root)
    seed, device, download, data_root = params["seed"], params["device"], params["download"], params["data_root"]
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
