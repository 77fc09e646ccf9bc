"""Metrics against values worked out by hand."""
import pytest
import torch

from ffl.metrics import cmc, mean_average_precision, top1

# Two queries, four gallery items (labels A=0, B=1).
SIM = torch.tensor([[0.9, 0.8, 0.1, 0.5], [0.2, 0.3, 0.4, 0.7]])
QUERY = torch.tensor([0, 1])
GALLERY = torch.tensor([1, 0, 0, 1])
# Query 0 ranks the gallery B, A, B, A: first hit at rank 2, AP = (1/2 + 2/4) / 2 = 0.5.
# Query 1 ranks it B, A, A, B: first hit at rank 1, AP = (1/1 + 2/4) / 2 = 0.75.


def test_cmc_by_hand():
    assert cmc(SIM, QUERY, GALLERY, ranks=(1, 2, 4)) == {1: 0.5, 2: 1.0, 4: 1.0}


def test_map_by_hand():
    assert mean_average_precision(SIM, QUERY, GALLERY) == pytest.approx(0.625)


def test_cmc_query_without_match_never_hits():
    assert cmc(SIM[:1], torch.tensor([2]), GALLERY, ranks=(4,)) == {4: 0.0}


def test_top1_by_hand():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert top1(scores, torch.tensor([1, 1, 1])) == pytest.approx(2 / 3)


def test_shape_errors_are_explained():
    with pytest.raises(ValueError, match="queries"):
        cmc(SIM, QUERY[:1], GALLERY)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        top1(torch.zeros(3), torch.zeros(3, dtype=torch.long))
