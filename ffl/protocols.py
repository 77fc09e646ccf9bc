"""The paper's evaluation protocols (§4), for aligned chains and the unaligned baseline alike.

* **Local-solution classification**: per task, 60 % of the runs (drawn at random) train Θ and
  the rest are classified into tasks by arg-max of their projected vector; top-1 accuracy.
* **Retrieval on unseen tasks** (as the official code does): Θ is learned on 60 % of the tasks
  (30 of 50, drawn at random); each remaining task gives 20 % of its runs as queries (20 of 100)
  and the rest as gallery (80); similarity = dot product of L2-normalized projected vectors
  (Θ's outputs); CMC rank-k and mAP.
* **Cross-condition** (§4.4, Figure 5): Θ learned on one zoo (the baseline setting) reads another
  zoo of the same tasks trained under a changed condition (:func:`cross_condition_protocol`).

As in the official code the splits are random; here they are drawn from ``ProtocolSplit.seed`` so
a run is repeatable. Fractions rather than counts let split sizes scale with the profile.
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
    seed: int = 0

    def generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + salt)

    def __post_init__(self) -> None:
        for name in ("train_run_fraction", "train_task_fraction", "query_fraction"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")


def _fraction_per_task(tasks: torch.Tensor, runs: torch.Tensor, fraction: float,
                       gen: torch.Generator) -> torch.Tensor:
    """Mask of a random ``fraction`` of each task's runs (the same draw for the same ``gen``)."""
    mask = torch.zeros(len(tasks), dtype=torch.bool)
    for t in tasks.unique():
        members = (tasks == t).nonzero().squeeze(1)
        members = members[runs[members].argsort()]  # canonical order before the draw
        members = members[torch.randperm(len(members), generator=gen)]
        cut = int(round(fraction * len(members)))
        if cut == 0 or cut == len(members):
            raise ValueError(f"task {int(t)} has {len(members)} runs: too few to split at {fraction} "
                             "(each side needs at least one run); use more runs or another fraction")
        mask[members[:cut]] = True
    return mask


def _task_labels(tasks: torch.Tensor) -> tuple[torch.Tensor, int]:
    uniq = tasks.unique()
    return torch.searchsorted(uniq, tasks), len(uniq)


def classification_split(tasks: torch.Tensor, runs: torch.Tensor,
                         split: ProtocolSplit = ProtocolSplit()) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the networks that train Θ and of those classified (per task 60 / 40 %)."""
    n_tasks = len(tasks.unique())
    if n_tasks < 2:
        raise ValueError(f"classification needs at least 2 tasks, got {n_tasks}: with one task every "
                         "network is classified correctly whatever its features")
    train = _fraction_per_task(tasks, runs, split.train_run_fraction, split.generator(1))
    return train.nonzero().squeeze(1), (~train).nonzero().squeeze(1)


def retrieval_split(tasks: torch.Tensor, runs: torch.Tensor, split: ProtocolSplit = ProtocolSplit()
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of the networks that train Θ (all runs of the seen tasks), of the queries and of
    the gallery (the unseen tasks' runs, 20 / 80 %)."""
    task_ids = tasks.unique()
    task_ids = task_ids[torch.randperm(len(task_ids), generator=split.generator(2))]
    n_train_tasks = int(round(split.train_task_fraction * len(task_ids)))
    n_unseen = len(task_ids) - n_train_tasks
    if n_train_tasks < 2 or n_unseen < 2:
        raise ValueError(
            f"retrieval needs at least 2 seen and 2 unseen tasks; {len(task_ids)} tasks split at "
            f"train_task_fraction {split.train_task_fraction} give {n_train_tasks} seen and {n_unseen} unseen "
            "(with one unseen task every gallery item matches every query: rank-1 = mAP = 1 on any "
            "features). Use more tasks or another train_task_fraction.")
    seen = torch.isin(tasks, task_ids[:n_train_tasks])
    unseen = (~seen).nonzero().squeeze(1)
    is_query = _fraction_per_task(tasks[unseen], runs[unseen], split.query_fraction, split.generator(3))
    return seen.nonzero().squeeze(1), unseen[is_query], unseen[~is_query]


def check_finite(rep: Representation, tasks: torch.Tensor, runs: torch.Tensor) -> None:
    """``ValueError`` naming the networks (position, task, run) whose features are NaN or infinite:
    one such network makes the whole kernel, and so the protocol, meaningless."""
    bad = (~torch.isfinite(rep.squared_norms())).nonzero().flatten().tolist()
    if bad:
        named = ", ".join(f"#{i} (task {int(tasks[i])}, run {int(runs[i])})" for i in bad[:20])
        raise ValueError(f"non-finite features for {len(bad)} of {len(rep)} networks: {named}"
                         + (" …" if len(bad) > 20 else "") + ". Their weights are NaN or infinite (training "
                         "diverged); retrain the zoo (a smaller lr) rather than evaluate it.")


def classification_protocol(
    rep: Representation,
    tasks: torch.Tensor,
    runs: torch.Tensor,
    config: ProjectionConfig | None = None,
    split: ProtocolSplit = ProtocolSplit(),
) -> dict[str, float]:
    """Local-solution classification: top-1 of predicting each test run's task; ``theta_top1``
    and ``theta_loss`` say how well Θ fits the networks it was learned from (converged or not)."""
    proj, scores, labels, _ = _classify(rep, tasks, runs, config, split)
    return {"top1": top1(scores, labels), "theta_top1": proj.train_top1, "theta_loss": proj.train_loss}


