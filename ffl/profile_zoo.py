"""A profile's zoo settings (``<section>.zoo`` of ``profiles/<name>.yaml``) read as what trains a zoo
(§4): :func:`spec_from_profile` gives its :class:`ffl.zoo.spec.ZooSpec`, the one road from a
profile to a zoo; :func:`cuda_engine_from_profile` gives the keywords of
:func:`ffl.zoo.train.train_zoo` that its ``zoo.cuda.<arch>`` sets for CUDA (speed, not identity).

Both stay importable as ``ffl.zoo.spec_from_profile`` and ``ffl.zoo.cuda_engine_from_profile``
(:mod:`ffl.zoo` hands them out on first use: this module imports :mod:`ffl.zoo.spec`, so the
package cannot import it while it loads).
"""
from __future__ import annotations

from typing import Any

from ffl import implicit_conv
from ffl.checks import as_int
from ffl.data import DATASETS, num_tasks
from ffl.profiles import CUDA_ENGINE, PROFILE_DIR, load_profile
from ffl.triton_support import BACKENDS
from ffl.zoo.spec import ZooSpec


def spec_from_profile(profile: str, section: str, *, arch: str, dataset: str, seed: int = 0,
                      data_root: str | None = None, download: bool = False, **overrides: Any) -> ZooSpec:
    """The :class:`ZooSpec` that section ``section`` of profile ``profile`` (``profiles/<name>.yaml``)
    asks for: ``zoo.tasks`` (the first n tasks, or every task of a real dataset that has fewer:
    CIFAR-10's 45 in place of CIFAR-100's 50) × ``zoo.runs``, ``zoo.data_kwargs[dataset]`` and the
    training fields under ``zoo.arch[arch]``. ``overrides`` replace fields (e.g. ``tasks=``,
    ``runs=``, ``precision=``). The one road from a profile to a zoo: the notebooks
    (:mod:`ffl.experiment`), ``python -m ffl.zoo`` and ``python -m ffl.bench`` all take it; the
    paper's settings (§4) are the ``paper`` profile."""
    settings = load_profile(profile).get(section)
    if not settings or "zoo" not in settings:
        raise ValueError(f"profile {profile!r} has no zoo settings for {section!r}")
    zoo = settings["zoo"]
    if arch not in zoo["arch"]:
        raise ValueError(f"profile {profile!r} defines no {arch!r} zoo for {section!r}; it has {sorted(zoo['arch'])}")
    n_tasks = zoo["tasks"]
    if dataset in DATASETS and dataset != "synthetic" and isinstance(n_tasks, int):
        n_tasks = min(n_tasks, num_tasks(dataset))
    fields = {
        "arch": arch, "dataset": dataset, "tasks": list(range(n_tasks)), "runs": zoo["runs"],
        "seed": seed, "data_root": data_root, "download": download,
        "data_kwargs": dict(zoo.get("data_kwargs", {}).get(dataset, {})),
        **zoo["arch"][arch], **overrides,
    }
    return ZooSpec.from_dict(fields)


#: keys of a profile's ``<section>.zoo.cuda.<arch>``: how a zoo trains on CUDA, not what it trains
CUDA_ENGINE_KEYS = tuple(CUDA_ENGINE)


def cuda_engine_from_profile(profile: str, section: str, *, arch: str) -> dict[str, Any]:
    """The keywords of :func:`ffl.zoo.train.train_zoo` that ``<section>.zoo.cuda.<arch>`` of profile
    ``profile`` sets for training on CUDA: ``batch_networks`` (networks per engine batch) and the
    convolution / BatchNorm backends (:func:`ffl.batched.conv_backend`, :func:`ffl.batched.bn_backend`), and
    ``conv_tiles``, a tile table of the Triton convolution's measured blockings (a file under
    ``profiles/``, see :func:`ffl.implicit_conv.read_tile_table`; returned as its full path). They
    change speed and rounding, not the zoo's spec (as the GPU model does), so they are not part of
    its identity; the zoo's ``provenance.json`` records what ran. Empty when the profile sets none."""
    settings = (load_profile(profile).get(section) or {}).get("zoo", {}).get("cuda") or {}
    engine = settings.get(arch) or {}
    where = f"profile {profile!r}, {section}.zoo.cuda.{arch}"  # keys and types: checked as the profile loads
    out = dict(engine)
    if "batch_networks" in out:
        out["batch_networks"] = as_int(f"{where}: batch_networks", out["batch_networks"], minimum=1)
    for key in ("conv_backend", "bn_backend"):
        if key in out and out[key] not in BACKENDS:
            raise ValueError(f"{where}: {key} {out[key]!r} is not one of {', '.join(BACKENDS)}")
    if "conv_tiles" in out:
        path = PROFILE_DIR / str(out["conv_tiles"])
        try:
            implicit_conv.read_tile_table(path)
        except ValueError as e:
            raise ValueError(f"{where}: conv_tiles: {e}") from None
        out["conv_tiles"] = str(path)
    return out
