"""The paper's evaluation protocols (§4), for aligned chains and the unaligned baseline alike.

* **Local-solution classification**: per task, the first 60 % of runs train Θ and the rest are
  classified into tasks by arg-max of their projected vector; top-1 accuracy.
* **Retrieval on unseen tasks** (official code): Θ is learned on the first 60 % of tasks (30 of 50);
  each remaining task gives its first 20 % of runs as queries (20 of 100) and the rest as gallery
  (80); similarity = dot product of L2-normalized projected vectors; CMC rank-k and mAP.

Fractions rather than counts let split sizes scale with the profile.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ffl.features import ProjectionConfig, Representation, cosine_similarity, fit_projection
from ffl.metrics import cmc, mean_average_precision, top1


@dataclass(frozen=True)
class ProtocolSplit:
    """Split fractions; defaults are the paper's (60/40 runs, 30/20 tasks, 20/80 query/gallery)."""

    train_run_fraction: float = 0.6
    train_task_fraction: float = 0.6
    query_fraction: float = 0.2

    def __post_init__(self) -> None:
        for name in ("train_run_fraction", "train_task_fraction", "query_fraction"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")


def _first_fraction_per_task(tasks: torch.Tensor, runs: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the networks whose run number is among the first ``fraction`` of its task's runs."""
    mask = torch.zeros(len(tasks), dtype=torch.bool)
    for t in tasks.unique():
        members = (tasks == t).nonzero().squeeze(1)
        members = members[runs[members].argsort()]
        cut = int(round(fraction * len(members)))
        if cut == 0 or cut == len(members):
            raise ValueError(f"task {int(t)} has {len(members)} runs: too few to split at {fraction}")
        mask[members[:cut]] = True
    return mask


def _task_labels(tasks: torch.Tensor) -> tuple[torch.Tensor, int]:
    uniq = tasks.unique()
    return torch.searchsorted(uniq, tasks), len(uniq)


def classification_protocol(
    rep: Representation,
    tasks: torch.Tensor,
    runs: torch.Tensor,
    config: ProjectionConfig | None = None,
    split: ProtocolSplit = ProtocolSplit(),
) -> dict[str, float]:
    """Local-solution classification: top-1 of predicting each test run's task."""
    labels, num_classes = _task_labels(tasks)
    train = _first_fraction_per_task(tasks, runs, split.train_run_fraction)
    train_index, test_index = train.nonzero().squeeze(1), (~train).nonzero().squeeze(1)
    proj = fit_projection(rep, train_index, labels[train_index], num_classes, config)
    scores = proj.project(rep, test_index)
    return {"top1": top1(scores, labels[test_index])}


def retrieval_protocol(
    rep: Representation,
    tasks: torch.Tensor,
    runs: torch.Tensor,
    config: ProjectionConfig | None = None,
    split: ProtocolSplit = ProtocolSplit(),
    ranks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Retrieval of runs of tasks never seen while learning Θ: CMC rank-k and mAP."""
    task_ids = tasks.unique()
    n_train_tasks = int(round(split.train_task_fraction * len(task_ids)))
    if not 0 < n_train_tasks < len(task_ids):
        raise ValueError(f"{len(task_ids)} tasks are too few to split at {split.train_task_fraction}")
    seen = torch.isin(tasks, task_ids[:n_train_tasks])
    train_index = seen.nonzero().squeeze(1)
    labels, num_classes = _task_labels(tasks[train_index])
    proj = fit_projection(rep, train_index, labels, num_classes, config)

    unseen = (~seen).nonzero().squeeze(1)
    is_query = _first_fraction_per_task(tasks[unseen], runs[unseen], split.query_fraction)
    query, gallery = unseen[is_query], unseen[~is_query]
    sim = cosine_similarity(proj.project(rep, query), proj.project(rep, gallery))
    out = {f"rank{k}": v for k, v in cmc(sim, tasks[query], tasks[gallery], ranks).items()}
    out["mAP"] = mean_average_precision(sim, tasks[query], tasks[gallery])
    return out
