"""Architectures (§4): shapes, names, state dicts, configuration errors."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ffl.models import (
    ALL_LETTERS,
    ARCHS,
    MLP,
    N_LETTERS,
    ConvNet,
    GRUNet,
    ResNet,
    build_model,
    input_shape,
)

SMALL = {
    "mlp": dict(hidden=(8, 8, 8)),
    "cnn": dict(widths=(8, 16, 32, 64)),
    "plainnet6": dict(widths=(8, 16, 32, 64, 64)),
    "resnet5": dict(widths=(8, 16, 32, 64)),
    "gru": dict(hidden=16),
}


def test_archs_listed():
    assert ARCHS == ("mlp", "cnn", "plainnet6", "resnet5", "gru")
    assert len(ALL_LETTERS) == N_LETTERS == 58


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_runs_on_its_input_shape(arch):
    torch.manual_seed(0)
    net = build_model(arch, 5, **SMALL[arch]).eval()
    x = torch.randn(3, *input_shape(arch))
    assert net(x).shape == (3, 5)
    again = build_model(arch, 5, **SMALL[arch])
    again.load_state_dict(net.state_dict())
    assert torch.equal(again.eval()(x), net(x))


@pytest.mark.parametrize("arch", ["mlp", "cnn", "plainnet6", "resnet5"])
def test_leaky_variants(arch):
    net = build_model(arch, 2, activation="leaky_relu", **SMALL[arch])
    assert isinstance(net.act, nn.LeakyReLU) and net.act.negative_slope == 0.01
    assert isinstance(build_model(arch, 2, **SMALL[arch]).act, nn.ReLU)


def _spatial_sizes(net, modules, x):
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[2:]))) for m in modules]
    net.eval()(x)
    for h in hooks:
        h.remove()
    return sizes


def test_plainnet5_structure_matches_the_official_code():
    net = build_model("cnn", 7)
    assert [tuple(c.weight.shape) for c in net.convs] == [(32, 3, 3, 3), (64, 32, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3)]
    assert [bn.num_features for bn in net.bns] == [32, 64, 128, 256]
    assert tuple(net.fc.weight.shape) == (7, 256) and net.pools == 3
    keys = set(net.state_dict())
    assert {"convs.0.weight", "bns.3.running_var", "bns.0.num_batches_tracked", "fc.weight", "fc.bias"} <= keys
    # conv(32)-pool-conv(64)-pool-conv(128)-pool-conv(256): maps 32, 16, 8, 4
    assert _spatial_sizes(net, net.convs, torch.randn(1, 3, 32, 32)) == [(32, 32), (16, 16), (8, 8), (4, 4)]


def test_plainnet6_is_the_official_cfg_I():
    """plain_net6_diff: 32-M-64-M-128-M-256-M-256, 3×3 convs with BN, GAP, Linear(256, C)."""
    six = build_model("plainnet6", 7)
    assert [tuple(c.weight.shape) for c in six.convs] == [
        (32, 3, 3, 3), (64, 32, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3), (256, 256, 3, 3)]
    assert all(c.stride == (1, 1) and c.padding == (1, 1) for c in six.convs)
    assert six.pools == 4 and tuple(six.fc.weight.shape) == (7, 256)
    assert _spatial_sizes(six, six.convs, torch.randn(1, 3, 32, 32)) == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]


def test_resnet5_is_the_official_resnet5():
    """resnet5 = ResNet_Cifar3(BasicBlock_1conv, [1, 1, 1]): stem 3×3 3→32 + BN, blocks of one
    stride-2 3×3 conv + BN with a 1×1 stride-2 conv + BN projection, no bias, no max-pool."""
    res = build_model("resnet5", 7)
    assert isinstance(res, ResNet)
    shapes = {k: tuple(v.shape) for k, v in res.state_dict().items() if k.endswith("weight")}
    assert shapes == {
        "convs.0.weight": (32, 3, 3, 3), "convs.1.weight": (64, 32, 3, 3), "convs.2.weight": (128, 64, 3, 3),
        "convs.3.weight": (256, 128, 3, 3), "skips.0.weight": (64, 32, 1, 1), "skips.1.weight": (128, 64, 1, 1),
        "skips.2.weight": (256, 128, 1, 1), "bns.0.weight": (32,), "bns.1.weight": (64,), "bns.2.weight": (128,),
        "bns.3.weight": (256,), "skip_bns.0.weight": (64,), "skip_bns.1.weight": (128,), "skip_bns.2.weight": (256,),
        "fc.weight": (7, 256)}
    # the 3×3 kernels have PlainNet-5's shapes ("same weight size")
    plain = build_model("cnn", 7)
    assert [c.weight.shape for c in res.convs] == [c.weight.shape for c in plain.convs]
    convs = [m for m in res.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    assert [c.stride for c in res.convs] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert all(s.stride == (2, 2) and s.padding == (0, 0) for s in res.skips)
    assert not any(isinstance(m, nn.MaxPool2d) for m in res.modules())
    assert _spatial_sizes(res, res.convs, torch.randn(1, 3, 32, 32)) == [(32, 32), (16, 16), (8, 8), (4, 4)]
    # He fan-out init N(0, 2/(k²·c_out)); BatchNorm γ = 1, β = 0
    for c in convs:
        expected = (2 / (c.kernel_size[0] * c.kernel_size[1] * c.out_channels)) ** 0.5
        assert c.weight.std().item() == pytest.approx(expected, rel=0.15)
    assert all(torch.equal(b.weight, torch.ones_like(b.weight)) for b in res.bns)
    # the activation follows the addition: the block output is act(BN conv h + BN' skip h)
    res.eval()
    x = torch.randn(2, 3, 32, 32)
    h0 = res.act(res.bns[0](res.convs[0](x)))
    h1 = res.act(res.bns[1](res.convs[1](h0)) + res.skip_bns[0](res.skips[0](h0)))
    seen = []
    hook = res.skips[1].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    res(x)
    hook.remove()
    assert torch.allclose(seen[0], h1, atol=1e-6)
    with pytest.raises(ValueError, match="stem"):
        build_model("resnet5", 3, widths=(16,))


def test_mlp_output_relu_clips_the_logits():
    torch.manual_seed(0)
    plain = build_model("mlp", 3, **SMALL["mlp"]).eval()
    clipped = build_model("mlp", 3, output_relu=True, **SMALL["mlp"]).eval()
    clipped.load_state_dict(plain.state_dict())
    x = torch.randn(16, 3, 32, 32)
    assert torch.equal(clipped(x), plain(x).clamp_min(0))
    assert (plain(x) < 0).any()


def test_gru_accepts_indices_and_lengths():
    torch.manual_seed(0)
    net = build_model("gru", 4, **SMALL["gru"]).eval()
    assert isinstance(net, GRUNet) and net.gru.num_layers == 2
    assert tuple(build_model("gru", 4).gru.weight_ih_l0.shape) == (3 * 128, 58)
    idx = torch.randint(0, 58, (3, 6))
    onehot = nn.functional.one_hot(idx, 58).float()
    assert torch.allclose(net(idx), net(onehot))
    lengths = torch.tensor([6, 4, 2])
    padded = idx.clone()
    padded[1, 4:] = -1
    padded[2, 2:] = -1
    out = net(padded, lengths)
    assert torch.allclose(out[2], net(idx[2:3, :2])[0], atol=1e-6)
    assert torch.allclose(out[1], net(idx[1:2, :4])[0], atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="mlp.*cnn.*plainnet6.*resnet5.*gru"):
        build_model("resnet50", 2)
    with pytest.raises(ValueError, match="activation"):
        build_model("cnn", 2, activation="gelu")
    with pytest.raises(ValueError, match="fixed"):
        build_model("gru", 2, activation="leaky_relu")
    with pytest.raises(ValueError, match="unknown arch"):
        input_shape("vgg")


def test_input_shapes_and_classes():
    assert input_shape("cnn") == input_shape("mlp") == (3, 32, 32)
    assert input_shape("gru")[-1] == 58
    assert isinstance(build_model("mlp", 2), MLP) and isinstance(build_model("plainnet6", 2), ConvNet)


def test_mlp_from_layer_matrices_computes_the_paper_form():
    import torch
    from ffl.models import MLP

    w1, w2 = torch.tensor([[0.1, 0.3, 0.4], [0.2, 0.2, -0.1]]), torch.tensor([[0.5, -0.3], [0.1, 0.6], [-0.4, 0.2]])
    net = MLP.from_layer_matrices([w1, w2])
    x = torch.tensor([[1.0, 2.0]])
    h = torch.relu(x @ w1)
    torch.testing.assert_close(net.hidden_activations(x)[0], h)
    torch.testing.assert_close(net(x), h @ w2)
    with pytest.raises(ValueError, match="layer 1 has 3 neurons but layer 2 has 2 inputs"):
        MLP.from_layer_matrices([w1, w2[:2]])


def test_importing_the_models_imports_no_dataset():
    """GRU-2's letter set lives in ffl.alphabet: a model does not drag in every dataset module."""
    code = "import sys, ffl.models; print([m for m in sys.modules if m.startswith('ffl.data')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
    from ffl import alphabet, data

    assert data.ALL_LETTERS is alphabet.ALL_LETTERS and data.N_LETTERS == alphabet.N_LETTERS == 58
