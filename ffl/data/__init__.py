"""Tasks and datasets (§4): one module per dataset behind :func:`load_task`.

The paper trains zoos of networks, each on one *task*: a small classification problem carved out
of a larger dataset. This module defines those tasks and loads them as tensors.

=================  ========  =====================================================================
dataset            tasks     task ``r``
=================  ========  =====================================================================
``synthetic``      50 (cfg)  binary Gaussian mixture in 3×32×32, class means seeded by (seed, r)
``cifar100``       50        CIFAR-100 fine classes ``2r, 2r+1`` (the paper's split)
``cifar10``        45        the ``r``-th pair of CIFAR-10 classes, round robin (not in the paper:
                             real CIFAR images where CIFAR-100 cannot be had)
``tiny_imagenet``  50        Tiny ImageNet classes ``4r … 4r+3`` of the sorted wnids, 32×32  
``namedata``       9         NameData languages ``2r, 2r+1`` (sorted file names), one-hot chars (58)
=================  ========  =====================================================================

Every loader returns a :class:`TaskData` with labels ``0..k-1`` *within* the task (label ``i`` is
the ``i``-th entry of :func:`task_classes`). Images are float32 ``(N, 3, 32, 32)`` normalized with
per-channel mean/std; names are padded one-hot sequences ``(N, max_len, 58)`` plus lengths.

Files are never fetched silently: with ``download=False`` (the default) a missing dataset raises
:class:`FileNotFoundError` naming the expected files and how to obtain them. Downloads go to a
temporary folder inside ``data_root`` and are moved into place only when complete, so an
interrupted download never leaves a half-written dataset behind.

Splits: CIFAR-100 and CIFAR-10 use their official train/test sets; Tiny ImageNet trains on ``train`` and
tests on the labelled ``val`` set (its ``test`` set has no labels); NameData is split 80/20 per
language by ``seed``; synthetic tasks draw train and test from the task's mixture.

On-disk layouts under ``data_root``: ``cifar-100-python/{train,test,meta}``;
``cifar-10-batches-py/{data_batch_1…5,test_batch,batches.meta}`` or the offline copy
``cifar10_substitute/cifar10_yoongikim_jpeg.npz``, read directly;
``tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/val_annotations.txt,
val/images/*.JPEG}`` or the offline copy ``tiny_imagenet/tiny_imagenet_200_jpeg.npz``, read directly
(:func:`materialize_tiny_imagenet` writes the official layout from it);
``names/<Language>.txt``.

``data_root=None`` means ``$FFL_DATA_ROOT`` if set, else ``./data``.

Modules: :mod:`ffl.data.tasks` (what a task is), :mod:`ffl.data.synthetic`,
:mod:`ffl.data.cifar100`, :mod:`ffl.data.cifar10` (both through :mod:`ffl.data.cifar_pickles`),
:mod:`ffl.data.tiny_imagenet` (JPEGs through :mod:`ffl.data.jpeg`), :mod:`ffl.data.namedata`.
"""
from __future__ import annotations

import inspect
import os
from typing import Any

from ffl.checks import as_int, type_error

from ffl.data.cifar10 import CIFAR10_MEAN, CIFAR10_NPZ, CIFAR10_STD, CIFAR10_URL, load_cifar10
from ffl.data.cifar100 import CIFAR100_FILES, CIFAR100_MEAN, CIFAR100_STD, CIFAR100_URL, load_cifar100
from ffl.data.namedata import (ALL_LETTERS, N_LETTERS, NAMEDATA_LANGUAGES, NAMEDATA_URL, load_namedata,
                               name_to_tensor, read_names, unicode_to_ascii)
from ffl.data.synthetic import synthetic_task
from ffl.data.tasks import (DATA_NAMES, DATASETS, TaskData, check_dataset, check_task, num_tasks,
                            resolve_root, task_classes)
from ffl.data.tiny_imagenet import (TINY_IMAGENET_DIR, TINY_IMAGENET_MD5, TINY_IMAGENET_MEAN, TINY_IMAGENET_NPZ,
                                    TINY_IMAGENET_STD, TINY_IMAGENET_URL, load_tiny_imagenet,
                                    materialize_tiny_imagenet)

