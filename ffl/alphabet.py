"""The letter set of NameData (§4.3, GRU-2), apart from the dataset: :mod:`ffl.models` takes GRU-2's
input size from it without importing any dataset, and :mod:`ffl.data.namedata` folds and encodes
names over it (and re-exports it)."""

import string

#: The 58 symbols of the official code's NameData (the char-RNN tutorial's 57 plus ``-``): names
#: are folded to them and GRU-2 reads them one-hot.
ALL_LETTERS = string.ascii_letters + " .,;'-"
N_LETTERS = len(ALL_LETTERS)  # 58
