"""ffl: Function Feature Learning of neural networks (Wang et al.), as a thin library.

Modules mirror the paper: :mod:`ffl.models` (architectures), :mod:`ffl.chain` (chain alignment
rule, §3.2), :mod:`ffl.data` (tasks), :mod:`ffl.zoo` (trained networks), :mod:`ffl.features`
(function feature learning, §3.3), :mod:`ffl.protocols` and :mod:`ffl.metrics` (§4),
:mod:`ffl.plots` (figures).
"""
__version__ = "0.1.0"
