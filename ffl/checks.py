"""Parameter checks run before any work: each value's type and range, with the valid choices in
the message. Numbers given as text (PyYAML 1.1 reads ``1e-4`` as a string; papermill's ``-p``
passes ``true`` as one) are converted when they spell a number or a truth value exactly (truth
values as YAML 1.2 spells them: ``true``/``True``/``TRUE``, ``false``/``False``/``FALSE``), and
refused otherwise, so a wrong parameter stops the first cell of a notebook, not the hundredth
network of a zoo. :func:`check_parameters` is the one parser of every chapter's run parameters;
:func:`env_folder` reads the folders named by environment variables.
"""
from __future__ import annotations

import math
import re
import numbers
import os
from pathlib import Path
from typing import Any

import torch

#: the YAML 1.2 core schema's spellings of the two truth values (``yes``, ``no``, ``0``, ``1`` are not)
_TRUE = ("true", "True", "TRUE")
_FALSE = ("false", "False", "FALSE")


def as_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as an int (an integral number, or text spelling one), at least ``minimum``."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip()) if any(c in value for c in ".eE") else int(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, numbers.Real) or not math.isfinite(number) \
            or int(number) != number:
        raise ValueError(f"{name} must be an integer, got {value!r}")
    number = int(number)
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {number}")
    return number


def as_float(name: str, value: Any, *, minimum: float | None = None, positive: bool = False,
             below: float | None = None) -> float:
    """``value`` as a finite number (a number, or text spelling one such as ``"1e-4"``);
    ``positive``: > 0; ``minimum``: >= it; ``below``: < it."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, numbers.Real) or not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    # a number stays as given (an int lr stays an int: zoo identities hash the JSON text)
    number = number if type(number) in (int, float) else float(number)
    if positive and not number > 0:
        raise ValueError(f"{name} must be > 0, got {number}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    if below is not None and not number < below:
        raise ValueError(f"{name} must be < {below}, got {number}")
    return number


def as_bool(name: str, value: Any) -> bool:
    """``value`` as a bool: ``True``/``False``, or text spelling one as YAML 1.2 does."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip() in _TRUE + _FALSE:
        return value.strip() in _TRUE
    raise ValueError(f"{name} must be True or False (or the text {'/'.join(_TRUE)}, {'/'.join(_FALSE)}), "
                     f"got {value!r}")


def as_seed(value: Any, name: str = "seed") -> int:
    """A seed: an integer in [0, 2**63)."""
    seed = as_int(name, value, minimum=0)
    if seed >= 2**63:
        raise ValueError(f"{name} must be < 2**63, got {seed}")
    return seed


def available_devices() -> list[str]:
    """The devices this machine can train on: ``cpu``, and ``cuda``, ``cuda:0`` … when present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def as_device(value: Any, name: str = "device") -> str:
    """A device this machine has (``cpu``, ``cuda``, ``cuda:1`` …), as a string."""
    choices = available_devices()
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}") from None
    text = str(value) if isinstance(value, str) else str(dev)
    if text not in choices and str(dev) not in choices:
        raise ValueError(f"{name} {value!r} is not available on this machine; choose one of {choices}")
    return text


def as_data_root(value: Any, name: str = "data_root") -> str | None:
    """``None`` (``$FFL_DATA_ROOT``, else ``./data``; checked too) or a folder path (not an existing file)."""
    if value is None:
        env_folder("FFL_DATA_ROOT", "data")
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(f"{name} must be a folder path or None, got {value!r}")
    as_folder(name, value)
    return str(value)


def as_folder(name: str, value: str | os.PathLike) -> Path:
    """``value`` as a folder path (``~`` expanded) that is not an existing file (it may not exist)."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a file, not a folder")
    return path


_CHECKS = {"seed": as_seed, "device": as_device, "download": lambda v: as_bool("download", v),
           "data_root": as_data_root}


def check_parameters(**given: Any) -> dict[str, Any]:
    """A chapter's run parameters (any of ``seed``, ``device``, ``download``, ``data_root``), checked
    and normalized (``download="true"``, as papermill's ``-p`` passes it, becomes ``True``), in the
    order given: a notebook's first cell reads ``seed, device = check_parameters(seed=seed,
    device=device).values()``."""
    unknown = sorted(set(given) - set(_CHECKS))
    if unknown:
        raise TypeError(f"check_parameters: unknown parameter(s) {unknown}; it checks {sorted(_CHECKS)}")
    return {name: _CHECKS[name](value) for name, value in given.items()}


def env_folder(variable: str, default: str) -> Path:
    """The folder ``$variable`` names (resolved), else ``default``; set but empty counts as unset.
    A variable naming an existing file → ``ValueError`` saying so."""
    value = os.environ.get(variable) or default
    try:
        return as_folder(f"${variable}" if os.environ.get(variable) else "the default", value)
    except ValueError as e:
        raise ValueError(f"{e}; point {variable} at a folder (unset or empty: ./{default})") from None


_KINDS = {  # annotation text -> (what the message calls it, test)
    "int": ("an integer", lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)),
    "float": ("a number", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "str": ("text", lambda v: isinstance(v, str)),
    "None": ("null", lambda v: v is None),
}


def type_error(value: Any, annotation: str) -> str | None:
    """What is wrong with ``value`` for a field annotated ``annotation`` (as text: ``"int | None"``,
    ``"list[int]"``, ``"dict[str, Any]"`` …), e.g. ``"expected an integer, got 2.5"``; ``None`` if
    nothing is. Annotations it does not know accept anything."""
    wanted = []
    for alt in (a.strip() for a in annotation.split("|")):
        items = re.fullmatch(r"(?:list|tuple)\[(\w+)(?:, \.\.\.)?\]", alt)
        if items:
            if isinstance(value, (list, tuple)) and all(type_error(v, items[1]) is None for v in value):
                return None
            wanted.append(f"a list of {_KINDS.get(items[1], ('values',))[0].removeprefix('an ').removeprefix('a ')}s")
        elif alt.startswith("dict"):
            if isinstance(value, dict):
                return None
            wanted.append("a mapping")
        elif alt in _KINDS:
            if _KINDS[alt][1](value):
                return None
            wanted.append(_KINDS[alt][0])
        else:
            return None
    return f"expected {' or '.join(wanted)}, got {value!r}"
