"""One paper section's experiment, end to end: profile → zoo → features → protocols → table.

Notebooks call :func:`run_experiment`; it validates its inputs before any work, trains (or loads)
the zoo, and evaluates both protocols for unaligned layers and aligned chains at every index.
Zoos and results are cached on disk, keyed by everything that determines them, so re-running a
notebook is cheap.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

import ffl
from ffl.checks import as_folder, check_parameters  # check_parameters: also public here
from ffl.data import DATASETS
from ffl.features import FeatureConfig, ProjectionConfig, Representation, zoo_representations
from ffl.kernels import KernelStats, StreamConfig, ZooFeatures
from ffl.models import ARCHS
from ffl.profile_settings import Section, load
from ffl.profiles import available_profiles
from ffl.protocols import (ProtocolSplit, classification_protocol, classification_split, cross_condition_protocol,
                           retrieval_protocol, retrieval_split)
from ffl.files import clean_stale_temp, write_bytes_atomic, write_json_atomic
from ffl.zoo import Zoo, cached_zoo_root, default_cache_dir, train_zoo

FEATURE_KINDS = ("layer", "chain")


_UNSET: Any = object()


def check_choices(*, arch: str, dataset: str, profile: str, section: str, seed: Any = _UNSET,
                  device: Any = _UNSET, download: Any = _UNSET, data_root: Any = _UNSET) -> Section:
    """Fail at once, with the valid choices, on an unknown arch/dataset/profile or a bad run
    parameter (``seed`` an integer >= 0, ``device`` one this machine has, ``download`` a bool,
    ``data_root`` a folder path or None; see :func:`check_parameters`); also check what the choices
    make of the section: its zoo spec for ``arch`` on ``dataset`` (every training field's type and
    range), Θ's and the features' settings for ``arch``, and protocol splits its tasks × runs
    allow. Return the section, typed (:class:`ffl.profile_settings.Section`), for the chapter to
    pass down (:func:`run_experiment`): a chapter checks once, in its first cell. Nothing is written."""
    checked = _checked_section(profile, section, dataset, arch,
                               {"seed": seed, "device": device, "download": download, "data_root": data_root})
    _check_zoo(checked, arch, dataset)
    return checked


def check_factors(*, profile: str, dataset: str, seed: Any = _UNSET, device: Any = _UNSET, download: Any = _UNSET,
                  data_root: Any = _UNSET) -> Section:
    """:func:`check_choices` for the factors chapter (§4.4): every setting's arch and zoo, its
    overrides applied (:func:`factor_settings`). Return the ``factors`` section for
    :func:`run_factors`."""
    checked = _checked_section(profile, "factors", dataset, None,
                               {"seed": seed, "device": device, "download": download, "data_root": data_root})
    for setting in factor_settings(checked).values():
        _check_arch(setting["arch"])
        _check_zoo(checked, setting["arch"], dataset, setting["overrides"])
    return checked


def _checked_section(profile: str, section: str, dataset: str, arch: str | None, given: dict[str, Any]) -> Section:
    """The run parameters given, the profile's name, the dataset and the arch checked; the section, loaded."""
    check_parameters(**{name: value for name, value in given.items() if value is not _UNSET})
    if profile not in available_profiles():
        raise ValueError(f"unknown profile {profile!r}; choose one of {available_profiles()}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    if arch is not None:
        _check_arch(arch)
    return load(profile).section(section)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHS)}")


def _check_zoo(section: Section, arch: str, dataset: str, overrides: dict[str, Any] | None = None) -> None:
    """The spec of ``arch``'s zoo on ``dataset`` (its fields checked as it is built), Θ's and the
    features' settings for ``arch``, and protocol splits that the zoo's tasks × runs allow (before
    the zoo is trained)."""
    spec = section.spec(arch=arch, dataset=dataset, **(overrides or {}))
    try:
        section.projection_for(arch)
        section.features_for(arch)
        tasks = torch.tensor(spec.tasks).repeat_interleave(spec.runs)  # the zoo's order: task-major
        runs = torch.arange(spec.runs).repeat(len(spec.tasks))
        classification_split(tasks, runs, section.split)
        retrieval_split(tasks, runs, section.split)
    except (TypeError, ValueError) as e:
        raise ValueError(f"profile {section.profile!r}, section {section.name!r}: {e}") from None


