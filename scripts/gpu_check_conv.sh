#!/usr/bin/env bash
# One prepared GPU check of the batched implicit-GEMM convolution (ffl/implicit_conv.py) against
# cuDNN's grouped convolution, for one H100 session (issue: paper scale on one H100, item 1).
#
#   bash scripts/gpu_check_conv.sh [STAGES]    # default "agree engine layers zoo"; results in $OUT or ./gpu_results
#
# Nothing is installed: the machine's python/torch/triton and this checkout via PYTHONPATH. Each
# stage has its own timeout and writes its output to $OUT as soon as it ends, so a cut-off run
# still returns what it measured (about 5 minutes in all, Triton's compilation included).
#   agree   FP32 (IEEE) and bf16: output, input and weight gradients of the Triton kernels against
#           the grouped convolution on PlainNet-5's four layers (implicit_rel_err_* columns)
#   engine  the batched engine with the Triton kernels against the plain loop (cuDNN), PlainNet-5 and
#           ResNet-5 at small widths, FP32 and bf16: largest weight difference after 9 steps
#   layers  forward + backward TFLOP/s of the four layers for K = 126 networks, bf16:
#           grouped (cuDNN), implicit (Triton), dense (one ordinary convolution: the ceiling)
#   zoo     PlainNet-5 zoo time at paper epochs, bf16, 3 chunks each with --conv-backend torch and
#           triton, same process order each time (python -m ffl.bench zoo-time)
#   compile the same with --compile (torch.compile around the Triton custom operators)
#   sweep   TFLOP/s of each pass of each layer under a grid of blockings, bf16, K = 126 (about 90
#           compilations), each checked against the default blocking: to choose default_tiles by
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
STAGES="${1:-agree engine layers zoo}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }
has() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }

log "environment"
"$PY" -c 'import json, sys, torch, triton; print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__,
  "triton": triton.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)}))' 2>&1 | tee "$OUT/env.json"

if has agree; then
  log "agree: fp32 (IEEE), K=8"
  timeout 120 "$PY" -m ffl.bench conv --device cuda --precision fp32 --batch-networks 8 --repeat 1 \
    2>&1 | tee "$OUT/agree_fp32.jsonl"
  log "agree: tf32, K=8"
  timeout 120 "$PY" -m ffl.bench conv --device cuda --precision tf32 --batch-networks 8 --repeat 1 \
    2>&1 | tee "$OUT/agree_tf32.jsonl"
fi
if has engine; then
  log "engine: batched engine (triton) vs plain loop"
  timeout 180 "$PY" -c 'import json; from ffl.bench import engine_agreement; print(json.dumps(engine_agreement("cuda", "triton")))' \
    2>&1 | tee "$OUT/engine.txt"
fi
if has layers; then
  log "layers: bf16, K=126"
  timeout 180 "$PY" -m ffl.bench conv --device cuda --precision bf16 --batch-networks 126 --repeat 5 \
    2>&1 | tee "$OUT/layers_bf16.jsonl"
fi
if has sweep; then
  log "sweep: blockings, bf16, K=126"
  timeout 300 "$PY" -m ffl.bench conv --sweep --device cuda --precision bf16 --batch-networks 126 --repeat 3 \
    2>&1 | tee "$OUT/sweep_bf16.jsonl"
fi
for backend in torch triton; do
  if has zoo; then
    log "zoo: PlainNet-5, bf16, conv backend $backend"
    timeout 200 "$PY" -m ffl.bench zoo-time --device cuda --arch cnn --precision bf16 --max-chunks 3 --budget-s 150 \
      --conv-backend "$backend" 2>&1 | tee "$OUT/zoo_${backend}.txt"
  fi
  if has compile; then
    log "compile: PlainNet-5, bf16, conv backend $backend, torch.compile"
    timeout 240 "$PY" -m ffl.bench zoo-time --device cuda --arch cnn --precision bf16 --max-chunks 3 --budget-s 180 \
      --compile --conv-backend "$backend" 2>&1 | tee "$OUT/compile_${backend}.txt"
  fi
done
log "done"
