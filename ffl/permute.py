"""Hidden-neuron permutations that leave a network's function unchanged (§3.2's symmetry).

A permutation ``p`` of a hidden layer's neurons is a 1-D index tensor: neuron ``j`` of the permuted
network is neuron ``p[j]`` of the original. :func:`permute_hidden` applies one per hidden layer,
consistently on both sides of the layer:

* MLP: rows of ``layers[k].weight`` and ``layers[k].bias``, columns of ``layers[k+1].weight``.
* ConvNet: output channels of ``convs[k]`` (weight, bias), BatchNorm ``bns[k]`` (γ, β, running
  mean and variance), input channels of ``convs[k+1]`` or the columns of ``fc.weight``.
  ResNet units tie the permutations: unit k ≥ 2 adds its zero-padded input to its output, so
  ``p_k[:n_{k-1}]`` must equal ``p_{k-1}`` and ``p_k[n_{k-1}:]`` may only permute the padded channels
  (checked unless ``check=False``).
* GRU: layer k's gate blocks r, z, n of ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``,
  ``bias_hh_l{k}`` are each permuted identically on the rows; the recurrent ``weight_hh_l{k}`` on
  the columns too; the next layer's ``weight_ih_l{k+1}`` (or ``fc.weight``) on the columns.

:func:`permute_one_side` permutes only the neurons' incoming side — an inconsistent permutation
that changes the function, the negative control of the invariance checks.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ffl.models import MLP, ConvNet, GRUNet


def hidden_sizes(model: nn.Module) -> list[int]:
    """Number of neurons of every permutable hidden layer, input to output."""
    if isinstance(model, MLP):
        return [layer.out_features for layer in model.layers[:-1]]
    if isinstance(model, ConvNet):
        return list(model.widths)
    if isinstance(model, GRUNet):
        return [model.gru.hidden_size] * model.gru.num_layers
    raise TypeError(f"no hidden-permutation rule for {type(model).__name__}")


def random_hidden_permutations(model: nn.Module, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """One uniformly random function-preserving permutation per hidden layer (ResNet: tied)."""
    sizes = hidden_sizes(model)
    perms: list[torch.Tensor] = []
    for k, n in enumerate(sizes):
        if isinstance(model, ConvNet) and model.residual and k > 0:
            m = sizes[k - 1]
            free = m + torch.randperm(n - m, generator=generator)
            perms.append(torch.cat([perms[-1], free]))
        else:
            perms.append(torch.randperm(n, generator=generator))
    return perms


def check_ties(model: nn.Module, perms: Sequence[torch.Tensor]) -> bool:
    """Whether ``perms`` respects the skip connections of ``model`` (always true without skips)."""
    if not (isinstance(model, ConvNet) and model.residual):
        return True
    for k in range(1, len(perms)):
        m = len(perms[k - 1])
        if not (torch.equal(perms[k][:m], perms[k - 1]) and bool((perms[k][m:] >= m).all())):
            return False
    return True


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
    elif isinstance(model, ConvNet):
        for k, p in enumerate(perms):
            rows(model.convs[k].weight, p)
            rows(model.convs[k].bias, p)
            bn = model.bns[k]
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                rows(t, p)
            if not incoming_only[k]:
                cols(model.convs[k + 1].weight if k + 1 < len(model.convs) else model.fc.weight, p)
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


def permute_hidden(model: nn.Module, perms: Sequence[torch.Tensor], *, check: bool = True) -> nn.Module:
    """A copy of ``model`` with hidden layer k's neurons permuted by ``perms[k]`` (function unchanged).

    ``check=False`` allows permutations that break ResNet's skip ties (they change the function).
    """
    perms = _validate(model, perms)
    if check and not check_ties(model, perms):
        raise ValueError("permutations break the residual skip ties (p_k[:n_{k-1}] must equal p_{k-1})")
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


# ----------------------------------------------------------------------------- numerical proof


@torch.no_grad()
def randomize_batchnorm_(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm layer non-trivial γ, β, running mean and variance (in place), as a
    trained network has, so that permutation checks exercise them (fresh BN layers are 1, 0, 0, 1)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            if m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(n, generator=generator))
                m.bias.copy_(0.3 * torch.randn(n, generator=generator))
            m.running_mean.copy_(0.3 * torch.randn(n, generator=generator))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
    return model


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def invariance_check(
    model: nn.Module,
    x: torch.Tensor,
    *,
    permutations: int = 10,
    generator: torch.Generator | None = None,
    explicit_max_dim: int = 2187,
    **chain_kw,
) -> list[dict]:
    """Apply ``permutations`` random function-preserving permutations; one row per (draw, index l).

    Row fields: ``draw``, ``chain`` (l), ``dim`` (d_l), ``max_abs_dW`` (largest change of a raw
    weight of layer l, :func:`ffl.chain.layer_features`), ``rel_dW`` (‖ΔW_l‖/‖W_l‖),
    ``max_abs_dG`` (largest change of an entry of G_l, from the explicit Grams when
    d_l ≤ ``explicit_max_dim``, else the bound ‖ΔG_l‖_F), ``dG_explicit`` (which of the two),
    ``fro_dG`` (‖ΔG_l‖_F without G), ``rel_dG`` (‖ΔG_l‖_F/‖G_l‖_F) and ``max_abs_dout`` (largest
    change of an output on ``x``). ``chain_kw`` go to :func:`ffl.chain.chain_factors`.
    """
    from ffl.chain import chain_factors, chain_gram, gram_inner, layer_features

    model = model.eval()
    y = _out(model, x)
    fa, wa = chain_factors(model, **chain_kw), layer_features(model)
    fa64 = [c.double() for c in fa]
    sq = [gram_inner(c, c).item() for c in fa64]
    norms = [v**0.5 for v in sq]
    grams = {l: chain_gram(c) for l, c in enumerate(fa) if c.shape[0] <= explicit_max_dim}
    rows = []
    for draw in range(permutations):
        other = permute_hidden(model, random_hidden_permutations(model, generator))
        dout = (_out(other, x) - y).abs().max().item()
        fb, wb = chain_factors(other, **chain_kw), layer_features(other)
        for l, (ca, cb) in enumerate(zip(fa, fb)):
            cb64 = cb.double()  # ‖ΔG‖²_F = ‖G_a‖² − 2⟨G_a, G_b⟩ + ‖G_b‖², as in gram_distance
            fro = max(sq[l] - 2 * gram_inner(fa64[l], cb64).item() + gram_inner(cb64, cb64).item(), 0.0) ** 0.5
            explicit = l in grams
            rows.append(dict(
                draw=draw, chain=l + 1, dim=ca.shape[0],
                max_abs_dW=(wa[l] - wb[l]).abs().max().item(),
                rel_dW=((wa[l] - wb[l]).norm() / wa[l].norm()).item(),
                max_abs_dG=(grams[l] - chain_gram(cb)).abs().max().item() if explicit else fro,
                dG_explicit=explicit, fro_dG=fro, rel_dG=fro / norms[l], max_abs_dout=dout,
            ))
    return rows


def broken_permutation_check(
    model: nn.Module, x: torch.Tensor, *, generator: torch.Generator | None = None, **chain_kw
) -> list[dict]:
    """Negative controls: permutations that do *not* preserve the function must change it.

    One row per hidden layer k with only its incoming side permuted (:func:`permute_one_side`,
    a random permutation other than the identity), and for ResNets one row per residual unit k
    whose permutation mixes a skip-fed channel with a zero-padded one. Fields: ``control``,
    ``layer`` (k, 1-based), ``max_abs_dout`` and ``rel_dG`` of chain k+1.
    """
    from ffl.chain import chain_factors, gram_distance, gram_inner

    model = model.eval()
    y, fa = _out(model, x), chain_factors(model, **chain_kw)

    def row(control: str, k: int, other: nn.Module) -> dict:
        ca, cb = fa[k + 1], chain_factors(other, **chain_kw)[k + 1]
        rel = (gram_distance(ca, cb) / gram_inner(ca.double(), ca.double()).sqrt()).item()
        return dict(control=control, layer=k + 1, max_abs_dout=(_out(other, x) - y).abs().max().item(), rel_dG=rel)

    rows = []
    sizes = hidden_sizes(model)
    for k, n in enumerate(sizes):
        p = torch.randperm(n, generator=generator)
        while torch.equal(p, torch.arange(n)):
            p = torch.randperm(n, generator=generator)
        rows.append(row("one side only", k, permute_one_side(model, k, p)))
    if isinstance(model, ConvNet) and model.residual:
        for k in range(1, len(sizes)):
            m = sizes[k - 1]
            if sizes[k] == m:
                continue  # no zero-padded channels to mix with
            perms = random_hidden_permutations(model, generator)
            perms[k] = perms[k].clone()
            perms[k][[0, m]] = perms[k][[m, 0]]
            for j in range(k + 1, len(sizes)):
                perms[j] = torch.cat([perms[j - 1], perms[j][sizes[j - 1]:]])
            rows.append(row("skip tie broken", k, permute_hidden(model, perms, check=False)))
    return rows
