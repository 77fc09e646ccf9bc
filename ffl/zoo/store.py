"""A zoo on disk (§4): its files, how its networks are cut into shards, reading it back, and every
check that a zoo is what it says; merging zoos trained in parts.

``root/``
    ``spec.json``      the :class:`ffl.zoo.spec.ZooSpec` and the engine chunking (written once the data has loaded)
    ``shards/*.safetensors`` + ``shards/*.json``
                       one shard per (task, block of runs): the stacked ``state_dict`` tensors
                       (leading dim = runs in the block) and a sidecar with each network's task,
                       run, seeds, final train/test accuracy and the shard's sha256
    ``manifest.json``  written last, when every shard exists: spec, library version, networks,
                       shards (file, bytes, sha256)
    ``provenance.json`` device, hardware and wall time of the run(s) (not part of the zoo bytes)

Loading never unpickles (safetensors + JSON). Every file is written atomically (temporary file +
``os.replace``). A truncated or tampered shard raises :class:`ZooCorruptError` naming the file.

Identity: ``spec.json``, every shard's sidecar and the manifest record the spec's hash
(:func:`ffl.zoo.spec.spec_sha256`), so shards of another spec are never adopted (not even with
``spec.json`` lost), and every load checks the manifest's networks (count, order, task, run,
seeds, shard, row) against its spec. Every shard also records the SHA-256 of its task's data
(:meth:`TaskData.sha256`): reading a finished zoo, or resuming one, on data that hashes otherwise
(another copy of the dataset, changed files) raises :class:`StaleDataError`.
:class:`TrainingDivergedError` is raised for a chunk with a diverged network (it is not saved).

Chunks: the engine trains :func:`chunks` of consecutive networks; each is cut at task boundaries
into :class:`Piece` s, one shard file each. :func:`merge_zoos` combines zoos trained in separate
directories (``shard=(rank, world)`` of :func:`ffl.zoo.train.train_zoo`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from ffl import __version__
from ffl.checks import as_folder, env_folder
from ffl.files import atomic_path, sha256_file, write_bytes_atomic, write_json_atomic
from ffl.models import build_model
from ffl.zoo.spec import ZooSpec, data_seed, run_seed, spec_diff, spec_sha256

FORMAT = "ffl-zoo"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ZooCorruptError(ValueError):
    """A zoo file is truncated, tampered with or unreadable (the message names the file)."""


class StaleDataError(ValueError):
    """A zoo was trained on other data than its dataset now gives for the same tasks (another copy,
    other images per class): reading or resuming it would label its networks with the wrong data."""

    def __init__(self, root: Path, spec: "ZooSpec", stale: Sequence[tuple[int, str, str]]) -> None:
        self.tasks = [t for t, _, _ in stale]
        named = ", ".join(f"task {t} (trained on {was[:12]}…, now {now[:12]}…)" for t, was, now in stale[:5])
        super().__init__(
            f"the zoo at {root} was trained on other {spec.dataset} data than "
            f"{spec.data_root or '$FFL_DATA_ROOT (else ./data)'} holds now: {named}"
            + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
            + " (SHA-256 of each task's tensors). The dataset's files changed since, or another copy of it is "
            "read (e.g. the full dataset where the zoo was trained on an offline copy with fewer images). "
            f"Point data_root at the data it was trained on, or delete {root} to train it on this data.")


def check_task_data(root: Path, spec: "ZooSpec", recorded: dict[int, str], digests: dict[int, str]) -> None:
    """``StaleDataError`` unless every task of ``digests`` (task -> :meth:`TaskData.sha256` of the
    data there now) with a ``recorded`` digest still has it. Tasks without a record (zoos from
    before it) pass."""
    stale = [(t, recorded[t], now) for t, now in sorted(digests.items()) if t in recorded and recorded[t] != now]
    if stale:
        raise StaleDataError(root, spec, stale)


def recorded_task_data(manifest_or_sidecars: Sequence[dict[str, Any]]) -> dict[int, str]:
    """task -> the data digest recorded by shards' sidecars (or a manifest's ``shards``)."""
    return {int(m["task"]): m["data_sha256"] for m in manifest_or_sidecars if m.get("data_sha256")}


class TrainingDivergedError(RuntimeError):
    """Networks of a zoo ended training with NaN or infinite weights (the message names them by
    task and run); their chunk is not saved, so the zoo is never complete with them in it."""

    def __init__(self, root: Path, spec: "ZooSpec", networks: Sequence[tuple[Piece, int]], chunk_size: int) -> None:
        self.networks = [(p.task, r) for p, r in networks]
        named = ", ".join(f"task {t} run {r}" for t, r in self.networks[:20]) + (" …" if len(networks) > 20 else "")
        schedule = f"{spec.steps} steps" if spec.steps is not None else f"{spec.epochs} epochs"
        super().__init__(
            f"training diverged (non-finite weights or loss) for {len(networks)} of the {chunk_size} networks "
            f"of a chunk of the zoo at {root}: {named}. Settings: optimizer {spec.optimizer}, lr {spec.lr}, "
            f"momentum {spec.momentum}, weight_decay {spec.weight_decay}, {schedule}, precision {spec.precision}. "
            "Nothing of this chunk was saved and the zoo stays incomplete; train with a smaller lr "
            "(another spec, so another root).")


def _shard_name(task: int, r0: int, r1: int) -> str:
    return f"t{task:05d}-r{r0:05d}-{r1 - 1:05d}"


# --------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Runs ``r0 … r1-1`` of task ``spec.tasks[task_pos]`` (one shard file)."""

    task_pos: int
    task: int
    r0: int
    r1: int

    @property
    def name(self) -> str:
        return _shard_name(self.task, self.r0, self.r1)


