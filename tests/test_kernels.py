"""Streamed feature learning (ffl.kernels): the kernel from a zoo on disk in bounded memory equals
the in-memory one, and reduced-precision products keep the protocols' outcomes."""
import json

import pytest
import torch

from ffl.bench import main as bench_main
from ffl.bench import bench_ffl, random_weight_zoo
from ffl.chain import chain_gram
from ffl.experiment import evaluate_zoo
from ffl.features import FeatureConfig, ProjectionConfig, Representation, zoo_representations
from ffl.kernels import KernelStats, StreamConfig, ZooFeatures, streamed_inner
from ffl.protocols import ProtocolSplit
from ffl.zoo import ZooSpec, train_zoo


@pytest.mark.parametrize("shape", [(6, 2), (4, 30), (9,)])  # implicit, explicit (slabs), vectors
@pytest.mark.parametrize("blocks", [1, 4])
def test_streamed_inner_equals_explicit_inner_products(shape, blocks):
    torch.manual_seed(0)
    x = torch.randn(11, *shape)
    vec = torch.stack([chain_gram(c).flatten() for c in x.double()]) if len(shape) == 2 else x.double()
    expected = vec @ vec.T
    per_net = 4 * x[0].numel()
    cfg = StreamConfig(block_bytes=per_net * (11 if blocks == 1 else 3), slab_bytes=64, chunk=7)
    stats = KernelStats()
    reads = []
    k = streamed_inner(lambda nets: reads.append(list(nets)) or x[nets], 11, shape, cfg, stats=stats, name="i")
    torch.testing.assert_close(k, expected, rtol=2e-6, atol=1e-6 * expected.abs().max().item())
    assert stats.blocks["i"] == blocks
    assert stats.modes["i"] == {(6, 2): "implicit", (4, 30): "explicit", (9,): "vectors"}[shape]
    assert max(len(r) for r in reads) <= (11 if blocks == 1 else 3)  # never more than a block at once
    # blocks of 3, 3, 3, 2: row block 0 reads all four, each later one reads what is left after it
    assert stats.networks_read == (11 if blocks == 1 else 11 + 5 + 2)


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown precision"):
        StreamConfig(precision="fp8")
    with pytest.raises(ValueError, match="CUDA"):
        StreamConfig(precision="tf32")
    with pytest.raises(ValueError, match="inner_dim"):
        Representation(inner_products=torch.eye(3))
    with pytest.raises(ValueError, match="square"):
        Representation(inner_products=torch.ones(2, 3), inner_dim=4)


@pytest.fixture(scope="module")
def fixture_zoo(tmp_path_factory):
    """10 tasks × 10 runs of small MLP-4s and PlainNet-5s in the real zoo format (random weights
    sharing a per-task part, so the protocols have something to find). Retrieval needs more than
    two seen tasks: with two, Θ's two outputs are opposite and every cosine is ±1, a tie."""
    root = tmp_path_factory.mktemp("zoos")
    return {
        "mlp": random_weight_zoo("mlp", root / "mlp", tasks=10, runs=10, batch_networks=16,
                                 model_kwargs={"in_features": 48, "hidden": [12, 10, 8]}, task_share=0.95),
        "cnn": random_weight_zoo("cnn", root / "cnn", tasks=10, runs=10, batch_networks=16,
                                 model_kwargs={"widths": [3, 4, 5, 6]}, task_share=0.95),
        "resnet5": random_weight_zoo("resnet5", root / "resnet5", tasks=10, runs=10, batch_networks=16,
                                     model_kwargs={"widths": [3, 4, 5, 6]}, task_share=0.95),
        "gru": random_weight_zoo("gru", root / "gru", tasks=10, runs=10, batch_networks=16,
                                 model_kwargs={"hidden": 6}, task_share=0.95),
    }


CFG = ProjectionConfig(lr=0.05, epochs=4, lr_step_epochs=(3,))


