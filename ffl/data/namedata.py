"""NameData (§4, GRU-2): surnames of 18 languages from the PyTorch char-RNN tutorial
(``<data_root>/names/<Language>.txt``); task ``r`` = languages ``2r, 2r+1``, names as padded one-hot
sequences over :data:`ALL_LETTERS`, the one definition of the letter set."""
from __future__ import annotations

import os
import string
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets import utils as tv_utils  # module attribute: tests stub the download

from ffl.data.tasks import TaskData, task_classes
from ffl.files import atomic_path
from ffl.seeds import derive_seed

#: The 57 characters of the PyTorch char-RNN tutorial: names are folded to them and GRU-2 reads
#: them one-hot (:mod:`ffl.models` takes its input size from here).
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


def load_namedata(task: int, root: Path, *, download: bool, seed: int,
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
        with atomic_path(base) as staged:
            # No official checksum is published for data.zip, so none is checked.
            archive = staged.parent / "archive"
            tv_utils.download_and_extract_archive(NAMEDATA_URL, download_root=str(archive))
            os.replace(archive / "data" / "names", staged)
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
        g = torch.Generator().manual_seed(derive_seed("ffl-namedata", seed, lang))
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
        g = torch.Generator().manual_seed(derive_seed("ffl-namedata", seed, task, split))
        rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
        x, lengths = _names_to_padded([n for n, _ in rows], max_len)
        out[split] = (x, torch.tensor([y for _, y in rows], dtype=torch.int64), lengths)
    (x_tr, y_tr, l_tr), (x_te, y_te, l_te) = out["train"], out["test"]
    return TaskData(x_tr, y_tr, x_te, y_te, classes=languages, lengths_train=l_tr,
                    lengths_test=l_te)
