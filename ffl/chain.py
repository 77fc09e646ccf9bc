"""Chain alignment rule (§3.2, eq. 8).

For layer matrices W_1 … W_L (rows = a layer's inputs, columns = its neurons) the chain factor is
C_l = W_1 W_2 … W_l and the chain Gram is G_l = C_l C_lᵀ. A permutation P of the neurons of hidden
layer k maps W_k → W_k P and W_{k+1} → Pᵀ W_{k+1}; since P Pᵀ = I every C_l with l ≠ k is unchanged,
and C_k → C_k P leaves G_k = C_k P Pᵀ C_kᵀ unchanged. So every G_l is invariant to every hidden
permutation, while the raw W_l are not.
"""
from __future__ import annotations

import torch
from torch import nn

from ffl.models import MLP


def layer_matrices(model: nn.Module) -> list[torch.Tensor]:
    """Layer matrices W_l (rows = inputs, columns = neurons), input to output, classifier included."""
    if isinstance(model, MLP):
        return [layer.weight.detach().T for layer in model.layers]
    raise TypeError(f"chain alignment is not defined for {type(model).__name__}")


def _normalize_columns(w: torch.Tensor) -> torch.Tensor:
    # Each neuron's incoming weights (a row of Wᵀ) scaled to unit L2 norm.
    return w / w.norm(dim=0, keepdim=True).clamp_min(1e-12)


def chain_factors(model: nn.Module, *, normalize: bool = False) -> list[torch.Tensor]:
    """Chain factors C_l = W_1 … W_l, l = 1 … L.

    ``normalize`` is the official code's "chain normalization": for chains of length ≥ 2 every
    Wᵀ is row-L2-normalized (each neuron's incoming weights scaled to unit norm) before the product.
    Scaling a neuron commutes with permuting it, so the Grams stay invariant.
    """
    ws = layer_matrices(model)
    factors = [ws[0]]
    c = _normalize_columns(ws[0]) if normalize else ws[0]
    for w in ws[1:]:
        c = c @ (_normalize_columns(w) if normalize else w)
        factors.append(c)
    return factors


def chain_gram(c: torch.Tensor) -> torch.Tensor:
    """The chain Gram G = C Cᵀ (paper eq. 8)."""
    return c @ c.T


def gram_inner(ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """⟨Ca Caᵀ, Cb Cbᵀ⟩_F = ‖Caᵀ Cb‖²_F, computed without forming either Gram.

    Leading batch dimensions broadcast: ``ca`` (..., d, n_a) and ``cb`` (..., d, n_b).
    """
    return (ca.transpose(-1, -2) @ cb).square().sum(dim=(-1, -2))


def layer_features(model: nn.Module) -> list[torch.Tensor]:
    """Raw per-layer weights, flattened: the paper's *unaligned* baseline."""
    return [w.reshape(-1) for w in layer_matrices(model)]


def num_chains(model: nn.Module) -> int:
    """Number of chain indices (= number of layer matrices)."""
    return len(layer_matrices(model))
