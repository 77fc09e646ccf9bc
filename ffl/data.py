"""Tasks and datasets (§4).

The paper trains zoos of networks, each on one *task*: a small classification problem carved out
of a larger dataset. This module defines those tasks and loads them as tensors.

=================  ========  =====================================================================
dataset            tasks     task ``r``
=================  ========  =====================================================================
``synthetic``      50 (cfg)  binary Gaussian mixture in 3×32×32, class means seeded by (seed, r)
``cifar100``       50        CIFAR-100 fine classes ``2r, 2r+1`` (the paper's split)
``tiny_imagenet``  50        Tiny ImageNet classes ``4r … 4r+3`` in ``wnids.txt`` order, 32×32
``namedata``       9         NameData languages ``2r, 2r+1`` (sorted file names), one-hot chars
=================  ========  =====================================================================

Every loader returns a :class:`TaskData` with labels ``0..k-1`` *within* the task (label ``i`` is
the ``i``-th entry of :func:`task_classes`). Images are float32 ``(N, 3, 32, 32)`` normalized with
per-channel mean/std; names are padded one-hot sequences ``(N, max_len, 57)`` plus lengths.

Files are never fetched silently: with ``download=False`` (the default) a missing dataset raises
:class:`FileNotFoundError` naming the expected files and how to obtain them. Downloads go to a
temporary folder inside ``data_root`` and are moved into place only when complete, so an
interrupted download never leaves a half-written dataset behind.

``data_root=None`` means ``$FFL_DATA_ROOT`` if set, else ``./data``.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import string
import tempfile
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("synthetic", "cifar100", "tiny_imagenet", "namedata")

SYNTHETIC_NUM_TASKS = 50
CIFAR100_NUM_TASKS = 50
TINY_IMAGENET_NUM_TASKS = 50
TINY_IMAGENET_CLASSES_PER_TASK = 4
NAMEDATA_NUM_TASKS = 9

# Standard per-channel statistics of the training sets (RGB, pixel values in [0, 1]).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2770, 0.2691, 0.2821)

CIFAR100_FILES = ("train", "test", "meta")
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


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


# --------------------------------------------------------------------------------------------
# Task bookkeeping
# --------------------------------------------------------------------------------------------

def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def num_tasks(dataset: str, *, n_tasks: int | None = None) -> int:
    """Number of tasks of ``dataset`` (§4): cifar100 50, tiny_imagenet 50, namedata 9.

    ``synthetic`` has ``n_tasks`` tasks (default :data:`SYNTHETIC_NUM_TASKS` = 50); ``n_tasks``
    is ignored for the real datasets, whose split is fixed.
    """
    _check_dataset(dataset)
    if dataset == "synthetic":
        n = SYNTHETIC_NUM_TASKS if n_tasks is None else int(n_tasks)
        if n < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n}")
        return n
    return {"cifar100": CIFAR100_NUM_TASKS, "tiny_imagenet": TINY_IMAGENET_NUM_TASKS,
            "namedata": NAMEDATA_NUM_TASKS}[dataset]


def _check_task(dataset: str, task: int, n_tasks: int | None = None) -> int:
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
    tiny_imagenet: ``[4r, …, 4r+3]`` (rows of ``wnids.txt``); namedata: ``[2r, 2r+1]`` (indices
    into :data:`NAMEDATA_LANGUAGES`); synthetic: ``[2r, 2r+1]`` (labels of the generator's classes).
    """
    task = _check_task(dataset, task, n_tasks)
    k = TINY_IMAGENET_CLASSES_PER_TASK if dataset == "tiny_imagenet" else 2
    return list(range(k * task, k * task + k))


def _resolve_root(data_root: str | os.PathLike | None) -> Path:
    if data_root is None:
        data_root = os.environ.get("FFL_DATA_ROOT", "data")
    return Path(data_root).expanduser()


