"""Parameter checks run before any work: each value's type and range, with the valid choices in
the message. Numbers given as text (PyYAML 1.1 reads ``1e-4`` as a string; papermill's ``-p``
passes ``true`` as one) are converted when they spell a number or a truth value exactly, and
refused otherwise, so a wrong parameter stops the first cell of a notebook, not the hundredth
network of a zoo.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any

import torch

_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")


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
    """``value`` as a bool: ``True``/``False``, or the text ``true``/``false`` (also yes/no/1/0)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be True or False, got {value!r}")


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
    """``None`` (``$FFL_DATA_ROOT``, else ``./data``) or a folder path (not an existing file)."""
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ValueError(f"{name} must be a folder path or None, got {value!r}")
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {str(path)!r} is a file, not a folder")
    return str(value)
