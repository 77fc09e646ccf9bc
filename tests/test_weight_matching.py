"""Weight matching (Git Re-Basin, Ainsworth et al. 2023): recovers a known hidden permutation
exactly, never lowers the weights' similarity, and is deterministic for a seed."""
import pytest
import torch
from torch import nn

from ffl.invariance import randomize_batchnorm_
from ffl.models import build_model
from ffl.permute import permute_hidden, random_hidden_permutations
from ffl.weight_matching import permutation_spec, weight_cosines, weight_matching

CASES = [("mlp", dict(in_features=20, hidden=(16, 12, 10))), ("cnn", dict(widths=(8, 10, 12, 14)))]
IDS = [a for a, _ in CASES]


def make(arch, kw, seed=0):
    torch.manual_seed(seed)
    net = build_model(arch, 3, **kw)
    randomize_batchnorm_(net)
    return net.eval()


@pytest.mark.parametrize("arch, kw", CASES, ids=IDS)
def test_matching_a_permuted_copy_recovers_the_permutation_exactly(arch, kw, one_thread):
    net = make(arch, kw)
    twin = permute_hidden(net, random_hidden_permutations(net, torch.Generator().manual_seed(5)))
    m = weight_matching(net, twin, seed=0)
    assert min(m.unmatched_layer_cosine.values()) < 0.5  # (BatchNorm γ ≈ 1 alone stays near 1)
    assert m.cosine == pytest.approx(1.0, abs=1e-12)
    assert all(c == pytest.approx(1.0, abs=1e-12) for c in m.layer_cosine.values())
    for key, value in net.state_dict().items():  # every tensor back in place, BN statistics too
        assert torch.equal(m.aligned.state_dict()[key], value), key
    x = torch.randn(4, 3, 32, 32) if arch == "cnn" else torch.randn(4, 20)
    torch.testing.assert_close(m.aligned(x), twin(x))  # and the aligned network is still twin's function


@pytest.mark.parametrize("arch, kw", CASES, ids=IDS)
def test_matched_similarity_is_at_least_the_unmatched_and_deterministic_for_a_seed(arch, kw, one_thread):
    a, b = make(arch, kw), make(arch, kw, seed=1)
    m = weight_matching(a, b, seed=3)
    assert m.cosine >= m.unmatched_cosine
    assert m.cosine > m.unmatched_cosine + 0.01  # independent networks: matching finds real overlap
    again = weight_matching(a, b, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(m.perms, again.perms))
    assert (m.cosine, m.sweeps) == (again.cosine, again.sweeps)
    assert m.sweeps >= 2  # the last sweep changed nothing


def test_a_users_sequential_is_matched_through_its_ffl_form(one_thread):
    torch.manual_seed(0)
    user = nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 3))
    perm = torch.randperm(16)
    twin = {"1.weight": user[1].weight[perm], "1.bias": user[1].bias[perm], "3.weight": user[3].weight[:, perm],
            "3.bias": user[3].bias}
    m = weight_matching(user, {k: v.detach() for k, v in twin.items()})
    assert m.cosine == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(m.perms[0], torch.argsort(perm))


def test_the_spec_names_every_weight_a_permutation_moves_and_unsupported_networks_are_refused():
    net = make("cnn", dict(widths=(4, 5, 6, 7)))
    spec = permutation_spec(net)
    assert spec[0] == [("convs.0.weight", 0), ("bns.0.weight", 0), ("bns.0.bias", 0), ("convs.1.weight", 1)]
    assert spec[-1][-1] == ("fc.weight", 1)
    layers, overall = weight_cosines(net, net)
    assert set(layers) == {"convs.0", "convs.1", "convs.2", "convs.3", "bns.0", "bns.1", "bns.2", "bns.3", "fc"}
    assert overall == pytest.approx(1.0)
    with pytest.raises(TypeError, match="MLPs and PlainNet"):
        weight_matching(build_model("gru", 2, hidden=4), build_model("gru", 2, hidden=4))
    with pytest.raises(ValueError, match="one structure"):
        weight_matching(make("mlp", dict(in_features=20, hidden=(4, 4))),
                        make("mlp", dict(in_features=20, hidden=(4, 5))))
