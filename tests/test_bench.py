"""``python -m ffl.bench zoo``: the benchmark runs and reports the figures the issue asks for."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffl.bench import _mlp_flops_per_sample, chunk_sweep, conv_layers, im2col_conv3x3, loop_vs_batched, zoo_time

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def test_flop_count():
    # 2 layers 4-3-2: fwd 2*(12+6), weight grads 2*(12+6), input grad of layer 2 only 2*6
    assert _mlp_flops_per_sample([4, 3, 2]) == 36 + 36 + 12


def test_loop_vs_batched_small():
    r = loop_vs_batched("mlp", 3, 2, torch.device("cpu"), 1, batch=8, hidden=(4,), in_features=12, shape=(3, 2, 2))
    assert r["batched_s"] > 0 and r["loop_s"] > 0 and r["ratio"] == pytest.approx(r["loop_s"] / r["batched_s"])


def test_zoo_time_small():
    out = zoo_time("mlp", "cpu", tasks=2, runs=2, budget_s=60, batch_networks=2, epochs=1)
    assert out["networks"] == 4 and out["networks_timed"] == 4 and out["measured_fully"]
    assert out["projected_zoo_s"] > 0 and len(out["chunk_log"]) == 2


@pytest.mark.slow
def test_cli_quick_prints_table_and_json():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "ffl.bench", "zoo", "--quick", "--threads", "1"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert any("MLP-4" in line for line in lines[:-1])
    res = json.loads(lines[-1])
    for key in ("loop_ratio_small", "loop_ratio_paper", "gemm_fraction", "nets_per_s_mlp4", "nets_per_s_plainnet5"):
        assert isinstance(res[key], float) and res[key] > 0, key


def test_im2col_conv_equals_grouped_conv():
    """The im2col + batched-GEMM convolution the conv benchmark compares is the same convolution."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    K, B, C, Cout, H = 3, 2, 4, 5, 6
    x = torch.randn(K, B, H, H, C, generator=g)
    w = torch.randn(K, Cout, C, 3, 3, generator=g)
    y = im2col_conv3x3(x, w)  # (K, B, H, W, Cout)
    ref = F.conv2d(x.permute(1, 0, 4, 2, 3).reshape(B, K * C, H, H), w.reshape(K * Cout, C, 3, 3), padding=1, groups=K)
    torch.testing.assert_close(y.permute(1, 0, 4, 2, 3).reshape(B, K * Cout, H, H), ref, atol=1e-5, rtol=1e-5)


def test_conv_layers_reports_every_method():
    rows = conv_layers("cpu", K=2, batch=2, precision="fp32", repeat=1, convs=((3, 4, 4), (4, 8, 2)))
    assert [r["layer"] for r in rows] == [1, 2]
    for r in rows:
        assert all(r[f"{m}_tflops"] > 0 for m in ("grouped", "im2col_bmm", "dense"))


def test_tile_options_are_checked_before_anything_runs(tmp_path, monkeypatch):
    import ffl.bench as bench
    import ffl.bench.cli  # where the subcommands look the benchmarks up

    def must_not_run(*a, **k):
        raise AssertionError("ran despite a bad option")

    for name in ("conv_sweep", "conv_layers", "zoo_time", "profile_step"):
        monkeypatch.setattr(ffl.bench.cli, name, must_not_run)
    with pytest.raises(SystemExit, match="--tiles-out needs --sweep"):
        bench.main(["conv", "--tiles-out", str(tmp_path / "t.json")])
    with pytest.raises(SystemExit, match="its folder does not exist"):
        bench.main(["conv", "--sweep", "--tiles-out", str(tmp_path / "no" / "t.json")])
    (tmp_path / "bad.json").write_text('{"tiles": [{"kind": "forward"}]}')
    for command in (["zoo-time", "--arch", "cnn"], ["profile", "--arch", "cnn"]):
        with pytest.raises(ValueError, match=r"bad\.json, tiles\[0\]: missing dtype, C, O"):
            bench.main([*command, "--conv-tiles", str(tmp_path / "bad.json")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_ffl_runs_quick_by_default_and_full_size_on_request(monkeypatch):
    """``python -m ffl.bench ffl`` alone is a run of minutes on 2 CPU cores; ``--full`` is the
    1,000-network run (and ``--networks N`` keeps the old defaults: tasks N/100, nothing left out)."""
    import ffl.bench.cli

    class Called(Exception):
        pass

    def record(arch, networks, **kw):
        raise Called(networks, kw["tasks"], kw["budget_s"])

    monkeypatch.setattr(ffl.bench.cli, "bench_ffl", record)
    for argv, expected in ((["ffl"], (100, 10, 150.0)), (["ffl", "--full"], (1000, None, 1e9)),
                           (["ffl", "--networks", "300"], (300, None, 1e9)),
                           (["ffl", "--tasks", "5", "--budget-s", "60"], (100, 5, 60.0))):
        with pytest.raises(Called) as e:
            ffl.bench.main(argv)
        assert e.value.args == expected, argv
    with pytest.raises(SystemExit):
        ffl.bench.main(["ffl", "--full", "--networks", "300"])


def test_chunk_sweep_times_every_chunk_size_against_the_gemm_rate():
    rows = chunk_sweep([4, 4, 8, 8], (1, 2), steps=2, repeat=1)
    assert [r["K"] for r in rows] == [1, 2] and all(r["widths"] == "4-4-8-8" for r in rows)
    for r in rows:
        assert r["ms_per_network_step"] > 0 and 0 < r["fraction_of_gemm"] < 1.5
        assert r["model_gflops"] == pytest.approx(r["fraction_of_gemm"] * r["gemm_gflops"])
