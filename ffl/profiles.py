"""Named run sizes ("profiles"): ``smoke`` for CI and laptops, ``paper`` for the paper's settings.

A profile is a YAML file in ``profiles/`` with one section per notebook; a notebook reads its own
section. The ``chapters`` section lists the chapters the book build runs (``python -m ffl.book``)
and their papermill parameters. A section's ``zoo`` settings become a zoo spec through
:meth:`ffl.profile_settings.Section.spec`; ``profiles/paper.yaml`` is the one home of the paper's settings.

Every file is checked when it is loaded against :data:`SCHEMA` (known keys, value types; YAML
syntax; no duplicate keys): a typo or a wrong type stops with the file and the key path, e.g.
``profiles/x.yaml: tiny_imagenet.zoo.tasks: expected an integer, got 2.5``. This module reads the
files; the library reads a profile through :func:`ffl.profile_settings.load`, once per process, as
typed settings whose values are checked as they are typed (ranges, backends, tile tables); what
depends on a chapter's choices is checked by :func:`ffl.experiment.check_choices`.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ffl.checks import type_error
from ffl.data import DATASETS, data_kwargs_types
from ffl.engine import TrainConfig
from ffl.features import FeatureConfig, ProjectionConfig
from ffl.models import ARCHS
from ffl.protocols import ProtocolSplit

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"
NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
#: a profile's, a notebook's or a chapter output's name: a file name, never a path
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class ProfileError(ValueError):
    """A profile file that cannot be read or does not fit :data:`SCHEMA` (names the file and key)."""


class _Loader(yaml.SafeLoader):
    """YAML with numbers as YAML 1.2 reads them (PyYAML, YAML 1.1, takes ``1e-4`` for text) and
    duplicate keys refused (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat what it merges
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)$"),
    list("-+0123456789."))


# --------------------------------------------------------------------------------------------
# The schema: a mapping of known keys (Keys), a mapping keyed by choices (Each), a list (Items),
# an annotation text ("int", "dict", …; see ffl.checks.type_error) or a function (value, where).
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Keys:
    fields: dict[str, Any]
    required: tuple[str, ...] = ()
    then: Callable[[dict, str], None] | None = None  # a further check of the whole mapping


@dataclasses.dataclass(frozen=True)
class Each:
    choices: tuple[str, ...] | None  # None: any key
    value: Callable[[str], Any]  # key -> the schema of its value


@dataclasses.dataclass(frozen=True)
class Items:
    item: Any


def _fields(cls) -> dict[str, str]:
    return {f.name: f.type for f in dataclasses.fields(cls)}


def _features(value: Any, where: str) -> None:
    """``features:`` is one FeatureConfig mapping, or one per arch."""
    per_arch = isinstance(value, dict) and any(k in ARCHS for k in value)
    _check(value, Each(ARCHS, lambda _: Keys(_fields(FeatureConfig))) if per_arch else Keys(_fields(FeatureConfig)),
           where)


def notebook_parameters(notebook: str) -> list[str]:
    """The names a notebook's ``parameters`` cell sets (from ``notebooks/<notebook>.py``)."""
    text = (NOTEBOOK_DIR / f"{notebook}.py").read_text()
    cell = text.split('# %% tags=["parameters"]', 1)[1].split("\n# %%", 1)[0]
    return re.findall(r"^(\w+)\s*=", cell, flags=re.M)


def _chapter(entry: dict, where: str) -> None:
    for key in ("notebook", "output"):
        if key in entry and not NAME.fullmatch(entry[key]):
            raise ProfileError(f"{where}.{key}: expected a file name (letters, digits, _ . -), got {entry[key]!r}")
    if not (NOTEBOOK_DIR / f"{entry['notebook']}.py").is_file():
        raise ProfileError(f"{where}.notebook: no notebook {entry['notebook']!r}; choose one of "
                           f"{sorted(p.stem for p in NOTEBOOK_DIR.glob('*.py'))}")
    known = notebook_parameters(entry["notebook"])
    unknown = sorted(set(entry.get("parameters") or {}) - set(known))
    if unknown:
        raise ProfileError(f"{where}.parameters: unknown parameter(s) {unknown} of notebook "
                           f"{entry['notebook']!r}; it takes {known}")


def _chapters(value: Any, where: str) -> None:
    _check(value, Items(Keys({"notebook": "str", "output": "str", "title": "str", "parameters": "dict"},
                             required=("notebook",), then=_chapter)), where)
    outputs = [c.get("output", c["notebook"]) for c in value]
    twice = sorted({o for o in outputs if outputs.count(o) > 1})
    if twice:
        raise ProfileError(f"{where}: two chapters write the same output {twice}; give each its own `output`")


