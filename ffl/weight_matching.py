"""Weight matching, the Git Re-Basin baseline (Ainsworth, Hayase & Srinivasa, ICLR 2023, §3.2).

Where FFL's chain Grams (§3.2) are invariant to hidden permutations by construction, weight matching
undoes them: it looks for the permutations π of network b's hidden layers that bring its weights
closest to a's, max_π Σ_l ⟨W_l^a, P_l W_l^b P_{l-1}ᵀ⟩ (equivalently min ‖W^a − π(W^b)‖²), and then
compares the aligned weights directly. The problem couples neighbouring layers, so it is solved by
coordinate descent: holding every other permutation fixed, the best P_l is a linear assignment
problem over the similarity of a's and b's neurons, summed over every weight the layer's
permutation acts on (its incoming weights and bias, its BatchNorm's γ and β, the next layer's
columns). Layers are visited in a random order per sweep (seeded) until a sweep improves nothing.

Networks: MLPs and PlainNet-style conv stacks (``ffl.models.MLP``/``ConvNet`` or any network
:func:`ffl.adapt.as_model` maps onto them). The permutations are applied by
:func:`ffl.permute.permute_hidden`, which moves BatchNorm's running statistics with their channel.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ffl.adapt import as_model
from ffl.models import MLP, ConvNet
from ffl.permute import hidden_sizes, permute_hidden

#: for each hidden layer: the (state_dict key, axis) pairs its permutation acts on
PermutationSpec = list[list[tuple[str, int]]]


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """Where each hidden layer's permutation acts (parameters only: running statistics are no
    weights to match, and :func:`ffl.permute.permute_hidden` carries them along)."""
    keys = set(dict(model.named_parameters()))
    if isinstance(model, MLP):
        n = len(model.layers)
        return [[(f"layers.{k}.weight", 0), (f"layers.{k}.bias", 0), (f"layers.{k + 1}.weight", 1)]
                for k in range(n - 1)]
    if isinstance(model, ConvNet):
        n = len(model.convs)
        spec = []
        for k in range(n):
            own = [f"convs.{k}.weight", f"convs.{k}.bias", f"bns.{k}.weight", f"bns.{k}.bias"]
            nxt = f"convs.{k + 1}.weight" if k + 1 < n else "fc.weight"
            spec.append([(key, 0) for key in own if key in keys] + [(nxt, 1)])
        return spec
    raise TypeError(f"weight matching is implemented for MLPs and PlainNet conv stacks, not {type(model).__name__}")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def weight_cosines(a: nn.Module, b: nn.Module) -> tuple[dict[str, float], float]:
    """Cosine of the flattened parameters of every module (a layer; a BatchNorm is its own), and
    of all parameters together, between two networks of one structure (float64)."""
    pa = {k: v.detach().double().reshape(-1) for k, v in a.named_parameters()}
    pb = {k: v.detach().double().reshape(-1) for k, v in b.named_parameters()}
    per: dict[str, list[str]] = {}
    for key in pa:
        per.setdefault(key.rpartition(".")[0], []).append(key)
    layers = {m: _cosine(torch.cat([pa[k] for k in ks]), torch.cat([pb[k] for k in ks])) for m, ks in per.items()}
    return layers, _cosine(torch.cat(list(pa.values())), torch.cat(list(pb.values())))


@dataclass
class Matching:
    """What :func:`weight_matching` returns. ``perms[l]``: neuron j of the aligned b is neuron
    ``perms[l][j]`` of b (``aligned = permute_hidden(b, perms)``, the same function as b);
    ``layer_cosine``/``cosine``: the aligned weights' cosines with a's (per module, overall);
    ``unmatched_*``: the same before matching; ``sweeps``: coordinate-descent sweeps taken."""

    perms: list[torch.Tensor]
    aligned: nn.Module
    layer_cosine: dict[str, float]
    cosine: float
    unmatched_layer_cosine: dict[str, float]
    unmatched_cosine: float
    sweeps: int


def match_permutations(a: nn.Module, b: nn.Module, *, seed: int = 0, max_sweeps: int = 100,
                       ) -> tuple[list[torch.Tensor], int]:
    """The coordinate descent of Ainsworth et al. (2023, Alg. 1) on two :mod:`ffl.models` networks of
    one structure: the permutations of b's hidden layers and the number of sweeps."""
    spec, sizes = permutation_spec(a), hidden_sizes(a)
    if sizes != hidden_sizes(b) or spec != permutation_spec(b):
        raise ValueError(f"weight matching needs two networks of one structure; hidden sizes {sizes} "
                         f"and {hidden_sizes(b)}")
    wa = {k: v.detach().double() for k, v in a.state_dict().items()}
    wb = {k: v.detach().double() for k, v in b.state_dict().items()}
    acting = {}  # key -> {axis: layer whose permutation acts on it}
    for layer, entries in enumerate(spec):
        for key, axis in entries:
            acting.setdefault(key, {})[axis] = layer
    perms = [torch.arange(n) for n in sizes]
    fixed: dict[int, torch.Tensor] = {}
    rng = np.random.default_rng(seed)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        improved = False
        for l in rng.permutation(len(spec)):
            n = sizes[l]

            def others(key: str) -> torch.Tensor:  # b's weight with every permutation but layer l's applied
                w = wb[key]
                for axis, layer in acting[key].items():
                    if layer != l:
                        w = w.index_select(axis, perms[layer])
                return w

            def term(key: str, axis: int) -> torch.Tensor:
                return wa[key].movedim(axis, 0).reshape(n, -1) @ others(key).movedim(axis, 0).reshape(n, -1).T

            # sim[i, j]: a's neuron i against b's neuron j, over every weight layer l's permutation moves;
            # a weight no other permutation acts on (an MLP's first layer) gives the same term every sweep
            zero = torch.zeros(n, n, dtype=torch.float64)
            if l not in fixed:
                fixed[l] = sum((term(k, ax) for k, ax in spec[l] if len(acting[k]) == 1), zero)
            sim = (fixed[l] + sum((term(k, ax) for k, ax in spec[l] if len(acting[k]) > 1), zero)).numpy()
            _, col = linear_sum_assignment(sim, maximize=True)
            old, new = sim[np.arange(n), perms[l].numpy()].sum(), sim[np.arange(n), col].sum()
            improved |= bool(new > old + 1e-12 * max(1.0, abs(old)))
            perms[l] = torch.from_numpy(col).long()
        if not improved:
            break
    return perms, sweeps


def weight_matching(a: nn.Module | Mapping[str, torch.Tensor], b: nn.Module | Mapping[str, torch.Tensor], *,
                    seed: int = 0, max_sweeps: int = 100, like: nn.Module | None = None) -> Matching:
    """Align b's hidden neurons to a's by weight matching and compare the aligned weights (cosine of
    the flattened parameters, per layer and overall). ``a``, ``b``: modules or ``state_dict``s of
    MLPs or PlainNet-style conv stacks (see :mod:`ffl.adapt`; ``like`` gives a state_dict's structure)."""
    ma, mb = as_model(a, like=like), as_model(b, like=like)
    perms, sweeps = match_permutations(ma, mb, seed=seed, max_sweeps=max_sweeps)
    aligned = permute_hidden(mb, perms)
    layers, overall = weight_cosines(ma, aligned)
    raw_layers, raw = weight_cosines(ma, mb)
    return Matching(perms, aligned, layers, overall, raw_layers, raw, sweeps)
