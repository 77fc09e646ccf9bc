r"""Compare two networks without data, blind to how their hidden neurons are ordered (FFL §3.2).

For each chain index l the networks' chain Grams G_l = C_l C_lᵀ (eq. 8) are invariant to every
function-preserving hidden permutation (:mod:`ffl.chain`), so their cosine

    cos_l(a, b) = ⟨G_a, G_b⟩_F / (‖G_a‖_F ‖G_b‖_F),   ⟨G_a, G_b⟩_F = ‖C_aᵀ C_b‖²_F

is a similarity that no reordering of hidden neurons can change (raw weights' cosines can fall to
0 under one). It is computed in kernel form (:func:`ffl.chain.gram_inner`, float64): no G is formed,
so PlainNet's chain 4 (19683² entries) costs 256 × 256 numbers. The hidden widths of ``a`` and
``b`` may differ, a chain's rows (the input patch it reads) must agree; networks of different
depths are compared at the indices they share. Networks are plain modules or ``state_dict``s of the families
:mod:`ffl.adapt` recognises. Given a learned Θ (§3.3, :func:`ffl.features.fit_projection`) saved
with :func:`save_projection`, :func:`compare` also reports the cosine of the projected vectors.

Command line: ``python -m ffl.compare A.pt B.pt [C.pt …]`` (``--help``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from ffl.adapt import as_model, family
from ffl.chain import gram_inner
from ffl.checks import as_int
from ffl.cli import Command, run_command_line
from ffl.features import FeatureConfig, Projection, Representation
from ffl.files import write_bytes_atomic

Network = nn.Module | Mapping[str, torch.Tensor]
_FORMAT = 1  # of a saved projection


@dataclass
class SavedProjection:
    """A fitted Θ with what it needs to score any network: the features ``train`` of the networks
    that span it (rows ``projection.train_index`` of the representation it was fitted on), the
    ``index`` and ``kind`` of those features, the ``features`` options, and the caller's ``meta``."""

    projection: Projection
    train: torch.Tensor  # (N, d, n) chain factors, or (N, D) flattened weights
    index: int  # chain/layer index, 1-based
    kind: str  # "chain" or "layer"
    features: FeatureConfig
    meta: dict

    def scores(self, net: Network, *, like: nn.Module | None = None) -> torch.Tensor:
        """Θ x for one network (T scores), x its features at ``index``: coef · k(x) + bias."""
        x = self.features.of(as_model(net, like=like), self.kind, upto=self.index)[self.index - 1].double().cpu()
        train = self.train.double()
        if self.kind == "chain":
            k, norms, own = gram_inner(train, x[None]), gram_inner(train, train), gram_inner(x, x)
        else:
            k, norms, own = train @ x, train.square().sum(1), x.square().sum()
        if self.projection.normalize:  # the kernel Θ was fitted on: cosines
            k = k / (norms * own).sqrt().clamp_min(1e-300)
        return self.projection.coef @ k + self.projection.bias


def save_projection(proj: Projection, rep: Representation, path: str | Path, *, index: int, kind: str = "chain",
                    features: FeatureConfig | None = None, meta: dict | None = None) -> None:
    """Write ``proj`` (fitted on ``rep``, the networks' ``kind`` features at ``index`` made with
    ``features``) to one safetensors file: Θ's coefficients, bias and training rows, the features
    of those networks, and the settings as JSON metadata (``meta``: anything JSON, e.g. the zoo)."""
    data = rep.factors if kind == "chain" else rep.vectors
    if data is None or kind not in ("chain", "layer"):
        raise ValueError(f"a {kind!r} projection needs its representation's explicit features "
                         "(factors for 'chain', vectors for 'layer'), not precomputed inner products")
    settings = dict(format=_FORMAT, index=int(index), kind=kind, normalize=bool(proj.normalize),
                    features=asdict(features or FeatureConfig()), meta=meta or {})
    tensors = {"coef": proj.coef, "bias": proj.bias, "train_index": proj.train_index,
               "train": data[proj.train_index]}
    blob = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                   metadata={"ffl_projection": json.dumps(settings)})
    write_bytes_atomic(path, blob)


