"""A profile loaded as typed settings, once per process: :func:`load` reads ``profiles/<name>.yaml``
and the profiles it extends (:mod:`ffl.profiles`: YAML, schema) and builds a :class:`Profile`, whose
chapter sections are :class:`Section` objects — per section its zoo (:class:`ZooSettings`: tasks ×
runs and the training fields per arch, §4), how each arch's zoo trains on CUDA (:class:`CudaEngine`),
Θ's training (:class:`ffl.features.ProjectionConfig`, §3.3), the protocol splits
(:class:`ffl.protocols.ProtocolSplit`, §4) and the features (:class:`ffl.features.FeatureConfig`,
§3.2). Every value that does not depend on a chapter's choices is checked here, as it is typed: a
bad one is a :class:`ffl.profiles.ProfileError` naming the file and the key. What does depend on
them (arch, dataset, seed: the spec's ranges, splits the tasks × runs allow) is checked once per
chapter by :func:`ffl.experiment.check_choices`.

Library code passes the :class:`Section` down: ``section.spec(arch=, dataset=, …)`` is the one road
from a profile to a :class:`ffl.zoo.spec.ZooSpec`. :func:`spec_from_profile` and
:func:`cuda_engine_from_profile` take names instead, for command lines and tests; both stay
importable from :mod:`ffl.zoo` (which hands them out on first use: this module imports
:mod:`ffl.zoo.spec`, so the package cannot import it while it loads).
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from ffl import implicit_conv, profiles
from ffl.checks import as_float, as_int
from ffl.data import DATASETS, num_tasks
from ffl.features import FeatureConfig, ProjectionConfig
from ffl.models import ARCHS
from ffl.profiles import CUDA_ENGINE, SCHEMA, ProfileError
from ffl.protocols import ProtocolSplit
from ffl.triton_support import BACKENDS
from ffl.zoo.spec import ZooSpec

T = TypeVar("T")
#: the sections a chapter runs an experiment from (those with ``zoo``, ``projection``, ``split``, ``features``)
SECTIONS = tuple(key for key, schema in SCHEMA.fields.items()
                 if isinstance(schema, profiles.Keys) and "zoo" in schema.fields)
#: keys of a profile's ``<section>.zoo.cuda.<arch>``: how a zoo trains on CUDA, not what it trains
CUDA_ENGINE_KEYS = tuple(CUDA_ENGINE)


@dataclasses.dataclass(frozen=True)
class CudaEngine:
    """``<section>.zoo.cuda.<arch>``: the keywords of :func:`ffl.zoo.train.train_zoo` for training
    on CUDA — ``batch_networks`` (networks per engine batch), the convolution / BatchNorm backends
    (:func:`ffl.batched.conv_backend`, :func:`ffl.batched.bn_backend`) and ``conv_tiles``, a tile
    table of the Triton convolution's measured blockings (a file under ``profiles/``, see
    :func:`ffl.implicit_conv.read_tile_table`; held as its full path). They change speed and
    rounding, not the zoo's spec (as the GPU model does), so they are not part of its identity; the
    zoo's ``provenance.json`` records what ran."""

    batch_networks: int | None = None
    conv_backend: str | None = None
    bn_backend: str | None = None
    conv_tiles: str | None = None

    @classmethod
    def from_settings(cls, raw: Mapping[str, Any], where: str) -> CudaEngine:
        out = dict(raw)  # keys and types: checked by the schema; here what they mean
        try:
            if "batch_networks" in out:
                out["batch_networks"] = as_int("batch_networks", out["batch_networks"], minimum=1)
            for key in ("conv_backend", "bn_backend"):
                if key in out and out[key] not in BACKENDS:
                    raise ValueError(f"{key} {out[key]!r} is not one of {', '.join(BACKENDS)}")
            if "conv_tiles" in out:
                path = profiles.PROFILE_DIR / str(out["conv_tiles"])
                try:
                    implicit_conv.read_tile_table(path)
                except ValueError as e:
                    raise ValueError(f"conv_tiles: {e}") from None
                out["conv_tiles"] = str(path)
        except ValueError as e:
            raise ProfileError(f"{where}: {e}") from None
        return cls(**out)

    def kwargs(self) -> dict[str, Any]:
        """The keywords this engine gives :func:`ffl.zoo.train.train_zoo` (those the profile sets)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class ZooSettings:
    """``<section>.zoo``: the first ``tasks`` tasks × ``runs`` runs, the data settings per dataset,
    the training fields per arch (those of :class:`ffl.zoo.spec.ZooSpec`; their ranges are checked
    as a spec is built, :meth:`Section.spec`) and the CUDA engine per arch. Read-only: the
    accessors hand out copies."""

    tasks: int | None = None
    runs: int | None = None
    data_kwargs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    arch: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    cuda: Mapping[str, CudaEngine] = dataclasses.field(default_factory=dict)


class _OutOfRange(ValueError):
    """A value out of range, with its key (so that the error names the file that sets it)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclasses.dataclass(frozen=True)
