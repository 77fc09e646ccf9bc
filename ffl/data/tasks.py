"""What a task is (§4): its tensors (:class:`TaskData`), how many tasks each dataset has and which
global classes task ``r`` holds; the checks every loader runs before touching the file system."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ffl.checks import as_folder, env_folder

DATASETS = ("synthetic", "cifar100", "cifar10", "tiny_imagenet", "namedata")

SYNTHETIC_NUM_TASKS = 50
CIFAR100_NUM_TASKS = 50
CIFAR10_CLASSES = 10
CIFAR10_NUM_TASKS = CIFAR10_CLASSES * (CIFAR10_CLASSES - 1) // 2  # every pair of classes
TINY_IMAGENET_NUM_TASKS = 50
TINY_IMAGENET_CLASSES_PER_TASK = 4
NAMEDATA_NUM_TASKS = 9


@dataclass
class TaskData:
    """One task's train and test split (§4).

    ``x_*``: float32 images ``(N, 3, 32, 32)`` (normalized), or for ``namedata`` float32 padded
    one-hot sequences ``(N, max_len, N_LETTERS)`` with the true lengths in ``lengths_*`` (int64),
    ready for ``torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
    enforce_sorted=False)``. ``y_*``: int64 labels ``0..k-1`` within the task; ``classes[i]`` names
    label ``i``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    lengths_train: torch.Tensor | None = None
    lengths_test: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sha256(self) -> str:
        """SHA-256 of the task's tensors (dtype, shape, bytes) and class names: what a zoo records
        of the data each network was trained on, so a zoo is never read as trained on other data
        (another copy of the dataset, other images per class) than it was."""
        h = hashlib.sha256(json.dumps(self.classes).encode())
        for name in ("x_train", "y_train", "x_test", "y_test", "lengths_train", "lengths_test"):
            t = getattr(self, name)
            if t is None:
                h.update(f"{name}:none;".encode())
                continue
            t = t.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


#: what each dataset is called in a chapter title (:func:`ffl.report.data_label`)
DATA_NAMES = {"cifar100": "CIFAR-100", "cifar10": "CIFAR-10", "tiny_imagenet": "Tiny ImageNet",
              "namedata": "NameData"}


def check_dataset(dataset: str) -> None:
    """``ValueError`` listing :data:`DATASETS` for an unknown name."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def num_tasks(dataset: str, *, n_tasks: int | None = None) -> int:
    """Number of tasks of ``dataset`` (§4): cifar100 50, cifar10 45, tiny_imagenet 50, namedata 9.

    ``synthetic`` has ``n_tasks`` tasks (default :data:`SYNTHETIC_NUM_TASKS` = 50); ``n_tasks``
    is ignored for the real datasets, whose split is fixed.
    """
    check_dataset(dataset)
    if dataset == "synthetic":
        n = SYNTHETIC_NUM_TASKS if n_tasks is None else int(n_tasks)
        if n < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n}")
        return n
    return {"cifar100": CIFAR100_NUM_TASKS, "cifar10": CIFAR10_NUM_TASKS,
            "tiny_imagenet": TINY_IMAGENET_NUM_TASKS, "namedata": NAMEDATA_NUM_TASKS}[dataset]


def check_task(dataset: str, task: int, n_tasks: int | None = None) -> int:
    """``task`` as an int, or ``ValueError`` when it is not one or out of range."""
    n = num_tasks(dataset, n_tasks=n_tasks)
    if isinstance(task, bool) or not isinstance(task, (int, np.integer)):
        if isinstance(task, torch.Tensor) and task.numel() == 1:
            task = int(task.item())
        else:
            raise ValueError(f"task must be an int, got {task!r}")
    task = int(task)
    if not 0 <= task < n:
        raise ValueError(f"task {task} out of range for {dataset!r}: 0 <= task < {n}")
    return task


def task_classes(dataset: str, task: int, *, n_tasks: int | None = None) -> list[int]:
    """Global class indices of ``task`` (§4); label ``i`` within the task is entry ``i``.

    cifar100: ``[2r, 2r+1]`` (fine labels; the paper's split into 50 binary tasks);
    cifar10 (not in the paper): the ``r``-th pair of :func:`cifar10_pairs`;
    tiny_imagenet: ``[4r, …, 4r+3]`` (indices into the sorted wnids); namedata: ``[2r, 2r+1]`` (indices
    into :data:`NAMEDATA_LANGUAGES`); synthetic: ``[2r, 2r+1]`` (labels of the generator's classes).
    """
    task = check_task(dataset, task, n_tasks)
    if dataset == "cifar10":
        return list(cifar10_pairs()[task])
    k = TINY_IMAGENET_CLASSES_PER_TASK if dataset == "tiny_imagenet" else 2
    return list(range(k * task, k * task + k))


def cifar10_pairs() -> list[tuple[int, int]]:
    """All 45 pairs of CIFAR-10's classes as two-class tasks, in round-robin order (the circle
    method): tasks ``5k … 5k+4`` are disjoint and use every class once, so the first 5 tasks split
    the classes as the paper splits CIFAR-100's, and any first ``5k`` tasks use each class ``k``
    times. Within a pair the smaller class index is label 0."""
    n = CIFAR10_CLASSES
    rounds = []
    for r in range(n - 1):  # class n-1 stays put; the others turn one place each round
        pairs = [(r, n - 1)] + [((r + i) % (n - 1), (r - i) % (n - 1)) for i in range(1, n // 2)]
        rounds += sorted(tuple(sorted(p)) for p in pairs)
    return rounds


def resolve_root(data_root: str | os.PathLike | None) -> Path:
    """``data_root``, else ``$FFL_DATA_ROOT`` (set but empty: unset), else ``./data``; an existing
    file → ``ValueError`` saying so."""
    return env_folder("FFL_DATA_ROOT", "data") if data_root is None else as_folder("data_root", data_root)


@contextlib.contextmanager
def download_failure(missing: str) -> Iterator[None]:
    """A download inside this block that fails (no network, refused, full disk) raises
    ``FileNotFoundError`` with ``missing`` (what is missing and the ways on) and the reason."""
    try:
        yield
    except OSError as e:  # URLError, ConnectionError, ENOSPC …
        raise FileNotFoundError(f"{missing} (The download failed: {e}.)") from e


def normalize_images(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (N, 3, H, W) → float32 in [0, 1], then per-channel ``(x - mean) / std``."""
    x = x_uint8.float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s
