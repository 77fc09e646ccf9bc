#!/usr/bin/env bash
# Train one chapter's zoo on the GPU into the cache folder its chapter reads (`python -m ffl.zoo
# train` without --root, with the profile's zoo.cuda settings), so that a chapter too long for one
# device call runs as two on the same warm machine: this, then scripts/gpu_chapter.sh with the same
# profile, which finds the zoo cached (issue: paper scale on one H100).
#
#   bash scripts/gpu_zoo.sh PROFILE SECTION ARCH DATASET
#   e.g. bash scripts/gpu_zoo.sh paper_offline_bf16 tiny_imagenet cnn tiny_imagenet
#
# Output: $OUT/zoo_log.txt (the device runner's folder, else ./gpu_results). A zoo cut off by the
# call's time limit resumes at its first unfinished chunk when run again. DEVICE=cpu: a smoke test;
# PYTHON: the interpreter (default: python3 on the PATH).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 4 ] || { echo "usage: $0 PROFILE SECTION ARCH DATASET" >&2; exit 2; }
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FFL_DATA_ROOT="${FFL_DATA_ROOT:-$PWD/.gpu/data}" FFL_CACHE="${FFL_CACHE:-$PWD/cache}"
start=$(date +%s)
"${PYTHON:-$(command -v python3 || command -v python)}" -m ffl.zoo train --profile "$1" --section "$2" --arch "$3" \
  --dataset "$4" --device "${DEVICE:-cuda}" 2>&1 | tee "$OUT/zoo_log.txt"
status=${PIPESTATUS[0]}
echo "[gpu_zoo] exit $status after $(( $(date +%s) - start )) s" | tee -a "$OUT/zoo_log.txt"
exit "$status"
