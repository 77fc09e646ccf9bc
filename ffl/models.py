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
``plainnet6``  PlainNet-6: PlainNet-5 plus one more conv3×3(256)–BN–act unit
``resnet5``    ResNet-5: PlainNet-5's weights, with zero-padded identity skips on units 2–4
``gru``        GRU-2: two stacked GRU layers (hidden 128) on one-hot characters, FC(128, N)
=============  ==============================================================================

``activation="leaky_relu"`` (slope 0.01) gives the leaky-ReLU variants of MLP and the CNNs.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ffl.data.namedata import ALL_LETTERS, N_LETTERS  # GRU-2 reads NameData's letters one-hot

ARCHS: tuple[str, ...] = ("mlp", "cnn", "plainnet6", "resnet5", "gru")
ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu")
LEAKY_SLOPE = 0.01

#: Sequence length :func:`input_shape` reports for ``"gru"`` (the model accepts any length).
GRU_SEQ_LEN: int = 16

PLAINNET5_WIDTHS: tuple[int, ...] = (32, 64, 128, 256)
PLAINNET6_WIDTHS: tuple[int, ...] = (32, 64, 128, 256, 256)


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
    ``nn.Linear`` modules in order; the last one is the classifier.
    State dict: ``layers.{i}.weight`` (out, in), ``layers.{i}.bias``.
    """

    def __init__(
        self,
        in_features: int = 3072,
        hidden: Sequence[int] = (500, 500, 500),
        num_classes: int = 2,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = make_activation(activation)

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
        return self.layers[-1](x)


class ConvNet(nn.Module):
    """PlainNet-L / ResNet-L of the paper (§4): conv units, global average pool, one FC layer.

    Unit ``l`` (``l = 1 … len(widths)``) is ``conv3×3(widths[l-1], padding 1, stride 1)`` →
    ``BatchNorm2d`` → activation, followed by a 2×2 max-pool for the first ``pools`` units
    (default: the first ``min(3, len(widths) - 1)``, so CIFAR's 32×32 becomes 16, 8, 4). After the
    last unit come a global average pool over space and ``FC(widths[-1], N)``.

    * PlainNet-5 (``arch="cnn"``): widths (32, 64, 128, 256) — conv(32)–BN–ReLU–pool,
      conv(64)–…–pool, conv(128)–…–pool, conv(256)–BN–ReLU, GAP, FC(256, N).
    * PlainNet-6 (``arch="plainnet6"``): widths (32, 64, 128, 256, 256) — one more conv unit
      (256 → 256, 4×4 maps, no pool).
    * ResNet-5 (``arch="resnet5"``, ``residual=True``): the same weights as PlainNet-5. Units 2…L are
      residual: ``h_l = act(BN_l(conv_l(h_{l-1})) + S_l h_{l-1})`` where the skip ``S_l`` is the
      identity on the ``widths[l-2]`` incoming channels, zero-padded to ``widths[l-1]`` output
      channels (ResNet option A: channel ``i`` of the input adds to channel ``i`` of the output,
      channels ``i ≥ widths[l-2]`` get no skip), so the skips add no weights. The pool of unit
      ``l-1`` comes before unit ``l``, so the spatial sizes match. Unit 1 (RGB → 32) is a plain stem.
      Widths must not decrease.

    Convolutions have no bias (BatchNorm's β takes its place; ``conv_bias=True`` adds one).
    State dict: ``convs.{i}.weight`` (out, in, 3, 3) [``convs.{i}.bias``], ``bns.{i}.weight``,
    ``bns.{i}.bias``, ``bns.{i}.running_mean``, ``bns.{i}.running_var``,
    ``bns.{i}.num_batches_tracked``, ``fc.weight`` (N, widths[-1]), ``fc.bias``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = PLAINNET5_WIDTHS,
        num_classes: int = 2,
        activation: str = "relu",
        *,
        residual: bool = False,
        pools: int | None = None,
        kernel_size: int = 3,
        conv_bias: bool = False,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths:
            raise ValueError("ConvNet needs at least one conv unit")
        if residual and any(b < a for a, b in zip(widths[:-1], widths[1:])):
            raise ValueError(f"residual units need non-decreasing widths, got {widths}")
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd")
        self.widths = widths
        self.residual = residual
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
            y = bn(conv(h))
            if self.residual and l > 0:
                y = y + F.pad(h, (0, 0, 0, 0, 0, y.shape[1] - h.shape[1]))
            h = self.act(y)
            if l < self.pools:
                h = F.max_pool2d(h, 2)
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

    ``"mlp"`` → :class:`MLP` (``in_features``, ``hidden``); ``"cnn"``, ``"plainnet6"``,
    ``"resnet5"`` → :class:`ConvNet` (``widths``, e.g. ``widths=(8, 16, 32, 64)`` for a small
    PlainNet-5, ``in_channels``, ``pools``); ``"gru"`` → :class:`GRUNet` (``hidden``,
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
        return ConvNet(num_classes=num_classes, activation=activation, **kw)
    if arch == "resnet5":
        kw.setdefault("widths", PLAINNET5_WIDTHS)
        return ConvNet(num_classes=num_classes, activation=activation, residual=True, **kw)
    if arch == "gru":
        if activation != "relu":
            raise ValueError("GRU-2 has fixed sigmoid/tanh gates; activation must be left at its default")
        return GRUNet(num_classes=num_classes, **kw)
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
