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
