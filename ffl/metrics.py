"""Evaluation measures of the paper's protocols (§4): top-1 accuracy, CMC rank-k and mAP.

Ties in similarity are broken by gallery order (a stable sort), so results are deterministic.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of ``scores`` (N, C) whose arg-max equals ``labels`` (N,)."""
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"scores must be (N, C) and labels (N,); got {tuple(scores.shape)} and {tuple(labels.shape)}")
    return (scores.argmax(dim=1) == labels).double().mean().item()


def _ranked_matches(similarity: torch.Tensor, query_labels: torch.Tensor, gallery_labels: torch.Tensor) -> torch.Tensor:
    """Boolean (Q, G): is the gallery item at each rank (best first) of the query's class?"""
    if similarity.shape != (len(query_labels), len(gallery_labels)):
        raise ValueError(
            f"similarity is {tuple(similarity.shape)} but there are {len(query_labels)} queries "
            f"and {len(gallery_labels)} gallery items"
        )
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices
    return gallery_labels[order] == query_labels[:, None]


def cmc(
    similarity: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    ranks: Sequence[int] = (1, 5, 10),
) -> dict[int, float]:
    """Cumulative matching characteristic: for each k in ``ranks``, the fraction of queries with a
    gallery item of their own class among their k most similar gallery items."""
    matches = _ranked_matches(similarity, query_labels, gallery_labels)
    first_hit = torch.where(matches.any(dim=1), matches.double().argmax(dim=1), matches.shape[1])
    return {k: (first_hit < k).double().mean().item() for k in ranks}


def mean_average_precision(
    similarity: torch.Tensor, query_labels: torch.Tensor, gallery_labels: torch.Tensor
) -> float:
    """Mean over queries of average precision: the mean, over the query's relevant gallery items,
    of the precision at each one's rank. Queries with no relevant item are skipped."""
    matches = _ranked_matches(similarity, query_labels, gallery_labels).double()
    hits = matches.cumsum(dim=1)
    rank = torch.arange(1, matches.shape[1] + 1, dtype=torch.float64)
    n_relevant = matches.sum(dim=1)
    ap = (matches * hits / rank).sum(dim=1) / n_relevant.clamp_min(1)
    return ap[n_relevant > 0].mean().item()
