"""A zoo: T tasks × R runs of one architecture, trained, saved and loaded (§4).

The paper trains 100 runs of each network on each of 50 tasks. :func:`train_zoo` trains such a
zoo with the batched engine (:mod:`ffl.engine`), stores it in one directory and loads it back
(:class:`Zoo`). The package holds one idea a module:

* :mod:`ffl.zoo.spec`: :class:`ZooSpec` (what determines a zoo), its identity and hash, each
  network's seeds (:func:`run_seed`, :func:`data_seed`);
* :mod:`ffl.zoo.store`: the zoo on disk (spec, shards + sidecars, manifest), reading it, every
  integrity check and its errors (:class:`ZooCorruptError`, :class:`StaleDataError`,
  :class:`TrainingDivergedError`), finalizing and merging (:func:`merge_zoos`);
* :mod:`ffl.zoo.train`: :func:`train_zoo` (resumable, shardable across ranks), :func:`prepare_zoo`,
  the chunks' inputs and writes;
* ``python -m ffl.zoo train|spec|merge|info`` (``--help``): the command line (:mod:`ffl.zoo.__main__`).

Specs from profiles: :meth:`ffl.profile_settings.Section.spec` (the paper's settings are the
``paper`` profile); by names :func:`ffl.profile_settings.spec_from_profile` and
:func:`ffl.profile_settings.cuda_engine_from_profile`, also importable from here.
Every name listed in DESIGN.md is importable as ``ffl.zoo.<name>``.
"""
import importlib

from ffl.zoo.spec import LATER_FIELDS, NON_IDENTITY_FIELDS, ZooSpec, data_seed, run_seed, spec_diff, spec_sha256
from ffl.zoo.store import (FORMAT, FORMAT_VERSION, Piece, StaleDataError, TrainingDivergedError, Zoo, ZooCorruptError,
                           cached_zoo_root, check_networks, check_task_data, chunks, default_cache_dir,
                           expected_networks, finalize_zoo, merge_zoos, read_provenance, read_record, recorded_task_data,
                           write_piece)
from ffl.zoo.train import (CONV_CHUNK_CAP, ChunkInputs, chunk_inputs, default_batch_networks, kernels_used, prepare_zoo,
                           train_zoo)

# Handed out on first use: ffl.profile_settings imports ffl.zoo.spec (so this package), and importing the
# command line's module here would make `python -m ffl.zoo` find it loaded twice (runpy warns).
_LAZY = {"spec_from_profile": "ffl.profile_settings", "cuda_engine_from_profile": "ffl.profile_settings",
         "CUDA_ENGINE_KEYS": "ffl.profile_settings", "main": "ffl.zoo.__main__", "COMMANDS": "ffl.zoo.__main__"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ffl.zoo' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
