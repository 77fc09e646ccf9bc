"""What a chapter prints about its run: the zoo and protocol sizes behind every percentage, the
paper's numbers beside ours, and where the time went.

Tables are Markdown strings (rendered by the book) or DataFrames; they read an
:class:`ffl.experiment.Experiment` and never compute results of their own. The numbers a chapter's
prose names come as ``{glue name: value}`` dicts, which :func:`publish` glues for the page's
``{glue}`` roles; the local-solution chapters (CIFAR-100, tiny ImageNet) share them all.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from ffl.data import DATA_NAMES, cifar10, load_task, resolve_root, tiny_imagenet
from ffl.models import CONV_ARCHS, PLAINNET5_WIDTHS
from ffl.paper import caption_note, reported
from ffl.protocols import classification_split, retrieval_split
from ffl.zoo import read_provenance, spec_from_profile

if TYPE_CHECKING:  # type hints only: experiment imports nothing from here
    import torch

    from ffl.experiment import Experiment

METRIC_NAMES = {"top1": "classification top-1 (%)", "rank1": "retrieval rank-1 (%)"}
FEATURE_NAMES = {"chain": "aligned", "layer": "unaligned"}
#: the measure a chapter's prose names for each protocol: top-1 of classification, rank-1 of retrieval
HEADLINE = (("classification", "top1"), ("retrieval", "rank1"))
#: the chain indices the paper reports (§4: chain 4 of PlainNet-5 did not fit its GPU memory)
PAPER_INDICES = (1, 2, 3)
#: why a narrow PlainNet-5 zoo falls short of the paper, for :func:`scale_note`
NARROW_CNN_WHY = ("The chapter *Why narrow CNNs fall short* measures why: the width of the networks, the SGD "
                  "steps each takes and the runs of each task Θ learns from move chain top-1 by several points "
                  "each, chain 1 (the first layer's 27 × 27 Gram) most.")


class Md(str):
    """A Markdown string: :func:`publish` glues it for a ``{glue:md}`` role."""


def publish(values: dict[str, Any]) -> None:
    """Glue every value under its name for the page's ``{glue}`` roles (myst_nb), showing none; an
    :class:`Md` as Markdown."""
    from IPython.display import Markdown
    from myst_nb import glue

    for name, value in values.items():
        glue(name, Markdown(str(value)) if isinstance(value, Md) else value, display=False)


def data_label(dataset: str, stands_for: str | None = None) -> str:
    """The data a chapter ran on, as its title names it: ``"CIFAR-100"``; for the synthetic tasks
    ``"Synthetic stand-in for CIFAR-100"``; for other real data than the chapter's own
    ``"CIFAR-10 (in place of CIFAR-100)"`` (``stands_for``: the dataset the chapter is about)."""
    if dataset == "synthetic":
        return f"Synthetic stand-in for {DATA_NAMES.get(stands_for, 'real data')}"
    if dataset not in DATA_NAMES:
        raise ValueError(f"no title name for dataset {dataset!r}; known: {sorted(DATA_NAMES)} and 'synthetic'")
    if stands_for in DATA_NAMES and stands_for != dataset:
        return f"{DATA_NAMES[dataset]} (in place of {DATA_NAMES[stands_for]})"
    return DATA_NAMES[dataset]


def _markdown(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _training(spec) -> str:
    length = (f"{spec.steps:,} steps, lr/10 after {', '.join(f'{s:,}' for s in spec.lr_step_steps) or 'none'}"
              if spec.steps is not None else
              f"{spec.epochs} epoch{'s' * (spec.epochs != 1)}, lr/10 after {', '.join(map(str, spec.lr_step_epochs)) or 'none'}")
    extras = [f"momentum {spec.momentum}" if spec.optimizer == "sgd" else "",
              f"weight decay {spec.weight_decay}" if spec.weight_decay else "no weight decay",
              "crop+flip" if spec.augment else "no augmentation",
              "class-balanced draws" if spec.sampling == "balanced" else "", spec.precision]
    return (f"{spec.optimizer.upper()}, lr {spec.lr}, batch {spec.batch_size}, {length}; "
            + ", ".join(e for e in extras if e))


KERNEL_NAMES = {"torch": "PyTorch's", "triton": "Triton (ffl)", "interpret": "Triton's interpreter"}


def _engine_rows(exp: Experiment) -> list[tuple[str, str]]:
    """How the zoo was trained when it was not PyTorch's own operations: its provenance's kernels
    and chunk size (none for a zoo trained before they were recorded)."""
    prov = read_provenance(exp.zoo.root) or {}
    kernels = prov.get("kernels") or {}
    if all(kernels.get(part, "torch") == "torch" for part in ("conv", "bn")):
        return []
    tiles = f" (measured blockings: {kernels['conv_tiles']})" if "conv_tiles" in kernels else ""
    return [("training engine", f"{prov.get('batch_networks', '?')} networks per batch; convolution: "
             f"{KERNEL_NAMES[kernels.get('conv', 'torch')]}{tiles}, BatchNorm + activation + pooling: "
             f"{KERNEL_NAMES[kernels.get('bn', 'torch')]}{' (fused)' if kernels.get('bn', 'torch') != 'torch' else ''}")]


def _per_class(counts: list[int]) -> str:
    lo, hi = min(counts), max(counts)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def data_note(spec, *, data_root: str | None = None, stands_for: str | None = None) -> str:
    """What an image zoo was trained on, read from the data itself (its first task): the dataset,
    images per class, and the file it came from; for a stand-in, that it is one (``stands_for``:
    the dataset the chapter is about, whose reported numbers are then not drawn)."""
    first = load_task(spec.dataset, spec.tasks[0], data_root=data_root, seed=spec.seed, **spec.data_kwargs)
    train, test = _per_class(first.y_train.bincount().tolist()), _per_class(first.y_test.bincount().tolist())
    paper_data = DATA_NAMES.get(stands_for, "the paper's data")
    if spec.dataset == "synthetic":
        return (f"the synthetic stand-in ({first.num_classes} classes per task, {train} training images per "
                f"class), not {paper_data}: the paper's numbers are not drawn beside it")
    root = resolve_root(data_root)
    if spec.dataset == "tiny_imagenet":
        source = tiny_imagenet.tiny_imagenet_source(root).name
        return (f"tiny ImageNet, {train} training images per class ({test} validation images per class as "
                f"the test set), read from `{source}`")
    if spec.dataset == "cifar10":
        source = cifar10.cifar10_source(root)
        copy = " (JPEG re-encodings of the images, quality 75)" if source.suffix == ".npz" else ""
        return (f"{data_label('cifar10', stands_for)}: real CIFAR-10 images, not {paper_data}, so the paper's "
                f"numbers are not drawn beside it; two-class tasks from the 45 class pairs, {train} training and "
                f"{test} test images per class, read from `{source.name}`{copy}")
    return f"{DATA_NAMES[spec.dataset]}, {train} training and {test} test images per class"


def _splits(exp: Experiment) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The zoo's task count and its protocol splits: classification (train, test), retrieval (seen,
    query, gallery), as network indices."""
    zoo = exp.zoo
    return (int(zoo.tasks.unique().numel()), *classification_split(zoo.tasks, zoo.runs, exp.split),
            *retrieval_split(zoo.tasks, zoo.runs, exp.split))


