"""Zoo storage (§4): train/load/resume, spec mismatch, corruption, kill-and-resume, sharding."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffl.zoo import (Zoo, ZooCorruptError, ZooSpec, chunks, data_seed, merge_zoos, run_seed,
                     spec_from_profile, spec_sha256, train_zoo)

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_spec(**kw) -> ZooSpec:
    base = dict(arch="mlp", dataset="synthetic", tasks=[0, 1, 2], runs=3,
                model_kwargs={"hidden": [8, 8]}, epochs=2, lr=0.05, lr_step_epochs=[1], batch_size=64,
                momentum=0.9, weight_decay=1e-4,
                data_kwargs={"n_train": 96, "n_test": 32})
    base.update(kw)
    return ZooSpec.from_dict(base)


def shard_bytes(root: Path) -> dict[str, bytes]:
    files = sorted((root / "shards").glob("*")) + [root / "manifest.json"]
    return {f.name: f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo") / "z"
    train_zoo(tiny_spec(), root, progress=False, batch_networks=4)
    return root


def test_api(zoo_dir):
    zoo = Zoo.load(zoo_dir)
    spec = tiny_spec()
    assert len(zoo) == 9 and zoo.spec.identity() == spec.identity()
    assert zoo.tasks.dtype == torch.int64 and zoo.tasks.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert zoo.runs.tolist() == [0, 1, 2] * 3
    assert zoo.accuracy["test"].shape == (9,) and zoo.accuracy["train"].shape == (9,)
    assert (zoo.accuracy["train"] > 0.5).float().mean() > 0.5  # they learned something
    m = zoo.model(4)
    assert not m.training and next(m.parameters()).device.type == "cpu"
    sd = zoo.state_dict(4)
    assert set(sd) == set(m.state_dict())
    seeds = zoo.seeds.tolist()
    assert len(set(seeds)) == 9 and seeds[4] == run_seed(0, 1, 1)
    assert run_seed(0, 1, 1) != run_seed(0, 1, 2) != run_seed(1, 1, 1)
    assert data_seed(0, 1, 1) != run_seed(0, 1, 1)
    man = zoo.manifest
    assert man["library_version"] and man["hyperparameters"]["lr"] == 0.05
    assert all(s["sha256"] and s["bytes"] > 0 for s in man["shards"])


@pytest.mark.parametrize("workers", [1, 3])  # one reader, or threads each filling their rows
@pytest.mark.parametrize("nets", [[0, 1, 2, 3, 4, 5, 6, 7, 8], [8, 2, 5, 3], [4], [0, 4, 1, 8, 2]])  # across shards, scattered, a shard twice
def test_stacked_equals_each_state_dict(zoo_dir, nets, workers):
    zoo = Zoo.load(zoo_dir)
    stacked = zoo.stacked(nets, workers=workers)
    assert all(t.shape[0] == len(nets) for t in stacked.values())
    for row, i in enumerate(nets):
        for k, v in zoo.state_dict(i).items():
            assert torch.equal(stacked[k][row], v), (i, k)
    assert len(zoo.manifest["shards"]) > 1


def test_init_matches_build_model_seed():
    """Network i starts from build_model under torch.manual_seed(run_seed): checked on the initial
    weights train_zoo hands to the engine (a zoo of 0 epochs is refused, so not through one)."""
    from ffl.engine import init_stacked
    from ffl.models import build_model
    from ffl.zoo import chunk_inputs
    from ffl.zoo.train import _load_tasks

    spec = tiny_spec()
    chunk = chunks(spec, 9)[0]
    inp = chunk_inputs(spec, chunk, _load_tasks(spec, spec.tasks), "cpu")
    stacked = init_stacked(inp.build, inp.seeds)
    torch.manual_seed(run_seed(0, 2, 1))
    ref = build_model("mlp", 2, in_features=3072, hidden=[8, 8])
    for k, v in ref.state_dict().items():
        assert torch.equal(v, stacked[k][7])


def test_cached_and_spec_mismatch(zoo_dir):
    before = shard_bytes(zoo_dir)
    zoo = train_zoo(tiny_spec(), zoo_dir, progress=False)  # loads, no retraining
    assert len(zoo) == 9 and shard_bytes(zoo_dir) == before
    # data_root does not change the zoo
    train_zoo(tiny_spec(data_root="/elsewhere"), zoo_dir, progress=False)
    with pytest.raises(ValueError, match=r"lr: existing 0.05, asked 0.2"):
        train_zoo(tiny_spec(lr=0.2), zoo_dir, progress=False)
    with pytest.raises(ValueError, match="unknown ZooSpec fields"):
        ZooSpec.from_dict({"arch": "mlp", "learning_rate": 1})


def test_precision_is_part_of_the_zoo(zoo_dir, tmp_path):
    """A bf16 zoo is another zoo; fp32 (the default) leaves the identity of earlier zoos as it was;
    TF32 asked on a CPU fails before anything is written."""
    assert "precision" not in tiny_spec().identity()
    assert tiny_spec(precision="bf16").identity()["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision: existing 'fp32', asked 'bf16'"):
        train_zoo(tiny_spec(precision="bf16"), zoo_dir, progress=False)
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        tiny_spec(precision="half")
    with pytest.raises(ValueError, match="'tf32' exists on CUDA GPUs only"):
        train_zoo(tiny_spec(precision="tf32"), tmp_path / "t", progress=False)
    assert not (tmp_path / "t").exists()
    # a finished TF32 zoo (trained on a GPU) still loads on a CPU
    import shutil

    shutil.copytree(zoo_dir, tmp_path / "tf32")
    man = json.loads((tmp_path / "tf32" / "manifest.json").read_text())
    man["spec"]["precision"] = "tf32"
    man["spec_sha256"] = spec_sha256(man["spec"])  # as a zoo trained in TF32 records it
    (tmp_path / "tf32" / "manifest.json").write_text(json.dumps(man))
    assert len(train_zoo(tiny_spec(precision="tf32"), tmp_path / "tf32", progress=False)) == 9


def test_partial_zoo_spec_mismatch(tmp_path):
    root = tmp_path / "z"
    (root).mkdir()
    spec = tiny_spec()
    (root / "spec.json").write_text(json.dumps({"spec": tiny_spec(runs=5).identity(), "batch_networks": 4}))
    with pytest.raises(ValueError, match="runs: existing 5, asked 3"):
        train_zoo(spec, root, progress=False)


def test_truncated_and_tampered(zoo_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(zoo_dir, bad)
    shard = sorted((bad / "shards").glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ZooCorruptError, match=shard.name):
        Zoo.load(bad)
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    zoo = Zoo.load(bad)  # sizes agree; the hash is checked when the shard is read
    with pytest.raises(ZooCorruptError, match=shard.name):
        for i in range(len(zoo)):
            zoo.state_dict(i)
    with pytest.raises(ZooCorruptError, match=shard.name):
        Zoo.load(bad, verify="full")


def test_chunks_cover_once():
    spec = tiny_spec(tasks=[3, 5, 7], runs=5)
    seen = [(p.task, r) for c in chunks(spec, 4) for p in c for r in range(p.r0, p.r1)]
    assert seen == [(t, r) for t in [3, 5, 7] for r in range(5)]
    assert all(sum(p.r1 - p.r0 for p in c) <= 4 for c in chunks(spec, 4))


def test_paper_presets():
    """The paper's settings come from profiles/paper.yaml, through the one profile → spec road."""
    def paper(arch, dataset, **kw):
        return spec_from_profile("paper", dataset, arch=arch, dataset=dataset, **kw)

    s = paper("cnn", "cifar100")
    assert (s.lr, s.momentum, s.weight_decay, s.batch_size, s.epochs, s.lr_step_epochs, s.augment) == \
        (0.1, 0.9, 0.0, 128, 50, [30], True)  # the official SGD: no weight decay
    assert len(s.tasks) == 50 and s.runs == 100
    m = paper("mlp", "cifar100")
    # paper's 100/70 epochs; the official loader's crop+flip and the official MLP's output ReLU
    assert (m.epochs, m.lr_step_epochs, m.augment, m.weight_decay) == (100, [70], True, 0.0)
    assert m.model_kwargs["output_relu"] is True
    g = paper("gru", "namedata")
    assert (g.batch_size, g.lr, g.steps, g.lr_step_steps) == (1, 0.1, 10_000, [7_000])
    a = paper("mlp", "cifar100", optimizer="adam", lr=1e-3)
    assert a.optimizer == "adam" and a.lr == 1e-3
    assert paper("resnet5", "cifar100").identity() == {**s.identity(), "arch": "resnet5"}
    with pytest.raises(ValueError, match="defines no 'gru' zoo for 'cifar100'"):
        paper("gru", "cifar100")


