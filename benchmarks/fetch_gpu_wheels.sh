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
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pins[@]}"
# bitsandbytes ships a native library for every CUDA, ROCm and XPU release (41 MiB): keep the CPU one
# and those of the CUDA releases torch 2.11 is built for (12.6, 12.8, 13.0, 13.2), so .whl/ fits.
for wheel in .whl/bitsandbytes-*.whl; do
  python3 - "$wheel" <<'PY'
import re, sys, zipfile
path = sys.argv[1]
with zipfile.ZipFile(path) as source:
    entries = [(info, source.read(info)) for info in source.infolist()]
unused = re.compile(r"libbitsandbytes_(cuda1(18|21|24)|rocm|xpu)")
with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
    for info, data in entries:
        if not unused.search(info.filename):
            target.writestr(info, data)
PY
done
count=$(find .whl -type f -name '*.whl' | wc -l)
[ "$count" -eq "${#pins[@]}" ] || { echo "expected ${#pins[@]} wheels in .whl/, found $count" >&2; exit 1; }
echo "${count} wheels, $(du -cb .whl/*.whl | tail -1 | cut -f1 | awk '{printf "%.1f MiB", $1 / 1048576}') in .whl/"
