"""A zoo: T tasks × R runs of one architecture, trained, saved and loaded (§4).

The paper trains 100 runs of each network on each of 50 tasks. :func:`train_zoo` trains such a
zoo with the batched engine (:mod:`ffl.engine`), stores it in one directory and loads it back:

``root/``
    ``spec.json``      the :class:`ZooSpec` and the engine chunking (written once the data has loaded)
    ``shards/*.safetensors`` + ``shards/*.json``
                       one shard per (task, block of runs): the stacked ``state_dict`` tensors
                       (leading dim = runs in the block) and a sidecar with each network's task,
                       run, seeds, final train/test accuracy and the shard's sha256
    ``manifest.json``  written last, when every shard exists: spec, library version, networks,
                       shards (file, bytes, sha256)
    ``provenance.json`` device, hardware and wall time of the run(s) (not part of the zoo bytes)

Loading never unpickles (safetensors + JSON). Every file is written atomically (temporary file +
``os.replace``; staging folders a killed run left are removed at the next start). A killed run
resumes at the first unfinished chunk and ends with the same bytes as an uninterrupted run with
the same chunking (on CPU). A truncated or tampered shard raises an error naming the file.

Identity: ``spec.json``, every shard's sidecar and the manifest record the spec's hash
(:func:`spec_sha256`), so shards of another spec are never adopted (not even with ``spec.json``
lost), and every load checks the manifest's networks (count, order, task, run, seeds, shard, row)
against its spec. Every shard also records the SHA-256 of its task's data (:meth:`TaskData.sha256`):
reading a finished zoo, or resuming one, on data that hashes otherwise (another copy of the dataset,
changed files) raises :class:`StaleDataError`. A chunk with a diverged network (NaN/inf weights)
is not saved: :class:`TrainingDivergedError` names the networks, and the zoo stays incomplete.

Seeds: network (task t, run r) is initialized from ``run_seed(spec.seed, t, r)`` and draws its
minibatch order/augmentation from ``data_seed(spec.seed, t, r)``; both are SHA-256 derived, so
they differ across runs and tasks and do not depend on how the zoo is chunked or sharded.

Scale-out: ``train_zoo(..., shard=(rank, world))`` trains only chunks ``c % world == rank``
(``python -m ffl.zoo train`` under ``torchrun`` does this and merges on rank 0);
:func:`merge_zoos` combines zoos trained in separate directories.

Specs: :func:`spec_from_profile` builds one from a profile section (the paper's settings are the
``paper`` profile). Command line: ``python -m ffl.zoo train|spec|merge|info`` (``--help``).
"""
from __future__ import annotations

import copy
import dataclasses
import errno
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn
from tqdm import tqdm

from ffl import __version__
from ffl import batched, implicit_conv
from ffl.cli import Command, run_command_line
from ffl.checks import as_bool, as_data_root, as_device, as_float, as_folder, as_int, as_seed, env_folder
from ffl.data import DATASETS, TaskData, check_data_kwargs, load_task, num_tasks
from ffl.data.tasks import check_dataset, check_task
from ffl.engine import (NetworkData, PendingInit, TrainConfig, check_precision, init_stacked, probe_capacity,
                        start_init_stacked, train_batched, tune_malloc)
from ffl.files import (atomic_path, clean_stale_temp, folder_lock, free_bytes, sha256_file, write_bytes_atomic,
                       write_json_atomic)
from ffl.models import ARCHS, CONV_ARCHS, PLAIN_CONV_ARCHS, build_model
from ffl.profiles import CUDA_ENGINE, PROFILE_DIR, load_profile
from ffl.provenance import hardware
from ffl.seeds import derive_seed
from ffl.triton_support import BACKENDS, available, runs_on, triton

FORMAT = "ffl-zoo"
FORMAT_VERSION = 1
#: spec fields that do not change the zoo (where the data lives, whether to download it)
NON_IDENTITY_FIELDS = ("data_root", "download")
#: identity fields added after format 1, with the value their absence means
LATER_FIELDS = {"precision": "fp32", "crop_padding": 4, "sampling": "epochs"}


# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


