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
from ffl.data import DATASETS
from ffl.features import FeatureConfig, ProjectionConfig, zoo_representations
from ffl.models import ARCHS
from ffl.profiles import available_profiles, load_profile
from ffl.protocols import ProtocolSplit, classification_protocol, cross_condition_protocol, retrieval_protocol
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
    zoo_overrides: dict[str, Any] | None = None,
) -> Experiment:
    """Train or load the zoo of a paper section and evaluate it (cached). ``zoo_overrides``
    replace fields of the profile's zoo spec (a setting of §4.4)."""
    settings = check_choices(arch=arch, dataset=dataset, profile=profile, section=section)
    spec = spec_from_profile(profile, section, arch=arch, dataset=dataset, data_root=data_root,
                             download=download, seed=seed, **(zoo_overrides or {}))
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


# --------------------------------------------------------------------------------------------
# §4.4: the factors (Figures 4 and 5)
# --------------------------------------------------------------------------------------------

BASELINE = "Baseline"


@dataclasses.dataclass
class FactorsExperiment:
    """One :class:`Experiment` per setting of §4.4 (Figure 4: each setting's own protocols) and the
    cross-condition table (Figure 5: Θ learned on the baseline zoo, read on each other setting's
    zoo), with columns ``setting, index, feature, protocol, metric, value, dim``."""

    experiments: dict[str, Experiment]
    cross: pd.DataFrame
    settings: dict[str, Any]
    seconds: dict[str, float | str] = dataclasses.field(default_factory=dict)


def factor_settings(profile: str) -> dict[str, dict[str, Any]]:
    """The settings of a profile's ``factors`` section, baseline first: name -> ``{arch, overrides}``
    where ``overrides`` replace fields of that architecture's zoo spec (``model_kwargs`` are merged
    into the architecture's)."""
    section = load_profile(profile).get("factors") or {}
    named = section.get("settings") or {}
    if BASELINE not in named:
        raise ValueError(f"profile {profile!r}: the factors section needs a {BASELINE!r} setting")
    out = {}
    for name in [BASELINE, *(n for n in named if n != BASELINE)]:
        overrides = dict(named[name])
        arch = overrides.pop("arch")
        if "model_kwargs" in overrides:
            base = section["zoo"]["arch"].get(arch, {}).get("model_kwargs", {})
            overrides["model_kwargs"] = {**base, **overrides["model_kwargs"]}
        out[name] = {"arch": arch, "overrides": overrides}
    return out


def cross_condition_results(source: Experiment, target: Experiment, *, progress: bool = True) -> pd.DataFrame:
    """Θ learned on ``source``'s zoo read on ``target``'s, for layer and chain features at every
    index where the two zoos' features have the same size (§4.4, Figure 5)."""
    rows = []
    reps = {}
    for name, exp in (("source", source), ("target", target)):
        models = [exp.zoo.model(i) for i in range(len(exp.zoo))]
        reps[name] = {kind: zoo_representations(models, kind, source.features) for kind in FEATURE_KINDS}
    if not (torch.equal(source.zoo.tasks, target.zoo.tasks) and torch.equal(source.zoo.runs, target.zoo.runs)):
        raise ValueError("the two zoos must hold the same tasks × runs in the same order")
    jobs = [(kind, index) for kind in FEATURE_KINDS
            for index in range(1, min(len(reps["source"][kind]), len(reps["target"][kind])) + 1)]
    for kind, index in tqdm(jobs, desc="cross-condition", disable=not progress):
        a, b = reps["source"][kind][index - 1], reps["target"][kind][index - 1]
        rows_a, rows_b = ((a.vectors.shape[1], b.vectors.shape[1]) if kind == "layer"
                          else (a.factors.shape[1], b.factors.shape[1]))
        if rows_a != rows_b:
            continue  # Θ cannot read a feature of another size (e.g. PlainNet-6's fifth layer)
        out = cross_condition_protocol(a, b, source.zoo.tasks, source.zoo.runs, _projection(source), source.split)
        for protocol, metrics in out.items():
            for metric, value in metrics.items():
                rows.append({"index": index, "feature": kind, "protocol": protocol, "metric": metric,
                             "value": value, "dim": a.dim})
    return pd.DataFrame(rows, columns=["index", "feature", "protocol", "metric", "value", "dim"])


def _projection(exp: Experiment) -> ProjectionConfig:
    return ProjectionConfig.from_dict({"seed": exp.split.seed, **exp.settings.get("projection", {})})


def run_factors(
    *,
    profile: str,
    dataset: str,
    data_root: str | None = None,
    download: bool = False,
    seed: int = 0,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> FactorsExperiment:
    """§4.4: every setting's zoo and protocols (Figure 4), then Θ of the baseline read on every
    other setting (Figure 5); each step cached."""
    named = factor_settings(profile)
    for spec in named.values():  # every choice checked before any training
        check_choices(arch=spec["arch"], dataset=dataset, profile=profile, section="factors")
    experiments = {
        name: run_experiment("factors", arch=spec["arch"], profile=profile, dataset=dataset,
                             data_root=data_root, download=download, seed=seed, device=device,
                             cache_dir=cache_dir, progress=progress, zoo_overrides=spec["overrides"])
        for name, spec in named.items()
    }
    base = experiments[BASELINE]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    frames, seconds = [], {}
    for name, exp in experiments.items():
        if name == BASELINE:
            continue
        key = _key({"source": base.zoo.spec.identity(), "target": exp.zoo.spec.identity(),
                    "projection": dataclasses.asdict(_projection(base)), "split": dataclasses.asdict(base.split),
                    "features": dataclasses.asdict(base.features), "ffl": ffl.__version__})
        path = cache / "results" / f"factors-cross-{dataset}-{key}.csv"
        if path.is_file():
            frame, seconds[f"cross-condition {name}"] = pd.read_csv(path), "cached"
        else:
            start = time.perf_counter()
            frame = cross_condition_results(base, exp, progress=progress)
            seconds[f"cross-condition {name}"] = round(time.perf_counter() - start, 1)
            with atomic_path(path) as staged:
                frame.to_csv(staged, index=False)
        frames.append(frame.assign(setting=name))
    cross = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return FactorsExperiment(experiments=experiments, cross=cross, settings=load_profile(profile)["factors"],
                             seconds=seconds)
