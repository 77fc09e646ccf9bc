"""Named run sizes ("profiles"): ``smoke`` for CI and laptops, ``paper`` for the paper's settings.

A profile is a YAML file in ``profiles/`` with one section per notebook; a notebook reads its own
section. The ``chapters`` section lists the chapters the book build runs (``python -m ffl.book``)
and their papermill parameters. A section's ``zoo`` settings become a zoo spec through
:func:`ffl.zoo.spec_from_profile`; ``profiles/paper.yaml`` is the one home of the paper's settings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name: str) -> dict[str, Any]:
    """The settings of profile ``name`` (``profiles/<name>.yaml``); unknown → ``ValueError``."""
    path = PROFILE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown profile {name!r}; choose one of {available_profiles()}")
    return yaml.safe_load(path.read_text()) or {}
