"""Batched training of K networks at once (the zoo engine behind :func:`ffl.zoo.train_zoo`).

The paper trains 5,000 networks per experiment (§4). One small network cannot keep a CPU core or
a GPU busy, so instead of a Python loop over models this module trains K networks as *one*
computation while keeping every network's science exactly as if it were trained alone:

* **Same models.** ``stack_models`` takes K ordinary models built by
  :func:`ffl.models.build_model` and replaces each leaf layer by a batched twin holding the K
  networks' parameters stacked along a leading dimension (``(K, out, in)`` for a linear layer).
  The model's own ``forward`` is kept. Activations use the *folded* layout: the K networks sit
  side by side in the channel/feature dimension, ``(B, K*C, H, W)`` for images and ``(B, K*F)``
  for vectors, so that

  - a convolution is one grouped convolution (``groups=K``; per network on CPU, see below),
  - a BatchNorm over the K*C channels is exactly per-network BatchNorm (own statistics, own
    running averages),
  - element-wise activations, pooling, ``flatten(1)`` and residual additions act per network,
  - a linear layer is one ``torch.baddbmm`` over the K networks,
  - a GRU is a hand-written batched GRU (``torch.vmap`` has no batching rule for ``aten::gru``).

* **Same loss and optimizer.** The loss is the *sum* over networks of each network's mean
  cross-entropy, so the gradient of network k is its solo gradient. SGD (momentum, weight decay)
  and Adam are element-wise, so one optimizer over the stacked tensors is K independent ones.

* **Same data order.** Network k draws its minibatch order (and crop/flip augmentation) from its
  own generator, seeded from its own data seed; :func:`train_loop` (the plain-PyTorch reference
  used by the equivalence test and the benchmark) draws from the same streams.

Kernels, chosen by measurement (``python -m ffl.bench zoo``):

* MLP: network-major fast path, activations (K, B, features) and one ``baddbmm`` per layer with a
  hand-written backward that writes dW in W's layout. On CPU, layers with ≥ 2¹⁷ weights use one
  MKL GEMM per network instead (CPU ``bmm`` measured 20-35% slower on MLP-4 shapes).
* CNNs: grouped convolution on CUDA (cuDNN, autotuned; cuDNN runs it group by group, 3-5× below
  an ordinary convolution of the same FLOPs on an H100, and an im2col + ``bmm`` version measured
  slower still: ``python -m ffl.bench conv``); on CPU one convolution per network (oneDNN's
  grouped convolution measured 1.3-1.7× slower); ``torch.func.vmap`` measured 2.4-2.6× slower
  than either on CPU, so it is not used.
* Precision: ``TrainConfig.precision`` (:data:`PRECISIONS`); weights, gradients and optimizer
  state stay FP32 in every precision.
* Batches are gathered with one ``torch.gather`` of rows from task tensors preloaded on the device.
* Optimizers are PyTorch's fused SGD/Adam (one pass over memory).

Determinism: on CPU the same seeds give the same bytes. On CUDA kernels may differ at float
rounding level between runs unless deterministic algorithms are enabled. Results of MLPs do not
depend on which networks share an engine batch; for CNNs they can at rounding level, which is why
:mod:`ffl.zoo` fixes the chunking of a zoo and stores it.
"""
from __future__ import annotations

import contextlib
import copy
import math
import multiprocessing as mp
import os
import types
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TrainConfig",
    "NetworkData",
    "stack_models",
    "unstack_state",
    "train_batched",
    "train_loop",
    "epoch_plan",
    "augment_batch",
    "lr_at",
    "UnsupportedModel",
    "PRECISIONS",
]


PRECISIONS = ("fp32", "tf32", "bf16")
"""Arithmetic of training (weights, gradients and optimizer state are FP32 in all three):

* ``fp32``: FP32 everywhere, also cuDNN convolutions (PyTorch's default lets them use TF32).
* ``tf32``: TF32 tensor-core matmuls and convolutions (CUDA only; ~10-bit mantissa products).
* ``bf16``: bfloat16 autocast of the forward pass (and its backward), NHWC image activations on
  CUDA; the loss and the optimizer stay FP32.
"""


class UnsupportedModel(TypeError):
    """A model contains a layer the batched engine has no batched twin for."""


