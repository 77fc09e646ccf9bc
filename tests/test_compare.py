"""ffl.compare: data-free, permutation-invariant similarity of any two networks of the supported
families (FFL §3.2), recognised from their structure (ffl.adapt); saved projections; the CLI."""
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ffl
from ffl.adapt import as_model
from ffl.chain import chain_factors, chain_gram, layer_features
from ffl.compare import compare, load_projection, save_projection, similarities
from ffl.features import FeatureConfig, Representation, fit_projection
from ffl.invariance import randomize_batchnorm_
from ffl.models import MLP, ConvNet, build_model
from ffl.permute import permute_hidden, random_hidden_permutations

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
SHARED = ROOT.parent / "shared" / "data"  # the shared folder beside the repository
DATA = Path(os.environ.get("FFL_DATA_ROOT") or (SHARED if SHARED.is_dir() else ROOT / "data"))
CASES = {
    "mlp": dict(in_features=48, hidden=(6, 7, 8)),
    "cnn": dict(widths=(6, 7, 8, 9)),
    "plainnet6": dict(widths=(4, 5, 6, 7, 7)),
    "resnet5": dict(widths=(6, 7, 8, 9)),
    "gru": dict(hidden=8),
}


def make(arch, seed=0, **kw):
    """A small network with random weights and random BatchNorm parameters and statistics."""
    torch.manual_seed(seed)
    net = build_model(arch, 3, **(kw or CASES[arch]))
    randomize_batchnorm_(net)
    return net.eval()


def vgg(widths=(6, 7, 8, 9), pools=3, bn=True):
    """A user's own VGG-style nn.Sequential: conv–BN–ReLU(–pool) units, global pool, one Linear."""
    layers, c = [], 3
    for l, w in enumerate(widths):
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), *([nn.BatchNorm2d(w)] if bn else []), nn.ReLU()]
        layers += [nn.MaxPool2d(2)] if l < pools else []
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))


