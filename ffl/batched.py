"""Batched building blocks: K same-architecture networks as one ``nn.Module`` (used by
:mod:`ffl.engine` to train a zoo's networks together, §4).

:func:`stack_models` takes K ordinary models built by :func:`ffl.models.build_model` and replaces
each leaf layer by a batched twin holding the K networks' parameters stacked along a leading
dimension (``(K, out, in)`` for a linear layer). Activations use the *folded* layout: the K
networks sit side by side in the channel/feature dimension, ``(B, K*C, H, W)`` for images and
``(B, K*F)`` for vectors, so that

* a convolution is one grouped convolution (``groups=K``; in channels-last layout on CPU, see below),
* a BatchNorm over the K*C channels is exactly per-network BatchNorm (own statistics, own running
  averages),
* element-wise activations, pooling, ``flatten(1)`` and residual additions act per network,
* a linear layer is one ``torch.baddbmm`` over the K networks,
* a GRU is a hand-written batched GRU (``torch.vmap`` has no batching rule for ``aten::gru``).

The model's own ``forward`` is kept, except for the architectures of :mod:`ffl.models` that have
a batched forward of their own (:data:`BATCHED_FORWARDS`, keyed by class): MLP runs network-major,
activations ``(K, B, features)`` with one ``baddbmm`` per layer and a hand-written backward that
writes dW in W's layout; GRUNet reads each network's last valid step; ConvNet's is its own
forward, with BatchNorm, activation and max-pool fused on request (:func:`bn_backend`). ResNet
keeps its own forward (convolutions, BatchNorm, the shortcut addition and global pooling all act
per network in the folded layout).

Kernels were chosen by measurement (``python -m ffl.bench zoo`` and ``conv``; the figures are in
docs/performance.md): on CPU, large linear layers run one GEMM per network instead of one ``bmm``,
and convolutions run as oneDNN's grouped convolution in channels-last (NHWC) layout (one per network
under bf16 autocast, :class:`BatchedConv2d`); on CUDA convolutions are
grouped (cuDNN, autotuned). ``torch.func.vmap`` measured slower than either and is not used.
"""
from __future__ import annotations

import contextlib
import copy
import types
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ffl import fused_bn, implicit_conv, triton_support
from ffl.models import MLP, ConvNet, GRUNet

__all__ = [
    "UnsupportedModel",
    "BatchedLinear",
    "BatchedConv2d",
    "conv_backend",
    "bn_backend",
    "BatchedBatchNorm",
    "BatchedGRU",
    "BATCHED_FORWARDS",
    "batched_linear",
    "stack_models",
    "stack_state",
    "unstack_state",
    "fold_input",
]