def chunks(spec: ZooSpec, batch_networks: int) -> list[list[Piece]]:
    """Engine batches: consecutive networks in task-major order, ``batch_networks`` at a time,
    each cut at task boundaries into pieces (one shard file per piece)."""
    N, R = spec.num_networks, spec.runs
    out = []
    for a in range(0, N, batch_networks):
        b = min(a + batch_networks, N)
        pieces = []
        i = a
        while i < b:
            tp, r0 = divmod(i, R)
            r1 = min(R, r0 + (b - i))
            pieces.append(Piece(tp, spec.tasks[tp], r0, r1))
            i += r1 - r0
        out.append(pieces)
    return out


# --------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------


class Zoo:
    """A trained zoo on disk (see module doc). Networks are ordered task-major:
    ``i = task_position * runs + run``."""

    def __init__(self, root: Path, manifest: dict[str, Any], *, verify: str = "lazy", cache_shards: int = 2) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.spec = ZooSpec.from_dict({**manifest["spec"]})
        nets = manifest["networks"]
        self.tasks = torch.tensor([n["task"] for n in nets], dtype=torch.int64)
        self.runs = torch.tensor([n["run"] for n in nets], dtype=torch.int64)
        self.seeds = torch.tensor([n["seed"] for n in nets], dtype=torch.int64)
        self.accuracy = {
            "train": torch.tensor([n["train_acc"] for n in nets], dtype=torch.float64),
            "test": torch.tensor([n["test_acc"] for n in nets], dtype=torch.float64),
        }
        self._shards = {s["file"]: s for s in manifest["shards"]}
        self._verified: set[str] = set()
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_n = cache_shards
        for s in manifest["shards"]:
            path = self.root / s["file"]
            if not path.is_file():
                raise ZooCorruptError(f"zoo shard missing: {path}")
            size = path.stat().st_size
            if size != s["bytes"]:
                raise ZooCorruptError(f"zoo shard {path} has {size} bytes, manifest says {s['bytes']} (truncated or modified)")
        self._check_identity()
        if verify == "full":
            self.verify()

    def _check_identity(self) -> None:
        """The manifest's spec hash, and its networks and shards against those its spec and chunk
        size determine (count, order, task, run, seeds, shard, row): a relabelled or cut manifest
        fails here."""
        where = self.root / "manifest.json"
        recorded = self.manifest.get("spec_sha256")  # zoos written before it was recorded have none
        if recorded is not None and recorded != spec_sha256(self.manifest["spec"]):
            raise ZooCorruptError(f"{where}: its spec does not match its recorded spec hash (edited)")
        k = int(self.manifest["batch_networks"])
        check_networks(self.manifest["networks"], self.spec, k, where)
        files = [f"shards/{p.name}.safetensors" for chunk in chunks(self.spec, k) for p in chunk]
        if sorted(self._shards) != sorted(files) or len(self.manifest["shards"]) != len(files):
            raise ZooCorruptError(f"{where} lists shards {sorted(self._shards)[:4]}…, its spec needs {files[:4]}…")

    @classmethod
    def load(cls, root: str | os.PathLike, *, verify: str = "lazy") -> Zoo:
        """Load a complete zoo. Always checked: the manifest's networks and shards against its
        spec (count, order, task, run, seeds) and its spec hash. ``verify``: ``"lazy"`` (sizes
        now, SHA-256 of each shard when it is first read) or ``"full"`` (SHA-256 of every shard now)."""
        root = Path(root)
        mpath = root / "manifest.json"
        if not mpath.is_file():
            done = len(list((root / "shards").glob("*.json"))) if (root / "shards").is_dir() else 0
            raise FileNotFoundError(
                f"no complete zoo at {root} (no manifest.json; {done} shard(s) present). "
                "Run train_zoo(spec, root) to train or resume it.")
        manifest = read_record(mpath, _MANIFEST_FIELDS)
        if manifest.get("format") != FORMAT:
            raise ZooCorruptError(f"{mpath} is not an ffl zoo manifest")
        try:
            return cls(root, manifest, verify=verify)
        except (KeyError, TypeError, AttributeError) as e:  # a record inside of the wrong shape
            raise ZooCorruptError(f"{mpath} is not a zoo manifest: {type(e).__name__}: {e} (edited, or written by "
                                  "something else)") from None

    def __len__(self) -> int:
        return len(self.manifest["networks"])

    @property
    def weights_sha256(self) -> str:
        """SHA-256 of the shards' SHA-256s in manifest order: names these weights. Results are
        cached under it (:func:`ffl.experiment.run_experiment`), so a zoo trained again under the
        same spec (on other data, on another machine) is never given the old zoo's results."""
        return hashlib.sha256(json.dumps([s["sha256"] for s in self.manifest["shards"]]).encode()).hexdigest()

    def __repr__(self) -> str:
        s = self.spec
        return f"Zoo({s.arch} on {s.dataset}: {len(s.tasks)} tasks × {s.runs} runs, root={str(self.root)!r})"

    def verify(self, workers: int | None = None) -> None:
        """Check every shard's SHA-256 against the manifest, ``workers`` files at a time (default:
        one per CPU; hashing releases the GIL)."""
        todo = [f for f in self._shards if f not in self._verified]
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            list(pool.map(self._check, todo))

    def _check(self, f: str) -> None:
        if f in self._verified:
            return
        s = self._shards[f]
        path = self.root / f
        if not path.is_file():
            raise ZooCorruptError(f"zoo shard missing: {path}")
        if path.stat().st_size != s["bytes"]:
            raise ZooCorruptError(f"zoo shard {path} has {path.stat().st_size} bytes, manifest says {s['bytes']}")
        if sha256_file(path) != s["sha256"]:
            raise ZooCorruptError(f"zoo shard {path} does not match its SHA-256 in the manifest (tampered or corrupt)")
        self._verified.add(f)

    def _shard(self, f: str) -> dict[str, torch.Tensor]:
        if f in self._cache:
            self._cache.move_to_end(f)
            return self._cache[f]
        self._check(f)
        try:
            tensors = load_file(str(self.root / f))
        except Exception as e:  # noqa: BLE001 - any parse failure names the file
            raise ZooCorruptError(f"zoo shard {self.root / f} cannot be read: {e}") from e
        self._cache[f] = tensors
        while len(self._cache) > self._cache_n:
            self._cache.popitem(last=False)
        return tensors

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Network i's ``state_dict`` (CPU tensors, model key names)."""
        net = self.manifest["networks"][i]
        tensors = self._shard(net["shard"])
        return {k: v[net["row"]].clone() for k, v in tensors.items()}

    def model(self, i: int) -> nn.Module:
        """Network i as an ``nn.Module`` in eval mode on CPU."""
        net = self.manifest["networks"][i]
        m = build_model(self.spec.arch, net["num_classes"], **self.manifest["build_kwargs"])
        m.load_state_dict(self.state_dict(i))
        return m.eval()

    def models(self, indices: Sequence[int] | None = None):
        """Iterate over networks as modules (shard-cached, so sequential access is cheap)."""
        for i in range(len(self)) if indices is None else indices:
            yield self.model(int(i))

    def stacked(self, indices: Sequence[int] | None = None, workers: int | None = None) -> dict[str, torch.Tensor]:
        """State dicts of several networks stacked along a new first dimension. Rows are read from
        each shard file as slices (its SHA-256 checked as for :meth:`state_dict`), not through the
        shard cache: streaming a zoo holds only the rows asked for. Shard files are read by
        ``workers`` threads at once (default: up to 8; each fills its own rows)."""
        idx = list(range(len(self))) if indices is None else [int(i) for i in indices]
        nets = [self.manifest["networks"][i] for i in idx]
        groups, start = [], 0
        for f, group in itertools.groupby(nets, key=lambda n: n["shard"]):
            rows = [n["row"] for n in group]
            groups.append((f, rows, start))
            start += len(rows)
        if not groups:
            return {}
        out = self._empty_rows(groups[0][0], len(idx))
        workers = workers or min(8, os.cpu_count() or 1, len(groups))
        if workers <= 1:
            for group in groups:
                self._read_rows(*group, out)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ffl-zoo-read") as pool:
                for done in [pool.submit(self._read_rows, *group, out) for group in groups]:
                    done.result()
        return out

    def _empty_rows(self, f: str, n: int) -> dict[str, torch.Tensor]:
        """Uninitialized (n, *shape) tensors for the tensors of shard ``f`` (every shard has the same)."""
        path = self.root / f
        try:
            with safe_open(str(path), framework="pt") as shard:
                heads = {k: shard.get_slice(k)[0:0] for k in shard.keys()}  # no rows: shape and dtype only
        except Exception as e:  # noqa: BLE001 - any parse failure names the file
            raise ZooCorruptError(f"zoo shard {path} cannot be read: {e}") from e
        return {k: torch.empty(n, *h.shape[1:], dtype=h.dtype) for k, h in heads.items()}

    def _read_rows(self, f: str, rows: list[int], start: int, out: dict[str, torch.Tensor]) -> None:
        """Rows ``rows`` of shard ``f`` into ``out[k][start:start + len(rows)]``."""
        self._check(f)
        try:
            with safe_open(str(self.root / f), framework="pt") as shard:
                for k in shard.keys():
                    part = shard.get_slice(k)
                    if rows == list(range(rows[0], rows[0] + len(rows))):  # consecutive: one slice
                        v = part[rows[0] : rows[0] + len(rows)]
                    else:
                        v = part[min(rows) : max(rows) + 1][torch.tensor(rows) - min(rows)]
                    out[k][start : start + len(rows)] = v
        except Exception as e:  # noqa: BLE001 - any parse failure names the file
            raise ZooCorruptError(f"zoo shard {self.root / f} cannot be read: {e}") from e