def _book_dir(value: Any, where: str) -> None:
    _check(value, "str", where)
    if Path(value).is_absolute() or ".." in Path(value).parts:
        raise ProfileError(f"{where}: expected a folder inside the repository (relative, no '..'), got {value!r}")


def _extends(value: Any, where: str) -> None:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ProfileError(f"{where}: expected the name of one profile in {PROFILE_DIR.name}/ (not a path), "
                           f"got {value!r}")


_TRAINING = {**_fields(TrainConfig), "model_kwargs": "dict"}
#: ``<section>.zoo.cuda.<arch>``: how a zoo trains on CUDA (see :class:`ffl.profile_settings.CudaEngine`)
CUDA_ENGINE = {"batch_networks": "int", "conv_backend": "str", "bn_backend": "str", "conv_tiles": "str"}
_ZOO = Keys({"tasks": "int", "runs": "int",
             "data_kwargs": Each(DATASETS, lambda dataset: Keys(data_kwargs_types(dataset))),
             "arch": Each(ARCHS, lambda _: Keys(_TRAINING)),
             "cuda": Each(ARCHS, lambda _: Keys(CUDA_ENGINE))})
def _projection(value: Any, where: str) -> None:
    """``projection:`` is one ProjectionConfig mapping, or one per arch."""
    per_arch = isinstance(value, dict) and any(k in ARCHS for k in value)
    _check(value, Each(ARCHS, lambda _: Keys(_fields(ProjectionConfig))) if per_arch else Keys(_fields(ProjectionConfig)),
           where)


_EXPERIMENT = {"zoo": _ZOO, "projection": _projection, "split": Keys(_fields(ProtocolSplit)),
               "features": _features}
SCHEMA = Keys({
    "extends": _extends,
    "book_dir": _book_dir,
    "chapters": _chapters,
    "alignment_proof_check": Keys({
        "permutations": "int", "batch": "int", "explicit_max_dim": "int", "option_permutations": "int",
        "gru_lags": "int", "models": Each(ARCHS, lambda _: "dict"),
        "cost": Keys({"arch": "str", "model_kwargs": "dict", "explicit_max_dim": "int"})}),
    "cifar100": Keys(_EXPERIMENT), "namedata": Keys(_EXPERIMENT), "tiny_imagenet": Keys(_EXPERIMENT),
    "factors": Keys({**_EXPERIMENT, "settings": Each(None, lambda _: Keys({"arch": "str", **_TRAINING},
                                                                          required=("arch",)))}),
    # beyond the paper (ffl.baselines): the chapters' zoos compared by every similarity method
    "beyond": Keys({"zoos": Items(Keys({"section": "str", "arch": "str", "dataset": "str"},
                                       required=("section", "arch", "dataset"))),
                    "probe": Keys({"size": "int", "unbiased": "bool"}),
                    "weight_matching": Keys({"max_sweeps": "int", "references_per_task": "int | None"})},
                   required=("zoos",)),
    # the CNN-gap study (ffl.gap): zoo settings override a section's zoo, Θ settings its projection
    "cnn_gap": Keys({"section": "str", "arch": "str", "dataset": "str", "max_index": "int",
                     "reference_theta": "str", "adopted_theta": "str",
                     "zoos": Each(None, lambda _: Keys({"tasks": "int", "runs": "int", **_TRAINING})),
                     "thetas": Each(None, lambda _: Keys(_fields(ProjectionConfig))),
                     "feature_zoo": "str",
                     "features": Each(None, lambda _: Keys(_fields(FeatureConfig))),
                     "throughput": Keys({"widths": "list", "batch": "int", "steps": "int", "repeat": "int"})},
                    required=("section", "arch", "dataset", "zoos", "thetas", "reference_theta", "adopted_theta")),
})


