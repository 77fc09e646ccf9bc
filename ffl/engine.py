"""Training K networks at once (the zoo engine behind :func:`ffl.zoo.train_zoo`, §4).

The paper trains 5,000 networks per experiment. One small network cannot keep a CPU core or a GPU
busy, so instead of a Python loop over models this module trains K networks as *one* computation
(the stacked module of :mod:`ffl.batched`) while keeping every network's science exactly as if it
were trained alone:

* **Same models.** Network k is the model ``build()`` makes right after
  ``torch.manual_seed(seeds[k])`` (:func:`ffl.init_workers.init_stacked`, in parallel worker
  processes).
* **Same loss and optimizer.** The loss is the *sum* over networks of each network's mean
  cross-entropy, so the gradient of network k is its solo gradient. SGD (momentum, weight decay)
  and Adam are element-wise, so one optimizer over the stacked tensors is K independent ones
  (PyTorch's fused SGD/Adam: one pass over memory).
* **Same data order.** Network k draws its minibatch order (and crop/flip augmentation) from its
  own generator, seeded from its own data seed; :func:`train_loop` (the plain-PyTorch reference
  used by the equivalence test and the benchmark) draws from the same streams. Batches are
  gathered with one ``torch.gather`` of rows from task tensors preloaded on the device.
* **Precision.** ``TrainConfig.precision`` (:data:`PRECISIONS`); weights, gradients and optimizer
  state stay FP32 in every precision.

Also here: :func:`probe_capacity` (how many networks fit on a GPU, measured by training a few).
Re-exported from their own modules: :func:`init_stacked`, :func:`start_init_stacked` and
:class:`PendingInit` (:mod:`ffl.init_workers`), :func:`tune_malloc` (:mod:`ffl.malloc`).

Determinism: on CPU the same seeds give the same bytes. On CUDA kernels may differ at float
rounding level between runs unless deterministic algorithms are enabled. Results can depend at
rounding level on which networks share an engine batch, for every architecture: the fused optimizer
rounds an element differently in the vectorized body and in the scalar tail of the stacked tensor
(and CNN kernels may pick other algorithms), which is why :mod:`ffl.zoo` fixes the chunking of a
zoo and stores it.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ffl.batched import fold_input, stack_models, stack_state
from ffl.init_workers import PendingInit, init_stacked, start_init_stacked
from ffl.malloc import tune_malloc
from ffl.models import build_model, input_shape

__all__ = [
    "TrainConfig",
    "NetworkData",
    "train_batched",
    "train_loop",
    "init_stacked",
    "start_init_stacked",
    "PendingInit",
    "nonfinite_networks",
    "probe_capacity",
    "epoch_plan",
    "augment_batch",
    "lr_at",
    "precision_scope",
    "tune_malloc",
    "PRECISIONS",
    "SAMPLINGS",
    "balanced_plan",
]


SAMPLINGS = ("epochs", "balanced")
"""How a network walks through its task's training set:

* ``epochs``: successive reshuffled epochs, as a shuffling DataLoader does;
* ``balanced``: every example independently: a class uniformly at random, then one of its examples
  uniformly at random (with replacement), as the official GRU trainer draws names (step-based only).
"""

PRECISIONS = ("fp32", "tf32", "bf16")
"""Arithmetic of training (weights, gradients and optimizer state are FP32 in all three):

