"""Architectures of the paper's zoos (§4).

Every model exposes its layers in input-to-output order so that :mod:`ffl.chain` can read the
layer matrices. Models are plain ``nn.Module``s; their ``state_dict`` keys are what zoos store.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ARCHS: tuple[str, ...] = ("mlp",)
ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu")


def make_activation(name: str) -> nn.Module:
    """ReLU or leaky ReLU (the paper's activation factor, slope 0.01)."""
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01)
    raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")


class MLP(nn.Module):
    """MLP-4 of the paper: 3072-500-500-500-N with ReLU (widths, depth, activation configurable).

    The input is flattened, so a 3x32x32 image becomes a 3072-vector. ``layers`` holds the
    ``nn.Linear`` modules in order; the last one is the classifier.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


def build_model(arch: str, num_classes: int, *, activation: str = "relu", **kw) -> nn.Module:
    """Build an architecture of the paper by name (one of :data:`ARCHS`)."""
    if arch == "mlp":
        return MLP(num_classes=num_classes, activation=activation, **kw)
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
