r"""Linear CKA, the activation-based baseline (Kornblith, Norouzi, Lee & Hinton, ICML 2019, §3).

FFL compares networks by their weights alone (§3.2); CKA compares what two layers compute on a
probe batch. For activations X ∈ R^{n×p}, Y ∈ R^{n×q} of the same n inputs and linear kernels
K = XXᵀ, L = YYᵀ,

    CKA(K, L) = HSIC(K, L) / √(HSIC(K, K) · HSIC(L, L)),

with the biased estimator HSIC₀(K, L) = tr(KHLH)/(n − 1)², H = I − 11ᵀ/n (Gretton et al. 2005);
for column-centred X, Y this is Kornblith et al.'s ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F), computed so here
(no n × n matrix). HSIC₀ is biased upwards by O(1/n), which matters for small probe batches; the
unbiased estimator (Song et al., JMLR 2012, used for CKA by Nguyen, Raghu & Kornblith, ICLR 2021)
takes K̃, L̃ = K, L with zero diagonals:

    HSIC₁(K, L) = [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3)).

CKA is invariant to orthogonal transforms and isotropic scaling of X (so to permutations of a
layer's neurons), not to arbitrary invertible maps. :func:`hidden_activations` collects every
hidden layer's output with forward hooks: each call of an activation module (MLP, PlainNet,
ResNet units: conv maps flattened over channels and space) and each GRU layer's final state.
"""
from __future__ import annotations

import torch
from torch import nn

#: activation modules whose outputs are the hidden layers (called once per layer, in order)
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus)


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(x.shape[0], -1).double()


def hsic(k: torch.Tensor, l: torch.Tensor, *, unbiased: bool = False) -> torch.Tensor:
    """HSIC of two n × n kernel matrices: biased HSIC₀ or unbiased HSIC₁ (n > 3)."""
    n = k.shape[0]
    if not unbiased:
        kc = k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()  # HKH
        return (kc * l).sum() / (n - 1) ** 2  # tr(HKH L) = tr(KHLH)
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 examples, got {n}")
    kt, lt = k.clone(), l.clone()
    kt.diagonal().zero_()
    lt.diagonal().zero_()
    return ((kt * lt).sum() + kt.sum() * lt.sum() / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (kt.sum(0) @ lt.sum(0))) / (n * (n - 3))


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, unbiased: bool = False) -> float:
    """Linear CKA of activations ``x`` (n, …) and ``y`` (n, …) of the same n inputs (float64).

    Biased: feature-space form on centred columns. Unbiased: HSIC₁ of the centred linear kernels.
    """
    x, y = _as_matrix(x), _as_matrix(y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"activations of different numbers of inputs: {x.shape[0]} and {y.shape[0]}")
    x, y = x - x.mean(0), y - y.mean(0)
    if unbiased:
        k, l = x @ x.T, y @ y.T
        value = hsic(k, l, unbiased=True) / (hsic(k, k, unbiased=True) * hsic(l, l, unbiased=True)).sqrt()
    else:
        value = (y.T @ x).square().sum() / ((x.T @ x).norm() * (y.T @ y).norm())
    return float(value)


@torch.no_grad()
def hidden_activations(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Every hidden layer's activations for the probe batch ``x`` (eval mode: BatchNorm's running
    statistics), in the order they are computed: each call of an activation module, and for each
    ``nn.GRU`` the final hidden state of each of its layers."""
    out: list[torch.Tensor] = []

    def act_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        out.append(output)

    def gru_hook(module: nn.Module, inputs: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        out.extend(output[1].unbind(0))  # h_n: (layers, batch, hidden)

    handles = [m.register_forward_hook(gru_hook if isinstance(m, nn.GRU) else act_hook)
               for m in model.modules() if isinstance(m, (nn.GRU, *ACTIVATIONS))]
    training = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return out


def network_cka(a: nn.Module, b: nn.Module, x: torch.Tensor, *, unbiased: bool = False) -> list[float]:
    """Linear CKA between the k-th hidden layers of ``a`` and ``b`` on the probe batch ``x``, k = 1 … L."""
    ha, hb = hidden_activations(a, x), hidden_activations(b, x)
    if len(ha) != len(hb):
        raise ValueError(f"the networks have {len(ha)} and {len(hb)} hidden layers")
    return [linear_cka(p, q, unbiased=unbiased) for p, q in zip(ha, hb)]
