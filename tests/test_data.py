"""ffl.data (§4 tasks): split bookkeeping, synthetic generator, and loaders run against tiny fake
datasets written in the *real on-disk formats* (and, where ../shared/data exists beside the repository, real data).

Fixture writers live in this file (they write dataset formats only these tests need; conftest.py
holds the fixtures shared by several test files).
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
import ffl.data.cifar10 as cifar10
import ffl.data.cifar100 as cifar100
import ffl.data.cifar_pickles as cifar_pickles
import ffl.data.tiny_imagenet as tiny_imagenet
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

    monkeypatch.setattr(cifar100, "_cifar100_class", lambda: FakeSumsCIFAR100)
    return tmp_path


# --------------------------------------------------------------------------------------------
# Task bookkeeping
# --------------------------------------------------------------------------------------------

def test_datasets_and_task_counts():
    assert DATASETS == ("synthetic", "cifar100", "cifar10", "tiny_imagenet", "namedata")
    assert num_tasks("cifar100") == 50
    assert num_tasks("cifar10") == 45
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


@pytest.mark.parametrize("dataset,task", [("cifar100", 50), ("cifar10", 45), ("cifar100", -1), ("namedata", 9),
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


def test_synthetic_deterministic_and_independent_of_global_rng():
    torch.manual_seed(123)
    a = load_task("synthetic", 5, seed=1)
    torch.manual_seed(456)
    b = load_task("synthetic", 5, seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, load_task("synthetic", 5, seed=2).x_train)
    assert not torch.equal(a.x_train, load_task("synthetic", 6, seed=1).x_train)
    # train and test are different draws
    assert not torch.equal(a.x_train[:128], a.x_test)


@pytest.mark.slow  # a fresh interpreter importing torch takes a few seconds
def test_synthetic_deterministic_across_processes():
    a = load_task("synthetic", 5, seed=1)
    code = ("import hashlib, ffl.data as d; t = d.load_task('synthetic', 5, seed=1); "
            "print(hashlib.sha256(t.x_train.numpy().tobytes() + t.y_train.numpy().tobytes())"
            ".hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    here = hashlib.sha256(a.x_train.numpy().tobytes() + a.y_train.numpy().tobytes()).hexdigest()
    assert out == here


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


def test_cifar100_failed_download_names_the_ways_on(tmp_path, monkeypatch):
    """Offline, download=True (the notebooks' default) stops with the expected files, the two ways
    on and the reason, and leaves nothing behind."""
    import urllib.error

    from torchvision.datasets import CIFAR100

    class Offline(CIFAR100):
        def download(self) -> None:
            raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar100, "_cifar100_class", lambda: Offline)
    with pytest.raises(FileNotFoundError) as e:
        load_task("cifar100", 0, data_root=tmp_path, download=True)
    msg = str(e.value)
    assert str(tmp_path / "cifar-100-python" / "train") in msg and "no network" in msg
    assert "-p download true" in msg and "-p dataset synthetic" in msg
    assert list(tmp_path.iterdir()) == []


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
    assert any(k[:2] == ("cifar-100-python", str(fake_cifar100.resolve())) for k in cifar_pickles._CACHE)


def test_cifar100_download_goes_through_torchvision_atomically(tmp_path, monkeypatch):
    """download=True calls torchvision's download (stubbed: it writes the fake files, whose
    pickles are byte-deterministic so their md5 is known in advance) into a temporary folder,
    then moves the complete cifar-100-python/ into data_root."""
    from torchvision.datasets import CIFAR100

    md5 = write_fake_cifar100(tmp_path / "probe")
    calls = []

    class StubDownloadCIFAR100(CIFAR100):
        train_list = [["train", md5["train"]]]
        test_list = [["test", md5["test"]]]
        meta = {**CIFAR100.meta, "md5": md5["meta"]}

        def download(self) -> None:
            calls.append(self.root)
            if not self._check_integrity():
                write_fake_cifar100(Path(self.root))

    monkeypatch.setattr(cifar100, "_cifar100_class", lambda: StubDownloadCIFAR100)
    root = tmp_path / "root"
    t = load_task("cifar100", 1, data_root=root, download=True)
    assert t.classes == ["class02", "class03"]
    assert len(calls) == 1 and Path(calls[0]).parent == root  # a temporary folder inside root
    assert [p.name for p in root.iterdir()] == ["cifar-100-python"]


def test_cifar100_real_md5_check_rejects_fake(tmp_path):
    """Without the fixture's subclass, torchvision's md5 check refuses the fake files: the
    loader reports it instead of silently using corrupted data."""
    write_fake_cifar100(tmp_path)
    with pytest.raises(RuntimeError, match="md5"):
        load_task("cifar100", 0, data_root=tmp_path)


# --------------------------------------------------------------------------------------------
# CIFAR-10 in place of CIFAR-100: the official pickles and the offline JPEG copy
# --------------------------------------------------------------------------------------------

def test_cifar10_tasks_are_every_pair_in_round_robin_order():
    pairs = [tuple(task_classes("cifar10", t)) for t in range(num_tasks("cifar10"))]
    assert sorted(pairs) == [(a, b) for a in range(10) for b in range(a + 1, 10)]  # each pair once
    for k in range(9):  # every round of 5 tasks uses each class exactly once
        assert sorted(c for p in pairs[5 * k:5 * k + 5] for c in p) == list(range(10))
    assert pairs[:5] == [(0, 9), (1, 8), (2, 7), (3, 6), (4, 5)]


def write_fake_cifar10_pickles(root: Path, n_train: int = 3, n_test: int = 2) -> dict[str, str]:
    """``root/cifar-10-batches-py/`` in the official format (5 train batches, a test batch, meta),
    ``n_train`` images per class spread over the batches; return the files' md5 sums."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    S = _Py2Str
    labels = [c for k in range(n_train) for c in range(10)]
    ks = [k for k in range(n_train) for _ in range(10)]
    batches = np.array_split(np.arange(len(labels)), 5)
    for i, idx in enumerate(batches, 1):
        pix = np.array([_fake_pixel(labels[j], ks[j], True) for j in idx], dtype=np.uint8)
        _py2_pickle({S(b"batch_label"): S(b"training batch %d of 5" % i), S(b"labels"): [labels[j] for j in idx],
                     S(b"data"): np.repeat(pix[:, None], 3072, axis=1).reshape(len(idx), 3072),
                     S(b"filenames"): [S(b"img_%d.png" % j) for j in idx]}, base / f"data_batch_{i}")
    test_labels = [c for k in range(n_test) for c in range(10)]
    pix = np.array([_fake_pixel(c, k, False) for k in range(n_test) for c in range(10)], dtype=np.uint8)
    _py2_pickle({S(b"batch_label"): S(b"testing batch 1 of 1"), S(b"labels"): test_labels,
                 S(b"data"): np.repeat(pix[:, None], 3072, axis=1),
                 S(b"filenames"): [S(b"t_%d.png" % j) for j in range(len(test_labels))]}, base / "test_batch")
    _py2_pickle({S(b"label_names"): [S(b"name%d" % c) for c in range(10)], S(b"num_cases_per_batch"): 10,
                 S(b"num_vis"): 3072}, base / "batches.meta")
    return {f: hashlib.md5((base / f).read_bytes()).hexdigest() for f in data.cifar10.CIFAR10_FILES}


