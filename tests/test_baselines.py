"""ffl.baselines: the unsupervised protocols find clustered networks and stay near chance on noise;
the one-product CKA is ffl.cka's; weight matching recognises a permuted copy; every method runs on a
zoo under the paper's splits with positive costs; the profile settings are checked."""
import math

import pytest
import torch

from ffl.baselines import (COLUMNS, BaselineConfig, centred_kernel, cka_matrices, compare_methods, probe_batches,
                           unsupervised_protocols, weight_matching_pairs)
from ffl.cka import linear_cka, network_cka
from ffl.features import FeatureConfig, ProjectionConfig
from ffl.models import build_model
from ffl.permute import permute_hidden, random_hidden_permutations
from ffl.protocols import ProtocolSplit, classification_split, retrieval_split
from ffl.zoo import ZooSpec, train_zoo

SPLIT = ProtocolSplit(seed=0)


def labels(n_tasks, n_runs):
    return torch.arange(n_tasks).repeat_interleave(n_runs), torch.arange(n_runs).repeat(n_tasks)


def cosines(x):
    x = torch.nn.functional.normalize(x.double(), dim=1)
    return x @ x.T


def test_unsupervised_protocols_find_clusters_and_stay_near_chance_on_noise():
    tasks, runs = labels(10, 10)
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 50, generator=gen)
    clustered = centres[tasks] + 0.1 * torch.randn(100, 50, generator=gen)
    out = unsupervised_protocols(cosines(clustered), tasks, runs, SPLIT)
    assert out["classification"]["top1"] == 1.0 and out["retrieval"]["rank1"] == 1.0
    assert out["retrieval"]["mAP"] == 1.0
    noise = unsupervised_protocols(cosines(torch.randn(100, 50, generator=gen)), tasks, runs, SPLIT)
    assert noise["classification"]["top1"] < 0.3  # chance: 10 %
    assert noise["retrieval"]["mAP"] < 0.6  # chance for 4 unseen tasks: about 1/4 of the gallery relevant