def classification_predictions(
    rep: Representation,
    tasks: torch.Tensor,
    runs: torch.Tensor,
    config: ProjectionConfig | None = None,
    split: ProtocolSplit = ProtocolSplit(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """The test networks of :func:`classification_protocol` (same split, same Θ): their true tasks
    and the tasks Θ assigns them, so one can ask which tasks the errors land on."""
    _, scores, _, test_index = _classify(rep, tasks, runs, config, split)
    known = torch.unique(tasks)
    return tasks[test_index], known[scores.argmax(dim=1)]


def _classify(rep, tasks, runs, config, split):
    labels, num_classes = _task_labels(tasks)
    train_index, test_index = classification_split(tasks, runs, split)
    check_finite(rep, tasks, runs)
    proj = fit_projection(rep, train_index, labels[train_index], num_classes, config)
    return proj, proj.project(rep, test_index), labels[test_index], test_index


def retrieval_protocol(
    rep: Representation,
    tasks: torch.Tensor,
    runs: torch.Tensor,
    config: ProjectionConfig | None = None,
    split: ProtocolSplit = ProtocolSplit(),
    ranks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Retrieval of runs of tasks never seen while learning Θ: CMC rank-k and mAP."""
    train_index, query, gallery = retrieval_split(tasks, runs, split)
    check_finite(rep, tasks, runs)
    labels, num_classes = _task_labels(tasks[train_index])
    proj = fit_projection(rep, train_index, labels, num_classes, config)
    sim = cosine_similarity(proj.project(rep, query), proj.project(rep, gallery))
    out = {f"rank{k}": v for k, v in cmc(sim, tasks[query], tasks[gallery], ranks).items()}
    out["mAP"] = mean_average_precision(sim, tasks[query], tasks[gallery])
    return out


def _join(source: Representation, target: Representation) -> Representation:
    """One Representation holding ``source``'s networks then ``target``'s. Chain factors of other
    widths are zero-padded (appending zero columns to C leaves G = C Cᵀ unchanged)."""
    if (source.vectors is None) != (target.vectors is None):
        raise ValueError("both zoos need the same kind of feature (layer vectors or chain factors)")
    if source.vectors is not None:
        if source.vectors.shape[1] != target.vectors.shape[1]:
            raise ValueError(f"layer features of different length ({source.vectors.shape[1]} and "
                             f"{target.vectors.shape[1]}): a Θ learned on one cannot read the other")
        return Representation(vectors=torch.cat([source.vectors, target.vectors]))
    a, b = source.factors, target.factors
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"chain Grams of different size ({a.shape[1]}² and {b.shape[1]}²): "
                         "a Θ learned on one cannot read the other")
    n = max(a.shape[2], b.shape[2])
    pad = lambda c: torch.nn.functional.pad(c, (0, n - c.shape[2]))  # noqa: E731
    return Representation(factors=torch.cat([pad(a), pad(b).to(a.dtype)]))


def cross_condition_protocol(
    rep_source: Representation,
    rep_target: Representation,
    tasks: torch.Tensor,
    runs: torch.Tensor,
    config: ProjectionConfig | None = None,
    split: ProtocolSplit = ProtocolSplit(),
    ranks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[str, float]]:
    """Θ learned on one zoo, applied unchanged to another (§4.4, Figure 5).

    Network ``i`` of both zoos solved task ``tasks[i]`` in run ``runs[i]`` (two zoos of the same
    tasks × runs, trained under different conditions). Θ is learned on the *source* zoo exactly as
    in :func:`classification_protocol` / :func:`retrieval_protocol`, then reads the *target* zoo:

    * classification: the target's runs held out by the classification split are assigned to
      tasks (top-1); the tasks are those Θ learned, the networks are new;
    * retrieval: the target's runs of the tasks Θ never saw give queries and gallery (CMC, mAP).

    Only held-out runs of the target are scored, so no target network shares (task, run) — and
    hence, in our zoos, its initialization seed — with a network Θ learned from. (The official
    ``test_sup_cross.py`` scores all runs of the target zoo with the 50-class classification Θ,
    and retrieves among the same tasks Θ was trained on.)
    Returns ``{"classification": {"top1": …}, "retrieval": {"rank1": …, …, "mAP": …}}``.
    """
    if len(rep_source) != len(tasks) or len(rep_target) != len(tasks):
        raise ValueError(f"both zoos need one network per (task, run): {len(tasks)} labels, "
                         f"{len(rep_source)} source and {len(rep_target)} target networks")
    joined, offset = _join(rep_source, rep_target), len(rep_source)
    labels, num_classes = _task_labels(tasks)
    train_index, test_index = classification_split(tasks, runs, split)
    proj = fit_projection(joined, train_index, labels[train_index], num_classes, config)
    out = {"classification": {"top1": top1(proj.project(joined, test_index + offset), labels[test_index])}}

    seen, query, gallery = retrieval_split(tasks, runs, split)
    seen_labels, num_seen = _task_labels(tasks[seen])
    proj = fit_projection(joined, seen, seen_labels, num_seen, config)
    sim = cosine_similarity(proj.project(joined, query + offset), proj.project(joined, gallery + offset))
    retrieval = {f"rank{k}": v for k, v in cmc(sim, tasks[query], tasks[gallery], ranks).items()}
    retrieval["mAP"] = mean_average_precision(sim, tasks[query], tasks[gallery])
    out["retrieval"] = retrieval
    return out
