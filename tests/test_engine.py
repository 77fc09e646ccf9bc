"""The batched engine trains exactly what a plain PyTorch loop trains (issue: "the speed must not
change the science"): same models, seeds, data order, augmentation → same weights (float tol)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ffl.batched import BatchedGRU, UnsupportedModel, stack_models
from ffl.engine import (NetworkData, TrainConfig, augment_batch, balanced_plan, init_stacked, lr_at,
                        precision_scope, train_batched, train_loop)
from ffl.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = {
    "mlp": dict(in_features=3 * 16 * 16, hidden=(16, 12)),
    "cnn": dict(widths=(4, 6, 8, 8)),
    "plainnet6": dict(widths=(4, 6, 8, 8, 8)),
    "resnet5": dict(widths=(4, 6, 8, 8)),
    "gru": dict(hidden=8),
}


def image_tasks(U=2, n=40, n_test=12, classes=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [SimpleNamespace(x_train=torch.randn(n, 3, size, size, generator=g),
                            y_train=torch.randint(0, classes, (n,), generator=g),
                            x_test=torch.randn(n_test, 3, size, size, generator=g),
                            y_test=torch.randint(0, classes, (n_test,), generator=g)) for _ in range(U)]


def name_tasks(sizes=((30, 9, 7), (22, 5, 9)), classes=2, seed=0):
    """Padded one-hot sequences with lengths, tasks of different sizes and max lengths."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, nt, T in sizes:
        def split(m):
            lens = torch.randint(1, T + 1, (m,), generator=g)
            idx = torch.randint(0, 58, (m, T), generator=g)
            x = F.one_hot(idx, 58).float() * (torch.arange(T)[None, :] < lens[:, None]).unsqueeze(-1)
            return x, torch.randint(0, classes, (m,), generator=g), lens
        x, y, l = split(n)
        xt, yt, lt = split(nt)
        out.append(SimpleNamespace(x_train=x, y_train=y, x_test=xt, y_test=yt, lengths_train=l, lengths_test=lt))
    return out


def models(arch, seeds, ncls):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(build_model(arch, ncls, **SMALL[arch]))
    return out


def assert_same(a, b, atol=1e-5, adam_lr=None):
    """Same weights within float tolerance. With Adam, a parameter whose gradient is exactly zero
    in one computation and ~1e-12 in the other (a dead channel) takes a ±lr step, so there we
    allow a few entries to differ by at most lr·steps."""
    assert a.state.keys() == b.state.keys()
    for k in a.state:
        assert a.state[k].shape == b.state[k].shape, k
        if a.state[k].is_floating_point() and adam_lr is not None:
            d = (a.state[k] - b.state[k]).abs()
            assert (d > atol).float().mean() < 0.02 and d.max() <= adam_lr * a.steps, k
        elif a.state[k].is_floating_point():
            torch.testing.assert_close(a.state[k], b.state[k], atol=atol, rtol=1e-4, msg=k)
        else:
            assert torch.equal(a.state[k], b.state[k]), k
    assert a.test_acc == pytest.approx(b.test_acc, abs=1e-9) or _close_acc(a, b)
    assert a.train_acc == pytest.approx(b.train_acc, abs=0.05)


def _close_acc(a, b):  # an argmax tie may flip one example
    return all(abs(x - y) < 0.1 for x, y in zip(a.test_acc, b.test_acc))


@pytest.mark.parametrize("arch", ["mlp", "cnn", "plainnet6", "resnet5"])
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_batched_equals_loop_images(arch, opt):
    # PlainNet-6 pools four times: on 16×16 inputs its last BatchNorms would see 2×2 and 1×1 maps,
    # where Adam's normalized steps amplify float-rounding differences of near-zero gradients
    data = NetworkData.from_tasks(image_tasks(size=32 if arch == "plainnet6" else 16))
    cfg = TrainConfig(optimizer=opt, lr=0.05 if opt == "sgd" else 1e-3, epochs=3, lr_step_epochs=[2],
                      batch_size=16, augment=arch != "mlp", weight_decay=1e-4, momentum=0.9)
    seeds, dseeds, tidx = [11, 12, 13], [21, 22, 23], [0, 1, 1]
    a = train_batched(models(arch, seeds, 3), data, tidx, dseeds, cfg)
    b = train_loop(models(arch, seeds, 3), data, tidx, dseeds, cfg)
    assert a.steps == b.steps == 9
    # CNNs: a max-pool or ReLU tie decided differently at float rounding level moves a few
    # weights by ~1e-5 after some steps; the MLP matches to ~1e-8
    assert_same(a, b, atol=1e-5 if arch == "mlp" else 1e-4,
                adam_lr=cfg.lr if opt == "adam" and arch != "mlp" else None)
    # and training moved the weights
    init = models(arch, seeds[:1], 3)[0].state_dict()
    w = next(k for k in init if k.endswith("weight"))
    assert not torch.allclose(init[w], a.state[w][0])


