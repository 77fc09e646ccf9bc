#!/usr/bin/env bash
# The feature-learning stage at N = 5,000 on one GPU (issue: paper scale on one H100, item 3):
# `python -m ffl.bench ffl` for PlainNet-5 (chains 1-5, TF32, docs/performance.md's H100 row at full size)
# and MLP-4 (chains and layers, FP32 as the chapters use), each under its own timeout.
#
#   bash scripts/gpu_bench_ffl.sh [ARCH ...]     # cnn and/or mlp (default: cnn mlp)
#
# Results: $OUT/bench_ffl.txt (the device runner's folder, else ./gpu_results), written as they
# come, so a run cut off by its time slot still returns the plan and the blocks done.
#   BENCH_ZOOS=DIR    DIR/<arch> is a zoo on disk to time instead of random weights, e.g. a link
#                     to the trained zoo a chapter left in cache/zoos/ (the stage's work depends on
#                     the shapes, not the values); else random weights are written under $FFL_CACHE
#   BENCH_TIMEOUT     seconds per architecture (default 300)
#   BENCH_NETWORKS    N (default 5000); BENCH_QUICK=1 narrow networks on the CPU (a smoke test)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FFL_CACHE="${FFL_CACHE:-$PWD/cache}"
N="${BENCH_NETWORKS:-5000}"
if [ "${BENCH_QUICK:-0}" = 1 ]; then COMMON=(--device cpu --quick); else COMMON=(--device cuda); fi
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/bench_ffl.txt"; }
status=0
for arch in "${@:-cnn mlp}"; do
  for a in $arch; do
    case "$a" in
      cnn) ARGS=(--precision "$([ "${BENCH_QUICK:-0}" = 1 ] && echo fp32 || echo tf32)" --chains-only --memory-gib 16 --slab-mib 6144) ;;
      mlp) ARGS=(--precision fp32 --memory-gib 24 --slab-mib 2048) ;;
      *) echo "unknown architecture $a (cnn or mlp)" >&2; exit 2 ;;
    esac
    ZR=(); [ -n "${BENCH_ZOOS:-}" ] && [ -e "$BENCH_ZOOS/$a" ] && ZR=(--zoo-root "$BENCH_ZOOS")
    log "ffl.bench ffl --arch $a --networks $N ${COMMON[*]} ${ARGS[*]} ${ZR[*]}"
    timeout "${BENCH_TIMEOUT:-300}" "$PY" -m ffl.bench ffl --arch "$a" --networks "$N" "${COMMON[@]}" "${ARGS[@]}" \
      "${ZR[@]}" 2>&1 | tee -a "$OUT/bench_ffl.txt"
    rc=${PIPESTATUS[0]}
    log "$a: exit $rc"
    [ "$rc" = 0 ] || status=$rc
  done
done
exit "$status"
