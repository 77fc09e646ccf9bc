"""Numbers the paper itself reports, drawn beside ours.

Only numbers read from the paper, each with where it was read, belong here. A section or
architecture without entries means we have not transcribed the paper's numbers for it; the
figures then show our numbers alone and say so.
"""
from __future__ import annotations

import pandas as pd

# (section, arch) -> rows of {index, feature, protocol, metric, value}; source noted per entry.
REPORTED: dict[tuple[str, str], list[dict]] = {}
SOURCES: dict[tuple[str, str], str] = {}


def reported(section: str, arch: str) -> pd.DataFrame:
    """The paper's numbers for ``section`` and ``arch`` (empty frame when not transcribed)."""
    rows = REPORTED.get((section, arch), [])
    return pd.DataFrame(rows, columns=["index", "feature", "protocol", "metric", "value"])


def source(section: str, arch: str) -> str | None:
    """Where the paper's numbers for ``section``/``arch`` were read, if we have them."""
    return SOURCES.get((section, arch))