def test_unscored_pairs_are_never_the_nearest_neighbour():
    tasks, runs = labels(4, 5)
    sim = torch.full((20, 20), math.nan, dtype=torch.float64)
    train, test = classification_split(tasks, runs, SPLIT)
    _, query, gallery = retrieval_split(tasks, runs, SPLIT)
    sim[query[:, None], gallery] = (tasks[query, None] == tasks[gallery]).double()
    one_per_task = torch.stack([train[tasks[train] == t][0] for t in range(4)])
    sim[test[:, None], one_per_task] = (tasks[test, None] == tasks[one_per_task]).double()
    out = unsupervised_protocols(sim, tasks, runs, SPLIT)
    assert out["classification"]["top1"] == 1.0 and out["retrieval"]["rank1"] == 1.0


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_in_one_product_equals_ffl_cka(unbiased, one_thread):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 12, generator=gen).double(), torch.randn(30, 7, generator=gen).double()
    y = y + 0.5 * x[:, :7]
    ours = float(centred_kernel(x, unbiased=unbiased) @ centred_kernel(y, unbiased=unbiased))
    assert ours == pytest.approx(linear_cka(x, y, unbiased=unbiased), abs=1e-12)
    nets = [build_model("mlp", 3, in_features=12, hidden=(9, 8)) for _ in range(3)]
    mats, forward, seconds = cka_matrices(nets, [x.float()], unbiased=unbiased)
    assert len(mats) == 3 and forward > 0 and all(s > 0 for s in seconds)  # two hidden layers, then the outputs
    assert mats[0][0, 1].item() == pytest.approx(network_cka(nets[0], nets[1], x.float(), unbiased=unbiased)[0],
                                                 abs=1e-9)
    assert torch.allclose(mats[1].diagonal(), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("arch, kw", [("mlp", dict(in_features=20, hidden=(12, 10, 8))),
                                      ("cnn", dict(widths=(4, 6, 6, 8)))], ids=["mlp", "cnn"])
def test_weight_matching_finds_a_permuted_copy_at_every_index_and_it_wins(arch, kw, one_thread):
    torch.manual_seed(0)
    nets = [build_model(arch, 3, **kw).eval() for _ in range(3)]
    nets.append(permute_hidden(nets[0], random_hidden_permutations(nets[0], torch.Generator().manual_seed(4))))
    pairs = [(0, 1), (0, 2), (0, 3)]
    sims, secs = weight_matching_pairs(nets, pairs, FeatureConfig(fold_bn=False))
    assert sims[(0, 3)] == pytest.approx([1.0] * len(sims[(0, 3)]), abs=1e-6)  # float32 features
    assert all(max(sims[(0, 1)][l], sims[(0, 2)][l]) < 0.99 for l in range(len(sims[(0, 3)])))
    assert all(s > 0 for s in secs.values())


def test_weight_matching_runs_on_one_thread_and_gives_the_callers_threads_back():
    """Its small assignment problems run single-threaded (a thread team's hand-offs cost more than
    the ops, many times more on shared cores); the caller's thread count is restored, also on error."""
    nets = [build_model("mlp", 3, in_features=8, hidden=(5, 4)).eval() for _ in range(2)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        weight_matching_pairs(nets, [(0, 1)], FeatureConfig())
        assert torch.get_num_threads() == 2
        with pytest.raises(IndexError):
            weight_matching_pairs(nets, [(0, 5)], FeatureConfig())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_every_method_runs_on_a_zoo_under_the_papers_splits(tmp_path, one_thread):
    spec = ZooSpec.from_dict(dict(arch="mlp", dataset="synthetic", tasks=[0, 1, 2, 3, 4], runs=5,
                                  model_kwargs={"hidden": [6, 6, 6]}, epochs=2, lr=0.05, lr_step_epochs=[1],
                                  batch_size=64, momentum=0.9, data_kwargs={"n_train": 64, "n_test": 16}))
    zoo = train_zoo(spec, tmp_path / "zoo", progress=False)
    cfg = BaselineConfig(probe_size=10, references_per_task=2)
    probe = probe_batches(spec, cfg.probe_size)
    assert [tuple(p.shape) for p in probe] == [(10, 3, 32, 32)]
    table = compare_methods(zoo, split=SPLIT, projection=ProjectionConfig(epochs=2), features=FeatureConfig(),
                            config=cfg, probe=probe, progress=False)
    assert list(table.columns) == COLUMNS
    modes = set(zip(table["method"], table["mode"]))
    assert modes == {("chain", "unsupervised"), ("chain", "learned"), ("layer", "unsupervised"),
                     ("layer", "learned"), ("cka", "unsupervised"), ("weight_matching", "unsupervised")}
    assert set(table["index"]) == {1, 2, 3, 4} and (table["us_per_pair"] > 0).all()
    assert table["value"].between(0, 1).all()
    train, test = classification_split(zoo.tasks, zoo.runs, SPLIT)
    wm = table[(table.method == "weight_matching") & (table.protocol == "classification")]
    assert set(wm["reference"]) == {10} and set(wm["scored"]) == {len(test)}  # 2 runs of each of 5 tasks
    assert set(wm["pairs"]) == {10 * len(test)}
    ffl = table[(table.method == "chain") & (table.protocol == "classification")]
    assert set(ffl["reference"]) == {len(train)} and set(ffl["pairs"]) == {25 * 26 // 2}


def test_settings_of_a_profile_section_are_checked():
    cfg = BaselineConfig.from_section({"probe": {"size": 64, "unbiased": False},
                                       "weight_matching": {"max_sweeps": 10, "references_per_task": None}})
    assert cfg == BaselineConfig(probe_size=64, unbiased=False, max_sweeps=10)
    with pytest.raises(ValueError, match="unknown beyond settings"):
        BaselineConfig.from_section({"probe": {"sise": 64}})
    with pytest.raises(ValueError, match="probe size"):
        BaselineConfig.from_section({"probe": {"size": 2}})
