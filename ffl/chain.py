r"""Chain alignment rule (§3.2, eq. 8), for every architecture of the paper.

**MLP.** For layer matrices W_1 … W_L (rows = a layer's inputs, columns = its neurons) the chain
factor is C_l = W_1 W_2 … W_l and the chain Gram is G_l = C_l C_lᵀ. A permutation P of the neurons
of hidden layer k maps W_k → W_k P and W_{k+1} → Pᵀ W_{k+1}; since P Pᵀ = I every C_l with l ≠ k is
unchanged, and C_k → C_k P leaves G_k = C_k P Pᵀ C_kᵀ unchanged. So every G_l is invariant to every
hidden permutation, while the raw W_l are not.

**CNN (PlainNet, "a patch-based MLP").** Conv layer l with kernel K_l ∈ R^{n_l × n_{l-1} × k × k}
has the layer matrix M_l ∈ R^{(n_{l-1} k²) × n_l}, M_l[(i, p), j] = K_l[j, i, p] (rows = input
channel i and kernel position p = (ky, kx), columns = output channels). Layer 1 acts on RGB patches:
C_1 = M_1 ∈ R^{27 × 32} for 3×3 kernels. Layer l ≥ 2 sees a k×k patch of layer-(l-1) neurons, each
of which sees its own patch of the input; ignoring the overlap of neighbouring receptive fields
(and pooling/stride), the input seen by layer l is the tree of patches, of dimension
d_l = n_0 k² · (k²)^{l-1} (27, 243, 2187, 19683 for chains 1–4), and

    C_l[(p_l, r), j] = Σ_i C_{l-1}[r, i] M_l[(i, p_l), j],   i.e.  C_l = (I_{k²} ⊗ C_{l-1}) M̂_l

with M̂_l the rows of M_l reordered to (p, i). Rows of C_l are indexed by (p_l, p_{l-1}, …, p_2,
c, p_1): the kernel position at every level, then the RGB channel and position of the first layer.
Global average pooling does not mix channels, so the classifier continues the chain as in an MLP:
C_{L+1} = C_L W_fcᵀ. A permutation P of layer l's channels permutes the columns of M_l and, through
the input channels of layer l+1, the rows of M̂_{l+1} by I_{k²} ⊗ Pᵀ; (I ⊗ C_l P)(I ⊗ Pᵀ) = I ⊗ C_l,
so the proof of the MLP case carries over unchanged.

**BatchNorm** (``fold_bn=True``, default). In eval mode BN_l(y) = γ (y − μ)/√(σ² + ε) + β per
channel; the chain uses the folded kernel K_l[j] · γ_j/√(σ_j² + ε) (running statistics; the shift
is a bias and, like all biases, not part of the chain). γ, β, μ, σ² are permuted together with
their channel, so the fold is a per-neuron scale S_l: M_l → M_l S_l, and M_l S_l → M_l P · Pᵀ S_l P
= (M_l S_l) P — the folded matrices transform exactly like unfolded ones, and the Grams stay
invariant. ``fold_bn=False`` uses the raw kernels (also invariant; then the optional chain
normalization below is the paper's way to remove per-neuron scales).

**ResNet** (ResNet-5 as the official code builds it). Block l computes
act(BN_l conv3×3_l(h) + BN'_l conv1×1'_l(h)), both convolutions of stride 2. The 1×1 projection
with padding 0 reads exactly the input pixel that the centre tap of the 3×3 kernel (padding 1)
reads, so the block's linear part is one 3×3 convolution whose kernel is K_l with the projection
S_l added at the centre: its layer matrix is M_l + E_l, E_l[(i, centre), j] = S_l[j, i] (each
term scaled by its own BatchNorm when folded; with folded BN this is exactly the block's linear
map). A permutation of the block's output channels permutes the outputs of the 3×3 conv, its BN,
the projection and its BN alike, and the next block's (or the classifier's) inputs, so E_l
transforms like M_l: (P_{l-1}ᵀ ⊗ I)(M_l + E_l) P_l, and every chain is invariant, with no ties
between layers (the projection has weights of its own). ``skips=False`` drops E_l: the 3×3
kernels alone, as the official code takes them (it skips every kernel that is not 3×3); they
are invariant by the PlainNet argument, since a permutation acts on them alone in the same way.
Stride, like pooling, is outside the patch-space chain.

**GRU.** Layer k has gate weights W_ig^{(k)} (input) and W_hg^{(k)} (recurrent), g ∈ {r, z, n},
stacked as torch does. A hidden permutation P_k permutes the rows of every gate block identically,
the columns of W_h·^{(k)} (recurrent: both sides) and of W_i·^{(k+1)} (next layer's input). The
official feature is the Gram of the first layer's input weights with the gates stacked as columns:
C_1 = W_ih^{(1)ᵀ} ∈ R^{58 × 3H}, G_1 = Σ_g W_igᵀ W_ig (``gru_lags=0``). The full chain follows the
input through both layers and through time. Linearize the hidden state's path at z = 0, r = 1
(h_t = W_in x_t + W_hn h_{t-1}: the candidate path) and define the impulse responses of layer k's
state to x_{t-s}, s = 0 … τ (``gru_lags`` = τ):

    R^{(0)}[0] = I,  R^{(0)}[s>0] = 0,   R^{(k)}[s] = W_in^{(k)} R^{(k-1)}[s] + W_hn^{(k)} R^{(k)}[s-1]

and the responses of layer k's gate pre-activations, every gate explicit:
A_g^{(k)}[s] = W_ig^{(k)} R^{(k-1)}[s] + W_hg^{(k)} R^{(k)}[s-1]. Chain k's factor has rows
(s, input character) and columns (g, neuron): C_k[(s, c), (g, j)] = A_g^{(k)}[s][j, c], of
dimension (τ+1)·58 × 3H; the classifier's chain is C_{L+1}[(s, c), m] = (W_fc R^{(L)}[s])[m, c].
Under the permutations R^{(k)} → P_kᵀ R^{(k)} and A_g^{(k)} → P_kᵀ A_g^{(k)} for every g, so C_k →
C_k (I_3 ⊗ P_k): the Grams are invariant. With τ = 0 chain 1 is the official feature; with τ ≥ 1
(default 1) the recurrent weights of both layers enter, and the s = 0 block of G_1 is still the
official feature.

**Chain normalization** (``normalize=True``, the official code's option): for chains of length ≥ 2
every row of every layer matrix — one input's outgoing weights to all neurons of the layer — is
scaled to unit L2 norm before the product, as the official code does for MLPs
(``F.normalize(Wᵀ, dim=-1)`` on PyTorch's (out, in) weights). For a conv the rows are (input
channel, kernel position) pairs (with the skip for ResNet); for a GRU the input and recurrent
matrices and the classifier are normalized per input likewise. A row's norm is a sum over the
layer's neurons, which a permutation of those neurons does not change, and permuting the inputs
only reorders rows, so the Grams stay invariant.

**Without G.** The CNN chain-4 Gram has 19683² ≈ 3.9e8 entries (1.5 GB in float32);
:func:`gram_inner` gives ⟨G_a, G_b⟩_F = ‖C_aᵀ C_b‖²_F from the factors (n_a × n_b numbers), and
:func:`gram_distance` gives ‖G_a − G_b‖_F the same way.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ffl.models import MLP, ConvNet, GRUNet, ResNet

_ACTS = (nn.ReLU, nn.LeakyReLU)
_ALLOWED: dict[type, tuple[type, ...]] = {
    MLP: (nn.ModuleList, nn.Linear, *_ACTS),
    ConvNet: (nn.ModuleList, nn.Conv2d, nn.BatchNorm2d, nn.Linear, *_ACTS),
    ResNet: (nn.ModuleList, nn.Conv2d, nn.BatchNorm2d, nn.Linear, *_ACTS),
    GRUNet: (nn.GRU, nn.Linear),
}


def check_supported(model: nn.Module) -> None:
    """Raise ``TypeError`` naming the first layer that chain alignment cannot handle."""
    for cls, allowed in _ALLOWED.items():
        if isinstance(model, cls):
            break
    else:
        raise TypeError(
            f"chain alignment is not defined for {type(model).__name__}; "
            f"supported models: {', '.join(c.__name__ for c in _ALLOWED)}"
        )
    for name, m in model.named_modules():
        if not name:
            continue
        if not isinstance(m, allowed):
            raise TypeError(f"chain alignment does not support layer {name!r} ({type(m).__name__})")
        if isinstance(m, nn.Conv2d) and (
            (m.stride != (1, 1) and not isinstance(model, ResNet))
            or m.dilation != (1, 1) or m.groups != 1 or m.kernel_size[0] != m.kernel_size[1]
        ):
            raise TypeError(f"chain alignment supports square dense convolutions only (stride 1 outside "
                            f"ResNet's blocks); layer {name!r}: {m}")
        if isinstance(m, nn.BatchNorm2d) and m.running_var is None:
            raise TypeError(f"layer {name!r} ({type(m).__name__}) has no running statistics to fold")
        if isinstance(m, nn.GRU) and (m.bidirectional or m.proj_size):
            raise TypeError(f"chain alignment supports unidirectional GRUs without projection; layer {name!r}: {m}")


# ----------------------------------------------------------------------------- layer matrices


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel eval-mode BatchNorm scale γ/√(σ² + ε) (running statistics)."""
    scale = (bn.running_var.detach() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    return scale


def _conv_matrix(conv: nn.Conv2d, bn: nn.BatchNorm2d, fold_bn: bool, size: int | None = None) -> torch.Tensor:
    w = conv.weight.detach()
    if fold_bn:
        w = w * bn_scale(bn).to(w.dtype)[:, None, None, None]
    if size is not None and w.shape[-1] < size:  # a 1×1 projection as the centre of a size×size kernel
        pad = (size - w.shape[-1]) // 2
        w = torch.nn.functional.pad(w, (pad, pad, pad, pad))
    return w.reshape(w.shape[0], -1).T  # (c_in k², c_out), rows (c_in, ky, kx)


def _unit_columns(m: torch.Tensor) -> torch.Tensor:
    # Each neuron's incoming weights (a column: one output channel's kernel) scaled to unit L2 norm.
    return m / m.norm(dim=0, keepdim=True).clamp_min(1e-12)


def _convnet_steps(model: ConvNet | ResNet, fold_bn: bool, skips: bool = True,
                   unit_channels: bool = False) -> list[tuple[str, torch.Tensor]]:
    steps: list[tuple[str, torch.Tensor]] = []
    for l, (conv, bn) in enumerate(zip(model.convs, model.bns)):
        m = _conv_matrix(conv, bn, fold_bn)
        if skips and isinstance(model, ResNet) and l > 0:
            m = m + _conv_matrix(model.skips[l - 1], model.skip_bns[l - 1], fold_bn, conv.kernel_size[0])
        steps.append(("conv", _unit_columns(m) if unit_channels else m))
    steps.append(("linear", model.fc.weight.detach().T))
    return steps


def layer_matrices(model: nn.Module, *, fold_bn: bool = True, skips: bool = True) -> list[torch.Tensor]:
    """Layer matrices (rows = inputs, columns = neurons), input to output, classifier included.

    MLP: W_lᵀ. ConvNet/ResNet: M_l ∈ R^{(c_in k²) × c_out} (rows (c_in, ky, kx); BN folded when
    ``fold_bn``; ResNet blocks include their projection E_l unless ``skips=False``), then W_fcᵀ. GRU: the input weights of each
    layer W_ih^{(k)ᵀ} (gates [r|z|n] as column blocks), then W_fcᵀ (the chain also uses the
    recurrent weights, see the module docstring). Unsupported layers → ``TypeError``.
    """
    check_supported(model)
    if isinstance(model, MLP):
        return [layer.weight.detach().T for layer in model.layers]
    if isinstance(model, (ConvNet, ResNet)):
        return [m for _, m in _convnet_steps(model, fold_bn, skips)]
    gru = model.gru
    return [getattr(gru, f"weight_ih_l{k}").detach().T for k in range(gru.num_layers)] + [model.fc.weight.detach().T]


def _normalize_rows(w: torch.Tensor) -> torch.Tensor:
    # Each input's outgoing weights (a row of the layer matrix) scaled to unit L2 norm.
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _compose(c: torch.Tensor, kind: str, m: torch.Tensor) -> torch.Tensor:
    if kind == "linear":
        return c @ m
    n_in = c.shape[1]
    kk = m.shape[0] // n_in
    # C_l[(p, r), j] = Σ_i C_{l-1}[r, i] M_l[(i, p), j]
    return torch.einsum("ri,ipj->prj", c, m.reshape(n_in, kk, m.shape[1])).reshape(kk * c.shape[0], m.shape[1])


# ----------------------------------------------------------------------------- chains


def _gru_weights(model: GRUNet, normalize: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for k in range(model.gru.num_layers):
        wih = getattr(model.gru, f"weight_ih_l{k}").detach()
        whh = getattr(model.gru, f"weight_hh_l{k}").detach()
        if normalize:  # per input: columns of PyTorch's (3H, in) weights
            wih = wih / wih.norm(dim=0, keepdim=True).clamp_min(1e-12)
            whh = whh / whh.norm(dim=0, keepdim=True).clamp_min(1e-12)
        out.append((wih, whh))
    return out


def _gru_chains(model: GRUNet, normalize: bool, lags: int) -> list[torch.Tensor]:
    if lags < 0:
        raise ValueError("gru_lags must be ≥ 0")
    hdim = model.gru.hidden_size
    wfc = model.fc.weight.detach()
    if normalize:
        wfc = wfc / wfc.norm(dim=0, keepdim=True).clamp_min(1e-12)
    d = model.gru.input_size
    T = lags + 1
    resp = torch.zeros(T, d, d, dtype=wfc.dtype, device=wfc.device)  # R^{(0)}[s]: (n_prev, d)
    resp[0] = torch.eye(d, dtype=wfc.dtype, device=wfc.device)
    factors = []
    for wih, whh in _gru_weights(model, normalize):
        win, whn = wih[2 * hdim:], whh[2 * hdim:]
        new = []
        gates = []
        for s in range(T):
            h = win @ resp[s]
            a = wih @ resp[s]
            if s > 0:
                h = h + whn @ new[s - 1]
                a = a + whh @ new[s - 1]
            new.append(h)
            gates.append(a)  # (3H, d), rows (g, j)
        factors.append(torch.stack(gates).transpose(1, 2).reshape(T * d, 3 * hdim))
        resp = torch.stack(new)
    factors.append((wfc @ resp).transpose(1, 2).reshape(T * d, wfc.shape[0]))
    return factors


def chain_factors(
    model: nn.Module,
    *,
    normalize: bool = False,
    fold_bn: bool = True,
    skips: bool = True,
    gru_lags: int = 1,
    upto: int | None = None,
    channel_normalize: bool = False,
) -> list[torch.Tensor]:
    """Chain factors C_1 … C_L (G_l = C_l C_lᵀ), l = 1 … L; see the module docstring for each arch.

    MLP: C_l = W_1 … W_l. ConvNet: patch-space chains, C_l ∈ R^{27·9^{l-1} × n_l} for 3×3 kernels
    on RGB, then the classifier. GRU: chains per layer (rows (lag, character), columns (gate,
    neuron)) and the classifier; ``gru_lags=0`` makes chain 1 the official feature W_ih^{(1)ᵀ}.
    ``normalize`` is the official code's "chain normalization": for chains of length ≥ 2 every
    row of every layer matrix (one input's outgoing weights) is scaled to unit L2 norm first. ``fold_bn`` folds
    eval-mode BatchNorm scales into the convolutions. ``skips`` adds ResNet's projection shortcuts
    to its blocks' layer matrices (``False``: the 3×3 kernels only, as the official code).
    ``upto`` stops after chain ``upto``. ``channel_normalize`` (ours; CNNs) scales every output
    channel's kernel (a column of M_l) to unit L2 norm: BatchNorm with batch statistics makes the
    network's function blind to that scale, so the chain should be too.
    """
    check_supported(model)
    if isinstance(model, GRUNet):
        raw = _gru_chains(model, False, gru_lags)
        factors = raw if not normalize else raw[:1] + _gru_chains(model, True, gru_lags)[1:]
        return factors[:upto]
    if isinstance(model, MLP):
        steps = [("linear", w) for w in layer_matrices(model)]
    else:
        steps = _convnet_steps(model, fold_bn, skips, channel_normalize)
    steps = steps[:upto]
    factors = [steps[0][1]]
    c = _normalize_rows(steps[0][1]) if normalize else steps[0][1]
    for kind, w in steps[1:]:
        c = _compose(c, kind, _normalize_rows(w) if normalize else w)
        factors.append(c)
    return factors


def chain_dims(model: nn.Module, *, gru_lags: int = 1) -> list[int]:
    """Row dimension d_l of every chain factor (G_l is d_l × d_l), without computing the chains."""
    check_supported(model)
    if isinstance(model, MLP):
        return [model.layers[0].in_features] * len(model.layers)
    if isinstance(model, (ConvNet, ResNet)):
        dims, d = [], 1
        for conv in model.convs:
            kk = conv.kernel_size[0] * conv.kernel_size[1]
            d = d * kk * (conv.in_channels if not dims else 1)
            dims.append(d)
        return dims + [d]
    return [(gru_lags + 1) * model.gru.input_size] * (model.gru.num_layers + 1)


def chain_gram(c: torch.Tensor) -> torch.Tensor:
    """The chain Gram G = C Cᵀ (paper eq. 8)."""
    return c @ c.T


def gram_inner(ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """⟨Ca Caᵀ, Cb Cbᵀ⟩_F = ‖Caᵀ Cb‖²_F, computed without forming either Gram.

    Leading batch dimensions broadcast: ``ca`` (..., d, n_a) and ``cb`` (..., d, n_b). Memory:
    n_a × n_b numbers besides the inputs (CNN chain 4: 256 × 256 instead of 19683²).
    """
    return (ca.transpose(-1, -2) @ cb).square().sum(dim=(-1, -2))


def gram_distance(ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """‖Ca Caᵀ − Cb Cbᵀ‖_F without forming either Gram (float64, via :func:`gram_inner`).

    ‖G_a − G_b‖²_F = ⟨G_a, G_a⟩ − 2⟨G_a, G_b⟩ + ⟨G_b, G_b⟩; in float64 this resolves relative
    differences down to about 1e-7.
    """
    ca, cb = ca.double(), cb.double()
    sq = gram_inner(ca, ca) - 2 * gram_inner(ca, cb) + gram_inner(cb, cb)
    return sq.clamp_min(0).sqrt()


def layer_features(model: nn.Module, *, fold_bn: bool = True, normalize: bool = False,
                   gru_recurrent: bool = True, channel_normalize: bool = False) -> list[torch.Tensor]:
    """Raw per-layer weights, flattened: the paper's *unaligned* baseline.

    MLP: vec(W_lᵀ). ConvNet/ResNet: the (BN-folded when ``fold_bn``) 3×3 kernels (ResNet: no
    projection shortcut, as the official baseline), then the classifier. GRU: per layer [W_ih | W_hh] (all gates), or W_ih alone with ``gru_recurrent=False``
    (the official baseline), then the classifier. ``normalize`` scales every row of a layer matrix
    (one input's outgoing weights) to unit L2 norm first, as the official MLP baseline does;
    ``channel_normalize`` every conv output channel's kernel, as :func:`chain_factors`.
    """
    check_supported(model)
    if isinstance(model, MLP):
        mats = layer_matrices(model)
    elif isinstance(model, (ConvNet, ResNet)):
        mats = [m for _, m in _convnet_steps(model, fold_bn, skips=False, unit_channels=channel_normalize)]
    else:
        mats = [torch.cat([wih, whh], dim=1).T if gru_recurrent else wih.T
                for wih, whh in _gru_weights(model, False)] + [model.fc.weight.detach().T]
    return [(_normalize_rows(m) if normalize else m).reshape(-1) for m in mats]


def num_chains(model: nn.Module) -> int:
    """Number of chain indices (= number of layer matrices)."""
    return len(layer_matrices(model))


# ----------------------------------------------------------------------------- cost


@dataclass
class Measurement:
    """What :func:`measure` returns: the function's ``result``, wall ``seconds`` and ``peak_bytes``
    (extra peak memory while it ran; ``None`` where it cannot be measured)."""

    result: Any
    seconds: float
    peak_bytes: int | None


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _proc_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text()).group(1)) * 1024


def measure(fn: Callable[[], Any], *, device: str | torch.device = "cpu") -> Measurement:
    """Run ``fn()`` once and measure its time and its peak extra memory.

    CUDA: ``torch.cuda.max_memory_allocated`` above the memory allocated before. CPU (Linux):
    the process's resident-set high-water mark (VmHWM, reset through ``/proc/self/clear_refs``)
    above the resident set before — a measured peak of everything ``fn`` allocates (PyTorch
    tensors included, which ``tracemalloc`` cannot see). Elsewhere ``peak_bytes`` is ``None``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        return Measurement(result, seconds, torch.cuda.max_memory_allocated(device) - before)
    try:
        _CLEAR_REFS.write_text("5")
        before = _proc_kb("VmRSS")
    except OSError:
        before = None
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    peak = None if before is None else max(_proc_kb("VmHWM") - before, 0)
    return Measurement(result, seconds, peak)
