"""What a GPU run would send: the repository's tracked and untracked-not-ignored files, plus the
ignored paths it carries; exits 1 over the device machine's 64 MiB limit.

    python3 scripts/gpu_payload_size.py .gpu        # carried paths relative to the repository root

The repository is the one holding the current directory (run it in the checkout that the GPU
tool sends).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LIMIT = 64 * 2**20
ROOT = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True,
                          text=True).stdout.strip())


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a file: its size); links count as links."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum((Path(d) / f).lstat().st_size for d, _, files in os.walk(path) for f in files)


def main(carried: list[str]) -> int:
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    files = [ROOT / f for f in listed if f]
    parts = {"repository": sum(tree_bytes(f) for f in files if f.is_symlink() or f.is_file())}
    if (ROOT / "shared").is_dir():  # travels too when the checkout has one
        parts["shared"] = tree_bytes(ROOT / "shared")
    for name in carried:
        if not (ROOT / name).exists():
            print(f"{name}: absent, so not carried", file=sys.stderr)
            continue
        parts[name] = tree_bytes(ROOT / name)
    parts["total"] = sum(parts.values())
    for name, size in parts.items():
        print(f"{name:16s} {size / 2**20:8.2f} MiB {size:14,d} bytes")
    total = parts["total"]
    print(f"limit            {LIMIT / 2**20:8.2f} MiB {LIMIT:14,d} bytes: {'fits' if total <= LIMIT else 'TOO BIG'}")
    return 0 if total <= LIMIT else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