def write_fake_cifar10_npz(path: Path, n_train: int = 3, n_test: int = 2) -> None:
    """A small .npz in the format of ../shared/data/cifar10_substitute: JPEG bytes + offsets,
    class-major, files ``<class>/0000.jpg``."""
    import io

    from PIL import Image

    classes = np.array([f"name{c}" for c in range(10)])
    arrays = {"classes": classes}
    for split, n in (("train", n_train), ("test", n_test)):
        blobs, labels, files = [], [], []
        for c in range(10):
            for k in range(n):
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), _colour(c % 5)).save(buf, format="JPEG", quality=95)
                blobs.append(buf.getvalue())
                labels.append(c)
                files.append(f"{classes[c]}/{k:04d}.jpg")
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.int16)
        arrays[f"{split}_files"] = np.array(files)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def test_cifar10_official_pickles_through_torchvision(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    md5 = write_fake_cifar10_pickles(tmp_path)

    class FakeSumsCIFAR10(CIFAR10):
        train_list = [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)]
        test_list = [["test_batch", md5["test_batch"]]]
        meta = {**CIFAR10.meta, "md5": md5["batches.meta"]}

    monkeypatch.setattr(cifar10, "_cifar10_class", lambda: FakeSumsCIFAR10)
    assert cifar10.cifar10_source(tmp_path) == tmp_path / "cifar-10-batches-py"
    t = load_task("cifar10", 1, data_root=tmp_path, max_train_per_class=2)
    c0, c1 = task_classes("cifar10", 1)
    assert t.classes == [f"name{c0}", f"name{c1}"]
    assert t.y_train.tolist() == [0, 1, 0, 1] and t.y_test.tolist() == [0, 1, 0, 1]  # dataset order
    mean, std = torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    pix = ((t.x_train * std + mean) * 255).round()[:, 0, 0, 0].long().tolist()
    assert pix == [_fake_pixel([c0, c1][y], k, True) for k in range(2) for y in (0, 1)]
    # the official folder wins over an .npz copy beside it
    write_fake_cifar10_npz(tmp_path / data.CIFAR10_NPZ)
    assert cifar10.cifar10_source(tmp_path) == tmp_path / "cifar-10-batches-py"