class UnsupportedModel(TypeError):
    """A model contains a layer the batched engine has no batched twin for."""



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
    """K conv layers as one grouped convolution on (B, K*C, H, W); on CPU in channels-last (NHWC)
    layout, where oneDNN's grouped convolution is fastest. ``per_network_on_cpu = True`` runs one
    convolution per network instead (the earlier CPU path; also under bf16 autocast, whose
    rounding the equivalence tests pin to it).

    ``backend`` (class-wide, or per layer): ``torch`` runs the convolution above; ``triton`` runs
    :mod:`ffl.implicit_conv`'s batched implicit-GEMM kernels on CUDA (stride-1 layers; others keep
    the grouped convolution); ``interpret`` runs those kernels in Triton's interpreter on CPU (tests).
    """

    per_network_on_cpu: bool = False
    backend: str = "torch"

    def __init__(self, mods: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        m = mods[0]
        if m.padding_mode != "zeros":
            raise UnsupportedModel(f"padding_mode {m.padding_mode!r} not supported")
        self.K = len(mods)
        self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, m.groups
        self.out_channels = m.out_channels
        self._implicit_ok = implicit_conv.supported(m.stride, m.dilation, m.groups) and not isinstance(m.padding, str)
        self.weight = nn.Parameter(_stack([c.weight for c in mods]))
        b = _stack([c.bias for c in mods])
        self.bias = nn.Parameter(b) if b is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._implicit_ok and triton_support.runs_on(self.backend, x):
            return implicit_conv.batched_conv2d(x, self.weight, self.bias, padding=self.padding, backend=self.backend)
        if x.device.type == "cpu" and self.K > 1 and not (self.per_network_on_cpu or torch.is_autocast_enabled("cpu")):
            # oneDNN's grouped convolution in NHWC: several times faster on CPU than in NCHW or one
            # convolution per network, for PlainNet's few channels per group (python -m ffl.bench conv --device cpu)
            x = x.contiguous(memory_format=torch.channels_last)
        elif x.device.type == "cpu" and self.K > 1:
            # oneDNN's grouped convolution measured slower on CPU than one convolution per
            # network (python -m ffl.bench zoo): same math, one call per network
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


@contextlib.contextmanager
def _class_setting(cls: type, what: str, backend: str):
    if backend not in triton_support.BACKENDS:
        raise ValueError(f"unknown {what} backend {backend!r}; choose one of {', '.join(triton_support.BACKENDS)}")
    before = cls.backend
    cls.backend = backend
    try:
        yield
    finally:
        cls.backend = before


def conv_backend(backend: str):
    """Run every :class:`BatchedConv2d` with ``backend`` inside the block (see its docstring)."""
    return _class_setting(BatchedConv2d, "convolution", backend)


def bn_backend(backend: str):
    """Run every :class:`BatchedBatchNorm` of a stacked ConvNet with ``backend`` inside the block:
    ``torch``, or BatchNorm + activation + max-pool fused (:mod:`ffl.fused_bn`) with ``triton``
    (CUDA) or ``interpret`` (CPU, tests)."""
    return _class_setting(BatchedBatchNorm, "BatchNorm", backend)


def kernel_settings(conv: str | None = None, bn: str | None = None, tiles=None) -> contextlib.ExitStack:
    """:func:`conv_backend`, :func:`bn_backend` and :func:`ffl.implicit_conv.measured_tiles` (a
    tile table) for one ``with`` block; each left as it is where None."""
    stack = contextlib.ExitStack()
    for setting, value in ((conv_backend, conv), (bn_backend, bn), (implicit_conv.measured_tiles, tiles)):
        if value is not None:
            stack.enter_context(setting(value))
    return stack


class BatchedBatchNorm(nn.Module):
    """K BatchNorm layers (1d or 2d): a BatchNorm over K*C channels is per-network BatchNorm.
    ``backend`` (class-wide; :func:`bn_backend`): in a stacked ConvNet, ``triton``/``interpret``
    fuse it with the activation and max-pool that follow (:mod:`ffl.fused_bn`)."""

    backend: str = "torch"

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
    special = BATCHED_FORWARDS.get(type(template))
    if special is not None:
        template._ffl_fold = special[1]
        template.forward = types.MethodType(special[0], template)
    return template


_CPU_PER_MATRIX = 1 << 17


def _per_matrix(w: torch.Tensor) -> bool:
    """On CPU, ``torch.bmm`` measured slower than one MKL GEMM per network for large layers (MLP-4
    shapes, forward and weight gradient); small layers are faster as one bmm."""
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
        elif self.output_relu:
            h = F.relu(h)
    return h.transpose(0, 1).reshape(B, -1)


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


def _convnet_forward(self, x: torch.Tensor) -> torch.Tensor:
    """ConvNet's forward on the folded layout; where :class:`BatchedBatchNorm`'s backend fuses and
    the unit allows it (training, ReLU or leaky ReLU, even sizes under a pool), BatchNorm, the
    activation and the max-pool run as one :func:`ffl.fused_bn.bn_act_pool`."""
    h = x
    for l, (conv, bn) in enumerate(zip(self.convs, self.bns)):
        h, pool = conv(h), l < self.pools
        if triton_support.runs_on(bn.backend, h) and fused_bn.supported(h, self.act, pool, bn.training):
            h = fused_bn.bn_act_pool(h, bn, self.act, pool, backend=bn.backend)
        else:
            h = fused_bn.reference(h, bn, self.act, pool)
    return self.fc(h.mean(dim=(2, 3)))


#: model class → (batched forward, input folding: see :func:`fold_input`); other models keep their
#: own forward in the ``"channel"`` folding
BATCHED_FORWARDS: dict[type[nn.Module], tuple[Callable, str]] = {
    MLP: (_mlp_forward, "network"), GRUNet: (_grunet_forward, "last"), ConvNet: (_convnet_forward, "channel")}


def stack_state(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Like :func:`stack_models`, from one template model and an already stacked ``state_dict``
    (leading dim K; e.g. from :func:`ffl.engine.init_stacked`); the tensors are used, not copied."""
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

