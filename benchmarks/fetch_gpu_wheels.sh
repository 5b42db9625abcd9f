#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.sh lists into .whl/ (git-ignored), for the GPU machine
# (Python 3.12, x86-64, no network), and nothing else: .whl/ is emptied first, since two versions
# of one package there stop the whole install. Needs network here; prints the total size (the
# working tree that travels may hold 64 MiB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t pins < <(sed -n 's/^#   wheel \([^ ]*\).*/\1/p' benchmarks/gpu_check.sh)
[ "${#pins[@]}" -gt 0 ] || { echo "no '#   wheel NAME==VERSION' lines in benchmarks/gpu_check.sh" >&2; exit 1; }
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
count=$(find .whl -type f -name '*.whl' | wc -l)
[ "$count" -eq "${#pins[@]}" ] || { echo "expected ${#pins[@]} wheels in .whl/, found $count" >&2; exit 1; }
echo "${count} wheels, $(du -cb .whl/*.whl | tail -1 | cut -f1 | awk '{printf "%.1f MiB", $1 / 1048576}') in .whl/"
