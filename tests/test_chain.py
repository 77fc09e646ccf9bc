"""Chain alignment rule (§3.2): exact invariance to function-preserving hidden permutations, for
every architecture and activation, with negative controls; Gram inner products without G."""
import pytest
import torch
from torch import nn

from ffl.chain import (
    bn_scale,
    chain_dims,
    chain_factors,
    chain_gram,
    gram_distance,
    gram_inner,
    layer_features,
    layer_matrices,
    measure,
    num_chains,
)
from ffl.models import ConvNet, build_model, input_shape
from ffl.permute import (
    check_ties,
    hidden_sizes,
    permute_hidden,
    permute_one_side,
    random_hidden_permutations,
)

CASES = [
    ("mlp", "relu", dict(in_features=48, hidden=(6, 7, 8))),
    ("mlp", "leaky_relu", dict(in_features=48, hidden=(6, 7, 8))),
    ("cnn", "relu", dict(widths=(4, 5, 6, 7))),
    ("cnn", "leaky_relu", dict(widths=(4, 5, 6, 7))),
    ("plainnet6", "relu", dict(widths=(3, 4, 5, 6, 6))),
    ("plainnet6", "leaky_relu", dict(widths=(3, 4, 5, 6, 6))),
    ("resnet5", "relu", dict(widths=(4, 6, 8, 10))),
    ("resnet5", "leaky_relu", dict(widths=(4, 6, 8, 10))),
    ("gru", "relu", dict(hidden=6)),
]
IDS = [f"{a}-{b}" for a, b, _ in CASES]


