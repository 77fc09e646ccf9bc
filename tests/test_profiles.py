"""Profiles (ffl.profiles): ``extends`` merges a profile over its base; paper_bf16 departs from the
paper profile in the convolutional zoos' precision and in how PlainNet-5 trains on CUDA (zoo.cuda)
only."""
import pytest

import ffl.profiles
from ffl.experiment import check_choices
from ffl.profiles import load_profile
from ffl.zoo import spec_from_profile


def _without_bf16_changes(tree):
    if isinstance(tree, dict):
        return {k: _without_bf16_changes(v) for k, v in tree.items() if k not in ("precision", "cuda")}
    return tree


def test_paper_bf16_is_the_paper_profile_with_bf16_convolutional_zoos():
    paper, bf16 = load_profile("paper"), load_profile("paper_bf16")
    assert _without_bf16_changes(bf16) == _without_bf16_changes(paper)
    for section, archs in (("cifar100", ["cnn", "plainnet6", "resnet5"]), ("tiny_imagenet", ["cnn"]),
                           ("factors", ["cnn", "plainnet6", "resnet5"])):
        for arch in archs:
            assert bf16[section]["zoo"]["arch"][arch]["precision"] == "bf16"
            assert "precision" not in paper[section]["zoo"]["arch"][arch]
    dataset = {"cifar100": "synthetic", "tiny_imagenet": "tiny_imagenet", "namedata": "namedata"}
    for section, arch in (("cifar100", "mlp"), ("tiny_imagenet", "mlp"), ("namedata", "gru")):
        same = [spec_from_profile(p, section, arch=arch, dataset=dataset[section]).identity()
                for p in ("paper", "paper_bf16")]
        assert same[0] == same[1]  # the same zoo, so the same cache entry
    cnn = [spec_from_profile(p, "tiny_imagenet", arch="cnn", dataset="tiny_imagenet") for p in ("paper", "paper_bf16")]
    assert (cnn[0].precision, cnn[1].precision) == ("fp32", "bf16") and cnn[0].identity() != cnn[1].identity()
    check_choices(arch="cnn", dataset="tiny_imagenet", profile="paper_bf16", section="tiny_imagenet")


@pytest.fixture
def profile_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(ffl.profiles, "PROFILE_DIR", tmp_path)
    return tmp_path


def test_extends_merges_mappings_and_replaces_lists_and_values(profile_dir):
    (profile_dir / "base.yaml").write_text(
        "cifar100:\n  projection: {lr: 0.1, epochs: 50, lr_step_epochs: [30, 40]}\n  split: {seed: 1}\n"
        "namedata: {split: {seed: 1}}\n")
    (profile_dir / "child.yaml").write_text(
        "extends: base\ncifar100:\n  projection: {lr: 0.05, lr_step_epochs: [10]}\nbook_dir: b\n")
    (profile_dir / "grandchild.yaml").write_text("extends: child\nnamedata: {}\n")
    assert load_profile("child") == {"cifar100": {"projection": {"lr": 0.05, "epochs": 50, "lr_step_epochs": [10]},
                                                  "split": {"seed": 1}},
                                     "namedata": {"split": {"seed": 1}}, "book_dir": "b"}
    grandchild = load_profile("grandchild")
    assert grandchild["namedata"] == {"split": {"seed": 1}} and grandchild["cifar100"]["projection"]["lr"] == 0.05
    assert load_profile("base")["cifar100"]["projection"]["lr"] == 0.1  # the base is not changed by a child


@pytest.mark.parametrize("files,name,message", [
    ({"a.yaml": "extends: nowhere\n"}, "a", r"unknown profile 'nowhere'; choose one of \['a'\]"),
    ({"a.yaml": "extends: b\n", "b.yaml": "extends: a\n"}, "a", "in a cycle: a -> b -> a"),
    ({"a.yaml": "extends: [b, c]\n"}, "a", "extends: expected the name of one profile"),
])
def test_bad_extends_is_refused_with_its_reason(profile_dir, files, name, message):
    for file, text in files.items():
        (profile_dir / file).write_text(text)
    with pytest.raises(ValueError, match=message):
        load_profile(name)


def _without(tree, keys):
    if isinstance(tree, dict):
        return {k: _without(v, keys) for k, v in tree.items() if k not in keys}
    return tree


def test_the_offline_profiles_change_only_tiny_imagenet_batches():
    paper, bf16 = load_profile("paper"), load_profile("paper_bf16")
    offline, offline_bf16 = load_profile("paper_offline"), load_profile("paper_offline_bf16")
    for changed, base in ((offline, paper), (offline_bf16, bf16)):
        assert {k: v for k, v in changed.items() if k != "tiny_imagenet"} == \
            {k: v for k, v in base.items() if k != "tiny_imagenet"}
        assert _without(changed["tiny_imagenet"], {"batch_size"}) == _without(base["tiny_imagenet"], {"batch_size"})
        assert {a: s["batch_size"] for a, s in changed["tiny_imagenet"]["zoo"]["arch"].items()} == {"mlp": 100, "cnn": 100}
    assert {a: s["batch_size"] for a, s in paper["tiny_imagenet"]["zoo"]["arch"].items()} == {"mlp": 128, "cnn": 128}
    assert offline_bf16["tiny_imagenet"]["zoo"]["arch"]["cnn"]["precision"] == "bf16"


def test_a_dataset_with_fewer_tasks_than_the_profile_asks_gives_all_it_has():
    """The paper profile's 50 CIFAR-100 tasks become all 45 of CIFAR-10 in its place (the run table
    prints the count); other datasets keep the first n."""
    from ffl.zoo import spec_from_profile

    assert spec_from_profile("paper", "cifar100", arch="mlp", dataset="cifar10").tasks == list(range(45))
    assert spec_from_profile("paper", "cifar100", arch="mlp", dataset="cifar100").tasks == list(range(50))
    assert spec_from_profile("laptop", "cifar100", arch="cnn", dataset="cifar10").tasks == list(range(20))
    assert len(spec_from_profile("paper", "cifar100", arch="mlp", dataset="synthetic").tasks) == 50
