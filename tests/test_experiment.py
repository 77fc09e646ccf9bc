"""A paper section end to end: bad inputs fail at once; on the synthetic smoke zoo the aligned
chains retrieve unseen tasks far better than the raw layers."""
from pathlib import Path

import pytest

from ffl.experiment import check_choices, run_experiment


@pytest.mark.parametrize("field,value,choices", [
    ("arch", "resnet50", "mlp"),
    ("dataset", "imagenet", "cifar100"),
    ("profile", "huge", "smoke"),
])
def test_unknown_choice_names_the_valid_ones(field, value, choices):
    kwargs = {"arch": "mlp", "dataset": "synthetic", "profile": "smoke", "section": "cifar100", field: value}
    with pytest.raises(ValueError, match=f"unknown {field} '{value}'.*{choices}"):
        check_choices(**kwargs)


def test_missing_cifar100_names_files_and_writes_nothing(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError) as err:
        run_experiment("cifar100", arch="mlp", profile="smoke", dataset="cifar100",
                       data_root=str(tmp_path / "data"), download=False, cache_dir=cache, progress=False)
    message = str(err.value)
    assert "cifar-100-python" in message and "train" in message and "download" in message
    leftovers = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert leftovers == [], f"a failed run left files behind: {leftovers}"
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


@pytest.mark.slow
def test_smoke_zoo_chains_beat_layers_and_rerun_is_cached(tmp_path):
    exp = run_experiment("cifar100", arch="mlp", profile="smoke", dataset="synthetic",
                         cache_dir=tmp_path, progress=False)
    r = exp.results.set_index(["protocol", "metric", "feature", "index"])["value"].sort_index()
    chain_rank1 = r.loc[("retrieval", "rank1", "chain")]
    layer_rank1 = r.loc[("retrieval", "rank1", "layer")]
    assert chain_rank1.mean() >= layer_rank1.mean() + 0.3, (chain_rank1, layer_rank1)
    assert (chain_rank1 >= layer_rank1).all()
    chain_top1 = r.loc[("classification", "top1", "chain")]
    layer_top1 = r.loc[("classification", "top1", "layer")]
    assert chain_top1.mean() >= layer_top1.mean() + 0.3
    # A second run loads the zoo and the results instead of recomputing them.
    files = {p: p.stat().st_mtime_ns for p in Path(tmp_path).rglob("*") if p.is_file()}
    again = run_experiment("cifar100", arch="mlp", profile="smoke", dataset="synthetic",
                           cache_dir=tmp_path, progress=False)
    assert again.results.equals(exp.results)
    assert {p: p.stat().st_mtime_ns for p in Path(tmp_path).rglob("*") if p.is_file()} == files


def test_features_per_arch_resolve_and_bad_keys_fail():
    """A section's `features:` is one dict for all archs, or one per arch (the official settings
    differ between MLP and CNN)."""
    from ffl.features import FeatureConfig
    from ffl.profile_settings import Profile, load
    from ffl.profiles import ProfileError

    paper = load("paper").section("cifar100")
    mlp, cnn = paper.features_for("mlp"), paper.features_for("cnn")
    assert (mlp.chain_normalize, mlp.layer_normalize, mlp.fold_bn) == (True, True, True)
    assert (cnn.chain_normalize, cnn.fold_bn) == (False, False)
    res = paper.features_for("resnet5")
    assert (res.fold_bn, res.resnet_skips) == (False, False)

    def features(setting):
        return Profile.from_settings("p", {"cifar100": {} if setting is None else {"features": setting}}
                                     ).section("cifar100").features
    assert features({"gru_lags": 0})("gru") == FeatureConfig(gru_lags=0)
    assert features(None)("mlp") == FeatureConfig()
    with pytest.raises(ValueError, match=r"paper\.yaml: cifar100\.features: has entries for \['mlp', 'cnn'.* none for 'gru'"):
        paper.features_for("gru")
    with pytest.raises(ProfileError, match="mixes per-arch entries"):
        features({"mlp": {}, "fold_bn": False})
    with pytest.raises(ProfileError, match=r"p\.yaml: cifar100\.features\.mlp: unknown feature settings"):
        features({"mlp": {"fold": False}})


def _retrain_with_other_weights(root: Path) -> None:
    """The zoo at ``root`` written again under its own spec with every weight shifted: what a zoo
    retrained on other data or another machine looks like to the cache (same spec, other bytes)."""
    import json

    from safetensors.torch import load_file

    from ffl.zoo import Zoo, chunks, write_piece
    from ffl.zoo.store import _finalize

    zoo = Zoo.load(root)
    k = int(zoo.manifest["batch_networks"])
    for piece in (p for chunk in chunks(zoo.spec, k) for p in chunk):
        meta = json.loads((root / "shards" / f"{piece.name}.json").read_text())
        state = {n: t + 0.01 if t.is_floating_point() else t for n, t in load_file(root / meta["file"]).items()}
        write_piece(root, zoo.spec, piece, state, slice(0, piece.r1 - piece.r0), meta["networks"],
                    meta["build_kwargs"], meta.get("data_sha256"))
    (root / "manifest.json").unlink()
    assert _finalize(root, zoo.spec, k)


def test_results_are_never_served_for_other_weights_under_the_same_spec(tmp_path):
    """Cached results are keyed by the zoo's weights too, not only its spec: after the zoo is
    trained again with other bytes, the protocols run again."""
    from ffl.zoo import cached_zoo_root

    kw = dict(arch="mlp", profile="smoke", dataset="synthetic", cache_dir=tmp_path, progress=False,
              zoo_overrides={"epochs": 1, "lr_step_epochs": []})
    first = run_experiment("cifar100", **kw)
    assert run_experiment("cifar100", **kw).seconds["features and protocols"] == "cached"
    _retrain_with_other_weights(cached_zoo_root(first.zoo.spec, tmp_path))
    again = run_experiment("cifar100", **kw)
    assert again.zoo.weights_sha256 != first.zoo.weights_sha256
    assert again.seconds["features and protocols"] != "cached"
    assert len(list((tmp_path / "results").glob("*.csv"))) == 2
