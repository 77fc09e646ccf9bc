"""Zoos of random, untrained weights in the real on-disk format (:func:`random_weight_zoo`): what
``python -m ffl.bench ffl`` times the feature-learning stage on, at any size, without training."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ffl.files import write_json_atomic
from ffl.models import build_model
from ffl.zoo import Zoo, ZooSpec, chunks, data_seed, finalize_zoo, prepare_zoo, run_seed, write_piece

#: the file that marks a zoo of :func:`random_weight_zoo` (random weights, never trained)
RANDOM_MARK = "random_weights.json"


def random_weight_zoo(arch: str, root: str | os.PathLike, *, tasks: int, runs: int,
                      model_kwargs: dict[str, Any] | None = None, seed: int = 0, task_share: float = 0.5,
                      batch_networks: int = 100) -> Zoo:
    """A zoo in the real on-disk format whose weights are random, not trained (seeded): network
    (t, r) has weights s·(a·B_t + √(1-a²)·E_tr) with B_t shared by the task's runs, E_tr its own, a =
    ``task_share`` and s = 1/√fan-in (BatchNorm: γ ≈ 1, running variance ≈ 1). The feature stage
    does not care whether weights were trained; the task share gives the protocols something to
    find. Loaded, not rebuilt, when ``root`` holds it already."""
    spec = ZooSpec(arch=arch, dataset="synthetic", tasks=list(range(tasks)), runs=runs,
                   model_kwargs=dict(model_kwargs or {}), seed=seed, epochs=1)  # never trained: RANDOM_MARK says so
    root = Path(root)
    if (root / "manifest.json").is_file():
        return Zoo.load(root)

    k = prepare_zoo(spec, root, batch_networks=batch_networks)
    kw = dict(spec.model_kwargs)
    if arch == "mlp":
        kw.setdefault("in_features", 3072)
    template = build_model(arch, 2, **kw).state_dict()
    own = math.sqrt(1 - task_share ** 2)
    for chunk in chunks(spec, k):
        for piece in chunk:
            g = torch.Generator().manual_seed(seed * 1_000_003 + piece.task)
            base = {name: torch.randn(t.shape, generator=g) for name, t in template.items() if t.is_floating_point()}
            g.manual_seed(seed * 1_000_003 + piece.task * 100_003 + piece.r0 + 1)
            n = piece.r1 - piece.r0
            state = {}
            for name, t in template.items():
                if not t.is_floating_point():
                    state[name] = torch.zeros(n, *t.shape, dtype=t.dtype)
                    continue
                x = task_share * base[name] + own * torch.randn(n, *t.shape, generator=g)
                if t.dim() >= 2:
                    state[name] = x / math.sqrt(math.prod(t.shape[1:]))
                elif name.endswith("running_var"):
                    state[name] = 1 + 0.1 * x.abs()
                elif name.endswith("weight"):  # BatchNorm γ
                    state[name] = 1 + 0.1 * x
                else:
                    state[name] = 0.1 * x
            # the seeds a trained zoo would record (every load checks them); these weights come from ``g``
            nets = [{"task": piece.task, "run": r, "seed": run_seed(spec.seed, piece.task, r),
                     "data_seed": data_seed(spec.seed, piece.task, r), "num_classes": 2, "classes": ["0", "1"],
                     "shard": f"shards/{piece.name}.safetensors", "row": r - piece.r0, "train_acc": 0.0,
                     "test_acc": 0.0} for r in range(piece.r0, piece.r1)]
            write_piece(root, spec, piece, state, slice(0, n), nets, _jsonable_kw(kw))
    zoo = finalize_zoo(root)
    assert zoo is not None
    write_json_atomic(root / RANDOM_MARK, {"weights": f"random, untrained (task share {task_share})"})
    return zoo


def _jsonable_kw(kw: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(kw))
