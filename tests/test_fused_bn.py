"""ffl.fused_bn: BatchNorm → activation → max-pool in one pass each way, against PyTorch's
operations. On CPU the Triton kernels run in Triton's interpreter (FP32); scripts/gpu_check_conv.sh
runs the compiled ones on a GPU (bench.engine_agreement with the fused BatchNorm)."""
import copy
import functools

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from ffl import fused_bn  # noqa: E402
from ffl.batched import BatchedBatchNorm, bn_backend, conv_backend, stack_models  # noqa: E402
from ffl.models import build_model  # noqa: E402
from ffl.triton_support import kernels, ptx_for_hopper  # noqa: E402


def _unit(C, seed=0):
    torch.manual_seed(seed)
    bn = torch.nn.BatchNorm2d(C)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    return bn


def _close(a, b, rtol=1e-5):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) <= rtol


@pytest.mark.parametrize("B,C,H,W,pool,act,programs", [
    (3, 5, 4, 6, True, torch.nn.ReLU(), None),
    (2, 20, 6, 4, True, torch.nn.LeakyReLU(0.01), 7),   # several channel blocks; rows split 7 ways
    (4, 6, 3, 3, False, torch.nn.ReLU(), 3),             # no pool (PlainNet-5's last unit), odd sizes
    (2, 3, 2, 2, True, torch.nn.LeakyReLU(0.2), None),
])
def test_matches_batchnorm_activation_maxpool(B, C, H, W, pool, act, programs):
    bn = _unit(C)
    ref_bn = copy.deepcopy(bn)
    gen = torch.Generator().manual_seed(1)
    y = (torch.randn(B, C, H, W, generator=gen) * 2 + 1).contiguous(memory_format=torch.channels_last)
    y.requires_grad_(True)
    p = fused_bn.bn_act_pool(y, bn, act, pool, backend="interpret", programs=programs)
    r = fused_bn.reference(y, ref_bn, act, pool)
    assert p.shape == r.shape and _close(p, r)
    g = torch.randn(r.shape, generator=gen)
    got = torch.autograd.grad(p, (y, bn.weight, bn.bias), g)
    ref = torch.autograd.grad(r, (y, ref_bn.weight, ref_bn.bias), g)
    for a, b in zip(got, ref):
        assert _close(a, b, 1e-5)
    assert _close(bn.running_mean, ref_bn.running_mean) and _close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 1


def test_ties_in_a_window_route_the_gradient_as_max_pool_does():
    """Windows where ReLU zeroes several entries (ties) and windows with exact duplicates: the
    gradient reaches the same single element as max_pool2d's."""
    bn = torch.nn.BatchNorm2d(2)
    y = torch.tensor([[[[5., 5.], [1., 2.]], [[-3., -3.], [-3., 9.]]]]).repeat(2, 1, 1, 1)
    y = (y + torch.arange(2.).view(2, 1, 1, 1)).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    act = torch.nn.LeakyReLU(0.1)
    g = torch.ones(2, 2, 1, 1)
    got = torch.autograd.grad(fused_bn.bn_act_pool(y, bn, act, True, backend="interpret"), y, g)[0]
    ref = torch.autograd.grad(fused_bn.reference(y, copy.deepcopy(bn), act, True), y, g)[0]
    assert _close(got, ref)


