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
import warnings
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
    ("download", "maybe", r"download must be True or False \(or the text true/True/TRUE, .*got 'maybe'"),
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

    (tmp_path / "p.yaml").write_text("namedata:\n  zoo:\n    arch:\n      gru: {weight_decay: 1e-4, lr: 5E-2, "
                                     "momentum: 1e-1, optimizer: e5}\n")
    monkeypatch.setattr(ffl.profiles, "PROFILE_DIR", tmp_path)
    assert ffl.profiles.load_profile("p")["namedata"]["zoo"]["arch"]["gru"] == \
        {"weight_decay": 1e-4, "lr": 0.05, "momentum": 0.1, "optimizer": "e5"}


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
    ("download", "maybe", r"download must be True or False \(or the text true/True/TRUE, .*got 'maybe'"),
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


# --------------------------------------------------------------------------------------------
# 2. Diverged training is an error, never a zoo
# --------------------------------------------------------------------------------------------


def test_diverged_network_is_named_and_its_chunk_not_saved(tmp_path):
    """At lr 1e6 one network of the first chunk ends with NaN weights: train_zoo names it by task
    and run, saves nothing of that chunk and writes no manifest (the zoo is not complete)."""
    from ffl.zoo import TrainingDivergedError

    root = tmp_path / "z"
    with pytest.raises(TrainingDivergedError, match=r"diverged .* for 1 of the 4 networks .*: task 0 run 0\. "
                                                     r"Settings: optimizer sgd, lr 1000000\.0") as err:
        train_zoo(tiny(lr=1e6), root, progress=False, batch_networks=4)
    assert err.value.networks == [(0, 0)]
    assert not (root / "manifest.json").exists()
    assert not list((root / "shards").glob("*"))


def test_nonfinite_networks_finds_nan_and_inf_in_weights_and_buffers():
    from ffl.engine import nonfinite_networks

    state = {"w": torch.zeros(5, 3, 2), "running_var": torch.ones(5, 4), "steps": torch.zeros(5, dtype=torch.long)}
    state["w"][1, 2, 0] = float("nan")
    state["running_var"][3, 1] = float("inf")
    assert nonfinite_networks(state) == [1, 3]


def six_task_rep(n_tasks=6, runs=5):
    from ffl.features import Representation

    tasks = torch.arange(n_tasks).repeat_interleave(runs)
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(n_tasks, 12, generator=gen) * 3
    vectors = means[tasks] + torch.randn(len(tasks), 12, generator=gen)
    return Representation(vectors=vectors), tasks, torch.arange(runs).repeat(n_tasks)


@pytest.mark.parametrize("protocol", ["classification_protocol", "retrieval_protocol"])
def test_evaluation_refuses_nonfinite_features_naming_the_networks(protocol):
    """One NaN network among 30 would drag the kernel, and the protocol, to chance."""
    import ffl.protocols
    from ffl.features import ProjectionConfig, Representation

    rep, tasks, runs = six_task_rep()
    fn = getattr(ffl.protocols, protocol)
    assert fn(rep, tasks, runs, ProjectionConfig(epochs=2)) is not None  # the healthy zoo evaluates
    vectors = rep.vectors.clone()
    vectors[7, 3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite features for 1 of 30 networks: #7 \(task 1, run 2\)"):
        fn(Representation(vectors=vectors), tasks, runs, ProjectionConfig(epochs=2))


# --------------------------------------------------------------------------------------------
# 3. Protocols refuse degenerate splits
# --------------------------------------------------------------------------------------------


def test_retrieval_with_one_unseen_task_is_refused():
    """3 tasks at 60 % seen leave one unseen task: every gallery item would match every query."""
    from ffl.protocols import retrieval_protocol

    rep, tasks, runs = six_task_rep(n_tasks=3)
    with pytest.raises(ValueError, match="retrieval needs at least 2 seen and 2 unseen tasks; 3 tasks .* "
                                         "give 2 seen and 1 unseen"):
        retrieval_protocol(rep, tasks, runs)


def test_classification_with_one_task_is_refused():
    from ffl.protocols import classification_protocol

    rep, tasks, runs = six_task_rep(n_tasks=1)
    with pytest.raises(ValueError, match="classification needs at least 2 tasks, got 1"):
        classification_protocol(rep, tasks, runs)


def test_too_few_runs_for_a_query_is_refused():
    from ffl.protocols import retrieval_split

    _, tasks, runs = six_task_rep(n_tasks=6, runs=2)
    with pytest.raises(ValueError, match="has 2 runs: too few to split at 0.2"):
        retrieval_split(tasks, runs)


def test_degenerate_split_fails_before_the_zoo_is_trained(tmp_path, monkeypatch):
    """A profile whose zoo has 3 tasks is refused by check_choices, before anything is written."""
    import ffl.profiles
    from ffl.experiment import run_experiment

    smoke = (ffl.profiles.PROFILE_DIR / "smoke.yaml").read_text()
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "few.yaml").write_text(smoke.replace("tasks: 10 ", "tasks: 3 "))
    monkeypatch.setattr(ffl.profiles, "PROFILE_DIR", tmp_path / "profiles")
    with pytest.raises(ValueError, match="retrieval needs at least 2 seen and 2 unseen tasks"):
        run_experiment("cifar100", arch="mlp", profile="few", dataset="synthetic", cache_dir=tmp_path / "cache",
                       progress=False)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("profile", ["smoke", "paper"])
