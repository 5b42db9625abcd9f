#!/usr/bin/env bash
# The GPU lane: one run on one H100/H200 that measures what the engine does with a GPU, in under
# 9 minutes. Granite Vision 3.2 shapes with random weights, bfloat16, letter pages, 64 new tokens:
# (a) the model card's loop, (b) plain batched generate at batch 32, (c) granite-vision at its
# default budget, then (c) with a static cache, without prefill chunks, with the budget forced too
# large (out-of-memory back-off: every item must still be answered), and with --schema.
# Writes benchmarks/gpu-3.2-2b.json and benchmarks/gpu-3.2-2b.md (override with GPU_CHECK_OUT).
#
#   benchmarks/gpu_check.sh                  # on the GPU machine
#   GPU_CHECK_SMOKE=1 benchmarks/gpu_check.sh  # the same plumbing on a CPU, tiny model, seconds
#
# On a machine without network (the lent GPU machine), install the carried wheels first and run
# from the checkout: see README "Performance".
set -euo pipefail
cd "$(dirname "$0")/.."
out="${GPU_CHECK_OUT:-benchmarks/gpu-3.2-2b}"
if [ "${GPU_CHECK_SMOKE:-}" = 1 ]; then
  args=(--tiny --workload pages --items 6 --card-items 2 --baseline-batch 3 --new-tokens 4)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || true
  args=(--random-weights granite-vision-3.2-2b --workload pages --items 64 --card-items 6
        --baseline-batch 32 --new-tokens 64 --dtype bfloat16)
fi
export PYTHONUNBUFFERED=1
exec python3 benchmarks/throughput.py "${args[@]}" --variants --schema 'title, total:number, paid:boolean' \
  --json "$out.json" --markdown "$out.md"
