"""CIFAR-100 (§4): task ``r`` = fine classes ``2r, 2r+1`` of the official train and test sets, read
with torchvision from ``<data_root>/cifar-100-python/{train,test,meta}``."""
from __future__ import annotations

from pathlib import Path

from torchvision.datasets import CIFAR100

from ffl.data.cifar_pickles import CifarPickles, ensure_files, load_task_from_pickles
from ffl.data.tasks import TaskData, task_classes

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
            "the synthetic tasks (notebooks: `-p dataset synthetic`)",
    mean=CIFAR100_MEAN, std=CIFAR100_STD)


def ensure_cifar100(root: Path, *, download: bool) -> Path:
    """``<root>/cifar-100-python`` with ``train``, ``test`` and ``meta``, downloaded first when missing
    and ``download``; else ``FileNotFoundError`` naming the files and the ways on."""
    return ensure_files(Path(root), CIFAR100_PICKLES, download=download)


def load_cifar100(task: int, root: Path, *, download: bool, max_train_per_class: int | None = None,
                  max_test_per_class: int | None = None) -> TaskData:
    """Task r = fine classes 2r, 2r+1 of the official train/test sets (§4), labels 0/1."""
    return load_task_from_pickles(root, CIFAR100_PICKLES, task_classes("cifar100", task), download=download,
                                  max_train_per_class=max_train_per_class, max_test_per_class=max_test_per_class)