def _cli(args, env=None, **kw):
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ffl.zoo", *args], env=e, capture_output=True, text=True, **kw)


#: train_zoo in a process of its own; argv: spec (JSON), root, keywords (JSON), and the number of
#: chunks after which the process kills itself from ``after_chunk`` (os._exit(99): no cleanup, like
#: SIGKILL; 0: never)
TRAIN_IN_A_PROCESS = (
    "import json, os, sys; from ffl.zoo import ZooSpec, train_zoo; die = int(sys.argv[4]); "
    "train_zoo(ZooSpec.from_dict(json.loads(sys.argv[1])), sys.argv[2], progress=False, "
    "after_chunk=(lambda n: n >= die and os._exit(99)) if die else None, **json.loads(sys.argv[3]))")


def _train_in_a_process(spec: ZooSpec, root: Path, die_after_chunks: int = 0, **kw) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = [sys.executable, "-c", TRAIN_IN_A_PROCESS, json.dumps(spec.to_dict()), str(root), json.dumps(kw),
            str(die_after_chunks)]
    return subprocess.run(args, env=e, capture_output=True, text=True, timeout=300)


def test_kill_and_resume(zoo_dir, tmp_path):
    """A run killed (os._exit, no cleanup) after its first chunk resumes (from the command line)
    without retraining that chunk and ends with exactly the bytes of an uninterrupted run."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny_spec().to_dict()))
    root = tmp_path / "z"
    r = _train_in_a_process(tiny_spec(), root, die_after_chunks=1, batch_networks=4)
    assert r.returncode == 99, r.stderr
    assert not (root / "manifest.json").exists()
    first = sorted((root / "shards").glob("*.safetensors"))
    assert len(first) == 2  # chunk 0 = task 0 runs 0-2 + task 1 run 0
    mtimes = {f: f.stat().st_mtime_ns for f in first}
    with pytest.raises(FileNotFoundError, match="no complete zoo"):
        Zoo.load(root)
    r = _cli(["train", "--spec", str(spec_file), "--root", str(root), "--quiet"])
    assert r.returncode == 0, r.stderr
    assert {f: f.stat().st_mtime_ns for f in first} == mtimes  # not retrained
    assert shard_bytes(root) == shard_bytes(zoo_dir)


def test_resume_retrains_a_tampered_chunk_only(zoo_dir, tmp_path):
    """Resuming checks every finished shard against its sidecar (in parallel): a chunk with a
    tampered shard is retrained (with a warning naming the file), intact chunks are kept, and the
    zoo ends with the uninterrupted run's bytes."""
    import shutil

    root = tmp_path / "z"
    shutil.copytree(zoo_dir, root)
    (root / "manifest.json").unlink()  # a run that stopped before finalizing
    shards = sorted((root / "shards").glob("*.safetensors"))
    bad = shards[-1]
    bad.write_bytes(bad.read_bytes()[:-8] + b"tampered")
    kept = {f: f.stat().st_mtime_ns for f in shards[:2]}  # chunk 0 (batch_networks=4: two pieces)
    with pytest.warns(UserWarning, match=f"shard .*{bad.name} does not match its sidecar; it will be retrained"):
        train_zoo(tiny_spec(), root, progress=False)
    assert {f: f.stat().st_mtime_ns for f in kept} == kept
    assert shard_bytes(root) == shard_bytes(zoo_dir)


