"""Every bad input is a clear error before any work (issue 23): each fault stops with a message
naming the thing (parameter, file and key, environment variable) and the valid choices or the way
on, before any training or download, and writes nothing (the folders involved are compared before
and after). Sections: run parameters; data; profiles; files; environment; zoos; results;
provenance and the book."""
import json
import os
import re
import shutil
import threading
import time
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ffl.checks import check_parameters
from ffl.zoo import Zoo, ZooCorruptError, ZooSpec, train_zoo
from tests.test_faults import files_under, snapshot, tiny, zoo_cli

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def unchanged(tmp_path):
    """Asserts, after the test, that nothing under ``tmp_path`` changed from the start."""
    before = snapshot(tmp_path)
    yield tmp_path
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------
# Run parameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("TRUE", True), ("false", False),
                                        ("False", False), ("FALSE", False), (True, True), (False, False)])
def test_truth_values_are_read_as_yaml_1_2_spells_them(text, value):
    assert check_parameters(download=text) == {"download": value}


@pytest.mark.parametrize("text", ["no", "yes", "0", "1", "off", "tRUE", 0, 1, None])
def test_other_truth_spellings_are_refused_naming_the_parameter(text):
    with pytest.raises(ValueError, match=r"download must be True or False \(or the text true/True/TRUE, "
                                         r"false/False/FALSE\), got"):
        check_parameters(download=text)


@pytest.mark.parametrize("given,message", [
    ({"seed": "abc"}, "seed must be an integer, got 'abc'"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"device": 0}, r"device 0 is not available on this machine|unknown device 0"),
    ({"device": 7}, r"device 7 is not available on this machine|unknown device 7"),
    ({"data_root": 3}, "data_root must be a folder path or None"),
])
def test_bad_run_parameters_are_named(given, message):
    if torch.cuda.device_count() > 7 and given.get("device") in (0, 7):
        pytest.skip("this machine has that GPU")
    with pytest.raises(ValueError, match=message):
        check_parameters(**given)


@pytest.mark.parametrize("notebook", sorted(p.stem for p in NOTEBOOKS.glob("*.py")))
def test_every_notebook_parses_its_run_parameters_in_its_first_cell(notebook):
    """Each run parameter a chapter takes (seed, device, download, data_root) is replaced by its
    checked value in the first code cell after the parameters, before anything uses it."""
    from ffl.profiles import notebook_parameters

    run = [p for p in notebook_parameters(notebook) if p in ("seed", "device", "download", "data_root")]
    if not run:
        return
    first = (NOTEBOOKS / f"{notebook}.py").read_text().split('# %% tags=["parameters"]')[1].split("# %%")[1]
    call = re.search(r"^([\w, ]+) = ffl\.checks\.check_parameters\((.*?)\)\.values\(\)", first, re.M | re.S)
    assert call, f"{notebook}: its first cell does not call ffl.checks.check_parameters"
    names = [n.strip() for n in call[1].split(",")]
    assert sorted(names) == sorted(run) and re.findall(r"(\w+)=\1", call[2]) == names