class PerArch(Generic[T]):
    """A section's ``projection:`` or ``features:``, given once for every arch (key ``None``) or
    once per arch; ``seeded``: the keys whose setting gives its own ``seed``, which wins over the
    run's."""

    name: str
    where: str
    configs: Mapping[str | None, T]
    seeded: frozenset = frozenset()

    @classmethod
    def from_settings(cls, name: str, raw: Mapping[str, Any] | None, build: Callable[[dict], T],
                      where: Callable[..., str]) -> PerArch[T]:
        """``where(*keys)``: the file and key path of a key under this setting, for errors."""
        raw = dict(raw or {})
        per_arch = [k for k in raw if k in ARCHS]
        if per_arch and len(per_arch) != len(raw):  # refused by the schema already; kept for built profiles
            raise ProfileError(f"{where()}: mixes per-arch entries {per_arch} with settings "
                               f"{sorted(set(raw) - set(per_arch))}; give one dict, or one dict per arch")
        given = {arch: dict(raw[arch] or {}) for arch in per_arch} if per_arch else {None: raw}
        configs = {}
        for key, value in given.items():
            try:
                configs[key] = build(value)
            except (TypeError, ValueError) as e:
                keys = (() if key is None else (key,)) + ((e.key,) if isinstance(e, _OutOfRange) else ())
                raise ProfileError(f"{where(*keys)}: {e}") from None
        return cls(name, where(), configs, frozenset(key for key, value in given.items() if "seed" in value))

    def __call__(self, arch: str, *, seed: int | None = None) -> T:
        """The setting for ``arch`` (a copy), seeded with ``seed`` unless the profile seeds it."""
        key = None if None in self.configs else arch
        if key not in self.configs:
            raise ValueError(f"{self.where}: has entries for {list(self.configs)} but none for {arch!r}")
        config = self.configs[key]
        return dataclasses.replace(config, **({"seed": seed} if seed is not None and key not in self.seeded else {}))


def _projection(raw: dict) -> ProjectionConfig:
    """Θ's training (§3.3) from a profile, its numbers in range."""
    config = ProjectionConfig.from_dict(raw)
    checks = [(name, as_float, limits) for name, limits in (
        ("lr", {"positive": True}), ("momentum", {"minimum": 0.0, "below": 1.0}), ("weight_decay", {"minimum": 0.0}),
        ("lr_gamma", {"positive": True}))] + [(name, as_int, {"minimum": 1}) for name in ("epochs", "batch_size")]
    for name, check, limits in checks:
        try:
            check(name, getattr(config, name), **limits)
        except ValueError as e:
            raise _OutOfRange(name, str(e)) from None
    return config