def test_merge_parts(zoo_dir, tmp_path):
    spec = tiny_spec()
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_zoo(spec, a, progress=False, shard=(0, 2), batch_networks=4) is None
    assert train_zoo(spec, b, progress=False, shard=(1, 2), batch_networks=4) is None
    zoo = merge_zoos([a, b], tmp_path / "merged")
    assert len(zoo) == 9
    assert shard_bytes(tmp_path / "merged") == shard_bytes(zoo_dir)


@pytest.mark.slow
def test_torchrun_two_ranks(zoo_dir, tmp_path):
    """``torchrun --nproc_per_node 2 -m ffl.zoo train`` (gloo, CPU) = the single-process zoo, bytewise."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny_spec().to_dict()))
    root = tmp_path / "z"
    torchrun = Path(sys.executable).with_name("torchrun")
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "ffl.zoo", "train",
                        "--spec", str(spec_file), "--root", str(root), "--quiet", "--batch-networks", "4"],
                       env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert shard_bytes(root) == shard_bytes(zoo_dir)
    assert len(Zoo.load(root)) == 9


@pytest.mark.slow
def test_sigkill_and_resume(tmp_path):
    """A real SIGKILL once the first shard has landed (no hook): resuming gives the bytes of an
    uninterrupted run with the same chunking, and no temporary file is left behind.

    The reference must use the same ``batch_networks``: the engine's fused SGD rounds an element
    differently depending on where it falls in the stacked tensor (vectorized body or scalar
    tail), so a zoo chunked 1 network at a time differs from one chunked 4 at a time in the last
    bit of some weights, for every architecture (this test once compared against the 4-chunk zoo
    and failed deterministically)."""
    import signal
    import time

    reference = train_zoo(tiny_spec(), tmp_path / "reference", progress=False, batch_networks=1)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny_spec().to_dict()))
    root = tmp_path / "z"
    e = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "ffl.zoo", "train", "--spec", str(spec_file), "--root", str(root),
                          "--quiet", "--batch-networks", "1"], env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not list((root / "shards").glob("*.json")):
        time.sleep(0.02)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()
    r = _cli(["train", "--spec", str(spec_file), "--root", str(root), "--quiet"])
    assert r.returncode == 0, r.stderr
    assert json.loads((root / "spec.json").read_text())["batch_networks"] == 1
    assert shard_bytes(root) == shard_bytes(reference.root)
    assert not [f for f in root.rglob("*") if ".tmp-" in f.name]


# --------------------------------------------------------------------------------------------
# Overlap: the next chunk's init and the finished chunk's writes run while a chunk trains
# --------------------------------------------------------------------------------------------


def shard_names(chunk_index: int, suffixes=(".json", ".safetensors")) -> list[str]:
    """File names of chunk ``chunk_index``'s shards in the tiny (and wide) zoo, chunked 4 at a time."""
    return sorted(p.name + s for p in chunks(tiny_spec(), 4)[chunk_index] for s in suffixes)