def _papermill(notebook, tmp_path, monkeypatch, **parameters):
    import papermill

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("FFL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(papermill.PapermillExecutionError) as e:
        papermill.execute_notebook(str(NOTEBOOKS / f"{notebook}.ipynb"), str(tmp_path / "out" / "o.ipynb"),
                                   parameters=parameters, kernel_name="python3", progress_bar=False, cwd=str(REPO))
    return e.value


@pytest.mark.slow  # a kernel start: about 10 s
def test_papermill_download_false_as_text_downloads_nothing(tmp_path, monkeypatch):
    """``-p download false`` reaches the notebook as the text 'false': it must not be truthy."""
    (tmp_path / "out").mkdir()
    err = _papermill("cifar100", tmp_path, monkeypatch, download="false", data_root=str(tmp_path / "x"))
    assert err.ename == "FileNotFoundError" and "CIFAR-100 not found" in err.evalue
    assert not (tmp_path / "x").exists() and not (tmp_path / "cache").exists()


@pytest.mark.slow  # a kernel start: about 10 s
def test_papermill_device_as_a_number_is_named(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    err = _papermill("tiny_imagenet", tmp_path, monkeypatch, device=7, dataset="synthetic")
    assert err.ename == "ValueError" and "device 7" in err.evalue
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset,kw,message", [
    ("namedata", {"max_per_class": -5}, "max_per_class must be an integer >= 1, got -5"),
    ("namedata", {"max_per_class": 0}, "max_per_class must be an integer >= 1, got 0"),
    ("namedata", {"max_per_class": "200"}, "data_kwargs max_per_class: expected an integer or null, got '200'"),
    ("cifar10", {"max_train_per_class": -4990}, "max_train_per_class must be an integer >= 1, got -4990"),
    ("tiny_imagenet", {"max_test_per_class": -1}, "max_test_per_class must be an integer >= 1"),
    ("synthetic", {"n_train": -8}, "n_train must be an integer >= 1"),
])
def test_limits_below_one_are_refused_naming_the_keyword(dataset, kw, message, unchanged):
    from ffl.data import load_task

    with pytest.raises(ValueError, match=message):
        load_task(dataset, 0, data_root=unchanged, **kw)
    with pytest.raises(ValueError, match=message):
        train_zoo(tiny(dataset=dataset, data_kwargs=kw), unchanged / "zoo", progress=False)


def test_unknown_data_kwargs_name_what_the_loader_takes():
    from ffl.data import load_task

    with pytest.raises(TypeError, match=r"unknown data_kwargs \['max_per_clas'\] for 'namedata'; it takes "
                                        r"\['dedupe', 'max_per_class', 'split', 'test_fraction'\]"):
        load_task("namedata", 0, max_per_clas=3)