* ``fp32``: FP32 everywhere, also cuDNN convolutions (PyTorch's default lets them use TF32).
* ``tf32``: TF32 tensor-core matmuls and convolutions (CUDA only; ~10-bit mantissa products).
* ``bf16``: bfloat16 autocast of the forward pass (and its backward), NHWC image activations on
  CUDA; the loss and the optimizer stay FP32.
"""


# --------------------------------------------------------------------------------------------
# Configuration and data
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Training hyper-parameters of one network. The defaults are neutral (plain SGD, one epoch,
    constant learning rate); the paper's settings (§4) live in ``profiles/paper.yaml`` and reach a
    zoo through :func:`ffl.zoo.spec_from_profile`.

    ``steps``: if set, training is step-based (``epochs`` ignored; ``lr_step_steps`` are the lr
    milestones in steps); each network walks through its own reshuffled epochs as needed, or
    draws class-balanced examples (``sampling``, see :data:`SAMPLINGS`).
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 64
    epochs: int = 1
    lr_step_epochs: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    augment: bool = False
    steps: int | None = None
    lr_step_steps: list[int] = field(default_factory=list)
    crop_padding: int = 4
    precision: str = "fp32"
    sampling: str = "epochs"

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose 'sgd' or 'adam'")
        check_precision(self.precision)
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {self.sampling!r}; choose one of {', '.join(SAMPLINGS)}")
        if self.sampling == "balanced" and self.steps is None:
            raise ValueError("sampling 'balanced' draws examples step by step: set steps (step-based training)")


def check_precision(precision: str, device: torch.device | str | None = None) -> None:
    """``ValueError`` for an unknown precision, or TF32 on a device that has none."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "tf32" and device is not None and torch.device(device).type != "cuda":
        raise ValueError("precision 'tf32' exists on CUDA GPUs only; use 'fp32' (or 'bf16') on "
                         f"{torch.device(device).type}")


@contextlib.contextmanager
def precision_scope(precision: str, device: torch.device):
    """Set PyTorch's global TF32 flags for ``precision`` (see :data:`PRECISIONS`) inside the block,
    restoring them afterwards. bf16 autocast is applied around forward passes by the caller."""
    check_precision(precision, device)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _layout(x: torch.Tensor, precision: str) -> torch.Tensor:
    """NHWC image batches for bf16 on CUDA (cuDNN's tensor-core convolutions want it)."""
    if precision == "bf16" and x.is_cuda and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@dataclass
class NetworkData:
    """Training/test tensors of the distinct tasks that a batch of networks trains on.

    ``x_train``: (U, n_max, *input_shape) for U distinct tasks, zero-padded to the largest task
    (``n_train[u]`` = task u's true size); ``y_train`` (U, n_max) int64; likewise the test split.
    Sequence tasks (NameData) also carry ``lengths_*`` (U, n_max) and are padded in time too.
    Network k uses task ``task_index[k]``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_train: list[int]
    n_test: list[int]
    lengths_train: torch.Tensor | None = None
    lengths_test: torch.Tensor | None = None

    @classmethod
    def from_tasks(cls, tasks: Sequence, device: torch.device | str = "cpu") -> NetworkData:
        """Stack :class:`ffl.data.TaskData`-like objects (padding sizes and sequence lengths)."""
        def stack(name: str, pad_value: float = 0) -> torch.Tensor | None:
            ts = [getattr(t, name, None) for t in tasks]
            if ts[0] is None:
                return None
            shape = [max(t.shape[d] for t in ts) for d in range(ts[0].dim())]
            out = torch.full((len(ts), *shape), pad_value, dtype=ts[0].dtype)
            for u, t in enumerate(ts):
                out[(u, *[slice(0, n) for n in t.shape])] = t
            return out.to(device)

        return cls(stack("x_train"), stack("y_train").long(), stack("x_test"), stack("y_test").long(),
                   [len(t.y_train) for t in tasks], [len(t.y_test) for t in tasks],
                   stack("lengths_train", 1), stack("lengths_test", 1))

    def subset(self, u: int) -> NetworkData:
        """Task u alone (unpadded)."""
        a, b = self.n_train[u], self.n_test[u]
        return NetworkData(self.x_train[u:u + 1, :a], self.y_train[u:u + 1, :a], self.x_test[u:u + 1, :b],
                           self.y_test[u:u + 1, :b], [a], [b],
                           None if self.lengths_train is None else self.lengths_train[u:u + 1, :a],
                           None if self.lengths_test is None else self.lengths_test[u:u + 1, :b])


def lr_at(cfg: TrainConfig, epoch: int, step: int) -> float:
    """Learning rate in ``epoch`` (0-based) / global ``step``: ``lr * gamma**(milestones passed)``,
    computed as torch's MultiStepLR does (repeated multiplication)."""
    if cfg.steps is not None:
        passed = sum(1 for m in cfg.lr_step_steps if step >= m)
    else:
        passed = sum(1 for m in cfg.lr_step_epochs if epoch >= m)
    lr = cfg.lr
    for _ in range(passed):
        lr = lr * cfg.lr_gamma
    return lr


def epoch_plan(gen: torch.Generator, n: int, augment: bool, pad: int = 4):
    """One network's epoch: a permutation of its n samples and, with augmentation, per position a
    crop offset (oy, ox) in [0, 2*pad] and a flip bit. Drawn from the network's own generator."""
    perm = torch.randperm(n, generator=gen)
    if not augment:
        return perm, None, None
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    flips = torch.randint(0, 2, (n,), generator=gen)
    return perm, offsets, flips


def augment_batch(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) then horizontal flip, per sample.

    ``x``: (..., C, H, W) images; ``offsets`` (..., 2) and ``flips`` (...) for the same leading
    dims. Equivalent to torchvision's ``RandomCrop(H, padding=pad)`` + ``RandomHorizontalFlip``
    with the given draws.
    """
    lead = x.shape[:-3]
    C, H, W = x.shape[-3:]
    xf = x.reshape(-1, C, H, W)
    off = offsets.reshape(-1, 2).to(x.device)
    fl = flips.reshape(-1).to(x.device).bool()
    xp = F.pad(xf, (pad, pad, pad, pad))
    n = xf.shape[0]
    ar_h = torch.arange(H, device=x.device)
    ar_w = torch.arange(W, device=x.device)
    rows = off[:, 0:1] + ar_h  # (n, H)
    cols = torch.where(fl[:, None], off[:, 1:2] + (W - 1 - ar_w), off[:, 1:2] + ar_w)  # (n, W)
    Wp = W + 2 * pad
    flat = (rows[:, :, None] * Wp + cols[:, None, :]).reshape(n, 1, H * W).expand(n, C, H * W)
    out = torch.gather(xp.reshape(n, C, -1), 2, flat)
    return out.reshape(*lead, C, H, W)


def gather(x: torch.Tensor, task_index: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``x[task_index[k], idx[k, b]]`` of x (U, n, *shape) for idx (K, B), as (K, B, *shape)
    (one row gather: much faster than 2-D advanced indexing on CPU)."""
    U, n = x.shape[:2]
    flat = (task_index[:, None] * n + idx).reshape(-1)
    rows = x.reshape(U * n, -1)
    # torch.gather with an expanded index: measured faster than index_select / x[flat] on CPU
    out = torch.gather(rows, 0, flat[:, None].expand(-1, rows.shape[1]))
    return out.view(*idx.shape, *x.shape[2:])


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _make_optimizer(params, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """``torch.optim.SGD``/``Adam``; ``fused`` (the batched engine) makes one pass over memory per
    step instead of several (same update rule; float rounding may differ in the last bit)."""
    kw = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kw)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)