def test_cifar10_reads_the_npz_copy_directly(tmp_path):
    write_fake_cifar10_npz(tmp_path / data.CIFAR10_NPZ, n_train=3, n_test=2)
    assert cifar10.cifar10_source(tmp_path) == tmp_path / data.CIFAR10_NPZ
    t = load_task("cifar10", 2, data_root=tmp_path, max_test_per_class=1)
    c0, c1 = task_classes("cifar10", 2)
    assert t.classes == [f"name{c0}", f"name{c1}"]
    assert t.x_train.shape == (6, 3, 32, 32) and t.y_train.bincount().tolist() == [3, 3]
    assert t.y_test.bincount().tolist() == [1, 1]
    rgb = _unnormalize(t.x_train, data.CIFAR10_MEAN, data.CIFAR10_STD).mean((2, 3))
    for x, y in zip(rgb, t.y_train):  # each image is its class's colour (JPEG rounding aside)
        assert torch.allclose(x, torch.tensor(_colour([c0, c1][y] % 5), dtype=torch.float), atol=3)


def test_cifar10_missing_names_both_sources_and_writes_nothing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_task("cifar10", 0, data_root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg and "cifar-10-python.tar.gz" in msg
    assert str(data.CIFAR10_NPZ) in msg and "-p dataset synthetic" in msg
    assert list(tmp_path.iterdir()) == []


def test_cifar10_damaged_jpeg_names_the_copy(tmp_path):
    npz = tmp_path / data.CIFAR10_NPZ
    write_fake_cifar10_npz(npz)
    with np.load(npz) as z:
        arrays = dict(z)
    arrays["train_jpeg"] = arrays["train_jpeg"].copy()
    arrays["train_jpeg"][: arrays["train_offsets"][1]] = 0  # the first airplane is no JPEG any more
    np.savez(npz, **arrays)
    with pytest.raises(OSError, match="cannot decode the image .*fetch cifar10_yoongikim_jpeg.npz again"):
        load_task("cifar10", 0, data_root=tmp_path)


def test_cifar10_subset_copy_gives_the_same_tasks(tmp_path):
    """A copy of the first images per class loads, with those limits, exactly as the full copy
    does (so a zoo's data digests match), and holds nothing else."""
    full = tmp_path / "full"
    write_fake_cifar10_npz(full / data.CIFAR10_NPZ, n_train=4, n_test=3)
    out = cifar10.write_cifar10_subset(full / data.CIFAR10_NPZ, tmp_path / "small", train_per_class=2,
                                       test_per_class=1)
    assert out == tmp_path / "small" / data.CIFAR10_NPZ
    for task in (0, 7):
        a = load_task("cifar10", task, data_root=full, max_train_per_class=2, max_test_per_class=1)
        b = load_task("cifar10", task, data_root=tmp_path / "small")
        assert a.sha256() == b.sha256() and a.classes == b.classes
    with np.load(out) as z:
        assert z["train_labels"].tolist() == [c for c in range(10) for _ in range(2)]
        assert z["test_files"][:2].tolist() == ["name0/0000.jpg", "name1/0000.jpg"]
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no staging left behind


@pytest.mark.skipif(not (SHARED / "cifar10_substitute").is_dir(), reason="no shared real data")
def test_real_cifar10_task_is_the_size_of_a_cifar100_task():
    t = load_task("cifar10", 0, data_root=SHARED, max_train_per_class=500, max_test_per_class=100)
    assert t.classes == ["airplane", "truck"]
    assert t.x_train.shape == (1000, 3, 32, 32) and t.y_train.bincount().tolist() == [500, 500]
    assert t.x_test.shape == (200, 3, 32, 32) and t.y_test.bincount().tolist() == [100, 100]
    # normalized with CIFAR-10's statistics: roughly zero mean, unit-ish spread
    assert t.x_train.mean().abs() < 0.3 and 0.7 < t.x_train.std() < 1.3
    full = load_task("cifar10", 0, data_root=SHARED)
    assert full.y_train.bincount().tolist() == [5000, 5000] and full.y_test.bincount().tolist() == [1000, 1000]
    assert torch.equal(full.x_train[:500], t.x_train[:500])  # the limit keeps the first images in file order


# --------------------------------------------------------------------------------------------
# Tiny ImageNet: fake in the official folder layout, the npz helper, and real data
# --------------------------------------------------------------------------------------------

def _colour(c: int) -> tuple[int, int, int]:
    return (30 + 50 * c, 220 - 50 * c, 100)


def write_fake_tiny_imagenet(root: Path, n_classes: int = 4, n_train: int = 3,
                             n_val: int = 2) -> list[str]:
    """``root/tiny-imagenet-200`` in the official layout: wnids.txt, train/<wnid>/images/
    <wnid>_<k>.JPEG (64×64, one solid colour per class; one grayscale image, as the real set
    has), val/images/val_<k>.JPEG and val/val_annotations.txt (classes interleaved)."""
    from PIL import Image

    base = root / "tiny-imagenet-200"
    wnids = [f"n{c:08d}" for c in range(n_classes)]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    for c, w in enumerate(wnids):
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True)
        for k in range(n_train):
            img = Image.new("RGB", (64, 64), _colour(c))
            if c == 0 and k == 0:
                img = Image.new("L", (64, 64), 128)
            img.save(folder / f"{w}_{k}.JPEG", quality=95)
    lines = []
    for k in range(n_val * n_classes):
        c = k % n_classes
        Image.new("RGB", (64, 64), _colour(c)).save(base / "val" / "images" / f"val_{k}.JPEG",
                                                    quality=95)
        lines.append(f"val_{k}.JPEG\t{wnids[c]}\t0\t0\t63\t63\n")
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return wnids


