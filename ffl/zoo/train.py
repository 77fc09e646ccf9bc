"""Training a zoo (§4): :func:`train_zoo` trains the T tasks × R runs of a spec with the batched
engine (:mod:`ffl.engine`), a chunk of networks at a time, into the files of :mod:`ffl.zoo.store`.

A killed run resumes at the first unfinished chunk (staging folders it left are removed at the
next start) and ends with the same bytes as an uninterrupted run with the same chunking (on CPU).
Before anything trains: the root is a folder, finished shards are what their names say and were
trained on the data there now, and the disk has room. A chunk with a diverged network (NaN/inf
weights) is not saved: :class:`ffl.zoo.store.TrainingDivergedError` names the networks, and the
zoo stays incomplete. With ``overlap`` (on CUDA) the next chunk's initial weights are built by
forked workers and the finished chunk's shards written by a thread while a chunk trains.

Scale-out: ``train_zoo(..., shard=(rank, world))`` trains only chunks ``c % world == rank``
(``python -m ffl.zoo train`` under ``torchrun`` does this and merges on rank 0; :func:`prepare_zoo`
writes ``spec.json`` first, :func:`ffl.zoo.store.finalize_zoo` the manifest last).
"""
from __future__ import annotations

import errno
import functools
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ffl import batched, implicit_conv
from ffl.checks import as_device, as_int
from ffl.data import TaskData, load_task
from ffl.engine import (NetworkData, PendingInit, check_precision, init_stacked, probe_capacity, start_init_stacked,
                        train_batched)
from ffl.files import clean_stale_temp, folder_lock, free_bytes, sha256_file, write_json_atomic
from ffl.models import CONV_ARCHS, PLAIN_CONV_ARCHS, build_model, input_shape
from ffl.provenance import hardware
from ffl.triton_support import available, runs_on, triton
from ffl.zoo.spec import ZooSpec, _jsonable, data_seed, run_seed
from ffl.zoo.store import (_MANIFEST_FIELDS, Piece, TrainingDivergedError, Zoo, _check_piece, _check_root,
                           _check_same_spec, _check_shards_belong, _finalize, _read_sidecar, _stored_chunk_size,
                           _write_spec, check_task_data, chunks, read_record, recorded_task_data, write_piece)


#: most networks per engine batch of a convolutional zoo on CUDA: on one H100, PlainNet-5 chunks of
#: 585–750 trained at about half the networks per second of chunks of 126–252 (README)
CONV_CHUNK_CAP = 252


#: on CPU, a convolutional chunk's convolutions write at most this many floats per input image
#: (counted per image, so a zoo's chunking does not move with its batch size): every zoo the laptop
#: book trained with widths 8–64 (PlainNet-5, PlainNet-6, ResNet-5) keeps its chunks of 64; wider
#: networks go in smaller chunks, whose BatchNorm, activation and pooling passes stay in cache
CPU_CONV_CHUNK_FLOATS = 64 * 24_576


def conv_outputs_per_image(spec: ZooSpec) -> int:
    """Floats every convolution of one of ``spec``'s networks writes for one input image, counted
    on the meta device."""
    counts: list[int] = []
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net = build_model(spec.arch, 2, **spec.model_kwargs)
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(lambda _m, _i, out: counts.append(out[0].numel()))
        net(torch.empty(1, *input_shape(spec.arch)))
    return sum(counts)