def user_mlp(widths=(48, 6, 7, 8, 3)):
    layers = [nn.Flatten()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def cli(capsys, *args):
    """``python -m ffl.compare ARGS`` in this process: exit status, stdout, stderr."""
    from ffl.compare import main
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # --help
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("arch", list(CASES))
def test_a_network_compared_with_itself_scores_one_at_every_chain_index(arch, one_thread):
    net = make(arch)
    assert compare(net, net).cosine == pytest.approx([1.0] * len(chain_factors(net)), abs=1e-12)


@pytest.mark.parametrize("arch", list(CASES))
def test_a_hidden_permutation_leaves_every_cosine_at_one_while_the_raw_weights_move(arch, one_thread):
    net = make(arch)
    twin = permute_hidden(net, random_hidden_permutations(net, torch.Generator().manual_seed(3)))
    result = compare(net, twin)
    assert result.family == ffl.adapt.family(net)
    assert min(result.cosine) > 1 - 1e-6 and max(result.cosine) < 1 + 1e-6
    raw = [float(nn.functional.cosine_similarity(a.double(), b.double(), dim=0))
           for a, b in zip(layer_features(net), layer_features(twin))]
    assert min(raw) < 0.5  # the weights themselves are far apart
    assert compare(net, make(arch, seed=1)).cosine[-1] < 0.999  # and a different network is told apart


def test_a_users_sequential_mlp_gives_the_numbers_of_the_ffl_mlp_with_its_weights(one_thread):
    torch.manual_seed(0)
    a, b = user_mlp(), user_mlp()
    fa, fb = MLP(48, (6, 7, 8), 3), MLP(48, (6, 7, 8), 3)
    with torch.no_grad():
        for user, ours in ((a, fa), (b, fb)):
            for dst, src in zip(ours.layers, [m for m in user if isinstance(m, nn.Linear)]):
                dst.load_state_dict(src.state_dict())
    assert compare(a, b).cosine == compare(fa, fb).cosine
    assert compare(a.state_dict(), b.state_dict()).cosine == compare(fa, fb).cosine  # inferred from keys
    x = torch.randn(5, 48)
    torch.testing.assert_close(as_model(a)(x), a(x))


def test_a_users_vgg_style_sequential_gives_the_numbers_of_the_plainnet_with_its_weights(one_thread):
    ours = [make("cnn", seed=s) for s in (0, 1)]
    users = []
    for net in ours:
        user = vgg().eval()
        convs = [m for m in user if isinstance(m, nn.Conv2d)]
        bns = [m for m in user if isinstance(m, nn.BatchNorm2d)]
        for dst, src in [*zip(convs, net.convs), *zip(bns, net.bns), (user[-1], net.fc)]:
            dst.load_state_dict(src.state_dict())
        users.append(user)
    assert compare(*users).cosine == compare(*ours).cosine
    assert compare(users[0].state_dict(), users[1].state_dict()).cosine == compare(*ours).cosine
    assert compare(ours[0].state_dict(), ours[1].state_dict()).cosine == compare(*ours).cosine  # ffl layout
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(as_model(users[0])(x), users[0](x))
    # a stack without BatchNorm gets identity BatchNorms: the chains of the bare kernels
    bare = vgg(bn=False)
    assert compare(bare, bare).cosine == pytest.approx([1.0] * 5, abs=1e-12)
    torch.testing.assert_close(chain_factors(as_model(bare))[0], bare[0].weight.detach().reshape(6, -1).T)


@pytest.mark.parametrize("arch", ["resnet5", "gru"])
def test_state_dicts_of_resnet_and_gru_are_recognised_by_their_keys(arch, one_thread):
    a, b = make(arch), make(arch, seed=1)
    assert compare(a.state_dict(), b.state_dict()).cosine == compare(a, b).cosine
    assert compare(a.state_dict(), b.state_dict(), like=make(arch, seed=2)).cosine == compare(a, b).cosine


def test_a_users_gru_module_is_read_as_gru_net(one_thread):
    class Names(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(10, 6, num_layers=2, batch_first=True)
            self.drop = nn.Dropout(0.1)
            self.head = nn.Linear(6, 4)

    a, b = Names(), Names()
    assert compare(a, b).family == "gru" and compare(a, a).cosine == pytest.approx([1.0] * 3, abs=1e-12)


@pytest.mark.parametrize("arch, upto", [("mlp", None), ("cnn", 3), ("gru", None)])
def test_the_kernel_form_cosine_equals_the_cosine_of_explicit_grams(arch, upto, one_thread):
    a, b = make(arch), make(arch, seed=1)
    got = compare(a, b, upto=upto).cosine
    for l, (ca, cb) in enumerate(zip(chain_factors(a, upto=upto), chain_factors(b, upto=upto))):
        ga, gb = chain_gram(ca.double()).flatten(), chain_gram(cb.double()).flatten()
        assert got[l] == pytest.approx(float(ga @ gb / (ga.norm() * gb.norm())), rel=1e-9)


def _train(task, seed, epochs=5):
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    net = MLP(3072, (32, 32), 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    for _ in range(epochs):
        for idx in torch.randperm(len(task.y_train), generator=order).split(50):
            opt.zero_grad()
            nn.functional.cross_entropy(net(task.x_train[idx]), task.y_train[idx]).backward()
            opt.step()
    return net


@pytest.fixture(scope="module")
def tiny_imagenet_mlps():
    """Three runs (seeds) of a small MLP on each of tiny ImageNet's tasks 0 and 1 (offline copy)."""
    if not (DATA / "tiny_imagenet").is_dir():
        pytest.skip(f"the offline tiny ImageNet copy is not at {DATA / 'tiny_imagenet'}")
    from ffl.data import load_task
    tasks = [load_task("tiny_imagenet", t, data_root=DATA, max_test_per_class=1) for t in (0, 1)]
    with torch.random.fork_rng():
        return [(t, _train(task, 10 * t + r)) for t, task in enumerate(tasks) for r in range(3)]


def test_networks_of_two_tasks_score_lower_than_runs_of_one_task_on_real_data(tiny_imagenet_mlps, one_thread):
    labels = np.array([t for t, _ in tiny_imagenet_mlps])
    s = similarities([net for _, net in tiny_imagenet_mlps])
    same = (labels[:, None] == labels[None]) & ~np.eye(len(labels), dtype=bool)
    cross = labels[:, None] != labels[None]
    for l, m in enumerate(s.chain, 1):
        assert m[same].mean() > m[cross].mean() + 0.05, (l, m[same].mean(), m[cross].mean())


USER_SCRIPT = """import torch
from torch import nn
for seed in (0, 1):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2))
    torch.save(net.state_dict(), f"net{seed}.pt")
"""


def test_a_users_saved_state_dicts_round_trip_through_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text(USER_SCRIPT)
    runpy.run_path("train.py")
    a, b = tmp_path / "net0.pt", tmp_path / "net1.pt"
    expected = compare(torch.load(a), torch.load(b)).cosine
    out = subprocess.run([sys.executable, "-m", "ffl.compare", a, b, a], cwd=ROOT, capture_output=True,
                         text=True, env=ENV)  # the real command line, once
    assert out.returncode == 0, out.stderr
    assert "chain 2" in out.stdout
    table = [line for line in out.stdout.splitlines() if line.startswith("2:net1")]  # names numbered: net0 twice
    assert float(table[0].split()[1]) == pytest.approx(expected[0], abs=1e-6)
    rc, text, _ = cli(capsys, a, b, "--json")
    js = json.loads(text)
    assert rc == 0 and js["family"] == "mlp" and js["indices"] == [1, 2] and js["names"] == ["net0", "net1"]
    assert [js["chain_cosine"][str(l)][0][1] for l in (1, 2)] == pytest.approx(expected, abs=1e-12)
    assert js["chain_cosine"]["1"][0][0] == pytest.approx(1.0, abs=1e-12)
    # the structure given by a factory, and a whole pickled module only with --trust-pickles
    (tmp_path / "arch.py").write_text("from torch import nn\ndef build():\n    return nn.Sequential("
                                      "nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2))\n")
    js = json.loads(cli(capsys, a, b, "--json", "--like", f"{tmp_path / 'arch.py'}:build")[1])
    assert js["chain_cosine"]["2"][0][1] == pytest.approx(expected[1], abs=1e-12)
    (tmp_path / "train.py").write_text(USER_SCRIPT.replace("net.state_dict()", "net"))
    runpy.run_path("train.py")
    rc, _, err = cli(capsys, a, b)
    assert rc == 2 and "--trust-pickles" in err
    assert cli(capsys, a, b, "--trust-pickles")[0] == 0
    rc, text, _ = cli(capsys, "--help")
    assert rc == 0 and "--trust-pickles" in text and "--like" in text


def test_unsupported_layers_are_named_and_nothing_is_written(tmp_path, capsys):
    cases = [
        (nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 3)), r"'1' \(Conv1d\)"),
        (nn.TransformerEncoderLayer(8, 2), r"'self_attn' \(MultiheadAttention\)"),
        (nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                       nn.Linear(4, 2)), r"'0' \(Conv2d\).*stride-1"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 2)), r"'2' \(Linear\).*global"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), r"'1' \(BatchNorm1d\)"),
        (nn.Sequential(*vgg(), nn.ReLU(), nn.Linear(3, 2)), r"'19' \(Linear\).*one classifier"),
    ]
    for net, message in cases:
        with pytest.raises(TypeError, match=message):
            compare(net, net)
    with pytest.raises(TypeError, match="different families"):
        compare(make("mlp"), make("cnn"))
    with pytest.raises(ValueError, match="chain 1 reads inputs of different sizes"):
        compare(make("mlp"), make("mlp", in_features=12, hidden=(3, 3)))
    with pytest.raises(ValueError, match="upto must be an integer >= 1"):
        compare(make("mlp"), make("mlp"), upto=0)
    bad = nn.Sequential(nn.Linear(12, 5), nn.Conv1d(5, 5, 1))
    torch.save(bad.state_dict(), tmp_path / "bad.pt")
    torch.save(bad, tmp_path / "bad_module.pt")
    before = sorted(tmp_path.iterdir())
    rc, out, err = cli(capsys, tmp_path / "bad_module.pt", tmp_path / "bad_module.pt", "--trust-pickles")
    assert rc == 2 and "'1' (Conv1d)" in err and out == ""
    rc, out, err = cli(capsys, tmp_path / "bad.pt", tmp_path / "bad.pt")  # a 3-D weight: no Linear/Conv2d/BN/GRU
    assert rc == 2 and "'1'" in err and out == ""
    rc, out, err = cli(capsys, tmp_path / "missing.pt", tmp_path / "bad.pt")
    assert rc == 2 and "missing.pt: no such file" in err and out == ""
    assert sorted(tmp_path.iterdir()) == before