def test_batched_equals_loop_mlp_with_output_relu():
    """The official MLP's ReLU on the logits: the batched fast path honours it."""
    data = NetworkData.from_tasks(image_tasks())
    cfg = TrainConfig(lr=0.05, epochs=3, lr_step_epochs=[2], batch_size=16, augment=True, momentum=0.9)
    seeds, dseeds, tidx = [11, 12, 13], [21, 22, 23], [0, 1, 1]

    def nets():
        out = []
        for s in seeds:
            torch.manual_seed(s)
            out.append(build_model("mlp", 3, output_relu=True, **SMALL["mlp"]))
        return out

    a = train_batched(nets(), data, tidx, dseeds, cfg)
    b = train_loop(nets(), data, tidx, dseeds, cfg)
    assert_same(a, b, atol=1e-5)
    plain = train_batched(models("mlp", seeds, 3), data, tidx, dseeds, cfg)
    assert _max_diff(a, plain) > 1e-4  # the clipped logits train differently
    x = torch.randn(5, 3, 16, 16)
    stacked = stack_models(nets()).eval()
    logits = stacked(x.unsqueeze(0).expand(3, *x.shape).contiguous())
    assert (logits >= 0).all() and torch.allclose(logits[:, :3], nets()[0].eval()(x), atol=1e-6)


def _max_diff(a, b):
    return max((a.state[k] - b.state[k]).abs().max().item() for k in a.state if a.state[k].is_floating_point())


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_bf16_precision_batched_equals_loop(arch):
    """precision='bf16' changes the arithmetic (the weights move away from FP32 training) but not
    the engine's equivalence: batched and loop still train the same bf16 networks."""
    data = NetworkData.from_tasks(image_tasks())
    seeds, dseeds, tidx = [11, 12, 13], [21, 22, 23], [0, 1, 1]
    res = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(lr=0.05, epochs=3, lr_step_epochs=[2], batch_size=16, augment=arch != "mlp",
                          momentum=0.9, weight_decay=1e-4, precision=precision)
        res[precision] = train_batched(models(arch, seeds, 3), data, tidx, dseeds, cfg)
    loop = train_loop(models(arch, seeds, 3), data, tidx, dseeds, cfg)
    assert_same(res["bf16"], loop, atol=1e-5)
    assert _max_diff(res["bf16"], res["fp32"]) > 1e-4


def test_precision_errors_and_flags():
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose one of fp32, tf32, bf16"):
        TrainConfig(precision="fp16")
    data = NetworkData.from_tasks(image_tasks(U=1))
    with pytest.raises(ValueError, match="'tf32' exists on CUDA GPUs only"):
        train_batched(models("mlp", [1], 3), data, [0], [0], TrainConfig(precision="tf32", epochs=1))
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    before = flags()
    cuda = torch.device("cuda")  # only the flags are touched: no GPU needed
    with precision_scope("tf32", cuda):
        assert flags() == (True, True)
    with precision_scope("fp32", cuda):
        assert flags() == (False, False)  # also cuDNN, whose PyTorch default is TF32
    assert flags() == before


@pytest.mark.slow
def test_compiled_training_equals_eager():
    """``compile=True`` (torch.compile, for GPU throughput) trains the same networks."""
    data = NetworkData.from_tasks(image_tasks())
    cfg = TrainConfig(lr=0.05, epochs=2, batch_size=16, momentum=0.9, weight_decay=1e-4)
    seeds, dseeds, tidx = [11, 12], [21, 22], [0, 1]
    a = train_batched(models("mlp", seeds, 3), data, tidx, dseeds, cfg, compile=True)
    b = train_batched(models("mlp", seeds, 3), data, tidx, dseeds, cfg)
    assert_same(a, b, atol=1e-6)