def _unnormalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)) * 255


def test_tiny_imagenet_fake_layout(tmp_path):
    wnids = write_fake_tiny_imagenet(tmp_path)
    t = load_task("tiny_imagenet", 0, data_root=tmp_path)
    assert t.classes == wnids
    assert t.x_train.shape == (12, 3, 32, 32) and t.x_test.shape == (8, 3, 32, 32)
    assert t.x_train.dtype == torch.float32 and t.y_train.dtype == torch.int64
    assert t.y_train.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert t.y_test.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    rgb = _unnormalize(t.x_train, data.TINY_IMAGENET_MEAN, data.TINY_IMAGENET_STD).mean((2, 3))
    assert torch.allclose(rgb[0], torch.tensor([128.0] * 3), atol=3)  # grayscale → RGB
    for i in range(1, 12):
        assert torch.allclose(rgb[i], torch.tensor(_colour(int(t.y_train[i])), dtype=torch.float),
                              atol=4)
    small = load_task("tiny_imagenet", 0, data_root=tmp_path, max_train_per_class=1,
                      max_test_per_class=1)
    assert small.y_train.tolist() == [0, 1, 2, 3] and small.y_test.tolist() == [0, 1, 2, 3]


def test_tiny_imagenet_disk_cache_reused_and_invalidated(tmp_path):
    from PIL import Image

    wnids = write_fake_tiny_imagenet(tmp_path)
    a = load_task("tiny_imagenet", 0, data_root=tmp_path)
    cache = tmp_path / "tiny-imagenet-200" / ".ffl_cache"
    assert len(list(cache.glob("*.npz"))) == 8
    tiny_imagenet._CACHE.clear()  # as a fresh process would
    b = load_task("tiny_imagenet", 0, data_root=tmp_path)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    # a new file makes the cached listing stale: it must be decoded again
    Image.new("RGB", (64, 64), (0, 0, 0)).save(
        tmp_path / "tiny-imagenet-200" / "train" / wnids[1] / "images" / f"{wnids[1]}_3.JPEG")
    tiny_imagenet._CACHE.clear()
    c = load_task("tiny_imagenet", 0, data_root=tmp_path)
    assert c.y_train.bincount().tolist() == [3, 4, 3, 3]
    tiny_imagenet._CACHE.clear()
    d = load_task("tiny_imagenet", 0, data_root=tmp_path, disk_cache=False)
    assert torch.equal(c.x_train, d.x_train)


