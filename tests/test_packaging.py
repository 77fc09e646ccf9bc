"""Packaging stays consistent: conda and pip users get the same packages."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~ ;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_reqs = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_reqs = {r for r in pip_section if not r.startswith("-e")}
    assert conda_reqs == pip_reqs, (
        f"only in environment.yml: {sorted(conda_reqs - pip_reqs)}; "
        f"only in pyproject.toml: {sorted(pip_reqs - conda_reqs)}"
    )
    assert "-e ." in pip_section
    assert "python=3.11" in env["dependencies"]


def test_pinned_versions():
    deps = {_name(r): r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert deps["torch"] == "torch==2.14.1"
    assert deps["torchvision"] == "torchvision==0.29.1"
    assert deps["jupyter-book"] == "jupyter-book==1.0.4.post1"