def run_table(exp: Experiment, *, data: str | None = None) -> str:
    """The zoo and protocol sizes behind the chapter's numbers (Markdown); ``data``, a
    :func:`data_note`, is its last row."""
    zoo, spec = exp.zoo, exp.zoo.spec
    n_tasks, cls_train, cls_test, seen, query, gallery = _splits(exp)
    acc = 100 * zoo.accuracy["test"].double()
    n_seen = int(zoo.tasks[seen].unique().numel())
    model = ", ".join(f"{k}={v}" for k, v in spec.model_kwargs.items()) or "the architecture's defaults"
    return _markdown([
        ("zoo", f"{spec.arch} ({model}) on {spec.dataset}: {n_tasks} tasks × {spec.runs} runs = {len(zoo):,} networks"),
        ("training", _training(spec)),
        *_engine_rows(exp),
        ("test accuracy on own task", f"mean {acc.mean():.1f} %, min {acc.min():.1f} %, max {acc.max():.1f} %"),
        ("classification", f"Θ learned on {len(cls_train):,} networks, {len(cls_test):,} classified into {n_tasks} tasks"),
        ("retrieval", f"Θ learned on the {len(seen):,} networks of {n_seen} tasks; {n_tasks - n_seen} unseen tasks give "
                      f"{len(query):,} queries against a gallery of {len(gallery):,}"),
        ("features", ", ".join(f"{k}={v}" for k, v in vars(exp.features).items())),
        *([("data", data)] if data else []),
    ])


