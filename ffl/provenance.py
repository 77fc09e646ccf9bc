"""What produced a result: code commit, date, hardware, software. Recorded in every executed
notebook (metadata and visibly on the page) so a reader knows what they are looking at."""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import ffl
from ffl.profiles import read_profile

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """Short commit of the working tree, with ``-dirty`` when it has uncommitted changes;
    ``$FFL_COMMIT`` when set: ``python -m ffl.book`` reads the commit once before its first
    chapter and passes it on this way (the chapters it writes would otherwise mark the next ones
    ``-dirty``), and a copy of the tree run where git history is not at hand (the GPU machine of
    ``scripts/gpu_chapter.sh``) names it the same way."""
    if os.environ.get("FFL_COMMIT"):
        return os.environ["FFL_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: str = "cpu") -> str:
    """One line: the accelerator if ``device`` is a GPU, else the CPU, with core count."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    return f"{_cpu_name()}, {os.cpu_count()} cores"


def profile_record(profile: str) -> dict[str, Any]:
    """What profile ``profile`` was when it ran: SHA-256 of its files (its own and those it
    extends), whether git holds them as they are (``committed``, ``modified``, ``untracked``,
    ``unknown``: the commit alone does not say, e.g. for an edited or a new profile) and its
    resolved settings."""
    sources, settings = read_profile(profile)  # as the chapter read it (ffl.profiles reads a file once)
    files = [path for path, _ in sources]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--", *map(str, files)], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True, timeout=10).stdout
        codes = {line[:2] for line in out.splitlines()}
        state = ("untracked" if codes & {"??", "!!"} else "modified") if codes else "committed"
    except (OSError, subprocess.SubprocessError):
        state = "unknown"
    return {"profile_sha256": h.hexdigest()[:16], "profile_state": state, "profile_settings": settings}


def run_info(device: str = "cpu", **params: Any) -> dict[str, Any]:
    """Commit, UTC date, hardware and library versions, plus the run's own parameters; with a
    ``profile`` parameter also :func:`profile_record` (the profile's hash, git state, settings)."""
    return {
        **params,
        **(profile_record(params["profile"]) if isinstance(params.get("profile"), str) else {}),
        "device": device,
        "commit": git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hardware(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ffl": ffl.__version__,
    }


def markdown_table(info: dict[str, Any]) -> str:
    """The run's values as a two-column table (mappings, such as the resolved settings, are left
    to the notebook's metadata)."""
    rows = "\n".join(f"| {k} | `{v}` |" for k, v in info.items() if not isinstance(v, dict))
    return f"| run | value |\n|---|---|\n{rows}\n"