__all__ = [
    "DATA_NAMES", "DATASETS", "TaskData", "check_data_kwargs", "data_kwargs_types",
    "load_task", "num_tasks", "task_classes", "synthetic_task",
    "materialize_tiny_imagenet", "ALL_LETTERS", "N_LETTERS", "NAMEDATA_LANGUAGES", "NAMEDATA_URL",
    "name_to_tensor", "read_names", "unicode_to_ascii", "CIFAR10_MEAN", "CIFAR10_NPZ", "CIFAR10_STD",
    "CIFAR10_URL", "CIFAR100_FILES", "CIFAR100_MEAN", "CIFAR100_STD",
    "CIFAR100_URL", "TINY_IMAGENET_DIR", "TINY_IMAGENET_MD5", "TINY_IMAGENET_MEAN", "TINY_IMAGENET_NPZ",
    "TINY_IMAGENET_STD",
    "TINY_IMAGENET_URL",
]


#: each dataset's loader: its keyword-only arguments (but ``download``, ``seed``) are its ``data_kwargs``
_LOADERS = {"synthetic": synthetic_task, "cifar100": load_cifar100, "cifar10": load_cifar10,
            "tiny_imagenet": load_tiny_imagenet, "namedata": load_namedata}


def data_kwargs_types(dataset: str) -> dict[str, str]:
    """The keyword arguments :func:`load_task` takes for ``dataset`` (name -> annotation text)."""
    check_dataset(dataset)
    params = inspect.signature(_LOADERS[dataset]).parameters.values()
    return {p.name: str(p.annotation) for p in params
            if p.kind is p.KEYWORD_ONLY and p.name not in ("download", "seed")}


def check_data_kwargs(dataset: str, kw: dict[str, Any]) -> None:
    """``TypeError`` for a keyword ``dataset``'s loader does not take; ``ValueError`` for one of the
    wrong type or a size (``max_*``, ``n_*``) below 1 (a negative limit would slice from the end)."""
    known = data_kwargs_types(dataset)
    unknown = sorted(set(kw) - set(known))
    if unknown:
        raise TypeError(f"unknown data_kwargs {unknown} for {dataset!r}; it takes {sorted(known)}")
    for name, value in kw.items():
        wrong = type_error(value, known[name])
        if wrong:
            raise ValueError(f"data_kwargs {name}: {wrong}")
        if name.startswith(("max_", "n_")) and value is not None:
            as_int(name, value, minimum=1)


def load_task(dataset: str, task: int, *, data_root: str | os.PathLike | None = None,
              download: bool = False, seed: int = 0, **kw: Any) -> TaskData:
    """Load task ``task`` of ``dataset`` as tensors (§4).

    Dataset-specific keyword arguments (:func:`check_data_kwargs`: unknown ones raise ``TypeError``,
    wrong types and sizes below 1 ``ValueError``):

    - synthetic: ``n_train=256``, ``n_test=128``, ``n_tasks=50``, ``noise=1.0``,
      ``separation=12.0``, ``grid=4`` (see :func:`synthetic_task`). ``seed`` selects the family.
    - cifar100 / cifar10 / tiny_imagenet: ``max_train_per_class=None``, ``max_test_per_class=None`` (keep
      the first images of each class in file order, to make small runs cheap). ``seed`` is
      unused: the official train/test split is used (Tiny ImageNet: its labelled ``val`` set is
      the test set). tiny_imagenet also takes ``disk_cache=True``.
    - namedata: ``test_fraction=0.2``, ``dedupe=True``, ``max_per_class=None``; ``seed`` fixes
      the per-language train/test split.
    """
    check_data_kwargs(dataset, kw)
    if dataset == "synthetic":
        return synthetic_task(task, seed=seed, **kw)
    task = check_task(dataset, task)  # before touching the file system
    root = resolve_root(data_root)
    if dataset == "cifar100":
        return load_cifar100(task, root, download=download, **kw)
    if dataset == "cifar10":
        return load_cifar10(task, root, download=download, **kw)
    if dataset == "tiny_imagenet":
        return load_tiny_imagenet(task, root, download=download, **kw)
    return load_namedata(task, root, download=download, seed=seed, **kw)

