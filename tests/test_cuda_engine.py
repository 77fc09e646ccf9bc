"""How a zoo trains on a GPU (chunk size, convolution and BatchNorm kernels): the profile's
``zoo.cuda`` settings, ``train_zoo``'s backends, and what its provenance and the chapter's run table
say; and training a chapter's zoo ahead of the chapter. On CPU the Triton kernels run in Triton's
interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import ffl.profiles
from ffl import batched, report
from ffl.experiment import Experiment
from ffl.features import FeatureConfig
from ffl.protocols import ProtocolSplit
from ffl.zoo import ZooSpec, cached_zoo_root, cuda_engine_from_profile, kernels_used, spec_from_profile, train_zoo

# four tasks of two runs: the run table's retrieval split needs two seen and two unseen tasks
TINY_CNN = dict(arch="cnn", dataset="synthetic", tasks=[0, 1, 2, 3], runs=2, model_kwargs={"widths": [2, 2, 2, 2]},
                epochs=1, lr=0.05, batch_size=4, augment=False, data_kwargs={"n_train": 8, "n_test": 4})


def test_profiles_set_the_measured_engine_for_plainnet5_in_bf16_only():
    fast = {"batch_networks": 252, "conv_backend": "triton", "bn_backend": "triton"}
    for profile in ("paper_bf16", "paper_offline_bf16"):
        for section in ("cifar100", "tiny_imagenet", "factors"):
            assert cuda_engine_from_profile(profile, section, arch="cnn") == fast
            assert cuda_engine_from_profile(profile, section, arch="resnet5") == {}
    assert cuda_engine_from_profile("paper", "tiny_imagenet", arch="cnn") == {}
    assert cuda_engine_from_profile("paper_offline_bf16", "tiny_imagenet", arch="mlp") == {}


@pytest.mark.parametrize("engine, message", [
    ({"chunk": 3}, "cuda.cnn.chunk: unknown key; expected one of ['batch_networks', 'bn_backend', "),
    ({"conv_tiles": "tiles/none.json"}, "conv_tiles: cannot read the tile table"),
    ({"conv_tiles": "bad_tiles.json"}, "conv_tiles: "),
    ({"conv_backend": "cudnn"}, "conv_backend 'cudnn' is not one of torch, triton, interpret"),
    ({"batch_networks": 0}, "batch_networks"),
    ("fast", "expected a mapping, got 'fast'"),  # refused by the profile's schema
])
def test_a_bad_cuda_engine_setting_is_named(tmp_path, monkeypatch, engine, message):
    (tmp_path / "bad.yaml").write_text(json.dumps({"tiny_imagenet": {"zoo": {"cuda": {"cnn": engine}}}}))
    (tmp_path / "bad_tiles.json").write_text(json.dumps({"tiles": [{"kind": "forward"}]}))
    monkeypatch.setattr(ffl.profiles, "PROFILE_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"(profile 'bad', |bad\.yaml: )tiny_imagenet.zoo.cuda.cnn") as err:
        cuda_engine_from_profile("bad", "tiny_imagenet", arch="cnn")
    assert message in str(err.value)


def _tile_table(folder):
    from ffl import implicit_conv

    entry = {"kind": "forward", "dtype": "float32", "C": 2, "O": 2, "kh": 3, "kw": 3, "BM": 32, "BN": 16, "BC": 16}
    return implicit_conv.write_tile_table(folder / "tiles.json", [entry], {"gpu": "test"})


def test_a_profile_names_a_tile_table_under_profiles(tmp_path, monkeypatch):
    table = _tile_table(tmp_path)
    (tmp_path / "tuned.yaml").write_text(json.dumps(
        {"cifar100": {"zoo": {"cuda": {"cnn": {"conv_backend": "triton", "conv_tiles": "tiles.json"}}}}}))
    monkeypatch.setattr(ffl.profiles, "PROFILE_DIR", tmp_path)
    assert cuda_engine_from_profile("tuned", "cifar100", arch="cnn") == {"conv_backend": "triton",
                                                                          "conv_tiles": str(table)}


def test_a_bad_tile_table_fails_training_before_anything_is_written(tmp_path):
    (tmp_path / "t.json").write_text('{"tiles": [{"kind": "forward", "dtype": "float32"}]}')
    with pytest.raises(ValueError, match=r"t\.json, tiles\[0\]: missing C, O"):
        train_zoo(ZooSpec.from_dict(TINY_CNN), tmp_path / "zoo", progress=False, conv_tiles=tmp_path / "t.json")
    assert not (tmp_path / "zoo").exists()


@pytest.mark.slow  # the interpreted convolution: about 10 s
def test_a_zoo_trained_with_measured_blockings_uses_and_records_them(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from ffl import implicit_conv

    spec = ZooSpec.from_dict(dict(TINY_CNN, tasks=[0, 1], runs=1, data_kwargs={"n_train": 4, "n_test": 2}))
    table = _tile_table(tmp_path)
    plain = train_zoo(spec, tmp_path / "plain", progress=False)
    launched = set()
    real_launch = implicit_conv.Tiles.launch
    monkeypatch.setattr(implicit_conv.Tiles, "launch", lambda self, interpret: launched.add(self)
                        or real_launch(self, interpret))
    tuned = train_zoo(spec, tmp_path / "tuned", progress=False, conv_backend="interpret", conv_tiles=table)
    assert implicit_conv.Tiles(32, 16, 16) in launched  # the 2 → 2 channel forwards (units 2–4)
    kernels = json.loads((tmp_path / "tuned" / "provenance.json").read_text())["kernels"]
    assert kernels["conv"] == "interpret" and kernels["conv_tiles"].startswith("tiles.json (sha256 ")
    for i in range(len(plain)):  # another blocking, the same networks up to rounding
        a, b = plain.state_dict(i), tuned.state_dict(i)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def test_the_run_table_names_measured_blockings(tmp_path):
    zoo = train_zoo(ZooSpec.from_dict(TINY_CNN), tmp_path / "zoo", progress=False)
    prov = json.loads((zoo.root / "provenance.json").read_text())
    prov["kernels"] = {"conv": "triton", "bn": "triton", "conv_tiles": "h100.json (sha256 0123456789ab)"}
    (zoo.root / "provenance.json").write_text(json.dumps(prov))
    row = report.run_table(Experiment(zoo=zoo, results=pd.DataFrame(),
                                      split=ProtocolSplit(train_run_fraction=0.5, query_fraction=0.5),
                                      features=FeatureConfig(), seconds={}))
    assert ("convolution: Triton (ffl) (measured blockings: h100.json (sha256 0123456789ab)), BatchNorm + "
            "activation + pooling: Triton (ffl) (fused)") in row


def test_convolutional_zoos_train_in_chunks_of_at_most_252_on_cuda(monkeypatch):
    import ffl.zoo.train as zoo_module

    monkeypatch.setattr(zoo_module, "probe_capacity", lambda *a, **k: 700)  # what would fit in memory
    spec = lambda arch: ZooSpec.from_dict(dict(TINY_CNN, arch=arch, tasks=list(range(10)), runs=100,  # noqa: E731
                                               model_kwargs={}))
    for arch in ("cnn", "plainnet6", "resnet5"):
        assert zoo_module.default_batch_networks(spec(arch), "cuda") == 252
    assert zoo_module.default_batch_networks(spec("mlp"), "cuda") == 700
    assert zoo_module.default_batch_networks(spec("cnn"), "cpu") == 16  # widths 32-256 on CPU: test_zoo.py


def test_kernels_used_says_what_runs_where():
    with batched.conv_backend("triton"), batched.bn_backend("triton"):
        assert kernels_used("cnn", "cpu") == {"conv": "torch", "bn": "torch"}  # no GPU: PyTorch's ops run
        assert kernels_used("cnn", "cuda") == {"conv": "triton", "bn": "triton"}
        assert kernels_used("resnet5", "cuda") == {"conv": "triton", "bn": "torch"}  # fusion: plain ConvNets only
        assert kernels_used("mlp", "cuda") == {}


def test_a_backend_that_cannot_run_here_fails_before_anything_is_written(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ValueError, match="conv_backend 'triton' cannot run here"):
        train_zoo(ZooSpec.from_dict(TINY_CNN), tmp_path / "zoo", progress=False, conv_backend="triton")
    assert not (tmp_path / "zoo").exists()
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        train_zoo(ZooSpec.from_dict(TINY_CNN), tmp_path / "zoo", progress=False, bn_backend="fast")
    assert not (tmp_path / "zoo").exists()


def test_train_zoo_trains_with_the_kernels_asked_for_and_records_them(tmp_path):
    pytest.importorskip("triton")
    spec = ZooSpec.from_dict(TINY_CNN)
    plain = train_zoo(spec, tmp_path / "plain", progress=False)
    # the fused BatchNorm interpreted (seconds); the interpreted convolution takes half a minute
    # here, and tests/test_implicit_conv.py and test_fused_bn.py check it in the engine
    fused = train_zoo(spec, tmp_path / "fused", progress=False, conv_backend="torch", bn_backend="interpret",
                      batch_networks=4)
    # the class-wide backends are back to what they were
    assert (batched.BatchedConv2d.backend, batched.BatchedBatchNorm.backend) == ("torch", "torch")
    prov = json.loads((tmp_path / "fused" / "provenance.json").read_text())
    assert prov["kernels"] == {"conv": "torch", "bn": "interpret"} and prov["batch_networks"] == 4
    assert json.loads((tmp_path / "plain" / "provenance.json").read_text())["kernels"] == {"conv": "torch", "bn": "torch"}
    # the same networks, up to the kernels' rounding (FP32)
    for i in range(len(plain)):
        a, b = plain.state_dict(i), fused.state_dict(i)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    # the chapter's run table names the engine of the zoo that used Triton, and only of that one
    def table(zoo):
        return report.run_table(Experiment(zoo=zoo, results=pd.DataFrame(),
                                           split=ProtocolSplit(train_run_fraction=0.5, query_fraction=0.5),
                                           features=FeatureConfig(), seconds={}))
    assert ("| training engine | 4 networks per batch; convolution: PyTorch's, BatchNorm + activation "
            "+ pooling: Triton's interpreter (fused) |") in table(fused)
    assert "training engine" not in table(plain)


def test_zoo_train_without_root_trains_the_zoo_the_chapters_read(tmp_path, monkeypatch, capsys):
    # a GPU session can train a chapter's zoo in one call and run the chapter in the next
    from ffl.experiment import run_experiment
    from ffl.zoo import main as zoo_main

    monkeypatch.setenv("FFL_CACHE", str(tmp_path))
    assert zoo_main(["train", "--profile", "smoke", "--section", "cifar100", "--arch", "mlp", "--dataset", "synthetic",
                     "--quiet"]) == 0
    said = capsys.readouterr().err
    assert f"zoo folder: {tmp_path}/zoos/mlp-synthetic-" in said
    exp = run_experiment("cifar100", arch="mlp", profile="smoke", dataset="synthetic", progress=False)
    assert exp.seconds["zoo"] == "cached" and str(exp.zoo.root) in said


def test_gpu_zoo_script_trains_into_the_chapters_cache(tmp_path):
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, DEVICE="cpu", PYTHON=sys.executable, OUT=str(tmp_path / "out"),
               FFL_CACHE=str(tmp_path / "cache"))
    run = subprocess.run(["bash", "scripts/gpu_zoo.sh", "smoke", "cifar100", "mlp", "synthetic"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "[gpu_zoo] exit 0 after" in (tmp_path / "out" / "zoo_log.txt").read_text()
    spec = spec_from_profile("smoke", "cifar100", arch="mlp", dataset="synthetic")
    assert (cached_zoo_root(spec, tmp_path / "cache") / "manifest.json").is_file()
    usage = subprocess.run(["bash", "scripts/gpu_zoo.sh", "smoke"], cwd=repo, env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: " in usage.stderr
