"""Profiles (ffl.profiles): ``extends`` merges a profile over its base; paper_bf16 departs from the
paper profile in the convolutional zoos' precision and in how PlainNet-5 trains on CUDA (zoo.cuda)
only."""
import pytest

import ffl.profiles
from ffl.data import num_tasks
from ffl.experiment import check_choices
from ffl.features import FeatureConfig, ProjectionConfig
from ffl.models import ARCHS
from ffl.profile_settings import SECTIONS, load
from ffl.profiles import load_profile
from ffl.protocols import ProtocolSplit
from ffl.zoo import ZooSpec, cuda_engine_from_profile, spec_from_profile

SMOKE_TEXT = (ffl.profiles.PROFILE_DIR / "smoke.yaml").read_text()


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


# --------------------------------------------------------------------------------------------
# The profile parsed once, typed (ffl.profile_settings)
# --------------------------------------------------------------------------------------------


def _old_for_arch(setting, arch):
    """How the library picked a section's per-arch setting before it was typed (a dict path)."""
    setting = dict(setting or {})
    return dict(setting[arch] or {}) if any(k in ARCHS for k in setting) else setting


def _old_spec(raw, section, arch, dataset, **overrides):
    zoo = raw[section]["zoo"]
    n_tasks = zoo["tasks"] if dataset == "synthetic" else min(zoo["tasks"], num_tasks(dataset))
    return ZooSpec.from_dict({"arch": arch, "dataset": dataset, "tasks": list(range(n_tasks)), "runs": zoo["runs"],
                              "seed": 0, "data_root": None, "download": False,
                              "data_kwargs": dict(zoo.get("data_kwargs", {}).get(dataset, {})),
                              **zoo["arch"][arch], **overrides})


@pytest.mark.parametrize("name", ffl.profiles.available_profiles())
def test_the_typed_settings_are_what_the_dict_paths_gave(name):
    """Every committed profile: each section's spec (every arch, every dataset it names), Θ's
    training, the splits, the features and the CUDA engine, typed, equal what the YAML's dicts gave."""
    raw, typed = load_profile(name), load(name)
    assert set(typed.sections) == {s for s in SECTIONS if s in raw} and typed.settings == raw
    for key, section in typed.sections.items():
        settings = raw[key]
        datasets = {"synthetic", *settings["zoo"].get("data_kwargs", {})} & {"synthetic", key, "cifar10"}
        for arch in settings["zoo"]["arch"]:
            for dataset in sorted(datasets):
                assert section.spec(arch=arch, dataset=dataset).to_dict() == \
                    _old_spec(raw, key, arch, dataset).to_dict(), (key, arch, dataset)
            assert section.spec(arch=arch, dataset="synthetic", runs=2, epochs=1).identity() == \
                _old_spec(raw, key, arch, "synthetic", runs=2, epochs=1).identity()
            for seed in (0, 5):
                assert section.projection_for(arch, seed=seed) == ProjectionConfig.from_dict(
                    {"seed": seed, **_old_for_arch(settings.get("projection"), arch)})
                assert section.split_for(seed) == ProtocolSplit(**{"seed": seed, **settings.get("split", {})})
            assert section.features_for(arch) == FeatureConfig.from_dict(_old_for_arch(settings.get("features"), arch))
            engine = dict(settings["zoo"].get("cuda", {}).get(arch) or {})
            assert section.cuda_engine(arch) == engine == cuda_engine_from_profile(name, key, arch=arch)


def test_a_profile_is_read_and_typed_once_per_process_and_again_when_it_changes(profile_dir, monkeypatch):
    (profile_dir / "base.yaml").write_text("cifar100:\n  projection: {lr: 0.1}\n")
    (profile_dir / "child.yaml").write_text("extends: base\ncifar100:\n  split: {seed: 3}\n")
    parsed = []
    real = ffl.profiles.yaml.load
    monkeypatch.setattr(ffl.profiles.yaml, "load", lambda *a, **kw: parsed.append(1) or real(*a, **kw))
    first = load("child")
    assert load("child") is first and len(parsed) == 2  # two files, each parsed once
    assert load_profile("child") == first.settings and ffl.profiles.profile_files("child") == list(first.files)
    assert len(parsed) == 2  # the raw reading shares the parse
    first.settings["cifar100"]["split"]["seed"] = 9  # a copy: the loaded profile does not change
    assert first.section("cifar100").split_for(0).seed == 3
    (profile_dir / "base.yaml").write_text("cifar100:\n  projection: {lr: 0.2}\n")  # a base changes
    second = load("child")
    assert second is not first and second.section("cifar100").projection_for("mlp").lr == 0.2
    assert len(parsed) == 3  # only the changed file is parsed again


def test_a_chapter_reads_its_profile_once(profile_dir, monkeypatch):
    """The walk from a chapter's first cell to its zoo: check_choices reads and types the profile;
    the provenance table, the spec, Θ, the splits and the features come from that one reading."""
    from ffl import provenance

    (profile_dir / "smoke.yaml").write_text(SMOKE_TEXT)
    parsed = []
    real = ffl.profiles.yaml.load
    monkeypatch.setattr(ffl.profiles.yaml, "load", lambda *a, **kw: parsed.append(1) or real(*a, **kw))
    section = check_choices(arch="mlp", dataset="synthetic", profile="smoke", section="cifar100")
    provenance.profile_record("smoke")
    section.spec(arch="mlp", dataset="synthetic", seed=1)
    section.projection_for("mlp", seed=1), section.split_for(1), section.features_for("mlp")
    check_choices(arch="mlp", dataset="synthetic", profile="smoke", section="cifar100")  # a second chapter
    assert len(parsed) == 1


