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

Splits: CIFAR-100 uses its official train/test sets; Tiny ImageNet trains on ``train`` and
tests on the labelled ``val`` set (its ``test`` set has no labels); NameData is split 80/20 per
language by ``seed``; synthetic tasks draw train and test from the task's mixture.

On-disk layouts under ``data_root``: ``cifar-100-python/{train,test,meta}``;
``tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/val_annotations.txt,
val/images/*.JPEG}`` (see :func:`materialize_tiny_imagenet` for the offline ``.npz`` copy);
``names/<Language>.txt``.

``data_root=None`` means ``$FFL_DATA_ROOT`` if set, else ``./data``.
"""
from __future__ import annotations

import hashlib
import os
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
    near 100 %. Checked with MLP-4 (SGD, 30 epochs): two seeds on one task reach 100 % test
    accuracy and their logit margins on shared probe inputs correlate at 0.98-0.99, while
    networks of different tasks correlate at |r| < 0.4.

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


# --------------------------------------------------------------------------------------------
# Tiny ImageNet
# --------------------------------------------------------------------------------------------

TINY_IMAGENET_DIR = "tiny-imagenet-200"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
_NO_BOX = "0\t0\t63\t63"  # whole 64×64 image, when the npz comes without val boxes
_CACHE_DIR = ".ffl_cache"  # decoded 32×32 arrays, inside tiny-imagenet-200/

# (base folder, split, wnid) -> uint8 (n, 3, 32, 32)
_TINY_CACHE: dict[tuple[str, str, str], torch.Tensor] = {}


def _tiny_missing_message(base: Path, missing: Sequence[Path]) -> str:
    root = base.parent
    npz = root / "tiny_imagenet" / "tiny_imagenet_200_jpeg.npz"
    hint = (f" An offline .npz copy exists at {npz}: write the official layout from it with "
            f"ffl.data.materialize_tiny_imagenet({str(npz)!r}, {str(root)!r})."
            if npz.is_file() else
            " From an offline .npz copy (see /work/shared/data/tiny_imagenet), write it with "
            "ffl.data.materialize_tiny_imagenet(npz_path, data_root).")
    return ("Tiny ImageNet not found: missing " + ", ".join(str(p) for p in missing)
            + f". Expected the official layout {base}/{{wnids.txt, train/<wnid>/images/*.JPEG, "
            "val/val_annotations.txt, val/images/*.JPEG}. Get it with "
            "load_task('tiny_imagenet', ..., download=True) (notebooks: `-p download true`), or "
            f"download {TINY_IMAGENET_URL} (md5 {TINY_IMAGENET_MD5}) and unzip it into {root}."
            + hint)


def _tiny_base(root: Path, download: bool) -> Path:
    base = root / TINY_IMAGENET_DIR
    needed = [base / "wnids.txt", base / "val" / "val_annotations.txt"]
    if download and not all(p.is_file() for p in needed):
        from torchvision.datasets.utils import download_and_extract_archive

        def fetch(tmp: Path) -> Path:
            download_and_extract_archive(TINY_IMAGENET_URL, download_root=str(tmp),
                                         md5=TINY_IMAGENET_MD5)
            return tmp / TINY_IMAGENET_DIR
        _atomic_download(base, fetch)
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(_tiny_missing_message(base, missing))
    return base


def _read_wnids(base: Path) -> list[str]:
    return [w.strip() for w in (base / "wnids.txt").read_text().split("\n") if w.strip()]


def _read_val_annotations(base: Path) -> dict[str, list[str]]:
    """wnid -> val image file names, in file order (val_annotations.txt: file, wnid, box)."""
    out: dict[str, list[str]] = {}
    for line in (base / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            out.setdefault(parts[1], []).append(parts[0])
    return out


def _natural_key(name: str) -> tuple[str, int]:
    # n01443537_10.JPEG after n01443537_9.JPEG, val_10.JPEG after val_9.JPEG
    stem = name.rsplit(".", 1)[0]
    head, _, num = stem.rpartition("_")
    return (head, int(num)) if num.isdigit() else (stem, -1)


def _decode_resize(paths: Sequence[Path], size: int = 32) -> torch.Tensor:
    """Decode JPEGs to RGB (Tiny ImageNet has grayscale ones) and resize to ``size``×``size``
    with antialiased bilinear interpolation (bit-identical to PIL's ``resize(BILINEAR)``)."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    arrays = []
    for p in paths:
        with Image.open(p) as im:
            arrays.append(np.array(im.convert("RGB")))  # copy: a writable, owned array
    if not arrays:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    if len({a.shape for a in arrays}) == 1:  # the official data: all 64×64, one batched call
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return TF.resize(batch, [size, size], antialias=True).contiguous()
    return torch.stack([TF.resize(torch.from_numpy(a).permute(2, 0, 1), [size, size],
                                  antialias=True) for a in arrays])


def _tiny_class(base: Path, split: str, wnid: str, files: Sequence[str], folder: Path,
                disk_cache: bool) -> torch.Tensor:
    """Decoded 32×32 images of one class and split: process cache, then the on-disk cache
    (valid only if it lists exactly ``files``), then JPEG decoding."""
    key = (str(base.resolve()), split, wnid)
    if key in _TINY_CACHE:
        return _TINY_CACHE[key]
    cache = base / _CACHE_DIR / f"{split}_{wnid}_32.npz"
    images = None
    if disk_cache and cache.is_file():
        try:
            with np.load(cache) as z:
                if z["files"].tolist() == list(files):
                    images = torch.from_numpy(z["images"].copy())
        except (OSError, ValueError, KeyError):
            images = None  # unreadable cache: decode again
    if images is None:
        images = _decode_resize([folder / f for f in files])
        if disk_cache:
            try:  # best effort (data_root may be read-only); write-then-rename, never half a file
                cache.parent.mkdir(exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".npz", delete=False) as f:
                    np.savez(f, files=np.array(list(files), dtype=str), images=images.numpy())
                os.replace(f.name, cache)
            except OSError:
                pass
    _TINY_CACHE[key] = images
    return images


def _load_tiny_imagenet(task: int, root: Path, *, download: bool,
                        max_train_per_class: int | None = None,
                        max_test_per_class: int | None = None,
                        disk_cache: bool = True) -> TaskData:
    base = _tiny_base(root, download)
    wnids = _read_wnids(base)
    classes = task_classes("tiny_imagenet", task)
    if classes[-1] >= len(wnids):
        raise ValueError(f"task {task} needs classes {classes} but {base / 'wnids.txt'} lists "
                         f"only {len(wnids)} wnids")
    val = _read_val_annotations(base)
    xs = {"train": [], "val": []}
    ys = {"train": [], "val": []}
    for i, c in enumerate(classes):
        wnid = wnids[c]
        folder = base / "train" / wnid / "images"
        train_files = sorted((p.name for p in folder.glob("*.JPEG")), key=_natural_key) \
            if folder.is_dir() else []
        val_files = sorted(val.get(wnid, []), key=_natural_key)
        missing = [p for p, fs in ((folder, train_files), (base / "val" / "images", val_files))
                   if not fs]
        if missing:
            raise FileNotFoundError(_tiny_missing_message(
                base, [Path(f"{p} (no images of class {wnid})") for p in missing]))
        for split, files, fold, limit in (("train", train_files, folder, max_train_per_class),
                                          ("val", val_files, base / "val" / "images",
                                           max_test_per_class)):
            img = _tiny_class(base, split, wnid, files, fold, disk_cache)
            img = img[:limit] if limit is not None else img
            xs[split].append(img)
            ys[split].append(torch.full((len(img),), i, dtype=torch.int64))
    norm = lambda x: _normalize(torch.cat(x), TINY_IMAGENET_MEAN, TINY_IMAGENET_STD)  # noqa: E731
    return TaskData(norm(xs["train"]), torch.cat(ys["train"]), norm(xs["val"]),
                    torch.cat(ys["val"]), classes=[wnids[c] for c in classes])


def materialize_tiny_imagenet(npz_path: str | os.PathLike, out_root: str | os.PathLike,
                              classes: Sequence[int | str] | None = None, *,
                              overwrite: bool = False) -> Path:
    """Write the official ``tiny-imagenet-200/`` layout under ``out_root`` from the offline
    ``.npz`` copy (keys ``wnids, words, {train,val}_{jpeg,offsets,labels,files}``; see
    ``/work/shared/data/tiny_imagenet/PROVENANCE.md``), so ``load_task('tiny_imagenet', …,
    data_root=out_root)`` works offline (§4).

    ``classes``: indices or wnids to write (default all 200). ``wnids.txt`` always lists all
    wnids of the npz in official order, so task numbers stay those of the full dataset; only the
    chosen classes get ``train/<wnid>/images/*.JPEG`` and ``val`` entries. JPEG bytes are written
    unchanged. Bounding boxes in ``val/val_annotations.txt`` come from a ``val_annotations.txt``
    next to the npz when present (else ``0 0 63 63``); ``words.txt`` holds only the npz's words.
    The folder is assembled in a temporary directory and renamed into place when complete; an
    existing ``tiny-imagenet-200`` raises ``FileExistsError`` unless ``overwrite=True``.
    Note the offline copy holds 100 of the 500 train images per class.
    """
    npz_path, out_root = Path(npz_path), Path(out_root)
    out = out_root / TINY_IMAGENET_DIR
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    with np.load(npz_path) as z:
        wnids = [str(w) for w in z["wnids"]]
        words = [str(w) for w in z["words"]] if "words" in z.files else wnids
        if classes is None:
            chosen = list(range(len(wnids)))
        else:
            chosen = [wnids.index(c) if isinstance(c, str) else int(c) for c in classes]
        boxes: dict[str, str] = {}
        ann = npz_path.parent / "val_annotations.txt"
        if ann.is_file():
            for line in ann.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) == 6:
                    boxes[parts[0]] = "\t".join(parts[2:])
        out_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".ffl-materialize-", dir=out_root) as tmp:
            dst = Path(tmp) / TINY_IMAGENET_DIR
            (dst / "val" / "images").mkdir(parents=True)
            (dst / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
            (dst / "words.txt").write_text("".join(f"{w}\t{t}\n" for w, t in zip(wnids, words)))
            keep = set(chosen)
            for split in ("train", "val"):
                jpeg, offsets = z[f"{split}_jpeg"], z[f"{split}_offsets"]
                labels, files = z[f"{split}_labels"], z[f"{split}_files"]
                lines = []
                for k in np.flatnonzero(np.isin(labels, list(keep))):
                    wnid, name = wnids[int(labels[k])], str(files[k])
                    if split == "train":
                        folder = dst / "train" / wnid / "images"
                        folder.mkdir(parents=True, exist_ok=True)
                    else:
                        folder = dst / "val" / "images"
                        lines.append(f"{name}\t{wnid}\t{boxes.get(name, _NO_BOX)}\n")
                    (folder / name).write_bytes(jpeg[offsets[k]:offsets[k + 1]].tobytes())
                if split == "val":
                    (dst / "val" / "val_annotations.txt").write_text("".join(lines))
            if out.exists():
                os.replace(out, Path(tmp) / ".replaced")
            os.replace(dst, out)
    for key in [k for k in _TINY_CACHE if k[0] == str(out.resolve())]:
        del _TINY_CACHE[key]  # the files changed under this root
    return out


# --------------------------------------------------------------------------------------------
# NameData (char-RNN surnames)
# --------------------------------------------------------------------------------------------

ALL_LETTERS = string.ascii_letters + " .,;'"
N_LETTERS = len(ALL_LETTERS)  # 57
NAMEDATA_URL = "https://download.pytorch.org/tutorial/data.zip"
# The 18 files of the tutorial's data/names/, sorted: label i = NAMEDATA_LANGUAGES[i].
NAMEDATA_LANGUAGES = ("Arabic", "Chinese", "Czech", "Dutch", "English", "French", "German",
                      "Greek", "Irish", "Italian", "Japanese", "Korean", "Polish", "Portuguese",
                      "Russian", "Scottish", "Spanish", "Vietnamese")


def unicode_to_ascii(s: str) -> str:
    """Fold a name to the 57 letters exactly as the PyTorch char-RNN tutorial does: Unicode NFD,
    drop combining marks (category Mn), keep only :data:`ALL_LETTERS`."""
    return "".join(c for c in unicodedata.normalize("NFD", s)
                   if unicodedata.category(c) != "Mn" and c in ALL_LETTERS)


def name_to_tensor(name: str) -> torch.Tensor:
    """One-hot encoding ``(len(name), N_LETTERS)`` float32 of an ASCII-folded name (the
    tutorial's ``lineToTensor`` without its batch dimension)."""
    idx = torch.tensor([ALL_LETTERS.index(c) for c in name], dtype=torch.int64)
    return F.one_hot(idx, N_LETTERS).float()


def read_names(path: str | os.PathLike) -> list[str]:
    """Lines of a ``names/<Language>.txt`` file, ASCII-folded, as the tutorial reads them
    (``read().strip().split('\\n')``); names empty after folding are dropped."""
    lines = Path(path).read_text(encoding="utf-8").strip().split("\n")
    return [n for n in map(unicode_to_ascii, lines) if n]


def _names_to_padded(names: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(n) for n in names], dtype=torch.int64)
    idx = torch.full((len(names), max_len), -1, dtype=torch.int64)
    for i, n in enumerate(names):
        idx[i, :len(n)] = torch.tensor([ALL_LETTERS.index(c) for c in n], dtype=torch.int64)
    x = F.one_hot(idx.clamp(min=0), N_LETTERS).float() * (idx >= 0).unsqueeze(-1)  # zero padding
    return x, lengths


def _load_namedata(task: int, root: Path, *, download: bool, seed: int,
                   test_fraction: float = 0.2, dedupe: bool = True,
                   max_per_class: int | None = None) -> TaskData:
    """Task r = languages 2r, 2r+1 of :data:`NAMEDATA_LANGUAGES` (§4).

    Per language: names are read as the tutorial does; with ``dedupe=True`` (default) repeated
    lines are dropped first (e.g. Arabic.txt has 2,000 lines but 108 distinct names; keeping the
    repeats would put the same name in train and test). The names are shuffled by a generator
    seeded by ``(seed, language)``, optionally cut to ``max_per_class``, and the last
    ``round(test_fraction·n)`` (at least 1) go to test. Train and test are then shuffled together
    with a seeded permutation so classes are mixed.
    """
    base = root / "names"
    languages = [NAMEDATA_LANGUAGES[c] for c in task_classes("namedata", task)]
    paths = [base / f"{lang}.txt" for lang in languages]
    missing = [p for p in paths if not p.is_file()]
    if missing and download:
        from torchvision.datasets.utils import download_and_extract_archive

        def fetch(tmp: Path) -> Path:
            # No official checksum is published for data.zip, so none is checked.
            download_and_extract_archive(NAMEDATA_URL, download_root=str(tmp))
            return tmp / "data" / "names"
        _atomic_download(base, fetch)
        missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            "NameData not found: missing " + ", ".join(str(p) for p in missing)
            + f". Expected {base}/<Language>.txt for the 18 languages {NAMEDATA_LANGUAGES}. "
            "Get them with load_task('namedata', ..., download=True) (notebooks: "
            f"`-p download true`), or download {NAMEDATA_URL} and copy its data/names/ folder "
            f"to {base}.")
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for label, (lang, path) in enumerate(zip(languages, paths)):
        names = read_names(path)
        if dedupe:
            names = list(dict.fromkeys(names))
        g = torch.Generator().manual_seed(_seed_of("ffl-namedata", seed, lang))
        names = [names[i] for i in torch.randperm(len(names), generator=g).tolist()]
        if max_per_class is not None:
            names = names[:max_per_class]
        if len(names) < 2:
            raise ValueError(f"{path} has fewer than 2 usable names")
        n_test = min(len(names) - 1, max(1, round(test_fraction * len(names))))
        splits["train"] += [(n, label) for n in names[:-n_test]]
        splits["test"] += [(n, label) for n in names[-n_test:]]
    max_len = max(len(n) for rows in splits.values() for n, _ in rows)
    out = {}
    for split, rows in splits.items():
        g = torch.Generator().manual_seed(_seed_of("ffl-namedata", seed, task, split))
        rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
        x, lengths = _names_to_padded([n for n, _ in rows], max_len)
        out[split] = (x, torch.tensor([y for _, y in rows], dtype=torch.int64), lengths)
    (x_tr, y_tr, l_tr), (x_te, y_te, l_te) = out["train"], out["test"]
    return TaskData(x_tr, y_tr, x_te, y_te, classes=languages, lengths_train=l_tr,
                    lengths_test=l_te)
