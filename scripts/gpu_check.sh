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
#   2. equivalence on CUDA: batched engine vs plain loop, MLP, PlainNet-5, ResNet-5 (tiny sizes),
#      in fp32 and bf16
#   3. CIFAR-100-scale zoo timing at the paper's epochs (python -m ffl.bench zoo-time): 5,000
#      MLP-4 with TF32 matmuls, 5,000 PlainNet-5 in bf16, eager and through torch.compile. Real
#      CIFAR-100 if it is under $FFL_DATA_ROOT, else synthetic tasks of the same shapes (1,000
#      train / 200 test 3x32x32 images per task) -- the output says which. A few complete chunks
#      are timed; the zoo time is projected from the complete chunks after the first (whose
#      one-off cuDNN autotuning / compilation is added once), labeled as such in the JSON.
# scripts/gpu_probe.sh is the companion that shows where a step's time goes (kernel profiles,
# grouped vs dense convolution throughput).
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

log "1/3 environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
"$PY" - <<'PY' 2>&1 | tee "$OUT/env.json"
import json, os, sys, torch
print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "cpus": os.cpu_count()}))
PY

log "2/3 equivalence on CUDA (batched engine == plain loop)"
timeout 60 "$PY" - <<'PY' 2>&1 | tee "$OUT/equivalence.txt"
import json, torch
from types import SimpleNamespace
from ffl.engine import NetworkData, TrainConfig, train_batched, train_loop
from ffl.models import build_model
g = torch.Generator().manual_seed(0)
tasks = [SimpleNamespace(x_train=torch.randn(96, 3, 32, 32, generator=g), y_train=torch.randint(0, 2, (96,), generator=g),
                         x_test=torch.randn(32, 3, 32, 32, generator=g), y_test=torch.randint(0, 2, (32,), generator=g)) for _ in range(2)]
data = NetworkData.from_tasks(tasks, "cuda")
out = {}
for precision in ("fp32", "bf16"):
    for arch, kw, aug in [("mlp", {"hidden": (64, 64, 64)}, False), ("cnn", {"widths": (8, 16, 32, 64)}, True), ("resnet5", {"widths": (8, 16, 32, 64)}, True)]:
        def models():
            ms = []
            for s in range(4):
                torch.manual_seed(s)
                ms.append(build_model(arch, 2, **kw))
            return ms
        cfg = TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-4, epochs=3, lr_step_epochs=[2], batch_size=32,
                          augment=aug, precision=precision)
        a = train_batched(models(), data, [0, 1, 0, 1], [7, 8, 9, 10], cfg, device="cuda")
        b = train_loop(models(), data, [0, 1, 0, 1], [7, 8, 9, 10], cfg, device="cuda")
        diff = max(float((a.state[k].double() - b.state[k].double()).abs().max()) for k in a.state if a.state[k].is_floating_point())
        out[f"{arch}_{precision}"] = {"max_abs_weight_diff": diff, "steps": a.steps, "test_acc_batched": a.test_acc, "test_acc_loop": b.test_acc}
        print(f"{arch} {precision}: max |w_batched - w_loop| = {diff:.2e} after {a.steps} steps", flush=True)
print(json.dumps(out))
PY
tail -1 "$OUT/equivalence.txt" > "$OUT/equivalence.json"

log "3/3 CIFAR-100-scale zoos at paper epochs (5,000 networks each)"
DR=(); [ -n "$DATA_ROOT" ] && DR=(--data-root "$DATA_ROOT")
zt() { local name=$1 lim=$2; shift 2
  timeout "$lim" "$PY" -m ffl.bench zoo-time --device cuda "${DR[@]}" "$@" 2>&1 | tee "$OUT/$name.txt"
  tail -1 "$OUT/$name.txt" > "$OUT/$name.json"; }
log "  MLP-4, TF32, 100 epochs"
zt zoo_mlp_tf32 125 --arch mlp --precision tf32 --batch-networks 1312 --max-chunks 2 --budget-s 110
log "  PlainNet-5, bf16, 50 epochs, crop+flip"
zt zoo_cnn_bf16 100 --arch cnn --precision bf16 --batch-networks 126 --max-chunks 3 --budget-s 85
log "  PlainNet-5, bf16, through torch.compile"
zt zoo_cnn_bf16_compile 150 --arch cnn --precision bf16 --compile --batch-networks 126 --max-chunks 2 --budget-s 135

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
for k in ("zoo_mlp_tf32", "zoo_cnn_bf16", "zoo_cnn_bf16_compile"):
    z = load(k + ".json")
    s[k] = {x: z.get(x) for x in ("projected_zoo_s", "first_chunk_s", "nets_per_s", "networks_timed", "seconds_timed",
                                  "measured_fully", "extrapolated_from_partial_chunk", "projection", "batch_networks",
                                  "data", "precision", "compile", "error")}
try:
    s["zoos_together_s"] = s["zoo_mlp_tf32"]["projected_zoo_s"] + min(
        s[k]["projected_zoo_s"] for k in ("zoo_cnn_bf16", "zoo_cnn_bf16_compile") if s[k].get("projected_zoo_s"))
except Exception:
    pass
(out / "summary.json").write_text(json.dumps(s, indent=1))
print(json.dumps(s, indent=1))
PY
log "done in $(( $(date +%s) - T0 )) s; results in $OUT"
