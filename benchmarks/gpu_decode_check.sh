#!/usr/bin/env bash
# GPU check of issue 13 (decoding), ready to run unchanged on one CUDA GPU (< 8 minutes):
# CALM ÷ baseline new tokens/s at batch 1, 16 and 128, T = 1 and T = 0.5, bf16 weights, eager
# and compiled (torch.compile with CUDA graphs: generate(compile=True) on CUDA), device named in
# the output. Trained checkpoints are optional (CALM=... AR=... DATA=... in the environment,
# e.g. carried beside the working tree); without them, random-weight CPU-preset models.
#   bash benchmarks/gpu_decode_check.sh            (writes bench_out/gpu_decode/decode.md)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}/gpu_decode
trained=()
if [ -n "${CALM:-}" ]; then trained=(--calm "$CALM" --ar "$AR" --data "$DATA"); fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 480 python benchmarks/bench_decode.py "${trained[@]}" --settings cpu --device cuda --dtype bfloat16 \
    --batches 1,16,128 --reps 2 --new-tokens 128 --threads 0 \
    --modes ar,ar_compiled,calm_t1,calm_t1_compiled,calm_t05_exact,calm_t05_approx --out "$OUT"
