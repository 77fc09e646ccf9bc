"""Cross-condition protocol (§4.4, Figure 5): Θ learned on one zoo, applied to another."""
import copy

import pytest
import torch

from ffl.features import ProjectionConfig, Representation, zoo_representations
from ffl.models import MLP
from ffl.permute import permute_hidden, random_hidden_permutations
from ffl.protocols import classification_protocol, cross_condition_protocol, retrieval_protocol

TASKS, RUNS = 10, 20
CFG = ProjectionConfig(lr=0.2, epochs=10)


def _jitter(model: MLP, noise: float, gen: torch.Generator) -> MLP:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return out


@pytest.fixture(scope="module")
def zoos():
    """A zoo whose runs are noisy copies of one network per task, each with its hidden units in a
    random order; the same zoo with every network permuted again; and unrelated random networks."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    protos = [MLP(in_features=12, hidden=(6, 5), num_classes=3) for _ in range(TASKS)]
    source = [permute_hidden(m, random_hidden_permutations(m, gen))
              for m in (_jitter(protos[t], 0.05, gen) for t in range(TASKS) for _ in range(RUNS))]
    permuted = [permute_hidden(m, random_hidden_permutations(m, gen)) for m in source]
    unrelated = [MLP(in_features=12, hidden=(6, 5), num_classes=3) for _ in source]
    tasks = torch.arange(TASKS).repeat_interleave(RUNS)
    runs = torch.arange(RUNS).repeat(TASKS)
    return source, permuted, unrelated, tasks, runs


def _within(rep, tasks, runs):
    return {"classification": classification_protocol(rep, tasks, runs, CFG),
            "retrieval": retrieval_protocol(rep, tasks, runs, CFG)}


def test_a_permuted_copy_of_the_zoo_scores_as_the_zoo_itself(zoos):
    source, permuted, _, tasks, runs = zoos
    for index, (rep_s, rep_p) in enumerate(zip(zoo_representations(source, "chain"),
                                               zoo_representations(permuted, "chain")), 1):
        within = _within(rep_s, tasks, runs)
        cross = cross_condition_protocol(rep_s, rep_p, tasks, runs, CFG)
        assert within["classification"]["top1"] > 0.9, index  # the fixture separates tasks
        assert cross["classification"]["top1"] == within["classification"]["top1"], index
        for metric, value in within["retrieval"].items():
            assert cross["retrieval"][metric] == pytest.approx(value, abs=1e-9), (index, metric)
    # not a trivial equality: the permuted copy's raw weights differ from the source's
    rep_s, rep_p = zoo_representations(source, "layer")[0], zoo_representations(permuted, "layer")[0]
    assert (rep_s.vectors - rep_p.vectors).abs().amax(dim=1).min() > 1e-3


def test_unrelated_networks_fall_to_chance(zoos):
    source, _, unrelated, tasks, runs = zoos
    rep_s, rep_u = zoo_representations(source, "chain")[0], zoo_representations(unrelated, "chain")[0]
    within = _within(rep_s, tasks, runs)
    cross = cross_condition_protocol(rep_s, rep_u, tasks, runs, CFG)
    assert within["classification"]["top1"] > 0.9 and within["retrieval"]["rank1"] > 0.9
    assert cross["classification"]["top1"] < 1 / TASKS + 0.2  # 80 test runs: chance 0.1 ± 0.03
    assert cross["retrieval"]["rank1"] < 0.25 + 0.35  # 4 unseen tasks: chance about 0.25


def test_other_widths_are_padded_and_other_sizes_refused():
    a = Representation(factors=torch.randn(4, 6, 3))
    b = Representation(factors=torch.randn(4, 6, 5))
    tasks, runs = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    from ffl.protocols import _join
    joined = _join(a, b)
    assert joined.factors.shape == (8, 6, 5)
    every = torch.arange(8)
    torch.testing.assert_close(joined.inner(every[:4], every[:4]), a.inner(every[:4], every[:4]), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="different size"):
        cross_condition_protocol(a, Representation(factors=torch.randn(4, 7, 3)), tasks, runs)
    with pytest.raises(ValueError, match="different length"):
        cross_condition_protocol(Representation(vectors=torch.randn(4, 3)),
                                 Representation(vectors=torch.randn(4, 4)), tasks, runs)
    with pytest.raises(ValueError, match="one network per"):
        cross_condition_protocol(a, Representation(factors=torch.randn(3, 6, 3)), tasks, runs)


def test_factor_settings_put_the_baseline_first_and_merge_model_kwargs():
    from ffl.experiment import factor_settings
    from ffl.zoo import spec_from_profile

    named = factor_settings("smoke")
    assert list(named) == ["Baseline", "Depth", "Res5", "Adam", "Leaky"]
    leaky = named["Leaky"]
    assert leaky["arch"] == "cnn" and leaky["overrides"]["model_kwargs"] == {"widths": [4, 8, 8, 16],
                                                                           "activation": "leaky_relu"}
    adam = spec_from_profile("smoke", "factors", arch="cnn", dataset="synthetic", **named["Adam"]["overrides"])
    assert adam.optimizer == "adam" and adam.lr == 0.001 and adam.epochs == 6
    for profile in ("laptop", "paper"):  # every profile describes the five settings
        assert list(factor_settings(profile)) == list(named)