def _small_cifar10_npz(root):
    from ffl.data.cifar10 import CIFAR10_NPZ, write_cifar10_subset

    full = Path(os.environ.get("FFL_DATA_ROOT") or REPO.parent / "shared" / "data") / CIFAR10_NPZ  # ../shared/data
    if not full.is_file():
        pytest.skip("needs the offline CIFAR-10 copy under $FFL_DATA_ROOT")
    return write_cifar10_subset(full, root, train_per_class=3, test_per_class=2)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cifar10_npz_is_named(tmp_path, damage):
    from ffl.data import load_task

    path = _small_cifar10_npz(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # a byte inside the JPEG bytes: the zip member's CRC fails
        data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    with pytest.raises(OSError, match=f"cannot read {re.escape(str(path))} .*damaged or incomplete; fetch "
                                      "cifar10_yoongikim_jpeg.npz again"):
        load_task("cifar10", 0, data_root=tmp_path)
    assert snapshot(tmp_path) == before


def test_namedata_download_offline_says_what_is_missing_and_why(tmp_path, monkeypatch):
    import ffl.data.namedata as namedata
    from ffl.data import load_task

    def offline(*args, **kw):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(namedata.tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match=r"NameData not found: missing .*Arabic.txt.*\(The download failed: "
                                                r"<urlopen error \[Errno -3\] Temporary failure"):
        load_task("namedata", 0, data_root=tmp_path / "d", download=True)
    assert files_under(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Profiles: one schema, checked as a profile loads
# --------------------------------------------------------------------------------------------

SMOKE = (REPO / "profiles" / "smoke.yaml").read_text()


@pytest.mark.parametrize("text,message", [
    (SMOKE.replace("cifar100:   #", "cifar100:\n  zooo: {}\n  #", 1),
     r"cifar100\.zooo: unknown key; expected one of \['features', 'projection', 'split', 'zoo'\]"),
    (SMOKE.replace("    tasks: 10 ", "    task: 10 ", 1), r"cifar100\.zoo\.task: unknown key; expected one of \['arch'"),
    (SMOKE.replace("{arch: mlp, dataset: synthetic}", "{arch: mlp, dataset: synthetic, sed: 3}", 1),
     r"chapters\[2\]\.parameters: unknown parameter\(s\) \['sed'\] of notebook 'cifar100'; it takes \['arch', "),
    (SMOKE.replace("    tasks: 6\n    runs: 6", "    tasks: 2.5\n    runs: 6", 1),
     r"x\.yaml: tiny_imagenet\.zoo\.tasks: expected an integer, got 2\.5"),
    ("namedata: [1, 2]\n", r"namedata: expected a mapping, got \[1, 2\]"),
    ("chapters:\n  - output: x\n", r"chapters\[0\]: missing notebook"),
    (SMOKE.replace("max_per_class: 200", 'max_per_class: "200"'),
     r"namedata\.zoo\.data_kwargs\.namedata\.max_per_class: expected an integer or null, got '200'"),
    ("cifar100:\n  zoo: {tasks: 3\n", r"x\.yaml: not valid YAML: while parsing a flow mapping\n  in \".*x\.yaml\", line 2"),
    ("cifar100:\n  zoo: {tasks: 3}\ncifar100:\n  split: {}\n", r"duplicate key 'cifar100'\n  in \".*x\.yaml\", line 3"),
    ("extends: ../profiles/smoke\n", r"extends: expected the name of one profile in profiles/ \(not a path\)"),
    ("- a\n- b\n", r"x\.yaml: expected a mapping of sections, got \['a', 'b'\]"),
    ("chapters:\n  - notebook: cifar100\n  - notebook: cifar100\n",
     r"chapters: two chapters write the same output \['cifar100'\]"),
    ("chapters:\n  - notebook: cifar100\n    output: ../../x\n", r"chapters\[0\]\.output: expected a file name"),
    ("chapters:\n  - notebook: nosuch\n", r"chapters\[0\]\.notebook: no notebook 'nosuch'; choose one of \["),
    ("book_dir: /\n", r"book_dir: expected a folder inside the repository"),
    (SMOKE.replace("lr: 0.05", "lr: fast", 1), r"cifar100\.zoo\.arch\.mlp\.lr: expected a number, got 'fast'"),
    (SMOKE.replace("    arch:\n      mlp:", "    arch:\n      mpl:", 1), r"cifar100\.zoo\.arch\.mpl: unknown key"),
    ("factors:\n  settings:\n    Baseline: {lr: 0.1}\n", r"factors\.settings\.Baseline: missing arch"),
])
def test_a_bad_profile_names_the_file_and_the_key(tmp_path, monkeypatch, text, message):
    import ffl.profiles
    from ffl.experiment import check_choices

    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "x.yaml").write_text(text)
    monkeypatch.setattr(ffl.profiles, "PROFILE_DIR", tmp_path / "profiles")
    before = snapshot(tmp_path)
    with pytest.raises(ffl.profiles.ProfileError, match=r"^profiles/x\.yaml: " + message if "x\\.yaml" not in message
                       else message):
        ffl.profiles.load_profile("x")
    with pytest.raises(ValueError, match=message):
        check_choices(arch="mlp", dataset="synthetic", profile="x", section="cifar100")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["../profiles/smoke", "/etc/passwd", "smoke/..", ""])
def test_a_profile_name_is_never_a_path(name):
    from ffl.profiles import load_profile

    with pytest.raises(ValueError, match="unknown profile .*; choose one of"):
        load_profile(name)


def test_every_shipped_profile_fits_the_schema():
    from ffl.profiles import available_profiles, load_profile

    assert {"smoke", "laptop", "paper", "paper_bf16"} <= set(available_profiles())
    for name in available_profiles():
        assert load_profile(name)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,message", [
    ('{"arch": "mlp", "tasks": [0,', r"--spec .*spec\.json: cannot be read as JSON \(JSONDecodeError"),
    ('[1, 2]', r"--spec .*spec\.json: expected a JSON object of ZooSpec fields .*got list"),
])
def test_a_bad_spec_file_is_named(tmp_path, text, message):
    (tmp_path / "spec.json").write_text(text)
    r = zoo_cli("train", "--spec", str(tmp_path / "spec.json"), "--root", str(tmp_path / "z"), "--quiet")
    assert r.returncode != 0 and re.search(message, r.stderr), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "z").exists()


