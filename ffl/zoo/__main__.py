"""The zoo's command line (torchrun-able): ``python -m ffl.zoo train|spec|merge|info`` (``--help``).

``train`` trains or resumes a zoo given by ``--spec FILE`` or ``--profile NAME --arch ARCH``
(:func:`ffl.profile_settings.spec_from_profile`; on CUDA with the profile's ``zoo.cuda`` settings),
into ``--root`` or the folder the chapters read (:func:`ffl.zoo.store.cached_zoo_root`); under
``torchrun`` each rank trains its share and rank 0 finalizes. ``spec`` prints a profile's spec as
JSON, ``merge`` merges zoos trained in parts, ``info`` summarizes a zoo. Every command calls
public functions only.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

import ffl.zoo
from ffl.checks import as_int
from ffl.cli import Command, run_command_line
from ffl.engine import tune_malloc
from ffl.profile_settings import cuda_engine_from_profile, spec_from_profile
from ffl.zoo.spec import ZooSpec
from ffl.zoo.store import Zoo, cached_zoo_root, finalize_zoo, merge_zoos
from ffl.zoo.train import prepare_zoo, train_zoo


def _add_spec_source(ap) -> None:
    ap.add_argument("--spec", help="JSON file with the ZooSpec fields (or give --profile …)")
    ap.add_argument("--profile", help="profile whose zoo settings to use (e.g. paper)")
    ap.add_argument("--section", default="cifar100", help="profile section (default: cifar100)")
    ap.add_argument("--arch", help="architecture (with --profile)")
    ap.add_argument("--dataset", help="dataset (with --profile; default: the section's name)")
    ap.add_argument("--seed", type=int, default=0, help="zoo seed (with --profile)")


def _spec_of(args) -> ZooSpec:
    if args.spec:
        try:
            fields = json.loads(Path(args.spec).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SystemExit(f"--spec {args.spec}: cannot be read as JSON ({type(e).__name__}: {e})") from None
        if not isinstance(fields, dict):
            raise SystemExit(f"--spec {args.spec}: expected a JSON object of ZooSpec fields (as `python -m ffl.zoo "
                             f"spec` prints), got {type(fields).__name__}")
        return ZooSpec.from_dict(fields)
    if not (args.profile and args.arch):
        raise SystemExit("give --spec FILE, or --profile NAME --arch ARCH [--section S --dataset D]")
    return spec_from_profile(args.profile, args.section, arch=args.arch, dataset=args.dataset or args.section,
                             seed=args.seed)


def _train_arguments(ap) -> None:
    _add_spec_source(ap)
    ap.add_argument("--root", help="the zoo's folder (default: where the chapters look for it, under $FFL_CACHE)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-networks", type=int, default=None,
                    help="networks per engine batch (default: the profile's zoo.cuda setting on CUDA, else by memory)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--compile", action="store_true", help="train through torch.compile (GPU throughput)")


def _train(args) -> int:
    spec = _spec_of(args)
    if args.root is None:
        args.root = cached_zoo_root(spec)
        print(f"zoo folder: {args.root}", file=sys.stderr)
    tune_malloc()  # this process exists to train: keep large buffers in the heap
    world = as_int("$WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"), minimum=1)
    engine = {}
    if args.profile and args.device.startswith("cuda"):  # the profile's zoo.cuda settings
        engine = cuda_engine_from_profile(args.profile, args.section, arch=args.arch)
    if args.batch_networks is not None:
        engine["batch_networks"] = args.batch_networks
    if world == 1:
        print(train_zoo(spec, args.root, device=args.device, progress=not args.quiet, compile=args.compile, **engine))
        return 0
    rank = as_int("$RANK", os.environ.get("RANK", "0"), minimum=0)
    device = args.device
    if device == "cuda":
        device = f"cuda:{as_int('$LOCAL_RANK', os.environ.get('LOCAL_RANK', '0'), minimum=0)}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if rank == 0:  # write spec.json (and check an existing one) before the other ranks start
        prepare_zoo(spec, args.root, batch_networks=engine.get("batch_networks"), device=device)
    dist.barrier()
    train_zoo(spec, args.root, device=device, progress=not args.quiet and rank == 0,
              shard=(rank, world), compile=args.compile, **engine)
    dist.barrier()
    status = 0
    if rank == 0:
        zoo = finalize_zoo(args.root)
        if zoo is None:
            print("zoo incomplete after all ranks finished", file=sys.stderr)
            status = 1
        else:
            print(zoo)
    dist.barrier()
    dist.destroy_process_group()
    return status


def _spec(args) -> int:
    print(json.dumps(_spec_of(args).to_dict(), indent=1, sort_keys=True))
    return 0


def _merge_arguments(ap) -> None:
    ap.add_argument("parts", nargs="+", help="zoo folders trained with shard=(rank, world)")
    ap.add_argument("--out", required=True)


def _info(args) -> int:
    zoo = Zoo.load(args.root)
    print(zoo, f"mean test acc {float(zoo.accuracy['test'].mean()):.4f}")
    return 0


COMMANDS = (
    Command("train", "train or resume a zoo (one shard per rank under torchrun)", _train_arguments, _train),
    Command("spec", "print the ZooSpec a profile asks for, as JSON (for train --spec)", _add_spec_source, _spec),
    Command("merge", "merge zoo parts trained in separate directories", _merge_arguments,
            lambda args: print(merge_zoos(args.parts, args.out)) or 0),
    Command("info", "summarize a zoo", lambda ap: ap.add_argument("root"), _info),
)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command_line("python -m ffl.zoo", ffl.zoo.__doc__.split("\n")[0], COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