def balanced_plan(gen: torch.Generator, labels: torch.Tensor, augment: bool, pad: int = 4):
    """``len(labels)`` class-balanced draws (see :data:`SAMPLINGS`), laid out like :func:`epoch_plan`:
    each index picks a class uniformly, then one of that class's examples uniformly."""
    n = len(labels)
    order = labels.argsort(stable=True)  # examples grouped by class
    classes, counts = labels.unique(return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    c = torch.randint(0, len(classes), (n,), generator=gen)
    within = (torch.rand(n, generator=gen, dtype=torch.float64) * counts[c]).long().clamp_max(counts[c] - 1)
    idx = order[starts[c] + within]
    if not augment:
        return idx, None, None
    return idx, torch.randint(0, 2 * pad + 1, (n, 2), generator=gen), torch.randint(0, 2, (n,), generator=gen)


class _Stream:
    """One network's sample stream: successive epochs (permutation + augmentation draws, see
    :func:`epoch_plan`), or blocks of class-balanced draws when ``labels`` are given (see
    :func:`balanced_plan`), from its own generator, consumed in order."""

    def __init__(self, seed: int, n: int, augment: bool, pad: int, labels: torch.Tensor | None = None) -> None:
        self.gen = torch.Generator().manual_seed(int(seed))
        self.n, self.augment, self.pad, self.labels = n, augment, pad, labels
        self.buf: list[tuple] = []
        self.pos = 0

    def _plan(self):
        if self.labels is not None:
            return balanced_plan(self.gen, self.labels, self.augment, self.pad)
        return epoch_plan(self.gen, self.n, self.augment, self.pad)

    def take(self, m: int):
        parts, got = [], 0
        while got < m:
            if not self.buf or self.pos == len(self.buf[0]):
                self.buf = [x for x in self._plan() if x is not None]
                self.pos = 0
            j = min(len(self.buf[0]), self.pos + m - got)
            parts.append([x[self.pos:j] for x in self.buf])
            got += j - self.pos
            self.pos = j
        return [torch.cat(c) for c in zip(*parts)]


def _sampling_labels(cfg: TrainConfig, data: NetworkData, u: int) -> torch.Tensor | None:
    # Labels of task u's training set when its stream draws class-balanced examples.
    return data.y_train[u, :data.n_train[u]].cpu() if cfg.sampling == "balanced" else None


def total_steps(cfg: TrainConfig, n: int) -> int:
    """Optimizer steps of one network on a task of n samples."""
    return cfg.steps if cfg.steps is not None else cfg.epochs * math.ceil(n / cfg.batch_size)


def _batches(streams: Sequence[_Stream], cfg: TrainConfig, device: torch.device, block: int = 64):
    """Yield (epoch, step, idx (K, Bs), offsets (K, Bs, 2) | None, flips (K, Bs) | None) on ``device``.

    Epoch-based: each epoch is one permutation per network, cut into ceil(n/B) batches (the last
    one smaller), as a shuffling DataLoader does; all networks need the same n. Step-based: each
    network's batches are consecutive B-sized windows of its endless stream of epochs.
    """
    B = cfg.batch_size
    ns = {s.n for s in streams}
    if cfg.steps is None:
        if len(ns) != 1:
            raise ValueError(f"epoch-based training of networks batched together needs equal task sizes, got {sorted(ns)}; "
                             "use step-based training (steps=...) or batch tasks of equal size")
        n = ns.pop()
        spe = math.ceil(n / B)
        step = 0
        for epoch in range(cfg.epochs):
            draws = [torch.stack(c).to(device) for c in zip(*[s.take(n) for s in streams])]
            for j in range(spe):
                a, b = j * B, min((j + 1) * B, n)
                yield (epoch, step, *[d[:, a:b] for d in draws], *([None] * (3 - len(draws))))
                step += 1
        return
    spe = math.ceil(min(ns) / B)
    step = 0
    while step < cfg.steps:
        S = min(block, cfg.steps - step)
        draws = [torch.stack(c).to(device) for c in zip(*[s.take(S * B) for s in streams])]
        for j in range(S):
            yield (step // spe, step, *[d[:, j * B:(j + 1) * B] for d in draws], *([None] * (3 - len(draws))))
            step += 1


def _forward(net: nn.Module, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    return net(x) if lengths is None else net(x, lengths)


@torch.no_grad()
def _accuracy_batched(net: nn.Module, x: torch.Tensor, y: torch.Tensor, lengths: torch.Tensor | None,
                      n: Sequence[int], task_index: torch.Tensor, fold: str, budget: int,
                      precision: str = "fp32") -> list[float]:
    """Per-network accuracy of the stacked ``net`` (eval mode) on its own task's split."""
    K = len(task_index)
    dev = x.device
    n_k = torch.as_tensor([n[int(u)] for u in task_index], device=dev)
    n_max = int(n_k.max())
    chunk = max(1, min(n_max, budget // max(1, K * int(x[0, 0].numel()))))
    correct = torch.zeros(K, dtype=torch.long, device=dev)
    for a in range(0, n_max, chunk):
        pos = torch.arange(a, min(a + chunk, n_max), device=dev)
        pk = pos[None, :].expand(K, -1)
        xb = gather(x, task_index, pk)  # (K, nb, ...)
        yb = gather(y, task_index, pk).t()  # (nb, K)
        lb = None if lengths is None else gather(lengths, task_index, pk).t()
        xb = xb if fold == "network" else fold_input(xb.transpose(0, 1), fold)
        logits = _forward(net, _layout(xb, precision), lb)
        pred = logits.view(len(pos), K, -1).argmax(-1)
        correct += ((pred == yb) & (pos[:, None] < n_k[None, :])).sum(0)
    return (correct.double() / n_k.double()).tolist()


@dataclass
class BatchResult:
    """Stacked final ``state_dict`` (on CPU) and final train/test accuracy per network;
    ``diverged``: positions of the networks whose training diverged (see :func:`nonfinite_networks`)."""

    state: dict[str, torch.Tensor]
    train_acc: list[float]
    test_acc: list[float]
    seconds: float
    steps: int = 0
    diverged: list[int] = field(default_factory=list)


def nonfinite_networks(state: dict[str, torch.Tensor]) -> list[int]:
    """Positions k of the networks in a stacked ``state_dict`` (leading dim = networks) with a NaN
    or infinite weight or buffer: their training diverged (a non-finite loss gives non-finite
    gradients, and SGD/Adam carry them into the weights). Checked once, after training."""
    bad = None
    for t in state.values():
        if t.is_floating_point():
            here = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
            bad = here if bad is None else bad | here
    return [] if bad is None else bad.nonzero().flatten().tolist()


def train_batched(
    models: Sequence[nn.Module] | tuple[nn.Module, dict[str, torch.Tensor]],
    data: NetworkData,
    task_index: Sequence[int],
    data_seeds: Sequence[int],
    cfg: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, int], None] | None = None,
    evaluate: bool = True,
    max_steps: int | None = None,
    compile: bool = False,
) -> BatchResult:
    """Train K models (already initialized) as one computation; return their stacked weights.

    ``task_index[k]`` selects network k's task in ``data``; ``data_seeds[k]`` seeds its minibatch
    order and augmentation. ``models`` is a list of K models or ``(template, stacked_state)``
    (see :func:`init_stacked`). ``on_step(step, total)`` is called after every optimizer step.
    ``max_steps`` stops early (benchmarks). ``cfg.precision`` sets the arithmetic (see
    :data:`PRECISIONS`). ``compile``: train through ``torch.compile`` of the stacked model (fuses
    BatchNorm, activations and pooling; compiling is paid once per batch shape, and float rounding
    may differ from eager in the last bits).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    with precision_scope(cfg.precision, device):
        if isinstance(models, tuple):
            net = stack_state(*models).to(device)
        else:
            net = stack_models(models).to(device)
        K = net._ffl_K
        fold = net._ffl_fold
        net.train()
        opt = _make_optimizer(list(net.parameters()), cfg, fused=True)
        fwd = torch.compile(net) if compile else net
        if device.type == "cuda":
            # constant shapes per chunk: let cuDNN pick the fastest (grouped) convolution algorithms
            torch.backends.cudnn.benchmark = True
        tidx = torch.as_tensor(list(task_index), dtype=torch.long, device=device)
        streams = [_Stream(s, data.n_train[int(u)], cfg.augment, cfg.crop_padding, _sampling_labels(cfg, data, int(u)))
                   for s, u in zip(data_seeds, task_index)]
        total = total_steps(cfg, streams[0].n)
        if max_steps is not None:
            total = min(total, max_steps)
        done = 0
        for epoch, step, idx, offs, flips in _batches(streams, cfg, device):
            if step >= total:
                break
            lr = lr_at(cfg, epoch, step)
            for g in opt.param_groups:
                g["lr"] = lr
            Bs = idx.shape[1]
            if fold == "network":
                xb = gather(data.x_train, tidx, idx)  # (K, Bs, ...)
                if cfg.augment:
                    xb = augment_batch(xb, offs, flips, cfg.crop_padding)
            else:
                idx_t = idx.t().contiguous()
                xb = gather(data.x_train, tidx[None, :].expand(Bs, K).reshape(-1), idx_t.reshape(-1, 1)).view(Bs, K, *data.x_train.shape[2:])
                if cfg.augment:
                    xb = augment_batch(xb, offs.transpose(0, 1), flips.t(), cfg.crop_padding)
                xb = fold_input(xb, fold)
            yb = gather(data.y_train, tidx, idx).t()  # (Bs, K)
            lb = None if data.lengths_train is None else gather(data.lengths_train, tidx, idx).t()
            with _autocast(cfg.precision, device):
                logits = _forward(fwd, _layout(xb, cfg.precision), lb)
            loss = F.cross_entropy(logits.float().reshape(Bs * K, -1), yb.reshape(-1), reduction="sum") / Bs
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done = step + 1
            if on_step is not None:
                on_step(done, total)
        net.eval()
        if evaluate:
            budget = 2**25 if device.type == "cuda" else 2**22
            splits = ((data.x_train, data.y_train, data.lengths_train, data.n_train),
                      (data.x_test, data.y_test, data.lengths_test, data.n_test))
            with _autocast(cfg.precision, device):
                train_acc, test_acc = [_accuracy_batched(net, *split, tidx, fold, budget, cfg.precision)
                                       for split in splits]
        else:
            train_acc = test_acc = [float("nan")] * K
        state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
        return BatchResult(state, train_acc, test_acc, time.perf_counter() - t0, done, nonfinite_networks(state))


def train_loop(
    models: Sequence[nn.Module],
    data: NetworkData,
    task_index: Sequence[int],
    data_seeds: Sequence[int],
    cfg: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    evaluate: bool = True,
    max_steps: int | None = None,
) -> BatchResult:
    """Reference: a plain PyTorch loop training each model alone (``torch.optim``, the same
    learning rates, the same per-network data order and augmentation draws as
    :func:`train_batched`)."""
    t0 = time.perf_counter()
    device = torch.device(device)
    with precision_scope(cfg.precision, device):
        states, tr, te = [], [], []
        done = 0
        for k, model in enumerate(models):
            model = model.to(device).train()
            opt = _make_optimizer(model.parameters(), cfg)
            u = int(task_index[k])
            d = data.subset(u)
            X, Y, Lt = d.x_train[0], d.y_train[0], None if d.lengths_train is None else d.lengths_train[0]
            stream = _Stream(data_seeds[k], d.n_train[0], cfg.augment, cfg.crop_padding, _sampling_labels(cfg, d, 0))
            total = total_steps(cfg, stream.n)
            if max_steps is not None:
                total = min(total, max_steps)
            for epoch, step, idx, offs, flips in _batches([stream], cfg, device):
                if step >= total:
                    break
                for g in opt.param_groups:
                    g["lr"] = lr_at(cfg, epoch, step)
                i = idx[0]
                xb, yb = X[i], Y[i]
                if cfg.augment:
                    xb = augment_batch(xb, offs[0], flips[0], cfg.crop_padding)
                with _autocast(cfg.precision, device):
                    xb = _layout(xb, cfg.precision)
                    out = model(xb) if Lt is None else model(xb, Lt[i])
                loss = F.cross_entropy(out.float(), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done = step + 1
            model.eval()
            if evaluate:
                with torch.no_grad():
                    def acc(x, y, lens):
                        with _autocast(cfg.precision, device):
                            x = _layout(x, cfg.precision)
                            out = model(x) if lens is None else model(x, lens)
                        return (out.argmax(-1) == y).double().mean().item()
                    tr.append(acc(X, Y, Lt))
                    te.append(acc(d.x_test[0], d.y_test[0], None if d.lengths_test is None else d.lengths_test[0]))
            else:
                tr.append(float("nan"))
                te.append(float("nan"))
            states.append({k2: v.detach().cpu() for k2, v in model.state_dict().items()})
        stacked = {name: torch.stack([s[name] for s in states]) for name in states[0]}
        return BatchResult(stacked, tr, te, time.perf_counter() - t0, done, nonfinite_networks(stacked))


def probe_capacity(arch: str, model_kwargs: dict, cfg: TrainConfig, device: torch.device | str,
                   k0: int = 4) -> int:
    """How many networks of ``arch`` fit in ~70% of the free memory of CUDA ``device`` while
    training with ``cfg``: measured by 2 engine steps of ``k0`` networks (parameters, optimizer
    state, activations) on random data of the architecture's input shape."""
    dev = torch.device(device)
    shape = input_shape(arch)
    kw = dict(model_kwargs)
    if arch == "mlp":
        kw.setdefault("in_features", int(math.prod(shape)))
    n = 2 * cfg.batch_size
    task = SimpleNamespace(x_train=torch.randn(n, *shape), y_train=torch.zeros(n, dtype=torch.long),
                           x_test=torch.randn(8, *shape), y_test=torch.zeros(8, dtype=torch.long))
    data = NetworkData.from_tasks([task], dev)
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    models = [build_model(arch, 2, **kw) for _ in range(k0)]
    train_batched(models, data, [0] * k0, list(range(k0)), cfg, device=dev, evaluate=False, max_steps=2)
    torch.cuda.synchronize(dev)
    per_net = max(1, (torch.cuda.max_memory_allocated(dev) - base) / k0)
    del models, data
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(dev)
    return int(0.7 * free // per_net)
