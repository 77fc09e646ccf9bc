"""The command line: ``python -m ffl.bench zoo|zoo-time|conv|profile|chunks|ffl`` (:func:`main`;
``--help`` lists the subcommands, ``<command> --help`` their options). Each subcommand parses its
options, checks them before anything runs, calls the public functions of :mod:`ffl.bench` and
prints their results (a table or JSON lines)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from ffl import implicit_conv, triton_support
from ffl.batched import kernel_settings
from ffl.bench.conv import PLAINNET5_CONVS, best_tiles, conv_layers, conv_sweep
from ffl.bench.engine import bench_zoo, chunk_sweep, print_table, profile_step, zoo_time
from ffl.bench.features import PAPER_SHAPES, bench_ffl, print_ffl
from ffl.bench.timing import _gemm_rate
from ffl.cli import Command, run_command_line
from ffl.engine import PRECISIONS
from ffl.kernels import StreamConfig
from ffl.malloc import tune_malloc
from ffl.provenance import run_info

def _common(ap) -> None:
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32", help="arithmetic (ffl.engine.PRECISIONS)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--repeat", type=int, default=None)


def _setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    tune_malloc()  # before anything runs, so the loop baseline gets the same allocator settings


def _zoo_arguments(ap) -> None:
    _common(ap)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (tests)")


def _zoo(args) -> int:
    _setup(args)
    load0 = os.getloadavg()[0]
    res = bench_zoo(args.device, quick=args.quick, repeat=args.repeat, precision=args.precision)
    res.update(loadavg_1min_start=load0, loadavg_1min_end=os.getloadavg()[0])
    print_table(res)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items() if k != "table"},
                     sort_keys=True))
    return 0


def _zoo_time_arguments(ap) -> None:
    _common(ap)
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=None, help="override the paper's epochs")
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--batch-networks", type=int, default=None)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--compile", action="store_true", help="train through torch.compile")
    ap.add_argument("--max-chunks", type=int, default=None, help="stop after this many chunks")
    _backend_arguments(ap)


def _backend_arguments(ap) -> None:
    ap.add_argument("--conv-backend", choices=triton_support.BACKENDS, default="torch",
                    help="convolutions: torch (grouped, cuDNN) or triton (ffl.implicit_conv)")
    ap.add_argument("--bn-backend", choices=triton_support.BACKENDS, default="torch",
                    help="PlainNet's BatchNorm + activation + max-pool: torch or triton (ffl.fused_bn)")
    ap.add_argument("--conv-tiles", default=None, metavar="FILE",
                    help="the Triton convolution's blockings from a table (conv --sweep --tiles-out FILE)")


def _kernel_settings(args) -> contextlib.ExitStack:
    """The backends and blockings a command's arguments ask for, set for the ``with`` block. A bad
    tile table fails here, before anything runs."""
    table = implicit_conv.read_tile_table(args.conv_tiles) if args.conv_tiles else None
    return kernel_settings(args.conv_backend, args.bn_backend, table)


def _zoo_time(args) -> int:
    _setup(args)
    with _kernel_settings(args):
        res = zoo_time(args.arch, args.device, tasks=args.tasks, runs=args.runs, budget_s=args.budget_s,
                       batch_networks=args.batch_networks, data_root=args.data_root, epochs=args.epochs,
                       precision=args.precision, compile=args.compile, max_chunks=args.max_chunks)
    res.update(conv_backend=args.conv_backend, bn_backend=args.bn_backend, conv_tiles=args.conv_tiles)
    print(json.dumps(res, sort_keys=True))
    return 0


def _conv_arguments(ap) -> None:
    _common(ap)
    ap.add_argument("--batch-networks", type=int, default=126, help="K networks")
    ap.add_argument("--widths", default=None, help="PlainNet-5 widths, e.g. 8,16,32,64 (the laptop's; default: the "
                                                   "paper's 32,64,128,256)")
    ap.add_argument("--batch", type=int, default=128, help="images per network per step")
    ap.add_argument("--gemm", action="store_true",
                    help="also time a 2048³ GEMM in the same run and give each case as a fraction of its rate")
    ap.add_argument("--sweep", action="store_true",
                    help="time ffl.implicit_conv's kernels under a grid of blockings instead (one JSON line each)")
    ap.add_argument("--tiles-out", default=None, metavar="FILE",
                    help="with --sweep: write the blockings that beat the default by 5%% as a tile table")


def _conv(args) -> int:
    _setup(args)
    if args.tiles_out and not args.sweep:
        raise SystemExit("--tiles-out needs --sweep")
    if args.tiles_out and not Path(args.tiles_out).resolve().parent.is_dir():
        raise SystemExit(f"--tiles-out {args.tiles_out}: its folder does not exist (checked before the sweep)")
    if args.sweep:
        batch = 128  # PlainNet-5's training batch
        about = run_info(args.device, K=args.batch_networks, batch=batch, precision=args.precision,
                         triton=getattr(triton_support.triton, "__version__", None),
                         measured="python -m ffl.bench conv --sweep")

        def write_table(rows: list[dict[str, Any]]) -> None:  # after every pass: a cut-off sweep keeps its table
            chosen = best_tiles(rows, args.precision)
            implicit_conv.write_tile_table(args.tiles_out, chosen, {**about, "passes_measured": len(
                {(r["layer"], r["pass"]) for r in rows})})
            print(f"{len(chosen)} blocking(s) beat the default by 5% or more so far: {args.tiles_out}", flush=True)

        conv_sweep(args.device, K=args.batch_networks, batch=batch, precision=args.precision, repeat=args.repeat or 3,
                   after_pass=write_table if args.tiles_out else None)
        return 0
    convs = PLAINNET5_CONVS
    if args.widths:
        widths = [int(w) for w in args.widths.split(",")]
        convs = tuple((c_in, c_out, 32 >> i) for i, (c_in, c_out) in enumerate(zip([3, *widths], widths)))
    gemm = 2 * _gemm_rate((1, 2048, 2048, 2048), args.precision, torch.device(args.device)) / 1e12 if args.gemm else None
    for row in conv_layers(args.device, K=args.batch_networks, batch=args.batch, precision=args.precision,
                           repeat=args.repeat or 3, convs=convs):
        if gemm:
            row["gemm_tflops"] = gemm
            row.update({k.replace("_tflops", "_gemm_fraction"): v / gemm for k, v in list(row.items())
                        if k.endswith("_tflops") and k != "gemm_tflops"})
        print(json.dumps(row, sort_keys=True), flush=True)
    return 0


def _chunks_arguments(ap) -> None:
    _common(ap)
    ap.add_argument("--widths", action="append", default=None,
                    help="PlainNet-5 widths, e.g. 16,32,64,128 (repeatable; default: 8-64 and 16-128)")
    ap.add_argument("--chunks", default="8,16,32,64", help="chunk sizes K to time")
    ap.add_argument("--batch", type=int, default=16, help="images per network per step")


def _chunks(args) -> int:
    _setup(args)
    widths = args.widths or ["8,16,32,64", "16,32,64,128"]
    for w in widths:
        for row in chunk_sweep([int(x) for x in w.split(",")], tuple(int(k) for k in args.chunks.split(",")),
                               batch=args.batch, repeat=args.repeat or 2, device=args.device):
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    return 0


def _profile_arguments(ap) -> None:
    _common(ap)
    ap.add_argument("--arch", default="mlp")
    ap.add_argument("--batch-networks", type=int, default=126, help="K networks")
    ap.add_argument("--compile", action="store_true", help="train through torch.compile")
    _backend_arguments(ap)


def _profile(args) -> int:
    _setup(args)
    with _kernel_settings(args):
        print(profile_step(args.arch, args.device, K=args.batch_networks, precision=args.precision,
                           compile=args.compile, augment=args.arch != "mlp"))
    return 0


#: ``ffl`` without ``--networks`` or ``--full``: a few minutes on 2 CPU cores. 100 networks in 10
#: tasks, and indices whose planned kernel time would overrun 150 s per architecture left out
#: (PlainNet-5's chain 4 alone is planned at minutes even for 100 networks).
QUICK_FFL = {"networks": 100, "tasks": 10, "budget_s": 150.0}
#: ``ffl --full``: docs/performance.md's 2-CPU row at N = 1,000 (tasks = N/100), nothing left out;
#: both architectures take more than 25 minutes on 2 CPU cores. ``--networks N`` keeps these
#: defaults too.
FULL_FFL = {"networks": 1000, "tasks": None, "budget_s": 1e9}


def _ffl_arguments(ap) -> None:
    _common(ap)
    ap.add_argument("--arch", choices=tuple(PAPER_SHAPES), action="append",
                    help="mlp (MLP-4) and/or cnn (PlainNet-5); repeatable (default: both)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--networks", type=int, default=None,
                      help=f"zoo size N (tasks = N/100; nothing left out unless --budget-s says so); without "
                           f"it or --full, a quick run: {QUICK_FFL['networks']} networks in {QUICK_FFL['tasks']} "
                           f"tasks, --budget-s {QUICK_FFL['budget_s']:.0f} (a few minutes on 2 CPU cores)")
    size.add_argument("--full", action="store_true",
                      help=f"the full-size run: N = {FULL_FFL['networks']} (tasks = N/100), nothing left out "
                           "(more than 25 minutes on 2 CPU cores for both architectures)")
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--memory-gib", type=float, default=2.0, help="weights + features per block (two are held)")
    ap.add_argument("--slab-mib", type=float, default=256.0, help="one Gram slab / implicit tile")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip indices projected to overrun this (default: none skipped with --networks or --full)")
    ap.add_argument("--zoo-root", default=None, help="DIR/<arch>: the zoo to time, e.g. a link to a chapter's trained one; random weights are written there if it holds none (default under $FFL_CACHE)")
    ap.add_argument("--project-to", type=int, default=5000)
    ap.add_argument("--chains-only", action="store_true")
    ap.add_argument("--passes", choices=("one", "per_index"), default=None,
                    help="over the zoo: one for every index, or one per index (default: per_index on a CPU, one on a GPU)")
    ap.add_argument("--quick", action="store_true", help="narrow networks (tests)")


def _ffl(args) -> int:
    _setup(args)
    precision = args.precision if args.device != "cpu" or args.precision != "tf32" else "fp32"
    size = (dict(FULL_FFL, networks=args.networks) if args.networks is not None
            else FULL_FFL if args.full else QUICK_FFL)
    networks, tasks = size["networks"], args.tasks or size["tasks"]
    budget_s = size["budget_s"] if args.budget_s is None else args.budget_s
    summary = {}
    for arch in args.arch or ["mlp", "cnn"]:
        root = None if args.zoo_root is None else Path(args.zoo_root) / arch
        res = bench_ffl(arch, networks, device=args.device, precision=precision, tasks=tasks, zoo_root=root,
                        block_bytes=int(args.memory_gib * 2 ** 30), slab_bytes=int(args.slab_mib * 2 ** 20),
                        budget_s=budget_s, project_to=args.project_to, chains_only=args.chains_only,
                        quick=args.quick, passes=args.passes or StreamConfig.for_device(args.device).passes)
        print_ffl(res)
        print(json.dumps({k: v for k, v in res.items() if k != "results"}, sort_keys=True, default=str), flush=True)
        summary[arch] = {k: res[k] for k in ("networks", "stage_s", "peak_bytes", "host_peak_rss_bytes", "gemm_fraction",
                                             "projected_total_s", "seconds", "skipped")}
    print(json.dumps({"ffl": summary, "device": args.device, "precision": precision}, sort_keys=True, default=str))
    return 0


COMMANDS = (
    Command("zoo", "engine vs plain loop, GEMM fraction, networks per second (ratios)", _zoo_arguments, _zoo),
    Command("zoo-time", "time a CIFAR-100-scale zoo at the paper profile's epochs", _zoo_time_arguments, _zoo_time),
    Command("conv", "PlainNet-5 convolutions for K networks: grouped vs im2col+bmm vs dense", _conv_arguments, _conv),
    Command("profile", "torch.profiler kernel table of engine steps", _profile_arguments, _profile),
    Command("chunks", "PlainNet-5 training per network against the engine's chunk size K (CPU chunking)",
            _chunks_arguments, _chunks),
    Command("ffl", "feature learning streamed over a zoo on disk: time, peak memory, GEMM fraction",
            _ffl_arguments, _ffl),
)


def main(argv: list[str] | None = None) -> int:
    return run_command_line("python -m ffl.bench", "ffl benchmarks", COMMANDS, argv)
