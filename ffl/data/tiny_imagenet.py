"""Tiny ImageNet (§4): task ``r`` = classes ``4r … 4r+3`` of the **sorted** wnids (the class order of
the official loader, torchvision's ``ImageFolder``; ``wnids.txt`` order would give other tasks),
resized to 32×32 as the official code does (bilinear resize of the whole 64×64 image).

Two sources under ``data_root``, tried in this order:

* the official ``tiny-imagenet-200/`` layout (what ``download=True`` fetches and unpacks);
* the offline JPEG copy ``tiny_imagenet/tiny_imagenet_200_jpeg.npz`` (JPEG bytes + offsets, see
  its PROVENANCE.md; it holds 100 of the 500 training images per class and the full val set),
  read directly.

Decoded classes are cached in memory (and, for the folder layout, on disk).
:func:`materialize_tiny_imagenet` writes the official layout from the ``.npz`` copy."""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import utils as tv_utils  # module attribute: tests stub the download

from ffl.data.jpeg import decode_resize, file_stamp, npz_blobs, reading_npz
from ffl.data.tasks import TaskData, download_failure, normalize_images, task_classes
from ffl.files import atomic_path, clean_stale_temp

# Standard per-channel statistics of the training set (RGB, pixel values in [0, 1]).
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2770, 0.2691, 0.2821)
TINY_IMAGENET_DIR = "tiny-imagenet-200"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
_NO_BOX = "0\t0\t63\t63"  # whole 64×64 image, when the npz comes without val boxes
_REPAIR = "restore it (unzip the archive again, or rewrite the layout with materialize_tiny_imagenet)"
_CACHE_DIR = ".ffl_cache"  # decoded 32×32 arrays, inside tiny-imagenet-200/
#: the offline JPEG copy, relative to data_root
TINY_IMAGENET_NPZ = Path("tiny_imagenet") / "tiny_imagenet_200_jpeg.npz"

# (base folder, split, wnid, hash of the files' sizes and mtimes) -> uint8 (n, 3, 32, 32)
_CACHE: dict[tuple[str, str, str, str], torch.Tensor] = {}


def _tiny_missing_message(base: Path, missing: Sequence[Path]) -> str:
    root = base.parent
    hint = (f" Or place the offline JPEG copy at {root / TINY_IMAGENET_NPZ} (read as it is), or write "
            "the official layout from it with ffl.data.materialize_tiny_imagenet(npz_path, data_root).")
    return ("Tiny ImageNet not found: missing " + ", ".join(str(p) for p in missing)
            + f". Expected the official layout {base}/{{wnids.txt, train/<wnid>/images/*.JPEG, "
            "val/val_annotations.txt, val/images/*.JPEG}. Get it with "
            "load_task('tiny_imagenet', ..., download=True) (notebooks: `-p download true`), or "
            f"download {TINY_IMAGENET_URL} (md5 {TINY_IMAGENET_MD5}) and unzip it into {root}."
            + hint)


def _tiny_base(root: Path, download: bool) -> Path:
    """The official folder (downloaded when asked and absent), or the ``.npz`` copy when only it is
    there."""
    base = root / TINY_IMAGENET_DIR
    needed = [base / "wnids.txt", base / "val" / "val_annotations.txt"]
    if not all(p.is_file() for p in needed) and (root / TINY_IMAGENET_NPZ).is_file():
        return root / TINY_IMAGENET_NPZ
    if download and not all(p.is_file() for p in needed):
        missing = _tiny_missing_message(base, [p for p in needed if not p.is_file()])
        with download_failure(missing), atomic_path(base) as staged:  # the archive unpacks to tiny-imagenet-200/
            tv_utils.download_and_extract_archive(TINY_IMAGENET_URL, download_root=str(staged.parent),
                                                  md5=TINY_IMAGENET_MD5)
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(_tiny_missing_message(base, missing))
    return base


def tiny_imagenet_source(root: Path) -> Path:
    """Where tiny ImageNet is read from under ``root``: the official ``tiny-imagenet-200/`` folder
    or the ``.npz`` copy (``FileNotFoundError`` naming both when neither is there)."""
    return _tiny_base(root, download=False)


def _read_wnids(base: Path) -> list[str]:
    """The wnids in class-index order: sorted, as ImageFolder sorts the official train folders."""
    return sorted(w.strip() for w in (base / "wnids.txt").read_text().split("\n") if w.strip())


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


def _file_stamps(folder: Path, files: Sequence[str]) -> np.ndarray:
    """(size, mtime in ns) of each file: the decoded cache is valid only for exactly these."""
    stats = [(folder / f).stat() for f in files]
    return np.array([(st.st_size, st.st_mtime_ns) for st in stats], dtype=np.int64).reshape(-1, 2)