@pytest.mark.parametrize("section,arch,dataset", [("cifar100", "mlp", "cifar100"), ("cifar100", "cnn", "cifar100"),
                                                  ("namedata", "gru", "namedata")])
def test_shipped_profiles_satisfy_the_protocol_guards(profile, section, arch, dataset):
    check_choices(arch=arch, dataset=dataset, profile=profile, section=section)


# --------------------------------------------------------------------------------------------
# 4. Caches that cannot lie
# --------------------------------------------------------------------------------------------

TINY_PROFILE = """
cifar100:
  zoo:
    tasks: 5
    runs: 5
    data_kwargs:
      synthetic: {n_train: 32, n_test: 16}
    arch:
      mlp: {model_kwargs: {hidden: [4, 4]}, lr: 5e-2, momentum: 0.9, batch_size: 32, epochs: 1}
  projection: {epochs: 2, lr_step_epochs: [1]}
  split: {train_run_fraction: 0.6, train_task_fraction: 0.6, query_fraction: 0.2}
"""


@pytest.fixture
def tiny_profile(tmp_path, monkeypatch):
    import ffl.profiles

    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "tiny.yaml").write_text(TINY_PROFILE)
    monkeypatch.setattr(ffl.profiles, "PROFILE_DIR", tmp_path / "profiles")
    return tmp_path / "cache"


def run_tiny(cache):
    from ffl.experiment import run_experiment

    return run_experiment("cifar100", arch="mlp", profile="tiny", dataset="synthetic", cache_dir=cache, progress=False)


def test_result_cache_recomputes_truncated_edited_or_stale_tables(tiny_profile, monkeypatch):
    import ffl.experiment

    first = run_tiny(tiny_profile)
    (table,) = (tiny_profile / "results").glob("*.csv")
    assert json.loads(table.with_suffix(".json").read_text())["made_by"]["code"] == ffl.experiment.code_hash()
    assert run_tiny(tiny_profile).seconds["features and protocols"] == "cached"

    table.write_bytes(table.read_bytes()[:-40])  # truncated
    with pytest.warns(UserWarning, match=r"not used: its SHA-256 differs .*; recomputing"):
        again = run_tiny(tiny_profile)
    assert again.seconds["features and protocols"] != "cached" and again.results.equals(first.results)

    text = table.read_text()
    table.write_text(text.replace(text.splitlines()[1].split(",")[4], "0.999", 1))  # an edited value
    with pytest.warns(UserWarning, match="its SHA-256 differs"):
        assert run_tiny(tiny_profile).results.equals(first.results)

    table.with_suffix(".json").unlink()  # a table nothing vouches for
    with pytest.warns(UserWarning, match="cannot be read"):
        assert run_tiny(tiny_profile).results.equals(first.results)

    # other library code (e.g. a change to ffl/metrics.py): another key, so computed afresh
    monkeypatch.setattr(ffl.experiment, "code_hash", lambda: "0" * 64)
    assert run_tiny(tiny_profile).seconds["features and protocols"] != "cached"
    assert len(list((tiny_profile / "results").glob("*.csv"))) == 2


