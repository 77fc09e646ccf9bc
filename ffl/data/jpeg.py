"""Images stored as JPEG files or bytes (the tiny ImageNet folders, and the offline ``.npz`` copies
of tiny ImageNet and CIFAR-10: concatenated JPEG bytes with offsets), decoded to uint8 tensors."""
from __future__ import annotations

import contextlib
import io
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF


def decode_resize(sources: Sequence[Path | io.BytesIO], size: int = 32, *, repair: str) -> torch.Tensor:
    """Decode JPEGs (files or in-memory bytes) to RGB (tiny ImageNet has grayscale ones) and resize
    the whole image to ``size``×``size`` with antialiased bilinear interpolation (bit-identical to
    PIL's ``resize(BILINEAR)``, which the official ``transforms.Resize((32, 32))`` calls; images
    already of that size are returned as decoded). A damaged image raises ``OSError`` naming it and
    ``repair``, what to do."""
    arrays = []
    for p in sources:
        try:
            with Image.open(p) as im:
                arrays.append(np.array(im.convert("RGB")))  # copy: a writable, owned array
        except (OSError, ValueError, SyntaxError) as e:  # PIL: truncated or not an image, no file name
            raise OSError(f"cannot decode the image {p} ({e}): the file is damaged; {repair}") from e
    if not arrays:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    if len({a.shape for a in arrays}) == 1:  # the usual case: one size, one batched call
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return TF.resize(batch, [size, size], antialias=True).contiguous()
    return torch.stack([TF.resize(torch.from_numpy(a).permute(2, 0, 1), [size, size],
                                  antialias=True) for a in arrays])


def npz_blobs(jpeg: np.ndarray, offsets: np.ndarray, indices: Sequence[int] | np.ndarray) -> list[io.BytesIO]:
    """The JPEG bytes of images ``indices`` of an ``.npz`` copy (image k =
    ``jpeg[offsets[k]:offsets[k+1]]``), as files for :func:`decode_resize`."""
    return [io.BytesIO(jpeg[offsets[k]:offsets[k + 1]].tobytes()) for k in indices]


def file_stamp(path: Path) -> str:
    """Resolved path, size and mtime: a rewritten file is read again, never served from memory."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


@contextlib.contextmanager
def reading_npz(path: Path, repair: str) -> Iterator[None]:
    """Reading an ``.npz`` copy inside this block: a truncated or damaged file (bad zip, bad CRC,
    missing key) raises ``OSError`` naming it and ``repair``, what to do."""
    try:
        yield
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise OSError(f"cannot read {path} ({type(e).__name__}: {e}): the file is damaged or incomplete; "
                      f"{repair}") from e