@pytest.mark.parametrize("sampling", ["epochs", "balanced"])
def test_batched_equals_loop_gru_stepwise(sampling):
    """GRU-2, NameData-style: batch 1, step-based lr schedule, tasks of different sizes/lengths;
    shuffled epochs or the official trainer's class-balanced draws."""
    data = NetworkData.from_tasks(name_tasks())
    cfg = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=1, steps=40, lr_step_steps=[28],
                      sampling=sampling)
    seeds, dseeds, tidx = [1, 2, 3], [4, 5, 6], [0, 1, 0]
    a = train_batched(models("gru", seeds, 2), data, tidx, dseeds, cfg)
    b = train_loop(models("gru", seeds, 2), data, tidx, dseeds, cfg)
    assert a.steps == b.steps == 40
    assert_same(a, b)
    if sampling == "balanced":  # the draws really differ from shuffled epochs
        c = train_batched(models("gru", seeds, 2), data, tidx, dseeds, TrainConfig(**{**vars(cfg), "sampling": "epochs"}))
        assert not torch.allclose(a.state["gru.weight_ih_l0"], c.state["gru.weight_ih_l0"])


def test_balanced_sampling_draws_each_class_equally():
    labels = torch.tensor([0] * 90 + [1] * 10 + [2] * 5)[torch.randperm(105, generator=torch.Generator().manual_seed(0))]
    gen = torch.Generator().manual_seed(1)
    idx = torch.cat([balanced_plan(gen, labels, augment=False)[0] for _ in range(400)])  # 42,000 draws
    share = labels[idx].bincount() / len(idx)
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=share.dtype), atol=0.01)
    rare = idx[labels[idx] == 2]
    assert set(rare.tolist()) == set((labels == 2).nonzero().squeeze(1).tolist())  # every rare example drawn
    with pytest.raises(ValueError, match="sampling 'balanced' .* set steps"):
        TrainConfig(sampling="balanced")
    with pytest.raises(ValueError, match="unknown sampling 'uniform'; choose one of epochs, balanced"):
        TrainConfig(sampling="uniform", steps=3)