STREAMED_FEATURES = {  # each arch with the feature options its profile sections choose
    "mlp": FeatureConfig(chain_normalize=True, layer_normalize=True),
    "cnn": FeatureConfig(fold_bn=False),
    "resnet5": FeatureConfig(fold_bn=False, resnet_skips=False, max_index=3),
    "gru": FeatureConfig(gru_lags=0, gru_recurrent=False),
}


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_streamed_evaluation_equals_in_memory(fixture_zoo, arch):
    zoo = fixture_zoo[arch]
    features = STREAMED_FEATURES[arch]
    source = ZooFeatures(zoo, features)
    per_net = {name: 4 * torch.Size(s).numel() for name, s in source.shapes.items()}
    largest = max(per_net.values())
    # blocks of 12 networks (weights + largest features); the in-memory path holds every network's
    # features at every index, far above two blocks
    cap = StreamConfig(block_bytes=(source.read_bytes + largest) * 12, slab_bytes=4096, chunk=100)
    assert 2 * cap.block_bytes < largest * len(zoo) < sum(per_net.values()) * len(zoo)
    stats = KernelStats()
    streamed = evaluate_zoo(zoo, CFG, ProtocolSplit(), features=features, progress=False, stream=cap, stats=stats)
    reference = evaluate_zoo(zoo, CFG, ProtocolSplit(), features=features, progress=False, in_memory=True)
    assert len(stats.blocks) == len(source.shapes)
    assert set(stats.blocks.values()) == {9}
    # one pass for every index: row block 0 reads all blocks, row block a ≥ 1 is carried over and
    # reads the blocks after a + 1 (100 = 8 × 12 + 4 networks)
    sizes = [12] * 8 + [4]
    assert stats.networks_read == len(zoo) + sum(sum(sizes[a + 1:]) for a in range(1, 8))
    assert streamed[["index", "feature", "protocol", "metric", "dim"]].equals(
        reference[["index", "feature", "protocol", "metric", "dim"]])
    diff = (streamed["value"] - reference["value"]).abs()
    loss = streamed["metric"] == "theta_loss"  # Θ's training loss: continuous, rounding shows in it
    assert diff[~loss].max() <= 1e-9 and (diff[loss] / reference["value"][loss]).max() <= 1e-4
    chains = streamed[streamed.metric == "top1"]
    assert chains["value"].max() > 0.5  # the fixture has task structure (10 tasks: chance 0.1)


def test_one_pass_per_index_equals_one_pass_for_all(fixture_zoo):
    """Reading the zoo again for each index (blocks of features only, so larger) gives the same
    kernels as one pass for all indices; it reads more networks, and forms slabs fewer times."""
    zoo = fixture_zoo["mlp"]
    source = ZooFeatures(zoo, STREAMED_FEATURES["mlp"])
    jobs = [(kind, index) for kind in ("chain", "layer") for index in source.indices(kind)]
    block = (source.read_bytes + max(source.feature_bytes(*j) for j in jobs)) * 12
    stats = {p: KernelStats() for p in ("one", "per_index")}
    kernels = {p: source.kernels(jobs, StreamConfig(block_bytes=block, slab_bytes=4096, passes=p), stats=stats[p])
               for p in stats}
    for job in jobs:
        scale = kernels["one"][job].abs().max().item()  # float32 products summed in other orders
        torch.testing.assert_close(kernels["per_index"][job], kernels["one"][job], rtol=1e-5, atol=1e-6 * scale)
    assert stats["one"].networks_read < stats["per_index"].networks_read
    assert stats["per_index"].macs["form"] < stats["one"].macs["form"]
    assert StreamConfig.for_device("cpu").passes == "per_index"
    with pytest.raises(ValueError, match="unknown passes"):
        StreamConfig(passes="two")


def test_gpu_blocks_count_memory_the_caching_allocator_holds(monkeypatch):
    """On a GPU the blocks are sized from free memory once PyTorch's cache is released: what a
    zoo's training left cached is free for the kernels (30 % of it per block)."""
    gib = 1 << 30
    state = {"cached": 50 * gib}
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: state.update(cached=0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (78 * gib - state["cached"], 80 * gib))
    cfg = StreamConfig.for_device("cuda")
    assert cfg.block_bytes == int(0.3 * 78 * gib) and cfg.passes == "one" and cfg.device == "cuda"


