"""scripts/gpu_payload_size.py counts what a GPU run sends and fails over 64 MiB."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_payload_size.py"
LIMIT = 64 * 2**20


def _repo(tmp_path: Path, carried_bytes: int) -> Path:
    """A git repo with 1,000 tracked bytes, 500 untracked ones, an ignored 10 MiB log that
    nothing carries, a deleted tracked file, and ``.gpu/big`` (ignored, sparse) of the given size."""
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / ".gitignore").write_text("/.gpu/\n*.log\n")
    (tmp_path / "tracked.txt").write_bytes(b"x" * (1000 - len("/.gpu/\n*.log\n")))
    (tmp_path / "gone.txt").write_text("deleted after adding")
    run("add", ".gitignore", "tracked.txt", "gone.txt")
    (tmp_path / "gone.txt").unlink()
    (tmp_path / "untracked.txt").write_bytes(b"y" * 500)
    with open(tmp_path / "run.log", "wb") as f:
        f.truncate(10 * 2**20)
    (tmp_path / ".gpu").mkdir()
    with open(tmp_path / ".gpu" / "big", "wb") as f:
        f.truncate(carried_bytes)
    return tmp_path


def _size(repo: Path, *carry: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *carry], cwd=repo, capture_output=True, text=True)


def _bytes(report: str, part: str) -> int:
    line = next(ln for ln in report.splitlines() if ln.split()[0] == part)
    return int(line.split()[3].replace(",", ""))


def test_counts_tree_and_carried_paths_up_to_the_limit(tmp_path):
    repo = _repo(tmp_path, LIMIT - 1500)
    alone = _size(repo)
    assert alone.returncode == 0
    assert _bytes(alone.stdout, "total") == 1500  # tracked + untracked; not the ignored log
    exact = _size(repo, ".gpu")
    assert exact.returncode == 0, exact.stdout
    assert _bytes(exact.stdout, ".gpu") == LIMIT - 1500
    assert _bytes(exact.stdout, "total") == LIMIT


def test_fails_over_the_limit_and_names_absent_carried_paths(tmp_path):
    repo = _repo(tmp_path, LIMIT - 1500 + 1)
    over = _size(repo, ".gpu", "nothere")
    assert over.returncode == 1
    assert "nothere: absent" in over.stderr
    assert _bytes(over.stdout, "total") == LIMIT + 1
    assert "TOO BIG" in over.stdout
