#!/usr/bin/env bash
# One prepared GPU check of the Triton kernels for PlainNet zoos -- the batched implicit-GEMM
# convolution (ffl/implicit_conv.py) and the fused BatchNorm + activation + max-pool
# (ffl/fused_bn.py) -- against cuDNN, for one H100 session (issue: paper scale on one H100, item 1).
#
#   bash scripts/gpu_check_conv.sh [STAGES]    # default "agree engine layers zoo"; results in $OUT or ./gpu_results
#
# Nothing is installed: the machine's python/torch/triton and this checkout via PYTHONPATH. Each
# stage has its own timeout; everything goes to $OUT/log.txt as it happens (the sweep's table to
# $OUT/conv_tiles.json; the device runner brings back 8 files at most), so a cut-off run still
# returns what it measured (about 5 minutes for the default stages, Triton's compilation included).
#   agree   FP32 (IEEE) and TF32: output, input and weight gradients of the convolution kernels
#           against the grouped convolution on PlainNet-5's four layers (implicit_rel_err_* columns)
#   engine  the batched engine with the kernels against the plain loop (PyTorch's operations),
#           PlainNet-5 and ResNet-5 at small widths, FP32 and bf16: largest weight difference after
#           9 steps; first with cuDNN in both (the baseline: how far rounding alone moves them),
#           then with the convolution kernels, then with the fused BatchNorm as well
#   layers  forward + backward TFLOP/s of the four convolution layers for K = 126 networks, bf16:
#           grouped (cuDNN), implicit (Triton), dense (one ordinary convolution: the ceiling)
#   zoo     PlainNet-5 zoo time at paper epochs, bf16, 2 chunks each: cuDNN + PyTorch BatchNorm,
#           Triton convolution, Triton convolution + fused BatchNorm (python -m ffl.bench zoo-time);
#           chunks of $ZOO_K networks (default: sized by memory, at most 252; docs/performance.md's table used 126)
#   compile the same three through torch.compile
#   profile where a training step's time goes with both kernels (torch.profiler table; K = $ZOO_K, default 126)
#   sweep   TFLOP/s of each pass of each layer under a grid of blockings, bf16, K = $ZOO_K (default
#           126; about 80 compilations), each checked against the default blocking; the blockings
#           that beat the default by 5% go to $OUT/conv_tiles.json (a tile table)
#   tuned   after zoo (and sweep): the zoo time of each Triton variant again with that table
#           (zoo-time --conv-tiles), to set beside the zoo stage's default blockings
#
# The plan for item 1 (one call; the sweep's timeout is 6 minutes, each zoo stage about 1):
#   ZOO_K=252 ZOO_VARIANTS="triton:triton" bash scripts/gpu_check_conv.sh "profile sweep zoo tuned"
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
  "triton": triton.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)}))' 2>&1 | tee -a "$OUT/log.txt"

if has agree; then
  log "agree: fp32 (IEEE), K=8"
  timeout 120 "$PY" -m ffl.bench conv --device cuda --precision fp32 --batch-networks 8 --repeat 1 \
    2>&1 | tee -a "$OUT/log.txt"
  log "agree: tf32, K=8"
  timeout 120 "$PY" -m ffl.bench conv --device cuda --precision tf32 --batch-networks 8 --repeat 1 \
    2>&1 | tee -a "$OUT/log.txt"
fi
if has engine; then
  log "engine: batched engine with the kernels vs plain loop"
  timeout 240 "$PY" -c 'import json; from ffl.bench import engine_agreement as e
print(json.dumps(e("cuda", "torch", archs=("cnn",))))  # the baseline: cuDNN in both, rounding and algorithm choice only
print(json.dumps(e("cuda", "triton"))); print(json.dumps(e("cuda", "triton", archs=("cnn",), bn_backend_name="triton")))' \
    2>&1 | tee -a "$OUT/log.txt"
fi
if has layers; then
  log "layers: bf16, K=126"
  timeout 180 "$PY" -m ffl.bench conv --device cuda --precision bf16 --batch-networks 126 --repeat 5 \
    2>&1 | tee -a "$OUT/log.txt"
fi
TILES="$OUT/conv_tiles.json"
if has sweep; then
  log "sweep: blockings, bf16, K=${ZOO_K:-126}"
  timeout 360 "$PY" -m ffl.bench conv --sweep --device cuda --precision bf16 --batch-networks "${ZOO_K:-126}" \
    --repeat 3 --tiles-out "$TILES" 2>&1 | tee -a "$OUT/log.txt"
fi
if has profile; then
  log "profile: a training step with both kernels, bf16, K=${ZOO_K:-126}"
  timeout 150 "$PY" -m ffl.bench profile --device cuda --arch cnn --precision bf16 --conv-backend triton \
    --bn-backend triton --batch-networks "${ZOO_K:-126}" 2>&1 | tee -a "$OUT/log.txt"
fi
# $ZOO_VARIANTS: "convolution:BatchNorm" backends, e.g. "torch:torch triton:triton"
for variant in ${ZOO_VARIANTS:-torch:torch triton:torch triton:triton}; do
  set -- ${variant/:/ }
  for mode in zoo compile; do
    has "$mode" || continue
    log "$mode: PlainNet-5, bf16, convolution $1, BatchNorm $2, chunks of ${ZOO_K:-memory-sized, at most 252}"
    timeout 200 "$PY" -m ffl.bench zoo-time --device cuda --arch cnn --precision bf16 --max-chunks 2 --budget-s 150 \
      --conv-backend "$1" --bn-backend "$2" $([ "$mode" = compile ] && echo --compile) \
      ${ZOO_K:+--batch-networks "$ZOO_K"} 2>&1 | tee -a "$OUT/log.txt"
  done
  if has tuned && [ "$1" = triton ]; then
    if [ -s "$TILES" ]; then
      log "tuned: PlainNet-5, bf16, convolution $1 with $TILES, BatchNorm $2, chunks of ${ZOO_K:-memory-sized, at most 252}"
      timeout 200 "$PY" -m ffl.bench zoo-time --device cuda --arch cnn --precision bf16 --max-chunks 2 --budget-s 150 \
        --conv-backend "$1" --bn-backend "$2" --conv-tiles "$TILES" \
        ${ZOO_K:+--batch-networks "$ZOO_K"} 2>&1 | tee -a "$OUT/log.txt"
    else
      log "tuned: no tile table at $TILES (run the sweep stage first)"
    fi
  fi
done
log "done"