def wide_spec(**kw) -> ZooSpec:
    """Networks large enough (1.2M parameters) that a chunk of 4 is initialized by forked workers."""
    return tiny_spec(model_kwargs={"hidden": [400]}, **kw)


def zoo_files(root: Path) -> dict[str, bytes]:
    files = [*sorted((root / "shards").glob("*")), root / "manifest.json", root / "spec.json"]
    return {f.name: f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def wide_serial(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide") / "serial"
    train_zoo(wide_spec(), root, progress=False, batch_networks=4, overlap=False)
    return root


def test_overlap_writes_the_serial_bytes_while_the_next_chunk_trains(wide_serial, tmp_path, monkeypatch):
    """3 chunks (4 + 4 + 1 networks) trained with overlap on: the next chunk's init workers are
    forked before a chunk trains, chunk 0's shards are written on another thread while chunk 1
    trains (chunk 1's training waits for that write to happen), and every file has the bytes of
    the serial run."""
    import threading

    import ffl.zoo.train as zoo_module

    events, chunk0_written = [], threading.Event()
    real_write, real_train, real_start = zoo_module.write_piece, zoo_module.train_batched, zoo_module.start_init_stacked

    def write(root, spec, piece, *a, **kw):
        events.append(("write", piece.name, threading.current_thread() is threading.main_thread()))
        real_write(root, spec, piece, *a, **kw)
        if piece.name == chunks(spec, 4)[0][-1].name:
            chunk0_written.set()

    def train(*a, **kw):
        n = sum(e[0] == "train" for e in events)
        events.append(("train", n))
        if n == 1:
            assert chunk0_written.wait(60), "chunk 0's shards were not written while chunk 1 trained"
        return real_train(*a, **kw)

    def start(build, seeds, **kw):
        pending = real_start(build, seeds, **kw)
        events.append(("init ahead", len(seeds), len(pending.procs)))
        return pending

    monkeypatch.setattr(zoo_module, "write_piece", write)
    monkeypatch.setattr(zoo_module, "train_batched", train)
    monkeypatch.setattr(zoo_module, "start_init_stacked", start)
    root = tmp_path / "overlap"
    train_zoo(wide_spec(), root, progress=False, batch_networks=4, overlap=True)
    kinds = [e[:2] if e[0] != "write" else e[0] for e in events]
    assert kinds[:2] == [("init ahead", 4), ("train", 0)]  # chunk 1's init started before chunk 0 trains
    assert events[0][2] >= 2  # ... by forked workers
    assert ("init ahead", 1) in kinds and kinds.index(("init ahead", 1)) < kinds.index(("train", 1))
    writes = [e for e in events if e[0] == "write"]
    assert len(writes) == 5 and not any(main for *_, main in writes)
    assert zoo_files(root) == zoo_files(wide_serial)
    assert not [f for f in root.rglob("*") if ".tmp-" in f.name]


def test_overlap_on_by_default_only_on_cuda(tmp_path, monkeypatch):
    import ffl.zoo.train as zoo_module

    backgrounds = []
    real = zoo_module._ChunkWrites.__init__

    def init(self, background, **kw):
        backgrounds.append(background)
        real(self, background, **kw)

    monkeypatch.setattr(zoo_module._ChunkWrites, "__init__", init)
    train_zoo(tiny_spec(runs=1), tmp_path / "z", progress=False, batch_networks=2)
    assert backgrounds == [False]


@pytest.mark.parametrize("overlap", [False, True])
def test_after_chunk_is_called_once_each_chunk_is_on_disk(tmp_path, overlap):
    """``after_chunk(n)``: the number of chunks written so far, once their shards are durable."""
    root, seen = tmp_path / "z", []
    train_zoo(tiny_spec(runs=1), root, progress=False, batch_networks=2, overlap=overlap,
              after_chunk=lambda n: seen.append((n, len(list((root / "shards").glob("*.json"))))))
    assert seen == [(1, 2), (2, 3)]  # chunk 0: tasks 0 and 1 (two shards), chunk 1: task 2


def test_overlap_kill_and_resume(zoo_dir, tmp_path):
    """Killed (os._exit) once chunk 0's shards are durable, with chunk 1 already trained and
    chunk 2's init started: only chunk 0's shards exist, and resuming (overlap on again) ends with
    the bytes of the uninterrupted serial run."""
    root = tmp_path / "z"
    r = _train_in_a_process(tiny_spec(), root, die_after_chunks=1, batch_networks=4, overlap=True)
    assert r.returncode == 99, r.stderr
    first = sorted((root / "shards").glob("*"))
    assert [f.name for f in first] == shard_names(0)
    mtimes = {f: f.stat().st_mtime_ns for f in first}
    r = _train_in_a_process(tiny_spec(), root, batch_networks=4, overlap=True)
    assert r.returncode == 0, r.stderr
    assert {f: f.stat().st_mtime_ns for f in first} == mtimes  # not rewritten
    assert shard_bytes(root) == shard_bytes(zoo_dir)


def test_overlap_divergence_saves_the_earlier_chunks_only(tmp_path, monkeypatch):
    """Chunk 1 of 3 diverges (marked so) while chunk 0's shards are still being written (slowly)
    and chunk 2's init workers are still building (they would take a minute): when the error
    arrives, chunk 0's shards are complete, no writer thread is left, the workers are stopped,
    and nothing of chunk 1 or 2 exists."""
    import multiprocessing
    import threading
    import time

    import ffl.zoo.train as zoo_module
    from ffl.zoo import TrainingDivergedError
    from ffl.zoo.store import _read_sidecar

    real_train, real_write, real_start, calls = (zoo_module.train_batched, zoo_module.write_piece,
                                                 zoo_module.start_init_stacked, [])
    parent = os.getpid()

    def train(*a, **kw):
        res = real_train(*a, **kw)
        calls.append(1)
        if len(calls) == 2:
            res.diverged = [1]
        return res

    def write(*a, **kw):
        time.sleep(0.5)
        real_write(*a, **kw)

    def start(build, seeds, **kw):
        def stuck():
            if os.getpid() != parent and seeds[0] == run_seed(0, 2, 0):
                time.sleep(60)
            return build()
        return real_start(stuck, seeds, **kw)

    monkeypatch.setattr(zoo_module, "train_batched", train)
    monkeypatch.setattr(zoo_module, "write_piece", write)
    monkeypatch.setattr(zoo_module, "start_init_stacked", start)
    root, spec = tmp_path / "z", wide_spec(runs=4)
    t0 = time.time()
    with pytest.raises(TrainingDivergedError, match=r"1 of the 4 networks .*: task 1 run 1\."):
        train_zoo(spec, root, progress=False, batch_networks=4, overlap=True)
    assert time.time() - t0 < 30  # chunk 2's workers were stopped, not waited for
    assert not [t for t in threading.enumerate() if t.name.startswith("ffl-zoo-writes")]
    assert not multiprocessing.active_children()
    chunk0 = chunks(spec, 4)[0]
    assert sorted(f.name for f in (root / "shards").iterdir()) == sorted(p.name + s for p in chunk0
                                                                         for s in (".json", ".safetensors"))
    assert all(_read_sidecar(root, p) is not None for p in chunk0)  # complete: size and SHA-256 match


def test_overlap_write_error_propagates_and_leaves_no_shard(zoo_dir, tmp_path, monkeypatch):
    """A shard write that fails halfway on the writer thread: train_zoo raises its error, the
    shard is not there (not even in part), and a resumed run completes the serial bytes."""
    import ffl.files
    import ffl.zoo.store as store_module

    victim = shard_names(1, [".safetensors"])[0]  # chunk 1 = task 1 runs 1-2 + task 2 runs 0-1

    def failing(path, data):
        if Path(path).name == victim:
            with ffl.files.atomic_path(path) as staged:
                staged.write_bytes(data[: len(data) // 2])
                raise OSError("No space left on device (test)")
        ffl.files.write_bytes_atomic(path, data)

    monkeypatch.setattr(store_module, "write_bytes_atomic", failing)
    root = tmp_path / "z"
    with pytest.raises(OSError, match=r"No space left on device \(test\)"):
        train_zoo(tiny_spec(), root, progress=False, batch_networks=4, overlap=True)
    names = sorted(f.name for f in (root / "shards").iterdir())
    assert victim not in names and victim.replace(".safetensors", ".json") not in names
    assert set(shard_names(0)) <= set(names) and not (root / "manifest.json").exists()
    assert not [f for f in root.rglob("*") if ".tmp-" in f.name]
    monkeypatch.undo()
    train_zoo(tiny_spec(), root, progress=False, overlap=True)
    assert shard_bytes(root) == shard_bytes(zoo_dir)


def test_overlap_init_worker_error_propagates(wide_serial, tmp_path, monkeypatch):
    """An init worker of the next chunk fails (its model build raises for one seed): train_zoo
    raises with the worker's message, and chunk 0, trained before, is saved."""
    import ffl.zoo.train as zoo_module

    real_start = zoo_module.start_init_stacked
    bad_seed = run_seed(0, 1, 2)  # chunk 1, built by a worker (not the first network: the parent builds that)

    def start(build, seeds, **kw):
        def fragile():
            if torch.initial_seed() == bad_seed:
                raise ValueError(f"cannot build the network of seed {bad_seed} (test)")
            return build()
        return real_start(fragile, seeds, **kw)

    monkeypatch.setattr(zoo_module, "start_init_stacked", start)
    root = tmp_path / "z"
    message = rf"initialization workers failed .*ValueError: cannot build the network of seed {bad_seed} \(test\)"
    with pytest.raises(RuntimeError, match=message):
        train_zoo(wide_spec(), root, progress=False, batch_networks=4, overlap=True)
    assert sorted(f.name for f in (root / "shards").iterdir()) == shard_names(0)
    for name in shard_names(0):
        assert (root / "shards" / name).read_bytes() == (wide_serial / "shards" / name).read_bytes()


def test_progress_bar_ends_at_the_number_of_networks_exactly(tmp_path, monkeypatch):
    import warnings

    import ffl.zoo.train as zoo_module

    # Chunks of 585 at 400 steps each: fractional per-step advances summed in floats ended at
    # 5000.000000000115 and tqdm warned (the H100 run of the tiny ImageNet chapter showed it).
    progress = zoo_module._Progress(5000, True, "drift")
    for chunk, k in enumerate([585] * 8 + [320]):
        start = 585 * chunk
        for step in range(1, 401):
            progress.advance_to(start + k * step / 400)
    assert progress.bar.n == 5000
    progress.close()

    ends = []

    class Recording(zoo_module.tqdm):
        def close(self):
            ends.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(zoo_module, "tqdm", Recording)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_zoo(tiny_spec(runs=5), tmp_path / "z", progress=True, batch_networks=7)
    assert ends and set(ends) == {(15, 15)}  # tqdm may close a bar twice (close, then __del__)


# --------------------------------------------------------------------------------------------
# A zoo names the data it was trained on, and is never read as trained on other data
# --------------------------------------------------------------------------------------------

def _cifar10_copy(root: Path, shade: int) -> None:
    """A CIFAR-10 ``.npz`` copy under ``root`` in the real format (see tests/test_data.py), its images
    one colour per class shifted by ``shade``: two shades are two different copies of the data."""
    import io

    import numpy as np
    from PIL import Image

    from ffl.data import CIFAR10_NPZ

    arrays = {"classes": np.array([f"class{c}" for c in range(10)])}
    for split, n in (("train", 8), ("test", 4)):
        blobs = []
        for c in range(10):
            for k in range(n):
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), (20 * c + shade, 200 - 15 * c, 7 * k)).save(buf, format="JPEG")
                blobs.append(buf.getvalue())
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"{split}_labels"] = np.repeat(np.arange(10), n).astype(np.int16)
        arrays[f"{split}_files"] = np.array([f"class{c}/{k:04d}.jpg" for c in range(10) for k in range(n)])
    (root / CIFAR10_NPZ).parent.mkdir(parents=True, exist_ok=True)
    np.savez(root / CIFAR10_NPZ, **arrays)


def _cifar10_spec(data_root: Path) -> ZooSpec:
    return tiny_spec(dataset="cifar10", tasks=[0, 3], runs=2, epochs=1, lr_step_epochs=[],
                     data_kwargs={}, data_root=str(data_root))


def test_zoo_records_each_tasks_data_and_refuses_other_data(tmp_path):
    """Every shard (and the manifest) records the SHA-256 of its task's data, equal to the digest of
    the task loaded afresh; after the data changed, reading the finished zoo and resuming a partial
    one both stop with StaleDataError naming the tasks, and nothing is written."""
    import shutil

    from ffl.data import load_task
    from ffl.zoo import StaleDataError

    data_root, root = tmp_path / "data", tmp_path / "z"
    _cifar10_copy(data_root, shade=0)
    spec = _cifar10_spec(data_root)
    zoo = train_zoo(spec, root, progress=False, batch_networks=2)
    want = {t: load_task("cifar10", t, data_root=data_root).sha256() for t in (0, 3)}
    assert {s["task"]: s["data_sha256"] for s in zoo.manifest["shards"]} == want
    for side in (root / "shards").glob("*.json"):
        meta = json.loads(side.read_text())
        assert meta["data_sha256"] == want[meta["task"]]
    assert train_zoo(spec, root, progress=False).manifest == zoo.manifest  # same data: read as it is

    partial = tmp_path / "partial"
    shutil.copytree(root, partial)
    (partial / "manifest.json").unlink()
    sorted((partial / "shards").glob("*.safetensors"))[-1].unlink()  # task 3's chunk to retrain, task 0's kept
    _cifar10_copy(data_root, shade=9)  # another copy of the data under the same root
    for where in (root, partial):
        before = {p: p.read_bytes() for p in where.rglob("*") if p.is_file()}
        with pytest.raises(StaleDataError, match=rf"zoo at {where} was trained on other cifar10 data than "
                                                 rf"{data_root} holds now: task 0 \(trained on {want[0][:12]}…"):
            train_zoo(spec, where, progress=False)
        assert {p: p.read_bytes() for p in where.rglob("*") if p.is_file()} == before

    shutil.rmtree(data_root)  # no data at all: nothing to compare, the finished zoo is read
    assert train_zoo(spec, root, progress=False).manifest == zoo.manifest


def test_a_zoo_from_before_data_digests_is_read_as_it_is(tmp_path):
    """Zoos written before shards recorded their data (no ``data_sha256``) load and resume."""
    data_root, root = tmp_path / "data", tmp_path / "z"
    _cifar10_copy(data_root, shade=0)
    spec = _cifar10_spec(data_root)
    train_zoo(spec, root, progress=False, batch_networks=2)
    for side in (root / "shards").glob("*.json"):
        meta = json.loads(side.read_text())
        del meta["data_sha256"]
        side.write_text(json.dumps(meta))
    manifest = json.loads((root / "manifest.json").read_text())
    for s in manifest["shards"]:
        del s["data_sha256"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    _cifar10_copy(data_root, shade=9)
    assert len(train_zoo(spec, root, progress=False)) == 4


@pytest.mark.parametrize("arch, widths, batch_size, chunk", [
    ("cnn", [8, 16, 32, 64], 16, 64), ("cnn", [8, 16, 32, 64], 64, 64),  # the laptop zoos' chunks, any batch
    ("plainnet6", [8, 16, 32, 64, 64], 16, 64), ("resnet5", [8, 16, 32, 64], 16, 64),
    ("cnn", [16, 32, 64, 128], 16, 32), ("cnn", [32, 64, 128, 256], 128, 16)])
def test_cpu_chunks_of_convolutional_zoos_shrink_with_their_activations(arch, widths, batch_size, chunk):
    """On CPU a convolutional zoo's default chunk is the largest power of two up to 64 whose
    convolution outputs per image fit the budget; the count against PlainNet-5's by hand."""
    from ffl.zoo.train import CPU_CONV_CHUNK_FLOATS, conv_outputs_per_image, default_batch_networks
    spec = tiny_spec(arch=arch, model_kwargs={"widths": widths}, batch_size=batch_size, tasks=list(range(20)), runs=20)
    if arch == "cnn":  # conv l at 32 / 2^l pixels a side (pools after units 1-3)
        assert conv_outputs_per_image(spec) == sum(c * (32 >> l) ** 2 for l, c in enumerate(widths))
    assert default_batch_networks(spec, "cpu") == chunk
    assert conv_outputs_per_image(spec) * chunk <= CPU_CONV_CHUNK_FLOATS
    assert default_batch_networks(tiny_spec(), "cpu") == 9  # an MLP zoo: min(N, 64)
