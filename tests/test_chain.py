"""Chain alignment rule (§3.2): exact invariance to function-preserving hidden permutations, for
every architecture and activation, with negative controls; Gram inner products without G."""
import copy
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
    if arch == "resnet5":  # with the projections (ours) and the 3×3 kernels only (official)
        return [dict(), dict(normalize=True), dict(fold_bn=False), dict(fold_bn=False, skips=False)]
    return [dict(), dict(normalize=True), dict(fold_bn=False), dict(fold_bn=False, channel_normalize=True)]


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


def test_resnet_shortcut_left_unpermuted_changes_function_and_chain():
    """Permuting a block's channels everywhere but in its projection shortcut is not
    function-preserving; the chain with the projections sees it, the 3×3-only chain cannot."""
    kw = dict(widths=(4, 6, 8, 10))
    net, x = make("resnet5", "relu", kw), inputs("resnet5", kw)
    perms = non_identity_permutations(net, torch.Generator().manual_seed(0))
    broken = permute_hidden(net, perms)
    with torch.no_grad():
        broken.skips[1].weight.copy_(net.skips[1].weight)
        broken.skip_bns[1].load_state_dict(net.skip_bns[1].state_dict())
    assert (net(x) - broken(x)).abs().max() > 1e-4
    assert rel_change(chain_factors(net)[2], chain_factors(broken)[2]) > 1e-3
    official = dict(fold_bn=False, skips=False)
    assert rel_change(chain_factors(net, **official)[2], chain_factors(broken, **official)[2]) < 1e-5


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


def test_resnet_block_matrix_is_the_blocks_linear_map():
    """With BN folded, a block's layer matrix M_l + E_l is the kernel of one 3×3 stride-2 conv
    that computes BN(conv3×3 h) + BN'(conv1×1' h) up to a per-channel shift."""
    net = make("resnet5", "relu", dict(widths=(4, 6, 8, 10)))
    conv, bn, skip, sbn = net.convs[1], net.bns[1], net.skips[0], net.skip_bns[0]
    h = torch.randn(2, 4, 9, 9)
    y = bn(conv(h)) + sbn(skip(h))
    m = layer_matrices(net)[1]  # (4·9, 6), rows (c_in, ky, kx)
    kernel = m.T.reshape(6, 4, 3, 3)
    shift = bn.bias - bn.running_mean * bn_scale(bn) + sbn.bias - sbn.running_mean * bn_scale(sbn)
    assert torch.allclose(y, nn.functional.conv2d(h, kernel, stride=2, padding=1) + shift[None, :, None, None],
                          atol=1e-5)
    # without the projections: the 3×3 kernels alone, as the official code reads them
    raw = layer_matrices(net, fold_bn=False, skips=False)
    assert torch.equal(raw[1], conv.weight.detach().reshape(6, 36).T)
    assert torch.equal(layer_features(net, fold_bn=False)[1], raw[1].reshape(-1))


def _official_mlp_chain(ws: list, l: int):
    """models/meta_model_mlp.py as the official code has it, in numpy float64: chain 1 is W_1ᵀ
    (no normalization); for l ≥ 2 every W_kᵀ is normalized along its last axis (each input's
    outgoing weights) and multiplied out."""
    import numpy as np

    if l == 1:
        return ws[0].T
    x = None
    for w in ws[:l]:
        wt = w.T / np.linalg.norm(w.T, axis=-1, keepdims=True)
        x = wt if x is None else x @ wt
    return x


def _official_cnn_chain(kernels: list, l: int):
    """models/meta_model_cnn.py (sup_cifar_chain) in numpy float64: C_1 = K_1 viewed (c_out, c_in·9);
    C_i[o, q·9 + k] = Σ_c C_{i-1}[c, q] K_i[o, c, k]. Returns (c_out, d) with columns (c, p_1, …, p_l)."""
    c = kernels[0].reshape(kernels[0].shape[0], -1)
    for k in kernels[1:l]:
        c_out, c_in = k.shape[:2]
        t = c.T @ k.transpose(1, 0, 2, 3).reshape(c_in, c_out * 9)  # (d, c_out·9)
        c = t.reshape(-1, c_out, 9).transpose(1, 0, 2).reshape(c_out, -1)
    return c


