"""ffl.implicit_conv: the batched implicit-GEMM convolution against PyTorch's grouped convolution.

On CPU the Triton kernels run in Triton's interpreter (backend ``interpret``, FP32); the compiled
CUDA kernels are checked by ``python -m ffl.bench conv --device cuda`` (its ``implicit_rel_err``
columns) in scripts/gpu_check_conv.sh.
"""
import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from ffl import implicit_conv, triton_support  # noqa: E402
from ffl.batched import BatchedConv2d, conv_backend, stack_models  # noqa: E402
from ffl.bench import conv_layers  # noqa: E402
from ffl.models import build_model  # noqa: E402
from ffl.triton_support import ptx_for_hopper  # noqa: E402


def _pair(B, K, C, O, H, W, k, pad, channels_last=False, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K * C, H, W, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(K, O, C, k, k, generator=gen)
    b = torch.randn(K, O, generator=gen) if bias else None
    return x, w, b


def _conv_and_grads(x, w, b, pad, backend, g=None):
    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if b is not None else ())]
    y = implicit_conv.batched_conv2d(leaves[0], leaves[1], leaves[2] if b is not None else None,
                                     padding=pad, backend=backend)
    g = torch.randn_like(y) if g is None else g
    grads = torch.autograd.grad(y, leaves, g)
    return y.detach(), grads, g


def _close(a, b, rtol=1e-5):
    scale = b.abs().max().clamp_min(1e-12)
    return float((a - b).abs().max() / scale) <= rtol


@pytest.mark.parametrize("B,K,C,O,H,W,k,pad,channels_last,bias", [
    (2, 3, 3, 5, 6, 5, 3, 1, False, False),   # PlainNet's first unit: 3 input channels (flat steps)
    (2, 2, 40, 40, 3, 3, 3, 1, True, False),  # several channel blocks and output tiles per network
    (2, 2, 16, 24, 4, 4, 3, 1, True, False),  # the fewest channels stepped tap by tap
    (3, 2, 4, 6, 5, 5, 1, 0, False, True),    # 1×1 (ResNet-5's projections), with a bias
    (2, 2, 5, 7, 6, 4, 3, 0, True, True),     # no padding: the output shrinks
])
def test_matches_grouped_convolution(B, K, C, O, H, W, k, pad, channels_last, bias):
    x, w, b = _pair(B, K, C, O, H, W, k, pad, channels_last, bias)
    y, grads, g = _conv_and_grads(x, w, b, pad, "interpret")
    y_ref, grads_ref, _ = _conv_and_grads(x, w, b, pad, "torch", g)
    # the grouped convolution is itself checked against independent per-network convolutions
    per_net = torch.cat([F.conv2d(x[:, i * C:(i + 1) * C], w[i], b[i] if b is not None else None, padding=pad)
                         for i in range(K)], 1)
    assert _close(y_ref, per_net, 1e-6)
    assert y.shape == y_ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert _close(y, y_ref)
    for got, ref in zip(grads, grads_ref):
        assert got.shape == ref.shape and _close(got, ref)
    assert grads[0].stride() == x.stride()  # the input gradient keeps the input's memory format


def test_weight_gradient_split_over_rows():
    """Many programs → the rows are split and the partial sums added; same gradient."""
    x, w, _ = _pair(2, 2, 3, 4, 16, 16, 3, 1)
    g = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    ref = torch.autograd.grad(implicit_conv.batched_conv2d(x, w.requires_grad_(True), padding=1), w, g)[0]
    one = implicit_conv._weight_grad(x, g, 2, 3, 3, (1, 1), interpret=True, programs=1)
    split = implicit_conv._weight_grad(x, g, 2, 3, 3, (1, 1), interpret=True, programs=10_000)
    assert _close(one, ref) and _close(split, ref)
    # 2·16·16 rows, 9 taps × 2 networks of one tile each, blocks of 16 rows (interpreted)
    assert triton_support.row_splits(512, 18, 16, 1, min_blocks=8) == (1, 512)
    assert triton_support.row_splits(512, 18, 16, 10_000, min_blocks=8) == (4, 128)