def default_batch_networks(spec: ZooSpec, device: str | torch.device) -> int:
    """Networks per engine batch. On CPU: 64, and for architectures with convolutions the largest
    power of two up to 64 whose convolution outputs per image fit :data:`CPU_CONV_CHUNK_FLOATS`
    (PlainNet-5 of widths 16–128 trains 1.7× faster per network in chunks of 32 than of 64 on 2
    cores; docs/performance.md). On CUDA as many as fit (:func:`ffl.engine.probe_capacity`), at most 2048,
    and at most :data:`CONV_CHUNK_CAP` for architectures with convolutions."""
    N = spec.num_networks
    dev = torch.device(device)
    if dev.type != "cuda":
        if spec.arch not in CONV_ARCHS:
            return min(N, 64)
        fit = max(1, CPU_CONV_CHUNK_FLOATS // conv_outputs_per_image(spec))
        return min(N, 64, 1 << (fit.bit_length() - 1))
    cap = CONV_CHUNK_CAP if spec.arch in CONV_ARCHS else 2048
    return max(1, min(N, cap, probe_capacity(spec.arch, spec.model_kwargs, spec.train_config(), dev)))


def _load_tasks(spec: ZooSpec, tasks: Sequence[int]) -> dict[int, TaskData]:
    return {t: load_task(spec.dataset, t, data_root=spec.data_root, download=spec.download,
                         seed=spec.seed, **spec.data_kwargs) for t in tasks}


def _build_kwargs(spec: ZooSpec, example: Any) -> dict[str, Any]:
    kw = dict(spec.model_kwargs)
    if spec.arch == "mlp" and "in_features" not in kw:
        kw["in_features"] = int(math.prod(example.x_train.shape[1:]))
    return _jsonable(kw)


@dataclass
class ChunkInputs:
    """What the engine needs to train one chunk: its tasks' data on the device and, per network
    (in the pieces' order), the initialization seed, the data seed and the task's index in ``data``."""

    data: NetworkData
    seeds: list[int]
    data_seeds: list[int]
    task_index: list[int]
    num_classes: int
    build_kwargs: dict[str, Any]
    build: Any  # () -> nn.Module, one untrained network of the chunk's architecture


def _chunk_model(spec: ZooSpec, chunk: Sequence[Piece], task_data: dict[int, Any]) -> tuple[int, dict[str, Any], Any]:
    """Number of classes, build keywords and model builder of one chunk."""
    ncls_set = {task_data[p.task].num_classes for p in chunk}
    if len(ncls_set) != 1:
        raise ValueError(f"tasks trained together need the same number of classes, got {sorted(ncls_set)}")
    ncls = ncls_set.pop()
    build_kwargs = _build_kwargs(spec, task_data[min(p.task for p in chunk)])
    return ncls, build_kwargs, functools.partial(build_model, spec.arch, ncls, **build_kwargs)


def _chunk_seeds(spec: ZooSpec, chunk: Sequence[Piece]) -> list[int]:
    return [run_seed(spec.seed, p.task, r) for p in chunk for r in range(p.r0, p.r1)]


def chunk_inputs(spec: ZooSpec, chunk: Sequence[Piece], task_data: dict[int, Any],
                 device: str | torch.device) -> ChunkInputs:
    """Seeds, task indices and device data of one chunk (``task_data``: the loaded tasks by id)."""
    tasks_here = sorted({p.task for p in chunk})
    ncls, build_kwargs, build = _chunk_model(spec, chunk, task_data)
    runs = [(p.task, r) for p in chunk for r in range(p.r0, p.r1)]
    return ChunkInputs(
        data=NetworkData.from_tasks([task_data[t] for t in tasks_here], device),
        seeds=_chunk_seeds(spec, chunk),
        data_seeds=[data_seed(spec.seed, t, r) for t, r in runs],
        task_index=[tasks_here.index(t) for t, _ in runs],
        num_classes=ncls,
        build_kwargs=build_kwargs,
        build=build,
    )


def kernels_used(arch: str, device: str | torch.device) -> dict[str, str]:
    """Which code the convolutions and BatchNorms of a zoo of ``arch`` run on ``device`` under the
    current :mod:`ffl.batched` backends (provenance): ``torch`` (PyTorch's, cuDNN on CUDA),
    ``triton`` or ``interpret``; BatchNorm fusion exists for the plain ConvNets only. Empty for
    architectures without convolutions."""
    if arch not in CONV_ARCHS:
        return {}

    def runs(backend: str) -> str:
        return backend if runs_on(backend, device) else "torch"

    return {"conv": runs(batched.BatchedConv2d.backend),
            "bn": runs(batched.BatchedBatchNorm.backend) if arch in PLAIN_CONV_ARCHS else "torch"}


def _chunk_size(root: Path, spec: ZooSpec, batch_networks: int | None, device) -> tuple[int, bool]:
    """Validate ``root/spec.json`` if it exists; return the chunk size to use and whether it exists."""
    stored = _stored_chunk_size(root, spec, batch_networks, stacklevel=4)
    if stored is not None:
        return stored, True
    return batch_networks or default_batch_networks(spec, device), False


def _write_chunk(root: Path, spec: ZooSpec, chunk: Sequence[Piece], res, nets_meta: list[dict[str, Any]],
                 build_kwargs: dict[str, Any], digests: dict[int, str]) -> None:
    """The shards of one trained chunk (``res``: its :class:`ffl.engine.BatchResult`), a few at a
    time: serializing, hashing and writing one shard runs at well under the disk's rate (hashing
    and file writes release the GIL). Every thread is joined before this returns."""
    jobs, i = [], 0
    for p in chunk:
        n = p.r1 - p.r0
        metas = [dict(m, train_acc=res.train_acc[i + j], test_acc=res.test_acc[i + j])
                 for j, m in enumerate(nets_meta[i:i + n])]
        jobs.append((p, slice(i, i + n), metas))
        i += n
    with ThreadPoolExecutor(max_workers=min(_SHARD_WRITERS, len(jobs)), thread_name_prefix="ffl-zoo-shard") as pool:
        for done in [pool.submit(write_piece, root, spec, p, res.state, rows, metas, build_kwargs, digests[p.task])
                     for p, rows, metas in jobs]:
            done.result()


_SHARD_WRITERS = 4  # shards of a chunk written at once


class _ChunkWrites:
    """The shards of at most one trained chunk in flight. ``background``: written by a thread
    (safetensors serialization, fsync and hashing) while the next chunk trains; otherwise at once.
    A chunk counts as written (and ``after_chunk`` is called with the number written so far, on
    the calling thread) only when its files are durable; a write's error is raised by :meth:`wait`.
    Each chunk gets a fresh thread, joined in :meth:`wait`, so no writer thread is alive when the
    next init workers are forked."""

    def __init__(self, background: bool, after_chunk: Callable[[int], None] | None = None) -> None:
        self.background = background
        self.after_chunk = after_chunk
        self.written = 0
        self._pool: ThreadPoolExecutor | None = None
        self._future = None

    def submit(self, write) -> None:
        self.wait()
        if not self.background:
            write()
            self._done()
            return
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ffl-zoo-writes")
        self._future = self._pool.submit(write)

    def wait(self) -> None:
        if self._future is None:
            return
        pool, future = self._pool, self._future
        self._pool = self._future = None
        pool.shutdown(wait=True)
        future.result()
        self._done()

    def _done(self) -> None:
        self.written += 1
        if self.after_chunk is not None:
            self.after_chunk(self.written)


def _prefetch_workers() -> int:
    """Init workers that run beside training: two cores fewer than :func:`ffl.engine.init_stacked`
    takes, left to the thread that drives the device and the writer thread."""
    return max(2, min(os.cpu_count() or 1, 16) - 2)


class _Progress:
    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.bar = None
        if enabled:  # plain tqdm bars: papermill kernels have no widgets
            self.bar = tqdm(total=total, desc=desc, unit="net", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total} nets [{elapsed}<{remaining}, {rate_fmt}]")

    def advance_to(self, position: float) -> None:
        # Absolute, not a sum of fractional steps: summed float steps drift past the total
        # (tqdm then warns and shows a negative time left); at a chunk's end position is exact.
        if self.bar is not None:
            self.bar.update(position - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_zoo(
    spec: ZooSpec,
    root: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    batch_networks: int | None = None,
    compile: bool = False,
    overlap: bool | None = None,
    conv_backend: str | None = None,
    bn_backend: str | None = None,
    conv_tiles: str | os.PathLike | None = None,
    after_chunk: Callable[[int], None] | None = None,
) -> Zoo | None:
    """Train (or load, or resume) the zoo of ``spec`` in directory ``root`` (§4).

    * a complete zoo with the same spec at ``root`` is loaded, not retrained;
    * a partial one is resumed (finished shards are kept, verified by SHA-256);
    * a zoo with a different spec at ``root`` → ``ValueError`` listing the differing fields.

    ``batch_networks``: networks trained together in one engine batch (default: 64 on CPU, memory
    based on CUDA). It fixes the chunking and is stored, so a resumed run reuses it.
    ``shard=(rank, world)``: train only chunks ``c % world == rank``; returns the zoo if it is
    complete afterwards (the last rank to finish writes the manifest), else ``None``.
    ``compile``: train through ``torch.compile`` (see :func:`ffl.engine.train_batched`).
    ``overlap``: build the next chunk's initial weights (forked workers) and write the finished
    chunk's shards (a thread) while a chunk trains; same bytes as without. Default: on CUDA only
    (on a CPU those workers would take the cores the training uses).
    ``conv_backend``, ``bn_backend``: the :mod:`ffl.batched` backends to train with (default: as
    set; see :class:`ffl.profile_settings.CudaEngine`); ``conv_tiles``: a tile table of measured blockings
    for the Triton convolution (:func:`ffl.implicit_conv.read_tile_table`). ``provenance.json``
    records what ran.
    ``after_chunk(n)``: called on this thread once the n-th chunk this call trains is on disk (its
    shards durable), e.g. to stop the process there as a crash would (the tests).
    """
    root = Path(root)
    _check_root(root)
    if not isinstance(spec, ZooSpec):
        spec = ZooSpec.from_dict(dict(spec))
    device = as_device(device)
    if batch_networks is not None:
        batch_networks = as_int("batch_networks", batch_networks, minimum=1)
    for what, backend in (("conv_backend", conv_backend), ("bn_backend", bn_backend)):
        # before anything is written: a backend that cannot run here fails now, not in a chunk
        if backend is not None and not available(backend):
            raise ValueError(f"{what} {backend!r} cannot run here (Triton installed: {triton is not None}, "
                             f"CUDA: {torch.cuda.is_available()})")
    tiles = implicit_conv.read_tile_table(conv_tiles) if conv_tiles is not None else None
    if shard is not None:
        world = as_int("world size", shard[1], minimum=1)
        shard = (as_int("rank", shard[0], minimum=0), world)
        if shard[0] >= world:
            raise ValueError(f"rank {shard[0]} must be < world size {world}")
    mpath = root / "manifest.json"
    if mpath.is_file():
        zoo = Zoo.load(root)
        _check_same_spec(root, zoo.manifest["spec"], spec)
        recorded = recorded_task_data(zoo.manifest["shards"])
        if recorded:
            try:
                task_data = _load_tasks(spec, sorted(recorded))
            except FileNotFoundError:  # the data is not here: nothing to compare the zoo with
                return zoo
            check_task_data(root, spec, recorded, {t: d.sha256() for t, d in task_data.items()})
        return zoo
    check_precision(spec.precision, device)  # only training needs it: a finished TF32 zoo loads anywhere
    rank, world = shard if shard is not None else (0, 1)
    with folder_lock(root):  # checking root and writing spec.json is one step: two runs cannot both pass
        k, mine, todo, task_data, digests = _start(root, spec, batch_networks, device, rank, world)
    n_done = sum(p.r1 - p.r0 for c in mine if c not in todo for p in c)
    n_mine = sum(p.r1 - p.r0 for c in mine for p in c)
    t_start = time.time()
    with batched.kernel_settings(conv_backend, bn_backend, tiles):  # for this training only
        kernels = kernels_used(spec.arch, device)
        if tiles is not None and kernels.get("conv", "torch") != "torch":
            kernels["conv_tiles"] = f"{Path(conv_tiles).name} (sha256 {sha256_file(conv_tiles)[:12]})"
        if todo:
            cfg = spec.train_config()
            dev = torch.device(device)
            desc = f"zoo {spec.arch}/{spec.dataset}" + (f" [rank {rank}/{world}]" if world > 1 else "")
            bar = _Progress(n_mine, progress, desc)
            bar.advance_to(n_done)
            # overlap: the next chunk's initial weights are built, and the finished chunk's shards
            # written, while a chunk trains (see _ChunkWrites and the fork below)
            overlap = dev.type == "cuda" if overlap is None else bool(overlap)
            writes = _ChunkWrites(background=overlap, after_chunk=after_chunk)
            ahead: PendingInit | None = None  # the next chunk's initial weights, being built
            finished = None  # a trained chunk whose shards are still to be submitted
            try:
                for ci, chunk in enumerate(todo):
                    try:
                        inp = chunk_inputs(spec, chunk, task_data, dev)
                        stacked = ahead.result() if ahead is not None else init_stacked(inp.build, inp.seeds)
                        ahead = None
                        if overlap and ci + 1 < len(todo):
                            # Forked here, on the main thread, between two trainings and while no writer
                            # thread exists (the last one was joined; the next is started just below):
                            # fork copies only the calling thread, and a lock another thread held at
                            # that moment would stay locked in the child. The workers only fill shared
                            # memory; this thread trains meanwhile and joins them at the next chunk.
                            # Training draws no numbers from the global RNG that the builds reseed
                            # (the template's weights are replaced by the stacked ones).
                            build = _chunk_model(spec, todo[ci + 1], task_data)[2]
                            ahead = start_init_stacked(build, _chunk_seeds(spec, todo[ci + 1]), workers=_prefetch_workers())
                    finally:
                        if finished is not None:
                            writes.submit(finished)
                            finished = None
                    runs = [(p, r) for p in chunk for r in range(p.r0, p.r1)]
                    nets_meta = [{"task": p.task, "run": r, "seed": s, "data_seed": ds, "num_classes": inp.num_classes,
                                  "classes": list(map(str, task_data[p.task].classes)),
                                  "shard": f"shards/{p.name}.safetensors", "row": r - p.r0}
                                 for (p, r), s, ds in zip(runs, inp.seeds, inp.data_seeds)]
                    K = len(inp.seeds)

                    def on_step(step: int, total: int, K=K, start=n_done) -> None:
                        bar.advance_to(start + K * step / total)

                    res = train_batched((inp.build(), stacked), inp.data, inp.task_index, inp.data_seeds, cfg,
                                        device=dev, on_step=on_step, compile=compile)
                    n_done += K
                    del stacked
                    writes.wait()  # the previous chunk's shards are durable
                    if res.diverged:  # nothing of this chunk is saved: the zoo stays incomplete
                        bar.close()
                        raise TrainingDivergedError(root, spec, [runs[k] for k in res.diverged], len(runs))
                    finished = functools.partial(_write_chunk, root, spec, chunk, res, nets_meta, inp.build_kwargs,
                                                 digests)
                    del res, inp
                    if not overlap:
                        writes.submit(finished)
                        finished = None
                if finished is not None:
                    writes.submit(finished)
                    finished = None
                writes.wait()
            except BaseException as err:
                if ahead is not None:
                    ahead.cancel()
                try:  # chunks trained before the error still land
                    writes.wait()
                except Exception as also:  # noqa: BLE001 - the first error propagates, this one is noted
                    err.add_note(f"writing an earlier chunk's shards failed too: {type(also).__name__}: {also}")
                raise
            bar.close()
    prov = {"device": str(device), "rank": rank, "world": world, "seconds": time.time() - t_start,
            "networks_trained": sum(p.r1 - p.r0 for c in todo for p in c), "batch_networks": k}
    if torch.device(device).type == "cpu":  # CPU matrix products round by their thread count
        prov["cpu_threads"] = torch.get_num_threads()
    if kernels:
        prov["kernels"] = kernels
    try:
        prov["hardware"] = hardware(str(device))
    except Exception:  # noqa: BLE001 - provenance is best effort
        pass
    write_json_atomic(root / f"provenance-rank{rank}.json" if world > 1 else root / "provenance.json", prov)
    if _finalize(root, spec, k):
        return Zoo.load(root)
    if world == 1:
        raise RuntimeError(f"zoo at {root} is incomplete after training (a shard is missing)")
    return None


def _start(root: Path, spec: ZooSpec, batch_networks: int | None, device: str, rank: int, world: int):
    """Everything :func:`train_zoo` checks before it trains (spec, finished shards, data, room on
    the disk), then ``root``'s folders and ``spec.json``. Returns the chunk size, this rank's chunks,
    those still to train, their tasks' data and its digests."""
    k, spec_exists = _chunk_size(root, spec, batch_networks, device)
    mine = [c for ci, c in enumerate(chunks(spec, k)) if ci % world == rank]
    # a resumed zoo's finished shards are hashed in parallel (hashing releases the GIL); the pool
    # is joined before any init worker is forked
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        pieces = [p for c in mine for p in c]
        sidecars = dict(zip((p.name for p in pieces), pool.map(lambda p: _read_sidecar(root, p), pieces)))
    todo = [c for c in mine if not all(sidecars[p.name] is not None for p in c)]
    _check_shards_belong(root, spec, spec_exists)  # another spec's shards: named as such, before the data
    for p in pieces:
        if sidecars[p.name] is not None:
            _check_piece(root, spec, p, sidecars[p.name])
    # Data first: a missing dataset fails before anything is written under root.
    needed = sorted({p.task for c in todo for p in c})
    task_data = _load_tasks(spec, needed)
    # and the same data: a resumed zoo's finished shards name the data they were trained on
    digests = {t: d.sha256() for t, d in task_data.items()}  # hashed once: checked here, recorded by each shard
    recorded = recorded_task_data([m for m in sidecars.values() if m is not None])
    finished_only = _load_tasks(spec, sorted(set(recorded) - set(needed)))
    check_task_data(root, spec, recorded, {**{t: d.sha256() for t, d in finished_only.items()}, **digests})
    _check_room(root, spec, todo, task_data)
    root.mkdir(parents=True, exist_ok=True)
    (root / "shards").mkdir(exist_ok=True)
    for folder in (root, root / "shards"):  # staging folders of a killed run
        clean_stale_temp(folder)
    if not spec_exists:
        _write_spec(root, spec, k)
    return k, mine, todo, task_data, digests


def _check_room(root: Path, spec: ZooSpec, todo: Sequence[Sequence[Piece]], task_data: dict[int, TaskData]) -> None:
    """Before anything trains: an existing ``root/shards`` takes a file, and the disk has room for
    the shards still to train (their tensors, plus 4 KiB each for a sidecar's share)."""
    if (root / "shards").is_dir():
        try:
            with tempfile.TemporaryFile(dir=root / "shards"):
                pass
        except OSError as e:
            raise OSError(e.errno, f"cannot write in {root / 'shards'} ({e.strerror}), where the zoo's shards go; "
                                   "make it writable or choose another root") from None
    if not todo:
        return
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net = _chunk_model(spec, todo[0], task_data)[2]()
    per_net = sum(t.numel() * t.element_size() for t in net.state_dict().values()) + 4096
    n = sum(p.r1 - p.r0 for c in todo for p in c)
    free = free_bytes(root)
    if n * per_net > free:
        raise OSError(errno.ENOSPC, f"not enough space for the zoo at {root}: its {n} networks still to train need "
                                    f"about {n * per_net / 2**20:,.1f} MiB, its disk has {free / 2**20:,.1f} MiB free; "
                                    "free some, or choose a root on another disk")


def prepare_zoo(spec: ZooSpec, root: str | os.PathLike, *, batch_networks: int | None = None,
                device: str | torch.device = "cpu") -> int:
    """Create ``root`` and its ``spec.json`` (or check an existing one against ``spec``) without
    training; return the chunk size the zoo uses. Lets several ranks start on one folder."""
    root = Path(root)
    _check_root(root)
    if (root / "manifest.json").is_file():
        return read_record(root / "manifest.json", _MANIFEST_FIELDS)["batch_networks"]
    if batch_networks is not None:
        batch_networks = as_int("batch_networks", batch_networks, minimum=1)
    with folder_lock(root):
        k, exists = _chunk_size(root, spec, batch_networks, as_device(device))
        _check_shards_belong(root, spec, exists)
        (root / "shards").mkdir(parents=True, exist_ok=True)
        if not exists:
            _write_spec(root, spec, k)
    return k