def make(arch, activation, kw, seed=0):
    """A small model with random weights and random BatchNorm parameters and running statistics."""
    torch.manual_seed(seed)
    net = build_model(arch, 3, activation=activation, **kw)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def inputs(arch, kw, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (kw["in_features"],) if arch == "mlp" else input_shape(arch)
    return torch.randn(8, *shape, generator=g)


def rel_change(ca, cb):
    return (gram_distance(ca, cb) / gram_inner(ca.double(), ca.double()).sqrt()).item()


def chain_options(arch):
    if arch == "gru":
        return [dict(), dict(normalize=True), dict(gru_lags=0), dict(gru_lags=2, normalize=True)]
    if arch == "mlp":
        return [dict(), dict(normalize=True)]
    return [dict(), dict(normalize=True), dict(fold_bn=False)]


def non_identity_permutations(net, gen):
    """Random function-preserving permutations, redrawn until none is the identity."""
    while True:
        perms = random_hidden_permutations(net, gen)
        if all(not torch.equal(p, torch.arange(len(p))) for p in perms):
            return perms


@pytest.mark.parametrize("arch,activation,kw", CASES, ids=IDS)
def test_function_preserving_permutations_leave_outputs_and_chains_unchanged(arch, activation, kw):
    net, x = make(arch, activation, kw), inputs(arch, kw)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        perms = non_identity_permutations(net, gen)
        assert check_ties(net, perms)
        other = permute_hidden(net, perms)
        assert (net(x) - other(x)).abs().max() < 1e-5
        # raw weights change (every layer touches a permuted hidden layer)
        for wa, wb in zip(layer_features(net), layer_features(other)):
            assert (wa - wb).abs().max() > 1e-3
        for opts in chain_options(arch):
            fa, fb = chain_factors(net, **opts), chain_factors(other, **opts)
            assert len(fa) == num_chains(net)
            for ca, cb in zip(fa, fb):
                assert rel_change(ca, cb) < 1e-5
                if ca.shape[0] <= 2187:  # explicit Grams where they are small
                    ga, gb = chain_gram(ca), chain_gram(cb)
                    assert (ga - gb).abs().max() <= 1e-5 * ga.abs().max()


@pytest.mark.parametrize("arch,activation,kw", CASES, ids=IDS)
def test_one_sided_permutation_changes_outputs_and_chain(arch, activation, kw):
    net, x = make(arch, activation, kw), inputs(arch, kw)
    for layer, n in enumerate(hidden_sizes(net)):
        roll = torch.roll(torch.arange(n), 1)  # never the identity
        broken = permute_one_side(net, layer, roll)
        assert (net(x) - broken(x)).abs().max() > 1e-4, f"layer {layer}"
        nxt = layer + 1
        assert rel_change(chain_factors(net)[nxt], chain_factors(broken)[nxt]) > 1e-3


def test_resnet_untied_permutation_changes_function_and_is_refused():
    kw = dict(widths=(4, 6, 8, 10))
    net, x = make("resnet5", "relu", kw), inputs("resnet5", kw)
    gen = torch.Generator().manual_seed(0)
    perms = random_hidden_permutations(net, gen)
    perms[1] = torch.roll(perms[1], 1)  # mixes a skip-fed channel with a padded one
    perms[2] = torch.cat([perms[1], torch.arange(6, 8)])
    perms[3] = torch.cat([perms[2], torch.arange(8, 10)])
    assert not check_ties(net, perms)
    with pytest.raises(ValueError, match="skip"):
        permute_hidden(net, perms)
    untied = permute_hidden(net, perms, check=False)
    assert (net(x) - untied(x)).abs().max() > 1e-4
    assert rel_change(chain_factors(net)[1], chain_factors(untied)[1]) > 1e-3
    # the same permutations are harmless without skips: PlainNet has no ties
    plain = make("cnn", "relu", kw)
    assert (plain(x) - permute_hidden(plain, perms)(x)).abs().max() < 1e-5


def test_permutation_validation():
    net = make("mlp", "relu", dict(in_features=48, hidden=(6, 7, 8)))
    with pytest.raises(ValueError, match="3 hidden layers"):
        permute_hidden(net, [torch.arange(6)])
    with pytest.raises(ValueError, match="not a permutation"):
        permute_hidden(net, [torch.zeros(6, dtype=torch.long), torch.arange(7), torch.arange(8)])


def test_gram_inner_without_g_equals_explicit():
    g = torch.Generator().manual_seed(0)
    ca, cb = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randn(30, 7, generator=g, dtype=torch.float64)
    explicit = (chain_gram(ca) * chain_gram(cb)).sum()
    assert torch.allclose(gram_inner(ca, cb), explicit)
    assert torch.allclose(gram_distance(ca, cb), (chain_gram(ca) - chain_gram(cb)).norm())
    batch = torch.stack([ca[:, :5], cb[:, :5]])
    assert torch.allclose(gram_inner(batch, batch[:1]), torch.stack([(chain_gram(c[:, :5]) * chain_gram(ca)).sum() for c in (ca, cb)]))
    # on a real CNN chain (243 × 5)
    net = make("cnn", "relu", dict(widths=(4, 5, 6, 7)))
    c2 = chain_factors(net)[1].double()
    c2b = chain_factors(make("cnn", "relu", dict(widths=(4, 5, 6, 7)), seed=3))[1].double()
    assert torch.allclose(gram_inner(c2, c2b), (chain_gram(c2) * chain_gram(c2b)).sum())


def test_mlp_chain_is_the_product_of_layer_matrices():
    net = make("mlp", "relu", dict(in_features=48, hidden=(6, 7, 8)))
    ws = [layer.weight.detach().T for layer in net.layers]
    for l, c in enumerate(chain_factors(net), 1):
        expected = ws[0]
        for w in ws[1:l]:
            expected = expected @ w
        assert torch.allclose(c, expected, atol=1e-6)
    # Official code: F.normalize(weight.T, dim=-1), i.e. each input's outgoing weights.
    unit = [torch.nn.functional.normalize(layer.weight.detach().T, dim=-1) for layer in net.layers]
    normed = chain_factors(net, normalize=True)
    assert torch.equal(normed[0], ws[0])
    assert torch.allclose(normed[2], unit[0] @ unit[1] @ unit[2], atol=1e-6)
    assert [tuple(w.shape) for w in layer_matrices(net)] == [(48, 6), (6, 7), (7, 8), (8, 3)]


def test_cnn_chain_lives_in_patch_space():
    net = build_model("cnn", 3, widths=(2, 3, 4, 5)).eval()
    assert chain_dims(net) == [27, 243, 2187, 19683, 19683]
    assert [tuple(c.shape) for c in chain_factors(net)] == [(27, 2), (243, 3), (2187, 4), (19683, 5), (19683, 3)]
    assert chain_dims(build_model("plainnet6", 3, widths=(2, 2, 2, 2, 2)))[4] == 27 * 9**4
    k1 = net.convs[0].weight.detach() * bn_scale(net.bns[0])[:, None, None, None]
    k2 = net.convs[1].weight.detach() * bn_scale(net.bns[1])[:, None, None, None]
    c1, c2 = chain_factors(net)[:2]
    assert torch.allclose(c1, k1.reshape(2, 27).T)
    # C_2[(p2, c, p1), j] = Σ_i K_1[i, c, p1] K_2[j, i, p2]  (rows: p2 outermost)
    ref = torch.zeros(9, 3, 9, 3)
    for p2 in range(9):
        for c in range(3):
            for p1 in range(9):
                for j in range(3):
                    ref[p2, c, p1, j] = sum(k1[i, c].reshape(9)[p1] * k2[j, i].reshape(9)[p2] for i in range(2))
    assert torch.allclose(c2, ref.reshape(243, 3), atol=1e-6)
    # the classifier continues the last conv chain like an MLP layer
    cs = chain_factors(net)
    assert torch.allclose(cs[4], cs[3] @ net.fc.weight.detach().T, atol=1e-5)
    assert len(chain_factors(net, upto=2)) == 2


def test_batchnorm_fold_matches_eval_mode_network():
    net = make("cnn", "relu", dict(widths=(4, 5, 6, 7)))
    conv, bn = net.convs[0], net.bns[0]
    x = torch.randn(2, 3, 8, 8)
    y = bn(conv(x))
    shift = bn.bias - bn.running_mean * bn_scale(bn)
    folded = nn.functional.conv2d(x, conv.weight * bn_scale(bn)[:, None, None, None], padding=1) + shift[None, :, None, None]
    assert torch.allclose(y, folded, atol=1e-5)
    assert torch.allclose(layer_matrices(net)[0], (conv.weight * bn_scale(bn)[:, None, None, None]).detach().reshape(4, 27).T)
    assert torch.allclose(layer_matrices(net, fold_bn=False)[0], conv.weight.detach().reshape(4, 27).T)


def test_resnet_layer_matrix_includes_the_skip():
    net = make("resnet5", "relu", dict(widths=(4, 6, 8, 10)))
    plain = layer_matrices(net, fold_bn=True)
    conv_only = layer_features(net)
    skip = plain[1] - conv_only[1].reshape(plain[1].shape)
    assert skip.sum() == 4 and skip.shape == (36, 6)
    for i in range(4):
        assert skip[i * 9 + 4, i] == 1  # channel i, kernel centre → channel i


def test_gru_official_feature_and_full_chain():
    net = make("gru", "relu", dict(hidden=6))
    wih0, whh0 = net.gru.weight_ih_l0.detach(), net.gru.weight_hh_l0.detach()
    official = chain_factors(net, gru_lags=0)[0]
    assert torch.equal(official, wih0.T)
    gates = wih0.reshape(3, 6, 58)
    assert torch.allclose(chain_gram(official), sum(gates[g].T @ gates[g] for g in range(3)), atol=1e-5)
    full = chain_factors(net, gru_lags=1)
    assert [tuple(c.shape) for c in full] == [(116, 18), (116, 18), (116, 3)]
    assert torch.equal(full[0][:58], official)
    assert torch.allclose(full[0][58:], wih0[12:].T @ whh0.T, atol=1e-6)  # x_{t-1} → n → gates at t
    wih1 = net.gru.weight_ih_l1.detach()
    assert torch.allclose(full[1][:58], wih0[12:].T @ wih1.T, atol=1e-6)
    assert num_chains(net) == 3 and chain_dims(net, gru_lags=2) == [174] * 3


def test_official_baselines_against_an_independent_computation():
    """The official unaligned baselines: GRU layer 1 = the first layer's input weights; MLP layers
    with each input's outgoing weights (a column of PyTorch's (out, in) weight) at unit norm."""
    gru = make("gru", "relu", dict(hidden=6))
    official = layer_features(gru, gru_recurrent=False)
    assert torch.equal(official[0].reshape(58, 18), gru.gru.weight_ih_l0.detach().T)
    assert official[1].numel() == 6 * 18  # layer 2: its input weights (3H × H) only
    ours = layer_features(gru)
    assert ours[0].numel() == 18 * (58 + 6)  # [W_ih | W_hh]
    mlp = make("mlp", "relu", dict(in_features=12, hidden=(5, 4, 3)))
    for feat, layer in zip(layer_features(mlp, normalize=True), mlp.layers):
        w = layer.weight.detach()  # (out, in)
        expected = (w / torch.linalg.vector_norm(w, dim=0)).T.reshape(-1)
        assert torch.allclose(feat, expected, rtol=1e-6, atol=1e-7)
    raw = layer_features(mlp)
    assert torch.equal(raw[0], mlp.layers[0].weight.detach().T.reshape(-1))


class Odd(ConvNet):
    pass


def test_unsupported_layers_are_named():
    net = build_model("cnn", 2, widths=(2, 3, 4, 5))
    net.act = nn.GELU()
    with pytest.raises(TypeError, match=r"'act' \(GELU\)"):
        chain_factors(net)
    net = build_model("cnn", 2, widths=(2, 3, 4, 5))
    net.convs[1] = nn.Conv2d(2, 3, 3, stride=2)
    with pytest.raises(TypeError, match="'convs.1'"):
        layer_matrices(net)
    net = build_model("mlp", 2, hidden=(4,))
    net.layers.insert(1, nn.Dropout())
    with pytest.raises(TypeError, match=r"'layers.1' \(Dropout\)"):
        layer_features(net)
    with pytest.raises(TypeError, match="Sequential"):
        chain_factors(nn.Sequential(nn.Linear(3, 4)))
    with pytest.raises(TypeError, match="Sequential"):
        random_hidden_permutations(nn.Sequential(nn.Linear(3, 4)))
    chain_factors(Odd(widths=(2, 3)))  # subclasses with the same layers are fine


def test_measure_reports_time_and_peak_memory():
    m = measure(lambda: torch.ones(16 * 2**20).sum())
    assert m.result == 16 * 2**20 and m.seconds >= 0


def test_measure_peak_memory_in_a_fresh_process():
    # A fresh interpreter: pages freed earlier in this test session could otherwise be reused
    # without raising the resident set, which would hide the allocation.
    import subprocess
    import sys

    code = ("import torch; from ffl.chain import measure; "
            "m = measure(lambda: torch.ones(16 * 2**20).sum()); print(m.peak_bytes)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    if out != "None":
        assert int(out) >= 48 * 2**20
