#!/usr/bin/env bash
# GPU probe (H100): where does a PlainNet-5 / MLP-4 engine step spend its time?
# Usage on a GPU machine, from the repo root: OUT=somewhere bash scripts/gpu_probe.sh
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-results/gpu_probe}; mkdir -p "$OUT"
B="python3 -m ffl.bench"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/env.txt" 2>&1
python3 -c "import torch,sys;print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.backends.cudnn.version())" >> "$OUT/env.txt" 2>&1
run() { local name=$1 lim=$2; shift 2; local t=$(date +%s.%N)
  timeout "$lim" "$@" > "$OUT/$name.txt" 2>&1; echo "rc=$? wall=$(python3 -c "print(round($(date +%s.%N)-$t,1))")" >> "$OUT/$name.txt"
  tail -c 600 "$OUT/$name.txt"; echo; }
{
run conv_bf16 60 $B conv --device cuda --precision bf16
run conv_tf32 60 $B conv --device cuda --precision tf32
run prof_cnn_bf16 60 $B profile --arch cnn --device cuda --precision bf16
run prof_mlp_tf32 60 $B profile --arch mlp --device cuda --precision tf32 --batch-networks 512
run zoo_cnn_bf16 100 $B zoo-time --arch cnn --device cuda --precision bf16 --max-chunks 4 --budget-s 90
run prof_cnn_bf16_compile 150 $B profile --arch cnn --device cuda --precision bf16 --compile
} 2>&1 | tee "$OUT/log.txt"
