"""CIFAR-100 (§4): task ``r`` = fine classes ``2r, 2r+1`` of the official train and test sets, read
with torchvision from ``<data_root>/cifar-100-python/{train,test,meta}``."""
from __future__ import annotations

from pathlib import Path

from torchvision.datasets import CIFAR100

from ffl.data.cifar_pickles import CifarPickles, ensure_files, read_split, select_classes
from ffl.data.tasks import TaskData, normalize_images, task_classes

# Standard per-channel statistics of the training set (RGB, pixel values in [0, 1]).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR100_FILES = ("train", "test", "meta")
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def _cifar100_class() -> type:
    """torchvision's dataset class, behind a function so tests can substitute a subclass whose md5
    sums match a tiny fake dataset (torchvision verifies the md5 of existing files on every load)."""
    return CIFAR100


CIFAR100_PICKLES = CifarPickles(
    "CIFAR-100", "cifar-100-python", CIFAR100_FILES, CIFAR100_URL, lambda: _cifar100_class(),
    ways_on="run on a stand-in instead: real CIFAR-10 images (notebooks: `-p dataset cifar10`) or "
            "the synthetic tasks (notebooks: `-p dataset synthetic`)")


def ensure_cifar100(root: Path, *, download: bool) -> Path:
    """``<root>/cifar-100-python`` with ``train``, ``test`` and ``meta``, downloaded first when missing
    and ``download``; else ``FileNotFoundError`` naming the files and the ways on."""
    return ensure_files(Path(root), CIFAR100_PICKLES, download=download)


def load_cifar100(task: int, root: Path, *, download: bool, max_train_per_class: int | None = None,
                  max_test_per_class: int | None = None) -> TaskData:
    """Task r = fine classes 2r, 2r+1 of the official train/test sets (§4), labels 0/1."""
    classes = task_classes("cifar100", task)
    tr_img, tr_lab, names = read_split(root, CIFAR100_PICKLES, train=True, download=download)
    te_img, te_lab, _ = read_split(root, CIFAR100_PICKLES, train=False, download=download)
    x_tr, y_tr = select_classes(tr_img, tr_lab, classes, max_train_per_class)
    x_te, y_te = select_classes(te_img, te_lab, classes, max_test_per_class)
    return TaskData(normalize_images(x_tr, CIFAR100_MEAN, CIFAR100_STD), y_tr,
                    normalize_images(x_te, CIFAR100_MEAN, CIFAR100_STD), y_te,
                    classes=[names[c] for c in classes])
