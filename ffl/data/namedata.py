"""NameData (§4, GRU-2): surnames of 18 languages from the PyTorch char-RNN tutorial
(``<data_root>/names/<Language>.txt``); task ``r`` = languages ``2r, 2r+1``, names as padded one-hot
sequences over :data:`ALL_LETTERS` (defined in :mod:`ffl.alphabet`, re-exported here)."""
from __future__ import annotations

import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.datasets import utils as tv_utils  # module attribute: tests stub the download

from ffl.alphabet import ALL_LETTERS, N_LETTERS  # the letter set; ffl.data re-exports it from here
from ffl.data.tasks import TaskData, download_failure, task_classes
from ffl.files import atomic_path
from ffl.seeds import derive_seed

#: How a language's names are split into train and test (see :func:`load_namedata`).
NAMEDATA_SPLITS = ("official", "fraction")
NAMEDATA_URL = "https://download.pytorch.org/tutorial/data.zip"
# The 18 files of the tutorial's data/names/, sorted: label i = NAMEDATA_LANGUAGES[i].
NAMEDATA_LANGUAGES = ("Arabic", "Chinese", "Czech", "Dutch", "English", "French", "German",
                      "Greek", "Irish", "Italian", "Japanese", "Korean", "Polish", "Portuguese",
                      "Russian", "Scottish", "Spanish", "Vietnamese")


def unicode_to_ascii(s: str) -> str:
    """Fold a name to :data:`ALL_LETTERS` as the char-RNN tutorial and the official code do:
    Unicode NFD, drop combining marks (category Mn), keep only the 58 symbols."""
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
    try:
        lines = Path(path).read_text(encoding="utf-8").strip().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); NameData files are UTF-8: download them again, "
                         f"or convert this one (e.g. iconv -f latin1 -t utf-8)") from None
    return [n for n in map(unicode_to_ascii, lines) if n]


def _names_to_padded(names: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(n) for n in names], dtype=torch.int64)
    idx = torch.full((len(names), max_len), -1, dtype=torch.int64)
    for i, n in enumerate(names):
        idx[i, :len(n)] = torch.tensor([ALL_LETTERS.index(c) for c in n], dtype=torch.int64)
    x = F.one_hot(idx.clamp(min=0), N_LETTERS).float() * (idx >= 0).unsqueeze(-1)  # zero padding
    return x, lengths


def _split_names(names: list[str], split: str, *, test_fraction: float, dedupe: bool,
                 max_per_class: int | None, gen: torch.Generator) -> tuple[list[str], list[str]]:
    """One language's (train, test) names; see :func:`load_namedata`."""
    if split == "fraction" and dedupe:
        names = list(dict.fromkeys(names))
    names = [names[i] for i in torch.randperm(len(names), generator=gen).tolist()][:max_per_class]
    if split == "official":
        train = names[:len(names) // 2]
        drawn = set(train)
        return train, sorted(set(names) - drawn)
    if len(names) < 2:
        raise ValueError(f"fewer than 2 usable names for a {split!r} split")
    n_test = min(len(names) - 1, max(1, round(test_fraction * len(names))))
    return names[:-n_test], names[-n_test:]


def load_namedata(task: int, root: Path, *, download: bool, seed: int, split: str = "official",
                  test_fraction: float = 0.2, dedupe: bool = True,
                  max_per_class: int | None = None) -> TaskData:
    """Task r = languages 2r, 2r+1 of :data:`NAMEDATA_LANGUAGES` (§4.3).

    Per language the names are read as the tutorial does, then split by ``split``:

    * ``"official"`` (the official code's split; the paper is silent): a seeded random half of the
      file's *lines* (repeated lines included) trains; the distinct names never drawn for training
      are the test set. A file of many repeats can leave its language without test names
      (Arabic.txt: 2,000 lines, 108 names); the task is then tested on its other language only.
    * ``"fraction"`` (ours): with ``dedupe=True`` repeated lines are dropped first, so a name is
      never both a training and a test name; the last ``round(test_fraction·n)`` (at least 1) of
      a seeded shuffle test.

    The official code draws without a seed; here every draw is seeded by ``(seed, language)``.
    ``max_per_class`` keeps only that many lines per language (small test zoos). Train and test
    are then shuffled with a seeded permutation so the classes are mixed.
    """
    if split not in NAMEDATA_SPLITS:
        raise ValueError(f"unknown NameData split {split!r}; choose one of {list(NAMEDATA_SPLITS)}")
    base = root / "names"
    languages = [NAMEDATA_LANGUAGES[c] for c in task_classes("namedata", task)]
    paths = [base / f"{lang}.txt" for lang in languages]
    missing = [p for p in paths if not p.is_file()]
    message = ("NameData not found: missing " + ", ".join(str(p) for p in missing)
               + f". Expected {base}/<Language>.txt for the 18 languages {NAMEDATA_LANGUAGES}. "
               "Get them with load_task('namedata', ..., download=True) (notebooks: "
               f"`-p download true`), or download {NAMEDATA_URL} and copy its data/names/ folder "
               f"to {base}.")
    if missing and download:
        with download_failure(message), atomic_path(base) as staged:
            # No official checksum is published for data.zip, so none is checked.
            archive = staged.parent / "archive"
            tv_utils.download_and_extract_archive(NAMEDATA_URL, download_root=str(archive))
            os.replace(archive / "data" / "names", staged)
        missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(message)
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for label, (lang, path) in enumerate(zip(languages, paths)):
        train, test = _split_names(read_names(path), split, test_fraction=test_fraction, dedupe=dedupe,
                                   max_per_class=max_per_class,
                                   gen=torch.Generator().manual_seed(derive_seed("ffl-namedata", seed, lang)))
        if not train:
            raise ValueError(f"{path}: no training names after the {split!r} split")
        splits["train"] += [(n, label) for n in train]
        splits["test"] += [(n, label) for n in test]
    if not splits["test"]:
        raise ValueError(f"NameData task {task} ({', '.join(languages)}) has no test names after the "
                         f"{split!r} split")
    max_len = max(len(n) for rows in splits.values() for n, _ in rows)
    out = {}
    for part, rows in splits.items():
        g = torch.Generator().manual_seed(derive_seed("ffl-namedata", seed, task, part))
        rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
        x, lengths = _names_to_padded([n for n, _ in rows], max_len)
        out[part] = (x, torch.tensor([y for _, y in rows], dtype=torch.int64), lengths)
    (x_tr, y_tr, l_tr), (x_te, y_te, l_te) = out["train"], out["test"]
    return TaskData(x_tr, y_tr, x_te, y_te, classes=languages, lengths_train=l_tr,
                    lengths_test=l_te)