# --------------------------------------------------------------------------------------------
# Files and their checks
# --------------------------------------------------------------------------------------------


def _read_sidecar(root: Path, piece: Piece) -> dict[str, Any] | None:
    """The sidecar of a finished shard, if it and its shard are intact (else None)."""
    side = root / "shards" / f"{piece.name}.json"
    shard = root / "shards" / f"{piece.name}.safetensors"
    if not side.is_file() or not shard.is_file():
        return None
    try:
        meta = read_record(side, _SIDECAR_FIELDS)
    except ZooCorruptError as e:
        warnings.warn(f"{e}; its shard will be retrained", stacklevel=3)
        return None
    if shard.stat().st_size != meta.get("bytes") or sha256_file(shard) != meta.get("sha256"):
        warnings.warn(f"shard {shard} does not match its sidecar; it will be retrained", stacklevel=3)
        return None
    return meta


def read_record(path: Path, fields: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """A zoo's JSON file (``spec.json``, a manifest, a sidecar): an object with ``fields`` (name ->
    type); else :class:`ZooCorruptError` naming the file and what is wrong."""
    try:
        record = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ZooCorruptError(f"{path} is not valid JSON ({e}): truncated or damaged") from None
    wrong = [name for name, kind in fields.items()
             if not isinstance(record, dict) or not isinstance(record.get(name), kind)]
    if wrong:
        raise ZooCorruptError(f"{path} is not a zoo's {Path(path).name}: " + (
            f"{', '.join(wrong)} missing or of the wrong type" if isinstance(record, dict)
            else f"expected a JSON object, got {type(record).__name__}") + " (edited, or written by something else)")
    return record


_SPEC_FIELDS = {"spec": dict, "batch_networks": int}
_MANIFEST_FIELDS = {"format": str, "spec": dict, "batch_networks": int, "networks": list, "shards": list,
                    "build_kwargs": dict}
_SIDECAR_FIELDS = {"file": str, "bytes": int, "sha256": str, "task": int, "r0": int, "r1": int, "networks": list,
                   "build_kwargs": dict}


def _check_root(root: Path) -> None:
    as_folder("zoo root", root)



def _stored_chunk_size(root: Path, spec: ZooSpec, batch_networks: int | None, *, stacklevel: int = 3) -> int | None:
    """Validate ``root/spec.json`` against ``spec`` if it exists and return its chunk size (``None``:
    no ``spec.json`` yet); a ``batch_networks`` other than the stored one is warned about
    (``stacklevel`` counted from here)."""
    spath = root / "spec.json"
    if not spath.is_file():
        return None
    stored = read_record(spath, _SPEC_FIELDS)
    _check_same_spec(root, stored["spec"], spec)
    stored_k = int(stored["batch_networks"])
    if batch_networks is not None and batch_networks != stored_k:
        warnings.warn(f"zoo at {root} was started with batch_networks={stored_k}; using that "
                      f"(not {batch_networks}) so resumed chunks match", stacklevel=stacklevel)
    return stored_k


def _check_same_spec(root: Path, stored: dict[str, Any], spec: ZooSpec) -> None:
    """``ValueError`` listing the differing fields unless the spec identity recorded at ``root`` is ``spec``'s."""
    diff = spec_diff(stored, spec.identity())
    if diff:
        raise ValueError(f"a different zoo exists at {root}; differing fields:\n  " + "\n  ".join(diff)
                         + "\nUse another root (or delete it) to train this spec.")


def _write_spec(root: Path, spec: ZooSpec, k: int) -> None:
    write_json_atomic(root / "spec.json", {"format": FORMAT, "format_version": FORMAT_VERSION,
                                            "spec": spec.identity(), "batch_networks": k,
                                            "spec_sha256": spec_sha256(spec.identity())})



def expected_networks(spec: ZooSpec, k: int) -> list[dict[str, Any]]:
    """Each network's identity as the spec and the chunk size ``k`` determine it, in zoo order:
    task, run, seeds, shard file and row."""
    return [net for chunk in chunks(spec, k) for p in chunk for net in _piece_networks(spec, p)]


def _piece_networks(spec: ZooSpec, p: Piece) -> list[dict[str, Any]]:
    return [{"task": p.task, "run": r, "seed": run_seed(spec.seed, p.task, r),
             "data_seed": data_seed(spec.seed, p.task, r), "shard": f"shards/{p.name}.safetensors", "row": r - p.r0}
            for r in range(p.r0, p.r1)]


def _check_piece(root: Path, spec: ZooSpec, piece: Piece, meta: dict[str, Any]) -> None:
    """``ZooCorruptError`` unless a finished shard's sidecar records the networks its name stands
    for (a shard renamed onto another's name is found before anything trains)."""
    side = root / "shards" / f"{piece.name}.json"
    nets = meta.get("networks")
    want = _piece_networks(spec, piece)
    if not isinstance(nets, list) or len(nets) != len(want) or any(
            not isinstance(n, dict) or any(n.get(k) != v for k, v in w.items()) for n, w in zip(nets, want)):
        held = sorted({(n.get("task"), n.get("run")) for n in nets if isinstance(n, dict)} if isinstance(nets, list)
                      else [])
        raise ZooCorruptError(
            f"{side} records other networks than its name says (task {piece.task}, runs {piece.r0}-{piece.r1 - 1}): "
            f"(task, run) {held[:4]}{' …' if len(held) > 4 else ''}; renamed or copied from another place? "
            f"Delete it and its .safetensors to train them again")


def check_networks(networks: Sequence[dict[str, Any]], spec: ZooSpec, k: int, where: Path) -> None:
    """``ZooCorruptError`` unless ``networks`` (manifest or sidecar records) are exactly the
    networks of ``spec`` (count, order, task, run, seeds, shard, row)."""
    expected = expected_networks(spec, k)
    if len(networks) != len(expected):
        raise ZooCorruptError(f"{where} lists {len(networks)} networks; its spec ({len(spec.tasks)} tasks × "
                              f"{spec.runs} runs) has {len(expected)} (cut or padded)")
    for i, (got, want) in enumerate(zip(networks, expected)):
        bad = [f"{key} {got.get(key)!r} (expected {value!r})" for key, value in want.items() if got.get(key) != value]
        if bad:
            raise ZooCorruptError(f"{where}: network {i} does not match its spec: " + ", ".join(bad))


def _check_shards_belong(root: Path, spec: ZooSpec, spec_json_existed: bool) -> None:
    """Refuse shards in ``root`` that another spec made (their sidecars record its hash), and
    shards without a recorded spec when ``spec.json`` is gone (nothing vouches for them)."""
    ours = spec_sha256(spec.identity())
    for side in sorted((root / "shards").glob("*.json")) if (root / "shards").is_dir() else []:
        try:
            theirs = json.loads(side.read_text()).get("spec_sha256")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue  # unreadable: retrained like any torn shard
        if theirs is not None and theirs != ours:
            raise ValueError(f"{side} belongs to another zoo (spec hash {theirs[:12]}…, this spec {ours[:12]}…); "
                             f"use another root (or delete {root}) to train this spec")
        if theirs is None and not spec_json_existed:
            raise ValueError(f"{root} has shards but no spec.json, and {side} does not record its spec, so "
                             "nothing says they belong to this spec; restore spec.json or delete the folder")


def _finalize(root: Path, spec: ZooSpec, k: int) -> bool:
    """Write manifest.json if every shard is present; return whether the zoo is complete."""
    metas, sides = [], []
    for chunk in chunks(spec, k):
        for p in chunk:
            side = root / "shards" / f"{p.name}.json"
            if not side.is_file():
                return False
            metas.append(read_record(side, _SIDECAR_FIELDS))
            sides.append(side)
    networks, shards = [], []
    ours = spec_sha256(spec.identity())
    for meta, side in zip(metas, sides):
        if meta.get("spec_sha256", ours) != ours:
            raise ZooCorruptError(f"{side} belongs to another spec (hash {meta['spec_sha256'][:12]}…)")
        shards.append({"file": meta["file"], "bytes": meta["bytes"], "sha256": meta["sha256"],
                       "task": meta["task"], "runs": [meta["r0"], meta["r1"]],
                       **({"data_sha256": meta["data_sha256"]} if "data_sha256" in meta else {})})
        networks.extend(meta["networks"])
    check_networks(networks, spec, k, root / "shards")
    for i, n in enumerate(networks):
        n["index"] = i
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
        "spec": spec.identity(), "arch": spec.arch, "build_kwargs": metas[0]["build_kwargs"],
        "hyperparameters": dataclasses.asdict(spec.train_config()), "batch_networks": k,
        "num_networks": len(networks), "networks": networks, "shards": shards, "spec_sha256": ours,
    }
    write_json_atomic(root / "manifest.json", manifest)
    return True


