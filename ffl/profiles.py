"""Named run sizes ("profiles"): ``smoke`` for CI and laptops, ``paper`` for the paper's settings.

A profile is a YAML file in ``profiles/`` with one section per notebook; a notebook reads its own
section. The ``chapters`` section lists the chapters the book build runs (``python -m ffl.book``)
and their papermill parameters. A section's ``zoo`` settings become a zoo spec through
:func:`ffl.zoo.spec_from_profile`; ``profiles/paper.yaml`` is the one home of the paper's settings.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"


class _Loader(yaml.SafeLoader):
    """YAML with numbers as YAML 1.2 reads them: PyYAML (YAML 1.1) takes ``1e-4`` (no dot) for text."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)$"),
    list("-+0123456789."))


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings of profile ``name`` (``profiles/<name>.yaml``); unknown → ``ValueError``.
    A profile with ``extends: <base>`` is the base profile with its own settings merged in,
    mapping by mapping (a list or a value replaces the base's)."""
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown profile {name!r}; choose one of {available_profiles()}")
    if name in _seen:
        raise ValueError(f"profiles extend each other in a cycle: {' -> '.join((*_seen, name))}")
    settings = yaml.load(path.read_text(), Loader=_Loader) or {}
    base = settings.pop("extends", None)
    if base is None:
        return settings
    if not isinstance(base, str):
        raise ValueError(f"profile {name!r}: extends must name one profile, got {base!r}")
    return _merged(load_profile(base, (*_seen, name)), settings)


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        both_mappings = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_mappings else value
    return out