def _check(value: Any, schema: Any, where: str) -> None:
    """``ProfileError`` naming the key path ``where`` unless ``value`` fits ``schema``."""
    if callable(schema) and not isinstance(schema, (Keys, Each, Items)):
        return schema(value, where)
    if isinstance(schema, str):
        wrong = type_error(value, schema)
        if wrong:
            raise ProfileError(f"{where}: {wrong}")
        return
    if isinstance(schema, Items):
        if not isinstance(value, list):
            raise ProfileError(f"{where}: expected a list, got {value!r}")
        for i, item in enumerate(value):
            _check(item, schema.item, f"{where}[{i}]")
        return
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: expected a mapping, got {value!r}" if where else
                           f"expected a mapping of sections, got {value!r}")
    choices = schema.fields if isinstance(schema, Keys) else schema.choices
    for key, item in value.items():
        at = f"{where}.{key}" if where else str(key)
        if choices is not None and key not in choices:
            raise ProfileError(f"{at}: unknown key; expected one of {sorted(choices)}")
        _check(item, schema.fields[key] if isinstance(schema, Keys) else schema.value(key), at)
    if isinstance(schema, Keys):
        missing = [k for k in schema.required if k not in value]
        if missing:
            raise ProfileError(f"{where}: missing {', '.join(missing)}")
        if schema.then is not None:
            schema.then(value, where)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def profile_files(name: str) -> list[Path]:
    """The files profile ``name`` is read from: its own, then those it extends, in order."""
    return [path for path, _ in read_profile(name)[0]]


#: each file as last read: its bytes and its settings, checked (a file is parsed again only when it changes)
_READ: dict[Path, tuple[bytes, dict[str, Any]]] = {}


def read_profile_file(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings of ``profiles/<name>.yaml`` alone (``extends`` not resolved), checked against
    :data:`SCHEMA` (a copy: the file is parsed once per process, again when it changes); unknown
    name → ``ValueError`` listing the profiles."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or not (PROFILE_DIR / f"{name}.yaml").is_file():
        raise ValueError(f"unknown profile {name!r}; choose one of {available_profiles()}")
    if name in _seen:
        raise ValueError(f"profiles extend each other in a cycle: {' -> '.join((*_seen, name))}")
    path = PROFILE_DIR / f"{name}.yaml"
    shown = f"{PROFILE_DIR.name}/{path.name}"
    data = path.read_bytes()
    if path in _READ and _READ[path][0] == data:
        return copy.deepcopy(_READ[path][1])
    try:
        stream = io.StringIO(data.decode("utf-8"))
        stream.name = str(path)  # YAML's errors name the file
        settings = yaml.load(stream, Loader=_Loader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ProfileError(f"{shown}: not valid YAML: {e}") from None
    try:
        _check({} if settings is None else settings, SCHEMA, "")
    except ProfileError as e:
        raise ProfileError(f"{shown}: {e}") from None
    _READ[path] = (data, settings or {})
    return copy.deepcopy(settings or {})


def load_profile(name: str) -> dict[str, Any]:
    """The settings of profile ``name`` (``profiles/<name>.yaml``), a dict of its own; unknown →
    ``ValueError``. A profile with ``extends: <base>`` is the base profile with its own settings
    merged in, mapping by mapping (a list or a value replaces the base's). The library reads a
    profile once per process, typed: :func:`ffl.profile_settings.load`."""
    return read_profile(name)[1]


def read_profile(name: str, _seen: tuple[str, ...] = ()) -> tuple[list[tuple[Path, dict[str, Any]]], dict[str, Any]]:
    """Each file of profile ``name`` with its own settings (its own file first, then those it
    extends), and the settings merged (:func:`load_profile`): one reading of every file."""
    own = dict(read_profile_file(name, _seen))
    base = own.pop("extends", None)
    sources = [(PROFILE_DIR / f"{name}.yaml", own)]
    if base is None:
        return sources, own
    base_sources, base_settings = read_profile(base, (*_seen, name))
    return sources + base_sources, _merged(base_settings, own)


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        both_mappings = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_mappings else value
    return out


def chapter_entries(profile: str, *, dataset: str | None = None) -> list[dict[str, Any]]:
    """The chapters a profile's book runs (its ``chapters:``), in order: dicts with ``notebook``,
    ``output``, ``parameters`` (``profile`` first) and the ``title`` template, if any. ``dataset``
    replaces the profile's dataset in every chapter that takes one (e.g. ``cifar10`` for the
    CIFAR-100 chapters where CIFAR-100 cannot be had)."""
    plan = load_profile(profile).get("chapters")
    if not plan:
        raise ValueError(f"profile {profile!r} lists no chapters")
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    out = []
    for entry in plan:
        params = {"profile": profile, **entry.get("parameters", {})}
        if dataset is not None and "dataset" in params:
            params["dataset"] = dataset
        out.append({"notebook": entry["notebook"], "output": entry.get("output", entry["notebook"]),
                    "parameters": params, "title": entry.get("title")})
    return out
