"""Why the tiny ImageNet MLP-4s of the offline copy train poorly, and what it does to the chains.

The copy this project reads offline has 100 training images per class, 400 per four-class task:
batches of 128 leave a last batch of 16 every epoch (the paper's 500 per class leave one of 80).
This trains narrow MLP-4s (width 64, the paper's training otherwise: SGD lr 0.1, momentum 0.9,
100 epochs, output ReLU) or, with --arch cnn, narrow PlainNet-5s (widths 8-64, 50 epochs) on real
tiny ImageNet, limited to 100 images per class whatever the copy, with batches of 128 and of 100
(and, with --all-variants, two other changes to the MLP), and prints their training accuracy and
the §4 protocols' table for each (chains and raw layers, in %).

    python scripts/last_batch_probe.py                      # 50 tasks x 10 runs, ~25 min on 2 cores
    python scripts/last_batch_probe.py --tasks 10 --runs 6 --all-variants
    python scripts/last_batch_probe.py --tasks 10 --runs 6 --arch cnn

Zoos and results are cached in $FFL_CACHE like every experiment's; the data comes from
$FFL_DATA_ROOT (or --data-root). See profiles/paper_offline.yaml, which this motivates.
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from ffl.experiment import run_experiment

NARROW = {"mlp": {"hidden": [64, 64, 64], "output_relu": True}, "cnn": {"widths": [8, 16, 32, 64]}}
VARIANTS = {
    "batch 128 (paper)": {},
    "batch 100": {"batch_size": 100},
}
MORE_VARIANTS = {
    "batch 128, no output ReLU": {"model_kwargs": {**NARROW["mlp"], "output_relu": False}},
    "batch 128, lr 0.01": {"lr": 0.01},
}


def probe(name: str, overrides: dict, args) -> tuple[dict, pd.Series]:
    start = time.perf_counter()
    exp = run_experiment(
        "tiny_imagenet", arch=args.arch, profile="paper", dataset="tiny_imagenet", data_root=args.data_root,
        device=args.device, progress=not args.quiet,
        zoo_overrides={"tasks": list(range(args.tasks)), "runs": args.runs, "model_kwargs": NARROW[args.arch],
                       "data_kwargs": {"max_train_per_class": 100}, **overrides},
    )
    train = exp.zoo.accuracy["train"].float()
    p10, p50 = (float(v) for v in torch.quantile(train, torch.tensor([0.1, 0.5])))
    row = {"variant": name, "networks": len(exp.zoo), "train acc p10": round(100 * p10, 1),
           "train acc median": round(100 * p50, 1),
           "at chance (train acc <= 30 %)": round(100 * float((train <= 0.3).float().mean()), 1),
           "test acc mean": round(100 * float(exp.zoo.accuracy["test"].float().mean()), 1),
           "seconds": round(time.perf_counter() - start)}
    scores = exp.results[~exp.results["metric"].str.startswith("theta_")]  # Θ's own fit is not a score
    table = scores.set_index(["index", "feature", "protocol", "metric"])["value"]
    return row, (100 * table).round(1).rename(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=50, help="tasks 0..T-1 (default 50, the paper's)")
    ap.add_argument("--runs", type=int, default=10, help="runs per task (default 10)")
    ap.add_argument("--arch", choices=sorted(NARROW), default="mlp", help="MLP-4 (default) or PlainNet-5")
    ap.add_argument("--all-variants", action="store_true", help="also: no output ReLU; lr 0.01 (MLP-4 only)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.all_variants and args.arch != "mlp":
        ap.error("--all-variants changes the MLP-4 (its output ReLU); use it with --arch mlp")
    variants = {**VARIANTS, **(MORE_VARIANTS if args.all_variants else {})}
    rows, tables = zip(*(probe(name, over, args) for name, over in variants.items()))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(rows).set_index("variant").to_string())
        wanted = [("classification", "top1"), ("retrieval", "rank1")]
        table = pd.concat(tables, axis=1)
        table = table[[(p, m) in wanted for _, _, p, m in table.index]]
        print(table.unstack(["protocol", "metric"]).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