def _tiny_class(base: Path, split: str, wnid: str, files: Sequence[str], folder: Path,
                disk_cache: bool) -> torch.Tensor:
    """Decoded 32×32 images of one class and split: process cache, then the on-disk cache
    (valid only if it lists exactly ``files`` with the same sizes and modification times), then
    JPEG decoding. A cache that cannot be read is decoded again, with a warning naming it."""
    stamps = _file_stamps(folder, files)
    key = (str(base.resolve()), split, wnid, hashlib.sha256(stamps.tobytes()).hexdigest())
    if key in _CACHE:
        return _CACHE[key]
    cache = base / _CACHE_DIR / f"{split}_{wnid}_32.npz"
    images = None
    if disk_cache and cache.is_file():
        try:
            with np.load(cache) as z:
                if z["files"].tolist() == list(files) and "stamps" in z.files and np.array_equal(z["stamps"], stamps):
                    images = torch.from_numpy(z["images"].copy())
        except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle-free array…: a cache, so rebuild
            warnings.warn(f"decoded-image cache {cache} cannot be read ({type(e).__name__}: {e}); "
                          "decoding the JPEGs again and rewriting it", stacklevel=2)
            images = None
    if images is None:
        images = decode_resize([folder / f for f in files], repair=_REPAIR)
        if disk_cache:
            try:  # best effort (data_root may be read-only)
                clean_stale_temp(cache.parent)
                with atomic_path(cache) as staged:
                    np.savez(staged, files=np.array(list(files), dtype=str), images=images.numpy(), stamps=stamps)
            except OSError:
                pass
    _CACHE[key] = images
    return images


#: npz path, size and mtime -> (sorted wnids, {split: (jpeg bytes, offsets, labels as sorted-wnid indices)})
_NPZ: dict[str, tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]] = {}


def _read_npz(path: Path) -> tuple[list[str], dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    key = file_stamp(path)
    if key not in _NPZ:
        with reading_npz(path, "fetch it again (its PROVENANCE.md gives the sha256)"), np.load(path) as z:
            official = [str(w) for w in z["wnids"]]
            wnids = sorted(official)
            to_sorted = np.array([wnids.index(w) for w in official])
            _NPZ[key] = (wnids, {split: (z[f"{split}_jpeg"], z[f"{split}_offsets"],
                                         to_sorted[z[f"{split}_labels"].astype(np.int64)])
                                 for split in ("train", "val")})
    return _NPZ[key]


def _npz_class(path: Path, split: str, class_index: int, wnid: str) -> torch.Tensor:
    """Decoded 32×32 images of one class and split of the ``.npz`` copy, in stored order."""
    key = (str(path.resolve()), split, wnid, file_stamp(path))
    if key not in _CACHE:
        jpeg, offsets, labels = _read_npz(path)[1][split]
        _CACHE[key] = decode_resize(npz_blobs(jpeg, offsets, np.flatnonzero(labels == class_index)),
                                    repair=_REPAIR)
    return _CACHE[key]


def load_tiny_imagenet(task: int, root: Path, *, download: bool,
                       max_train_per_class: int | None = None,
                       max_test_per_class: int | None = None,
                       disk_cache: bool = True) -> TaskData:
    """Task r = classes 4r … 4r+3 of the sorted wnids, trained on ``train`` and tested on the
    labelled ``val`` set, resized to 32×32 (§4); from the official folder or the ``.npz`` copy."""
    base = _tiny_base(root, download)
    if base.suffix == ".npz":
        return _load_from_npz(task, base, max_train_per_class, max_test_per_class)
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
    return _task_data(xs, ys, [wnids[c] for c in classes])


def _task_data(xs: dict[str, list[torch.Tensor]], ys: dict[str, list[torch.Tensor]],
               names: list[str]) -> TaskData:
    norm = lambda x: normalize_images(torch.cat(x), TINY_IMAGENET_MEAN, TINY_IMAGENET_STD)  # noqa: E731
    return TaskData(norm(xs["train"]), torch.cat(ys["train"]), norm(xs["val"]),
                    torch.cat(ys["val"]), classes=names)


def _load_from_npz(task: int, path: Path, max_train_per_class: int | None,
                   max_test_per_class: int | None) -> TaskData:
    wnids, _ = _read_npz(path)
    classes = task_classes("tiny_imagenet", task)
    if classes[-1] >= len(wnids):
        raise ValueError(f"task {task} needs classes {classes} but {path} holds only {len(wnids)} wnids")
    xs = {"train": [], "val": []}
    ys = {"train": [], "val": []}
    for i, c in enumerate(classes):
        for split, limit in (("train", max_train_per_class), ("val", max_test_per_class)):
            img = _npz_class(path, split, c, wnids[c])
            if not len(img):
                raise FileNotFoundError(f"{path} holds no {split} images of class {wnids[c]}")
            img = img[:limit] if limit is not None else img
            xs[split].append(img)
            ys[split].append(torch.full((len(img),), i, dtype=torch.int64))
    return _task_data(xs, ys, [wnids[c] for c in classes])


def materialize_tiny_imagenet(npz_path: str | os.PathLike, out_root: str | os.PathLike,
                              classes: Sequence[int | str] | None = None, *,
                              overwrite: bool = False) -> Path:
    """Write the official ``tiny-imagenet-200/`` layout under ``out_root`` from the offline
    ``.npz`` copy (keys ``wnids, words, {train,val}_{jpeg,offsets,labels,files}``; see
    ``../shared/data/tiny_imagenet/PROVENANCE.md``), so ``load_task('tiny_imagenet', …,
    data_root=out_root)`` works offline (§4).

    ``classes``: indices into the npz's ``wnids`` (official order) or wnids to write (default all 200). ``wnids.txt`` always lists all
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
        with atomic_path(out) as dst:
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
    for key in [k for k in _CACHE if k[0] == str(out.resolve())]:
        del _CACHE[key]  # the files changed under this root
    return out

