"""§3.2, checked numerically: chain Grams do not move under function-preserving permutations of
hidden neurons, while raw weights do, and permutations that break the function move both.

:func:`invariance_check` and :func:`broken_permutation_check` test one network;
:func:`check_every_architecture` runs both on every architecture of the paper (ReLU and leaky
ReLU, random BatchNorm statistics) and on every chain definition; :func:`chain_costs` measures
what each chain of a full-width network costs with and without forming its Gram. The proof
chapter (``notebooks/alignment_proof_check.py``) is a call to these and a figure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from ffl.chain import chain_factors, chain_gram, gram_distance, gram_inner, layer_features, measure
from ffl.models import CONV_ARCHS, ResNet, build_model, input_shape
from ffl.permute import hidden_sizes, permute_hidden, permute_one_side, random_hidden_permutations

#: the networks of the chapter: every architecture, with ReLU and leaky ReLU where it has a choice
VARIANTS: tuple[tuple[str, str], ...] = (
    *((a, act) for a in ("mlp", "cnn", "plainnet6", "resnet5") for act in ("relu", "leaky_relu")), ("gru", "relu"))
NAMES = {"mlp": "MLP-4", "cnn": "PlainNet-5", "plainnet6": "PlainNet-6", "resnet5": "ResNet-5", "gru": "GRU-2"}



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
    a random permutation other than the identity), and for ResNets one row per block k whose
    projection shortcut keeps its old order while everything else is permuted. Fields:
    ``control``, ``layer`` (k, 1-based), ``max_abs_dout`` and ``rel_dG`` of chain k+1 (for the
    shortcut control, of chain k: the block's own layer matrix is where its shortcut enters).
    """
    model = model.eval()
    y, fa = _out(model, x), chain_factors(model, **chain_kw)

    def row(control: str, k: int, other: nn.Module, chain: int) -> dict:
        ca, cb = fa[chain], chain_factors(other, **chain_kw)[chain]
        rel = (gram_distance(ca, cb) / gram_inner(ca.double(), ca.double()).sqrt()).item()
        return dict(control=control, layer=k + 1, max_abs_dout=(_out(other, x) - y).abs().max().item(), rel_dG=rel)

    rows = []
    sizes = hidden_sizes(model)
    for k, n in enumerate(sizes):
        p = torch.randperm(n, generator=generator)
        while torch.equal(p, torch.arange(n)):
            p = torch.randperm(n, generator=generator)
        rows.append(row("one side only", k, permute_one_side(model, k, p), k + 1))
    if isinstance(model, ResNet):
        for k in range(1, len(sizes)):
            other = permute_hidden(model, random_hidden_permutations(model, generator))
            with torch.no_grad():  # block k's shortcut left as it was: it no longer lines up
                other.skips[k - 1].load_state_dict(model.skips[k - 1].state_dict())
                other.skip_bns[k - 1].load_state_dict(model.skip_bns[k - 1].state_dict())
            rows.append(row("shortcut not permuted", k, other, k))
    return rows


@dataclass
class InvarianceReport:
    """What :func:`check_every_architecture` found: ``rows`` (one per network, draw and chain index,
    see :func:`invariance_check`), ``table`` (their largest values per network and chain),
    ``controls`` (:func:`broken_permutation_check` per network) and ``options`` (the other chain
    definitions: largest relative Gram change and smallest relative weight change per network)."""

    rows: pd.DataFrame
    table: pd.DataFrame
    controls: pd.DataFrame
    options: pd.DataFrame


def _label(arch: str, activation: str) -> str:
    return NAMES[arch] + (" (leaky)" if activation == "leaky_relu" else "")


def _chain_options(arch: str, gru_lags: int) -> list[tuple[str, dict[str, Any]]]:
    """The chain definitions other than the default one that apply to ``arch``."""
    if arch == "gru":
        return [("chain normalization", {"normalize": True, "gru_lags": gru_lags}),
                ("official feature (no lags)", {"gru_lags": 0})]
    options: list[tuple[str, dict[str, Any]]] = [("chain normalization", {"normalize": True})]
    if arch in CONV_ARCHS:
        options.append(("BatchNorm not folded (official)", {"fold_bn": False}))
    if arch == "resnet5":
        options.append(("3×3 kernels only, not folded (official)", {"fold_bn": False, "skips": False}))
    return options


