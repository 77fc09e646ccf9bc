"""The CNN-gap study's diagnostics (ffl.gap) against independent computations."""
from pathlib import Path

import torch

from ffl.features import Representation
from ffl.gap import drift, gram_cosines, initial_model
from ffl.zoo import ZooSpec, train_zoo

REPO = Path(__file__).resolve().parent.parent


def small_cnn_spec(**kw) -> ZooSpec:
    base = dict(arch="cnn", dataset="synthetic", tasks=[0, 1], runs=2, model_kwargs={"widths": [4, 4, 8, 8]},
                epochs=1, lr=0.05, lr_step_epochs=[], batch_size=32, momentum=0.0, weight_decay=0.0,
                data_kwargs={"n_train": 32, "n_test": 16})
    base.update(kw)
    return ZooSpec.from_dict(base)


def test_initial_model_rebuilds_each_networks_start(tmp_path):
    """With a learning rate of 1e-12 training leaves the weights where they started: the rebuilt
    start W₀ is the trained network to rounding (drift ~0), and another network's start is not."""
    zoo = train_zoo(small_cnn_spec(lr=1e-12), tmp_path / "still", progress=False)
    d = drift(zoo)
    assert len(d) == len(zoo) * 5 and d["drift"].max() < 1e-6
    other = initial_model(zoo, 1).state_dict()["convs.0.weight"]
    assert (zoo.state_dict(0)["convs.0.weight"] - other).norm() > 0.5 * other.norm()
    moved = drift(train_zoo(small_cnn_spec(lr=0.5), tmp_path / "moved", progress=False))
    assert moved["drift"].min() > 1e-3


def test_gram_cosines_against_explicit_vectors():
    torch.manual_seed(0)
    tasks = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    x = torch.randn(8, 5, dtype=torch.float64) + torch.nn.functional.one_hot(tasks, 5) * 2 + 1.0
    out = gram_cosines(Representation(vectors=x), tasks)
    unit = torch.nn.functional.normalize(x, dim=1)
    centred = torch.nn.functional.normalize(unit - unit.mean(0), dim=1)
    for name, v in (("cos", unit), ("centred_cos", centred)):
        k = v @ v.T
        within = [k[i, j] for i in range(8) for j in range(8) if i != j and tasks[i] == tasks[j]]
        between = [k[i, j] for i in range(8) for j in range(8) if tasks[i] != tasks[j]]
        assert abs(out[f"{name}_within"] - float(torch.stack(within).mean())) < 1e-12
        assert abs(out[f"{name}_between"] - float(torch.stack(between).mean())) < 1e-12
    assert out["centred_cos_within"] > out["centred_cos_between"]


def _study_profile(tmp_path, monkeypatch, **changes) -> str:
    """A profile holding smoke's tiny ImageNet section and its cnn_gap section with ``changes``."""
    import yaml

    import ffl.profiles

    smoke = yaml.safe_load((REPO / "profiles" / "smoke.yaml").read_text())
    study = {**smoke["cnn_gap"], **changes}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({"tiny_imagenet": smoke["tiny_imagenet"], "cnn_gap": study},
                                                        allow_unicode=True))
    monkeypatch.setattr(ffl.profiles, "PROFILE_DIR", tmp_path)
    return "study"


def test_feature_variants_need_a_zoo_of_the_grid(tmp_path, monkeypatch):
    import pytest

    from ffl.gap import StudySettings
    from ffl.profiles import ProfileError

    with pytest.raises(ValueError, match=r"profiles/study.yaml: cnn_gap.feature_zoo: 'nowhere' is not one of its zoos"):
        StudySettings.from_profile(_study_profile(tmp_path, monkeypatch, feature_zoo="nowhere"))
    with pytest.raises(ProfileError, match=r"cnn_gap.features.folded.fold_batchnorm"):
        StudySettings.from_profile(_study_profile(tmp_path, monkeypatch, features={"folded": {"fold_batchnorm": True}}))
    study = StudySettings.from_profile(_study_profile(tmp_path, monkeypatch))
    assert study.feature_zoo in study.zoos and study.features["BatchNorm folded"] == {"fold_bn": True}