def write_piece(root: Path, spec: ZooSpec, piece: Piece, state: dict[str, torch.Tensor], rows: slice,
                nets: list[dict[str, Any]], build_kwargs: dict[str, Any], data_sha256: str | None = None) -> None:
    """One shard of ``root``: rows ``rows`` of the stacked ``state`` for ``piece``'s networks
    (records ``nets``), with its sidecar bound to ``spec`` (atomic, the sidecar last); ``data_sha256``:
    the digest of the task's data they were trained on (:meth:`TaskData.sha256`)."""
    spec_hash = spec_sha256(spec.identity())
    tensors = {name: t[rows].contiguous() for name, t in state.items()}
    data = save(tensors, metadata={"format": "pt"})
    fname = f"shards/{piece.name}.safetensors"
    write_bytes_atomic(root / fname, data)
    meta = {"file": fname, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "task": piece.task, "r0": piece.r0, "r1": piece.r1, "build_kwargs": build_kwargs,
            "networks": nets, "spec_sha256": spec_hash}
    if data_sha256 is not None:
        meta["data_sha256"] = data_sha256
    write_json_atomic(root / "shards" / f"{piece.name}.json", meta)


def finalize_zoo(root: str | os.PathLike) -> Zoo | None:
    """Write ``root/manifest.json`` once every shard of the zoo in ``root`` exists and return the
    zoo; ``None`` while shards are missing."""
    root = Path(root)
    stored = read_record(root / "spec.json", _SPEC_FIELDS)
    return Zoo.load(root) if _finalize(root, ZooSpec.from_dict(stored["spec"]), int(stored["batch_networks"])) else None