def test_a_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "z").write_text("not a folder")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny()))
    before = snapshot(tmp_path)
    r = zoo_cli("train", "--spec", str(spec), "--root", str(tmp_path / "z"), "--quiet")
    assert r.returncode != 0 and f"zoo root '{tmp_path / 'z'}' is a file, not a folder" in r.stderr
    assert snapshot(tmp_path) == before


@pytest.fixture
def small_zoo(tmp_path):
    root = tmp_path / "zoo"
    train_zoo(tiny(), root, progress=False, batch_networks=2)
    return root


@pytest.mark.parametrize("edit,message", [
    (lambda m: [1, 2], "manifest.json is not a zoo's manifest.json: expected a JSON object, got list"),
    (lambda m: {**m, "networks": {"a": 1}}, "manifest.json is not a zoo's manifest.json: networks missing or of"),
    (lambda m: {**m, "shards": [1, 2]}, r"manifest.json is not a zoo manifest: TypeError"),
    (lambda m: {**m, "networks": [{"task": 0}] * 6}, r"manifest.json is not a zoo manifest: KeyError"),
])
def test_a_manifest_of_the_wrong_shape_is_named(small_zoo, edit, message):
    path = small_zoo / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    before = snapshot(small_zoo)
    with pytest.raises(ZooCorruptError, match=re.escape(str(small_zoo)) + ".*" + message):
        Zoo.load(small_zoo)
    assert snapshot(small_zoo) == before


@pytest.mark.parametrize("text", ['["spec"]', '{"spec": [], "batch_networks": 2}', '{"spec": {}}'])
def test_a_spec_json_of_the_wrong_shape_is_named(small_zoo, text):
    (small_zoo / "manifest.json").unlink()
    (small_zoo / "spec.json").write_text(text)
    before = snapshot(small_zoo)
    with pytest.raises(ZooCorruptError, match=re.escape(str(small_zoo / "spec.json")) + " is not a zoo's spec.json"):
        train_zoo(tiny(), small_zoo, progress=False)
    assert snapshot(small_zoo) == before


def test_a_full_disk_is_found_before_training(tmp_path, monkeypatch):
    import ffl.zoo.train

    monkeypatch.setattr(ffl.zoo.train, "free_bytes", lambda path: 10_000)
    with pytest.raises(OSError, match=r"not enough space for the zoo at .*zoo: its 6 networks still to train need "
                                      r"about 0\.\d MiB, its disk has 0\.0 MiB free"):
        train_zoo(tiny(), tmp_path / "zoo", progress=False)
    assert files_under(tmp_path) == []


def test_a_write_that_fails_names_the_file(tmp_path, monkeypatch):
    """ENOSPC in the middle of a zoo (the disk filled up after the check): the shard is named."""
    original = Path.write_bytes

    def full(self, data):
        if self.suffix == ".safetensors":
            raise OSError(28, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match=r"No space left on device: cannot write .*shards/t00000-r00000-00001"
                                      r"\.safetensors \(.* bytes; .* bytes free on its disk\)"):
        train_zoo(tiny(), tmp_path / "zoo", progress=False, batch_networks=2)
    assert not list((tmp_path / "zoo" / "shards").iterdir())


