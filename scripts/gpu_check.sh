#!/usr/bin/env bash
# One prepared GPU check of the zoo engine (issue: "the zoo engine"), for a single H100 session.
#
#   bash scripts/gpu_check.sh            # results in $OUT (the device runner's folder) or ./gpu_results
#
# Installs nothing from the network: uses the python/torch already on the machine and this
# checkout via PYTHONPATH (no `pip install` needed). Every stage has its own timeout so the whole
# script stays under ~8 minutes; each stage writes its JSON to $OUT as soon as it finishes, so a
# cut-off run still returns what it measured. Stages:
#   1. environment (GPU, torch, CUDA)
#   2. equivalence on CUDA: batched engine vs plain loop, MLP-4 and PlainNet-5 (tiny sizes)
#   3. python -m ffl.bench zoo --device cuda   (ratios vs loop / GEMM, networks/s)
#   4. CIFAR-100-scale zoo timing at the paper's epochs: 5,000 MLP-4 (FP32, then TF32 matmuls)
#      and 5,000 PlainNet-5 (cuDNN's default TF32 convolutions). Real CIFAR-100 if it is under
#      $FFL_DATA_ROOT, else synthetic tasks of the same shapes (1,000 train / 200 test 3x32x32
#      images per task) -- the output says which. Each arch has a time budget; what does not fit
#      is extrapolated from the measured chunks / step rate, labeled as such in the JSON.
#      PlainNet-5 once more with the opt-in bf16 autocast + channels-last (changes rounding).
#   5. train_zoo end to end on CUDA (small zoo: train, save, load, verify).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${1:-gpu_results}}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
DATA_ROOT="${FFL_DATA_ROOT:-}"
ts() { date -u +%H:%M:%S; }
log() { echo "[$(ts)] $*"; }
T0=$(date +%s)

log "1/5 environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
"$PY" - <<'PY' 2>&1 | tee "$OUT/env.json"
import json, os, sys, torch
print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "cpus": os.cpu_count()}))
PY

log "2/5 equivalence on CUDA (batched engine == plain loop)"
timeout 60 "$PY" - <<'PY' 2>&1 | tee "$OUT/equivalence.txt"
import json, torch
from types import SimpleNamespace
from ffl.engine import NetworkData, TrainConfig, train_batched, train_loop
from ffl.models import build_model
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
g = torch.Generator().manual_seed(0)
tasks = [SimpleNamespace(x_train=torch.randn(96, 3, 32, 32, generator=g), y_train=torch.randint(0, 2, (96,), generator=g),
                         x_test=torch.randn(32, 3, 32, 32, generator=g), y_test=torch.randint(0, 2, (32,), generator=g)) for _ in range(2)]
data = NetworkData.from_tasks(tasks, "cuda")
out = {}
for arch, kw, aug in [("mlp", {"hidden": (64, 64, 64)}, False), ("cnn", {"widths": (8, 16, 32, 64)}, True), ("resnet5", {"widths": (8, 16, 32, 64)}, True)]:
    def models():
        ms = []
        for s in range(4):
            torch.manual_seed(s)
            ms.append(build_model(arch, 2, **kw))
        return ms
    cfg = TrainConfig(lr=0.05, epochs=3, lr_step_epochs=[2], batch_size=32, augment=aug)
    a = train_batched(models(), data, [0, 1, 0, 1], [7, 8, 9, 10], cfg, device="cuda")
    b = train_loop(models(), data, [0, 1, 0, 1], [7, 8, 9, 10], cfg, device="cuda")
    diff = max(float((a.state[k].double() - b.state[k].double()).abs().max()) for k in a.state if a.state[k].is_floating_point())
    out[arch] = {"max_abs_weight_diff": diff, "steps": a.steps, "test_acc_batched": a.test_acc, "test_acc_loop": b.test_acc}
    print(f"{arch}: max |w_batched - w_loop| = {diff:.2e} after {a.steps} steps", flush=True)
print(json.dumps(out))
PY
tail -1 "$OUT/equivalence.txt" > "$OUT/equivalence.json"

log "3/5 python -m ffl.bench zoo --device cuda"
timeout 120 "$PY" -m ffl.bench zoo --device cuda 2>&1 | tee "$OUT/bench_cuda.txt"
tail -1 "$OUT/bench_cuda.txt" > "$OUT/bench_cuda.json"

