#!/usr/bin/env bash
# Run book chapters at a profile (default: paper) on one GPU, end to end -- zoo, features,
# protocols, notebook -- and bring back the executed notebooks (issue: paper scale on one H100).
#
#   bash scripts/gpu_chapter.sh [--profile paper] CHAPTER [CHAPTER ...]   # e.g. namedata
#
# Results go to $OUT (the device runner's folder) or ./gpu_results: book/chapters/<chapter>.ipynb,
# book/run_summary.md, nvidia_smi.txt and log.txt. Inputs the GPU machine lacks travel with the
# tree in ignored folders:
#   .gpu/data/   what the chapters read ($FFL_DATA_ROOT), e.g. names/<Language>.txt for NameData
#   .whl/        wheels of papermill, myst-nb, ipykernel, jupytext and their dependencies that the
#                machine's Python lacks (pip download ... --python-version 3.12, see README)
# The commit the run reports comes from $FFL_COMMIT when the copy carries no git history.
set -uo pipefail
cd "$(dirname "$0")/.."
PROFILE=paper
if [ "${1:-}" = "--profile" ]; then PROFILE=$2; shift 2; fi
[ $# -ge 1 ] || { echo "usage: $0 [--profile NAME] CHAPTER [CHAPTER ...]" >&2; exit 2; }
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FFL_DATA_ROOT="${FFL_DATA_ROOT:-$PWD/.gpu/data}" FFL_CACHE="${FFL_CACHE:-/tmp/ffl-cache}"
PY="$(command -v python3 || command -v python)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.txt" 2>&1 || true
start=$(date +%s)
"$PY" -m ffl.book run --profile "$PROFILE" --only "$@" --no-html --book-dir "$OUT/book" 2>&1 | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}
echo "[gpu_chapter] exit $status after $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"
exit "$status"