def test_tiny_imagenet_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_task("tiny_imagenet", 0, data_root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "tiny-imagenet-200" / "wnids.txt") in msg
    assert "val_annotations.txt" in msg and "download=True" in msg
    assert "materialize_tiny_imagenet" in msg
    write_fake_tiny_imagenet(tmp_path, n_classes=8)
    import shutil
    shutil.rmtree(tmp_path / "tiny-imagenet-200" / "train" / "n00000005")
    with pytest.raises(FileNotFoundError, match="n00000005"):
        load_task("tiny_imagenet", 1, data_root=tmp_path)
    with pytest.raises(ValueError, match="wnids"):
        load_task("tiny_imagenet", 2, data_root=tmp_path)  # wnids.txt lists only 8


def test_download_failure_leaves_nothing(tmp_path, monkeypatch):
    """An interrupted download (here: the archive step writes part of the folder, then fails)
    leaves no half-written dataset behind."""
    import torchvision.datasets.utils as tvu

    def broken(url, download_root, extract_root=None, filename=None, md5=None, **kw):
        part = Path(download_root) / "tiny-imagenet-200"
        part.mkdir()
        (part / "wnids.txt").write_text("n00000000\n")
        raise OSError("connection reset")

    monkeypatch.setattr(tvu, "download_and_extract_archive", broken)
    with pytest.raises(OSError, match="connection reset"):
        load_task("tiny_imagenet", 0, data_root=tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def test_tiny_imagenet_download_moves_complete_folder(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    calls = []

    def fake(url, download_root, extract_root=None, filename=None, md5=None, **kw):
        calls.append((url, md5))
        write_fake_tiny_imagenet(Path(download_root))

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake)
    t = load_task("tiny_imagenet", 0, data_root=tmp_path, download=True)
    assert calls == [(data.TINY_IMAGENET_URL, data.TINY_IMAGENET_MD5)]
    assert t.x_train.shape[0] == 12
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-imagenet-200"]  # no temp left over
    load_task("tiny_imagenet", 0, data_root=tmp_path, download=True)
    assert len(calls) == 1  # present: not downloaded again


def write_fake_tiny_npz(path: Path, n_classes: int = 5, n_train: int = 2, n_val: int = 2) -> None:
    """A small .npz in the format of ../shared/data/tiny_imagenet (JPEG bytes + offsets)."""
    from PIL import Image
    import io

    wnids = np.array([f"n{c:08d}" for c in range(n_classes)])
    arrays = {"wnids": wnids, "words": np.array([f"thing {c}" for c in range(n_classes)])}
    for split, n in (("train", n_train), ("val", n_val)):
        blobs, labels, files = [], [], []
        for k in range(n * n_classes):
            c = k // n if split == "train" else k % n_classes
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), _colour(c)).save(buf, format="JPEG")
            blobs.append(buf.getvalue())
            labels.append(c)
            files.append(f"{wnids[c]}_{k % n}.JPEG" if split == "train" else f"val_{k}.JPEG")
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.int16)
        arrays[f"{split}_files"] = np.array(files)
    np.savez(path, **arrays)


def test_materialize_tiny_imagenet_from_npz(tmp_path):
    npz = tmp_path / "tiny.npz"
    write_fake_tiny_npz(npz)
    out = data.materialize_tiny_imagenet(npz, tmp_path / "root", classes=[0, 1, 2, "n00000003"])
    assert out == tmp_path / "root" / "tiny-imagenet-200"
    assert (out / "wnids.txt").read_text().split() == [f"n{c:08d}" for c in range(5)]
    assert not (out / "train" / "n00000004").exists()  # class 4 not chosen
    assert len((out / "val" / "val_annotations.txt").read_text().splitlines()) == 8
    t = load_task("tiny_imagenet", 0, data_root=tmp_path / "root")
    assert t.y_train.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert t.y_test.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(FileExistsError):
        data.materialize_tiny_imagenet(npz, tmp_path / "root")
    data.materialize_tiny_imagenet(npz, tmp_path / "root", overwrite=True)
    assert (out / "train" / "n00000004" / "images" / "n00000004_1.JPEG").is_file()
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["tiny-imagenet-200"]