def test_code_hash_follows_the_source_not_the_version(tmp_path, monkeypatch):
    import shutil

    import ffl
    from ffl.experiment import code_hash

    copy = tmp_path / "ffl"
    shutil.copytree(Path(ffl.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(ffl, "__file__", str(copy / "__init__.py"))
    before = code_hash()
    (copy / "book.py").write_text((copy / "book.py").read_text() + "\n# presentation only\n")
    assert code_hash() == before
    (copy / "bench" / "cli.py").write_text((copy / "bench" / "cli.py").read_text() + "\n# a package of them too\n")
    assert code_hash() == before
    (copy / "metrics.py").write_text((copy / "metrics.py").read_text() + "\n# a change\n")
    assert code_hash() != before


@pytest.fixture
def small_zoo(tmp_path):
    root = tmp_path / "zoo"
    train_zoo(tiny(), root, progress=False, batch_networks=4)
    return root


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in files_under(root)}


def test_lost_spec_json_does_not_let_another_spec_adopt_the_shards(small_zoo):
    (small_zoo / "manifest.json").unlink()
    (small_zoo / "spec.json").unlink()
    before = snapshot(small_zoo)
    with pytest.raises(ValueError, match=r"t00000-r00000-00002.json belongs to another zoo \(spec hash"):
        train_zoo(tiny(lr=0.01), small_zoo, progress=False, batch_networks=4)
    assert snapshot(small_zoo) == before
    # its own spec picks the shards up again (nothing retrained) and completes the zoo
    assert len(train_zoo(tiny(), small_zoo, progress=False, batch_networks=4)) == 6
    after = snapshot(small_zoo)
    assert all(after[k] == v for k, v in before.items() if k.startswith("shards"))  # not retrained


def test_shards_without_a_recorded_spec_and_no_spec_json_are_refused(small_zoo):
    (small_zoo / "manifest.json").unlink()
    (small_zoo / "spec.json").unlink()
    for side in (small_zoo / "shards").glob("*.json"):  # as a zoo written before the hash was recorded
        meta = json.loads(side.read_text())
        del meta["spec_sha256"]
        side.write_text(json.dumps(meta))
    before = snapshot(small_zoo)
    with pytest.raises(ValueError, match="has shards but no spec.json.*does not record its spec"):
        train_zoo(tiny(), small_zoo, progress=False, batch_networks=4)
    assert snapshot(small_zoo) == before


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["networks"][0].update(task=1), r"network 0 does not match its spec: task 1 \(expected 0\)"),
    (lambda m: m["networks"][4].update(run=0), r"network 4 does not match its spec: run 0 \(expected 1\)"),
    (lambda m: m.update(networks=m["networks"][:5]), r"lists 5 networks; its spec \(2 tasks × 3 runs\) has 6"),
    (lambda m: m["spec"].update(lr=0.5), "its spec does not match its recorded spec hash"),
    (lambda m: m.update(shards=m["shards"][:-1]), "lists shards"),
])
def test_relabelled_or_cut_manifest_is_refused(small_zoo, edit, message):
    from ffl.zoo import Zoo, ZooCorruptError

    manifest = json.loads((small_zoo / "manifest.json").read_text())
    edit(manifest)
    (small_zoo / "manifest.json").write_text(json.dumps(manifest))
    for verify in ("lazy", "full"):
        with pytest.raises(ZooCorruptError, match=message):
            Zoo.load(small_zoo, verify=verify)


def test_zoo_written_before_spec_hashes_still_loads(small_zoo):
    from ffl.zoo import Zoo

    manifest = json.loads((small_zoo / "manifest.json").read_text())
    del manifest["spec_sha256"]
    (small_zoo / "manifest.json").write_text(json.dumps(manifest))
    assert len(Zoo.load(small_zoo, verify="full")) == 6


