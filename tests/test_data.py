"""ffl.data (§4 tasks): split bookkeeping, synthetic generator, and loaders run against tiny fake
datasets written in the *real on-disk formats* (and, where /work/shared/data exists, real data).

Fixture writers live in this file (no conftest.py by design of the repo layout).
"""
from __future__ import annotations

import hashlib
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ffl.data as data
from ffl.data import DATASETS, TaskData, load_task, num_tasks, task_classes

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------------------------
# Fake CIFAR-100 in the official python-pickle format
# --------------------------------------------------------------------------------------------

class _Py2Str(bytes):
    """A Python-2 ``str``: the official CIFAR pickles were written by Python 2, so their keys and
    names are BINSTRING opcodes (``b'data'`` under ``encoding='bytes'``, ``'data'`` under the
    ``encoding='latin1'`` torchvision uses). Python 3's pickler cannot emit those, hence this."""


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler has an extensible dispatch table
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _py2_pickle(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def _fake_pixel(label: int, k: int, train: bool) -> int:
    """Every pixel of fake image k of class ``label`` has this value: lets tests check that
    the loader picked the right images for a task."""
    return (2 * label + (0 if train else 1) + 7 * k) % 256


def write_fake_cifar100(root: Path, n_train: int = 3, n_test: int = 2) -> dict[str, str]:
    """Write ``root/cifar-100-python/{train,test,meta}`` with 100 fine classes, ``n_train`` /
    ``n_test`` images per class, in the official format; return the files' md5 sums."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    S = _Py2Str
    for split, n, train in (("train", n_train, True), ("test", n_test, False)):
        labels = [c for k in range(n) for c in range(100)]  # classes interleaved, as in the real files
        ks = [k for k in range(n) for _ in range(100)]
        pix = np.array([_fake_pixel(c, k, train) for c, k in zip(labels, ks)], dtype=np.uint8)
        arr = np.repeat(pix[:, None], 3072, axis=1)
        _py2_pickle({S(b"filenames"): [S(b"img_%d.png" % i) for i in range(len(labels))],
                     S(b"batch_label"): S(b"%s batch" % split.encode()),
                     S(b"fine_labels"): labels,
                     S(b"coarse_labels"): [c // 5 for c in labels],
                     S(b"data"): arr}, base / split)
    _py2_pickle({S(b"fine_label_names"): [S(b"class%02d" % c) for c in range(100)],
                 S(b"coarse_label_names"): [S(b"super%02d" % c) for c in range(20)]}, base / "meta")
    return {f: hashlib.md5((base / f).read_bytes()).hexdigest() for f in data.CIFAR100_FILES}


@pytest.fixture
def fake_cifar100(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny fake CIFAR-100 under tmp_path, loadable through torchvision.

    torchvision 0.29's ``CIFAR100.__init__`` verifies the md5 of ``train``/``test`` (and of
    ``meta`` in ``_load_meta``) against the official sums *on every load*, not only on download,
    so a fake can never pass as the real thing. We therefore hand ffl.data a subclass whose
    expected sums are the fake's own; everything else (file layout, pickle format, decoding) is
    torchvision's real code path. Production code always uses the unmodified class.
    """
    from torchvision.datasets import CIFAR100

    md5 = write_fake_cifar100(tmp_path)

    class FakeSumsCIFAR100(CIFAR100):
        train_list = [["train", md5["train"]]]
        test_list = [["test", md5["test"]]]
        meta = {**CIFAR100.meta, "md5": md5["meta"]}

    monkeypatch.setattr(data, "_cifar100_class", lambda: FakeSumsCIFAR100)
    return tmp_path


# --------------------------------------------------------------------------------------------
# Task bookkeeping
# --------------------------------------------------------------------------------------------

def test_datasets_and_task_counts():
    assert DATASETS == ("synthetic", "cifar100", "tiny_imagenet", "namedata")
    assert num_tasks("cifar100") == 50
    assert num_tasks("tiny_imagenet") == 50
    assert num_tasks("namedata") == 9
    assert num_tasks("synthetic") == 50
    assert num_tasks("synthetic", n_tasks=7) == 7


def test_task_classes_follow_the_paper_split():
    assert task_classes("cifar100", 0) == [0, 1]
    assert task_classes("cifar100", 49) == [98, 99]
    assert task_classes("tiny_imagenet", 1) == [4, 5, 6, 7]
    assert task_classes("namedata", 8) == [16, 17]
    # every class is used exactly once
    for ds, n_classes in (("cifar100", 100), ("tiny_imagenet", 200), ("namedata", 18)):
        used = [c for t in range(num_tasks(ds)) for c in task_classes(ds, t)]
        assert used == list(range(n_classes))


def test_unknown_dataset_lists_datasets():
    with pytest.raises(ValueError, match="tiny_imagenet"):
        load_task("mnist", 0)
    with pytest.raises(ValueError, match="cifar100"):
        num_tasks("mnist")


@pytest.mark.parametrize("dataset,task", [("cifar100", 50), ("cifar100", -1), ("namedata", 9),
                                          ("tiny_imagenet", 50), ("synthetic", 50)])
def test_task_out_of_range(dataset, task, tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        load_task(dataset, task, data_root=tmp_path)


# --------------------------------------------------------------------------------------------
# Synthetic
# --------------------------------------------------------------------------------------------

def test_synthetic_shapes_and_balance():
    t = load_task("synthetic", 3)
    assert isinstance(t, TaskData)
    assert t.x_train.shape == (256, 3, 32, 32) and t.x_test.shape == (128, 3, 32, 32)
    assert t.x_train.dtype == torch.float32 and t.y_train.dtype == torch.int64
    assert t.y_train.bincount().tolist() == [128, 128]
    assert t.classes == ["synthetic-6", "synthetic-7"]
    assert t.num_classes == 2
    small = load_task("synthetic", 0, n_train=10, n_test=4)
    assert small.x_train.shape[0] == 10 and small.x_test.shape[0] == 4


def test_synthetic_deterministic_within_and_across_processes():
    a, b = load_task("synthetic", 5, seed=1), load_task("synthetic", 5, seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    code = ("import hashlib, ffl.data as d; t = d.load_task('synthetic', 5, seed=1); "
            "print(hashlib.sha256(t.x_train.numpy().tobytes() + t.y_train.numpy().tobytes())"
            ".hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    here = hashlib.sha256(a.x_train.numpy().tobytes() + a.y_train.numpy().tobytes()).hexdigest()
    assert out == here
    assert not torch.equal(a.x_train, load_task("synthetic", 5, seed=2).x_train)
    assert not torch.equal(a.x_train, load_task("synthetic", 6, seed=1).x_train)


def _mean_difference(t: TaskData) -> torch.Tensor:
    x = t.x_train.flatten(1).double()
    return x[t.y_train == 1].mean(0) - x[t.y_train == 0].mean(0)


def test_synthetic_tasks_learnable_and_distinguishable():
    """The mean-difference classifier (what a trained net approximately finds) generalizes, and
    different tasks point in clearly different directions."""
    tasks = [load_task("synthetic", t) for t in range(4)]
    dirs = []
    for t in tasks:
        d = _mean_difference(t)
        mid = (t.x_train.flatten(1).double().mean(0))
        pred = ((t.x_test.flatten(1).double() - mid) @ d > 0).long()
        assert (pred == t.y_test).float().mean() > 0.95
        dirs.append(d / d.norm())
    cos = torch.stack(dirs) @ torch.stack(dirs).T
    off = cos[~torch.eye(4, dtype=torch.bool)].abs()
    assert off.max() < 0.6


def test_synthetic_rejects_unknown_kwargs():
    with pytest.raises(TypeError):
        load_task("synthetic", 0, n_trian=5)


# --------------------------------------------------------------------------------------------
# CIFAR-100
# --------------------------------------------------------------------------------------------

def test_cifar100_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_task("cifar100", 0, data_root=tmp_path)
    msg = str(e.value)
    for f in ("train", "test", "meta"):
        assert str(tmp_path / "cifar-100-python" / f) in msg
    assert "download=True" in msg and "cifar-100-python.tar.gz" in msg
    assert not (tmp_path / "cifar-100-python").exists()  # nothing written


def test_cifar100_task_split(fake_cifar100):
    for task in (0, 17, 49):
        t = load_task("cifar100", task, data_root=fake_cifar100)
        c0, c1 = task_classes("cifar100", task)
        assert t.classes == [f"class{c0:02d}", f"class{c1:02d}"]
        assert t.x_train.shape == (6, 3, 32, 32) and t.x_test.shape == (4, 3, 32, 32)
        assert t.x_train.dtype == torch.float32
        assert t.y_train.tolist() == [0, 1, 0, 1, 0, 1]  # dataset order kept
        # undo the normalization and check each image is the right one of the right class
        for x, y, train in ((t.x_train, t.y_train, True), (t.x_test, t.y_test, False)):
            mean = torch.tensor(data.CIFAR100_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(data.CIFAR100_STD).view(1, 3, 1, 1)
            pix = ((x * std + mean) * 255).round()[:, 0, 0, 0].long().tolist()
            n_per = 3 if train else 2
            want = [_fake_pixel([c0, c1][int(yy)], k, train)
                    for k in range(n_per) for yy in (0, 1)]
            assert pix == want


def test_cifar100_limits_and_cache(fake_cifar100):
    t = load_task("cifar100", 2, data_root=fake_cifar100, max_train_per_class=1, max_test_per_class=1)
    assert t.y_train.tolist() == [0, 1] and t.y_test.tolist() == [0, 1]
    assert any(k[0] == str(fake_cifar100.resolve()) for k in data._CIFAR100_CACHE)


def test_cifar100_real_md5_check_rejects_fake(tmp_path):
    """Without the fixture's subclass, torchvision's md5 check refuses the fake files: the
    loader reports it instead of silently using corrupted data."""
    write_fake_cifar100(tmp_path)
    with pytest.raises(RuntimeError, match="md5"):
        load_task("cifar100", 0, data_root=tmp_path)