log "4/5 CIFAR-100-scale zoos at paper epochs (5,000 networks each)"
DR=(); [ -n "$DATA_ROOT" ] && DR=(--data-root "$DATA_ROOT")
log "  MLP-4, FP32 matmuls, 100 epochs"
timeout 110 "$PY" -m ffl.bench zoo-time --device cuda --arch mlp --budget-s 70 "${DR[@]}" 2>&1 | tee "$OUT/zoo_mlp_fp32.txt"
tail -1 "$OUT/zoo_mlp_fp32.txt" > "$OUT/zoo_mlp_fp32.json"
log "  MLP-4, TF32 matmuls, 100 epochs"
timeout 75 "$PY" -m ffl.bench zoo-time --device cuda --arch mlp --tf32 --budget-s 40 "${DR[@]}" 2>&1 | tee "$OUT/zoo_mlp_tf32.txt"
tail -1 "$OUT/zoo_mlp_tf32.txt" > "$OUT/zoo_mlp_tf32.json"
log "  PlainNet-5, 50 epochs, crop+flip (cuDNN default: TF32 convolutions)"
timeout 120 "$PY" -m ffl.bench zoo-time --device cuda --arch cnn --budget-s 80 "${DR[@]}" 2>&1 | tee "$OUT/zoo_cnn.txt"
tail -1 "$OUT/zoo_cnn.txt" > "$OUT/zoo_cnn.json"

log "  PlainNet-5 again with opt-in bf16 autocast + channels-last (changes rounding; for comparison)"
timeout 75 "$PY" -m ffl.bench zoo-time --device cuda --arch cnn --autocast bf16 --channels-last --budget-s 40 "${DR[@]}" 2>&1 | tee "$OUT/zoo_cnn_bf16_cl.txt"
tail -1 "$OUT/zoo_cnn_bf16_cl.txt" > "$OUT/zoo_cnn_bf16_cl.json"

log "5/5 train_zoo end to end on CUDA"
timeout 45 "$PY" - "$OUT" <<'PY' 2>&1 | tee "$OUT/train_zoo_cuda.txt"
import json, sys, tempfile, time
from ffl.zoo import ZooSpec, Zoo, train_zoo
spec = ZooSpec(arch="cnn", dataset="synthetic", tasks=[0, 1, 2], runs=8, epochs=3, lr_step_epochs=[2], augment=True,
               data_kwargs={"n_train": 256, "n_test": 128})
with tempfile.TemporaryDirectory() as d:
    t = time.time()
    zoo = train_zoo(spec, d, device="cuda", progress=False)
    dt = time.time() - t
    z2 = Zoo.load(d, verify="full")
    print(json.dumps({"networks": len(zoo), "seconds": dt, "mean_test_acc": float(zoo.accuracy["test"].mean()),
                      "batch_networks": zoo.manifest["batch_networks"], "reloaded": len(z2)}))
PY
tail -1 "$OUT/train_zoo_cuda.txt" > "$OUT/train_zoo_cuda.json"

"$PY" - "$OUT" <<'PY' 2>&1 | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text().strip().splitlines()[-1])
    except Exception as e:
        return {"error": repr(e)[:200]}
s = {"env": load("env.json"), "bench": load("bench_cuda.json")}
for k in ("zoo_mlp_fp32", "zoo_mlp_tf32", "zoo_cnn", "zoo_cnn_bf16_cl"):
    z = load(k + ".json")
    s[k] = {x: z.get(x) for x in ("projected_zoo_s", "nets_per_s", "networks_timed", "seconds_timed", "measured_fully",
                                  "extrapolated_from_partial_chunk", "batch_networks", "data", "tf32_matmul", "tf32_cudnn",
                                  "autocast", "channels_last", "error")}
try:
    s["zoos_together_s_fp32_mlp"] = s["zoo_mlp_fp32"]["projected_zoo_s"] + s["zoo_cnn"]["projected_zoo_s"]
    s["zoos_together_s_tf32_mlp"] = s["zoo_mlp_tf32"]["projected_zoo_s"] + s["zoo_cnn"]["projected_zoo_s"]
except Exception:
    pass
(out / "summary.json").write_text(json.dumps(s, indent=1))
print(json.dumps(s, indent=1))
PY
log "done in $(( $(date +%s) - T0 )) s; results in $OUT"