def test_orphaned_staging_folders_of_a_killed_writer_are_removed_at_the_next_start(small_zoo):
    """A writer SIGKILLed inside a shard write leaves its staging folder; the next train_zoo on
    that root removes it (a live writer's folder is kept)."""
    from ffl.files import atomic_path, clean_stale_temp

    (small_zoo / "manifest.json").unlink()
    (small_zoo / "shards" / "t00001-r00001-00002.json").unlink()  # one unfinished shard
    target = small_zoo / "shards" / "t00001-r00001-00002.safetensors"
    code = ("import os, sys\nfrom ffl.files import atomic_path\n"
            "with atomic_path(sys.argv[1]) as s:\n    s.write_bytes(b'x' * 1_600_000)\n    os._exit(9)\n")
    r = subprocess.run([sys.executable, "-c", code, str(target)], env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 9
    (orphan,) = [p for p in (small_zoo / "shards").iterdir() if ".tmp-" in p.name]
    with atomic_path(small_zoo / "shards" / "live.bin") as staged:  # this process is alive: kept
        staged.write_bytes(b"x")
        assert clean_stale_temp(small_zoo / "shards") == [orphan]
        assert staged.parent.exists()
    train_zoo(tiny(), small_zoo, progress=False, batch_networks=4)
    assert not [p for p in small_zoo.rglob("*") if ".tmp-" in p.name]


def tiny_imagenet_layout(tmp_path):
    import ffl.data.tiny_imagenet as tiny_imagenet
    from tests.test_data import write_fake_tiny_imagenet

    tiny_imagenet._CACHE.clear()
    wnids = write_fake_tiny_imagenet(tmp_path)
    return tmp_path / "tiny-imagenet-200", wnids


def test_changed_jpeg_is_not_served_from_the_decoded_cache(tmp_path):
    """Same file names, new content: the cache is keyed by each file's size and mtime."""
    import ffl.data.tiny_imagenet as tiny_imagenet
    from PIL import Image

    from ffl.data import load_task

    base, wnids = tiny_imagenet_layout(tmp_path)
    before = load_task("tiny_imagenet", 0, data_root=tmp_path)
    image = base / "train" / wnids[1] / "images" / f"{wnids[1]}_0.JPEG"
    Image.new("RGB", (64, 64), (0, 0, 0)).save(image, quality=95)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    for fresh_process in (False, True):  # the in-memory cache, then the .ffl_cache files
        if fresh_process:
            tiny_imagenet._CACHE.clear()
        after = load_task("tiny_imagenet", 0, data_root=tmp_path)
        assert after.x_train[3].mean() < before.x_train[3].mean() - 0.5  # black now
        assert torch.equal(after.x_train[4:], before.x_train[4:])


def test_truncated_decoded_cache_is_named_and_rebuilt(tmp_path):
    import ffl.data.tiny_imagenet as tiny_imagenet

    from ffl.data import load_task

    base, wnids = tiny_imagenet_layout(tmp_path)
    before = load_task("tiny_imagenet", 0, data_root=tmp_path)
    cache = base / ".ffl_cache" / f"train_{wnids[2]}_32.npz"
    cache.write_bytes(cache.read_bytes()[:100])
    tiny_imagenet._CACHE.clear()
    with pytest.warns(UserWarning, match=f"decoded-image cache {cache} cannot be read .*decoding the JPEGs again"):
        after = load_task("tiny_imagenet", 0, data_root=tmp_path)
    assert torch.equal(after.x_train, before.x_train)
    tiny_imagenet._CACHE.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cache was rewritten: read without a warning now
        load_task("tiny_imagenet", 0, data_root=tmp_path)


def test_truncated_jpeg_error_names_the_file(tmp_path):
    from ffl.data import load_task

    base, wnids = tiny_imagenet_layout(tmp_path)
    image = base / "val" / "images" / "val_2.JPEG"
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(OSError, match=f"cannot decode the image {image} .*the file is damaged; restore it"):
        load_task("tiny_imagenet", 0, data_root=tmp_path, disk_cache=False)


def test_names_file_not_in_utf8_is_named(tmp_path):
    from ffl.data import read_names

    path = tmp_path / "Czech.txt"
    path.write_bytes("Dvořák\nNovák\n".encode("utf-8") + "Müller\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path} is not UTF-8 text .*iconv -f latin1 -t utf-8"):
        read_names(path)


# --------------------------------------------------------------------------------------------
# The book command line
# --------------------------------------------------------------------------------------------


def test_book_only_with_an_unknown_chapter_fails_listing_the_chapters(tmp_path):
    import ffl.book

    with pytest.raises(ValueError, match=r"no chapter \['nosuch'\] in profile 'smoke'; its chapters: \[.*'cifar100_mlp'"):
        ffl.book.main(["--profile", "smoke", "--only", "nosuch", "--no-html", "--book-dir", str(tmp_path)])
    assert files_under(tmp_path) == []


def test_failed_chapter_is_stated_in_the_run_summary(tmp_path, monkeypatch):
    import ffl.book

    (tmp_path / "run_summary.md").write_text("the previous run: everything fine\n")
    ran = []

    def execute(entry, book_dir, echo=False):
        if entry["output"] == "cifar100_mlp":
            raise RuntimeError("zoo diverged\nmore lines")
        ran.append(entry["output"])

    monkeypatch.setattr(ffl.book, "execute_chapter", execute)
    with pytest.raises(RuntimeError, match="zoo diverged"):
        ffl.book.run_book("smoke", html=False, book_dir=tmp_path)
    summary = (tmp_path / "run_summary.md").read_text()
    assert "previous run" not in summary
    assert f"ran: {', '.join(ran)}; failed: cifar100_mlp; not run: " in summary
    assert "cifar100_cnn" in summary.split("not run: ")[1].split(".")[0]
    assert "A chapter failed" in summary and "RuntimeError: zoo diverged" in summary