@pytest.mark.parametrize("arch", ["resnet5", "gru"])
def test_streamed_features_follow_the_feature_options(fixture_zoo, arch):
    """Every option of FeatureConfig reaches the streamed features (ResNet-5 without its
    projections and only indices 1-3; the official GRU feature and baseline), as the in-memory
    ones take them, network by network."""
    zoo, features = fixture_zoo[arch], STREAMED_FEATURES[arch]
    source = ZooFeatures(zoo, features, chunk_bytes=1)  # vmapped one network at a time too
    models = [zoo.model(i) for i in range(len(zoo))]
    nets = [0, 13, 57, 99]
    for kind in ("chain", "layer"):
        reference = zoo_representations([models[i] for i in nets], kind, features)
        assert source.indices(kind) == list(range(1, len(reference) + 1))
        for index, rep in enumerate(reference, 1):
            expected = rep.factors if kind == "chain" else rep.vectors
            torch.testing.assert_close(source.load(kind, index, nets), expected, rtol=1e-5, atol=1e-6)
    if arch == "resnet5":
        assert len(source.indices("chain")) == 3
        with_skips = ZooFeatures(zoo, FeatureConfig(fold_bn=False, max_index=3))
        assert not torch.allclose(with_skips.load("chain", 2, nets), source.load("chain", 2, nets))


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_bf16_kernel_blocks_keep_top1_and_rank1(fixture_zoo, arch):
    zoo = fixture_zoo[arch]
    tables = {p: evaluate_zoo(zoo, CFG, ProtocolSplit(), progress=False, stream=StreamConfig(precision=p, chunk=64))
              for p in ("fp32", "bf16")}
    keep = lambda t: t[t.metric.isin(["top1", "rank1"])].reset_index(drop=True)  # noqa: E731
    assert keep(tables["fp32"]).equals(keep(tables["bf16"]))
    # the bf16 kernel differs from the fp32 one (the products did run in reduced precision) ...
    source = ZooFeatures(zoo)
    shape = source.shapes[("chain", 2)]
    k = {p: streamed_inner(lambda n: source.load("chain", 2, n), len(zoo), shape, StreamConfig(precision=p))
         for p in ("fp32", "bf16")}
    rel = ((k["bf16"] - k["fp32"]).abs().max() / k["fp32"].abs().max()).item()
    assert 1e-6 < rel < 1e-2  # ... by about bf16's rounding, not more


def test_bench_ffl_json(tmp_path, capsys):
    assert bench_main(["ffl", "--quick", "--networks", "20", "--tasks", "4", "--zoo-root", str(tmp_path),
                       "--memory-gib", "0.0001", "--project-to", "50"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(lines[-1])["ffl"]
    assert set(summary) == {"mlp", "cnn"}
    for arch, res in summary.items():
        for key in ("stage_s", "host_peak_rss_bytes", "gemm_fraction", "projected_total_s"):
            assert res[key] > 0, (arch, key)
        # the resident set's high-water above the stage's start: a stage of 20 tiny networks may
        # fit in memory the process already holds (0), but it is measured, never missing
        assert isinstance(res["peak_bytes"], int) and res["peak_bytes"] >= 0, arch
        assert res["networks"] == 20 and res["skipped"] == []
        assert all(res["seconds"][k] > 0 for k in ("read", "features", "kernel", "protocols"))
    full = json.loads(next(l for l in lines if l.startswith('{"arch": "cnn"')))
    assert set(full["per_index"]) == {f"chain {i}" for i in range(1, 6)} | {f"layer {i}" for i in range(1, 6)}
    assert full["plan"]["chain 4"]["macs"] > 0 and full["per_index"]["chain 4"]["blocks"] > 1


def test_bench_ffl_says_whether_it_timed_trained_or_random_weights(tmp_path, fixture_zoo):
    spec = ZooSpec(arch="mlp", dataset="synthetic", tasks=list(range(5)), runs=4, model_kwargs={"hidden": [6, 6]},
                   epochs=1, lr=0.05, batch_size=32, data_kwargs={"n_train": 64, "n_test": 32})
    train_zoo(spec, tmp_path / "trained", progress=False)
    trained = bench_ffl("mlp", 20, zoo_root=tmp_path / "trained", block_bytes=1 << 20, project_to=40)
    assert trained["weights"] == "trained: synthetic, 5 tasks x 4 runs"
    assert (trained["networks"], trained["tasks"], trained["runs"]) == (20, 5, 4)
    random = bench_ffl("mlp", 100, zoo_root=fixture_zoo["mlp"].root, block_bytes=1 << 20, project_to=40)
    assert random["weights"].startswith("random, untrained")
