"""What determines a zoo (§4): :class:`ZooSpec`, its identity and hash, and each network's seeds.

A zoo is T tasks × R runs of one architecture trained alike. :class:`ZooSpec` holds everything
that decides its bytes: each network's training (the fields of :class:`ffl.engine.TrainConfig`)
plus architecture, dataset, tasks, runs and seed; every field is checked when a spec is made
(``model_kwargs`` by building one network on the meta device). Its :meth:`ZooSpec.identity` leaves
out where the data lives; :func:`spec_sha256` names that identity, and :func:`spec_diff` says how
two identities differ.

Seeds: network (task t, run r) is initialized from ``run_seed(spec.seed, t, r)`` and draws its
minibatch order/augmentation from ``data_seed(spec.seed, t, r)``; both are SHA-256 derived, so
they differ across runs and tasks and do not depend on how the zoo is chunked or sharded.

A profile's zoo settings become a spec through :meth:`ffl.profile_settings.Section.spec`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ffl.checks import as_bool, as_data_root, as_float, as_int, as_seed
from ffl.data import check_data_kwargs
from ffl.data.tasks import check_dataset, check_task
from ffl.engine import TrainConfig
from ffl.models import ARCHS, build_model
from ffl.seeds import derive_seed

#: spec fields that do not change the zoo (where the data lives, whether to download it)
NON_IDENTITY_FIELDS = ("data_root", "download")
#: identity fields added after format 1, with the value their absence means
LATER_FIELDS = {"precision": "fp32", "crop_padding": 4, "sampling": "epochs"}


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


def spec_sha256(identity: dict[str, Any]) -> str:
    """SHA-256 of a spec identity (:meth:`ZooSpec.identity`) as key-sorted JSON: recorded in
    ``spec.json``, in every shard's sidecar and in the manifest, so shards, manifest and spec
    cannot be mixed up."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def run_seed(seed: int, task: int, run: int) -> int:
    """Initialization seed of network (task, run): SHA-256 of (seed, task, run), 63 bits."""
    return derive_seed("ffl-zoo-init", seed, task, run, sep=":")


def data_seed(seed: int, task: int, run: int) -> int:
    """Seed of network (task, run)'s minibatch order and augmentation."""
    return derive_seed("ffl-zoo-data", seed, task, run, sep=":")