def zoo_numbers(exp: Experiment, *, data_root: str | None = None, stands_for: str | None = None) -> dict[str, Any]:
    """What a chapter's prose says of its zoo, by glue name: ``n_networks``, ``n_tasks``, ``n_runs``
    (per task), ``test_acc`` (mean test accuracy on the own task, %), the sizes behind its
    percentages (``n_cls_test`` networks classified, ``n_queries`` against ``n_gallery`` in
    retrieval) and ``data_note`` (:func:`data_note`, Markdown; the last row of :func:`run_table`)."""
    zoo = exp.zoo
    n_tasks, _, cls_test, _, query, gallery = _splits(exp)
    return {"n_networks": len(zoo), "n_tasks": n_tasks, "n_runs": len(zoo) // n_tasks,
            "test_acc": 100 * float(zoo.accuracy["test"].mean()), "n_cls_test": len(cls_test),
            "n_queries": len(query), "n_gallery": len(gallery),
            "data_note": Md(data_note(zoo.spec, data_root=data_root, stands_for=stands_for))}


def index_table(results: pd.DataFrame) -> pd.DataFrame:
    """Every index and measure of ``results`` in percent, rounded to 0.1: rows (index, feature,
    dim), where *dim* is the length of the vector Θ acts on; columns top1, rank1, rank5, mAP."""
    table = results.pivot_table(index=["index", "feature", "dim"], columns="metric", values="value")
    return (100 * table[["top1", "rank1", "rank5", "mAP"]]).round(1)


def split_at(table: pd.DataFrame, indices: tuple[int, ...] = PAPER_INDICES) -> tuple[pd.DataFrame, pd.DataFrame]:
    """An :func:`index_table`'s rows at ``indices`` (the paper's) and the others (ours alone)."""
    at = table.index.get_level_values("index").isin(indices)
    return table[at], table[~at]


def index_numbers(results: pd.DataFrame, *, indices: tuple[int, ...] = PAPER_INDICES,
                  best_over: tuple[int, ...] | None = None) -> dict[str, float | int]:
    """The percentages a chapter's prose names (the :data:`HEADLINE` measures), by glue name:
    ``{feature}_{metric}_{l}`` for the aligned chain and the raw layer at each index ``l`` of
    ``indices``; ``best_{feature}_{metric}`` over the indices ``best_over`` (every index when None)
    and ``best_{feature}_{metric}_index``, the index that reaches it (the first of ties)."""
    numbers: dict[str, float | int] = {}
    for feature in FEATURE_NAMES:
        rows = results[results.feature == feature].set_index(["protocol", "metric", "index"])["value"].sort_index()
        for protocol, metric in HEADLINE:
            values = rows.loc[(protocol, metric)]
            for l in indices:
                numbers[f"{feature}_{metric}_{l}"] = 100 * float(values.loc[l])
            best = values if best_over is None else values[values.index.isin(best_over)]
            numbers[f"best_{feature}_{metric}"] = 100 * float(best.max())
            numbers[f"best_{feature}_{metric}_index"] = int(best.idxmax())
    return numbers


