"""CIFAR-10 and CIFAR-100 in their official python-pickle layout (§4), read through torchvision,
which checks every file's md5 on each load. One :class:`CifarPickles` describes a dataset's folder,
files, archive and torchvision class; the functions here fetch, check and decode it."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ffl.data.tasks import TaskData, download_failure, normalize_images
from ffl.files import atomic_path


@dataclass(frozen=True)
class CifarPickles:
    """One CIFAR dataset in the official layout ``<root>/<folder>/<files>``."""

    name: str  # "CIFAR-100"
    folder: str  # "cifar-100-python"
    files: tuple[str, ...]
    url: str
    dataset_class: Callable[[], type]  # called on each use, so tests can swap torchvision's class
    ways_on: str  # how to go on without the files (notebook parameters)
    mean: tuple[float, float, float]  # per-channel statistics of the training set, pixels in [0, 1]
    std: tuple[float, float, float]


#: (folder, root, split) -> (uint8 images, labels, class names), decoded once per process
_CACHE: dict[tuple[str, str, str], tuple[torch.Tensor, torch.Tensor, list[str]]] = {}


def missing_files(root: Path, cifar: CifarPickles) -> list[Path]:
    base = root / cifar.folder
    return [base / f for f in cifar.files if not (base / f).is_file()]


def missing_message(root: Path, missing: Sequence[Path], cifar: CifarPickles) -> str:
    listed = ",".join(cifar.files)
    return (f"{cifar.name} not found: missing " + ", ".join(str(p) for p in missing)
            + f". Expected {root}/{cifar.folder}/{{{listed}}}. Two ways on: get it — "
            f"load_task(..., download=True) (notebooks: `-p download true`, their default) on a machine "
            f"with a network, or download {cifar.url} and extract it into {root} — or {cifar.ways_on}.")


def ensure_files(root: Path, cifar: CifarPickles, *, download: bool) -> Path:
    """``<root>/<folder>`` with every file, downloaded first when missing and ``download``
    (torchvision checks the archive's md5; the folder is moved into place only when complete).
    Missing files, or a failed download, raise ``FileNotFoundError`` naming the files and the ways
    on."""
    root = Path(root)
    missing = missing_files(root, cifar)
    if missing and download:
        with download_failure(missing_message(root, missing, cifar)), atomic_path(root / cifar.folder) as staged:
            cifar.dataset_class()(root=str(staged.parent), train=True, download=True)  # md5-checked
        missing = missing_files(root, cifar)
    if missing:
        raise FileNotFoundError(missing_message(root, missing, cifar))
    return root / cifar.folder


def read_split(root: Path, cifar: CifarPickles, *, train: bool,
               download: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A whole split as uint8 (N, 3, 32, 32), labels (CIFAR-100: fine), class names; decoded once
    per process and cached."""
    split = "train" if train else "test"
    key = (cifar.folder, str(root.resolve()), split)
    if key in _CACHE:
        return _CACHE[key]
    cls = cifar.dataset_class()
    ensure_files(root, cifar, download=download)
    try:
        ds = cls(root=str(root), train=train, download=False)
    except RuntimeError as e:  # torchvision: md5 mismatch
        raise RuntimeError(f"{cifar.name} files under {root}/{cifar.folder} failed torchvision's "
                           f"md5 check ({e}); delete them and use download=True") from e
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    _CACHE[key] = (images, labels, list(ds.classes))
    return _CACHE[key]


def select_classes(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int],
                   limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``classes`` (dataset order kept), relabelled 0..k-1, at most ``limit`` each (the
    first ones of each class in dataset order)."""
    idxs, ys = [], []
    for i, c in enumerate(classes):
        idx = torch.nonzero(labels == c).flatten()
        if limit is not None:
            idx = idx[:limit]
        idxs.append(idx)
        ys.append(torch.full((len(idx),), i, dtype=torch.int64))
    # Back into dataset order, so that a batch loop without shuffling is not class-sorted.
    idx, y = torch.cat(idxs), torch.cat(ys)
    order = torch.argsort(idx)
    return images[idx[order]], y[order]


def load_task_from_pickles(root: Path, cifar: CifarPickles, classes: Sequence[int], *, download: bool,
                           max_train_per_class: int | None, max_test_per_class: int | None) -> TaskData:
    """The two-class (or k-class) task of ``classes`` from the official train and test splits,
    labels ``0..k-1`` in that order, normalized with the dataset's statistics."""
    tr_img, tr_lab, names = read_split(root, cifar, train=True, download=download)
    te_img, te_lab, _ = read_split(root, cifar, train=False, download=download)
    x_tr, y_tr = select_classes(tr_img, tr_lab, classes, max_train_per_class)
    x_te, y_te = select_classes(te_img, te_lab, classes, max_test_per_class)
    return TaskData(normalize_images(x_tr, cifar.mean, cifar.std), y_tr, normalize_images(x_te, cifar.mean, cifar.std),
                    y_te, classes=[names[c] for c in classes])
