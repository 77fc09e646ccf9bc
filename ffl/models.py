"""Architectures of the paper's zoos (§4): MLP-4, PlainNet-5 (``"cnn"``), PlainNet-6, ResNet-5, GRU-2.

Every model exposes its layers in input-to-output order so that :mod:`ffl.chain` can read the
layer matrices and :mod:`ffl.permute` can permute their hidden neurons. Models are plain
``nn.Module``s built only from ``nn.Linear``, ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.GRU`` and
parameter-free activations; their ``state_dict`` keys (listed in each class docstring) are what
zoos store.

=============  ==============================================================================
``arch``       structure (``N`` = number of classes)
=============  ==============================================================================
``mlp``        MLP-4: 3072–500–500–500–N (:class:`MLP`)
``cnn``        PlainNet-5: 4 × [conv3×3–BN–act(–maxpool)], GAP, FC(256, N) (:class:`ConvNet`)
``plainnet6``  PlainNet-6: 5 × [conv3×3–BN–act–maxpool] (pools after units 1–4), GAP, FC(256, N)
``resnet5``    ResNet-5: stem conv3×3–BN–act, 3 one-conv blocks (stride 2, 1×1 projection skips),
               GAP, FC(256, N) (:class:`ResNet`)
``gru``        GRU-2: two stacked GRU layers (hidden 128) on one-hot characters, FC(128, N)
=============  ==============================================================================

``activation="leaky_relu"`` (slope 0.01) gives the leaky-ReLU variants of MLP and the CNNs.
PlainNet-6 and ResNet-5 are built as the authors' code builds them (``plain_net6_diff`` with
``cfg['I']``, ``resnet5`` = ``ResNet_Cifar3`` with one-conv blocks); the paper only names them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ffl.alphabet import ALL_LETTERS, N_LETTERS  # GRU-2 reads NameData's letters one-hot

ARCHS: tuple[str, ...] = ("mlp", "cnn", "plainnet6", "resnet5", "gru")
#: the architectures with convolutions, and those of them that are plain ConvNets (no shortcuts)
CONV_ARCHS: tuple[str, ...] = ("cnn", "plainnet6", "resnet5")
PLAIN_CONV_ARCHS: tuple[str, ...] = ("cnn", "plainnet6")
ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu")
LEAKY_SLOPE = 0.01

#: Sequence length :func:`input_shape` reports for ``"gru"`` (the model accepts any length).
GRU_SEQ_LEN: int = 16

PLAINNET5_WIDTHS: tuple[int, ...] = (32, 64, 128, 256)
PLAINNET6_WIDTHS: tuple[int, ...] = (32, 64, 128, 256, 256)
#: max-pools of PlainNet-6: after units 1–4 (the official ``cfg['I']``, 32→16→8→4→2)
PLAINNET6_POOLS: int = 4


def make_activation(name: str) -> nn.Module:
    """ReLU or leaky ReLU (the paper's activation factor, slope 0.01)."""
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(LEAKY_SLOPE)
    raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")


class MLP(nn.Module):
    """MLP-4 of the paper: 3072-500-500-500-N with ReLU (widths, depth, activation configurable).

    The input is flattened, so a 3x32x32 image becomes a 3072-vector. ``layers`` holds the
    ``nn.Linear`` modules in order; the last one is the classifier. ``output_relu=True`` puts a
    ReLU on the logits too, as the official ``MLPNet`` does (``F.relu(fc4(x))`` fed to the
    cross-entropy; the paper's "followed by one ReLU" reads the same way); the chain and the
    permutations do not see it.
    State dict: ``layers.{i}.weight`` (out, in), ``layers.{i}.bias``.
    """

    def __init__(
        self,
        in_features: int = 3072,
        hidden: Sequence[int] = (500, 500, 500),
        num_classes: int = 2,
        activation: str = "relu",
        output_relu: bool = False,
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = make_activation(activation)
        self.output_relu = bool(output_relu)

    @classmethod
    def from_layer_matrices(cls, matrices: Sequence[torch.Tensor], activation: str = "relu") -> "MLP":
        """An MLP without biases whose layer matrices (rows = inputs, columns = neurons) are
        ``matrices`` — the form the paper writes networks in (§2). The network takes the matrices'
        dtype (float64 matrices, a float64 network)."""
        widths = [matrices[0].shape[0]] + [m.shape[1] for m in matrices]
        for k, (a, b) in enumerate(zip(matrices[:-1], matrices[1:])):
            if a.shape[1] != b.shape[0]:
                raise ValueError(f"layer {k + 1} has {a.shape[1]} neurons but layer {k + 2} has {b.shape[0]} inputs")
        net = cls(widths[0], widths[1:-1], widths[-1], activation).to(matrices[0].dtype)
        with torch.no_grad():
            for layer, m in zip(net.layers, matrices):
                layer.weight.copy_(m.T)
                layer.bias.zero_()
        return net

    def hidden_activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The hidden vectors h_1 … h_{L-1} for input ``x``."""
        x, out = x.flatten(1), []
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
            out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        x = self.layers[-1](x)
        return F.relu(x) if self.output_relu else x


class ConvNet(nn.Module):
    """PlainNet-L of the paper (§4): conv units, global average pool, one FC layer.

    Unit ``l`` (``l = 1 … len(widths)``) is ``conv3×3(widths[l-1], padding 1, stride 1)`` →
    ``BatchNorm2d`` → activation, followed by a 2×2 max-pool for the first ``pools`` units
    (default: the first ``min(3, len(widths) - 1)``, so CIFAR's 32×32 becomes 16, 8, 4). After the
    last unit come a global average pool over space and ``FC(widths[-1], N)``.

    * PlainNet-5 (``arch="cnn"``): widths (32, 64, 128, 256) — conv(32)–BN–ReLU–pool,
      conv(64)–…–pool, conv(128)–…–pool, conv(256)–BN–ReLU, GAP, FC(256, N) (official ``cfg['G']``).
    * PlainNet-6 (``arch="plainnet6"``): widths (32, 64, 128, 256, 256) and ``pools=4`` — a pool
      after each of units 1–4, the fifth conv (256 → 256) on 2×2 maps (official ``cfg['I']``).

    Convolutions have no bias (BatchNorm's β takes its place; ``conv_bias=True`` adds one, as the
    official ``make_layers`` has: a bias before BatchNorm changes nothing the network computes
    but the running mean). State dict: ``convs.{i}.weight`` (out, in, 3, 3) [``convs.{i}.bias``],
    ``bns.{i}.weight``, ``bns.{i}.bias``, ``bns.{i}.running_mean``, ``bns.{i}.running_var``,
    ``bns.{i}.num_batches_tracked``, ``fc.weight`` (N, widths[-1]), ``fc.bias``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = PLAINNET5_WIDTHS,
        num_classes: int = 2,
        activation: str = "relu",
        *,
        pools: int | None = None,
        kernel_size: int = 3,
        conv_bias: bool = False,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths:
            raise ValueError("ConvNet needs at least one conv unit")
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd")
        self.widths = widths
        self.pools = min(3, len(widths) - 1) if pools is None else int(pools)
        chans = [in_channels, *widths]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, kernel_size, padding=kernel_size // 2, bias=conv_bias)
            for a, b in zip(chans[:-1], chans[1:])
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in widths)
        self.act = make_activation(activation)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for l, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            h = self.act(bn(conv(h)))
            if l < self.pools:
                h = F.max_pool2d(h, 2)
        return self.fc(h.mean(dim=(2, 3)))


class ResNet(nn.Module):
    """ResNet-5 of the paper (§4.2), as the official ``resnet5`` builds it (``ResNet_Cifar3`` with
    ``BasicBlock_1conv``; the paper only says "same weight size" as PlainNet-5).

    Stem: ``conv3×3(widths[0], stride 1)`` → BN → act. Then one block per further width, each
    ``h_l = act(BN_l(conv3×3_l(h_{l-1})) + BN'_l(conv1×1'_l(h_{l-1})))`` with both convolutions of
    stride 2 (the projection shortcut ``conv1×1'`` + ``BN'`` exists because the stride and width
    change), the activation after the addition only; no max-pool (32×32 → 16 → 8 → 4). Then a
    global average pool and ``FC(widths[-1], N)``. Convolutions have no bias. The 3×3 kernels
    have PlainNet-5's shapes. Convolutions are initialized ``N(0, 2/(k²·c_out))`` (He, fan-out)
    and BatchNorm with γ = 1, β = 0, as in the official code.

    ``convs``/``bns`` hold the stem and the blocks' 3×3 convolutions (unit ``l`` at index ``l``),
    ``skips``/``skip_bns`` the projections of blocks 1 … (index ``l - 1``). State dict:
    ``convs.{i}.weight``, ``bns.{i}.*``, ``skips.{i}.weight`` (out, in, 1, 1), ``skip_bns.{i}.*``,
    ``fc.weight``, ``fc.bias``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = PLAINNET5_WIDTHS,
        num_classes: int = 2,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ValueError("ResNet needs a stem and at least one block")
        self.widths = widths
        chans = [in_channels, *widths]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=1 if l == 0 else 2, padding=1, bias=False)
            for l, (a, b) in enumerate(zip(chans[:-1], chans[1:]))
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in widths)
        self.skips = nn.ModuleList(nn.Conv2d(a, b, 1, stride=2, bias=False) for a, b in zip(widths[:-1], widths[1:]))
        self.skip_bns = nn.ModuleList(nn.BatchNorm2d(b) for b in widths[1:])
        self.act = make_activation(activation)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bns[0](self.convs[0](x)))
        for conv, bn, skip, skip_bn in zip(self.convs[1:], self.bns[1:], self.skips, self.skip_bns):
            h = self.act(bn(conv(h)) + skip_bn(skip(h)))
        return self.fc(h.mean(dim=(2, 3)))


class GRUNet(nn.Module):
    """GRU-2 of the paper (§4, name classification): stacked GRU layers on one-hot characters, then FC.

    Input: one-hot sequences ``(B, T, 58)`` (float) or character indices ``(B, T)`` (long; index
    ``-1`` = padding, an all-zero vector) over :data:`ALL_LETTERS`. The classifier reads the last
    layer's hidden state at the last step (or at step ``lengths - 1`` when ``lengths`` is given, for
    right-padded batches). Layer ``k`` follows ``torch.nn.GRU``: gates stacked ``[r, z, n]`` in
    ``weight_ih_l{k}`` (3H, in) and ``weight_hh_l{k}`` (3H, H):
    ``r = σ(W_ir x + b_ir + W_hr h + b_hr)``, ``z = σ(W_iz x + … )``,
    ``n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))``, ``h' = (1 − z) ⊙ n + z ⊙ h``.
    State dict: ``gru.weight_ih_l{k}``, ``gru.weight_hh_l{k}``, ``gru.bias_ih_l{k}``,
    ``gru.bias_hh_l{k}``, ``fc.weight`` (N, H), ``fc.bias``.
    """

    def __init__(
        self,
        input_size: int = N_LETTERS,
        hidden: int = 128,
        num_layers: int = 2,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        self.gru = nn.GRU(input_size, hidden, num_layers=num_layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if not torch.is_floating_point(x):
            x = F.one_hot(x.clamp_min(0), self.gru.input_size).to(self.fc.weight.dtype) * (x >= 0).unsqueeze(-1)
        out, _ = self.gru(x)
        if lengths is None:
            last = out[:, -1]
        else:
            last = out[torch.arange(out.shape[0], device=out.device), lengths.to(out.device) - 1]
        return self.fc(last)


def input_shape(arch: str) -> tuple[int, ...]:
    """Shape of one input example (no batch dimension) for ``arch``.

    Images: ``(3, 32, 32)`` (the MLP flattens it to 3072). ``"gru"``: one-hot characters
    ``(GRU_SEQ_LEN, 58)``; GRU-2 accepts any sequence length, this is only a default.
    """
    if arch in ("mlp", "cnn", "plainnet6", "resnet5"):
        return (3, 32, 32)
    if arch == "gru":
        return (GRU_SEQ_LEN, N_LETTERS)
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")


def build_model(arch: str, num_classes: int, *, activation: str = "relu", **kw) -> nn.Module:
    """Build an architecture of the paper by name (one of :data:`ARCHS`); ``kw`` go to the class.

    ``"mlp"`` → :class:`MLP` (``in_features``, ``hidden``, ``output_relu``); ``"cnn"``,
    ``"plainnet6"`` → :class:`ConvNet` (``widths``, e.g. ``widths=(8, 16, 32, 64)`` for a small
    PlainNet-5, ``in_channels``, ``pools``); ``"resnet5"`` → :class:`ResNet` (``widths``: stem
    then blocks, ``in_channels``); ``"gru"`` → :class:`GRUNet` (``hidden``,
    ``num_layers``, ``input_size``; GRU gates are fixed, so only the default ``activation`` is
    accepted).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    if arch == "mlp":
        return MLP(num_classes=num_classes, activation=activation, **kw)
    if arch == "cnn":
        kw.setdefault("widths", PLAINNET5_WIDTHS)
        return ConvNet(num_classes=num_classes, activation=activation, **kw)
    if arch == "plainnet6":
        kw.setdefault("widths", PLAINNET6_WIDTHS)
        kw.setdefault("pools", PLAINNET6_POOLS)
        return ConvNet(num_classes=num_classes, activation=activation, **kw)
    if arch == "resnet5":
        return ResNet(num_classes=num_classes, activation=activation, **kw)
    if arch == "gru":
        if activation != "relu":
            raise ValueError("GRU-2 has fixed sigmoid/tanh gates; activation must be left at its default")
        return GRUNet(num_classes=num_classes, **kw)
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