def test_an_unwritable_root_is_found_before_training(small_zoo, monkeypatch):
    import ffl.zoo.train

    (small_zoo / "manifest.json").unlink()
    (small_zoo / "shards" / "t00000-r00002-00002.json").unlink()
    before = snapshot(small_zoo)

    def read_only(*args, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ffl.zoo.train.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(ffl.zoo.train, "train_batched", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(PermissionError, match=r"cannot write in .*zoo/shards \(Permission denied\), where the zoo's "
                                              "shards go"):
        train_zoo(tiny(), small_zoo, progress=False)
    assert snapshot(small_zoo) == before


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["FFL_DATA_ROOT", "FFL_CACHE"])
def test_an_environment_folder_that_is_a_file_is_named(tmp_path, monkeypatch, variable):
    from ffl.data import resolve_root
    from ffl.experiment import check_choices
    from ffl.zoo import default_cache_dir

    (tmp_path / "f").write_text("x")
    monkeypatch.setenv(variable, str(tmp_path / "f"))
    message = rf"\${variable} '{re.escape(str(tmp_path / 'f'))}' is a file, not a folder; point {variable} at a folder"
    with pytest.raises(ValueError, match=message):
        resolve_root(None) if variable == "FFL_DATA_ROOT" else default_cache_dir()
    if variable == "FFL_DATA_ROOT":  # a notebook's first cell
        with pytest.raises(ValueError, match=message):
            check_choices(arch="mlp", dataset="cifar10", profile="smoke", section="cifar100", data_root=None)


@pytest.mark.parametrize("variable,default", [("FFL_DATA_ROOT", "data"), ("FFL_CACHE", "cache")])
def test_an_empty_environment_folder_means_the_documented_default(monkeypatch, variable, default):
    from ffl.data import resolve_root
    from ffl.zoo import default_cache_dir

    monkeypatch.setenv(variable, "")
    found = resolve_root(None) if variable == "FFL_DATA_ROOT" else default_cache_dir()
    assert found.resolve() == (Path.cwd() / default).resolve()


# --------------------------------------------------------------------------------------------
# Zoos
# --------------------------------------------------------------------------------------------


def test_two_runs_of_different_specs_on_one_root_do_not_mix(tmp_path, monkeypatch):
    """The second run waits for the first to write spec.json, then is refused; no shard of it lands."""
    import ffl.zoo.train

    load = ffl.zoo.train._load_tasks

    def slow_load(spec, tasks):
        time.sleep(0.3)  # the window in which both would pass the spec check without a lock
        return load(spec, tasks)

    monkeypatch.setattr(ffl.zoo.train, "_load_tasks", slow_load)
    root = tmp_path / "zoo"
    first = threading.Thread(target=train_zoo, args=(tiny(),), kwargs={"root": root, "progress": False})
    first.start()
    time.sleep(0.1)
    with pytest.raises(ValueError, match=r"a different zoo exists at .*zoo; differing fields:\n  lr: existing 0.05, "
                                         "asked 0.01"):
        train_zoo(tiny(lr=0.01), root, progress=False)
    first.join()
    assert len(Zoo.load(root, verify="full")) == 6


def test_a_shard_of_another_seed_is_named_as_such_not_as_changed_data(tmp_path):
    other = tmp_path / "other"
    train_zoo(tiny(seed=1), other, progress=False, batch_networks=2)
    root = tmp_path / "zoo"
    train_zoo(tiny(), root, progress=False, batch_networks=2)
    (root / "manifest.json").unlink()
    (root / "shards" / "t00000-r00002-00002.json").unlink()  # a partial zoo
    for ext in (".json", ".safetensors"):
        shutil.copy(other / "shards" / f"t00000-r00000-00001{ext}", root / "shards")
    before = snapshot(root)
    with pytest.raises(ValueError, match=r"t00000-r00000-00001\.json belongs to another zoo \(spec hash"):
        train_zoo(tiny(), root, progress=False)
    assert snapshot(root) == before


def test_finished_shards_renamed_onto_each_other_are_found_before_training(small_zoo, monkeypatch):
    import ffl.zoo.train

    (small_zoo / "manifest.json").unlink()
    (small_zoo / "shards" / "t00000-r00002-00002.json").unlink()  # one chunk left to train
    shards = small_zoo / "shards"
    for ext in (".json", ".safetensors"):  # swap two finished shards of two networks each
        os.replace(shards / f"t00000-r00000-00001{ext}", shards / f"tmp{ext}")
        os.replace(shards / f"t00001-r00001-00002{ext}", shards / f"t00000-r00000-00001{ext}")
        os.replace(shards / f"tmp{ext}", shards / f"t00001-r00001-00002{ext}")
    before = snapshot(small_zoo)
    monkeypatch.setattr(ffl.zoo.train, "train_batched", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ZooCorruptError, match=r"t00000-r00000-00001\.json records other networks than its name says "
                                              r"\(task 0, runs 0-1\): \(task, run\) \[\(1, 1\), \(1, 2\)\]; renamed"):
        train_zoo(tiny(), small_zoo, progress=False)
    assert snapshot(small_zoo) == before


def test_merge_of_an_incomplete_set_of_parts_writes_nothing(tmp_path):
    from ffl.zoo import merge_zoos

    parts = [tmp_path / "a", tmp_path / "b"]
    for rank, part in enumerate(parts):
        train_zoo(tiny(), part, progress=False, batch_networks=2, shard=(rank, 3))  # rank 2 never ran
    before = snapshot(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"shards missing from every part: \['t00001-r00001-00002'\]; "
                                                r"nothing was written to .*out"):
        merge_zoos(parts, tmp_path / "out")
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@pytest.fixture
def cached_results(tmp_path, monkeypatch):
    from tests.test_faults import TINY_PROFILE

    import ffl.profiles

    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "tiny.yaml").write_text(TINY_PROFILE)
    monkeypatch.setattr(ffl.profiles, "PROFILE_DIR", tmp_path / "profiles")
    from tests.test_faults import run_tiny

    first = run_tiny(tmp_path / "cache")
    (table,) = (tmp_path / "cache" / "results").glob("*.csv")
    return lambda: run_tiny(tmp_path / "cache"), table, first