def check_every_architecture(settings: dict[str, Any], *, seed: int = 0, device: str = "cpu") -> InvarianceReport:
    """§3.2 for every network of :data:`VARIANTS`: built with ``settings["models"][arch]`` and
    random BatchNorm statistics, checked under ``settings["permutations"]`` random permutations
    (``settings["option_permutations"]`` for the other chain definitions) on ``settings["batch"]``
    random inputs; ``settings`` is the ``alignment_proof_check`` section of a profile. One generator
    seeded by ``seed`` draws everything in a fixed order, so a report is reproducible."""
    gen = torch.Generator().manual_seed(seed)

    def network(arch: str, activation: str) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(seed)
        net = build_model(arch, 2, activation=activation, **settings["models"][arch])
        net = randomize_batchnorm_(net, gen).eval().to(device)
        return net, torch.randn(settings["batch"], *input_shape(arch), generator=gen).to(device)

    rows, controls, options = [], [], []
    for arch, act in VARIANTS:
        net, x = network(arch, act)
        chain_kw = {"gru_lags": settings["gru_lags"]} if arch == "gru" else {}
        rows += [{"model": _label(arch, act), **r} for r in invariance_check(
            net, x, permutations=settings["permutations"], generator=gen,
            explicit_max_dim=settings["explicit_max_dim"], **chain_kw)]
        controls += [{"model": _label(arch, act), **r} for r in broken_permutation_check(net, x, generator=gen, **chain_kw)]
    for arch, act in VARIANTS:
        net, x = network(arch, act)
        for option, kw in _chain_options(arch, settings["gru_lags"]):
            r = pd.DataFrame(invariance_check(net, x, permutations=settings["option_permutations"], generator=gen,
                                              explicit_max_dim=settings["explicit_max_dim"], **kw))
            options.append({"model": _label(arch, act), "chain definition": option, "chains": int(r["chain"].max()),
                            "max_rel_dG": r["rel_dG"].max(), "min_rel_dW": r.groupby("chain")["rel_dW"].max().min()})
    rows = pd.DataFrame(rows)
    table = rows.groupby(["model", "chain"], sort=False).agg(
        dim=("dim", "first"), max_abs_dW=("max_abs_dW", "max"), max_rel_dW=("rel_dW", "max"),
        max_abs_dG=("max_abs_dG", "max"), G_explicit=("dG_explicit", "first"), max_rel_dG=("rel_dG", "max"),
        max_abs_dout=("max_abs_dout", "max"))
    return InvarianceReport(rows, table, pd.DataFrame(controls), pd.DataFrame(options))


def chain_costs(arch: str, model_kwargs: dict[str, Any], *, explicit_max_dim: int, seed: int = 0,
                device: str = "cpu") -> tuple[pd.DataFrame, float]:
    """What every chain of two random networks of ``arch`` costs: per chain index its dimension,
    neurons, factor and explicit Gram sizes, and the time and measured peak memory
    (:func:`ffl.chain.measure`) of ⟨G_a, G_b⟩ from the factors, and by forming both Grams where
    d_l ≤ ``explicit_max_dim`` (the two must agree). Returns the table (index ``chain``) and the
    seconds to compute all chain factors of one network."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net_a, net_b = (randomize_batchnorm_(build_model(arch, 2, **model_kwargs), gen).eval().to(device) for _ in "ab")
    fa = measure(lambda: chain_factors(net_a), device=device)
    fb = chain_factors(net_b)
    MiB = 2**20
    rows = []
    for l, (ca, cb) in enumerate(zip(fa.result, fb), 1):
        d = ca.shape[0]
        implicit = measure(lambda: gram_inner(ca, cb).item(), device=device)
        row = {
            "chain": l, "dim d_l": d, "neurons n_l": ca.shape[1],
            "factor C_l [MiB]": ca.numel() * ca.element_size() / MiB,
            "explicit G_l [MiB]": d * d * ca.element_size() / MiB,
            "implicit time [s]": implicit.seconds,
            "implicit peak [MiB]": None if implicit.peak_bytes is None else implicit.peak_bytes / MiB,
            "explicit time [s]": None, "explicit peak [MiB]": None,
        }
        if d <= explicit_max_dim:
            explicit = measure(lambda: ((ca @ ca.T) * (cb @ cb.T)).sum().item(), device=device)
            if abs(explicit.result - implicit.result) > 1e-3 * abs(implicit.result):
                raise RuntimeError(f"chain {l}: explicit {explicit.result} and implicit {implicit.result} disagree")
            row["explicit time [s]"] = explicit.seconds
            row["explicit peak [MiB]"] = None if explicit.peak_bytes is None else explicit.peak_bytes / MiB
        rows.append(row)
    return pd.DataFrame(rows).set_index("chain"), fa.seconds
