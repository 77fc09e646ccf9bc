"""Why narrow CNN zoos fall short of the paper, measured: one thing varied at a time.

The study behind the chapter *Why narrow CNNs fall short*. A grid of zoo settings (training length,
learning rate, width, weight decay: overrides of a profile's zoo) × Θ settings (§3.3's learning
rate, epochs, feature scaling, a centred kernel) is evaluated with the paper's two protocols (§4) on
the chain and layer features at indices 1 … ``max_index``, beside three diagnostics of each zoo:

* **drift**: ‖W − W₀‖ / ‖W₀‖ per layer, with W₀ rebuilt from the network's initialization seed
  (:func:`ffl.zoo.run_seed`): how far training moved the weights from their random start;
* **Gram cosines**: the mean cosine between chain Grams of two runs of one task and of two tasks
  (raw, and after subtracting the zoo's mean Gram): how much of a Gram is shared by every network;
* **Θ's fit**: its top-1 and cross-entropy on the networks it was learned from.

Kernels (the N × N feature inner products) are computed once per zoo and cached beside the results,
so Θ settings cost seconds. Everything is keyed by the zoo's weights and the library's source.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from ffl.experiment import RESULT_KEY, check_choices, code_hash, protocol_rows, read_results, write_results
from ffl.features import FeatureConfig, ProjectionConfig, Representation
from ffl.files import write_bytes_atomic
from ffl.kernels import StreamConfig, ZooFeatures
from ffl.models import build_model
from ffl.profile_settings import load
from ffl.protocols import classification_predictions, classification_split, retrieval_split
from ffl.report import data_note
from ffl.report import steps_per_network as report_steps
from ffl.data import load_task, task_classes
from ffl.zoo import Zoo, cached_zoo_root, default_cache_dir, read_provenance, train_zoo

FEATURE_KINDS = ("chain", "layer")


def _key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """A profile's ``cnn_gap`` section: the zoo section and architecture the grid starts from, the
    zoo settings (name → overrides of that section's zoo spec), the Θ settings (name → overrides of
    its projection), the indices, and the chapter's figure axes."""

    section: str
    arch: str
    dataset: str
    zoos: dict[str, dict[str, Any]]
    thetas: dict[str, dict[str, Any]]
    reference_theta: str
    adopted_theta: str
    max_index: int = 3
    features: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    feature_zoo: str | None = None
    throughput: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_profile(cls, profile: str) -> "StudySettings":
        raw = load(profile).settings.get("cnn_gap")
        if not raw:
            raise ValueError(f"profile {profile!r} has no cnn_gap section (the study's grid)")
        study = cls(section=raw["section"], arch=raw["arch"], dataset=raw["dataset"],
                    zoos={k: dict(v or {}) for k, v in raw["zoos"].items()},
                    thetas={k: dict(v or {}) for k, v in raw["thetas"].items()},
                    reference_theta=raw["reference_theta"], adopted_theta=raw["adopted_theta"],
                    max_index=int(raw.get("max_index", 3)),
                    features={k: dict(v or {}) for k, v in (raw.get("features") or {}).items()},
                    feature_zoo=raw.get("feature_zoo"), throughput=dict(raw.get("throughput") or {}))
        if study.features and study.feature_zoo not in study.zoos:
            raise ValueError(f"profiles/{profile}.yaml: cnn_gap.feature_zoo: {study.feature_zoo!r} is not one of "
                             f"its zoos {sorted(study.zoos)}")
        for key in ("reference_theta", "adopted_theta"):
            if getattr(study, key) not in study.thetas:
                raise ValueError(f"profiles/{profile}.yaml: cnn_gap.{key}: {getattr(study, key)!r} is not one of "
                                 f"its thetas {sorted(study.thetas)}")
        return study


def initial_model(zoo: Zoo, i: int) -> torch.nn.Module:
    """Network ``i`` of ``zoo`` as it was before training: built right after seeding with its
    initialization seed, as the engine builds it (:func:`ffl.engine.init_stacked`)."""
    net = zoo.manifest["networks"][i]
    torch.manual_seed(int(net["seed"]))  # run_seed(spec.seed, task, run), recorded at training
    return build_model(zoo.spec.arch, net["num_classes"], **zoo.manifest["build_kwargs"])