def test_a_results_sidecar_of_the_wrong_shape_is_recomputed(cached_results):
    run, table, first = cached_results
    table.with_suffix(".json").write_text("[]")
    with pytest.warns(UserWarning, match=r"not used: its sidecar .*\.json is not a JSON object; recomputing"):
        again = run()
    assert again.seconds["features and protocols"] != "cached" and again.results.equals(first.results)


def test_a_results_table_with_rows_dropped_is_recomputed(cached_results):
    """Rows dropped and the sidecar made to vouch for it (SHA-256, rows): the shape gives it away."""
    import hashlib

    run, table, first = cached_results
    lines = table.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("2,")]  # every row of index 2
    table.write_text("".join(kept))
    side = json.loads(table.with_suffix(".json").read_text())
    side.update(sha256=hashlib.sha256(table.read_bytes()).hexdigest(), rows=len(kept) - 1)
    table.with_suffix(".json").write_text(json.dumps(side))
    with pytest.warns(UserWarning, match=r"its indices per feature are not 1, 2, … .*rows dropped\); recomputing"):
        assert run().results.equals(first.results)
    one = [line for line in lines if not line.startswith("1,chain,classification")]  # one measure of one index
    table.write_text("".join(one))
    side.update(sha256=hashlib.sha256(table.read_bytes()).hexdigest(), rows=len(one) - 1)
    table.with_suffix(".json").write_text(json.dumps(side))
    with pytest.warns(UserWarning, match=r"some indices lack measures the others have \(rows dropped\)"):
        assert run().results.equals(first.results)


# --------------------------------------------------------------------------------------------
# Provenance and the book
# --------------------------------------------------------------------------------------------


def test_provenance_records_the_profile_as_it_was(tmp_path, monkeypatch):
    """A profile outside git, or edited, is not the commit's: its hash and state say so."""
    import ffl.profiles
    from ffl.provenance import run_info

    (tmp_path / "mine.yaml").write_text(SMOKE)
    monkeypatch.setattr(ffl.profiles, "PROFILE_DIR", tmp_path)
    info = run_info(profile="mine")
    assert info["profile_state"] != "committed" and info["profile_settings"]["cifar100"]["zoo"]["tasks"] == 10
    (tmp_path / "mine.yaml").write_text(SMOKE.replace("tasks: 10 ", "tasks: 12 "))
    again = run_info(profile="mine")
    assert again["profile_sha256"] != info["profile_sha256"]
    assert again["profile_settings"]["cifar100"]["zoo"]["tasks"] == 12