@dataclass
class ZooSpec(TrainConfig):
    """Everything that determines a zoo (§4): each network's training (the fields of
    :class:`ffl.engine.TrainConfig`: optimizer, lr schedule, batch, epochs or ``steps``,
    augmentation, precision) plus what makes it a zoo: architecture, data, tasks × runs, seed.

    ``steps``/``lr_step_steps``: step-based training (NameData: 10,000 steps, lr/10 at 7,000);
    when ``steps`` is None training is epoch-based (``epochs``, ``lr_step_epochs``).
    """

    arch: str = "mlp"
    dataset: str = "synthetic"
    tasks: list[int] = field(default_factory=lambda: [0, 1])
    runs: int = 2
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    data_root: str | None = None
    download: bool = False
    data_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_training_fields()
        super().__post_init__()
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {list(ARCHS)}")
        check_dataset(self.dataset)
        if isinstance(self.tasks, int):
            self.tasks = list(range(self.tasks))
        if not isinstance(self.tasks, (list, tuple)):
            raise ValueError(f"tasks must be a count or a list of task indices, got {self.tasks!r}")
        self.tasks = [as_int("task", t, minimum=0) for t in self.tasks]
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct, got {self.tasks}")
        self.runs = as_int("runs", self.runs, minimum=1)
        if not self.tasks:
            raise ValueError("a zoo needs at least one task and one run")
        self.seed = as_seed(self.seed)
        self.download = as_bool("download", self.download)
        self.data_root = as_data_root(self.data_root)
        if not isinstance(self.model_kwargs, dict) or not isinstance(self.data_kwargs, dict):
            raise ValueError("model_kwargs and data_kwargs must be mappings")
        n_tasks = self.data_kwargs.get("n_tasks") if self.dataset == "synthetic" else None
        for t in self.tasks:
            check_task(self.dataset, t, n_tasks)
        self.model_kwargs = _jsonable(dict(self.model_kwargs))
        _check_model_kwargs(self.arch, self.model_kwargs)
        self.data_kwargs = _jsonable(dict(self.data_kwargs))
        try:
            check_data_kwargs(self.dataset, self.data_kwargs)
        except TypeError as e:
            raise ValueError(str(e)) from None

    def _check_training_fields(self) -> None:
        """Type and range of every training field (text that spells a number becomes one: PyYAML
        reads ``1e-4`` as a string)."""
        self.lr = as_float("lr", self.lr, positive=True)
        self.momentum = as_float("momentum", self.momentum, minimum=0.0, below=1.0)
        self.weight_decay = as_float("weight_decay", self.weight_decay, minimum=0.0)
        self.lr_gamma = as_float("lr_gamma", self.lr_gamma, positive=True)
        self.batch_size = as_int("batch_size", self.batch_size, minimum=1)
        self.steps = None if self.steps is None else as_int("steps", self.steps, minimum=1)
        self.epochs = as_int("epochs", self.epochs, minimum=1 if self.steps is None else 0)
        self.crop_padding = as_int("crop_padding", self.crop_padding, minimum=0)
        self.augment = as_bool("augment", self.augment)
        for name in ("lr_step_epochs", "lr_step_steps"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{name} must be a list of milestones, got {value!r}")
            setattr(self, name, [as_int(f"{name} entry", e, minimum=0) for e in value])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZooSpec:
        """Build from a mapping (e.g. a profile section); unknown keys → ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ZooSpec fields {unknown}; valid fields: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    def identity(self) -> dict[str, Any]:
        """The fields that determine the zoo's bytes (all but ``data_root``/``download``)."""
        d = self.to_dict()
        for k in NON_IDENTITY_FIELDS:
            d.pop(k, None)
        for k, v in LATER_FIELDS.items():  # absent = default, so earlier zoos keep their identity
            if d[k] == v:
                del d[k]
        return d

    def train_config(self) -> TrainConfig:
        """The per-network training part, as the engine takes it."""
        return TrainConfig(**{f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(TrainConfig)})

    @property
    def num_networks(self) -> int:
        return len(self.tasks) * self.runs


def _check_model_kwargs(arch: str, model_kwargs: dict[str, Any]) -> None:
    """Build one network of ``arch`` on the meta device (no memory, no time): unknown or ill-typed
    ``model_kwargs`` and layers of width 0 fail here, before anything is trained or written."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "zero-element tensors": reported below
            net = build_model(arch, 2, **model_kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"model_kwargs {model_kwargs} do not build a {arch!r} network: {e}") from None
    empty = [name for name, p in net.named_parameters() if p.numel() == 0]
    if empty:
        raise ValueError(f"model_kwargs {model_kwargs} give {arch!r} layers of width 0 ({', '.join(empty)}); "
                         "every width must be >= 1")


def _jsonable(x: Any) -> Any:
    """Tuples → lists, recursively (so a spec round-trips through JSON unchanged)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def spec_diff(stored: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """Human-readable differences between two spec identities."""
    out = []
    stored, asked = {**LATER_FIELDS, **stored}, {**LATER_FIELDS, **asked}
    for k in sorted(set(stored) | set(asked)):
        if stored.get(k, "<absent>") != asked.get(k, "<absent>"):
            out.append(f"{k}: existing {stored.get(k, '<absent>')!r}, asked {asked.get(k, '<absent>')!r}")
    return out


def spec_from_profile(profile: str, section: str, *, arch: str, dataset: str, seed: int = 0,
                      data_root: str | None = None, download: bool = False, **overrides: Any) -> ZooSpec:
    """The :class:`ZooSpec` that section ``section`` of profile ``profile`` (``profiles/<name>.yaml``)
    asks for: ``zoo.tasks`` (the first n tasks, or every task of a real dataset that has fewer:
    CIFAR-10's 45 in place of CIFAR-100's 50) × ``zoo.runs``, ``zoo.data_kwargs[dataset]`` and the
    training fields under ``zoo.arch[arch]``. ``overrides`` replace fields (e.g. ``tasks=``,
    ``runs=``, ``precision=``). The one road from a profile to a zoo: the notebooks
    (:mod:`ffl.experiment`), ``python -m ffl.zoo`` and ``python -m ffl.bench`` all take it; the
    paper's settings (§4) are the ``paper`` profile."""
    settings = load_profile(profile).get(section)
    if not settings or "zoo" not in settings:
        raise ValueError(f"profile {profile!r} has no zoo settings for {section!r}")
    zoo = settings["zoo"]
    if arch not in zoo["arch"]:
        raise ValueError(f"profile {profile!r} defines no {arch!r} zoo for {section!r}; it has {sorted(zoo['arch'])}")
    n_tasks = zoo["tasks"]
    if dataset in DATASETS and dataset != "synthetic" and isinstance(n_tasks, int):
        n_tasks = min(n_tasks, num_tasks(dataset))
    fields = {
        "arch": arch, "dataset": dataset, "tasks": list(range(n_tasks)), "runs": zoo["runs"],
        "seed": seed, "data_root": data_root, "download": download,
        "data_kwargs": dict(zoo.get("data_kwargs", {}).get(dataset, {})),
        **zoo["arch"][arch], **overrides,
    }
    return ZooSpec.from_dict(fields)


def default_cache_dir() -> Path:
    """``$FFL_CACHE`` (set but empty: unset) or ``./cache``: where zoos and results land."""
    return env_folder("FFL_CACHE", "cache").resolve()


def cached_zoo_root(spec: ZooSpec, cache: str | os.PathLike | None = None) -> Path:
    """Where the chapters keep the zoo of ``spec`` under ``cache`` (default :func:`default_cache_dir`):
    ``zoos/<arch>-<dataset>-<hash of the spec's identity>``, so where the data lives does not
    change it. ``python -m ffl.zoo train`` without ``--root`` trains there."""
    key = spec_sha256(spec.identity())[:16]
    return Path(cache if cache is not None else default_cache_dir()) / "zoos" / f"{spec.arch}-{spec.dataset}-{key}"


#: keys of a profile's ``<section>.zoo.cuda.<arch>``: how a zoo trains on CUDA, not what it trains
CUDA_ENGINE_KEYS = tuple(CUDA_ENGINE)


def cuda_engine_from_profile(profile: str, section: str, *, arch: str) -> dict[str, Any]:
    """The keywords of :func:`train_zoo` that ``<section>.zoo.cuda.<arch>`` of profile ``profile``
    sets for training on CUDA: ``batch_networks`` (networks per engine batch) and the convolution /
    BatchNorm backends (:func:`ffl.batched.conv_backend`, :func:`ffl.batched.bn_backend`), and
    ``conv_tiles``, a tile table of the Triton convolution's measured blockings (a file under
    ``profiles/``, see :func:`ffl.implicit_conv.read_tile_table`; returned as its full path). They
    change speed and rounding, not the zoo's spec (as the GPU model does), so they are not part of
    its identity; the zoo's ``provenance.json`` records what ran. Empty when the profile sets none."""
    settings = (load_profile(profile).get(section) or {}).get("zoo", {}).get("cuda") or {}
    engine = settings.get(arch) or {}
    where = f"profile {profile!r}, {section}.zoo.cuda.{arch}"  # keys and types: checked as the profile loads
    out = dict(engine)
    if "batch_networks" in out:
        out["batch_networks"] = as_int(f"{where}: batch_networks", out["batch_networks"], minimum=1)
    for key in ("conv_backend", "bn_backend"):
        if key in out and out[key] not in BACKENDS:
            raise ValueError(f"{where}: {key} {out[key]!r} is not one of {', '.join(BACKENDS)}")
    if "conv_tiles" in out:
        path = PROFILE_DIR / str(out["conv_tiles"])
        try:
            implicit_conv.read_tile_table(path)
        except ValueError as e:
            raise ValueError(f"{where}: conv_tiles: {e}") from None
        out["conv_tiles"] = str(path)
    return out


def kernels_used(arch: str, device: str | torch.device) -> dict[str, str]:
    """Which code the convolutions and BatchNorms of a zoo of ``arch`` run on ``device`` under the
    current :mod:`ffl.batched` backends (provenance): ``torch`` (PyTorch's, cuDNN on CUDA),
    ``triton`` or ``interpret``; BatchNorm fusion exists for the plain ConvNets only. Empty for
    architectures without convolutions."""
    if arch not in CONV_ARCHS:
        return {}

    def runs(backend: str) -> str:
        return backend if runs_on(backend, device) else "torch"

    return {"conv": runs(batched.BatchedConv2d.backend),
            "bn": runs(batched.BatchedBatchNorm.backend) if arch in PLAIN_CONV_ARCHS else "torch"}


def run_seed(seed: int, task: int, run: int) -> int:
    """Initialization seed of network (task, run): SHA-256 of (seed, task, run), 63 bits."""
    return derive_seed("ffl-zoo-init", seed, task, run, sep=":")


def data_seed(seed: int, task: int, run: int) -> int:
    """Seed of network (task, run)'s minibatch order and augmentation."""
    return derive_seed("ffl-zoo-data", seed, task, run, sep=":")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


class ZooCorruptError(ValueError):
    """A zoo file is truncated, tampered with or unreadable (the message names the file)."""


class StaleDataError(ValueError):
    """A zoo was trained on other data than its dataset now gives for the same tasks (another copy,
    other images per class): reading or resuming it would label its networks with the wrong data."""

    def __init__(self, root: Path, spec: "ZooSpec", stale: Sequence[tuple[int, str, str]]) -> None:
        self.tasks = [t for t, _, _ in stale]
        named = ", ".join(f"task {t} (trained on {was[:12]}…, now {now[:12]}…)" for t, was, now in stale[:5])
        super().__init__(
            f"the zoo at {root} was trained on other {spec.dataset} data than "
            f"{spec.data_root or '$FFL_DATA_ROOT (else ./data)'} holds now: {named}"
            + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
            + " (SHA-256 of each task's tensors). The dataset's files changed since, or another copy of it is "
            "read (e.g. the full dataset where the zoo was trained on an offline copy with fewer images). "
            f"Point data_root at the data it was trained on, or delete {root} to train it on this data.")


def check_task_data(root: Path, spec: "ZooSpec", recorded: dict[int, str], digests: dict[int, str]) -> None:
    """``StaleDataError`` unless every task of ``digests`` (task -> :meth:`TaskData.sha256` of the
    data there now) with a ``recorded`` digest still has it. Tasks without a record (zoos from
    before it) pass."""
    stale = [(t, recorded[t], now) for t, now in sorted(digests.items()) if t in recorded and recorded[t] != now]
    if stale:
        raise StaleDataError(root, spec, stale)


def recorded_task_data(manifest_or_sidecars: Sequence[dict[str, Any]]) -> dict[int, str]:
    """task -> the data digest recorded by shards' sidecars (or a manifest's ``shards``)."""
    return {int(m["task"]): m["data_sha256"] for m in manifest_or_sidecars if m.get("data_sha256")}


class TrainingDivergedError(RuntimeError):
    """Networks of a zoo ended training with NaN or infinite weights (the message names them by
    task and run); their chunk is not saved, so the zoo is never complete with them in it."""

    def __init__(self, root: Path, spec: "ZooSpec", networks: Sequence[tuple[Piece, int]], chunk_size: int) -> None:
        self.networks = [(p.task, r) for p, r in networks]
        named = ", ".join(f"task {t} run {r}" for t, r in self.networks[:20]) + (" …" if len(networks) > 20 else "")
        schedule = f"{spec.steps} steps" if spec.steps is not None else f"{spec.epochs} epochs"
        super().__init__(
            f"training diverged (non-finite weights or loss) for {len(networks)} of the {chunk_size} networks "
            f"of a chunk of the zoo at {root}: {named}. Settings: optimizer {spec.optimizer}, lr {spec.lr}, "
            f"momentum {spec.momentum}, weight_decay {spec.weight_decay}, {schedule}, precision {spec.precision}. "
            "Nothing of this chunk was saved and the zoo stays incomplete; train with a smaller lr "
            "(another spec, so another root).")


def _shard_name(task: int, r0: int, r1: int) -> str:
    return f"t{task:05d}-r{r0:05d}-{r1 - 1:05d}"


# --------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Runs ``r0 … r1-1`` of task ``spec.tasks[task_pos]`` (one shard file)."""

    task_pos: int
    task: int
    r0: int
    r1: int

    @property
    def name(self) -> str:
        return _shard_name(self.task, self.r0, self.r1)


def chunks(spec: ZooSpec, batch_networks: int) -> list[list[Piece]]:
    """Engine batches: consecutive networks in task-major order, ``batch_networks`` at a time,
    each cut at task boundaries into pieces (one shard file per piece)."""
    N, R = spec.num_networks, spec.runs
    out = []
    for a in range(0, N, batch_networks):
        b = min(a + batch_networks, N)
        pieces = []
        i = a
        while i < b:
            tp, r0 = divmod(i, R)
            r1 = min(R, r0 + (b - i))
            pieces.append(Piece(tp, spec.tasks[tp], r0, r1))
            i += r1 - r0
        out.append(pieces)
    return out


# --------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------


class Zoo:
    """A trained zoo on disk (see module doc). Networks are ordered task-major:
    ``i = task_position * runs + run``."""

    def __init__(self, root: Path, manifest: dict[str, Any], *, verify: str = "lazy", cache_shards: int = 2) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.spec = ZooSpec.from_dict({**manifest["spec"]})
        nets = manifest["networks"]
        self.tasks = torch.tensor([n["task"] for n in nets], dtype=torch.int64)
        self.runs = torch.tensor([n["run"] for n in nets], dtype=torch.int64)
        self.seeds = torch.tensor([n["seed"] for n in nets], dtype=torch.int64)
        self.accuracy = {
            "train": torch.tensor([n["train_acc"] for n in nets], dtype=torch.float64),
            "test": torch.tensor([n["test_acc"] for n in nets], dtype=torch.float64),
        }
        self._shards = {s["file"]: s for s in manifest["shards"]}
        self._verified: set[str] = set()
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_n = cache_shards
        for s in manifest["shards"]:
            path = self.root / s["file"]
            if not path.is_file():
                raise ZooCorruptError(f"zoo shard missing: {path}")
            size = path.stat().st_size
            if size != s["bytes"]:
                raise ZooCorruptError(f"zoo shard {path} has {size} bytes, manifest says {s['bytes']} (truncated or modified)")
        self._check_identity()
        if verify == "full":
            self.verify()

    def _check_identity(self) -> None:
        """The manifest's spec hash, and its networks and shards against those its spec and chunk
        size determine (count, order, task, run, seeds, shard, row): a relabelled or cut manifest
        fails here."""
        where = self.root / "manifest.json"
        recorded = self.manifest.get("spec_sha256")  # zoos written before it was recorded have none
        if recorded is not None and recorded != spec_sha256(self.manifest["spec"]):
            raise ZooCorruptError(f"{where}: its spec does not match its recorded spec hash (edited)")
        k = int(self.manifest["batch_networks"])
        check_networks(self.manifest["networks"], self.spec, k, where)
        files = [f"shards/{p.name}.safetensors" for chunk in chunks(self.spec, k) for p in chunk]
        if sorted(self._shards) != sorted(files) or len(self.manifest["shards"]) != len(files):
            raise ZooCorruptError(f"{where} lists shards {sorted(self._shards)[:4]}…, its spec needs {files[:4]}…")

    @classmethod
    def load(cls, root: str | os.PathLike, *, verify: str = "lazy") -> Zoo:
        """Load a complete zoo. Always checked: the manifest's networks and shards against its
        spec (count, order, task, run, seeds) and its spec hash. ``verify``: ``"lazy"`` (sizes
        now, SHA-256 of each shard when it is first read) or ``"full"`` (SHA-256 of every shard now)."""
        root = Path(root)
        mpath = root / "manifest.json"
        if not mpath.is_file():
            done = len(list((root / "shards").glob("*.json"))) if (root / "shards").is_dir() else 0
            raise FileNotFoundError(
                f"no complete zoo at {root} (no manifest.json; {done} shard(s) present). "
                "Run train_zoo(spec, root) to train or resume it.")
        manifest = read_record(mpath, _MANIFEST_FIELDS)
        if manifest.get("format") != FORMAT:
            raise ZooCorruptError(f"{mpath} is not an ffl zoo manifest")
        try:
            return cls(root, manifest, verify=verify)
        except (KeyError, TypeError, AttributeError) as e:  # a record inside of the wrong shape
            raise ZooCorruptError(f"{mpath} is not a zoo manifest: {type(e).__name__}: {e} (edited, or written by "
                                  "something else)") from None

    def __len__(self) -> int:
        return len(self.manifest["networks"])

    @property
    def weights_sha256(self) -> str:
        """SHA-256 of the shards' SHA-256s in manifest order: names these weights. Results are
        cached under it (:func:`ffl.experiment.run_experiment`), so a zoo trained again under the
        same spec (on other data, on another machine) is never given the old zoo's results."""
        return hashlib.sha256(json.dumps([s["sha256"] for s in self.manifest["shards"]]).encode()).hexdigest()

    def __repr__(self) -> str:
        s = self.spec
        return f"Zoo({s.arch} on {s.dataset}: {len(s.tasks)} tasks × {s.runs} runs, root={str(self.root)!r})"

    def verify(self, workers: int | None = None) -> None:
        """Check every shard's SHA-256 against the manifest, ``workers`` files at a time (default:
        one per CPU; hashing releases the GIL)."""
        todo = [f for f in self._shards if f not in self._verified]
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            list(pool.map(self._check, todo))

    def _check(self, f: str) -> None:
        if f in self._verified:
            return
        s = self._shards[f]
        path = self.root / f
        if not path.is_file():
            raise ZooCorruptError(f"zoo shard missing: {path}")
        if path.stat().st_size != s["bytes"]:
            raise ZooCorruptError(f"zoo shard {path} has {path.stat().st_size} bytes, manifest says {s['bytes']}")
        if sha256_file(path) != s["sha256"]:
            raise ZooCorruptError(f"zoo shard {path} does not match its SHA-256 in the manifest (tampered or corrupt)")
        self._verified.add(f)

    def _shard(self, f: str) -> dict[str, torch.Tensor]:
        if f in self._cache:
            self._cache.move_to_end(f)
            return self._cache[f]
        self._check(f)
        try:
            tensors = load_file(str(self.root / f))
        except Exception as e:  # noqa: BLE001 - any parse failure names the file
            raise ZooCorruptError(f"zoo shard {self.root / f} cannot be read: {e}") from e
        self._cache[f] = tensors
        while len(self._cache) > self._cache_n:
            self._cache.popitem(last=False)
        return tensors

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Network i's ``state_dict`` (CPU tensors, model key names)."""
        net = self.manifest["networks"][i]
        tensors = self._shard(net["shard"])
        return {k: v[net["row"]].clone() for k, v in tensors.items()}

    def model(self, i: int) -> nn.Module:
        """Network i as an ``nn.Module`` in eval mode on CPU."""
        net = self.manifest["networks"][i]
        m = build_model(self.spec.arch, net["num_classes"], **self.manifest["build_kwargs"])
        m.load_state_dict(self.state_dict(i))
        return m.eval()

    def models(self, indices: Sequence[int] | None = None):
        """Iterate over networks as modules (shard-cached, so sequential access is cheap)."""
        for i in range(len(self)) if indices is None else indices:
            yield self.model(int(i))

    def stacked(self, indices: Sequence[int] | None = None, workers: int | None = None) -> dict[str, torch.Tensor]:
        """State dicts of several networks stacked along a new first dimension. Rows are read from
        each shard file as slices (its SHA-256 checked as for :meth:`state_dict`), not through the
        shard cache: streaming a zoo holds only the rows asked for. Shard files are read by
        ``workers`` threads at once (default: up to 8; each fills its own rows)."""
        idx = list(range(len(self))) if indices is None else [int(i) for i in indices]
        nets = [self.manifest["networks"][i] for i in idx]
        groups, start = [], 0
        for f, group in itertools.groupby(nets, key=lambda n: n["shard"]):
            rows = [n["row"] for n in group]
            groups.append((f, rows, start))
            start += len(rows)
        if not groups:
            return {}
        out = self._empty_rows(groups[0][0], len(idx))
        workers = workers or min(8, os.cpu_count() or 1, len(groups))
        if workers <= 1:
            for group in groups:
                self._read_rows(*group, out)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ffl-zoo-read") as pool:
                for done in [pool.submit(self._read_rows, *group, out) for group in groups]:
                    done.result()
        return out

    def _empty_rows(self, f: str, n: int) -> dict[str, torch.Tensor]:
        """Uninitialized (n, *shape) tensors for the tensors of shard ``f`` (every shard has the same)."""
        path = self.root / f
        try:
            with safe_open(str(path), framework="pt") as shard:
                heads = {k: shard.get_slice(k)[0:0] for k in shard.keys()}  # no rows: shape and dtype only
        except Exception as e:  # noqa: BLE001 - any parse failure names the file
            raise ZooCorruptError(f"zoo shard {path} cannot be read: {e}") from e
        return {k: torch.empty(n, *h.shape[1:], dtype=h.dtype) for k, h in heads.items()}

    def _read_rows(self, f: str, rows: list[int], start: int, out: dict[str, torch.Tensor]) -> None:
        """Rows ``rows`` of shard ``f`` into ``out[k][start:start + len(rows)]``."""
        self._check(f)
        try:
            with safe_open(str(self.root / f), framework="pt") as shard:
                for k in shard.keys():
                    part = shard.get_slice(k)
                    if rows == list(range(rows[0], rows[0] + len(rows))):  # consecutive: one slice
                        v = part[rows[0] : rows[0] + len(rows)]
                    else:
                        v = part[min(rows) : max(rows) + 1][torch.tensor(rows) - min(rows)]
                    out[k][start : start + len(rows)] = v
        except Exception as e:  # noqa: BLE001 - any parse failure names the file
            raise ZooCorruptError(f"zoo shard {self.root / f} cannot be read: {e}") from e


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


#: most networks per engine batch of a convolutional zoo on CUDA: on one H100, PlainNet-5 chunks of
#: 585–750 trained at about half the networks per second of chunks of 126–252 (README)
CONV_CHUNK_CAP = 252


def default_batch_networks(spec: ZooSpec, device: str | torch.device) -> int:
    """Networks per engine batch: 64 on CPU; on CUDA as many as fit (:func:`ffl.engine.probe_capacity`),
    at most 2048, and at most :data:`CONV_CHUNK_CAP` for architectures with convolutions."""
    N = spec.num_networks
    dev = torch.device(device)
    if dev.type != "cuda":
        return min(N, 64)
    cap = CONV_CHUNK_CAP if spec.arch in CONV_ARCHS else 2048
    return max(1, min(N, cap, probe_capacity(spec.arch, spec.model_kwargs, spec.train_config(), dev)))


def _load_tasks(spec: ZooSpec, tasks: Sequence[int]) -> dict[int, TaskData]:
    return {t: load_task(spec.dataset, t, data_root=spec.data_root, download=spec.download,
                         seed=spec.seed, **spec.data_kwargs) for t in tasks}


def _build_kwargs(spec: ZooSpec, example: Any) -> dict[str, Any]:
    kw = dict(spec.model_kwargs)
    if spec.arch == "mlp" and "in_features" not in kw:
        kw["in_features"] = int(math.prod(example.x_train.shape[1:]))
    return _jsonable(kw)


@dataclass
class ChunkInputs:
    """What the engine needs to train one chunk: its tasks' data on the device and, per network
    (in the pieces' order), the initialization seed, the data seed and the task's index in ``data``."""

    data: NetworkData
    seeds: list[int]
    data_seeds: list[int]
    task_index: list[int]
    num_classes: int
    build_kwargs: dict[str, Any]
    build: Any  # () -> nn.Module, one untrained network of the chunk's architecture


def _chunk_model(spec: ZooSpec, chunk: Sequence[Piece], task_data: dict[int, Any]) -> tuple[int, dict[str, Any], Any]:
    """Number of classes, build keywords and model builder of one chunk."""
    ncls_set = {task_data[p.task].num_classes for p in chunk}
    if len(ncls_set) != 1:
        raise ValueError(f"tasks trained together need the same number of classes, got {sorted(ncls_set)}")
    ncls = ncls_set.pop()
    build_kwargs = _build_kwargs(spec, task_data[min(p.task for p in chunk)])
    return ncls, build_kwargs, functools.partial(build_model, spec.arch, ncls, **build_kwargs)


def _chunk_seeds(spec: ZooSpec, chunk: Sequence[Piece]) -> list[int]:
    return [run_seed(spec.seed, p.task, r) for p in chunk for r in range(p.r0, p.r1)]


def chunk_inputs(spec: ZooSpec, chunk: Sequence[Piece], task_data: dict[int, Any],
                 device: str | torch.device) -> ChunkInputs:
    """Seeds, task indices and device data of one chunk (``task_data``: the loaded tasks by id)."""
    tasks_here = sorted({p.task for p in chunk})
    ncls, build_kwargs, build = _chunk_model(spec, chunk, task_data)
    runs = [(p.task, r) for p in chunk for r in range(p.r0, p.r1)]
    return ChunkInputs(
        data=NetworkData.from_tasks([task_data[t] for t in tasks_here], device),
        seeds=_chunk_seeds(spec, chunk),
        data_seeds=[data_seed(spec.seed, t, r) for t, r in runs],
        task_index=[tasks_here.index(t) for t, _ in runs],
        num_classes=ncls,
        build_kwargs=build_kwargs,
        build=build,
    )


def _read_sidecar(root: Path, piece: Piece) -> dict[str, Any] | None:
    """The sidecar of a finished shard, if it and its shard are intact (else None)."""
    side = root / "shards" / f"{piece.name}.json"
    shard = root / "shards" / f"{piece.name}.safetensors"
    if not side.is_file() or not shard.is_file():
        return None
    try:
        meta = read_record(side, _SIDECAR_FIELDS)
    except ZooCorruptError as e:
        warnings.warn(f"{e}; its shard will be retrained", stacklevel=3)
        return None
    if shard.stat().st_size != meta.get("bytes") or sha256_file(shard) != meta.get("sha256"):
        warnings.warn(f"shard {shard} does not match its sidecar; it will be retrained", stacklevel=3)
        return None
    return meta


def read_record(path: Path, fields: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """A zoo's JSON file (``spec.json``, a manifest, a sidecar): an object with ``fields`` (name ->
    type); else :class:`ZooCorruptError` naming the file and what is wrong."""
    try:
        record = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZooCorruptError(f"{path} is not valid JSON ({e}): truncated or damaged") from None
    wrong = [name for name, kind in fields.items()
             if not isinstance(record, dict) or not isinstance(record.get(name), kind)]
    if wrong:
        raise ZooCorruptError(f"{path} is not a zoo's {Path(path).name}: " + (
            f"{', '.join(wrong)} missing or of the wrong type" if isinstance(record, dict)
            else f"expected a JSON object, got {type(record).__name__}") + " (edited, or written by something else)")
    return record


_SPEC_FIELDS = {"spec": dict, "batch_networks": int}
_MANIFEST_FIELDS = {"format": str, "spec": dict, "batch_networks": int, "networks": list, "shards": list,
                    "build_kwargs": dict}
_SIDECAR_FIELDS = {"file": str, "bytes": int, "sha256": str, "task": int, "r0": int, "r1": int, "networks": list,
                   "build_kwargs": dict}


def _check_root(root: Path) -> None:
    as_folder("zoo root", root)


def _chunk_size(root: Path, spec: ZooSpec, batch_networks: int | None, device) -> tuple[int, bool]:
    """Validate ``root/spec.json`` if it exists; return the chunk size to use and whether it exists."""
    spath = root / "spec.json"
    if spath.is_file():
        stored = read_record(spath, _SPEC_FIELDS)
        diff = spec_diff(stored["spec"], spec.identity())
        if diff:
            raise ValueError(f"a different zoo exists at {root}; differing fields:\n  " + "\n  ".join(diff)
                             + "\nUse another root (or delete it) to train this spec.")
        stored_k = int(stored["batch_networks"])
        if batch_networks is not None and batch_networks != stored_k:
            warnings.warn(f"zoo at {root} was started with batch_networks={stored_k}; using that "
                          f"(not {batch_networks}) so resumed chunks match", stacklevel=3)
        return stored_k, True
    return batch_networks or default_batch_networks(spec, device), False


def _write_spec(root: Path, spec: ZooSpec, k: int) -> None:
    write_json_atomic(root / "spec.json", {"format": FORMAT, "format_version": FORMAT_VERSION,
                                            "spec": spec.identity(), "batch_networks": k,
                                            "spec_sha256": spec_sha256(spec.identity())})


def spec_sha256(identity: dict[str, Any]) -> str:
    """SHA-256 of a spec identity (:meth:`ZooSpec.identity`) as key-sorted JSON: recorded in
    ``spec.json``, in every shard's sidecar and in the manifest, so shards, manifest and spec
    cannot be mixed up."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def expected_networks(spec: ZooSpec, k: int) -> list[dict[str, Any]]:
    """Each network's identity as the spec and the chunk size ``k`` determine it, in zoo order:
    task, run, seeds, shard file and row."""
    return [net for chunk in chunks(spec, k) for p in chunk for net in _piece_networks(spec, p)]


def _piece_networks(spec: ZooSpec, p: Piece) -> list[dict[str, Any]]:
    return [{"task": p.task, "run": r, "seed": run_seed(spec.seed, p.task, r),
             "data_seed": data_seed(spec.seed, p.task, r), "shard": f"shards/{p.name}.safetensors", "row": r - p.r0}
            for r in range(p.r0, p.r1)]


def _check_piece(root: Path, spec: ZooSpec, piece: Piece, meta: dict[str, Any]) -> None:
    """``ZooCorruptError`` unless a finished shard's sidecar records the networks its name stands
    for (a shard renamed onto another's name is found before anything trains)."""
    side = root / "shards" / f"{piece.name}.json"
    nets = meta.get("networks")
    want = _piece_networks(spec, piece)
    if not isinstance(nets, list) or len(nets) != len(want) or any(
            not isinstance(n, dict) or any(n.get(k) != v for k, v in w.items()) for n, w in zip(nets, want)):
        held = sorted({(n.get("task"), n.get("run")) for n in nets if isinstance(n, dict)} if isinstance(nets, list)
                      else [])
        raise ZooCorruptError(
            f"{side} records other networks than its name says (task {piece.task}, runs {piece.r0}-{piece.r1 - 1}): "
            f"(task, run) {held[:4]}{' …' if len(held) > 4 else ''}; renamed or copied from another place? "
            f"Delete it and its .safetensors to train them again")


def check_networks(networks: Sequence[dict[str, Any]], spec: ZooSpec, k: int, where: Path) -> None:
    """``ZooCorruptError`` unless ``networks`` (manifest or sidecar records) are exactly the
    networks of ``spec`` (count, order, task, run, seeds, shard, row)."""
    expected = expected_networks(spec, k)
    if len(networks) != len(expected):
        raise ZooCorruptError(f"{where} lists {len(networks)} networks; its spec ({len(spec.tasks)} tasks × "
                              f"{spec.runs} runs) has {len(expected)} (cut or padded)")
    for i, (got, want) in enumerate(zip(networks, expected)):
        bad = [f"{key} {got.get(key)!r} (expected {value!r})" for key, value in want.items() if got.get(key) != value]
        if bad:
            raise ZooCorruptError(f"{where}: network {i} does not match its spec: " + ", ".join(bad))


def _check_shards_belong(root: Path, spec: ZooSpec, spec_json_existed: bool) -> None:
    """Refuse shards in ``root`` that another spec made (their sidecars record its hash), and
    shards without a recorded spec when ``spec.json`` is gone (nothing vouches for them)."""
    ours = spec_sha256(spec.identity())
    for side in sorted((root / "shards").glob("*.json")) if (root / "shards").is_dir() else []:
        try:
            theirs = json.loads(side.read_text()).get("spec_sha256")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue  # unreadable: retrained like any torn shard
        if theirs is not None and theirs != ours:
            raise ValueError(f"{side} belongs to another zoo (spec hash {theirs[:12]}…, this spec {ours[:12]}…); "
                             f"use another root (or delete {root}) to train this spec")
        if theirs is None and not spec_json_existed:
            raise ValueError(f"{root} has shards but no spec.json, and {side} does not record its spec, so "
                             "nothing says they belong to this spec; restore spec.json or delete the folder")


def _finalize(root: Path, spec: ZooSpec, k: int) -> bool:
    """Write manifest.json if every shard is present; return whether the zoo is complete."""
    metas, sides = [], []
    for chunk in chunks(spec, k):
        for p in chunk:
            side = root / "shards" / f"{p.name}.json"
            if not side.is_file():
                return False
            metas.append(read_record(side, _SIDECAR_FIELDS))
            sides.append(side)
    networks, shards = [], []
    ours = spec_sha256(spec.identity())
    for meta, side in zip(metas, sides):
        if meta.get("spec_sha256", ours) != ours:
            raise ZooCorruptError(f"{side} belongs to another spec (hash {meta['spec_sha256'][:12]}…)")
        shards.append({"file": meta["file"], "bytes": meta["bytes"], "sha256": meta["sha256"],
                       "task": meta["task"], "runs": [meta["r0"], meta["r1"]],
                       **({"data_sha256": meta["data_sha256"]} if "data_sha256" in meta else {})})
        networks.extend(meta["networks"])
    check_networks(networks, spec, k, root / "shards")
    for i, n in enumerate(networks):
        n["index"] = i
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
        "spec": spec.identity(), "arch": spec.arch, "build_kwargs": metas[0]["build_kwargs"],
        "hyperparameters": dataclasses.asdict(spec.train_config()), "batch_networks": k,
        "num_networks": len(networks), "networks": networks, "shards": shards, "spec_sha256": ours,
    }
    write_json_atomic(root / "manifest.json", manifest)
    return True


def write_piece(root: Path, spec: ZooSpec, piece: Piece, state: dict[str, torch.Tensor], rows: slice,
                nets: list[dict[str, Any]], build_kwargs: dict[str, Any], data_sha256: str | None = None) -> None:
    """One shard of ``root``: rows ``rows`` of the stacked ``state`` for ``piece``'s networks
    (records ``nets``), with its sidecar bound to ``spec`` (atomic, the sidecar last); ``data_sha256``:
    the digest of the task's data they were trained on (:meth:`TaskData.sha256`)."""
    spec_hash = spec_sha256(spec.identity())
    tensors = {name: t[rows].contiguous() for name, t in state.items()}
    data = save(tensors, metadata={"format": "pt"})
    fname = f"shards/{piece.name}.safetensors"
    write_bytes_atomic(root / fname, data)
    meta = {"file": fname, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "task": piece.task, "r0": piece.r0, "r1": piece.r1, "build_kwargs": build_kwargs,
            "networks": nets, "spec_sha256": spec_hash}
    if data_sha256 is not None:
        meta["data_sha256"] = data_sha256
    write_json_atomic(root / "shards" / f"{piece.name}.json", meta)


def _write_chunk(root: Path, spec: ZooSpec, chunk: Sequence[Piece], res, nets_meta: list[dict[str, Any]],
                 build_kwargs: dict[str, Any], digests: dict[int, str]) -> None:
    """The shards of one trained chunk (``res``: its :class:`ffl.engine.BatchResult`), a few at a
    time: serializing, hashing and writing one shard runs at well under the disk's rate (hashing
    and file writes release the GIL). Every thread is joined before this returns."""
    jobs, i = [], 0
    for p in chunk:
        n = p.r1 - p.r0
        metas = [dict(m, train_acc=res.train_acc[i + j], test_acc=res.test_acc[i + j])
                 for j, m in enumerate(nets_meta[i:i + n])]
        jobs.append((p, slice(i, i + n), metas))
        i += n
    with ThreadPoolExecutor(max_workers=min(_SHARD_WRITERS, len(jobs)), thread_name_prefix="ffl-zoo-shard") as pool:
        for done in [pool.submit(write_piece, root, spec, p, res.state, rows, metas, build_kwargs, digests[p.task])
                     for p, rows, metas in jobs]:
            done.result()


_SHARD_WRITERS = 4  # shards of a chunk written at once


class _ChunkWrites:
    """The shards of at most one trained chunk in flight. ``background``: written by a thread
    (safetensors serialization, fsync and hashing) while the next chunk trains; otherwise at once.
    A chunk counts as written (and the ``FFL_ZOO_DIE_AFTER_CHUNKS`` hook counts it) only when its
    files are durable; a write's error is raised by :meth:`wait`. Each chunk gets a fresh thread,
    joined in :meth:`wait`, so no writer thread is alive when the next init workers are forked."""

    def __init__(self, background: bool) -> None:
        self.background = background
        self._pool: ThreadPoolExecutor | None = None
        self._future = None

    def submit(self, write) -> None:
        self.wait()
        if not self.background:
            write()
            _maybe_die_after_chunk()
            return
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ffl-zoo-writes")
        self._future = self._pool.submit(write)

    def wait(self) -> None:
        if self._future is None:
            return
        pool, future = self._pool, self._future
        self._pool = self._future = None
        pool.shutdown(wait=True)
        future.result()
        _maybe_die_after_chunk()


def _prefetch_workers() -> int:
    """Init workers that run beside training: two cores fewer than :func:`ffl.engine.init_stacked`
    takes, left to the thread that drives the device and the writer thread."""
    return max(2, min(os.cpu_count() or 1, 16) - 2)


class _Progress:
    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.bar = None
        if enabled:  # plain tqdm bars: papermill kernels have no widgets
            self.bar = tqdm(total=total, desc=desc, unit="net", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total} nets [{elapsed}<{remaining}, {rate_fmt}]")

    def advance_to(self, position: float) -> None:
        # Absolute, not a sum of fractional steps: summed float steps drift past the total
        # (tqdm then warns and shows a negative time left); at a chunk's end position is exact.
        if self.bar is not None:
            self.bar.update(position - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_zoo(
    spec: ZooSpec,
    root: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    batch_networks: int | None = None,
    compile: bool = False,
    overlap: bool | None = None,
    conv_backend: str | None = None,
    bn_backend: str | None = None,
    conv_tiles: str | os.PathLike | None = None,
) -> Zoo | None:
    """Train (or load, or resume) the zoo of ``spec`` in directory ``root`` (§4).

    * a complete zoo with the same spec at ``root`` is loaded, not retrained;
    * a partial one is resumed (finished shards are kept, verified by SHA-256);
    * a zoo with a different spec at ``root`` → ``ValueError`` listing the differing fields.

    ``batch_networks``: networks trained together in one engine batch (default: 64 on CPU, memory
    based on CUDA). It fixes the chunking and is stored, so a resumed run reuses it.
    ``shard=(rank, world)``: train only chunks ``c % world == rank``; returns the zoo if it is
    complete afterwards (the last rank to finish writes the manifest), else ``None``.
    ``compile``: train through ``torch.compile`` (see :func:`ffl.engine.train_batched`).
    ``overlap``: build the next chunk's initial weights (forked workers) and write the finished
    chunk's shards (a thread) while a chunk trains; same bytes as without. Default: on CUDA only
    (on a CPU those workers would take the cores the training uses).
    ``conv_backend``, ``bn_backend``: the :mod:`ffl.batched` backends to train with (default: as
    set; see :func:`cuda_engine_from_profile`); ``conv_tiles``: a tile table of measured blockings
    for the Triton convolution (:func:`ffl.implicit_conv.read_tile_table`). ``provenance.json``
    records what ran.
    """
    root = Path(root)
    _check_root(root)
    if not isinstance(spec, ZooSpec):
        spec = ZooSpec.from_dict(dict(spec))
    device = as_device(device)
    if batch_networks is not None:
        batch_networks = as_int("batch_networks", batch_networks, minimum=1)
    for what, backend in (("conv_backend", conv_backend), ("bn_backend", bn_backend)):
        # before anything is written: a backend that cannot run here fails now, not in a chunk
        if backend is not None and not available(backend):
            raise ValueError(f"{what} {backend!r} cannot run here (Triton installed: {triton is not None}, "
                             f"CUDA: {torch.cuda.is_available()})")
    tiles = implicit_conv.read_tile_table(conv_tiles) if conv_tiles is not None else None
    if shard is not None:
        world = as_int("world size", shard[1], minimum=1)
        shard = (as_int("rank", shard[0], minimum=0), world)
        if shard[0] >= world:
            raise ValueError(f"rank {shard[0]} must be < world size {world}")
    mpath = root / "manifest.json"
    if mpath.is_file():
        zoo = Zoo.load(root)
        diff = spec_diff(zoo.manifest["spec"], spec.identity())
        if diff:
            raise ValueError(f"a different zoo exists at {root}; differing fields:\n  " + "\n  ".join(diff)
                             + "\nUse another root (or delete it) to train this spec.")
        recorded = recorded_task_data(zoo.manifest["shards"])
        if recorded:
            try:
                task_data = _load_tasks(spec, sorted(recorded))
            except FileNotFoundError:  # the data is not here: nothing to compare the zoo with
                return zoo
            check_task_data(root, spec, recorded, {t: d.sha256() for t, d in task_data.items()})
        return zoo
    check_precision(spec.precision, device)  # only training needs it: a finished TF32 zoo loads anywhere
    rank, world = shard if shard is not None else (0, 1)
    with folder_lock(root):  # checking root and writing spec.json is one step: two runs cannot both pass
        k, mine, todo, task_data, digests = _start(root, spec, batch_networks, device, rank, world)
    n_done = sum(p.r1 - p.r0 for c in mine if c not in todo for p in c)
    n_mine = sum(p.r1 - p.r0 for c in mine for p in c)
    t_start = time.time()
    with batched.kernel_settings(conv_backend, bn_backend, tiles):  # for this training only
        kernels = kernels_used(spec.arch, device)
        if tiles is not None and kernels.get("conv", "torch") != "torch":
            kernels["conv_tiles"] = f"{Path(conv_tiles).name} (sha256 {sha256_file(conv_tiles)[:12]})"
        if todo:
            cfg = spec.train_config()
            dev = torch.device(device)
            desc = f"zoo {spec.arch}/{spec.dataset}" + (f" [rank {rank}/{world}]" if world > 1 else "")
            bar = _Progress(n_mine, progress, desc)
            bar.advance_to(n_done)
            # overlap: the next chunk's initial weights are built, and the finished chunk's shards
            # written, while a chunk trains (see _ChunkWrites and the fork below)
            overlap = dev.type == "cuda" if overlap is None else bool(overlap)
            writes = _ChunkWrites(background=overlap)
            ahead: PendingInit | None = None  # the next chunk's initial weights, being built
            finished = None  # a trained chunk whose shards are still to be submitted
            try:
                for ci, chunk in enumerate(todo):
                    try:
                        inp = chunk_inputs(spec, chunk, task_data, dev)
                        stacked = ahead.result() if ahead is not None else init_stacked(inp.build, inp.seeds)
                        ahead = None
                        if overlap and ci + 1 < len(todo):
                            # Forked here, on the main thread, between two trainings and while no writer
                            # thread exists (the last one was joined; the next is started just below):
                            # fork copies only the calling thread, and a lock another thread held at
                            # that moment would stay locked in the child. The workers only fill shared
                            # memory; this thread trains meanwhile and joins them at the next chunk.
                            # Training draws no numbers from the global RNG that the builds reseed
                            # (the template's weights are replaced by the stacked ones).
                            build = _chunk_model(spec, todo[ci + 1], task_data)[2]
                            ahead = start_init_stacked(build, _chunk_seeds(spec, todo[ci + 1]), workers=_prefetch_workers())
                    finally:
                        if finished is not None:
                            writes.submit(finished)
                            finished = None
                    runs = [(p, r) for p in chunk for r in range(p.r0, p.r1)]
                    nets_meta = [{"task": p.task, "run": r, "seed": s, "data_seed": ds, "num_classes": inp.num_classes,
                                  "classes": list(map(str, task_data[p.task].classes)),
                                  "shard": f"shards/{p.name}.safetensors", "row": r - p.r0}
                                 for (p, r), s, ds in zip(runs, inp.seeds, inp.data_seeds)]
                    K = len(inp.seeds)

                    def on_step(step: int, total: int, K=K, start=n_done) -> None:
                        bar.advance_to(start + K * step / total)

                    res = train_batched((inp.build(), stacked), inp.data, inp.task_index, inp.data_seeds, cfg,
                                        device=dev, on_step=on_step, compile=compile)
                    n_done += K
                    del stacked
                    writes.wait()  # the previous chunk's shards are durable
                    if res.diverged:  # nothing of this chunk is saved: the zoo stays incomplete
                        bar.close()
                        raise TrainingDivergedError(root, spec, [runs[k] for k in res.diverged], len(runs))
                    finished = functools.partial(_write_chunk, root, spec, chunk, res, nets_meta, inp.build_kwargs,
                                                 digests)
                    del res, inp
                    if not overlap:
                        writes.submit(finished)
                        finished = None
                if finished is not None:
                    writes.submit(finished)
                    finished = None
                writes.wait()
            except BaseException as err:
                if ahead is not None:
                    ahead.cancel()
                try:  # chunks trained before the error still land
                    writes.wait()
                except Exception as also:  # noqa: BLE001 - the first error propagates, this one is noted
                    err.add_note(f"writing an earlier chunk's shards failed too: {type(also).__name__}: {also}")
                raise
            bar.close()
    prov = {"device": str(device), "rank": rank, "world": world, "seconds": time.time() - t_start,
            "networks_trained": sum(p.r1 - p.r0 for c in todo for p in c), "batch_networks": k}
    if torch.device(device).type == "cpu":  # CPU matrix products round by their thread count
        prov["cpu_threads"] = torch.get_num_threads()
    if kernels:
        prov["kernels"] = kernels
    try:
        prov["hardware"] = hardware(str(device))
    except Exception:  # noqa: BLE001 - provenance is best effort
        pass
    write_json_atomic(root / f"provenance-rank{rank}.json" if world > 1 else root / "provenance.json", prov)
    if _finalize(root, spec, k):
        return Zoo.load(root)
    if world == 1:
        raise RuntimeError(f"zoo at {root} is incomplete after training (a shard is missing)")
    return None


def _start(root: Path, spec: ZooSpec, batch_networks: int | None, device: str, rank: int, world: int):
    """Everything :func:`train_zoo` checks before it trains (spec, finished shards, data, room on
    the disk), then ``root``'s folders and ``spec.json``. Returns the chunk size, this rank's chunks,
    those still to train, their tasks' data and its digests."""
    k, spec_exists = _chunk_size(root, spec, batch_networks, device)
    mine = [c for ci, c in enumerate(chunks(spec, k)) if ci % world == rank]
    # a resumed zoo's finished shards are hashed in parallel (hashing releases the GIL); the pool
    # is joined before any init worker is forked
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        pieces = [p for c in mine for p in c]
        sidecars = dict(zip((p.name for p in pieces), pool.map(lambda p: _read_sidecar(root, p), pieces)))
    todo = [c for c in mine if not all(sidecars[p.name] is not None for p in c)]
    _check_shards_belong(root, spec, spec_exists)  # another spec's shards: named as such, before the data
    for p in pieces:
        if sidecars[p.name] is not None:
            _check_piece(root, spec, p, sidecars[p.name])
    # Data first: a missing dataset fails before anything is written under root.
    needed = sorted({p.task for c in todo for p in c})
    task_data = _load_tasks(spec, needed)
    # and the same data: a resumed zoo's finished shards name the data they were trained on
    digests = {t: d.sha256() for t, d in task_data.items()}  # hashed once: checked here, recorded by each shard
    recorded = recorded_task_data([m for m in sidecars.values() if m is not None])
    finished_only = _load_tasks(spec, sorted(set(recorded) - set(needed)))
    check_task_data(root, spec, recorded, {**{t: d.sha256() for t, d in finished_only.items()}, **digests})
    _check_room(root, spec, todo, task_data)
    root.mkdir(parents=True, exist_ok=True)
    (root / "shards").mkdir(exist_ok=True)
    for folder in (root, root / "shards"):  # staging folders of a killed run
        clean_stale_temp(folder)
    if not spec_exists:
        _write_spec(root, spec, k)
    return k, mine, todo, task_data, digests


def _check_room(root: Path, spec: ZooSpec, todo: Sequence[Sequence[Piece]], task_data: dict[int, TaskData]) -> None:
    """Before anything trains: an existing ``root/shards`` takes a file, and the disk has room for
    the shards still to train (their tensors, plus 4 KiB each for a sidecar's share)."""
    if (root / "shards").is_dir():
        try:
            with tempfile.TemporaryFile(dir=root / "shards"):
                pass
        except OSError as e:
            raise OSError(e.errno, f"cannot write in {root / 'shards'} ({e.strerror}), where the zoo's shards go; "
                                   "make it writable or choose another root") from None
    if not todo:
        return
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net = _chunk_model(spec, todo[0], task_data)[2]()
    per_net = sum(t.numel() * t.element_size() for t in net.state_dict().values()) + 4096
    n = sum(p.r1 - p.r0 for c in todo for p in c)
    free = free_bytes(root)
    if n * per_net > free:
        raise OSError(errno.ENOSPC, f"not enough space for the zoo at {root}: its {n} networks still to train need "
                                    f"about {n * per_net / 2**20:,.1f} MiB, its disk has {free / 2**20:,.1f} MiB free; "
                                    "free some, or choose a root on another disk")


def _maybe_die_after_chunk() -> None:
    """Test hook: ``FFL_ZOO_DIE_AFTER_CHUNKS=n`` kills the process (no cleanup, like SIGKILL)
    after n chunks were written."""
    n = os.environ.get("FFL_ZOO_DIE_AFTER_CHUNKS")
    if n is None:
        return
    _maybe_die_after_chunk.count = getattr(_maybe_die_after_chunk, "count", 0) + 1
    if _maybe_die_after_chunk.count >= int(n):
        os._exit(99)


def prepare_zoo(spec: ZooSpec, root: str | os.PathLike, *, batch_networks: int | None = None,
                device: str | torch.device = "cpu") -> int:
    """Create ``root`` and its ``spec.json`` (or check an existing one against ``spec``) without
    training; return the chunk size the zoo uses. Lets several ranks start on one folder."""
    root = Path(root)
    _check_root(root)
    if (root / "manifest.json").is_file():
        return read_record(root / "manifest.json", _MANIFEST_FIELDS)["batch_networks"]
    if batch_networks is not None:
        batch_networks = as_int("batch_networks", batch_networks, minimum=1)
    with folder_lock(root):
        k, exists = _chunk_size(root, spec, batch_networks, as_device(device))
        _check_shards_belong(root, spec, exists)
        (root / "shards").mkdir(parents=True, exist_ok=True)
        if not exists:
            _write_spec(root, spec, k)
    return k


def finalize_zoo(root: str | os.PathLike) -> Zoo | None:
    """Write ``root/manifest.json`` once every shard of the zoo in ``root`` exists and return the
    zoo; ``None`` while shards are missing."""
    root = Path(root)
    stored = read_record(root / "spec.json", _SPEC_FIELDS)
    return Zoo.load(root) if _finalize(root, ZooSpec.from_dict(stored["spec"]), int(stored["batch_networks"])) else None


def merge_zoos(parts: Sequence[str | os.PathLike], out: str | os.PathLike) -> Zoo:
    """Merge zoo directories trained with ``shard=(rank, world)`` (same spec, same chunking) into
    ``out``; the result is byte-identical to a single-process run. Missing shards → error."""
    parts = [Path(p) for p in parts]
    out = Path(out)
    _check_root(out)
    specs = [read_record(p / "spec.json", _SPEC_FIELDS) for p in parts]
    for p, s in zip(parts[1:], specs[1:]):
        diff = spec_diff(specs[0]["spec"], s["spec"])
        if diff or s["batch_networks"] != specs[0]["batch_networks"]:
            raise ValueError(f"cannot merge {parts[0]} and {p}: different specs/chunking: {diff}")
    spec = ZooSpec.from_dict(specs[0]["spec"])
    k = int(specs[0]["batch_networks"])
    if (out / "spec.json").is_file():
        _chunk_size(out, spec, k, "cpu")  # validates the existing spec
    # where each shard comes from, all checked before anything is copied
    for folder in [*parts, out]:
        _check_shards_belong(folder, spec, True)
    sources, missing = {}, []
    for piece in (p for chunk in chunks(spec, k) for p in chunk):
        src, meta = next(((p, m) for p in [*parts, out] if (m := _read_sidecar(p, piece)) is not None), (None, None))
        if src is None:
            missing.append(piece.name)
            continue
        _check_piece(src, spec, piece, meta)
        sources[piece] = src
    if missing:
        raise FileNotFoundError(f"cannot merge: shards missing from every part: {missing[:10]}"
                                + (" …" if len(missing) > 10 else "") + f"; nothing was written to {out}")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    if not (out / "spec.json").is_file():
        write_json_atomic(out / "spec.json", specs[0])
    for piece, src in sources.items():
        if src.resolve() != out.resolve():
            for ext in (".safetensors", ".json"):
                with atomic_path(out / "shards" / f"{piece.name}{ext}") as staged:
                    shutil.copyfile(src / "shards" / f"{piece.name}{ext}", staged)
    if not _finalize(out, spec, k):
        raise RuntimeError("merge incomplete")
    return Zoo.load(out)


# --------------------------------------------------------------------------------------------
# CLI (torchrun-able)
# --------------------------------------------------------------------------------------------


def _add_spec_source(ap) -> None:
    ap.add_argument("--spec", help="JSON file with the ZooSpec fields (or give --profile …)")
    ap.add_argument("--profile", help="profile whose zoo settings to use (e.g. paper)")
    ap.add_argument("--section", default="cifar100", help="profile section (default: cifar100)")
    ap.add_argument("--arch", help="architecture (with --profile)")
    ap.add_argument("--dataset", help="dataset (with --profile; default: the section's name)")
    ap.add_argument("--seed", type=int, default=0, help="zoo seed (with --profile)")


def _spec_of(args) -> ZooSpec:
    if args.spec:
        try:
            fields = json.loads(Path(args.spec).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SystemExit(f"--spec {args.spec}: cannot be read as JSON ({type(e).__name__}: {e})") from None
        if not isinstance(fields, dict):
            raise SystemExit(f"--spec {args.spec}: expected a JSON object of ZooSpec fields (as `python -m ffl.zoo "
                             f"spec` prints), got {type(fields).__name__}")
        return ZooSpec.from_dict(fields)
    if not (args.profile and args.arch):
        raise SystemExit("give --spec FILE, or --profile NAME --arch ARCH [--section S --dataset D]")
    return spec_from_profile(args.profile, args.section, arch=args.arch, dataset=args.dataset or args.section,
                             seed=args.seed)


def _train_arguments(ap) -> None:
    _add_spec_source(ap)
    ap.add_argument("--root", help="the zoo's folder (default: where the chapters look for it, under $FFL_CACHE)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-networks", type=int, default=None,
                    help="networks per engine batch (default: the profile's zoo.cuda setting on CUDA, else by memory)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--compile", action="store_true", help="train through torch.compile (GPU throughput)")


def _train(args) -> int:
    spec = _spec_of(args)
    if args.root is None:
        args.root = cached_zoo_root(spec)
        print(f"zoo folder: {args.root}", file=sys.stderr)
    tune_malloc()  # this process exists to train: keep large buffers in the heap
    world = as_int("$WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"), minimum=1)
    engine = {}
    if args.profile and args.device.startswith("cuda"):  # the profile's zoo.cuda settings
        engine = cuda_engine_from_profile(args.profile, args.section, arch=args.arch)
    if args.batch_networks is not None:
        engine["batch_networks"] = args.batch_networks
    if world == 1:
        print(train_zoo(spec, args.root, device=args.device, progress=not args.quiet, compile=args.compile, **engine))
        return 0
    rank = as_int("$RANK", os.environ.get("RANK", "0"), minimum=0)
    device = args.device
    if device == "cuda":
        device = f"cuda:{as_int('$LOCAL_RANK', os.environ.get('LOCAL_RANK', '0'), minimum=0)}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if rank == 0:  # write spec.json (and check an existing one) before the other ranks start
        prepare_zoo(spec, args.root, batch_networks=engine.get("batch_networks"), device=device)
    dist.barrier()
    train_zoo(spec, args.root, device=device, progress=not args.quiet and rank == 0,
              shard=(rank, world), compile=args.compile, **engine)
    dist.barrier()
    status = 0
    if rank == 0:
        zoo = finalize_zoo(args.root)
        if zoo is None:
            print("zoo incomplete after all ranks finished", file=sys.stderr)
            status = 1
        else:
            print(zoo)
    dist.barrier()
    dist.destroy_process_group()
    return status


def _spec(args) -> int:
    print(json.dumps(_spec_of(args).to_dict(), indent=1, sort_keys=True))
    return 0


def _merge_arguments(ap) -> None:
    ap.add_argument("parts", nargs="+", help="zoo folders trained with shard=(rank, world)")
    ap.add_argument("--out", required=True)


def _info(args) -> int:
    zoo = Zoo.load(args.root)
    print(zoo, f"mean test acc {float(zoo.accuracy['test'].mean()):.4f}")
    return 0


COMMANDS = (
    Command("train", "train or resume a zoo (one shard per rank under torchrun)", _train_arguments, _train),
    Command("spec", "print the ZooSpec a profile asks for, as JSON (for train --spec)", _add_spec_source, _spec),
    Command("merge", "merge zoo parts trained in separate directories", _merge_arguments,
            lambda args: print(merge_zoos(args.parts, args.out)) or 0),
    Command("info", "summarize a zoo", lambda ap: ap.add_argument("root"), _info),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command_line("python -m ffl.zoo", __doc__.split("\n")[0], COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
