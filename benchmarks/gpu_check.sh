#!/usr/bin/env bash
# The GPU lane: one run on one H100/H200 that measures what the engine does with a GPU, in under
# 9 minutes. Granite Vision 3.2 shapes with random weights, bfloat16, letter pages, 64 new tokens:
# (a) the model card's loop, (b) plain batched generate at batch 32, (c) granite-vision at its
# default budget, then (c) with a static cache, without prefill chunks, with the budget forced too
# large (out-of-memory back-off: every item must still be answered), with --schema, and with
# --quantize int8 and nf4 (weights measured, tokens compared with bfloat16's).
#
#   benchmarks/gpu_check.sh                    # on the GPU machine
#   GPU_CHECK_SMOKE=1 benchmarks/gpu_check.sh  # the same plumbing on a CPU, tiny model, seconds
#
# Output: PREFIX.rows.jsonl (a line as each row starts and ends), PREFIX.json (the report) and
# PREFIX.md (the table), rewritten the moment each row ends, and PREFIX.log (everything printed).
# PREFIX is $GPU_CHECK_OUT, else $OUT/gpu-3.2-2b ($OUT: the device tool's folder, whose files come
# back, 8 at most), else benchmarks/gpu-3.2-2b (smoke: benchmarks/results/gpu-smoke). A row that
# fails (an exception, a missing package, out of memory) is recorded with its one-line reason and
# the next row runs; the table, printed at the end, shows every row: its numbers, or why not.
#
# Time: the script ends within GPU_CHECK_DEADLINE_S seconds of its start (default 540). Rows not
# started 20 s before that are "skipped: out of time", and the row running then is interrupted
# ("killed: out of time"); if the process does not stop by 10 s before the end, `timeout` kills
# it, and benchmarks/rows.py settles its files from what was saved and prints the table.
#
# The GPU machine (python3 3.12 with torch 2.11.0, torchvision 0.26.0, transformers 5.17.0,
# huggingface_hub 1.33.0, tokenizers 0.23.2, safetensors 0.8.0, accelerate 1.15.0, numpy 2.5.2,
# rich, pillow; no network) lacks these, or has them too old; they travel as wheels in .whl/
# (git-ignored; 17 wheels, 43.1 MiB: fetch_gpu_wheels.sh keeps only the CUDA libraries of bitsandbytes torch 2.11 can use). Here, in the repo root:
#   benchmarks/fetch_gpu_wheels.sh     # = python3 -m pip download --no-deps --only-binary=:all:
#     --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 (and _2_27, _2_17,
#     2014, 1) -d .whl NAME==VERSION, for each wheel below
# There (the device tool): command "benchmarks/gpu_check.sh", carry [".whl"], timeout_s 600.
# When its python3 cannot run the engine, the script installs .whl/ itself, which by hand is
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# and runs from the checkout (granite-vision is not pip-installed there; the repo root is on
# PYTHONPATH). GPU_CHECK_SITE and GPU_CHECK_WHEELS move /tmp/site and .whl.
# Wheels (fetch_gpu_wheels.sh reads this list):
#   wheel transformers==5.24.0               the engine's floor; 5.17 fails every item
#   wheel typer==0.29.2                      granite-vision's floor (needs pydantic, annotated-doc)
#   wheel annotated-doc==0.0.7
#   wheel typing-extensions==4.16.0          pydantic-core needs >= 4.14.1; the machine's is not known
#   wheel pypdfium2==5.15.2                  PDF pages
#   wheel pdf2image==1.17.0                  checked by the environment check
#   wheel xgrammar==0.2.9                    --schema: constrained decoding
#   wheel apache-tvm-ffi==0.1.15.post2
#   wheel pydantic==2.13.4
#   wheel pydantic-core==2.46.4
#   wheel annotated-types==0.7.0
#   wheel typing-inspection==0.4.2
#   wheel jsonschema==4.26.0                 --schema: validation
#   wheel jsonschema-specifications==2025.9.1
#   wheel referencing==0.37.0
#   wheel rpds-py==0.30.0
#   wheel bitsandbytes==0.50.2              --quantize int8|nf4 (the rows after --schema's)
# torchvision is not carried: the machine's 0.26.0 is the one built for its torch 2.11.
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
end=$((started + ${GPU_CHECK_DEADLINE_S:-540}))

# Where the files go: an explicit prefix, else the device tool's $OUT, else benchmarks/.
output_prefix() {
  if [ -n "${GPU_CHECK_OUT:-}" ]; then
    echo "$GPU_CHECK_OUT"
  elif [ -n "${OUT:-}" ]; then
    echo "$OUT/gpu-3.2-2b"
  elif [ "${GPU_CHECK_SMOKE:-}" = 1 ]; then
    echo benchmarks/results/gpu-smoke
  else
    echo benchmarks/gpu-3.2-2b
  fi
}

# The engine's packages, from the carried wheels when this python3 lacks them or has them too old
# (the environment check every run makes, --schema's packages included).
ensure_packages() {
  if python3 -c 'from granite_cli import environment; environment.check(("schema",))' 2>/dev/null; then
    return
  fi
  local wheels=("${GPU_CHECK_WHEELS:-.whl}"/*.whl) site=${GPU_CHECK_SITE:-/tmp/site}
  if [ ! -e "${wheels[0]}" ]; then
    echo "gpu_check: this python3 cannot run every row and there is no .whl/ to install (the rows say why)"
    return
  fi
  echo "gpu_check: installing ${#wheels[@]} wheels into $site"
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${wheels[@]}"; then
    echo "gpu_check: pip failed; unpacking the wheels instead (a wheel is a zip of what pip would put there)"
    for wheel in "${wheels[@]}"; do python3 -m zipfile -e "$wheel" "$site"; done
  fi
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
}

out=$(output_prefix)
mkdir -p "$(dirname "$out")"
rm -f "$out.rows.jsonl" "$out.log"
exec > >(tee -a "$out.log") 2>&1
tee_pid=$!
ensure_packages
if [ "${GPU_CHECK_SMOKE:-}" = 1 ]; then
  args=(--tiny --workload pages --items 6 --card-items 2 --baseline-batch 3 --new-tokens 4)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  args=(--random-weights granite-vision-3.2-2b --workload pages --items 64 --card-items 6
        --baseline-batch 32 --new-tokens 64 --dtype bfloat16)
fi
export PYTHONUNBUFFERED=1
stop_in=$((end - 10 - $(date +%s)))
rc=0
timeout --kill-after=5 "$((stop_in > 1 ? stop_in : 1))" python3 benchmarks/throughput.py "${args[@]}" --variants \
  --schema 'title, total:number, paid:boolean' --quantize-sweep int8,nf4 --out "$out" --deadline-at "$((end - 20))" \
  || rc=$?
if [ "$rc" -ne 0 ]; then  # rows left open (killed, or died) are settled from its files, and the table shown
  why="out of time"
  [ "$(date +%s)" -lt "$((end - 10))" ] && why="the benchmark process ended with exit code $rc"
  python3 benchmarks/rows.py "$out" "$why"
fi
echo "gpu_check: exit code $rc after $(($(date +%s) - started)) s; files: $out.{rows.jsonl,json,md,log}"
exec >&- 2>&-
wait "$tee_pid"  # the log complete before the files are collected
exit "$rc"
