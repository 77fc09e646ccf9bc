"""Linear CKA (Kornblith et al. 2019): 1 for identical activations, invariant to orthogonal maps
and isotropic scaling, blind to hidden permutations; biased and unbiased HSIC agree for large n;
the same numbers as an independent numpy computation."""
import numpy as np
import pytest
import torch
from torch import nn

from ffl.cka import hidden_activations, hsic, linear_cka, network_cka
from ffl.models import build_model, input_shape
from ffl.permute import permute_hidden, random_hidden_permutations


def rand(n, p, seed=0):
    return torch.randn(n, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def numpy_cka(x, y, unbiased):
    """Kernel form with the centring matrix H (biased) or the U-statistic of Song et al. (2012)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    x, y = x - x.mean(0), y - y.mean(0)
    n = len(x)
    k, l = x @ x.T, y @ y.T

    def h(a, b):
        if not unbiased:
            c = np.eye(n) - np.ones((n, n)) / n
            return np.trace(a @ c @ b @ c) / (n - 1) ** 2
        a, b = a - np.diag(np.diag(a)), b - np.diag(np.diag(b))
        one = np.ones(n)
        return (np.trace(a @ b) + one @ a @ one * (one @ b @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ a @ b @ one) / (n * (n - 3))

    return h(k, l) / np.sqrt(h(k, k) * h(l, l))


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_of_x_with_itself_is_one_and_invariant_to_orthogonal_maps_and_scaling(unbiased):
    x, y = rand(40, 12), rand(40, 7, seed=1)
    assert linear_cka(x, x, unbiased=unbiased) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(rand(12, 12, seed=2))
    base = linear_cka(x, y, unbiased=unbiased)
    assert linear_cka(x @ q, y, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, 0.2 * y, unbiased=unbiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x + 5.0, y, unbiased=unbiased) == pytest.approx(base, abs=1e-10)  # centred first
    assert linear_cka(x @ rand(12, 12, seed=3), y, unbiased=unbiased) != pytest.approx(base, abs=1e-3)


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_matches_an_independent_numpy_computation(unbiased):
    x, y = rand(30, 9), rand(30, 5, seed=1)
    y = torch.cat([y, x[:, :3] @ rand(3, 4, seed=2)], dim=1)  # partly shared
    assert linear_cka(x, y, unbiased=unbiased) == pytest.approx(numpy_cka(x, y, unbiased), rel=1e-10)
    k, l = x @ x.T, y @ y.T
    hc = torch.eye(30, dtype=torch.float64) - 1 / 30
    assert float(hsic(k, l)) == pytest.approx(float(torch.trace(k @ hc @ l @ hc)) / 29**2, rel=1e-10)


def test_unbiased_and_biased_agree_for_large_n_and_differ_for_small_n():
    x = rand(4000, 10)
    y = x @ rand(10, 6, seed=1) + 2.0 * rand(4000, 6, seed=2)
    biased, unbiased = linear_cka(x, y), linear_cka(x, y, unbiased=True)
    assert biased == pytest.approx(unbiased, abs=0.01)
    assert unbiased == pytest.approx(numpy_cka(x[:500], y[:500], True), abs=0.05)
    a, b = rand(12, 50, seed=3), rand(12, 50, seed=4)  # independent, p ≫ n: biased CKA is far from 0
    assert linear_cka(a, b) > 0.5 and abs(linear_cka(a, b, unbiased=True)) < linear_cka(a, b) - 0.3


CASES = [("mlp", dict(in_features=48, hidden=(6, 7, 8))), ("cnn", dict(widths=(4, 5, 6, 7))),
         ("resnet5", dict(widths=(4, 5, 6, 7))), ("gru", dict(hidden=6))]


@pytest.mark.parametrize("arch, kw", CASES, ids=[a for a, _ in CASES])
def test_a_hidden_permutation_leaves_every_layers_cka_at_one(arch, kw, one_thread):
    torch.manual_seed(0)
    net = build_model(arch, 3, **kw).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    twin = permute_hidden(net, random_hidden_permutations(net, torch.Generator().manual_seed(1)))
    shape = (kw["in_features"],) if arch == "mlp" else input_shape(arch)
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(2))
    layers = hidden_activations(net, x)
    assert len(layers) == {"mlp": 3, "cnn": 4, "resnet5": 4, "gru": 2}[arch]
    for unbiased in (False, True):
        assert network_cka(net, twin, x, unbiased=unbiased) == pytest.approx([1.0] * len(layers), abs=1e-6)
    moved = [float((p - q).abs().max()) for p, q in zip(layers, hidden_activations(twin, x))]
    assert max(moved) > 1e-3  # the activations themselves were permuted
    other = build_model(arch, 3, **kw).eval()
    assert min(network_cka(net, other, x)) < 0.999