def drift(zoo: Zoo, indices: list[int] | None = None) -> pd.DataFrame:
    """‖W − W₀‖ / ‖W₀‖ per network and weight layer (convolution and linear weights, in order)."""
    rows = []
    for i in range(len(zoo)) if indices is None else indices:
        trained, start = zoo.state_dict(i), initial_model(zoo, i).state_dict()
        layers = [k for k, v in start.items() if k.endswith("weight") and v.dim() >= 2]
        for layer, key in enumerate(layers, 1):
            w0 = start[key].double()
            rows.append({"network": i, "layer": layer,
                         "drift": float((trained[key].double() - w0).norm() / w0.norm())})
    return pd.DataFrame(rows)


def gram_cosines(rep: Representation, tasks: torch.Tensor) -> dict[str, float]:
    """Mean cosine of two networks' features, same task (distinct runs) and different tasks, raw
    and after subtracting the mean feature of all networks (centred)."""
    k = rep.kernel(torch.arange(len(rep)), torch.arange(len(rep)))
    same = tasks[:, None] == tasks[None, :]
    off = ~torch.eye(len(rep), dtype=torch.bool)
    kc = k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()
    norms = kc.diagonal().clamp_min(1e-300).sqrt()
    kc = kc / norms[:, None] / norms[None, :]
    return {"cos_within": float(k[same & off].mean()), "cos_between": float(k[~same].mean()),
            "centred_cos_within": float(kc[same & off].mean()), "centred_cos_between": float(kc[~same].mean())}


def zoo_kernels(zoo: Zoo, features: FeatureConfig, cache: Path, *, progress: bool = True) -> dict[tuple[str, int], Representation]:
    """Every (kind, index) kernel of ``zoo`` up to ``features.max_index``, cached under ``cache``
    (keyed by the zoo's weights and the feature settings)."""
    path = cache / "kernels" / f"{_key({'zoo': zoo.weights_sha256, 'features': dataclasses.asdict(features)})}.pt"
    if path.is_file():
        stored = torch.load(path, weights_only=True)
    else:
        zoo.verify()
        source = ZooFeatures(zoo, features)
        jobs = [(kind, index) for kind in FEATURE_KINDS for index in source.indices(kind)]
        with tqdm(desc="kernels (block pairs)", disable=not progress) as bar:
            kernels = source.kernels(jobs, StreamConfig.for_device("cpu"), progress=lambda _: bar.update())
        stored = {f"{kind}:{index}": {"inner": kernels[(kind, index)], "shape": torch.tensor(source.shapes[(kind, index)])}
                  for kind, index in jobs}
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(stored, buffer)
        write_bytes_atomic(path, buffer.getvalue())
    out = {}
    for name, entry in stored.items():
        kind, index = name.split(":")
        out[(kind, int(index))] = Representation.of_kernel(entry["inner"], tuple(entry["shape"].tolist()))
    return out


def _zoo_rows(zoo: Zoo, reps: dict[tuple[str, int], Representation]) -> dict[str, Any]:
    """What a zoo row of the study reports besides its protocols."""
    d = drift(zoo)
    out = {"networks": len(zoo), "test_accuracy": float(zoo.accuracy["test"].mean()),
           "train_accuracy": float(zoo.accuracy["train"].mean())}
    for layer, value in d.groupby("layer")["drift"].median().items():
        out[f"drift_{layer}"] = float(value)
    for (kind, index), rep in reps.items():
        if kind == "chain":
            for name, value in gram_cosines(rep, zoo.tasks).items():
                out[f"{name}_{index}"] = value
    return out


