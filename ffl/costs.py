"""What the book costs: every zoo the chapters of a profile train, and the training time each
zoo's cache recorded (``python -m ffl.book zoos``; the CNN-gap chapter's table)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ffl.experiment import factor_settings
from ffl.gap import StudySettings
from ffl.profile_settings import load
from ffl.profiles import chapter_entries
from ffl.zoo import cached_zoo_root, default_cache_dir, read_provenance


def book_zoos(profile: str, *, dataset: str | None = None) -> list[dict[str, Any]]:
    """Every zoo the chapters of ``profile`` train, in chapter order: dicts with ``chapter`` (its
    output), ``zoo`` (a label) and ``spec`` (the :class:`ffl.zoo.ZooSpec` the chapter asks for).
    The same spec may appear under two chapters (one cache: the factors' Baseline and a study zoo).
    Chapters that only read other chapters' zoos (beyond) or train none list nothing."""
    settings, out = load(profile), []
    for entry in chapter_entries(profile, dataset=dataset):
        notebook, params = entry["notebook"], entry["parameters"]
        if notebook in ("tiny_imagenet", "cifar100"):
            arch, data = params.get("arch", "mlp"), params.get("dataset", notebook)
            zoos = {arch: (notebook, arch, data, {})}
        elif notebook == "namedata":
            zoos = {"gru": ("namedata", "gru", "namedata", {})}
        elif notebook == "factors":
            data = params.get("dataset", "cifar100")
            zoos = {name: ("factors", s["arch"], data, s["overrides"])
                    for name, s in factor_settings(settings.section("factors")).items()}
        elif notebook == "cnn_gap":
            study = StudySettings.from_profile(profile)
            zoos = {name: (study.section, study.arch, study.dataset, overrides) for name, overrides in study.zoos.items()}
        else:
            continue
        for label, (section, arch, data, overrides) in zoos.items():
            spec = settings.section(section).spec(arch=arch, dataset=data, **overrides)
            out.append({"chapter": entry["output"], "zoo": label, "spec": spec})
    return out


def zoo_costs(profile: str, cache_dir: str | Path | None = None, *, dataset: str | None = None) -> pd.DataFrame:
    """What the book of ``profile`` costs to train from scratch, as its cached zoos recorded it: one
    row per :func:`book_zoos` entry with ``networks``, ``seconds`` (the training time in the zoo's
    provenance; NaN where it is not cached), ``trained in that run`` (fewer than ``networks`` when
    the zoo was resumed: its seconds are then those of the last run only), ``chunk`` (networks per
    engine batch) and ``shared``
    (the chapter that trained the same zoo first: its seconds are not counted again)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    rows, first = [], {}
    for item in book_zoos(profile, dataset=dataset):
        spec, root = item["spec"], cached_zoo_root(item["spec"], cache)
        record = read_provenance(root) or {}
        seconds = float(record.get("seconds", float("nan")))
        chunk, trained = record.get("batch_networks"), record.get("networks_trained")
        shared = first.setdefault(root.name, f"{item['chapter']}: {item['zoo']}")
        rows.append({"chapter": item["chapter"], "zoo": item["zoo"], "arch": spec.arch, "dataset": spec.dataset,
                     "networks": len(spec.tasks) * spec.runs, "trained in that run": trained,
                     "seconds": seconds, "chunk": chunk,
                     "shared": "" if shared == f"{item['chapter']}: {item['zoo']}" else shared})
    return pd.DataFrame(rows)
