"""Architectures (§4): shapes, names, state dicts, configuration errors."""
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


def test_plainnet5_structure_matches_the_official_code():
    net = build_model("cnn", 7)
    assert [tuple(c.weight.shape) for c in net.convs] == [(32, 3, 3, 3), (64, 32, 3, 3), (128, 64, 3, 3), (256, 128, 3, 3)]
    assert [bn.num_features for bn in net.bns] == [32, 64, 128, 256]
    assert tuple(net.fc.weight.shape) == (7, 256) and net.pools == 3 and not net.residual
    keys = set(net.state_dict())
    assert {"convs.0.weight", "bns.3.running_var", "bns.0.num_batches_tracked", "fc.weight", "fc.bias"} <= keys
    six = build_model("plainnet6", 7)
    assert len(six.convs) == 5 and tuple(six.convs[4].weight.shape) == (256, 256, 3, 3) and six.pools == 3


def test_resnet5_has_plainnet5_weights_and_skips():
    plain, res = build_model("cnn", 3), build_model("resnet5", 3)
    assert res.residual
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in res.state_dict().items()}
    res.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(plain.eval()(x), res.eval()(x))  # the skips change the function
    with pytest.raises(ValueError, match="non-decreasing"):
        build_model("resnet5", 3, widths=(16, 8))


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