def test_tiny_imagenet_tasks_follow_sorted_wnids(tmp_path):
    """The official loader (ImageFolder) numbers classes by sorted folder name, not wnids.txt order."""
    wnids = write_fake_tiny_imagenet(tmp_path, n_classes=8)
    listed = wnids[4:] + wnids[:4]  # wnids.txt in another order than sorted
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").write_text("".join(w + "\n" for w in listed))
    assert load_task("tiny_imagenet", 0, data_root=tmp_path).classes == wnids[:4]
    assert load_task("tiny_imagenet", 1, data_root=tmp_path).classes == wnids[4:]


def test_tiny_imagenet_reads_the_npz_copy_directly(tmp_path):
    """<data_root>/tiny_imagenet/tiny_imagenet_200_jpeg.npz is read as it is; it gives the same task
    as the official layout written from it; the official folder wins when both exist."""
    npz = tmp_path / "npz_root" / data.TINY_IMAGENET_NPZ
    npz.parent.mkdir(parents=True)
    write_fake_tiny_npz(npz, n_classes=8, n_train=3, n_val=2)
    with np.load(npz) as z:  # store the wnids out of sorted order, as the real copy does
        arrays = dict(z)
    order = np.array([5, 0, 7, 1, 6, 2, 4, 3])  # stored position -> original class
    inverse = np.argsort(order)
    arrays["wnids"] = arrays["wnids"][order]
    for split in ("train", "val"):
        arrays[f"{split}_labels"] = inverse[arrays[f"{split}_labels"]].astype(np.int16)
    np.savez(npz, **arrays)
    t = load_task("tiny_imagenet", 1, data_root=tmp_path / "npz_root")
    assert t.classes == [f"n{c:08d}" for c in range(4, 8)]
    assert t.y_train.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 and t.y_test.bincount().tolist() == [2] * 4
    rgb = _unnormalize(t.x_train, data.TINY_IMAGENET_MEAN, data.TINY_IMAGENET_STD).mean((2, 3))
    assert torch.allclose(rgb[0], torch.tensor(_colour(4), dtype=torch.float), atol=4)
    data.materialize_tiny_imagenet(npz, tmp_path / "folder_root")
    f = load_task("tiny_imagenet", 1, data_root=tmp_path / "folder_root")
    assert f.classes == t.classes and torch.equal(f.x_train, t.x_train) and torch.equal(f.x_test, t.x_test)
    assert torch.equal(f.y_test, t.y_test)
    with pytest.raises(ValueError, match="holds only 8 wnids"):
        load_task("tiny_imagenet", 2, data_root=tmp_path / "npz_root")


@pytest.mark.skipif(not (SHARED / "tiny_imagenet").is_dir(), reason="no shared real data (../shared/data)")
def test_real_tiny_imagenet_task_0_holds_the_first_four_sorted_wnids():
    wnids = sorted((SHARED / "tiny_imagenet" / "wnids.txt").read_text().split())
    t = load_task("tiny_imagenet", 0, data_root=SHARED)  # the .npz copy, read directly
    assert t.classes == wnids[:4] == ["n01443537", "n01629819", "n01641577", "n01644900"]
    assert t.x_train.shape == (400, 3, 32, 32) and t.x_test.shape == (200, 3, 32, 32)
    assert t.y_train.bincount().tolist() == [100] * 4 and t.y_test.bincount().tolist() == [50] * 4