def load_projection(path: str | Path) -> SavedProjection:
    """Read what :func:`save_projection` wrote."""
    try:
        with safe_open(str(path), framework="pt") as f:
            s = json.loads((f.metadata() or {}).get("ffl_projection", "null"))
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error type: not a safetensors file
        raise ValueError(f"{path} is not a projection saved by ffl.compare.save_projection: {e}") from e
    if not s or s.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a projection saved by ffl.compare.save_projection (format {_FORMAT})")
    proj = Projection(coef=t["coef"], bias=t["bias"], train_index=t["train_index"], normalize=s["normalize"])
    return SavedProjection(proj, t["train"], s["index"], s["kind"], FeatureConfig.from_dict(s["features"]), s["meta"])


@dataclass
class Similarities:
    """Cosines of N networks' chain Grams: ``chain[l - 1]`` is the N × N matrix at chain index l;
    ``learned`` the N × N cosines of their projected vectors (with a projection, else ``None``)."""

    family: str
    chain: list[np.ndarray]
    learned: np.ndarray | None = None
    learned_index: int | None = None


def _factors(models: Sequence[nn.Module], names: Sequence[str], upto: int | None,
             features: FeatureConfig) -> list[list[torch.Tensor]]:
    fams = {family(m) for m in models}
    if len(fams) > 1:
        raise TypeError("networks of different families: "
                        + ", ".join(f"{n} is {family(m)}" for n, m in zip(names, models)))
    per = [[c.double().cpu() for c in features.of(m, "chain", upto)] for m in models]
    depth = min(len(p) for p in per)
    for l in range(depth):
        rows = {p[l].shape[0] for p in per}
        if len(rows) > 1:
            raise ValueError(f"chain {l + 1} reads inputs of different sizes: "
                             + ", ".join(f"{n}: {p[l].shape[0]}" for n, p in zip(names, per)))
    return [p[:depth] for p in per]


def similarities(nets: Sequence[Network], *, names: Sequence[str] | None = None, upto: int | None = None,
                 projection: SavedProjection | None = None, like: nn.Module | None = None,
                 features: FeatureConfig | None = None) -> Similarities:
    """Pairwise cosines of the chain Grams of ``nets`` at indices 1 … ``upto`` (all: every index the
    networks share) and, given ``projection``, of their projected vectors. ``features``: the chain
    options (default :class:`ffl.features.FeatureConfig`'s, the paper's)."""
    names = list(names or (f"#{i}" for i in range(len(nets))))
    upto = None if upto is None else as_int("upto", upto, minimum=1)
    models = [as_model(n, like=like) for n in nets]
    per = _factors(models, names, upto, features or FeatureConfig())
    chain = []
    for l in range(len(per[0])):
        inner = np.array([[gram_inner(a[l], b[l]).item() for b in per] for a in per])
        norms = np.sqrt(np.diag(inner))
        chain.append(inner / np.maximum(np.outer(norms, norms), 1e-300))
    learned = None
    if projection is not None:
        s = torch.stack([projection.scores(m) for m in models])
        learned = torch.nn.functional.normalize(s, dim=1) @ torch.nn.functional.normalize(s, dim=1).T
        learned = learned.numpy()
    return Similarities(family(models[0]), chain, learned, projection.index if projection else None)


@dataclass
class Comparison:
    """What :func:`compare` returns: ``cosine[l - 1]`` = cos(G_l(a), G_l(b)) for l = 1 … L, and
    ``learned`` the cosine of Θ x_a and Θ x_b at ``learned_index`` (with a projection)."""

    family: str
    cosine: list[float]
    learned: float | None = None
    learned_index: int | None = None

    def __str__(self) -> str:
        text = ", ".join(f"chain {l}: {c:.6f}" for l, c in enumerate(self.cosine, 1))
        return text + (f"; learned Θ at {self.learned_index}: {self.learned:.6f}" if self.learned is not None else "")


def compare(a: Network, b: Network, *, upto: int | None = None, projection: SavedProjection | None = None,
            like: nn.Module | None = None, features: FeatureConfig | None = None) -> Comparison:
    """Data-free, permutation-invariant similarity of two networks (FFL §3.2): per chain index the
    cosine of their chain Grams (and, given ``projection``, of their learned features, §3.3).
    ``a``, ``b``: modules or ``state_dict``s (``like``: a module of their structure, see
    :mod:`ffl.adapt`). Unsupported layers raise ``TypeError`` naming the layer."""
    s = similarities([a, b], names=["a", "b"], upto=upto, projection=projection, like=like, features=features)
    learned = None if s.learned is None else float(s.learned[0, 1])
    return Comparison(s.family, [float(m[0, 1]) for m in s.chain], learned, s.learned_index)


