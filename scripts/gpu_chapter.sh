#!/usr/bin/env bash
# Run book chapters at a profile (default: paper) on one GPU, end to end -- zoo, features,
# protocols, notebook -- and bring back the executed notebooks (issue: paper scale on one H100).
#
#   bash scripts/gpu_chapter.sh [--profile paper] [--dataset NAME] CHAPTER [CHAPTER ...]   # e.g. namedata
#
# --dataset runs the chapters that take a dataset on NAME instead of the profile's, e.g. cifar10 in
# place of CIFAR-100 (python -m ffl.book run --dataset; the titles name it).
#
# Results go to $OUT (the device runner's folder) or ./gpu_results: book/chapters/<chapter>.ipynb,
# book/run_summary.md, nvidia_smi.txt and log.txt. Inputs the GPU machine lacks travel with the
# tree in ignored folders:
#   .gpu/data/   what the chapters read ($FFL_DATA_ROOT), e.g. names/<Language>.txt for NameData
#   .gpu/site.tar.xz  papermill, ipykernel and what `from myst_nb import glue` needs, for the
#                machine's Python 3.12 (built from .whl by scripts/gpu_site.sh), unpacked to /tmp/site
#   .whl/        else: the wheels themselves (pip download ... --python-version 3.12, see docs/gpu.md),
#                installed to /tmp/site; too big to travel with the tiny ImageNet copy
# Check the size before a run: python3 scripts/gpu_payload_size.py .gpu  (64 MiB at most).
# The commit the run reports comes from $FFL_COMMIT when the copy carries no git history.
set -uo pipefail
cd "$(dirname "$0")/.."
PROFILE=paper
DATASET=()
while [ $# -ge 2 ]; do
  case "$1" in
    --profile) PROFILE=$2; shift 2 ;;
    --dataset) DATASET=(--dataset "$2"); shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "usage: $0 [--profile NAME] [--dataset NAME] CHAPTER [CHAPTER ...]" >&2; exit 2; }
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
if [ -f .gpu/site.tar.xz ]; then
  rm -rf /tmp/site && python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
    .gpu/site.tar.xz /tmp/site || { echo "unpacking .gpu/site.tar.xz failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site"
elif compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# The cache (zoos, results) lives in the checkout's ignored cache/, which the device runner keeps
# between calls on a warm machine: a chapter cut off by the call's time limit resumes its zoo at the
# first unfinished chunk when the same command is run again at once.
export FFL_DATA_ROOT="${FFL_DATA_ROOT:-$PWD/.gpu/data}" FFL_CACHE="${FFL_CACHE:-$PWD/cache}"
PY="$(command -v python3 || command -v python)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia_smi.txt" 2>&1 || true
start=$(date +%s)
# The book is built outside $OUT: its skeleton (config, intro, paper_scale/) would pass the device
# runner's limit of 8 files brought back; only the chapters of this run and the summary go to $OUT.
BOOK=/tmp/gpu_chapter/book
rm -rf "$(dirname "$BOOK")"
"$PY" -m ffl.book run --profile "$PROFILE" "${DATASET[@]}" --only "$@" --no-html --echo --book-dir "$BOOK" 2>&1 | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}
mkdir -p "$OUT/book/chapters"
cp "$BOOK"/chapters/*.ipynb "$OUT/book/chapters/" 2>/dev/null
cp "$BOOK/run_summary.md" "$OUT/book/" 2>/dev/null
echo "[gpu_chapter] exit $status after $(( $(date +%s) - start )) s" | tee -a "$OUT/log.txt"
exit "$status"