def run_study(profile: str, *, seed: int = 0, data_root: str | None = None, cache_dir: str | Path | None = None,
              progress: bool = True, only_zoos: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train (or load) every zoo of the grid and evaluate every Θ setting on it.

    Returns ``(protocols, zoos)``: a long table (zoo, theta, feature, index, protocol, metric,
    value) and one row per zoo (its size, accuracy, drift, Gram cosines, training seconds)."""
    study = StudySettings.from_profile(profile)
    section = check_choices(arch=study.arch, dataset=study.dataset, profile=profile, section=study.section)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    features = dataclasses.replace(section.features_for(study.arch), max_index=study.max_index)
    split = section.split_for(seed)
    base_theta = dataclasses.asdict(section.projection_for(study.arch, seed=seed))
    protocol_frames, zoo_rows = [], []
    for zoo_name, overrides in study.zoos.items():
        if only_zoos is not None and zoo_name not in only_zoos:
            continue
        spec = section.spec(arch=study.arch, dataset=study.dataset, seed=seed, data_root=data_root, **overrides)
        root = cached_zoo_root(spec, cache)
        zoo = train_zoo(spec, root, progress=progress)
        seconds = _training_seconds(root)
        reps = zoo_kernels(zoo, features, cache, progress=progress)
        made_by = {"zoo": spec.identity(), "zoo_weights": zoo.weights_sha256, "features": dataclasses.asdict(features),
                   "split": dataclasses.asdict(split), "thetas": study.thetas, "base_theta": base_theta,
                   "code": code_hash()}
        result_file = cache / "results" / f"cnn_gap-{zoo_name}-{_key(made_by)}.csv"
        frame = read_results(result_file, made_by, key=("theta", *RESULT_KEY))
        if frame is None:
            rows = []
            for theta_name, theta in tqdm(study.thetas.items(), desc=f"Θ settings ({zoo_name})", disable=not progress):
                cfg = ProjectionConfig.from_dict({**base_theta, **theta})
                for (kind, index), rep in reps.items():
                    t0 = time.perf_counter()
                    rows += _protocol_rows(rep, zoo, cfg, split, theta=theta_name, feature=kind, index=index)
                    rows.append({"theta": theta_name, "feature": kind, "index": index, "protocol": "both",
                                 "metric": "seconds", "value": time.perf_counter() - t0})
            frame = pd.DataFrame(rows)
            extra = _zoo_rows(zoo, reps)
            frame = pd.concat([frame, pd.DataFrame([{"theta": "", "feature": "zoo", "index": 0, "protocol": "",
                                                     "metric": k, "value": v} for k, v in extra.items()])])
            write_results(result_file, frame, made_by)
        zoo_info = frame[frame.feature == "zoo"].set_index("metric")["value"].to_dict()
        zoo_rows.append({"zoo": zoo_name, **overrides_label(overrides), **zoo_info, "zoo_seconds": seconds,
                         "runs": spec.runs,
                         "theta_runs": len(classification_split(zoo.tasks, zoo.runs, split)[0]) / len(spec.tasks),
                         "widths": "–".join(str(w) for w in spec.model_kwargs.get("widths", [])),
                         "steps": steps_per_network(zoo)})
        protocol_frames.append(frame[frame.feature != "zoo"].assign(zoo=zoo_name))
    return pd.concat(protocol_frames, ignore_index=True), pd.DataFrame(zoo_rows)


def run_feature_variants(profile: str, *, seed: int = 0, data_root: str | None = None,
                         cache_dir: str | Path | None = None, progress: bool = True) -> pd.DataFrame:
    """The BatchNorm treatment of the features, one variant at a time (``cnn_gap.features``: name →
    :class:`FeatureConfig` overrides of the section's features), on the zoo ``cnn_gap.feature_zoo``
    with the adopted Θ: raw kernels (the official code's), BatchNorm folded into them, or every
    output channel's kernel at unit norm. A long table (variant, feature, index, protocol, metric,
    value); empty when the profile names no variants. The zoo must be trained (:func:`run_study`)."""
    study = StudySettings.from_profile(profile)
    if not study.features:
        return pd.DataFrame(columns=["variant", "feature", "index", "protocol", "metric", "value"])
    section = check_choices(arch=study.arch, dataset=study.dataset, profile=profile, section=study.section)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base = dataclasses.asdict(dataclasses.replace(section.features_for(study.arch), max_index=study.max_index))
    split = section.split_for(seed)
    theta = ProjectionConfig.from_dict({**dataclasses.asdict(section.projection_for(study.arch, seed=seed)),
                                        **study.thetas[study.adopted_theta]})
    spec = section.spec(arch=study.arch, dataset=study.dataset, seed=seed, data_root=data_root,
                        **study.zoos[study.feature_zoo])
    zoo = Zoo.load(cached_zoo_root(spec, cache))  # names the folder when the study has not trained it
    rows = []
    for name, overrides in tqdm(study.features.items(), desc="feature variants", disable=not progress):
        features = FeatureConfig.from_dict({**base, **overrides})
        for (kind, index), rep in zoo_kernels(zoo, features, cache, progress=progress).items():
            rows += _protocol_rows(rep, zoo, theta, split, variant=name, feature=kind, index=index)
    return pd.DataFrame(rows)


def cpu_throughput(profile: str) -> pd.DataFrame:
    """What this CPU's batched engine does with a PlainNet-5 of each of the profile's
    ``cnn_gap.throughput.widths``, measured in one run (:func:`ffl.bench.engine.chunk_sweep`, in the
    chunk size :func:`ffl.zoo.default_batch_networks` trains a zoo of 64 or more networks in):
    milliseconds per network-step
    (batches of ``batch``), the convolutions' GFLOP/s and their fraction of a 1024³ GEMM's."""
    from ffl.bench.engine import chunk_sweep
    from ffl.zoo import default_batch_networks

    study = StudySettings.from_profile(profile)
    settings = study.throughput
    if not settings.get("widths"):
        raise ValueError(f"profiles/{profile}.yaml: cnn_gap.throughput.widths names no widths to measure")
    section = load(profile).section(study.section)
    rows = []
    for widths in settings["widths"]:
        spec = section.spec(arch=study.arch, dataset="synthetic", runs=64, model_kwargs={"widths": list(widths)})
        chunk = default_batch_networks(spec, "cpu")
        (row,) = chunk_sweep(list(widths), (chunk,), batch=int(settings.get("batch", 16)),
                             steps=int(settings.get("steps", 8)), repeat=int(settings.get("repeat", 2)))
        rows.append({"widths": "–".join(map(str, widths)), "chunk": chunk, "ms per network-step": row["ms_per_network_step"],
                     "conv GFLOP/s": row["model_gflops"], "GEMM GFLOP/s": row["gemm_gflops"],
                     "fraction of GEMM": row["fraction_of_gemm"]})
    return pd.DataFrame(rows)


def shared_class_tasks(dataset: str, tasks: list[int]) -> dict[int, set[int]]:
    """For each of ``tasks``, the others that share a class with it (none for the paper's splits,
    whose tasks are disjoint; CIFAR-10's 45 class pairs overlap)."""
    classes = {t: set(task_classes(dataset, t)) for t in tasks}
    return {t: {u for u in tasks if u != t and classes[t] & classes[u]} for t in tasks}


def overlap_errors(exp, *, indices: tuple[int, ...] = (1, 2, 3), cache_dir: str | Path | None = None) -> pd.DataFrame:
    """Where the aligned chains' classification errors land when a zoo's tasks share classes: per
    chain index, the networks classified, the errors, how many of them went to a task sharing a
    class with the true one, and the share a wrong task chosen at random would have (the mean, over
    the errors' true tasks, of the fraction of other tasks sharing a class). Θ and the split are
    the experiment's; its top-1 is recomputed and must match the results table."""
    zoo = exp.zoo
    sharing = shared_class_tasks(zoo.spec.dataset, list(zoo.spec.tasks))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    reps = zoo_kernels(zoo, dataclasses.replace(exp.features, max_index=max(indices)), cache, progress=False)
    projection = exp.section.projection_for(zoo.spec.arch, seed=exp.split.seed)
    chain_top1 = exp.results.query("feature == 'chain' and protocol == 'classification' and metric == 'top1'")
    rows = []
    for index in indices:
        true, predicted = classification_predictions(reps[("chain", index)], zoo.tasks, zoo.runs, projection, exp.split)
        top1 = float((true == predicted).float().mean())
        reported = chain_top1.loc[chain_top1["index"] == index, "value"]
        if len(reported) != 1 or abs(float(reported.iloc[0]) - top1) > 1e-6:
            raise RuntimeError(f"chain {index}: the classification redone here scores {top1:.4f}, the results table "
                               f"{reported.tolist()}: the two differ, so where its errors land cannot be read from it")
        rows.append({"index": index, "classified": len(true), "top1": top1, **error_landing(true, predicted, sharing)})
    return pd.DataFrame(rows).set_index("index")


def error_landing(true: torch.Tensor, predicted: torch.Tensor, sharing: dict[int, set[int]]) -> dict[str, Any]:
    """Of the networks assigned a wrong task, how many got one sharing a class with theirs
    (``sharing``: :func:`shared_class_tasks`), and the share a wrong task drawn at random would have."""
    wrong = [(int(t), int(p)) for t, p in zip(true.tolist(), predicted.tolist()) if t != p]
    to_shared = sum(p in sharing[t] for t, p in wrong)
    at_random = sum(len(sharing[t]) / (len(sharing) - 1) for t, _ in wrong) / len(wrong) if wrong else float("nan")
    return {"errors": len(wrong), "to a task sharing a class": to_shared,
            "share": to_shared / len(wrong) if wrong else float("nan"), "share at random": at_random}


def _protocol_rows(rep: Representation, zoo: Zoo, cfg: ProjectionConfig, split, **labels: Any) -> list[dict[str, Any]]:
    """:func:`ffl.experiment.protocol_rows` (both protocols of §4 on one representation), each row
    carrying ``labels`` (its Θ setting or feature variant, feature and index)."""
    kind, index = labels.pop("feature"), labels.pop("index")
    return [{**labels, **row} for row in protocol_rows(rep, kind, index, zoo, cfg, split)]


def _training_seconds(root: Path) -> float:
    """The zoo's training time as its provenance recorded it (NaN for a zoo without one)."""
    return float((read_provenance(root) or {}).get("seconds", float("nan")))


def protocol_sizes(profile: str, *, seed: int = 0, data_root: str | None = None) -> dict[str, Any]:
    """What stands behind each of the study's percentages: its first zoo's tasks and runs, the
    networks classified, the retrieval queries and unseen tasks, the data (a
    :func:`ffl.report.data_note`), and the same as a Markdown run table."""
    study = StudySettings.from_profile(profile)
    section = check_choices(arch=study.arch, dataset=study.dataset, profile=profile, section=study.section)
    spec = section.spec(arch=study.arch, dataset=study.dataset, seed=seed, data_root=data_root,
                        **next(iter(study.zoos.values())))
    tasks = torch.tensor(spec.tasks).repeat_interleave(spec.runs)
    runs = torch.arange(spec.runs).repeat(len(spec.tasks))
    split = section.split_for(seed)
    _, classified = classification_split(tasks, runs, split)
    _, queries, gallery = retrieval_split(tasks, runs, split)
    data = data_note(spec, data_root=data_root, stands_for=study.section)
    widths = "–".join(str(w) for w in spec.model_kwargs.get("widths", [])) or "the defaults"
    out = {"tasks": len(spec.tasks), "runs": spec.runs, "classified": len(classified), "queries": len(queries),
           "unseen": int(tasks[queries].unique().numel()), "data": data, "widths": widths}
    theta = section.projection_for(study.arch)
    out["table"] = "\n".join([
        "| | |", "|---|---|",
        f"| zoos | {study.arch} on {study.dataset}, {out['tasks']} tasks × {out['runs']} runs each; "
        f"{len(study.zoos)} settings: {', '.join(study.zoos)} |",
        f"| Θ | {len(study.thetas)} settings over the profile's (SGD, batch {theta.batch_size}, lr {theta.lr}, "
        f"momentum {theta.momentum}, {theta.epochs} epochs): {', '.join(study.thetas)} |",
        f"| classification | {len(classified)} held-out networks into {out['tasks']} tasks |",
        f"| retrieval | {len(queries)} queries, {len(gallery)} gallery networks of {out['unseen']} unseen tasks |",
        f"| data | {data} |"])
    return out


def stage_note(zoos: pd.DataFrame) -> str:
    """The zoos' training times (Markdown): what the study costs from scratch on this machine."""
    total = float(zoos["zoo_seconds"].sum())
    return (f"Training the study's {len(zoos)} zoos took {total / 60:,.1f} minutes in all, as their provenance "
            "records (the kernels and protocols add a minute or two per zoo; a re-run reads every stage from "
            "the cache).")


def overrides_label(overrides: dict[str, Any]) -> dict[str, str]:
    """A zoo setting's overrides as one readable string."""
    return {"changes": ", ".join(f"{k} {v}" for k, v in overrides.items()) or "as the profile"}


def steps_per_network(zoo: Zoo) -> int:
    """SGD steps each network of ``zoo`` took (:func:`ffl.report.steps_per_network` on its first task)."""
    spec = zoo.spec
    first = load_task(spec.dataset, spec.tasks[0], data_root=spec.data_root, **spec.data_kwargs)
    return report_steps(spec, len(first.x_train))