def merge_zoos(parts: Sequence[str | os.PathLike], out: str | os.PathLike) -> Zoo:
    """Merge zoo directories trained with ``shard=(rank, world)`` (same spec, same chunking) into
    ``out``; the result is byte-identical to a single-process run. Missing shards → error."""
    parts = [Path(p) for p in parts]
    out = Path(out)
    _check_root(out)
    specs = [read_record(p / "spec.json", _SPEC_FIELDS) for p in parts]
    for p, s in zip(parts[1:], specs[1:]):
        diff = spec_diff(specs[0]["spec"], s["spec"])
        if diff or s["batch_networks"] != specs[0]["batch_networks"]:
            raise ValueError(f"cannot merge {parts[0]} and {p}: different specs/chunking: {diff}")
    spec = ZooSpec.from_dict(specs[0]["spec"])
    k = int(specs[0]["batch_networks"])
    _stored_chunk_size(out, spec, k)  # validates an existing spec.json
    # where each shard comes from, all checked before anything is copied
    for folder in [*parts, out]:
        _check_shards_belong(folder, spec, True)
    sources, missing = {}, []
    for piece in (p for chunk in chunks(spec, k) for p in chunk):
        src, meta = next(((p, m) for p in [*parts, out] if (m := _read_sidecar(p, piece)) is not None), (None, None))
        if src is None:
            missing.append(piece.name)
            continue
        _check_piece(src, spec, piece, meta)
        sources[piece] = src
    if missing:
        raise FileNotFoundError(f"cannot merge: shards missing from every part: {missing[:10]}"
                                + (" …" if len(missing) > 10 else "") + f"; nothing was written to {out}")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    if not (out / "spec.json").is_file():
        write_json_atomic(out / "spec.json", specs[0])
    for piece, src in sources.items():
        if src.resolve() != out.resolve():
            for ext in (".safetensors", ".json"):
                with atomic_path(out / "shards" / f"{piece.name}{ext}") as staged:
                    shutil.copyfile(src / "shards" / f"{piece.name}{ext}", staged)
    if not _finalize(out, spec, k):
        raise RuntimeError("merge incomplete")
    return Zoo.load(out)


def read_provenance(root: str | os.PathLike) -> dict[str, Any] | None:
    """The zoo's ``provenance.json`` (device, hardware, ``seconds`` of its last training run,
    ``networks_trained``, ``batch_networks``), or ``None`` where there is none or it cannot be read."""
    try:
        record = json.loads((Path(root) / "provenance.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def default_cache_dir() -> Path:
    """``$FFL_CACHE`` (set but empty: unset) or ``./cache``: where zoos and results land."""
    return env_folder("FFL_CACHE", "cache").resolve()


def cached_zoo_root(spec: ZooSpec, cache: str | os.PathLike | None = None) -> Path:
    """Where the chapters keep the zoo of ``spec`` under ``cache`` (default :func:`default_cache_dir`):
    ``zoos/<arch>-<dataset>-<hash of the spec's identity>``, so where the data lives does not
    change it. ``python -m ffl.zoo train`` without ``--root`` trains there."""
    key = spec_sha256(spec.identity())[:16]
    return Path(cache if cache is not None else default_cache_dir()) / "zoos" / f"{spec.arch}-{spec.dataset}-{key}"