def test_official_mlp_chain_normalization_against_an_independent_computation():
    net = make("mlp", "relu", dict(in_features=20, hidden=(6, 7, 8)))
    ws = [layer.weight.detach().double().numpy() for layer in net.layers]  # (out, in)
    ours = chain_factors(net, normalize=True)
    for l in range(1, 5):
        ref = torch.from_numpy(_official_mlp_chain(ws, l))
        torch.testing.assert_close(ours[l - 1].double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
        torch.testing.assert_close(chain_gram(ours[l - 1].double()), ref @ ref.T, rtol=1e-6,
                                   atol=1e-6 * (ref @ ref.T).abs().max().item())


@pytest.mark.parametrize("arch", ["cnn", "resnet5"])
def test_official_raw_kernel_cnn_chain_against_an_independent_computation(arch):
    """Our chain on the raw 3×3 kernels (BN not folded; ResNet without its projections) equals the
    official chain with its rows reordered: ours (p_l, …, p_2, c, p_1), official (c, p_1, …, p_l)."""
    net = make(arch, "relu", dict(widths=(3, 4, 5, 6)))
    kernels = [c.weight.detach().double().numpy() for c in net.convs]
    ours = chain_factors(net, fold_bn=False, skips=False, upto=3)
    for l in range(1, 4):
        ref = torch.from_numpy(_official_cnn_chain(kernels, l)).T  # (d, c_out), rows (c, p_1, …, p_l)
        axes = ref.reshape(3, 9, *([9] * (l - 1)), -1)  # (c, p_1, p_2, …, p_l, j)
        order = [*range(l, 1, -1), 0, 1, l + 1]  # → (p_l, …, p_2, c, p_1, j)
        ref = axes.permute(*order).reshape(ref.shape)
        torch.testing.assert_close(ours[l - 1].double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


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
    net.convs[1] = nn.Conv2d(2, 3, 3, stride=2)  # stride only in ResNet's blocks
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


@pytest.mark.parametrize("arch", ["cnn", "resnet5"])
def test_channel_normalized_chains_ignore_each_channels_kernel_scale(arch):
    """Scaling one output channel's kernel by a > 0 (what BatchNorm with batch statistics cannot
    see) changes the raw chain Grams but not the channel-normalized ones; those equal an
    independent computation with every kernel scaled to unit norm by hand."""
    net = make(arch, "relu", dict(widths=(3, 4, 5, 6)))
    scaled = copy.deepcopy(net)
    with torch.no_grad():
        scaled.convs[1].weight[2] *= 7.0
    raw_a, raw_b = (chain_factors(m, fold_bn=False, skips=False, upto=3) for m in (net, scaled))
    assert rel_change(raw_a[2], raw_b[2]) > 1e-2
    unit_a, unit_b = (chain_factors(m, fold_bn=False, skips=False, upto=3, channel_normalize=True) for m in (net, scaled))
    for ca, cb in zip(unit_a, unit_b):
        assert rel_change(ca, cb) < 1e-6
    by_hand = copy.deepcopy(net)
    with torch.no_grad():
        for conv in by_hand.convs:
            conv.weight /= conv.weight.flatten(1).norm(dim=1)[:, None, None, None]
    for ca, ref in zip(unit_a, chain_factors(by_hand, fold_bn=False, skips=False, upto=3)):
        torch.testing.assert_close(ca, ref, rtol=1e-5, atol=1e-6)
    for la, lb in zip(layer_features(net, fold_bn=False, channel_normalize=True)[:4],
                      layer_features(scaled, fold_bn=False, channel_normalize=True)[:4]):
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
