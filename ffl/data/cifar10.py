"""CIFAR-10 in place of CIFAR-100 (not in the paper): real CIFAR images for the paper's CIFAR-100
experiment (§4.2) where CIFAR-100 cannot be had. Task ``r`` is the ``r``-th pair of CIFAR-10's
classes in :func:`ffl.data.tasks.cifar10_pairs`' round-robin order (45 two-class tasks; the paper's
CIFAR-100 has 50 disjoint ones). With ``max_train_per_class=500, max_test_per_class=100`` a task is
the size of a CIFAR-100 task.

Two sources under ``data_root``, tried in this order:

* the official ``cifar-10-batches-py/`` layout (what ``download=True`` fetches), read with
  torchvision, which checks every file's md5;
* the offline JPEG copy ``cifar10_substitute/cifar10_yoongikim_jpeg.npz`` (all 60,000 images as
  JPEG bytes + offsets, re-encoded at quality 75 by its uploader, so pixels differ a little from the
  official arrays; see its PROVENANCE.md), read directly.

Images of a class are taken in file order (the first ``max_*_per_class`` of them)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10

from ffl.data.cifar_pickles import CifarPickles, ensure_files, load_task_from_pickles, missing_files
from ffl.data.jpeg import decode_resize, file_stamp, npz_blobs, reading_npz
from ffl.data.tasks import TaskData, normalize_images, task_classes
from ffl.files import atomic_path

# Standard per-channel statistics of the training set (RGB, pixel values in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: the offline JPEG copy, relative to data_root
CIFAR10_NPZ = Path("cifar10_substitute") / "cifar10_yoongikim_jpeg.npz"
_REPAIR = "fetch {name} again (its PROVENANCE.md gives the sha256)"


def _cifar10_class() -> type:
    """torchvision's dataset class, behind a function so tests can substitute one whose md5 sums
    match a fake dataset."""
    return CIFAR10


CIFAR10_PICKLES = CifarPickles(
    "CIFAR-10", "cifar-10-batches-py", CIFAR10_FILES, CIFAR10_URL, lambda: _cifar10_class(),
    ways_on=f"place the offline JPEG copy {CIFAR10_NPZ} under the data root (read as it is), or run on "
            "the synthetic stand-in (notebooks: `-p dataset synthetic`)",
    mean=CIFAR10_MEAN, std=CIFAR10_STD)

#: npz stamp -> (class names, {split: (jpeg bytes, offsets, labels)})
_NPZ: dict[str, tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]] = {}
#: (npz stamp, split, class, limit) -> uint8 (n, 3, 32, 32)
_CACHE: dict[tuple[str, str, int, int | None], torch.Tensor] = {}


def cifar10_source(root: Path, *, download: bool = False) -> Path:
    """Where CIFAR-10 is read from under ``root``: the official ``cifar-10-batches-py/`` folder
    (downloaded first when neither source is there and ``download``), or the ``.npz`` copy;
    ``FileNotFoundError`` naming both and the ways on when neither is there."""
    root = Path(root)
    if not missing_files(root, CIFAR10_PICKLES):
        return root / CIFAR10_PICKLES.folder
    if (root / CIFAR10_NPZ).is_file():
        return root / CIFAR10_NPZ
    return ensure_files(root, CIFAR10_PICKLES, download=download)


def _read_npz(path: Path) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    key = file_stamp(path)
    if key not in _NPZ:
        with reading_npz(path, _REPAIR.format(name=path.name)), np.load(path) as z:
            _NPZ[key] = ([str(c) for c in z["classes"]],
                         {split: (z[f"{split}_jpeg"], z[f"{split}_offsets"], z[f"{split}_labels"])
                          for split in ("train", "test")})
    return _NPZ[key]


def _npz_class(path: Path, split: str, class_index: int, limit: int | None) -> torch.Tensor:
    """The first ``limit`` images of a class in the ``.npz`` copy (stored order), decoded."""
    key = (file_stamp(path), split, class_index, limit)
    if key not in _CACHE:
        jpeg, offsets, labels = _read_npz(path)[1][split]
        chosen = np.flatnonzero(labels == class_index)[:limit]
        if not len(chosen):
            raise FileNotFoundError(f"{path} holds no {split} images of class {class_index}")
        _CACHE[key] = decode_resize(npz_blobs(jpeg, offsets, chosen), repair=_REPAIR.format(name=path.name))
    return _CACHE[key]


def load_cifar10(task: int, root: Path, *, download: bool, max_train_per_class: int | None = None,
                 max_test_per_class: int | None = None) -> TaskData:
    """Task ``r`` = the ``r``-th class pair of :func:`~ffl.data.tasks.cifar10_pairs`, labels 0/1,
    from the official folder or the ``.npz`` copy; images in file order, at most ``max_*`` per class."""
    classes = task_classes("cifar10", task)
    source = cifar10_source(root, download=download)
    if source.suffix != ".npz":
        return load_task_from_pickles(root, CIFAR10_PICKLES, classes, download=download,
                                      max_train_per_class=max_train_per_class, max_test_per_class=max_test_per_class)
    x, y = {}, {}
    for split, limit in (("train", max_train_per_class), ("test", max_test_per_class)):
        images = [_npz_class(source, split, c, limit) for c in classes]
        x[split] = normalize_images(torch.cat(images), CIFAR10_MEAN, CIFAR10_STD)
        y[split] = torch.cat([torch.full((len(im),), i, dtype=torch.int64) for i, im in enumerate(images)])
    names = _read_npz(source)[0]
    return TaskData(x["train"], y["train"], x["test"], y["test"], classes=[names[c] for c in classes])


def write_cifar10_subset(npz_path: str | Path, out_root: str | Path, *, train_per_class: int,
                         test_per_class: int) -> Path:
    """Write ``<out_root>/cifar10_substitute/cifar10_yoongikim_jpeg.npz`` holding only the first
    ``train_per_class`` / ``test_per_class`` images of each class of the offline copy ``npz_path``
    (JPEG bytes unchanged, same keys): what the profiles read (500/100) in a tenth of the bytes, for
    a machine that data must be carried to. Loaded with those limits (or fewer), it gives exactly
    the tensors of the full copy. The file is moved into place only when complete."""
    out = Path(out_root) / CIFAR10_NPZ
    with np.load(npz_path) as z:
        arrays = {"classes": z["classes"]}
        for split, n in (("train", train_per_class), ("test", test_per_class)):
            labels, offsets, jpeg = z[f"{split}_labels"], z[f"{split}_offsets"], z[f"{split}_jpeg"]
            keep = np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(len(arrays["classes"]))])
            blobs = [jpeg[offsets[k]:offsets[k + 1]] for k in keep]
            arrays[f"{split}_jpeg"] = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)
            arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
            arrays[f"{split}_labels"] = labels[keep]
            arrays[f"{split}_files"] = z[f"{split}_files"][keep]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as staged:
        with open(staged, "wb") as f:
            np.savez(f, **arrays)
    return out
