"""Hidden-neuron permutations that leave a network's function unchanged (§3.2's symmetry).

A permutation ``p`` of a hidden layer's neurons is a 1-D index tensor: neuron ``j`` of the permuted
network is neuron ``p[j]`` of the original. :func:`permute_hidden` applies one per hidden layer,
consistently on both sides of the layer:

* MLP: rows of ``layers[k].weight`` and ``layers[k].bias``, columns of ``layers[k+1].weight``.
* ConvNet: output channels of ``convs[k]`` (weight, bias), BatchNorm ``bns[k]`` (γ, β, running
  mean and variance), input channels of ``convs[k+1]`` or the columns of ``fc.weight``.
* ResNet: as ConvNet, and for block k ≥ 1 also the output channels of its projection shortcut
  ``skips[k-1]`` and of ``skip_bns[k-1]``, and the input channels of the next block's projection.
  The projections carry weights of their own, so the layers' permutations are independent (no
  ties, unlike identity skips).
* GRU: layer k's gate blocks r, z, n of ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
  ``bias_hh_l{k}`` are each permuted identically on the rows; the recurrent ``weight_hh_l{k}`` on
  the columns too; the next layer's ``weight_ih_l{k+1}`` (or ``fc.weight``) on the columns.

:func:`permute_one_side` permutes only the neurons' incoming side — an inconsistent permutation
that changes the function, the negative control of the invariance checks (:mod:`ffl.invariance`).
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ffl.models import MLP, ConvNet, GRUNet, ResNet


def hidden_sizes(model: nn.Module) -> list[int]:
    """Number of neurons of every permutable hidden layer, input to output."""
    if isinstance(model, MLP):
        return [layer.out_features for layer in model.layers[:-1]]
    if isinstance(model, (ConvNet, ResNet)):
        return list(model.widths)
    if isinstance(model, GRUNet):
        return [model.gru.hidden_size] * model.gru.num_layers
    raise TypeError(f"no hidden-permutation rule for {type(model).__name__}")


def random_hidden_permutations(model: nn.Module, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """One uniformly random function-preserving permutation per hidden layer."""
    return [torch.randperm(n, generator=generator) for n in hidden_sizes(model)]


def _gate_index(p: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([g * n + p for g in range(3)])


@torch.no_grad()
def _permute_in_place(model: nn.Module, perms: Sequence[torch.Tensor], incoming_only: Sequence[bool]) -> None:
    def rows(t: torch.Tensor | None, idx: torch.Tensor) -> None:
        if t is not None:
            t.copy_(t[idx])

    def cols(t: torch.Tensor, idx: torch.Tensor) -> None:
        t.copy_(t[:, idx])

    if isinstance(model, MLP):
        for k, p in enumerate(perms):
            rows(model.layers[k].weight, p)
            rows(model.layers[k].bias, p)
            if not incoming_only[k]:
                cols(model.layers[k + 1].weight, p)
    elif isinstance(model, (ConvNet, ResNet)):
        shortcut = isinstance(model, ResNet)
        for k, p in enumerate(perms):
            units = [(model.convs[k], model.bns[k])]
            if shortcut and k > 0:
                units.append((model.skips[k - 1], model.skip_bns[k - 1]))
            for conv, bn in units:
                rows(conv.weight, p)
                rows(conv.bias, p)
                for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                    rows(t, p)
            if not incoming_only[k]:
                last = k + 1 == len(model.convs)
                cols(model.fc.weight if last else model.convs[k + 1].weight, p)
                if shortcut and not last:
                    cols(model.skips[k].weight, p)
    elif isinstance(model, GRUNet):
        gru, n = model.gru, model.gru.hidden_size
        for k, p in enumerate(perms):
            g = _gate_index(p, n)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                rows(getattr(gru, f"{name}_l{k}", None), g)
            if not incoming_only[k]:
                cols(getattr(gru, f"weight_hh_l{k}"), p)
                nxt = getattr(gru, f"weight_ih_l{k + 1}") if k + 1 < gru.num_layers else model.fc.weight
                cols(nxt, p)
        gru.flatten_parameters()  # a deep copy on CUDA loses cuDNN's single weight buffer
    else:
        raise TypeError(f"no hidden-permutation rule for {type(model).__name__}")


def _validate(model: nn.Module, perms: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    sizes = hidden_sizes(model)
    if len(perms) != len(sizes):
        raise ValueError(f"{type(model).__name__} has {len(sizes)} hidden layers, got {len(perms)} permutations")
    out = []
    for k, (p, n) in enumerate(zip(perms, sizes)):
        p = torch.as_tensor(p, dtype=torch.long)
        if p.shape != (n,) or not torch.equal(p.sort().values, torch.arange(n)):
            raise ValueError(f"permutation {k} is not a permutation of {n} neurons")
        out.append(p)
    return out


def permute_hidden(model: nn.Module, perms: Sequence[torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with hidden layer k's neurons permuted by ``perms[k]`` (function unchanged)."""
    perms = _validate(model, perms)
    out = copy.deepcopy(model)
    _permute_in_place(out, perms, [False] * len(perms))
    return out


def permute_one_side(model: nn.Module, layer: int, perm: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with only the incoming side of hidden layer ``layer`` permuted.

    The next layer still reads the neurons in their old order, so the function changes (for any
    ``perm`` other than the identity, generically): the negative control of the invariance checks.
    """
    sizes = hidden_sizes(model)
    perms = [torch.arange(n) for n in sizes]
    perms[layer] = torch.as_tensor(perm, dtype=torch.long)
    perms = _validate(model, perms)
    out = copy.deepcopy(model)
    _permute_in_place(out, perms, [k == layer for k in range(len(perms))])
    return out
