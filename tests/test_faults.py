"""Reliability: what a hostile or unlucky user can do wrong, and that each fault stops with a
message naming the cause (and the file, where there is one) and writes or loses nothing.

Sections: bad parameters; diverged training; degenerate protocol splits; caches that must not lie
(results, zoos, loader caches, orphaned temporary files); errors that name the file; the book CLI.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffl.experiment import check_choices, check_parameters
from ffl.zoo import ZooSpec, train_zoo

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> dict:
    """A zoo spec of 2 tasks × 3 runs of a tiny MLP on synthetic data (trains in about a second)."""
    return {"arch": "mlp", "dataset": "synthetic", "tasks": [0, 1], "runs": 3, "model_kwargs": {"hidden": [6, 6]},
            "epochs": 2, "lr": 0.05, "momentum": 0.9, "batch_size": 32,
            "data_kwargs": {"n_train": 64, "n_test": 32}, **kw}


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else []


def zoo_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "ffl.zoo", *args], env=e, capture_output=True, text=True,
                          timeout=300)


# --------------------------------------------------------------------------------------------
# 1. Bad parameters fail before any work, naming the valid choices; nothing is written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,message", [
    ("epochs", 0, "epochs must be an integer >= 1, got 0"),
    ("lr", float("nan"), "lr must be a finite number, got nan"),
    ("lr", 0, "lr must be > 0"),
    ("lr", "fast", "lr must be a finite number, got 'fast'"),
    ("momentum", 1.5, "momentum must be < 1.0"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("batch_size", 2.5, "batch_size must be an integer, got 2.5"),
    ("model_kwargs", {"hidden": [0, 6]}, "layers of width 0"),
    ("model_kwargs", {"hidden": [-3]}, "do not build a 'mlp' network"),
    ("model_kwargs", {"hiden": [6]}, "unexpected keyword argument 'hiden'"),
    ("arch", "nosuch", r"unknown arch 'nosuch'; choose one of \['mlp', 'cnn'"),
    ("dataset", "imagenet", "unknown dataset 'imagenet'; expected one of"),
    ("tasks", [0, 70], "task 70 out of range for 'synthetic'"),
    ("runs", 0, "runs must be an integer >= 1"),
    ("seed", "abc", "seed must be an integer, got 'abc'"),
    ("download", "maybe", "download must be True or False, got 'maybe'"),
    ("lr_step_epochs", [1, "x"], "lr_step_epochs entry must be an integer"),
])
def test_bad_spec_field_is_refused_before_anything_is_written(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        train_zoo(tiny(**{field: value}), tmp_path / "zoo", progress=False)
    assert not (tmp_path / "zoo").exists()


def test_numbers_written_as_text_become_numbers():
    """PyYAML reads ``1e-4`` as text; a spec takes it as the number it spells (and the profile
    loader reads it as a number in the first place)."""
    spec = ZooSpec.from_dict(tiny(weight_decay="1e-4", epochs="2", lr="0.05"))
    assert (spec.weight_decay, spec.epochs, spec.lr) == (1e-4, 2, 0.05)
    assert spec.identity() == ZooSpec.from_dict(tiny(weight_decay=1e-4)).identity()


def test_profile_yaml_reads_exponents_as_numbers(tmp_path, monkeypatch):
    import ffl.profiles

    (tmp_path / "p.yaml").write_text("s:\n  weight_decay: 1e-4\n  lr: 5E-2\n  steps: 1e3\n  name: e5\n")
    monkeypatch.setattr(ffl.profiles, "PROFILE_DIR", tmp_path)
    assert ffl.profiles.load_profile("p")["s"] == {"weight_decay": 1e-4, "lr": 0.05, "steps": 1000.0, "name": "e5"}


@pytest.mark.parametrize("args,message", [
    (["--batch-networks", "-5"], "batch_networks must be an integer >= 1, got -5"),
    (["--device", "tpu"], "unknown device 'tpu'; choose one of \\['cpu'"),
])
def test_zoo_cli_refuses_bad_options_before_writing(args, message, tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny()))
    r = zoo_cli("train", "--spec", str(spec_file), "--root", str(tmp_path / "z"), "--quiet", *args)
    assert r.returncode != 0
    assert re.search(message, r.stderr), r.stderr
    assert not (tmp_path / "z").exists()


def test_refused_spec_leaves_no_root_so_the_corrected_run_works(tmp_path):
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny(arch="nosuch")))
    r = zoo_cli("train", "--spec", str(spec_file), "--root", str(tmp_path / "z"), "--quiet")
    assert r.returncode != 0 and "unknown arch 'nosuch'" in r.stderr
    assert not (tmp_path / "z").exists()
    assert len(train_zoo(tiny(), tmp_path / "z", progress=False)) == 6


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_refused_at_once(tmp_path):
    with pytest.raises(ValueError, match=r"device 'cuda' is not available on this machine; choose one of \['cpu'\]"):
        check_choices(arch="mlp", dataset="synthetic", profile="smoke", section="cifar100", device="cuda")
    with pytest.raises(ValueError, match="device 'cuda' is not available"):
        train_zoo(tiny(), tmp_path / "z", device="cuda", progress=False)
    assert not (tmp_path / "z").exists()


@pytest.mark.parametrize("name,value,message", [
    ("seed", "abc", "seed must be an integer, got 'abc'"),
    ("seed", -1, "seed must be an integer >= 0"),
    ("download", "maybe", "download must be True or False, got 'maybe'"),
    ("device", "gpu", "unknown device 'gpu'; choose one of"),
    ("data_root", 3, "data_root must be a folder path or None"),
])
def test_notebook_parameters_are_checked_in_the_first_cell(name, value, message):
    with pytest.raises(ValueError, match=message):
        check_choices(arch="mlp", dataset="synthetic", profile="smoke", section="cifar100", **{name: value})


def test_data_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_parameters(data_root=str(tmp_path / "f"))


def test_papermill_text_truth_values_are_read_as_bools():
    """``-p download true`` reaches the notebook as the text 'true' (papermill only converts 'True')."""
    assert check_parameters(download="true", seed=3, device="cpu", data_root=None) == \
        {"download": True, "seed": 3, "device": "cpu", "data_root": None}
    assert check_parameters(download="False") == {"download": False}