# ----------------------------------------------------------------------------- command line


def _like(spec: str) -> nn.Module:
    file, _, func = spec.rpartition(":")
    if not file or not func:
        raise ValueError(f"--like takes FILE.py:FUNCTION, got {spec!r}")
    module_spec = importlib.util.spec_from_file_location("_ffl_like", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, func)()


def _load(path: str, trust: bool) -> Network:
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # weights_only refuses a pickled module: say how to get past it
        raise ValueError(f"cannot read {path} as a state_dict ({type(e).__name__}); save `model.state_dict()`, "
                         "or pass --trust-pickles for a whole pickled module you trust") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # a training checkpoint {"state_dict": ..., "epoch": ...}
    if not isinstance(obj, nn.Module) and not (isinstance(obj, Mapping) and all(map(torch.is_tensor, obj.values()))):
        raise ValueError(f"{path} holds a {type(obj).__name__}, neither a module nor a state_dict of tensors")
    return obj


def _table(names: Sequence[str], m: np.ndarray) -> str:
    w = max(8, *map(len, names))
    head = " " * w + "".join(f"  {n:>{w}}" for n in names)
    return "\n".join([head, *(f"{n:<{w}}" + "".join(f"  {v:>{w}.6f}" for v in row) for n, row in zip(names, m))])


def _run(args: argparse.Namespace) -> int:
    try:
        like = _like(args.like) if args.like else None
        nets = [_load(p, args.trust_pickles) for p in args.networks]
        stems = [Path(p).stem for p in args.networks]
        names = stems if len(set(stems)) == len(stems) else [f"{i}:{n}" for i, n in enumerate(stems, 1)]
        proj = load_projection(args.projection) if args.projection else None
        s = similarities(nets, names=names, upto=args.upto, projection=proj, like=like)
    except (TypeError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out: dict[str, Any] = dict(networks=list(args.networks), names=names, family=s.family,
                                   indices=list(range(1, len(s.chain) + 1)),
                                   chain_cosine={str(l): m.tolist() for l, m in enumerate(s.chain, 1)},
                                   learned=None if s.learned is None else
                                   dict(index=s.learned_index, cosine=s.learned.tolist()))
        print(json.dumps(out))
        return 0
    print(f"{s.family}: cosine of chain Grams ⟨G_a, G_b⟩/(‖G_a‖‖G_b‖), {len(names)} networks")
    for l, m in enumerate(s.chain, 1):
        print(f"\nchain {l}\n{_table(names, m)}")
    if s.learned is not None:
        print(f"\nlearned Θ at index {s.learned_index}\n{_table(names, s.learned)}")
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("networks", nargs="+", metavar="FILE",
                   help="torch.save'd state_dicts (or modules, see --trust-pickles)")
    p.add_argument("--upto", type=int, default=None, help="chain indices 1 … N only (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON: {names, family, indices, chain_cosine, learned}")
    p.add_argument("--like", metavar="FILE.py:FUNCTION", help="structure of the state_dicts: FUNCTION() in FILE.py "
                   "returns a module they load into (default: inferred from key names and shapes, see ffl.adapt)")
    p.add_argument("--trust-pickles", action="store_true", help="also read whole pickled modules "
                   "(torch.load(weights_only=False) runs code from the file: only for files you trust)")
    p.add_argument("--projection", metavar="FILE", help="a learned Θ saved by ffl.compare.save_projection: "
                   "also print the cosines of the projected vectors")


COMMANDS = [Command("run", "cosine of chain Grams, per chain index, between every two networks", _arguments, _run)]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "run":  # one command: `python -m ffl.compare A B` and `--help` mean `run …`
        argv.insert(0, "run")
    return run_command_line("python -m ffl.compare", __doc__.split("\n")[0], COMMANDS, argv)


class _CallableModule(types.ModuleType):
    """``ffl.compare(a, b)`` calls :func:`compare` though ``ffl.compare`` is this module: a package
    attribute named like a submodule is replaced by the submodule once it is imported."""

    def __call__(self, *args: Any, **kw: Any) -> Comparison:
        return compare(*args, **kw)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