def test_units_it_does_not_fuse_are_refused_with_a_reason():
    bn = _unit(4)
    y = torch.randn(2, 4, 5, 4)
    assert not fused_bn.supported(y, torch.nn.ReLU(), True, True)       # odd height under a pool
    assert fused_bn.supported(y, torch.nn.ReLU(), False, True)
    assert not fused_bn.supported(y, torch.nn.Tanh(), False, True)       # another activation
    assert not fused_bn.supported(y, torch.nn.ReLU(), False, False)      # evaluation mode
    with pytest.raises(ValueError, match="training mode, ReLU or leaky ReLU, and even sizes"):
        fused_bn.bn_act_pool(y, bn, torch.nn.ReLU(), True, backend="interpret")
    with pytest.raises(TypeError, match="float32 only"):
        fused_bn.bn_act_pool(y.bfloat16(), bn, torch.nn.ReLU(), False, backend="interpret")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'triton' is not available here"):
            fused_bn.bn_act_pool(y, bn, torch.nn.ReLU(), False, backend="triton")
    with pytest.raises(ValueError, match="unknown BatchNorm backend"):
        with bn_backend("cudnn"):
            pass


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_stacked_convnet_with_fused_units_equals_the_networks(activation):
    """A stacked PlainNet (tiny widths; pooled and unpooled units) with the fused BatchNorm, alone
    and with the interpreted convolution too: outputs, every parameter gradient and the running
    statistics match the per-network models; evaluation mode takes the PyTorch operations."""
    torch.manual_seed(0)
    models = [build_model("cnn", num_classes=3, widths=[4, 6, 8], activation=activation) for _ in range(3)]
    x = torch.randn(5, 3, 8, 8)
    y = torch.randint(0, 3, (5,))
    per_net = [copy.deepcopy(m) for m in models]
    ref_out = torch.cat([m(x) for m in per_net], 1)
    ref_loss = sum(F.cross_entropy(o, y) for o in ref_out.split(3, 1))
    ref_grads = [torch.autograd.grad(ref_loss, list(m.parameters()), retain_graph=True) for m in per_net]
    for conv in ("torch", "interpret"):
        net = stack_models(models)
        with bn_backend("interpret"), conv_backend(conv):
            out = net(x.repeat(1, 3, 1, 1))
            loss = F.cross_entropy(out.view(5, 3, 3).transpose(1, 2), y[:, None].expand(5, 3), reduction="sum") / 5
            grads = dict(zip([n for n, _ in net.named_parameters()], torch.autograd.grad(loss, list(net.parameters()))))
        assert BatchedBatchNorm.backend == "torch"
        assert _close(out.detach(), ref_out.detach())
        for k, (m, mg) in enumerate(zip(per_net, ref_grads)):
            for (name, _), g in zip(m.named_parameters(), mg):
                assert _close(grads[name][k], g, 1e-4), (conv, name)
        for i, bn in enumerate(net.bns):
            for k, m in enumerate(per_net):
                assert _close(bn.running_var[k], m.bns[i].running_var) and _close(bn.running_mean[k], m.bns[i].running_mean)
        net.eval()
        with bn_backend("interpret"):
            assert _close(net(x.repeat(1, 3, 1, 1)).detach(), torch.cat([m.eval()(x) for m in per_net], 1).detach())
        for m in per_net:
            m.train()


@pytest.mark.slow
@pytest.mark.parametrize("pool", [True, False])
def test_kernels_compile_for_the_h100_with_vector_loads(pool):
    stats, forward, backward = kernels(fused_bn._KERNELS, False)
    vectors = ["SCALE", "SHIFT", "MEAN", "INVSTD", "MEAN_DZ", "MEAN_DZX", "SUM_DZ", "SUM_DZX"]
    _ptx = functools.partial(ptx_for_hopper, scalars={"SLOPE": "fp32"})
    ptx = _ptx(stats, {"Y": "*bf16", "SHIFT_OUT": "*fp32", "S1": "*fp32", "S2": "*fp32"},
                              dict(BR=64, BCH=64), ["Y", "SHIFT_OUT", "S1", "S2", "C", "ROWS_PER_PROGRAM"])
    assert "ld.global.v4" in ptx
    ptx = _ptx(forward, {"Y": "*bf16", "P": "*bf16", "SCALE": "*fp32", "SHIFT": "*fp32"},
                              dict(POOL=pool, BR=64, BCH=64), ["Y", "P", "SCALE", "SHIFT", "C", "H", "W"])
    assert "ld.global.v4" in ptx and "st.global.v4" in ptx
    for write in (False, True):
        ptx = _ptx(backward, {"Y": "*bf16", "GP": "*bf16", "DY": "*bf16"} | {v: "*fp32" for v in vectors},
                                  dict(POOL=pool, WRITE=write, BR=64, BCH=64),
                                  ["Y", "GP", "DY", *vectors, "C", "H", "W", "PIXELS_PER_PROGRAM"])
        assert "ld.global.v4" in ptx


@pytest.mark.slow  # about 30 s of interpreted kernels
def test_engine_with_fused_units_trains_the_plain_loops_weights():
    """The whole engine with the fused BatchNorm (and the interpreted convolutions) against the
    plain loop, PlainNet-5 at small widths: crop+flip, momentum, weight decay, an lr step."""
    from ffl.bench import engine_agreement

    res = engine_agreement("cpu", "interpret", precisions=("fp32",), archs=("cnn",), size=8, n=24, epochs=2,
                           bn_backend_name="interpret")
    assert res["cnn_fp32"]["steps"] == 2 and res["cnn_fp32"]["max_abs_weight_diff"] < 1e-4
    assert res["cnn_fp32"]["test_acc_batched"] == res["cnn_fp32"]["test_acc_loop"]