@pytest.mark.parametrize("C,tiles", [
    (16, implicit_conv.Tiles(16, 16, 32, flat=True)),   # two taps per step
    (20, implicit_conv.Tiles(16, 32, 64, flat=True)),   # steps that end inside a tap
    (3, implicit_conv.Tiles(16, 16, 16, flat=False)),   # 3 channels a tap at a time, 13 of 16 masked
])
def test_either_reduction_order_computes_the_convolution(C, tiles):
    x, w, _ = _pair(2, 2, C, 24, 5, 4, 3, 1, channels_last=True)
    y_ref, (dx_ref, dw_ref), g = _conv_and_grads(x, w, None, 1, "torch")
    y = implicit_conv._forward(x, w.permute(0, 3, 4, 2, 1).contiguous(), None, 2, (1, 1), True, tiles)
    dw = implicit_conv._weight_grad(x, g.contiguous(memory_format=torch.channels_last), 2, 3, 3, (1, 1), True,
                                    tiles=tiles)
    assert _close(y, y_ref) and _close(dw, dw_ref)


def test_stacked_convnet_trains_alike_with_either_backend():
    """A stacked PlainNet (tiny widths) through the engine's BatchedConv2d: outputs and every
    parameter gradient of one step agree between the interpreted kernels and the grouped conv."""
    torch.manual_seed(0)
    models = [build_model("cnn", num_classes=3, widths=[4, 6]) for _ in range(3)]
    x = torch.randn(5, 3, 8, 8)
    y = torch.randint(0, 3, (5,))
    results = {}
    for backend in ("torch", "interpret"):
        net = stack_models(models)
        assert isinstance(net.convs[0], BatchedConv2d)
        with conv_backend(backend):
            out = net(x.repeat(1, 3, 1, 1))
            loss = F.cross_entropy(out.view(5, 3, 3).transpose(1, 2), y[:, None].expand(5, 3))
            grads = torch.autograd.grad(loss, list(net.parameters()))
        results[backend] = (out.detach(), grads)
    assert BatchedConv2d.backend == "torch"  # the context restores the class-wide default
    assert _close(results["interpret"][0], results["torch"][0])
    for got, ref in zip(results["interpret"][1], results["torch"][1]):
        assert _close(got, ref, 1e-4)
    # and both agree with the networks one by one
    per_net = torch.cat([m(x) for m in models], 1)
    assert _close(results["torch"][0], per_net.detach(), 1e-5)


def test_unsupported_layers_keep_the_grouped_convolution():
    convs = [torch.nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False) for _ in range(2)]
    layer = BatchedConv2d(convs)
    assert not layer._implicit_ok
    assert not implicit_conv.supported(2, 1, 1) and not implicit_conv.supported(1, 2, 1)
    assert not implicit_conv.supported(1, 1, 2) and implicit_conv.supported((1, 1), (1, 1), 1)
    x = torch.randn(2, 4, 6, 6)
    with conv_backend("interpret"):
        got = layer(x)
    ref = torch.cat([c(x[:, 2 * i:2 * i + 2]) for i, c in enumerate(convs)], 1)
    assert _close(got.detach(), ref.detach())


def test_bad_inputs_say_what_is_wrong():
    x, w, _ = _pair(1, 2, 3, 4, 4, 4, 3, 1)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        implicit_conv.batched_conv2d(x, w, padding=1, backend="cudnn")
    with pytest.raises(ValueError, match="unknown convolution backend"):
        with conv_backend("cudnn"):
            pass
    with pytest.raises(ValueError, match="K\\*C = 6"):
        implicit_conv.batched_conv2d(x[:, :5], w, padding=1, backend="interpret")
    with pytest.raises(TypeError, match="float32 only"):
        implicit_conv.batched_conv2d(x.bfloat16(), w.bfloat16(), padding=1, backend="interpret")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'triton' is not available here"):
            implicit_conv.batched_conv2d(x, w, padding=1, backend="triton")