@dataclasses.dataclass(frozen=True)
class Section:
    """One chapter section of a profile (``cifar100``, ``namedata``, ``tiny_imagenet``, ``factors``),
    typed and checked as the profile loads; ``extra``: its other keys as the YAML gives them
    (``factors``: ``settings``, see :func:`ffl.experiment.factor_settings`)."""

    profile: str
    name: str
    file: str  # the profile's own file, as errors name it (e.g. ``profiles/smoke.yaml``)
    zoo: ZooSettings | None
    projection: PerArch[ProjectionConfig]
    features: PerArch[FeatureConfig]
    split: ProtocolSplit
    split_seeded: bool = False  # the profile gives the split's seed (else the run's)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def projection_for(self, arch: str, *, seed: int = 0) -> ProjectionConfig:
        """Θ's training for ``arch`` (one setting for every arch, or one per arch), seeded with ``seed``."""
        return self.projection(arch, seed=seed)

    def features_for(self, arch: str) -> FeatureConfig:
        """The features of ``arch``'s networks (one setting for every arch, or one per arch)."""
        return self.features(arch)

    def split_for(self, seed: int = 0) -> ProtocolSplit:
        """The protocol splits, seeded with ``seed`` (unless the profile gives the seed)."""
        return self.split if self.split_seeded else dataclasses.replace(self.split, seed=seed)

    def spec(self, *, arch: str, dataset: str, seed: int = 0, data_root: str | None = None, download: bool = False,
             **overrides: Any) -> ZooSpec:
        """The :class:`ZooSpec` this section asks for: ``zoo.tasks`` (the first n tasks, or every
        task of a real dataset that has fewer: CIFAR-10's 45 in place of CIFAR-100's 50) ×
        ``zoo.runs``, ``zoo.data_kwargs[dataset]`` and the training fields under ``zoo.arch[arch]``.
        ``overrides`` replace fields (e.g. ``tasks=``, ``runs=``, ``precision=``). The paper's
        settings (§4) are the ``paper`` profile's."""
        zoo = self.zoo
        if zoo is None:
            raise ValueError(f"profile {self.profile!r} has no zoo settings for {self.name!r}")
        if arch not in zoo.arch:
            raise ValueError(f"profile {self.profile!r} defines no {arch!r} zoo for {self.name!r}; "
                             f"it has {sorted(zoo.arch)}")
        n_tasks = zoo.tasks
        if dataset in DATASETS and dataset != "synthetic" and isinstance(n_tasks, int):
            n_tasks = min(n_tasks, num_tasks(dataset))
        fields = {
            "arch": arch, "dataset": dataset, "tasks": list(range(n_tasks)), "runs": zoo.runs,
            "seed": seed, "data_root": data_root, "download": download,
            "data_kwargs": copy.deepcopy(dict(zoo.data_kwargs.get(dataset, {}))),
            **copy.deepcopy(dict(zoo.arch[arch])), **overrides,
        }
        return ZooSpec.from_dict(fields)

    def cuda_engine(self, arch: str) -> dict[str, Any]:
        """The keywords of :func:`ffl.zoo.train.train_zoo` that ``zoo.cuda.<arch>`` sets for CUDA
        (:class:`CudaEngine`); empty when the profile sets none."""
        engine = self.zoo.cuda.get(arch) if self.zoo is not None else None
        return engine.kwargs() if engine is not None else {}


@dataclasses.dataclass(frozen=True, eq=False)
class Profile:
    """A profile as :func:`load` read it: its name, its files (its own, then those it extends), its
    chapter sections typed, and its merged settings (:attr:`settings`, a copy: ``chapters``,
    ``beyond``, ``cnn_gap``, ``alignment_proof_check``, ``book_dir`` are read from there)."""

    name: str
    files: tuple[Path, ...]
    sections: Mapping[str, Section]
    _raw: Mapping[str, Any] = dataclasses.field(repr=False)  # read through .settings, a copy

    @property
    def settings(self) -> dict[str, Any]:
        return copy.deepcopy(dict(self._raw))

    def section(self, name: str) -> Section:
        if name not in self.sections:
            raise ValueError(f"profile {self.name!r} has no settings for {name!r}")
        return self.sections[name]

    @classmethod
    def from_settings(cls, name: str, settings: Mapping[str, Any],
                      sources: list[tuple[Path, dict[str, Any]]] | None = None) -> Profile:
        """Type and check ``settings`` (merged, already fit to :data:`ffl.profiles.SCHEMA`);
        ``sources``: each file with its own settings, so that an error names the file that sets the key."""
        sources = sources or [(profiles.PROFILE_DIR / f"{name}.yaml", dict(settings))]
        settings = copy.deepcopy(dict(settings))

        def where(*keys: str) -> str:
            """``<file>: <key path>``, the file the first of the chain that sets the key."""
            for path, own in sources:
                node: Any = own
                for key in keys:
                    node = node.get(key) if isinstance(node, dict) else None
                if node is not None:
                    break
            else:
                path = sources[0][0]
            shown = f"{path.parent.name}/{path.name}"  # as ffl.profiles names a file
            return f"{shown}: {'.'.join(keys)}" if keys else shown

        sections = {key: _section(name, key, settings[key], where) for key in SECTIONS if key in settings}
        return cls(name, tuple(path for path, _ in sources), sections, settings)