# --------------------------------------------------------------------------------------------
# Configuration and data
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Training hyper-parameters of one network (the paper's §4 settings live in ZooSpec.paper).

    ``steps``: if set, training is step-based (``epochs`` ignored; ``lr_step_steps`` are the lr
    milestones in steps); each network walks through its own reshuffled epochs as needed.
    """

    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    epochs: int = 50
    lr_step_epochs: list[int] = field(default_factory=lambda: [30])
    lr_gamma: float = 0.1
    augment: bool = False
    steps: int | None = None
    lr_step_steps: list[int] = field(default_factory=list)
    crop_padding: int = 4
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose 'sgd' or 'adam'")
        check_precision(self.precision)


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


# --------------------------------------------------------------------------------------------
# Batched layers (folded layout: networks side by side in dim 1 / the feature dim)
# --------------------------------------------------------------------------------------------


def _stack(tensors: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    if tensors[0] is None:
        return None
    return torch.stack([t.detach() for t in tensors]).contiguous()


class BatchedLinear(nn.Module):
    """K linear layers; input (..., K*in) → output (..., K*out); one ``baddbmm``."""

    def __init__(self, mods: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.K = len(mods)
        self.in_features, self.out_features = mods[0].in_features, mods[0].out_features
        self.weight = nn.Parameter(_stack([m.weight for m in mods]))
        b = _stack([m.bias for m in mods])
        self.bias = nn.Parameter(b) if b is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        K, fin = self.K, self.in_features
        if x.shape[-1] != K * fin:
            raise UnsupportedModel(
                f"batched linear expects last dim K*in = {K}*{fin}, got {tuple(x.shape)}; the model's "
                "forward must keep the batch in dim 0 and features last (use flatten(1))")
        x3 = x.reshape(-1, K, fin).transpose(0, 1)  # (K, N, in), strided view
        y = batched_linear(x3, self.weight, self.bias)
        return y.transpose(0, 1).reshape(*lead, K * self.out_features)


class BatchedConv2d(nn.Module):
    """K conv layers as one grouped convolution on (B, K*C, H, W) (on CPU: one convolution per
    network, which measures faster there; set ``per_network_on_cpu = False`` to compare)."""

    per_network_on_cpu: bool = True

    def __init__(self, mods: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        m = mods[0]
        if m.padding_mode != "zeros":
            raise UnsupportedModel(f"padding_mode {m.padding_mode!r} not supported")
        self.K = len(mods)
        self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, m.groups
        self.out_channels = m.out_channels
        self.weight = nn.Parameter(_stack([c.weight for c in mods]))
        b = _stack([c.bias for c in mods])
        self.bias = nn.Parameter(b) if b is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.K > 1 and self.per_network_on_cpu:
            # oneDNN's grouped convolution is slower on CPU than one convolution per network
            # (measured 1.3-1.7x on PlainNet-5 shapes, K = 8): same math, one call per network
            B, _, H, W = x.shape
            # unbind, not x[:, k]: the backward of K separate indexings would build K zero-filled
            # full-size gradients and add them up; unbind's backward is one stack
            xs = x.view(B, self.K, -1, H, W).unbind(1)
            bs = self.bias.unbind(0) if self.bias is not None else [None] * self.K
            outs = [F.conv2d(xk, wk, bk, self.stride, self.padding, self.dilation, self.groups)
                    for xk, wk, bk in zip(xs, self.weight.unbind(0), bs)]
            y = torch.stack(outs, 1)
            return y.view(B, -1, *y.shape[3:])
        w = self.weight.reshape(self.K * self.out_channels, *self.weight.shape[2:])
        b = self.bias.reshape(-1) if self.bias is not None else None
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups * self.K)


class BatchedBatchNorm(nn.Module):
    """K BatchNorm layers (1d or 2d): a BatchNorm over K*C channels is per-network BatchNorm."""

    def __init__(self, mods: Sequence[nn.modules.batchnorm._BatchNorm]) -> None:
        super().__init__()
        m = mods[0]
        if m.momentum is None:
            raise UnsupportedModel("BatchNorm with momentum=None (cumulative average) not supported")
        self.K, self.eps, self.momentum = len(mods), m.eps, m.momentum
        self.affine, self.track = m.affine, m.track_running_stats
        if self.affine:
            self.weight = nn.Parameter(_stack([b.weight for b in mods]))
            self.bias = nn.Parameter(_stack([b.bias for b in mods]))
        else:
            self.weight = self.bias = None
        if self.track:
            self.register_buffer("running_mean", _stack([b.running_mean for b in mods]))
            self.register_buffer("running_var", _stack([b.running_var for b in mods]))
            self.register_buffer("num_batches_tracked", _stack([b.num_batches_tracked for b in mods]))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training or not self.track
        if self.training and self.track:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(
            x,
            self.running_mean.view(-1) if self.track else None,
            self.running_var.view(-1) if self.track else None,
            self.weight.reshape(-1) if self.affine else None,
            self.bias.reshape(-1) if self.affine else None,
            use_batch, self.momentum, self.eps,
        )


class BatchedGRU(nn.Module):
    """K multi-layer GRUs (PyTorch's gate equations), hand-written with ``bmm``.

    Input (T, B, K*F) (or (B, T, K*F) when ``batch_first``); optional ``h0`` (L, B, K*H).
    Returns (output (..., K*H), h_n (L, B, K*H)) like ``nn.GRU``. Unidirectional only.
    """

    def __init__(self, mods: Sequence[nn.GRU]) -> None:
        super().__init__()
        m = mods[0]
        if m.bidirectional or getattr(m, "proj_size", 0):
            raise UnsupportedModel("bidirectional/projected GRU not supported")
        if m.dropout:
            raise UnsupportedModel("GRU dropout not supported (random streams would differ)")
        self.K, self.L, self.H = len(mods), m.num_layers, m.hidden_size
        self.batch_first, self.has_bias = m.batch_first, m.bias
        for name, _ in m.named_parameters():
            setattr(self, name, nn.Parameter(_stack([getattr(g, name) for g in mods])))

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None = None):
        if self.batch_first:
            x = x.transpose(0, 1)
        T, B, _ = x.shape
        K, H = self.K, self.H
        inp = x.reshape(T, B, K, -1).permute(2, 0, 1, 3).reshape(K, T * B, -1)  # (K, T*B, F)
        hs = []
        for layer in range(self.L):
            w_ih = getattr(self, f"weight_ih_l{layer}")  # (K, 3H, F)
            w_hh = getattr(self, f"weight_hh_l{layer}")  # (K, 3H, H)
            if self.has_bias:
                gi = torch.baddbmm(getattr(self, f"bias_ih_l{layer}").unsqueeze(1), inp, w_ih.transpose(1, 2))
                b_hh = getattr(self, f"bias_hh_l{layer}").unsqueeze(1)
            else:
                gi = torch.bmm(inp, w_ih.transpose(1, 2))
                b_hh = None
            gi = gi.view(K, T, B, 3 * H).unbind(1)  # one stack in backward, not T zero-filled copies
            if h0 is None:
                h = x.new_zeros(K, B, H)
            else:
                h = h0[layer].reshape(B, K, H).transpose(0, 1)
            outs = []
            whh_t = w_hh.transpose(1, 2)
            for t in range(T):
                gh = torch.baddbmm(b_hh, h, whh_t) if b_hh is not None else torch.bmm(h, whh_t)
                i_r, i_z, i_n = gi[t].chunk(3, dim=-1)
                h_r, h_z, h_n = gh.chunk(3, dim=-1)
                r = torch.sigmoid(i_r + h_r)
                z = torch.sigmoid(i_z + h_z)
                n = torch.tanh(i_n + r * h_n)
                h = (1 - z) * n + z * h
                outs.append(h)
            hs.append(h)
            inp = torch.stack(outs, 1).reshape(K, T * B, H)  # (K, T*B, H)
        out = inp.view(K, T, B, H).permute(1, 2, 0, 3).reshape(T, B, K * H)
        if self.batch_first:
            out = out.transpose(0, 1)
        h_n = torch.stack(hs).permute(0, 2, 1, 3).reshape(self.L, B, K * H)
        return out, h_n


_STATELESS = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Flatten,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Softplus, nn.SiLU,
)


def _batched_twin(mods: Sequence[nn.Module]) -> nn.Module | None:
    m = mods[0]
    if isinstance(m, nn.Linear):
        return BatchedLinear(mods)
    if isinstance(m, nn.Conv2d):
        return BatchedConv2d(mods)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return BatchedBatchNorm(mods)
    if isinstance(m, nn.GRU):
        return BatchedGRU(mods)
    if isinstance(m, nn.Dropout):
        if m.p == 0:
            return copy.deepcopy(m)
        raise UnsupportedModel("Dropout with p > 0 not supported (random streams would differ)")
    if isinstance(m, nn.Flatten) and m.start_dim != 1:
        raise UnsupportedModel("Flatten must start at dim 1")
    if isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d | nn.MaxPool2d | nn.AvgPool2d):
        return copy.deepcopy(m)
    if isinstance(m, _STATELESS):
        return copy.deepcopy(m)
    return None


def stack_models(models: Sequence[nn.Module]) -> nn.Module:
    """One module computing K same-architecture models at once (folded layout, see module doc).

    The result's ``state_dict`` has the models' own keys with a leading K dimension. Raises
    :class:`UnsupportedModel` for a layer with no batched twin.
    """
    models = list(models)
    template = copy.deepcopy(models[0])

    def convert(parent_name: str, parent: nn.Module, peers: list[nn.Module]) -> None:
        for name, child in list(parent.named_children()):
            peer_children = [p._modules[name] for p in peers]
            twin = _batched_twin(peer_children)
            if twin is not None:
                parent._modules[name] = twin
                continue
            own = list(child.named_parameters(recurse=False)) + list(child.named_buffers(recurse=False))
            if own:
                raise UnsupportedModel(
                    f"layer {parent_name + name!r} ({type(child).__name__}) has no batched twin")
            if not list(child.children()) and not isinstance(child, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
                # a parameter-free leaf we do not know: safe only if it acts element-wise
                raise UnsupportedModel(f"layer {parent_name + name!r} ({type(child).__name__}) unknown to the engine")
            convert(parent_name + name + ".", child, peer_children)

    own = list(template.named_parameters(recurse=False)) + list(template.named_buffers(recurse=False))
    if own:
        raise UnsupportedModel(f"{type(template).__name__} holds parameters directly; no batched twin")
    convert("", template, models)
    template._ffl_K = len(models)
    template._ffl_fold = "channel"
    special = _SPECIAL_FORWARDS.get(type(template).__name__)
    if special is not None:
        template._ffl_fold = special[1]
        template.forward = types.MethodType(special[0], template)
    return template


_CPU_PER_MATRIX = 1 << 17


def _per_matrix(w: torch.Tensor) -> bool:
    """On CPU, ``torch.bmm`` is slower than one MKL GEMM per network for large layers (measured on
    MLP-4 shapes: 27 vs 35 GFLOP/s for the weight gradient on 1 thread, 56 vs 85 on 2; 38 vs 46 for
    the forward); small layers are faster as one bmm."""
    return w.device.type == "cpu" and w.shape[1] * w.shape[2] >= _CPU_PER_MATRIX


class _BLinearFn(torch.autograd.Function):
    """y = x·Wᵀ + b for K networks, x (K, B, in), W (K, out, in), b (K, out). The backward writes
    dW = gᵀ·x directly in W's (K, out, in) layout (autograd through ``baddbmm(b, x, W.mT)`` would
    produce a transposed gradient that AccumulateGrad then copies)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        wt = w.transpose(1, 2)
        if _per_matrix(w):
            y = x.new_empty(x.shape[0], x.shape[1], w.shape[1])
            for k in range(w.shape[0]):
                if b is not None:
                    torch.addmm(b[k], x[k], wt[k], out=y[k])
                else:
                    torch.mm(x[k], wt[k], out=y[k])
            return y
        return torch.baddbmm(b.unsqueeze(1), x, wt) if b is not None else torch.bmm(x, wt)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        per = _per_matrix(w)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            if per:
                gx = g.new_empty(x.shape)
                for k in range(w.shape[0]):
                    torch.mm(g[k], w[k], out=gx[k])
            else:
                gx = torch.bmm(g, w)
        if ctx.needs_input_grad[1]:
            gt = g.transpose(1, 2)
            if per:
                gw = torch.empty_like(w)
                for k in range(w.shape[0]):
                    torch.mm(gt[k], x[k], out=gw[k])
            else:
                gw = torch.bmm(gt, x)
        gb = g.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def batched_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """K linear layers at once: x (K, B, in) → (K, B, out)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):  # a custom Function is not autocast-aware: cast here
        dt = torch.get_autocast_dtype(dev)
        x, w = x.to(dt), w.to(dt)
        b = b.to(dt) if b is not None else None
    return _BLinearFn.apply(x, w, b)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """:class:`ffl.models.MLP.forward` network-major: x (K, B, *shape) → logits (B, K*N); one
    ``baddbmm`` per layer on contiguous (K, B, features) activations, no layout copies."""
    K, B = x.shape[:2]
    h = x.reshape(K, B, -1)
    layers = list(self.layers)
    for i, layer in enumerate(layers):
        h = batched_linear(h, layer.weight, layer.bias)
        if i < len(layers) - 1:
            h = self.act(h)
    return h.transpose(0, 1).reshape(B, -1)


def _convnet_forward(self, x: torch.Tensor) -> torch.Tensor:
    """:class:`ffl.models.ConvNet.forward` in the folded layout; the residual skip zero-pads each
    network's channels separately (a plain ``F.pad`` on K*C channels would mix networks)."""
    K = self._ffl_K
    h = x
    for l, (conv, bn) in enumerate(zip(self.convs, self.bns)):
        y = bn(conv(h))
        if self.residual and l > 0:
            B, _, H, W = h.shape
            cin, cout = h.shape[1] // K, y.shape[1] // K
            y = y + F.pad(h.view(B, K, cin, H, W), (0, 0, 0, 0, 0, cout - cin)).view(B, K * cout, H, W)
        h = self.act(y)
        if l < self.pools:
            h = F.max_pool2d(h, 2)
    return self.fc(h.mean(dim=(2, 3)))


def _grunet_forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """:class:`ffl.models.GRUNet.forward` in the folded layout: x (B, T, K*F) one-hot,
    ``lengths`` (B, K); reads each network's last valid step."""
    K = self._ffl_K
    out, _ = self.gru(x)
    B, T = out.shape[:2]
    out = out.view(B, T, K, -1)
    if lengths is None:
        last = out[:, -1]
    else:
        bi = torch.arange(B, device=out.device)[:, None]
        ki = torch.arange(K, device=out.device)[None, :]
        last = out[bi, lengths.to(out.device) - 1, ki]
    return self.fc(last.reshape(B, -1))


#: model class name → (batched forward, input folding); other models keep their own forward
_SPECIAL_FORWARDS = {"MLP": (_mlp_forward, "network"), "ConvNet": (_convnet_forward, "channel"),
                     "GRUNet": (_grunet_forward, "last")}


def stack_state(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Like :func:`stack_models`, from one template model and an already stacked ``state_dict``
    (leading dim K; e.g. from :func:`init_stacked`); the tensors are used, not copied."""
    K = next(iter(state.values())).shape[0]
    net = stack_models([template])
    for mod in net.modules():
        if hasattr(mod, "K"):
            mod.K = K
    net._ffl_K = K
    own = dict(net.named_parameters())
    own_buf = dict(net.named_buffers())
    missing = set(own) | set(own_buf)
    for name, t in state.items():
        prefix, _, leaf = name.rpartition(".")
        mod = net.get_submodule(prefix) if prefix else net
        if name in own:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=own[name].requires_grad)
        elif name in own_buf:
            mod._buffers[leaf] = t
        else:
            raise KeyError(f"unexpected state key {name!r}")
        missing.discard(name)
    if missing:
        raise KeyError(f"stacked state lacks {sorted(missing)}")
    return net


def _init_worker(args) -> None:
    build, seeds, lo, hi, shared = args
    torch.set_num_threads(1)
    for k in range(lo, hi):
        torch.manual_seed(int(seeds[k]))
        for name, t in build().state_dict().items():
            shared[name][k].copy_(t)


def _shm_fits(nbytes: int) -> bool:
    """Whether shared memory (/dev/shm, small in some containers) can hold ``nbytes``."""
    try:
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize > 1.25 * nbytes
    except OSError:
        return False


def init_stacked(build: Callable[[], nn.Module], seeds: Sequence[int], *, workers: int | None = None) -> dict[str, torch.Tensor]:
    """Initial ``state_dict``s of K models, stacked: model k is ``build()`` right after
    ``torch.manual_seed(seeds[k])`` (exactly the bytes of a serial loop), built by ``workers``
    forked processes writing into shared memory (initializing 5,000 MLP-4s serially takes ~1 min)."""
    seeds = [int(s) for s in seeds]
    K = len(seeds)
    torch.manual_seed(seeds[0])
    first = build().state_dict()
    workers = workers if workers is not None else min(os.cpu_count() or 1, 16)
    per = sum(t.numel() for t in first.values()) * K
    need = sum(t.numel() * t.element_size() for t in first.values()) * K
    if workers <= 1 or K < 4 or per < 1 << 22 or "fork" not in mp.get_all_start_methods() or not _shm_fits(need):
        out = {n: torch.empty((K, *t.shape), dtype=t.dtype) for n, t in first.items()}
        _init_worker((build, seeds, 0, K, out))
        return out
    shared = {n: torch.empty((K, *t.shape), dtype=t.dtype).share_memory_() for n, t in first.items()}
    bounds = [(K * i // workers, K * (i + 1) // workers) for i in range(workers)]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_init_worker, args=((build, seeds, lo, hi, shared),)) for lo, hi in bounds if hi > lo]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"model initialization workers failed with exit codes {bad}")
    return shared


def unstack_state(state: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Network k's ``state_dict`` from a stacked one."""
    return {name: t[k] for name, t in state.items()}


def fold_input(x: torch.Tensor, fold: str = "channel") -> torch.Tensor:
    """(B, K, *shape) per-network inputs → the model's batched layout: images (B, K*C, H, W)
    (``"channel"``, the first per-example dim), sequences (B, T, K*F) (``"last"``), or
    network-major (K, B, *shape) (``"network"``, the MLP fast path)."""
    B, K = x.shape[:2]
    if fold == "network":
        return x.transpose(0, 1).contiguous()
    if x.dim() == 2:
        return x
    if fold == "last" and x.dim() > 3:
        return x.movedim(1, -2).reshape(*x.shape[:1], *x.shape[2:-1], K * x.shape[-1])
    return x.reshape(B, K * x.shape[2], *x.shape[3:])


def gather(x: torch.Tensor, task_index: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``x[task_index[k], idx[k, b]]`` of x (U, n, *shape) for idx (K, B), as (K, B, *shape)
    (one row gather: much faster than 2-D advanced indexing on CPU)."""
    U, n = x.shape[:2]
    flat = (task_index[:, None] * n + idx).reshape(-1)
    rows = x.reshape(U * n, -1)
    # torch.gather with an expanded index: 2-4x faster than index_select / x[flat] on CPU (measured)
    out = torch.gather(rows, 0, flat[:, None].expand(-1, rows.shape[1]))
    return out.view(*idx.shape, *x.shape[2:])


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Keep large CPU buffers in the heap instead of fresh ``mmap``s (glibc only, process-wide).

    The engine allocates ~100 MB tensors every step (stacked gradients, gathered batches); glibc
    serves allocations above 32 MB with ``mmap`` and returns them on free, so every step pays page
    faults (measured: ~20% of a paper-size MLP-4 step as system time on the 2-core CPU). Raising the
    mmap/trim thresholds lets freed buffers be reused. Freed memory then stays with the process
    (resident-set measurements see no new peaks), so only processes that exist to train call it:
    ``python -m ffl.bench`` and ``python -m ffl.zoo train``. Returns whether it was applied."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 31) == 1
    except (OSError, AttributeError):
        ok = False
    _MALLOC_TUNED = ok
    return ok


def _make_optimizer(params, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """``torch.optim.SGD``/``Adam``; ``fused`` (the batched engine) makes one pass over memory per
    step instead of several (same update rule; float rounding may differ in the last bit)."""
    kw = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kw)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)


class _Stream:
    """One network's sample stream: successive epochs (permutation + augmentation draws, see
    :func:`epoch_plan`) from its own generator, consumed in order."""

    def __init__(self, seed: int, n: int, augment: bool, pad: int) -> None:
        self.gen = torch.Generator().manual_seed(int(seed))
        self.n, self.augment, self.pad = n, augment, pad
        self.buf: list[tuple] = []
        self.pos = 0

    def take(self, m: int):
        parts, got = [], 0
        while got < m:
            if not self.buf or self.pos == len(self.buf[0]):
                self.buf = [x for x in epoch_plan(self.gen, self.n, self.augment, self.pad) if x is not None]
                self.pos = 0
            j = min(len(self.buf[0]), self.pos + m - got)
            parts.append([x[self.pos:j] for x in self.buf])
            got += j - self.pos
            self.pos = j
        return [torch.cat(c) for c in zip(*parts)]


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
    """Stacked final ``state_dict`` (on CPU) and final train/test accuracy per network."""

    state: dict[str, torch.Tensor]
    train_acc: list[float]
    test_acc: list[float]
    seconds: float
    steps: int = 0


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
    BatchNorm, activations and pooling; compiling costs about a minute per batch shape, and float
    rounding may differ from eager in the last bits).
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
        streams = [_Stream(s, data.n_train[int(u)], cfg.augment, cfg.crop_padding) for s, u in zip(data_seeds, task_index)]
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
        return BatchResult(state, train_acc, test_acc, time.perf_counter() - t0, done)


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
            stream = _Stream(data_seeds[k], d.n_train[0], cfg.augment, cfg.crop_padding)
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
        return BatchResult(stacked, tr, te, time.perf_counter() - t0, done)
