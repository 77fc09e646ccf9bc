"""Function feature learning: the kernel form equals SGD on an explicit Θ."""
import math

import pytest
import torch
from torch import nn

from ffl import features
from ffl.chain import chain_factors, chain_gram
from ffl.features import FeatureConfig, ProjectionConfig, Representation, fit_projection, zoo_representations
from ffl.models import MLP
from ffl.protocols import (ProtocolSplit, classification_protocol, classification_split,
                           retrieval_protocol, retrieval_split)


def primal_sgd_scores(x, labels, num_classes, cfg, x_eval):
    """Reference: torch.optim.SGD on a zero-initialized nn.Linear, same minibatch order."""
    if cfg.normalize:
        x, x_eval = nn.functional.normalize(x, dim=1), nn.functional.normalize(x_eval, dim=1)
    lin = nn.Linear(x.shape[1], num_classes).double()
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.SGD(lin.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.lr_step_epochs), cfg.lr_gamma)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), cfg.batch_size):
            b = order[start : start + cfg.batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(lin(x[b]), labels[b]).backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return lin(x_eval)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("batch_size,weight_decay", [(1, 0.0), (3, 0.0), (3, 1e-2)])
def test_kernel_sgd_matches_primal_sgd(normalize, batch_size, weight_decay):
    torch.manual_seed(0)
    x = torch.randn(14, 9, dtype=torch.float64)
    labels = torch.arange(14) % 3
    cfg = ProjectionConfig(lr=0.05, momentum=0.9, weight_decay=weight_decay, epochs=5,
                           lr_step_epochs=(3,), batch_size=batch_size, normalize=normalize, seed=3)
    rep = Representation(vectors=torch.cat([x, torch.randn(5, 9, dtype=torch.float64)]))
    train_index, eval_index = torch.arange(14), torch.arange(19)
    proj = fit_projection(rep, train_index, labels, 3, cfg)
    expected = primal_sgd_scores(x, labels, 3, cfg, rep.vectors[eval_index])
    torch.testing.assert_close(proj.project(rep, eval_index), expected, rtol=1e-9, atol=1e-9)
    assert expected.abs().max() > 1e-3  # it learned something


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_blocked_sgd_takes_the_stepwise_iterates(monkeypatch, batch_size, momentum):
    """Blocks of a few steps (cut inside epochs, the last batch short) give the one-step-at-a-time
    coefficients: the block algebra, not only its final scores."""
    torch.manual_seed(2)
    x = torch.randn(23, 7, dtype=torch.float64)
    labels = torch.arange(23) % 4
    cfg = ProjectionConfig(lr=0.3, momentum=momentum, epochs=4, lr_step_epochs=(2,), batch_size=batch_size, seed=5)
    k = Representation(vectors=x).kernel(torch.arange(23), torch.arange(23))
    onehot = nn.functional.one_hot(labels, 4).double()
    batches, lrs = features.sgd_schedule(23, cfg)
    stepwise = features._sgd_stepwise(k, onehot, batches, lrs, cfg, None)
    monkeypatch.setattr(features, "SGD_BLOCK_POINTS", 5)
    blocked = features._sgd_blocked(k, onehot, batches, lrs, cfg, None)
    for got, want in zip(blocked, stepwise):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert stepwise[0].abs().max() > 1e-2


@pytest.mark.parametrize("d,n", [(6, 2), (4, 30)])  # implicit and explicit paths
def test_chain_kernel_equals_explicit_gram_inner_products(d, n):
    torch.manual_seed(1)
    factors = torch.randn(5, d, n)
    rep = Representation(factors=factors)
    vec_g = torch.stack([chain_gram(c).flatten() for c in factors.double()])
    idx = torch.arange(5)
    torch.testing.assert_close(rep.inner(idx, idx), vec_g @ vec_g.T, rtol=1e-5, atol=0)
    cos = nn.functional.normalize(vec_g, dim=1)
    torch.testing.assert_close(rep.kernel(idx[:2], idx, normalize=True), cos[:2] @ cos.T, rtol=1e-5, atol=1e-7)
    assert rep.dim == d * d


def test_kernel_blocks_read_the_cached_matrix_exactly():
    """``inner`` is exactly the entries [rows][:, cols] of the N × N matrix (rows and columns in any
    order, repeated), ``squared_norms`` its diagonal (a copy), ``kernel`` the cosine from them,
    with no copy of the whole matrix on the way."""
    torch.manual_seed(3)
    x = torch.randn(9, 5, dtype=torch.float64)
    full = x @ x.T
    rep = Representation(inner_products=full.clone(), inner_dim=5)
    rows, cols = torch.tensor([4, 0, 7, 4]), torch.tensor([8, 1, 1, 3, 0])
    assert torch.equal(rep.inner(rows, cols), full[rows][:, cols])
    assert torch.equal(rep.squared_norms(), full.diagonal())
    norms = full.diagonal().sqrt()
    assert torch.equal(rep.kernel(rows, cols), full[rows][:, cols] / norms[rows, None] / norms[None, cols])
    assert torch.equal(rep.kernel(rows, cols, normalize=False), full[rows][:, cols])
    rep.squared_norms().zero_()  # a copy: the cached matrix is untouched
    assert torch.equal(rep.inner(torch.arange(9), torch.arange(9)), full)


def test_representations_of_mlps():
    models = [MLP(in_features=12, hidden=(5, 4), num_classes=2) for _ in range(3)]
    chains = zoo_representations(models, "chain")
    layers = zoo_representations(models, "layer")
    assert len(chains) == len(layers) == 3
    torch.testing.assert_close(chains[1].factors[2], chain_factors(models[2])[1])
    assert layers[0].vectors.shape == (3, 12 * 5)
    with pytest.raises(ValueError, match="'chain' or 'layer'"):
        zoo_representations(models, "weights")


def test_bad_inputs():
    with pytest.raises(ValueError, match="exactly one"):
        Representation()
    with pytest.raises(ValueError, match="unknown projection settings"):
        ProjectionConfig.from_dict({"learning_rate": 1})
    with pytest.raises(ValueError, match="strictly between"):
        ProtocolSplit(query_fraction=1.0)


def clustered(num_tasks=5, runs=10, dim=8, noise=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_tasks, dim, generator=gen)
    tasks = torch.arange(num_tasks).repeat_interleave(runs)
    x = centres[tasks] + noise * torch.randn(len(tasks), dim, generator=gen)
    return Representation(vectors=x), tasks, torch.arange(runs).repeat(num_tasks)


def test_protocols_separate_clustered_tasks_and_fail_on_noise():
    cfg = ProjectionConfig(lr=0.1, epochs=20)
    rep, tasks, runs = clustered()
    assert classification_protocol(rep, tasks, runs, cfg)["top1"] == 1.0
    assert retrieval_protocol(rep, tasks, runs, cfg)["rank1"] == 1.0
    noise_rep, _, _ = clustered(noise=100.0)
    assert classification_protocol(noise_rep, tasks, runs, cfg)["top1"] < 0.7


def test_split_sizes_follow_the_paper():
    tasks = torch.arange(50).repeat_interleave(100)
    runs = torch.arange(100).repeat(50)
    train, test = classification_split(tasks, runs)
    assert len(train) == 50 * 60 and len(test) == 50 * 40
    assert all((tasks[train] == t).sum() == 60 for t in range(50))
    seen, query, gallery = retrieval_split(tasks, runs)
    assert len(tasks[seen].unique()) == 30 and len(seen) == 3000
    assert len(query) == 20 * 20 and len(gallery) == 20 * 80
    assert not set(tasks[seen].tolist()) & set(tasks[query].tolist())
    assert set(tasks[query].tolist()) == set(tasks[gallery].tolist())
    again = retrieval_split(tasks, runs)
    assert all(torch.equal(a, b) for a, b in zip((seen, query, gallery), again))
    other = retrieval_split(tasks, runs, ProtocolSplit(seed=1))
    assert not torch.equal(other[1], query)


def test_feature_config_from_profile_settings():
    assert FeatureConfig.from_dict(None) == FeatureConfig()
    assert FeatureConfig.from_dict({"gru_lags": 0, "gru_recurrent": False}).gru_lags == 0
    with pytest.raises(ValueError, match="unknown feature settings \\['chain_norm'\\]; choose from"):
        FeatureConfig.from_dict({"chain_norm": True})


@pytest.mark.parametrize("normalize", [False, True])
def test_centred_projection_is_sgd_on_explicitly_centred_features(normalize):
    """``center=True`` learns Θ on x − μ (μ: the mean of the training networks' features, after
    unit-norm scaling when ``normalize``): the same scores as the plain kernel SGD on vectors
    centred by hand, for training and held-out networks alike."""
    torch.manual_seed(4)
    x = torch.randn(20, 6, dtype=torch.float64) + 3.0  # a large shared component
    labels = torch.arange(14) % 3
    train, held_out = torch.arange(14), torch.arange(14, 20)
    cfg = ProjectionConfig(lr=0.1, momentum=0.9, epochs=4, lr_step_epochs=(2,), batch_size=2, normalize=normalize,
                           center=True, seed=1)
    proj = fit_projection(Representation(vectors=x), train, labels, 3, cfg)
    unit = nn.functional.normalize(x, dim=1) if normalize else x
    centred = Representation(vectors=unit - unit[train].mean(dim=0))
    ref = fit_projection(centred, train, labels, 3, ProjectionConfig(**{**cfg.__dict__, "center": False, "normalize": False}))
    everyone = torch.arange(20)
    torch.testing.assert_close(proj.project(Representation(vectors=x), everyone), ref.project(centred, everyone),
                               rtol=1e-9, atol=1e-9)


def test_projection_reports_its_fit_on_the_training_networks():
    """``train_top1`` / ``train_loss`` are Θ's accuracy and mean cross-entropy on its own training
    networks, as computed from its projected scores independently."""
    torch.manual_seed(5)
    x = torch.randn(30, 8, dtype=torch.float64)
    labels = torch.arange(30) % 3
    rep = Representation(vectors=x)
    losses = {}
    for lr in (1e-3, 0.1):
        proj = fit_projection(rep, torch.arange(30), labels, 3, ProjectionConfig(lr=lr, epochs=3, lr_step_epochs=()))
        scores = proj.project(rep, torch.arange(30))
        assert proj.train_top1 == pytest.approx(float((scores.argmax(1) == labels).double().mean()))
        assert proj.train_loss == pytest.approx(float(nn.functional.cross_entropy(scores, labels)))
        losses[lr] = proj.train_loss
    # lr 1e-3 on unit-norm features barely leaves the start (loss log 3); lr 0.1 does
    assert abs(losses[1e-3] - math.log(3)) < 0.05 and losses[0.1] < math.log(3) - 0.1


def test_classification_protocol_reports_thetas_fit():
    torch.manual_seed(6)
    tasks = torch.arange(4).repeat_interleave(5)
    rep = Representation(vectors=torch.randn(20, 10, dtype=torch.float64) + 5 * nn.functional.one_hot(tasks, 10))
    out = classification_protocol(rep, tasks, torch.arange(20) % 5, ProjectionConfig(lr=0.1))
    assert set(out) == {"top1", "theta_top1", "theta_loss"}
    assert out["theta_top1"] == 1.0 and out["top1"] == 1.0 and 0 < out["theta_loss"] < 1.0