def test_bench_conv_reports_the_kernels_agreement():
    rows = conv_layers("cpu", K=2, batch=2, precision="fp32", repeat=1, convs=((3, 4, 4),), implicit_on_cpu=True)
    row = rows[0]
    assert row["implicit_tflops"] > 0 and row["grouped_tflops"] > 0
    for name in ("y", "dx", "dw"):
        assert 0 <= row[f"implicit_rel_err_{name}"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("flat", [False, True])
def test_kernels_compile_for_the_h100_with_tensor_cores_and_pipelined_loads(flat):
    """What the interpreter cannot show: the kernels compile for sm_90, the forward multiplies on
    Hopper's wgmma tensor cores, and the kernels stream their tiles with asynchronous copies.
    Layouts of PlainNet-5 in bf16, channels-last: its second unit (32 → 64 channels; one tap per
    reduction step) and its first (3 → 32; (tap, channel) pairs per step, ``flat``)."""
    forward, weight_grad = implicit_conv._kernels(False)
    shapes = ["NB", "H", "W", "HO", "WO", "O"] + ([] if flat else ["C"])  # multiples of 16 (not C = 3)
    blocks = dict(BM=64, BN=32, BC=32) if flat else dict(BM=64, BN=64, BC=32)
    ptx = ptx_for_hopper(
        forward, {"X": "*bf16", "WT": "*bf16", "BIAS": "*bf16", "Y": "*bf16"},
        dict(KH=3, KW=3, HAS_BIAS=False, PRECISION="ieee", FLAT=flat, sxc=1, syc=1, **blocks),
        ["X", "WT", "BIAS", "Y", *shapes, "sxb", "sxh", "sxw", "syb", "syh", "syw"])
    assert "wgmma.mma_async" in ptx and "bf16.bf16" in ptx
    if not flat:  # gathered (tap, channel) pairs are not contiguous rows: no 16-byte async copies
        assert "cp.async" in ptx
    ptx = ptx_for_hopper(
        weight_grad, {"X": "*bf16", "G": "*bf16", "DW": "*fp32"},
        dict(KH=3, KW=3, PRECISION="ieee", FLAT=flat, sxc=1, sgc=1, **blocks),
        ["X", "G", "DW", *shapes, "sxb", "sxh", "sxw", "sgb", "sgh", "sgw", "ROWS_PER_SPLIT"])
    assert "mma" in ptx and "cp.async" in ptx


@pytest.mark.slow
def test_flat_steps_give_the_32_channel_weight_gradient_wgmma_tensor_cores():
    """PlainNet-5's second unit (32 input channels): steps over one tap's 32 channels make the
    weight gradient's tile 32 rows, which Hopper multiplies with mma.sync; flat steps of 64
    (tap, channel) pairs make it wgmma's 64 rows with nothing masked but the last step's half."""
    _, weight_grad = implicit_conv._kernels(False)
    shapes = ["NB", "H", "W", "HO", "WO", "C", "O"]

    def ptx(flat, BC):
        return ptx_for_hopper(
            weight_grad, {"X": "*bf16", "G": "*bf16", "DW": "*fp32"},
            dict(KH=3, KW=3, PRECISION="ieee", FLAT=flat, sxc=1, sgc=1, BM=64, BN=64, BC=BC),
            ["X", "G", "DW", *shapes, "sxb", "sxh", "sxw", "sgb", "sgh", "sgw", "ROWS_PER_SPLIT"])

    one_tap, flat = ptx(False, 32), ptx(True, 64)
    assert "mma.sync" in one_tap and "wgmma" not in one_tap
    assert "wgmma.mma_async" in flat and "cp.async" in flat


def test_bench_sweep_times_every_blocking_and_each_gives_the_same_convolution():
    from ffl.bench import conv_sweep

    rows = conv_sweep("cpu", K=2, batch=2, precision="fp32", repeat=1, convs=((3, 8, 4), (20, 24, 4)))
    assert {(r["layer"], r["pass"]) for r in rows} == {
        (1, "forward"), (1, "weight_grad"), (2, "forward"), (2, "input_grad"), (2, "weight_grad")}
    assert sum(r["default"] for r in rows) == 5 and len(rows) > 5
    # 20 channels: flat steps of 64 and 128 pairs are tried too
    assert {r["tiles"]["BC"] for r in rows if r["tiles"]["flat"] and r["key"][2] == 20} == {64, 128}
    for r in rows:
        assert "error" not in r, r
        assert r["tflops"] > 0 and r["rel_diff_vs_default"] < 1e-5, r


@pytest.mark.slow  # about 40 s of interpreted kernels
def test_engine_with_the_kernels_trains_the_plain_loops_weights():
    """The whole engine (crop+flip, momentum, weight decay, a learning-rate step) with the
    interpreted kernels against the plain loop's cuDNN/oneDNN convolutions, PlainNet-5 and
    ResNet-5 (its 1×1 projection has stride 2 and keeps the grouped convolution)."""
    from ffl.bench import engine_agreement

    res = engine_agreement("cpu", "interpret", precisions=("fp32",), size=8, n=24, epochs=2)
    for arch in ("cnn", "resnet5"):
        assert res[f"{arch}_fp32"]["steps"] == 2
        assert res[f"{arch}_fp32"]["max_abs_weight_diff"] < 1e-4
        assert res[f"{arch}_fp32"]["test_acc_batched"] == res[f"{arch}_fp32"]["test_acc_loop"]


def _entry(kind, C, O, BM, BN, BC, **more):
    return {"kind": kind, "dtype": "float32", "C": C, "O": O, "kh": 3, "kw": 3, "BM": BM, "BN": BN, "BC": BC,
            **more}


def test_measured_tiles_are_used_for_their_shapes_only_and_compute_the_same(tmp_path, monkeypatch):
    path = implicit_conv.write_tile_table(tmp_path / "tiles.json", [
        _entry("forward", 16, 24, 32, 32, 16, warps=8, stages=2, tflops=99.0),  # measurements ride along
        _entry("weight_grad", 16, 24, 32, 16, 16, flat=True)], {"gpu": "test"})
    table = implicit_conv.read_tile_table(path)
    assert table == {("forward", "float32", 16, 24, 3, 3): implicit_conv.Tiles(32, 32, 16, 8, 2),
                     ("weight_grad", "float32", 16, 24, 3, 3): implicit_conv.Tiles(32, 16, 16, flat=True)}
    before = implicit_conv.default_tiles("forward", 16, 24, 3, 3, interpret=True)
    other = implicit_conv.default_tiles("forward", 24, 16, 3, 3, interpret=True)
    launched = []
    real_launch = implicit_conv.Tiles.launch
    monkeypatch.setattr(implicit_conv.Tiles, "launch", lambda self, interpret: launched.append(self)
                        or real_launch(self, interpret))
    x, w, _ = _pair(2, 2, 16, 24, 4, 4, 3, 1, channels_last=True)
    y_ref, grads_ref, g = _conv_and_grads(x, w, None, 1, "torch")
    with implicit_conv.measured_tiles(table):
        assert implicit_conv.default_tiles("forward", 16, 24, 3, 3) == implicit_conv.Tiles(32, 32, 16, 8, 2)
        # measured for float32 operands: bf16 ones keep the reasoned default
        assert implicit_conv.default_tiles("forward", 16, 24, 3, 3, dtype=torch.bfloat16) == \
            implicit_conv.default_tiles("forward", 16, 24, 3, 3, dtype=torch.float16)
        assert implicit_conv.default_tiles("forward", 24, 16, 3, 3, interpret=True) == other  # not in the table
        y, grads, _ = _conv_and_grads(x, w, None, 1, "interpret", g)
    # forward and weight gradient from the table; the input gradient (24 → 16 channels) kept its default
    assert launched[0] == table[("forward", "float32", 16, 24, 3, 3)]
    assert table[("weight_grad", "float32", 16, 24, 3, 3)] in launched
    assert other in launched
    assert _close(y, y_ref) and all(_close(a, b) for a, b in zip(grads, grads_ref))
    assert implicit_conv.default_tiles("forward", 16, 24, 3, 3, interpret=True) == before  # restored


@pytest.mark.parametrize("entry,message", [
    (_entry("backward", 16, 24, 32, 32, 16), "kind 'backward' is not one of forward, weight_grad"),
    (_entry("forward", 16, 24, 48, 32, 16), "BM must be powers of two, at least 16"),
    (_entry("forward", 16, 24, 32, 8, 16), "BN must be powers of two, at least 16"),
    (_entry("forward", 16, 24, 32, 32, 16, warps=3), "warps must be one of"),
    (_entry("forward", 0, 24, 32, 32, 16), "C must be positive integers"),
    (_entry("forward", 16, 24, 32, 32, 16, dtype="bf16"), "dtype 'bf16' is not one of bfloat16, float16"),
    ({"kind": "forward", "C": 16}, "missing dtype, O, kh, kw, BM, BN, BC"),
    (_entry("forward", 16, 24, 32, 32, 16, flat="yes"), "flat must be true, false or null, got 'yes'"),
])
def test_bad_tile_tables_are_refused_with_the_reason_and_nothing_is_written(tmp_path, entry, message):
    with pytest.raises(ValueError, match=message):
        implicit_conv.write_tile_table(tmp_path / "t.json", [entry], {})
    assert not list(tmp_path.iterdir())
    (tmp_path / "t.json").write_text(json.dumps({"tiles": [entry]}))
    with pytest.raises(ValueError, match=re.escape(f"t.json, tiles[0]: {message}")):
        implicit_conv.read_tile_table(tmp_path / "t.json")


def test_a_tile_table_with_two_blockings_for_one_shape_or_no_list_is_refused(tmp_path):
    twice = [_entry("forward", 16, 24, 32, 32, 16), _entry("forward", 16, 24, 64, 32, 16)]
    with pytest.raises(ValueError, match="a second blocking for"):
        implicit_conv.write_tile_table(tmp_path / "t.json", twice, {})
    (tmp_path / "u.json").write_text('{"about": {}}')
    with pytest.raises(ValueError, match="expected an object with a list 'tiles'"):
        implicit_conv.read_tile_table(tmp_path / "u.json")
    with pytest.raises(ValueError, match="cannot read the tile table"):
        implicit_conv.read_tile_table(tmp_path / "missing.json")


def _row(key, BM, tflops, default=False, rel_diff=0.0, error=None):
    row = {"key": list(key), "layer": 2, "pass": "forward", "default": default,
           "tiles": {"BM": BM, "BN": 64, "BC": 32, "warps": 4, "stages": 3}}
    if error:
        row["error"] = error
    else:
        row.update(tflops=tflops, rel_diff_vs_default=rel_diff)
    return row


def test_best_tiles_keeps_the_fastest_same_result_blocking_that_clearly_beats_the_default():
    from ffl.bench import best_tiles

    a, b, c = (("forward", "bfloat16", 32, 64, 3, 3), ("weight_grad", "bfloat16", 32, 64, 3, 3),
               ("forward", "bfloat16", 64, 128, 3, 3))
    rows = [
        _row(a, 64, 100.0, default=True), _row(a, 128, 130.0), _row(a, 32, 180.0, rel_diff=0.5),  # wrong sums
        _row(a, 16, None, error="OutOfResources"),
        _row(b, 64, 100.0, default=True), _row(b, 128, 104.0),  # 4 % faster: noise, the default stays
        _row(c, 64, 100.0, default=True), _row(c, 128, 90.0),   # the default is fastest
    ]
    chosen = best_tiles(rows, "bf16")
    assert chosen == [{"kind": "forward", "dtype": "bfloat16", "C": 32, "O": 64, "kh": 3, "kw": 3,
                       "BM": 128, "BN": 64, "BC": 32,
                       "warps": 4, "stages": 3, "tflops": 130.0, "default_tflops": 100.0, "layer": 2,
                       "pass": "forward"}]
    assert best_tiles(rows, "bf16", min_gain=0.0)[1]["kind"] == "weight_grad"
    assert best_tiles(rows, "fp32", min_gain=0.0)[0]["BM"] == 128  # 0.5 relative difference never passes


def test_a_sweeps_table_reads_back_and_its_blockings_compute_the_convolution(tmp_path):
    from ffl.bench import best_tiles, conv_sweep

    convs = ((3, 8, 4), (20, 24, 4))
    seen = []  # after each pass, the rows so far (a table can be written from them then)
    rows = conv_sweep("cpu", K=2, batch=2, precision="fp32", repeat=1, convs=convs,
                      after_pass=lambda so_far: seen.append(len(so_far)))
    assert len(seen) == 5 and seen == sorted(seen) and seen[-1] == len(rows)
    # interpreted timings mean nothing: the defaults are made slowest, so every shape with an
    # alternative gets its fastest non-default blocking
    chosen = best_tiles([dict(r, tflops=0.0) if r["default"] else r for r in rows], "fp32")
    table = implicit_conv.read_tile_table(implicit_conv.write_tile_table(tmp_path / "t.json", chosen, {}))
    keys = [tuple(r["key"]) for r in rows]
    assert set(table) == {k for k in keys if keys.count(k) > 1} and len(table) >= 3
    for key, tiles in table.items():
        assert any(tuple(r["key"]) == key and r["tiles"] == dataclasses.asdict(tiles) and not r["default"]
                   for r in rows)
    x, w, _ = _pair(2, 2, 20, 24, 4, 4, 3, 1, channels_last=True)
    y_ref, grads_ref, g = _conv_and_grads(x, w, None, 1, "torch")
    with implicit_conv.measured_tiles(table):
        y, grads, _ = _conv_and_grads(x, w, None, 1, "interpret", g)
    assert _close(y, y_ref) and all(_close(p, q) for p, q in zip(grads, grads_ref))