def _fitted(kind):
    nets = [make("mlp", seed=s) for s in range(8)]
    features = FeatureConfig(chain_normalize=True)
    per = [features.of(n, kind, upto=2)[1] for n in nets]
    rep = Representation(factors=torch.stack(per)) if kind == "chain" else Representation(vectors=torch.stack(per))
    train = torch.tensor([0, 2, 3, 5, 6, 7])
    proj = fit_projection(rep, train, torch.tensor([0, 1, 0, 1, 0, 1]), 2)
    return nets, rep, proj, features


@pytest.mark.parametrize("kind", ["chain", "layer"])
def test_a_saved_projection_round_trips_exactly_and_scores_as_it_was_fitted(kind, tmp_path, capsys, one_thread):
    nets, rep, proj, features = _fitted(kind)
    path = tmp_path / "theta.safetensors"
    save_projection(proj, rep, path, index=2, kind=kind, features=features, meta={"zoo": "test", "tasks": [0, 1]})
    saved = load_projection(path)
    for name in ("coef", "bias", "train_index"):
        assert torch.equal(getattr(saved.projection, name), getattr(proj, name))
    assert saved.projection.normalize == proj.normalize
    data = rep.factors if kind == "chain" else rep.vectors
    assert torch.equal(saved.train, data[proj.train_index])
    assert (saved.index, saved.kind, saved.features) == (2, kind, features)
    assert saved.meta == {"zoo": "test", "tasks": [0, 1]}
    projected = proj.project(rep, torch.arange(len(nets)))
    for i, net in enumerate(nets):
        torch.testing.assert_close(saved.scores(net), projected[i], rtol=1e-6, atol=1e-9)
    twin = permute_hidden(nets[1], random_hidden_permutations(nets[1], torch.Generator().manual_seed(0)))
    result = compare(nets[1], twin, projection=saved)
    if kind == "chain":  # the learned feature of a chain Gram is as blind to the permutation
        assert result.learned == pytest.approx(1.0, abs=1e-9) and result.learned_index == 2
        torch.save(nets[1].state_dict(), tmp_path / "a.pt")
        torch.save(twin.state_dict(), tmp_path / "b.pt")
        rc, out, _ = cli(capsys, tmp_path / "a.pt", tmp_path / "b.pt", "--projection", path, "--json")
        assert rc == 0 and json.loads(out)["learned"]["index"] == 2
        assert json.loads(out)["learned"]["cosine"][0][1] == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="not a projection"):
        torch.save({}, tmp_path / "other.pt")
        load_projection(tmp_path / "other.pt")


def test_the_readme_example_runs_as_typed_and_prints_ones(capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Compare your own networks", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == "chain 1: 1.000000, chain 2: 1.000000"


def test_import_ffl_stays_light_and_ffl_compare_is_callable():
    code = ("import sys, ffl; assert 'torch' not in sys.modules; import torch; n = torch.nn.Linear(3, 2)\n"
            "print([round(c, 9) for c in ffl.compare(n, n).cosine], callable(ffl.compare), ffl.Projection.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env=ENV)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[1.0]", "True", "Projection"]