def test_batched_gru_layer_equals_nn_gru():
    torch.manual_seed(0)
    grus = [nn.GRU(5, 7, num_layers=2, batch_first=True) for _ in range(3)]
    x = torch.randn(4, 6, 3, 5)  # (B, T, K, F)
    out, h = BatchedGRU(grus)(x.reshape(4, 6, 15))
    for k, g in enumerate(grus):
        o, hk = g(x[:, :, k])
        torch.testing.assert_close(out.view(4, 6, 3, 7)[:, :, k], o, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(h.view(2, 4, 3, 7)[:, :, k], hk, atol=1e-6, rtol=1e-5)


def test_per_network_batchnorm_and_eval_mode():
    """Running statistics are per network: a batched forward in train mode updates each network's
    BN buffers as its own forward does."""
    ms = models("cnn", [1, 2], 3)
    net = stack_models([m.train() for m in ms]).train()
    x = torch.randn(5, 2, 3, 8, 8)
    y = net(x.reshape(5, 6, 8, 8)).view(5, 2, 3)
    for k, m in enumerate(ms):
        torch.testing.assert_close(y[:, k], m(x[:, k]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(net.state_dict()["bns.0.running_mean"][k], m.bns[0].running_mean)
        assert int(net.state_dict()["bns.0.num_batches_tracked"][k]) == 1


def test_augment_matches_manual_crop_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 8, 8, generator=g)
    offs = torch.randint(0, 9, (6, 2), generator=g)
    flips = torch.randint(0, 2, (6,), generator=g)
    out = augment_batch(x, offs, flips, 4)
    for i in range(6):
        p = F.pad(x[i], (4, 4, 4, 4))
        ref = p[:, offs[i, 0]:offs[i, 0] + 8, offs[i, 1]:offs[i, 1] + 8]
        if flips[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


def test_lr_schedule_matches_multisteplr():
    cfg = TrainConfig(lr=0.1, lr_step_epochs=[3, 5], lr_gamma=0.1, epochs=7)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sch = torch.optim.lr_scheduler.MultiStepLR(opt, [3, 5], 0.1)
    for e in range(7):
        assert lr_at(cfg, e, 0) == opt.param_groups[0]["lr"]
        opt.step()
        sch.step()


def test_unsupported_layer_is_reported():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(4)

        def forward(self, x):
            return self.ln(x)

    with pytest.raises(UnsupportedModel, match="ln"):
        stack_models([Odd(), Odd()])


def test_cpu_determinism():
    data = NetworkData.from_tasks(image_tasks())
    cfg = TrainConfig(lr=0.05, epochs=2, batch_size=16, augment=True, momentum=0.9, weight_decay=1e-4)
    a = train_batched(models("cnn", [1, 2], 3), data, [0, 1], [3, 4], cfg)
    b = train_batched(models("cnn", [1, 2], 3), data, [0, 1], [3, 4], cfg)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_parallel_init_is_the_serial_init():
    import functools

    build = functools.partial(build_model, "mlp", 2, hidden=(500, 500))
    par = init_stacked(build, [5, 6, 7, 8], workers=2)
    for k, s in enumerate([5, 6, 7, 8]):
        torch.manual_seed(s)
        for name, v in build().state_dict().items():
            assert torch.equal(par[name][k], v)


def test_a_serial_init_leaves_the_callers_thread_count_alone():
    """The serial path builds in this process with one thread (the workers' setting); the caller's
    training afterwards keeps its own thread count (it ran single-threaded before)."""
    import functools

    build = functools.partial(build_model, "cnn", 2, widths=(2, 2, 2, 2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        serial = init_stacked(build, [5, 6], workers=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    torch.manual_seed(6)
    assert all(torch.equal(serial[name][1], v) for name, v in build().state_dict().items())


def test_started_init_runs_in_workers_while_the_caller_goes_on():
    """start_init_stacked returns while its forked workers still build (they wait for the caller
    to go on); the result is the serial loop's bytes."""
    import functools
    import multiprocessing as mp
    import os

    from ffl.engine import start_init_stacked

    gate, parent = mp.get_context("fork").Event(), os.getpid()
    plain = functools.partial(build_model, "mlp", 2, hidden=(500, 500))

    def build():
        if os.getpid() != parent:
            assert gate.wait(30)
        return plain()

    seeds = [5, 6, 7, 8]
    pending = start_init_stacked(build, seeds, workers=2)
    assert len(pending.procs) == 2 and all(p.is_alive() for p in pending.procs)
    gate.set()
    par = pending.result()
    for k, s in enumerate(seeds):
        torch.manual_seed(s)
        for name, v in plain().state_dict().items():
            assert torch.equal(par[name][k], v)


def test_parallel_init_needs_no_dev_shm(monkeypatch):
    """The workers write into an anonymous shared mapping, so a full (or 64 MB) /dev/shm does not
    send a GPU chunk's initialization down the serial path; same bytes."""
    import functools
    import os

    from ffl.engine import start_init_stacked

    real_statvfs = os.statvfs

    def full_dev_shm(path, *a, **kw):
        if str(path).startswith("/dev/shm"):
            raise AssertionError("/dev/shm consulted")
        return real_statvfs(path, *a, **kw)

    monkeypatch.setattr(os, "statvfs", full_dev_shm)
    build = functools.partial(build_model, "mlp", 2, hidden=(500, 500))
    pending = start_init_stacked(build, [5, 6, 7, 8], workers=2)
    assert len(pending.procs) == 2  # forked, not serial
    par = pending.result()
    for k, s in enumerate([5, 6, 7, 8]):
        torch.manual_seed(s)
        for name, v in build().state_dict().items():
            assert torch.equal(par[name][k], v)
    assert all(t.data_ptr() % 64 == 0 for t in par.values())


def test_init_worker_error_reaches_the_caller_with_its_message():
    def build():
        if torch.initial_seed() == 7:
            raise ValueError("no network for seed 7 (test)")
        return nn.Linear(1024, 1024)  # 4 of them: enough parameters for forked workers

    with pytest.raises(RuntimeError, match=r"exit codes \[1\]: ValueError: no network for seed 7 \(test\)"):
        init_stacked(build, [5, 6, 7, 8], workers=2)


def test_train_from_stacked_state_equals_from_models():
    import functools

    data = NetworkData.from_tasks(image_tasks())
    cfg = TrainConfig(lr=0.05, epochs=2, batch_size=16, augment=True, momentum=0.9, weight_decay=1e-4)
    build = functools.partial(build_model, "cnn", 3, **SMALL["cnn"])
    a = train_batched(models("cnn", [1, 2], 3), data, [0, 1], [3, 4], cfg)
    b = train_batched((build(), init_stacked(build, [1, 2], workers=1)), data, [0, 1], [3, 4], cfg)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