@pytest.mark.skipif(not (SHARED / "tiny_imagenet").is_dir(), reason="no shared real data")
def test_real_tiny_imagenet_via_materialize(tmp_path):
    npz = SHARED / "tiny_imagenet" / "tiny_imagenet_200_jpeg.npz"
    wnids = sorted((SHARED / "tiny_imagenet" / "wnids.txt").read_text().split())
    data.materialize_tiny_imagenet(npz, tmp_path, classes=wnids[4:8])
    t = load_task("tiny_imagenet", 1, data_root=tmp_path)
    assert t.classes == wnids[4:8]
    direct = load_task("tiny_imagenet", 1, data_root=SHARED)
    assert torch.equal(t.x_train, direct.x_train) and torch.equal(t.x_test, direct.x_test)
    assert t.x_train.shape == (400, 3, 32, 32) and t.x_test.shape == (200, 3, 32, 32)
    assert t.y_train.bincount().tolist() == [100] * 4 and t.y_test.bincount().tolist() == [50] * 4
    # normalized with Tiny ImageNet statistics: roughly zero mean, unit-ish spread
    assert t.x_train.mean().abs() < 0.3 and 0.6 < t.x_train.std() < 1.3
    # val boxes come from the shared val_annotations.txt
    line = (tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt").read_text().splitlines()[0]
    assert line in (SHARED / "tiny_imagenet" / "val_annotations.txt").read_text()


# --------------------------------------------------------------------------------------------
# NameData
# --------------------------------------------------------------------------------------------

def write_fake_names(root: Path) -> Path:
    """``root/names/{Arabic,Chinese}.txt`` (UTF-8, trailing newline, a repeat and accents)."""
    base = root / "names"
    base.mkdir(parents=True)
    (base / "Arabic.txt").write_text("Nader\nKhoury\nNader\nHaddad\nSaliba\nAntar\n", encoding="utf-8")
    (base / "Chinese.txt").write_text("Ang\nAu-Yong\nBai\nBan\nBao\nBei\nBian\nBui\nCai\nCao\n",
                                      encoding="utf-8")
    return base


def test_letters_and_ascii_folding():
    assert data.N_LETTERS == 58 == len(data.ALL_LETTERS)
    assert data.unicode_to_ascii("Ślusàrski") == "Slusarski"  # the tutorial's own example
    assert data.unicode_to_ascii("Müller-Lüdenscheidt") == "Muller-Ludenscheidt"  # '-' is the 58th
    assert data.unicode_to_ascii("O'Neill, Jr.") == "O'Neill, Jr."
    x = data.name_to_tensor("Bai")
    assert x.shape == (3, 58) and x.dtype == torch.float32
    assert x.sum(1).tolist() == [1, 1, 1]
    assert x.argmax(1).tolist() == [data.ALL_LETTERS.index(c) for c in "Bai"]
    assert data.NAMEDATA_LANGUAGES == tuple(sorted(data.NAMEDATA_LANGUAGES))
    assert len(data.NAMEDATA_LANGUAGES) == 18


def _decoded(x, lengths):
    return ["".join(data.ALL_LETTERS[i] for i in row[:n].argmax(1).tolist()) for row, n in zip(x, lengths.tolist())]


def test_namedata_official_split(tmp_path):
    """The official split: a random half of each file's lines trains (repeats included); the
    distinct names never drawn are the test set."""
    write_fake_names(tmp_path)
    t = load_task("namedata", 0, data_root=tmp_path)
    assert t.x_train.shape[1] == t.x_test.shape[1] == 7  # "Au-Yong"
    assert t.y_train.bincount().tolist() == [3, 5]  # half of 6 Arabic and of 10 Chinese lines
    lines = {0: ["Nader", "Khoury", "Nader", "Haddad", "Saliba", "Antar"],
             1: ["Ang", "Au-Yong", "Bai", "Ban", "Bao", "Bei", "Bian", "Bui", "Cai", "Cao"]}
    train = _decoded(t.x_train, t.lengths_train)
    test = _decoded(t.x_test, t.lengths_test)
    for label in (0, 1):
        tr = [n for n, y in zip(train, t.y_train.tolist()) if y == label]
        te = [n for n, y in zip(test, t.y_test.tolist()) if y == label]
        assert sorted(te) == sorted(set(lines[label]) - set(tr))  # every name not drawn, once
    again = load_task("namedata", 0, data_root=tmp_path)
    assert torch.equal(again.x_train, t.x_train) and torch.equal(again.y_test, t.y_test)
    with pytest.raises(ValueError, match="unknown NameData split 'half'.*official"):
        load_task("namedata", 0, data_root=tmp_path, split="half")


def test_namedata_fake(tmp_path):
    write_fake_names(tmp_path)
    t = load_task("namedata", 0, data_root=tmp_path, split="fraction")
    assert t.classes == ["Arabic", "Chinese"]
    assert t.x_train.dim() == 3 and t.x_train.shape[2] == 58
    assert t.x_train.shape[1] == t.x_test.shape[1] == 7  # "Au-Yong"
    # deduped: 5 Arabic (1 test), 10 Chinese (2 test)
    assert t.y_train.bincount().tolist() == [4, 8] and t.y_test.bincount().tolist() == [1, 2]
    for x, lengths in ((t.x_train, t.lengths_train), (t.x_test, t.lengths_test)):
        assert x.sum(2).sum(1).long().tolist() == lengths.tolist()  # one-hot up to length, 0 after
        assert (x.sum(2) <= 1).all()
    names = lambda x, l: {"".join(data.ALL_LETTERS[i] for i in row[:n].argmax(1).tolist())  # noqa: E731
                          for row, n in zip(x, l.tolist())}
    train, test = names(t.x_train, t.lengths_train), names(t.x_test, t.lengths_test)
    assert not train & test
    assert train | test == {"Nader", "Khoury", "Haddad", "Saliba", "Antar", "Ang", "Au-Yong", "Bai",
                            "Ban", "Bao", "Bei", "Bian", "Bui", "Cai", "Cao"}
    again = load_task("namedata", 0, data_root=tmp_path, split="fraction")
    assert torch.equal(again.x_train, t.x_train) and torch.equal(again.y_test, t.y_test)
    other = [load_task("namedata", 0, data_root=tmp_path, seed=s, split="fraction") for s in range(1, 6)]
    assert any(names(o.x_test, o.lengths_test) != test for o in other)
    full = load_task("namedata", 0, data_root=tmp_path, dedupe=False, split="fraction")
    assert len(full.y_train) + len(full.y_test) == 16
    capped = load_task("namedata", 0, data_root=tmp_path, max_per_class=3, split="fraction")
    assert len(capped.y_train) + len(capped.y_test) == 6


def test_namedata_packs_for_a_gru(tmp_path):
    write_fake_names(tmp_path)
    t = load_task("namedata", 0, data_root=tmp_path)
    packed = torch.nn.utils.rnn.pack_padded_sequence(t.x_train, t.lengths_train, batch_first=True,
                                                     enforce_sorted=False)
    _, h = torch.nn.GRU(58, 4, batch_first=True)(packed)
    assert h.shape == (1, len(t.y_train), 4)


def test_namedata_missing(tmp_path):
    write_fake_names(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_task("namedata", 1, data_root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "names" / "Czech.txt") in msg and str(tmp_path / "names" / "Dutch.txt") in msg
    assert "download=True" in msg and data.NAMEDATA_URL in msg


def test_namedata_download(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def fake(url, download_root, extract_root=None, filename=None, md5=None, **kw):
        assert url == data.NAMEDATA_URL
        write_fake_names(Path(download_root) / "data")  # the zip holds data/names/*.txt

    monkeypatch.setattr(tvu, "download_and_extract_archive", fake)
    t = load_task("namedata", 0, data_root=tmp_path / "root", download=True)
    assert t.classes == ["Arabic", "Chinese"]
    assert [p.name for p in (tmp_path / "root").iterdir()] == ["names"]


@pytest.mark.skipif(not (SHARED / "names").is_dir(), reason="no shared real data")
def test_real_namedata_all_tasks():
    total = 0
    for r in range(num_tasks("namedata")):
        t = load_task("namedata", r, data_root=SHARED, dedupe=False, split="fraction")
        assert t.classes == [data.NAMEDATA_LANGUAGES[c] for c in task_classes("namedata", r)]
        assert set(t.y_test.tolist()) == {0, 1}
        total += len(t.y_train) + len(t.y_test)
    assert total == 20074  # every line of the tutorial's 18 files (PROVENANCE.md)


@pytest.mark.skipif(not (SHARED / "names").is_dir(), reason="no shared real data")
def test_real_namedata_official_split():
    t = load_task("namedata", 0, data_root=SHARED)  # Arabic (2,000 lines, 108 names), Chinese (268)
    assert t.y_train.bincount().tolist() == [1000, 134]
    train = set(_decoded(t.x_train, t.lengths_train))
    test = _decoded(t.x_test, t.lengths_test)
    assert not train & set(test) and len(test) == len(set(test))