def load_task(dataset: str, task: int, *, data_root: str | os.PathLike | None = None,
              download: bool = False, seed: int = 0, **kw: Any) -> TaskData:
    """Load task ``task`` of ``dataset`` as tensors (§4).

    Dataset-specific keyword arguments (unknown ones raise ``TypeError``):

    - synthetic: ``n_train=256``, ``n_test=128``, ``n_tasks=50``, ``noise=1.0``,
      ``separation=12.0``, ``grid=4`` (see :func:`synthetic_task`). ``seed`` selects the family.
    - cifar100 / tiny_imagenet: ``max_train_per_class=None``, ``max_test_per_class=None`` (keep
      the first images of each class in file order, to make small runs cheap). ``seed`` is
      unused: the official train/test split is used (Tiny ImageNet: its labelled ``val`` set is
      the test set). tiny_imagenet also takes ``disk_cache=True``.
    - namedata: ``test_fraction=0.2``, ``dedupe=True``, ``max_per_class=None``; ``seed`` fixes
      the per-language train/test split.
    """
    _check_dataset(dataset)
    if dataset == "synthetic":
        return synthetic_task(task, seed=seed, **kw)
    task = _check_task(dataset, task)  # before touching the file system
    root = _resolve_root(data_root)
    if dataset == "cifar100":
        return _load_cifar100(task, root, download=download, **kw)
    if dataset == "tiny_imagenet":
        return _load_tiny_imagenet(task, root, download=download, **kw)
    return _load_namedata(task, root, download=download, seed=seed, **kw)


# --------------------------------------------------------------------------------------------
# Synthetic tasks
# --------------------------------------------------------------------------------------------

def _seed_of(*parts: object) -> int:
    """A 63-bit seed from a tuple: stable across processes and platforms (unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _low_frequency_image(gen: torch.Generator, grid: int) -> torch.Tensor:
    """A smooth random image: a ``grid×grid`` Gaussian field bilinearly upsampled to 32×32,
    scaled to unit RMS per pixel."""
    coarse = torch.randn(1, 3, grid, grid, generator=gen, dtype=torch.float64)
    img = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)[0]
    return img / img.pow(2).mean().sqrt()


def synthetic_task(task: int, *, seed: int = 0, n_train: int = 256, n_test: int = 128,
                   n_tasks: int | None = None, noise: float = 1.0, separation: float = 12.0,
                   grid: int = 4) -> TaskData:
    """A synthetic binary task in the 3×32×32 input space of the image tasks (§4 stand-in).

    Task ``t`` is a two-class Gaussian mixture: ``x = μ_y + noise·ε`` with ε ~ N(0, I) (shared
    isotropic noise) and class means ``μ_{0,1} = c_t ∓ d_t/2``. The centre ``c_t`` (RMS 0.5 per
    pixel) and the direction ``d_t`` (‖d_t‖ = ``separation``·``noise``) are *low-frequency* random
    images (a ``grid×grid`` Gaussian field upsampled to 32×32) from a generator seeded by
    ``(seed, t)``. Why this design: the Bayes-optimal rule is the fixed direction ``d_t``, so
    networks trained on the same task from different initializations converge to similar
    functions, while two tasks' directions are nearly independent random vectors in the
    3·grid² = 48-dim smooth subspace, so tasks are distinguishable. With the defaults the mean
    difference is estimated well from 256 samples (cosine ≈ 0.87 to d_t) and test accuracy is
    near 100 %.

    Samples are balanced (``n//2`` per class, in a seeded random order) and drawn from a second
    generator seeded by ``(seed, t, split)``; everything uses explicit ``torch.Generator`` seeds,
    so the result is bit-identical across processes. Takes milliseconds.
    """
    task = _check_task("synthetic", task, n_tasks)
    if n_train < 2 or n_test < 2:
        raise ValueError("n_train and n_test must be >= 2")
    gen = torch.Generator().manual_seed(_seed_of("ffl-synthetic", seed, task, "means"))
    centre = 0.5 * _low_frequency_image(gen, grid)
    direction = _low_frequency_image(gen, grid)
    direction = direction * (separation * noise / direction.norm())
    means = torch.stack([centre - direction / 2, centre + direction / 2])  # (2, 3, 32, 32)

    def sample(n: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(_seed_of("ffl-synthetic", seed, task, split))
        y = torch.arange(n, dtype=torch.int64) % 2
        y = y[torch.randperm(n, generator=g)]
        eps = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
        return (means[y] + noise * eps).float(), y

    x_train, y_train = sample(n_train, "train")
    x_test, y_test = sample(n_test, "test")
    c0, c1 = task_classes("synthetic", task, n_tasks=n_tasks)
    return TaskData(x_train, y_train, x_test, y_test, classes=[f"synthetic-{c0}", f"synthetic-{c1}"])


# --------------------------------------------------------------------------------------------
# Helpers shared by the image datasets
# --------------------------------------------------------------------------------------------

def _normalize(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = x_uint8.float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


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


def _atomic_download(final_dir: Path, fetch: Any) -> None:
    """Run ``fetch(tmp_dir) -> Path`` (returns the completed folder inside ``tmp_dir``) and move
    that folder to ``final_dir``; on any failure nothing is left at ``final_dir``."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ffl-download-", dir=final_dir.parent) as tmp:
        done = Path(fetch(Path(tmp)))
        if final_dir.exists():  # an incomplete copy: swap it out, it is deleted with ``tmp``
            os.replace(final_dir, Path(tmp) / ".replaced")
        os.replace(done, final_dir)


