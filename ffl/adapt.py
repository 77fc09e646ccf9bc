"""A user's network, recognised by its structure, as the :mod:`ffl.models` network with its weights.

The chain rule (§3.2, :mod:`ffl.chain`) and the permutations (:mod:`ffl.permute`) are written for
:mod:`ffl.models`' classes. :func:`as_model` maps any network of the supported families onto one
of them, copying the weights, so that every chain, Gram and permutation is computed by the same
code whoever built the network:

* ``MLP``: ``nn.Linear`` layers (with ``nn.Flatten``, elementwise activations, dropout between);
* ``ConvNet`` (PlainNet): square, odd, stride-1 ``nn.Conv2d`` units, each optionally followed by its
  ``nn.BatchNorm2d`` (running statistics; a unit without one gets an identity BatchNorm), with
  activations and 2×2 pools between, then ``nn.AdaptiveAvgPool2d(1)``, ``nn.Flatten`` and one
  ``nn.Linear``: a VGG-style ``nn.Sequential``;
* ``ResNet`` (ResNet-5) and ``GRUNet``: as :mod:`ffl.models` builds them; a GRU network is also any
  module holding one unidirectional ``nn.GRU`` and one ``nn.Linear`` after it.

A module is read as its layers in registration order, which must be the order data flows through
them (true of ``nn.Sequential``); what ``forward`` does between them (a residual addition, say) is
not visible, so only the families above are recognised. Activations, pools and dropout do not enter
the chains; the adapted network has one activation (leaky ReLU if the user's has one, else ReLU)
and its pools after the first units, so its ``forward`` equals the user's only when the user's
follows PlainNet's pattern. A layer that cannot be placed raises ``TypeError`` naming it.

A ``state_dict`` alone carries no structure: with ``like=module`` it is loaded into a copy of that
module; without, the structure is inferred from key names and shapes, in key order: the layouts of
:mod:`ffl.models` (``convs.*``/``bns.*``/[``skips.*``]/``fc.*``), else one module per key prefix:
2-D ``weight`` → ``nn.Linear``, 4-D → ``nn.Conv2d`` (stride 1), ``running_mean`` → ``nn.BatchNorm2d``,
``weight_ih_l0`` → ``nn.GRU``. Strides and pools are not stored, and the chain does not depend on them.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from ffl.chain import check_supported
from ffl.models import MLP, ConvNet, GRUNet, ResNet

FFL_CLASSES = (MLP, ConvNet, ResNet, GRUNet)
#: layers that act on each neuron alone (or are the identity): invisible to the chains
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
               nn.Identity, nn.Dropout, nn.Dropout2d, nn.Softmax, nn.LogSoftmax)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
_KNOWN = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.GRU, nn.Flatten, nn.AdaptiveAvgPool2d, *_POOLS, *ELEMENTWISE)
Layers = list[tuple[str, nn.Module]]


def family(model: nn.Module) -> str:
    """``"mlp"``, ``"plainnet"``, ``"resnet"`` or ``"gru"`` for an :mod:`ffl.models` network."""
    names = {MLP: "mlp", ConvNet: "plainnet", ResNet: "resnet", GRUNet: "gru"}
    return next(v for k, v in names.items() if isinstance(model, k))


def _unplaced(name: str, m: nn.Module, why: str) -> TypeError:
    return TypeError(f"cannot place layer {name or '<root>'!r} ({type(m).__name__}): {why}")


def layers(model: nn.Module) -> Layers:
    """The layers of ``model`` in registration order: every module with parameters or buffers of its
    own, or without children. Unknown types raise ``TypeError`` naming the layer."""
    out = []
    for name, m in model.named_modules():
        own = any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))
        if next(m.children(), None) is not None and not own:
            continue  # a container: its children are the layers
        if not isinstance(m, _KNOWN):
            raise _unplaced(name, m, "not a layer of the supported families (MLP, PlainNet, ResNet-5, GRU)")
        out.append((name, m))
    return out


@torch.no_grad()
def _copy(dst: nn.Module, src: nn.Module) -> None:
    for key, t in dst.state_dict().items():  # absent in src (no bias, no affine): zero, or 1 for a scale
        s = getattr(src, key, None)
        if s is None:
            t.fill_(1 if key in ("weight", "running_var") else 0)
        else:
            t.copy_(s)


def _activation(ls: Layers) -> str:
    return "leaky_relu" if any(isinstance(m, nn.LeakyReLU) for _, m in ls) else "relu"


def _mlp(ls: Layers) -> MLP:
    lin = [(n, m) for n, m in ls if isinstance(m, nn.Linear)]
    for n, m in ls:
        if not isinstance(m, (nn.Linear, nn.Flatten, *ELEMENTWISE)):
            raise _unplaced(n, m, "an MLP holds only nn.Linear layers, activations, dropout and nn.Flatten")
    for (_, a), (n, b) in zip(lin, lin[1:]):
        if a.out_features != b.in_features:
            raise ValueError(f"layer {n!r} reads {b.in_features} features but the layer before it gives "
                             f"{a.out_features}")
    w = lin[0][1].weight
    net = MLP(lin[0][1].in_features, [m.out_features for _, m in lin[:-1]], lin[-1][1].out_features,
              _activation(ls)).to(w.dtype)
    for dst, (_, src) in zip(net.layers, lin):
        _copy(dst, src)
    return net


def _convnet(ls: Layers) -> ConvNet:
    units: list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]] = []
    gap, fc, pools = False, None, 0  # the head: a global average pool, then one classifier
    for n, m in ls:
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size
            if gap or m.stride != (1, 1) or m.dilation != (1, 1) or m.groups != 1 or k[0] != k[1] or k[0] % 2 == 0:
                raise _unplaced(n, m, "PlainNet units are square, odd, dense, stride-1 convolutions before the head")
            if units and k != units[0][1].kernel_size:
                raise _unplaced(n, m, f"kernel {k} differs from the first convolution's {units[0][1].kernel_size}")
            if units and m.in_channels != units[-1][1].out_channels:
                raise ValueError(f"layer {n!r} reads {m.in_channels} channels but the unit before it gives "
                                 f"{units[-1][1].out_channels}")
            units.append((n, m, None))
        elif isinstance(m, nn.BatchNorm2d):
            if not units or units[-1][2] is not None or gap or m.num_features != units[-1][1].out_channels:
                raise _unplaced(n, m, "a BatchNorm2d must directly follow its Conv2d (same channels)")
            if m.running_var is None:
                raise _unplaced(n, m, "no running statistics to fold")
            units[-1] = (*units[-1][:2], m)
        elif isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)) and units and fc is None:
            gap = True
        elif isinstance(m, nn.Linear):
            if not gap or fc is not None:
                raise _unplaced(n, m, "a PlainNet's one classifier follows a global average pool "
                                "(AdaptiveAvgPool2d(1))")
            if m.in_features != units[-1][1].out_channels:
                raise ValueError(f"layer {n!r} reads {m.in_features} features but the last unit has "
                                 f"{units[-1][1].out_channels} channels")
            fc = m
        elif isinstance(m, _POOLS):
            pools += 1
        elif not isinstance(m, (nn.Flatten, *ELEMENTWISE)):
            raise _unplaced(n, m, "not part of a conv–BN–activation–pool stack with a global-pool head")
    if fc is None:
        raise TypeError("a PlainNet ends with AdaptiveAvgPool2d(1), Flatten and one nn.Linear; found no classifier")
    first = units[0][1]
    net = ConvNet(first.in_channels, [c.out_channels for _, c, _ in units], fc.out_features, _activation(ls),
                  pools=min(pools, len(units)), kernel_size=first.kernel_size[0],
                  conv_bias=any(c.bias is not None for _, c, _ in units)).to(first.weight.dtype)
    for conv, bn, (_, c, b) in zip(net.convs, net.bns, units):
        _copy(conv, c)
        if b is None:
            bn.eps = 0.0  # identity: γ = 1, β = 0, μ = 0, σ² = 1, so the fold scale is exactly 1
        _copy(bn, b if b is not None else nn.Module())
    _copy(net.fc, fc)
    return net


def _gru(ls: Layers) -> GRUNet:
    grus = [(n, m) for n, m in ls if isinstance(m, nn.GRU)]
    n0, g = grus[0]
    after = [(n, m) for n, m in ls[ls.index(grus[0]) + 1:] if isinstance(m, nn.Linear)]
    for n, m in ls:
        if (n, m) not in (grus[0], *after[:1]) and not isinstance(m, ELEMENTWISE):
            raise _unplaced(n, m, "a GRU network holds one nn.GRU and one nn.Linear after it")
    if g.bidirectional or g.proj_size:
        raise _unplaced(n0, g, "only unidirectional GRUs without projection")
    if not after or after[0][1].in_features != g.hidden_size:
        raise TypeError(f"GRU {n0!r} needs one nn.Linear after it reading its {g.hidden_size} hidden features")
    net = GRUNet(g.input_size, g.hidden_size, g.num_layers, after[0][1].out_features).to(g.weight_ih_l0.dtype)
    _copy(net.gru, g)
    _copy(net.fc, after[0][1])
    return net


def _from_layers(ls: Layers) -> nn.Module:
    kinds = {type(m) for _, m in ls}
    if nn.GRU in kinds:
        return _gru(ls)
    if any(issubclass(k, nn.Conv2d) for k in kinds):
        return _convnet(ls)
    if any(issubclass(k, nn.Linear) for k in kinds):
        return _mlp(ls)
    raise TypeError("found no nn.Linear, nn.Conv2d or nn.GRU layer to compare")


def _ffl_layout(sd: Mapping[str, torch.Tensor]) -> nn.Module | None:
    """The ConvNet/ResNet of ``sd`` when its keys are theirs (the rest read in key order)."""
    tops = {k.split(".")[0] for k in sd}
    if tops not in ({"convs", "bns", "fc"}, {"convs", "bns", "skips", "skip_bns", "fc"}):
        return None
    kernels = [sd[f"convs.{i}.weight"] for i in range(sum(k.endswith(".weight") for k in sd if k.startswith("convs.")))]
    widths, fc = [w.shape[0] for w in kernels], sd["fc.weight"]
    if "skips" in tops:
        net = ResNet(kernels[0].shape[1], widths, fc.shape[0])
    else:
        net = ConvNet(kernels[0].shape[1], widths, fc.shape[0], kernel_size=kernels[0].shape[-1],
                      conv_bias="convs.0.bias" in sd)
    net = net.to(fc.dtype)
    net.load_state_dict(sd)
    return net


def _layers_from_state_dict(sd: Mapping[str, torch.Tensor]) -> Layers:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        prefix, _, leaf = key.rpartition(".")
        groups.setdefault(prefix, {})[leaf] = t
    out: Layers = []
    for name, g in groups.items():
        w = g.get("weight")
        if "weight_ih_l0" in g:
            layers_ = sum(k.startswith("weight_ih_l") for k in g)
            h = g["weight_hh_l0"].shape[1]
            m = nn.GRU(g["weight_ih_l0"].shape[1], h, layers_, bias="bias_ih_l0" in g,
                       bidirectional=any(k.endswith("_reverse") for k in g))
        elif "running_mean" in g:
            m = nn.BatchNorm2d(g["running_mean"].shape[0], affine=w is not None)
        elif w is not None and w.dim() == 2:
            kinds = {type(o) for _, o in out}
            if nn.Conv2d in kinds and nn.Linear not in kinds:
                out.append(("<global pool>", nn.AdaptiveAvgPool2d(1)))  # not stored: the head is implied
            m = nn.Linear(w.shape[1], w.shape[0], bias="bias" in g)
        elif w is not None and w.dim() == 4:
            m = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), padding=w.shape[-1] // 2, bias="bias" in g)
        else:
            raise TypeError(f"cannot place state_dict entries {name!r} ({', '.join(g)}): shapes "
                            f"{[tuple(t.shape) for t in g.values()]} are no Linear, Conv2d, BatchNorm2d or GRU; "
                            "pass like=<module> to say the structure")
        m = m.to(next(t.dtype for t in g.values() if t.is_floating_point()))
        m.load_state_dict(g)
        out.append((name, m))
    return out


def as_model(net: nn.Module | Mapping[str, torch.Tensor], *, like: nn.Module | None = None) -> nn.Module:
    """``net`` (a module or a ``state_dict``) as the :mod:`ffl.models` network of its family, weights
    copied (an :mod:`ffl.models` network is returned as it is). See the module docstring for the
    families and for how a ``state_dict``'s structure is found (``like``: a module of that structure)."""
    if isinstance(net, Mapping):
        if like is not None:
            module = copy.deepcopy(like)
            module.load_state_dict(net)
            net = module
        else:
            model = _ffl_layout(net)
            return model if model is not None else _from_layers(_layers_from_state_dict(net))
    if not isinstance(net, nn.Module):
        raise TypeError(f"expected an nn.Module or a state_dict, got {type(net).__name__}")
    if isinstance(net, FFL_CLASSES):
        check_supported(net)
        return net
    return _from_layers(layers(net)).train(net.training)