#: modules (and the package ``bench/``) that only present results (pages, figures, benchmarks, command
#: lines): not in :func:`code_hash`
PRESENTATION_MODULES = ("bench/", "book.py", "cli.py", "fidelity.py", "paper.py", "plots.py", "provenance.py",
                        "report.py")


def code_hash() -> str:
    """SHA-256 of the library's source that computes results (every ``ffl/**/*.py`` but
    :data:`PRESENTATION_MODULES`): a cached result made by other code is recomputed, whatever
    ``ffl.__version__`` says."""
    package = Path(ffl.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if not rel.startswith(PRESENTATION_MODULES):  # a module by its name, the package by its folder
            h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


RESULT_KEY = ("feature", "index", "protocol", "metric")


def write_results(path: Path, results: pd.DataFrame, made_by: dict[str, Any]) -> None:
    """The table as CSV, then a sidecar ``<name>.json`` with its SHA-256 and ``made_by`` (the
    settings and :func:`code_hash`); both atomic, the sidecar last (it vouches for the table)."""
    data = results.to_csv(index=False).encode()
    write_bytes_atomic(path, data)
    write_json_atomic(path.with_suffix(".json"), {"sha256": hashlib.sha256(data).hexdigest(), "rows": len(results),
                                                  "made_by": made_by})


def read_results(path: Path, made_by: dict[str, Any], *, kinds: tuple[str, ...] | None = FEATURE_KINDS,
                 key: tuple[str, ...] = RESULT_KEY) -> pd.DataFrame | None:
    """The cached table at ``path`` if its sidecar vouches for it (same SHA-256, same settings and
    code, every value finite) and it has the shape of a results table (:func:`table_gaps`; ``kinds``:
    the features every table of this kind has; ``key``: the columns naming a row); else ``None``
    (with a warning saying why), so it is recomputed."""
    side = path.with_suffix(".json")
    if not path.is_file() and not side.is_file():
        return None
    why = None
    try:
        record = json.loads(side.read_text())
        data = path.read_bytes()
        if not isinstance(record, dict):
            why = f"its sidecar {side.name} is not a JSON object"
        elif record.get("made_by") != json.loads(json.dumps(made_by, default=str)):
            why = "it was made by other settings or other library code"
        elif hashlib.sha256(data).hexdigest() != record.get("sha256"):
            why = "its SHA-256 differs from its sidecar's (truncated or edited)"
        else:
            results = pd.read_csv(io.BytesIO(data))
            if len(results) != record.get("rows") or not results["value"].map(math.isfinite).all():
                why = "it has missing or non-finite values"
            else:
                why = table_gaps(results, kinds, key)
                if why is None:
                    return results
    except (OSError, ValueError, KeyError, TypeError, pd.errors.ParserError) as e:
        why = f"it or its sidecar {side.name} cannot be read ({type(e).__name__}: {e})"
    warnings.warn(f"cached results {path} not used: {why}; recomputing", stacklevel=2)
    return None


def table_gaps(results: pd.DataFrame, kinds: tuple[str, ...] | None = FEATURE_KINDS,
               key: tuple[str, ...] = RESULT_KEY) -> str | None:
    """What keeps ``results`` from being a whole results table, or ``None``: each row's ``key``
    once; within each group of the key's other columns (a feature, a Θ setting, a method), every
    index has the same (protocol, metric) rows; with ``kinds``, each of those features is there at
    indices 1, 2, … without a gap."""
    if missing := sorted({*key, "value"} - set(results.columns)):
        return f"it lacks the columns {missing}"
    if results[list(key)].duplicated().any():
        return "it repeats rows"
    groups = [c for c in key if c not in ("index", "protocol", "metric")]
    measures = results.groupby(groups + ["index"], dropna=False).apply(
        lambda g: frozenset(zip(g.protocol, g.metric)), include_groups=False)
    if (measures.groupby(level=list(range(len(groups))), dropna=False).nunique() > 1).any():
        return "some indices lack measures the others have (rows dropped)"
    if kinds is not None:
        indices = {kind: sorted(results.loc[results.feature == kind, "index"].unique()) for kind in kinds}
        if any(not found or found != list(range(1, len(found) + 1)) for found in indices.values()):
            return f"its indices per feature are not 1, 2, … ({indices}; rows dropped)"
    return None


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
        zoo.verify()  # every shard's SHA-256 now, in parallel, rather than one by one as first read
        stream = stream or StreamConfig()
        source = ZooFeatures(zoo, features, device=stream.device, chunk_bytes=stream.slab_bytes)
        jobs = [(kind, index) for kind in FEATURE_KINDS for index in source.indices(kind)]
        with tqdm(desc="kernels (block pairs)", disable=not progress) as bar:
            kernels = source.kernels(jobs, stream, stats=stats, progress=lambda _: bar.update())

        reps = ((*job, lambda job=job: Representation.of_kernel(kernels.pop(job), source.shapes[job])) for job in jobs)
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
    section: Section | None = None  # the profile section it ran from
    split: ProtocolSplit = dataclasses.field(default_factory=ProtocolSplit)
    features: FeatureConfig = dataclasses.field(default_factory=FeatureConfig)
    seconds: dict[str, float | str] = dataclasses.field(default_factory=dict)


def run_experiment(
    section: Section | str,
    *,
    arch: str,
    dataset: str,
    profile: str | None = None,
    data_root: str | None = None,
    download: bool = False,
    seed: int = 0,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    zoo_overrides: dict[str, Any] | None = None,
) -> Experiment:
    """Train or load the zoo of a paper section and evaluate it (cached). ``section``: as
    :func:`check_choices` returned it for ``arch`` and ``dataset`` (not checked again), or the
    section's name with ``profile``'s (checked here). ``zoo_overrides`` replace fields of the
    profile's zoo spec (a setting of §4.4)."""
    if not isinstance(section, Section):
        section = check_choices(arch=arch, dataset=dataset, profile=profile, section=section)
    params = check_parameters(seed=seed, device=device, download=download, data_root=data_root)
    seed, device, download, data_root = params["seed"], params["device"], params["download"], params["data_root"]
    spec = section.spec(arch=arch, dataset=dataset, data_root=data_root, download=download, seed=seed,
                        **(zoo_overrides or {}))
    projection = section.projection_for(arch, seed=seed)
    split = section.split_for(seed)
    features = section.features_for(arch)

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    for folder in (cache, cache / "zoos", cache / "results"):  # not a file: found now, not after training
        as_folder("cache folder", folder)
    spec_dict = spec.identity()
    zoo_root = cached_zoo_root(spec, cache)
    seconds: dict[str, float | str] = {}
    start = time.perf_counter()
    zoo_was_cached = (zoo_root / "manifest.json").is_file()  # complete zoos only have one
    # how the zoo trains on a GPU (chunk size, kernels): the profile's zoo.cuda settings
    engine = section.cuda_engine(arch) if torch.device(device).type == "cuda" else {}
    zoo = train_zoo(spec, zoo_root, device=device, progress=progress, **engine)
    seconds["zoo"] = "cached" if zoo_was_cached else round(time.perf_counter() - start, 1)

    made_by = {"zoo": spec_dict, "zoo_weights": zoo.weights_sha256, "projection": dataclasses.asdict(projection),
               "split": dataclasses.asdict(split), "features": dataclasses.asdict(features),
               "code": code_hash()}
    result_file = cache / "results" / f"{section.name}-{arch}-{dataset}-{_key(made_by)}.csv"
    clean_stale_temp(result_file.parent)
    results = read_results(result_file, made_by)
    if results is not None:
        seconds["features and protocols"] = "cached"
    else:
        start = time.perf_counter()
        results = evaluate_zoo(zoo, projection, split, features=features, progress=progress,
                               stream=StreamConfig.for_device(device))
        seconds["features and protocols"] = round(time.perf_counter() - start, 1)
        write_results(result_file, results, made_by)
    return Experiment(zoo=zoo, results=results, section=section, split=split, features=features,
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
    section: Section  # the profile's factors section
    seconds: dict[str, float | str] = dataclasses.field(default_factory=dict)


def factor_settings(section: Section | str) -> dict[str, dict[str, Any]]:
    """The settings of a profile's ``factors`` section (the section, or the profile's name), baseline
    first: name -> ``{arch, overrides}`` where ``overrides`` replace fields of that architecture's
    zoo spec (``model_kwargs`` are merged into the architecture's)."""
    if not isinstance(section, Section):
        section = load(section).section("factors")
    named = section.extra.get("settings") or {}
    if BASELINE not in named:
        raise ValueError(f"profile {section.profile!r}: the factors section needs a {BASELINE!r} setting")
    out = {}
    for name in [BASELINE, *(n for n in named if n != BASELINE)]:
        overrides = copy.deepcopy(dict(named[name]))
        arch = overrides.pop("arch")
        if "model_kwargs" in overrides:
            base = section.zoo.arch.get(arch, {}).get("model_kwargs", {}) if section.zoo else {}
            overrides["model_kwargs"] = {**copy.deepcopy(base), **overrides["model_kwargs"]}
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
    return exp.section.projection_for(exp.zoo.spec.arch, seed=exp.split.seed)


def run_factors(
    section: Section | str,
    *,
    dataset: str,
    data_root: str | None = None,
    download: bool = False,
    seed: int = 0,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> FactorsExperiment:
    """§4.4: every setting's zoo and protocols (Figure 4), then Θ of the baseline read on every
    other setting (Figure 5); each step cached. ``section``: the ``factors`` section as
    :func:`check_factors` returned it for ``dataset`` (not checked again), or a profile's name
    (checked here)."""
    if not isinstance(section, Section):
        section = check_factors(profile=section, dataset=dataset)
    named = factor_settings(section)
    experiments = {
        name: run_experiment(section, arch=spec["arch"], dataset=dataset, data_root=data_root, download=download,
                             seed=seed, device=device, cache_dir=cache_dir, progress=progress,
                             zoo_overrides=spec["overrides"])
        for name, spec in named.items()
    }
    base = experiments[BASELINE]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    frames, seconds = [], {}
    for name, exp in experiments.items():
        if name == BASELINE:
            continue
        made_by = {"source": base.zoo.spec.identity(), "target": exp.zoo.spec.identity(),
                   "weights": [base.zoo.weights_sha256, exp.zoo.weights_sha256],
                   "projection": dataclasses.asdict(_projection(base)), "split": dataclasses.asdict(base.split),
                   "features": dataclasses.asdict(base.features), "code": code_hash()}
        path = cache / "results" / f"factors-cross-{dataset}-{_key(made_by)}.csv"
        frame = read_results(path, made_by, kinds=None)  # indices where the two zoos' features differ are left out
        if frame is not None:
            seconds[f"cross-condition {name}"] = "cached"
        else:
            start = time.perf_counter()
            frame = cross_condition_results(base, exp, progress=progress)
            seconds[f"cross-condition {name}"] = round(time.perf_counter() - start, 1)
            write_results(path, frame, made_by)
        frames.append(frame.assign(setting=name))
    cross = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return FactorsExperiment(experiments=experiments, cross=cross, section=section, seconds=seconds)