def test_cpu_throughput_measures_each_width_in_the_chunk_its_zoo_trains_in(tmp_path, monkeypatch):
    """One measurement per width, in default_batch_networks' chunk for a zoo of 64+ networks; the
    rates come from the bench (stubbed here: the smoke book runs it for real); a profile without
    widths is refused by name."""
    import pytest

    import ffl.bench.engine
    from ffl.gap import cpu_throughput
    from ffl.zoo import default_batch_networks

    calls = []

    def fake_sweep(widths, chunks, *, batch, steps, repeat):
        calls.append((widths, chunks, batch, steps, repeat))
        return [{"ms_per_network_step": float(sum(widths)), "model_gflops": 1.0, "gemm_gflops": 4.0,
                 "fraction_of_gemm": 0.25}]

    monkeypatch.setattr(ffl.bench.engine, "chunk_sweep", fake_sweep)
    profile = _study_profile(tmp_path, monkeypatch, throughput={"widths": [[8, 16, 32, 64], [32, 64, 128, 256]],
                                                                "steps": 3, "repeat": 1})
    table = cpu_throughput(profile)
    wide = ZooSpec(arch="cnn", dataset="synthetic", tasks=[0], runs=64, model_kwargs={"widths": [32, 64, 128, 256]})
    assert list(table["widths"]) == ["8–16–32–64", "32–64–128–256"]
    assert calls[1] == ([32, 64, 128, 256], (default_batch_networks(wide, "cpu"),), 16, 3, 1)
    assert list(table["chunk"]) == [c[1][0] for c in calls] and table["chunk"].iloc[1] < table["chunk"].iloc[0]
    assert list(table["ms per network-step"]) == [120.0, 480.0] and set(table["fraction of GEMM"]) == {0.25}
    with pytest.raises(ValueError, match=r"profiles/study.yaml: cnn_gap.throughput.widths names no widths"):
        cpu_throughput(_study_profile(tmp_path, monkeypatch, throughput={"steps": 3}))


def test_cifar10_pairs_overlap_and_errors_are_counted_by_where_they_land():
    """The first 20 of CIFAR-10's round-robin pairs use each class 4 times: every task shares a
    class with 6 others (3 per class); tiny ImageNet's tasks share none. Errors are counted against
    an explicit list, and the note says the errors gather only when they do."""
    import itertools

    from ffl.data.tasks import cifar10_pairs
    from ffl.gap import error_landing, shared_class_tasks
    from ffl.report import overlap_note

    tasks = list(range(20))
    sharing = shared_class_tasks("cifar10", tasks)
    pairs = cifar10_pairs()[:20]
    for t, u in itertools.permutations(tasks, 2):
        assert (u in sharing[t]) == bool(set(pairs[t]) & set(pairs[u]))
    assert {len(v) for v in sharing.values()} == {6}
    assert not any(shared_class_tasks("tiny_imagenet", tasks).values())

    u = next(x for x in tasks if x not in sharing[0] and x != 0)
    s = next(iter(sharing[0]))
    true = torch.tensor([0, 0, 0, 0, 1, 1])
    predicted = torch.tensor([0, s, s, u, 1, 1])
    landing = error_landing(true, predicted, sharing)
    assert landing == {"errors": 3, "to a task sharing a class": 2, "share": 2 / 3, "share at random": 6 / 19}
    assert error_landing(true, true, sharing)["errors"] == 0

    import pandas as pd

    gathered = pd.DataFrame([{"index": 1, **landing}, {"index": 2, **error_landing(true, true, sharing)}]).set_index("index")
    note = overlap_note(gathered, sharing, "CIFAR-10")
    assert "shares a class with 6 of the others" in note and "chain 1: 2 of 3 (67 %" in note
    assert "chain 2: no error" in note and "The errors gather" in note
    spread = pd.DataFrame([{"index": 1, **error_landing(true, torch.tensor([0, u, u, u, 1, 1]), sharing)}]).set_index("index")
    assert "The errors gather" not in overlap_note(spread, sharing, "CIFAR-10")
    assert overlap_note(None, shared_class_tasks("tiny_imagenet", tasks), "tiny ImageNet").startswith("The tasks of this zoo share no class")
    perfect = pd.DataFrame([{"index": i, **error_landing(true, true, sharing)} for i in (1, 2)]).set_index("index")
    assert overlap_note(perfect, sharing, "CIFAR-10").endswith("every held-out network into its own task at indices 1, 2 all the same.")