def result_numbers(exp: Experiment, section: str, *, data_root: str | None = None,
                   indices: tuple[int, ...] = PAPER_INDICES, best_over: tuple[int, ...] | None = None
                   ) -> dict[str, Any]:
    """What a chapter's reading of its result names, by glue name: :func:`index_numbers` and
    ``scale_note`` (:func:`scale_note`, Markdown; for PlainNet-5 with :data:`NARROW_CNN_WHY`)."""
    why = NARROW_CNN_WHY if exp.zoo.spec.arch == "cnn" else ""
    return {**index_numbers(exp.results, indices=indices, best_over=best_over),
            "scale_note": Md(scale_note(exp, section, data_root=data_root, why=why))}


def paper_indices(section: str, arch: str) -> tuple[int, ...]:
    """The indices the paper printed numbers for in ``section`` with ``arch``; :data:`PAPER_INDICES`
    where its numbers name no index (CIFAR-100's text)."""
    return tuple(sorted(int(i) for i in reported(section, arch)["index"].dropna().unique())) or PAPER_INDICES


def paper_drawn(section: str, arch: str, dataset: str) -> tuple[pd.DataFrame | None, Md]:
    """The paper's numbers to draw beside a run of ``section`` on ``dataset`` (:func:`ffl.paper.reported`),
    None beside other data than the paper's (a stand-in), and the caption's note on what is drawn
    (:func:`ffl.paper.caption_note`, Markdown)."""
    drawn = dataset == section
    return (reported(section, arch) if drawn else None), Md(caption_note(section, arch, drawn=drawn))


def paper_beside_ours(results: pd.DataFrame, paper: pd.DataFrame, *, index: int = 1) -> pd.DataFrame:
    """Our top-1 / rank-1 at ``index`` beside the paper's (percent), one row per feature; the paper's
    rows without an index (a table that names none) are matched to ``index``."""
    ours = results[results["index"] == index]
    paper = paper.assign(index=paper["index"].fillna(index))
    paper = paper[paper["index"] == index]
    rows = []
    for feature, name in FEATURE_NAMES.items():
        row = {"feature": f"{name} ({feature} {index})"}
        for metric, label in METRIC_NAMES.items():
            for source, frame in (("paper", paper), ("ours", ours)):
                value = frame[(frame["feature"] == feature) & (frame["metric"] == metric)]["value"]
                row[(label, source)] = 100 * float(value.iloc[0]) if len(value) else None
        rows.append(row)
    # rounded as the chapters' other tables are (pandas), so one number reads the same in both
    table = pd.DataFrame(rows).set_index("feature").astype(float).round(1)
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    return table


def paper_beside_ours_by_index(results: pd.DataFrame, paper: pd.DataFrame | None, indices: tuple[int, ...]
                               ) -> pd.DataFrame:
    """:func:`paper_beside_ours` at each of ``indices`` (an ``index`` level above the features);
    without ``paper`` (a run on a stand-in, :func:`paper_drawn`) our columns alone."""
    table = pd.concat({l: paper_beside_ours(results, reported("none", "none") if paper is None else paper, index=l)
                       for l in indices}, names=["index"])
    if paper is None:
        table = table.drop(columns=[c for c in table.columns if c[1] == "paper"])
    return table


#: training images per class in the paper's image tasks (§4: CIFAR-100 and tiny ImageNet have 500)
PAPER_TRAIN_PER_CLASS = 500
#: what the paper's zoos are, per (section, arch): tasks × runs and the networks (§4)
PAPER_ZOOS = {("tiny_imagenet", "mlp"): "50 tasks × 100 runs of MLP-4 with 500 hidden units",
              ("tiny_imagenet", "cnn"): "50 tasks × 100 runs of PlainNet-5 with widths 32–256",
              ("cifar100", "mlp"): "50 tasks × 100 runs of MLP-4 with 500 hidden units",
              ("cifar100", "cnn"): "50 tasks × 100 runs of PlainNet-5 with widths 32–256",
              ("factors", "cnn"): "50 CIFAR-100 tasks × 100 runs per setting, PlainNet-5 with widths 32–256",
              ("namedata", "gru"): "9 tasks × 100 runs of GRU-2 with 128 hidden units"}