def test_book_only_without_names_is_refused(tmp_path, capsys):
    import ffl.book

    with pytest.raises(SystemExit):
        ffl.book.main(["--profile", "smoke", "--only", "--no-html", "--book-dir", str(tmp_path / "b")])
    assert "--only: expected at least one argument" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"only=\[\] names no chapter; name some of \['preliminaries'"):
        ffl.book.run_book("smoke", only=[], html=False, book_dir=tmp_path / "b")
    assert files_under(tmp_path) == []


def test_a_failed_chapter_is_summarized_by_the_notebooks_own_error(tmp_path, monkeypatch):
    import papermill

    import ffl.book

    def execute(entry, book_dir, echo=False):
        raise papermill.PapermillExecutionError(2, 3, "source", "ValueError", "seed must be an integer, got 'abc'",
                                                ["Traceback", "ValueError: seed must be an integer, got 'abc'"])

    monkeypatch.setattr(ffl.book, "execute_chapter", execute)
    with pytest.raises(papermill.PapermillExecutionError):
        ffl.book.run_book("smoke", html=False, book_dir=tmp_path)
    summary = (tmp_path / "run_summary.md").read_text()
    assert "(ValueError: seed must be an integer, got 'abc' (in cell [3]))" in summary


# --------------------------------------------------------------------------------------------
# Further faults, tried as an attacker would (item 2 of issue 23)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given,message", [
    ({"seed": True}, "seed must be an integer, got True"),
    ({"seed": 2**63}, r"seed must be < 2\*\*63"),
    ({"seed": float("nan")}, "seed must be an integer, got nan"),
    ({"device": "CPU"}, r"unknown device 'CPU'; choose one of \['cpu'"),
    ({"device": ""}, "unknown device ''"),
    ({"device": None}, "unknown device None"),
    ({"data_root": ""}, "data_root must be a folder path or None, got ''"),
])
def test_odd_run_parameter_values_are_named(given, message):
    with pytest.raises(ValueError, match=message):
        check_parameters(**given)


@pytest.mark.parametrize("raw,message", [
    ("namedata: {split: {seed: 1}}\n".encode("utf-16"), "not valid YAML"),
    (b"namedata: !!python/object:os.system {}\n", "not valid YAML: could not determine a constructor"),
    (b"cifar10:\n  zoo: {tasks: 3}\n", r"cifar10: unknown key; expected one of \['alignment_proof_check', 'beyond', 'book_dir'"),
    (b"cifar100:\n  features: {fold_bm: false}\n", r"cifar100\.features\.fold_bm: unknown key"),
    (b"cifar100:\n  features: {mlp: {}, fold_bn: true}\n", r"cifar100\.features\.fold_bn: unknown key"),
])
def test_a_profile_that_is_not_plain_yaml_of_known_sections_is_named(tmp_path, monkeypatch, raw, message):
    import ffl.profiles

    (tmp_path / "x.yaml").write_bytes(raw)
    monkeypatch.setattr(ffl.profiles, "PROFILE_DIR", tmp_path)
    with pytest.raises(ffl.profiles.ProfileError, match=message):
        ffl.profiles.load_profile("x")


def test_a_zoo_sidecar_of_the_wrong_shape_is_retrained_with_a_warning(small_zoo):
    (small_zoo / "manifest.json").unlink()
    (small_zoo / "shards" / "t00001-r00000-00000.json").write_text("[]")
    with pytest.warns(UserWarning, match=r"t00001-r00000-00000\.json is not a zoo's t00001-r00000-00000\.json: "
                                         "expected a JSON object, got list.*its shard will be retrained"):
        assert len(train_zoo(tiny(), small_zoo, progress=False)) == 6


def test_tiny_imagenet_download_offline_says_what_is_missing_and_why(tmp_path, monkeypatch):
    import ffl.data.tiny_imagenet as tiny_imagenet
    from ffl.data import load_task

    def offline(*args, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tiny_imagenet.tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match=r"Tiny ImageNet not found: missing .*wnids.txt.*\(The download "
                                                "failed: <urlopen error no network>"):
        load_task("tiny_imagenet", 0, data_root=tmp_path / "d", download=True)
    assert files_under(tmp_path) == []