# --------------------------------------------------------------------------------------------
# CIFAR-100
# --------------------------------------------------------------------------------------------

def _cifar100_class() -> type:
    # Indirection so tests can substitute a subclass whose md5 sums match a tiny fake dataset
    # (torchvision verifies the md5 of existing files on every load).
    from torchvision.datasets import CIFAR100
    return CIFAR100


_CIFAR100_CACHE: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, list[str]]] = {}


def _cifar100_missing(root: Path) -> list[Path]:
    base = root / "cifar-100-python"
    return [base / f for f in CIFAR100_FILES if not (base / f).is_file()]


def _cifar100_split(root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Whole CIFAR-100 split as uint8 (N, 3, 32, 32), fine labels, class names; decoded once per
    process (the pickles take ~1 s to read) and cached."""
    split = "train" if train else "test"
    key = (str(root.resolve()), split)
    if key in _CIFAR100_CACHE:
        return _CIFAR100_CACHE[key]
    cls = _cifar100_class()
    missing = _cifar100_missing(root)
    if missing and download:
        def fetch(tmp: Path) -> Path:
            cls(root=str(tmp), train=True, download=True)  # downloads, checks md5, extracts
            return tmp / "cifar-100-python"
        _atomic_download(root / "cifar-100-python", fetch)
        missing = _cifar100_missing(root)
    if missing:
        raise FileNotFoundError(
            "CIFAR-100 not found: missing " + ", ".join(str(p) for p in missing)
            + f". Expected {root}/cifar-100-python/{{train,test,meta}}. Get them with "
            "load_task('cifar100', ..., download=True) (notebooks: `-p download true`), or "
            f"download {CIFAR100_URL} and extract it into {root}.")
    try:
        ds = cls(root=str(root), train=train, download=False)
    except RuntimeError as e:  # torchvision: md5 mismatch of train/test/meta
        raise RuntimeError(f"CIFAR-100 files under {root}/cifar-100-python failed torchvision's "
                           f"md5 check ({e}); delete them and use download=True") from e
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    _CIFAR100_CACHE[key] = (images, labels, list(ds.classes))
    return _CIFAR100_CACHE[key]


def _load_cifar100(task: int, root: Path, *, download: bool, max_train_per_class: int | None = None,
                   max_test_per_class: int | None = None) -> TaskData:
    classes = task_classes("cifar100", task)
    tr_img, tr_lab, names = _cifar100_split(root, True, download)
    te_img, te_lab, _ = _cifar100_split(root, False, download)
    x_tr, y_tr = _select(tr_img, tr_lab, classes, max_train_per_class)
    x_te, y_te = _select(te_img, te_lab, classes, max_test_per_class)
    return TaskData(_normalize(x_tr, CIFAR100_MEAN, CIFAR100_STD), y_tr,
                    _normalize(x_te, CIFAR100_MEAN, CIFAR100_STD), y_te,
                    classes=[names[c] for c in classes])


def _load_tiny_imagenet(task: int, root: Path, *, download: bool, **kw: Any) -> TaskData:
    raise NotImplementedError("tiny_imagenet loader: coming next")


def _load_namedata(task: int, root: Path, *, download: bool, seed: int, **kw: Any) -> TaskData:
    raise NotImplementedError("namedata loader: coming next")