def _section(profile: str, key: str, raw: dict[str, Any], where: Callable[..., str]) -> Section:
    """Section ``key`` of profile ``profile`` typed; a value out of range → ``ProfileError`` naming file and key."""
    zoo = None
    if "zoo" in raw:
        z = raw["zoo"]
        cuda = {arch: CudaEngine.from_settings(engine, where(key, "zoo", "cuda", arch))
                for arch, engine in (z.get("cuda") or {}).items()}
        zoo = ZooSettings(tasks=z.get("tasks"), runs=z.get("runs"), data_kwargs=z.get("data_kwargs") or {},
                          arch=z.get("arch") or {}, cuda=cuda)
    split = raw.get("split") or {}
    try:
        typed_split = ProtocolSplit(**split)
    except (TypeError, ValueError) as e:
        raise ProfileError(f"{where(key, 'split')}: {e}") from None
    return Section(
        profile=profile, name=key, file=where(), zoo=zoo,
        projection=PerArch.from_settings("projection", raw.get("projection"), _projection,
                                         lambda *keys: where(key, "projection", *keys)),
        features=PerArch.from_settings("features", raw.get("features"), FeatureConfig.from_dict,
                                       lambda *keys: where(key, "features", *keys)),
        split=typed_split, split_seeded="seed" in split,
        extra={k: v for k, v in raw.items() if k not in ("zoo", "projection", "split", "features")})


_LOADED: dict[Path, tuple[tuple[tuple[Path, bytes], ...], Profile]] = {}


def load(profile: str | Profile) -> Profile:
    """Profile ``profile`` read, checked and typed: once per process, again only when one of its
    files changes (a :class:`Profile` is returned as it is). Unknown name → ``ValueError`` listing
    the profiles; a bad file or value → :class:`ffl.profiles.ProfileError` naming the file and key."""
    if isinstance(profile, Profile):
        return profile
    own = profiles.PROFILE_DIR / f"{profile}.yaml"
    known = _LOADED.get(own) if isinstance(profile, str) and profiles.NAME.fullmatch(profile) else None
    if known is not None and all(_read(path) == data for path, data in known[0]):
        return known[1]
    sources, settings = profiles.read_profile(profile)
    loaded = Profile.from_settings(profile, settings, sources)
    _LOADED[own] = (tuple((path, _read(path)) for path, _ in sources), loaded)
    return loaded


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def spec_from_profile(profile: str | Profile, section: str, *, arch: str, dataset: str, **fields: Any) -> ZooSpec:
    """By names, for command lines and tests: ``load(profile).section(section).spec(arch=, dataset=, …)``
    (:meth:`Section.spec`; ``fields``: ``seed``, ``data_root``, ``download`` and overrides)."""
    return load(profile).section(section).spec(arch=arch, dataset=dataset, **fields)


def cuda_engine_from_profile(profile: str | Profile, section: str, *, arch: str) -> dict[str, Any]:
    """By names: ``load(profile).section(section).cuda_engine(arch)`` (:meth:`Section.cuda_engine`)."""
    return load(profile).section(section).cuda_engine(arch)