class _Stop(Exception):
    pass


def _counting(monkeypatch, module, names):
    calls = []
    for name in names:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    return calls


def test_run_experiment_takes_the_checked_section_and_does_not_check_again(monkeypatch, tmp_path):
    import ffl.experiment as experiment

    section = check_choices(arch="mlp", dataset="synthetic", profile="smoke", section="cifar100")
    calls = _counting(monkeypatch, experiment, ["check_choices", "check_factors", "load"])
    monkeypatch.setattr(experiment, "train_zoo", lambda spec, *a, **kw: (calls.append(spec), _raise())[1])
    with pytest.raises(_Stop):
        experiment.run_experiment(section, arch="mlp", dataset="synthetic", seed=2, cache_dir=tmp_path, progress=False)
    assert calls == [section.spec(arch="mlp", dataset="synthetic", seed=2)]  # trained straight away
    calls.clear()
    with pytest.raises(_Stop):  # by name: checked here, as before
        experiment.run_experiment("cifar100", profile="smoke", arch="mlp", dataset="synthetic", cache_dir=tmp_path)
    assert calls[0] == "check_choices"


def test_the_factors_chapter_checks_every_setting_once(monkeypatch, tmp_path):
    """check_factors checks each setting's zoo (its overrides applied) in the first cell; run_factors
    and the run_experiment of each setting do not check again."""
    import ffl.experiment as experiment

    checked = _counting(monkeypatch, experiment, ["_check_zoo"])
    section = experiment.check_factors(profile="smoke", dataset="synthetic", seed=0)
    assert len(checked) == len(experiment.factor_settings(section)) == 5
    calls = _counting(monkeypatch, experiment, ["check_choices", "check_factors", "_check_zoo", "load"])
    trained = []
    monkeypatch.setattr(experiment, "train_zoo", lambda spec, *a, **kw: (trained.append(spec), _raise())[1])
    with pytest.raises(_Stop):
        experiment.run_factors(section, dataset="synthetic", cache_dir=tmp_path, progress=False)
    assert calls == [] and trained[0].arch == "cnn"


def _raise():
    raise _Stop


@pytest.mark.parametrize("text,message", [
    ("cifar100:\n  zoo: {tasks: 2.5}\n", r"cifar100\.zoo\.tasks: expected an integer, got 2\.5"),
    ("cifar100:\n  zoo: {arch: {mlp: {lr: fast}}}\n", r"cifar100\.zoo\.arch\.mlp\.lr: expected a number"),
    ("cifar100:\n  zoo: {data_kwargs: {synthetic: {n_train: many}}}\n",
     r"cifar100\.zoo\.data_kwargs\.synthetic\.n_train: expected an integer"),
    ("namedata:\n  zoo: {cuda: {gru: {batch_networks: 2.5}}}\n", r"namedata\.zoo\.cuda\.gru\.batch_networks: expected"),
    ("namedata:\n  zoo: {cuda: {gru: {batch_networks: 0}}}\n",
     r"namedata\.zoo\.cuda\.gru: batch_networks must be an integer >= 1, got 0"),
    ("tiny_imagenet:\n  projection: {lr: fast}\n", r"tiny_imagenet\.projection\.lr: expected a number"),
    ("tiny_imagenet:\n  projection: {cnn: {lr: -1}}\n", r"tiny_imagenet\.projection\.cnn\.lr: lr must be > 0"),
    ("tiny_imagenet:\n  projection: {epochs: 0}\n", r"tiny_imagenet\.projection\.epochs: epochs must be an integer >= 1"),
    ("factors:\n  split: {query_fraction: some}\n", r"factors\.split\.query_fraction: expected a number"),
    ("factors:\n  split: {query_fraction: 1.5}\n", r"factors\.split: query_fraction must lie strictly between 0 and 1"),
    ("factors:\n  features: {cnn: {fold_bn: 3}}\n", r"factors\.features\.cnn\.fold_bn: expected true or false, got 3"),
    ("factors:\n  settings: {Baseline: {arch: cnn, epochs: x}}\n", r"factors\.settings\.Baseline\.epochs: expected an integer"),
    ("beyond:\n  zoos: []\n  probe: {size: big}\n", r"beyond\.probe\.size: expected an integer"),
    ("cnn_gap: {section: cifar100, arch: 3}\n", r"cnn_gap\.arch: expected text, got 3"),
    ("alignment_proof_check: {permutations: x}\n", r"alignment_proof_check\.permutations: expected an integer"),
])
def test_a_wrong_value_in_any_section_names_the_file_and_the_key(profile_dir, text, message):
    (profile_dir / "x.yaml").write_text(text)
    with pytest.raises(ffl.profiles.ProfileError, match=rf"^{profile_dir.name}/x\.yaml: {message}"):
        load("x")


def test_a_bad_value_a_profile_inherits_names_the_file_that_sets_it(profile_dir):
    (profile_dir / "base.yaml").write_text("cifar100:\n  projection: {lr: -0.5}\n")
    (profile_dir / "child.yaml").write_text("extends: base\ncifar100:\n  projection: {epochs: 3}\n")
    with pytest.raises(ffl.profiles.ProfileError,
                       match=rf"^{profile_dir.name}/base\.yaml: cifar100\.projection\.lr: lr must be > 0, got -0\.5"):
        load("child")
