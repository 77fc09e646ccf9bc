"""CIFAR-100 (§4): task ``r`` = fine classes ``2r, 2r+1`` of the official train and test sets, read
with torchvision from ``<data_root>/cifar-100-python/{train,test,meta}``."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR100

from ffl.data.tasks import TaskData, normalize_images, task_classes
from ffl.files import atomic_path

# Standard per-channel statistics of the training set (RGB, pixel values in [0, 1]).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR100_FILES = ("train", "test", "meta")
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def _cifar100_class() -> type:
    """torchvision's dataset class, behind a function so tests can substitute a subclass whose md5
    sums match a tiny fake dataset (torchvision verifies the md5 of existing files on every load)."""
    return CIFAR100


#: (root, split) -> (uint8 images, fine labels, class names), decoded once per process
_CACHE: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, list[str]]] = {}


def _cifar100_missing(root: Path) -> list[Path]:
    base = root / "cifar-100-python"
    return [base / f for f in CIFAR100_FILES if not (base / f).is_file()]


def _missing_message(root: Path, missing: Sequence[Path]) -> str:
    return ("CIFAR-100 not found: missing " + ", ".join(str(p) for p in missing)
            + f". Expected {root}/cifar-100-python/{{train,test,meta}}. Two ways on: get it — "
            "load_task('cifar100', ..., download=True) (notebooks: `-p download true`, their default) "
            f"on a machine with a network, or download {CIFAR100_URL} and extract it into {root} — "
            "or run on the offline stand-in instead (notebooks: `-p dataset synthetic`).")


def ensure_cifar100(root: Path, *, download: bool) -> Path:
    """``<root>/cifar-100-python`` with ``train``, ``test`` and ``meta``, downloaded first when missing
    and ``download`` (torchvision checks the archive's md5; the folder is moved into place only when
    complete). Missing files, or a failed download, raise ``FileNotFoundError`` naming the files
    and the ways on."""
    root = Path(root)
    missing = _cifar100_missing(root)
    if missing and download:
        try:
            with atomic_path(root / "cifar-100-python") as staged:
                _cifar100_class()(root=str(staged.parent), train=True, download=True)  # md5-checked
        except OSError as e:  # no network (URLError), refused connection, full disk
            raise FileNotFoundError(_missing_message(root, missing) + f" (The download failed: {e}.)") from e
        missing = _cifar100_missing(root)
    if missing:
        raise FileNotFoundError(_missing_message(root, missing))
    return root / "cifar-100-python"


def _cifar100_split(root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Whole CIFAR-100 split as uint8 (N, 3, 32, 32), fine labels, class names; decoded once per
    process and cached."""
    split = "train" if train else "test"
    key = (str(root.resolve()), split)
    if key in _CACHE:
        return _CACHE[key]
    cls = _cifar100_class()
    ensure_cifar100(root, download=download)
    try:
        ds = cls(root=str(root), train=train, download=False)
    except RuntimeError as e:  # torchvision: md5 mismatch of train/test/meta
        raise RuntimeError(f"CIFAR-100 files under {root}/cifar-100-python failed torchvision's "
                           f"md5 check ({e}); delete them and use download=True") from e
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    _CACHE[key] = (images, labels, list(ds.classes))
    return _CACHE[key]


def load_cifar100(task: int, root: Path, *, download: bool, max_train_per_class: int | None = None,
                  max_test_per_class: int | None = None) -> TaskData:
    """Task r = fine classes 2r, 2r+1 of the official train/test sets (§4), labels 0/1."""
    classes = task_classes("cifar100", task)
    tr_img, tr_lab, names = _cifar100_split(root, True, download)
    te_img, te_lab, _ = _cifar100_split(root, False, download)
    x_tr, y_tr = _select(tr_img, tr_lab, classes, max_train_per_class)
    x_te, y_te = _select(te_img, te_lab, classes, max_test_per_class)
    return TaskData(normalize_images(x_tr, CIFAR100_MEAN, CIFAR100_STD), y_tr,
                    normalize_images(x_te, CIFAR100_MEAN, CIFAR100_STD), y_te,
                    classes=[names[c] for c in classes])



def _select(images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int],
            limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of ``classes`` (dataset order kept), relabelled 0..k-1, at most ``limit`` each."""
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
