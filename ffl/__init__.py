"""ffl: Function Feature Learning of neural networks (Wang et al.), as a thin library.

Modules mirror the paper: :mod:`ffl.models` (architectures), :mod:`ffl.chain` (chain alignment
rule, §3.2), :mod:`ffl.permute` and :mod:`ffl.invariance` (its symmetry, checked), :mod:`ffl.data`
(tasks), :mod:`ffl.zoo` (trained networks, trained by :mod:`ffl.engine` on :mod:`ffl.batched`
modules), :mod:`ffl.features` (function feature learning, §3.3), :mod:`ffl.protocols` and
:mod:`ffl.metrics` (§4), :mod:`ffl.plots` (figures); ``ffl.compare(a, b)`` compares any two networks
without data (:mod:`ffl.compare`, :mod:`ffl.adapt`). DESIGN.md maps every module.
"""
__version__ = "0.1.0"

# Imported on first use, so that `import ffl` stays light (no torch until a name is asked for).
_LAZY = {"compare": "ffl.compare", "as_model": "ffl.adapt", "save_projection": "ffl.compare",
         "load_projection": "ffl.compare", "Projection": "ffl.features"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ffl' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_LAZY[name])
    return module if name == "compare" else getattr(module, name)  # ffl.compare: the module is callable