def test_a_cache_folder_that_is_a_file_is_found_before_training(tmp_path, monkeypatch):
    import ffl.experiment

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "results").write_text("not a folder")
    monkeypatch.setattr(ffl.experiment, "train_zoo", lambda *a, **k: pytest.fail("trained"))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"cache folder '.*cache/results' is a file, not a folder"):
        ffl.experiment.run_experiment("cifar100", arch="mlp", profile="smoke", dataset="synthetic",
                                      cache_dir=tmp_path / "cache", progress=False)
    assert snapshot(tmp_path) == before


def test_a_book_dir_that_is_a_file_is_refused(tmp_path):
    import ffl.book

    (tmp_path / "b").write_text("x")
    with pytest.raises(ValueError, match=r"book folder '.*/b' is a file, not a folder"):
        ffl.book.run_book("smoke", only=["preliminaries"], html=False, book_dir=tmp_path / "b")
    assert files_under(tmp_path) == [tmp_path / "b"]


def test_a_torchrun_variable_that_is_not_a_number_is_named(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny()))
    r = zoo_cli("train", "--spec", str(spec), "--root", str(tmp_path / "z"), "--quiet", env={"WORLD_SIZE": "two"})
    assert r.returncode != 0 and "$WORLD_SIZE must be an integer, got 'two'" in r.stderr
    assert not (tmp_path / "z").exists()


def test_merge_with_a_part_without_spec_json_writes_nothing(small_zoo, tmp_path):
    from ffl.zoo import merge_zoos

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/spec\.json"):
        merge_zoos([small_zoo, tmp_path / "empty"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_truncated_manifest_is_named(small_zoo):
    path = small_zoo / "manifest.json"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ZooCorruptError, match=re.escape(str(path)) + r" is not valid JSON \(.*\): truncated"):
        Zoo.load(small_zoo)


def test_zoo_info_on_a_file_says_there_is_no_zoo(tmp_path):
    (tmp_path / "f").write_text("x")
    r = zoo_cli("info", str(tmp_path / "f"))
    assert r.returncode != 0 and f"no complete zoo at {tmp_path / 'f'}" in r.stderr


def test_a_results_table_with_one_row_per_setting_is_read_back(tmp_path):
    """The CNN-gap study's and the beyond chapter's tables repeat (feature, index, protocol, metric)
    once per Θ setting or method: with that column in the key they are whole tables and come back
    from the cache; a repeated or dropped row within one setting still sends them to recompute."""
    from ffl.experiment import RESULT_KEY, read_results, table_gaps, write_results

    rows = [{"theta": theta, "feature": kind, "index": index, "protocol": protocol, "metric": metric,
             "value": 0.5 + 0.01 * index}
            for theta in ("lr 1e-3", "lr 1e-1") for kind in ("layer", "chain") for index in (1, 2)
            for protocol, metric in (("classification", "top1"), ("retrieval", "rank1"))]
    rows.append({"theta": "", "feature": "zoo", "index": 0, "protocol": "", "metric": "drift", "value": 1.6})
    table = pd.DataFrame(rows)
    key = ("theta", *RESULT_KEY)
    path = tmp_path / "study.csv"
    write_results(path, table, {"settings": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning here would mean the cache is refused
        back = read_results(path, {"settings": 1}, key=key)
    assert back is not None and len(back) == len(table) and np.allclose(back["value"], table["value"])
    assert table_gaps(table, key=key) is None
    assert table_gaps(table) == "it repeats rows"  # without the setting in the key, rows repeat
    assert table_gaps(pd.concat([table, table.iloc[[3]]]), key=key) == "it repeats rows"
    dropped = table.drop(index=[5])  # one measure of one index of one Θ setting
    assert table_gaps(dropped, key=key) == "some indices lack measures the others have (rows dropped)"
    assert table_gaps(table.drop(columns="theta"), key=key) == "it lacks the columns ['theta']"