#: the dataset of the paper's section and its classes per task (§4)
PAPER_DATA = {"cifar100": ("cifar100", 2), "tiny_imagenet": ("tiny_imagenet", 4), "factors": ("cifar100", 2)}
#: what one training example of a dataset is, in prose (default: an image)
EXAMPLE_NAMES = {"namedata": "names"}


def steps_per_network(spec, train_images: int) -> int:
    """SGD steps one network of ``spec`` takes on ``train_images`` images (the last batch kept)."""
    return int(spec.steps) if spec.steps is not None else -(-train_images // spec.batch_size) * spec.epochs


def overlap_note(errors: pd.DataFrame | None, sharing: dict[int, set[int]], data: str) -> str:
    """One paragraph (Markdown) on whether a zoo's tasks share classes and, if they do, where the
    aligned chains' classification errors land (``errors``: :func:`ffl.gap.overlap_errors`; None
    for disjoint tasks)."""
    if errors is None or not any(sharing.values()):
        return "The tasks of this zoo share no class, as the paper's do not."
    shares = "–".join(map(str, sorted({len(others) for others in sharing.values()})))
    if not errors["errors"].sum():
        return (f"On {data} the tasks overlap, where the paper's are disjoint pairs of classes: each of the "
                f"{len(sharing)} tasks shares a class with {shares} of the others. The chains classify every "
                f"held-out network into its own task at indices {', '.join(map(str, errors.index))} all the same.")
    parts = [f"chain {index}: {int(row['to a task sharing a class'])} of {int(row['errors'])} "
             f"({100 * row['share']:.0f} %; a wrong task drawn at random: {100 * row['share at random']:.0f} %)"
             if row["errors"] else f"chain {index}: no error" for index, row in errors.iterrows()]
    text = (f"On {data} the tasks overlap, where the paper's are disjoint pairs of classes: each of the "
            f"{len(sharing)} tasks shares a class with {shares} of the others. Of the held-out networks the "
            f"chains give a wrong task, those given one that shares a class with their own: {'; '.join(parts)}.")
    total, shared = errors["errors"].sum(), errors["to a task sharing a class"].sum()
    at_random = (errors["share at random"] * errors["errors"]).sum() / total if total else float("nan")
    if total and shared / total > max(0.5, 1.5 * at_random):
        text += (" The errors gather on the overlapping tasks: part of the shortfall against the paper is this "
                 "overlap, which CIFAR-100's 50 disjoint pairs do not have.")
    return text


def scale_note(exp: Experiment, section: str, *, data_root: str | None = None, shown: tuple[int, ...] = PAPER_INDICES,
               why: str = "") -> str:
    """One paragraph (Markdown) for a chapter's prose: this zoo's scale against the paper's, and how
    far its chain top-1 / rank-1 at indices ``shown`` fall short of the paper's numbers there (where
    the paper printed them for this data), with ``why`` appended when they do."""
    spec, zoo = exp.zoo.spec, exp.zoo
    first = load_task(spec.dataset, spec.tasks[0], data_root=data_root, seed=spec.seed, **spec.data_kwargs)
    steps = steps_per_network(spec, len(first.y_train))
    paper_dataset, paper_classes = PAPER_DATA.get(section, (section, first.num_classes))
    try:  # the paper profile's training for this section and arch (its epochs and batch)
        paper_spec = spec_from_profile("paper", section, arch=spec.arch, dataset=paper_dataset)
    except ValueError:
        paper_spec = None
    model = ", ".join(f"{k} {v}" for k, v in spec.model_kwargs.items()) or "the default sizes"
    n_tasks = int(zoo.tasks.unique().numel())
    examples = EXAMPLE_NAMES.get(spec.dataset, "images")
    text = (f"**Scale.** This page: {n_tasks} tasks × {spec.runs} runs of {spec.arch} ({model}), "
            f"{steps:,} SGD steps per network on {len(first.y_train):,} training {examples} per task.")
    if paper_spec is not None and (section, spec.arch) in PAPER_ZOOS:
        if section in PAPER_DATA:  # image tasks: the paper's 500 training images per class
            paper_images = PAPER_TRAIN_PER_CLASS * paper_classes
            on = f"{paper_images:,} images per task"
        else:  # the same data as ours (NameData: the official split of every name)
            paper_images, on = len(first.y_train), f"the same {examples}"
        text += (f" The paper: {PAPER_ZOOS[(section, spec.arch)]}, about "
                 f"{steps_per_network(paper_spec, paper_images):,} steps per network on {on}.")
    paper = reported(section, spec.arch)
    paper = paper[paper["feature"] == "chain"]
    if not len(paper):
        return text + " The paper printed no number for these chains, so none is compared here."
    gaps = []
    for metric in ("top1", "rank1"):
        ours = exp.results[(exp.results.feature == "chain") & (exp.results.metric == metric)].set_index("index")["value"]
        theirs = paper[paper.metric == metric]
        for i in shown:
            at = theirs[theirs["index"] == i] if (theirs["index"] == i).any() else theirs[theirs["index"].isna()]
            if len(at) and i in ours.index:
                gaps.append((metric, i, 100 * float(ours[i]), 100 * float(at["value"].iloc[0])))
    if not gaps:
        return text
    worst = max(p - o for _, _, o, p in gaps)
    listing = "; ".join(f"{'top-1' if m == 'top1' else 'rank-1'} at index {i}: {o:.1f} % against {p:.1f} %"
                        for m, i, o, p in gaps)
    other = (f" The paper's numbers are for {DATA_NAMES[paper_dataset]}, not this page's data, so the comparison "
             "is indicative." if spec.dataset != paper_dataset else "")
    if worst <= 2.0:
        return text + f" The chains reach the paper's numbers, none more than 2 points below ({listing}).{other}"
    against = ""
    if why and spec.arch in CONV_ARCHS and paper_spec is not None and (section, spec.arch) in PAPER_ZOOS:
        against = " " + against_paper(spec, paper_spec, steps=(steps, steps_per_network(paper_spec, paper_images)),
                                      images=(len(first.y_train), paper_images))
    return (text + f" The chains fall short of the paper by up to {worst:.1f} points ({listing}).{other} "
            + why + against).rstrip()


def against_paper(spec, paper_spec, *, steps: tuple[int, int], images: tuple[int, int]) -> str:
    """One sentence: how a convolutional zoo differs from the paper's in what the CNN-gap chapter
    found to matter (widths, SGD steps, images per task, runs per task), each said as it is."""
    def compare(name: str, ours: int, theirs: int) -> str:
        if ours == theirs:
            return f"as many {name} ({ours:,})"
        return f"{'fewer' if ours < theirs else 'more'} {name} ({ours:,} against {theirs:,})"

    ours, theirs = (list(s.model_kwargs.get("widths", PLAINNET5_WIDTHS)) for s in (spec, paper_spec))
    label = "–".join
    widths = ("the paper's widths" if ours == theirs else f"{'narrower' if sum(ours) < sum(theirs) else 'wider'} "
              f"networks ({label(map(str, ours))} against {label(map(str, theirs))})")
    return (f"This page's zoo against the paper's: {widths}, {compare('SGD steps per network', *steps)}, "
            f"{compare('training images per task', *images)} and {compare('runs per task', spec.runs, paper_spec.runs)}.")


def stage_table(exp: Experiment) -> str:
    """Wall time of each stage of this run (Markdown); ``cached`` where it was read from disk, with
    the training time and hardware the zoo recorded when it was trained."""
    rows = []
    for stage, value in exp.seconds.items():
        if isinstance(value, str):
            prov = read_provenance(exp.zoo.root) if stage == "zoo" else None
            if prov and "seconds" in prov:
                value += f" (trained in {prov['seconds']:,.1f} s on {prov.get('hardware', prov.get('device', '?'))})"
        else:
            value = f"{value:,.1f} s"
        rows.append((stage, value))
    return _markdown(rows)

