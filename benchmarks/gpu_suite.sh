#!/usr/bin/env bash
# The whole GPU run in one command, for a machine with a GPU and a preinstalled CUDA torch where
# nothing can be downloaded: build fastres against that torch, run the CUDA tests (and the rest),
# run the microbenchmarks in bfloat16 and float32, and write every result into one folder.
#
# Usage: bash benchmarks/gpu_suite.sh OUT_DIR
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
status=0

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
FASTRES_CUDA=1 FASTRES_CUDA_ARCHS=${FASTRES_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  "$python" -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
  || { echo "build failed, see $out/build.log"; exit 1; }
"$python" -m fastres.info | tee "$out/info.txt"

# Every test, the GPU-marked ones included (they run only here).
"$python" -m pytest tests -q -p no:cacheprovider --junitxml="$out/tests.xml" \
  > "$out/tests.log" 2>&1 || status=1
tail -3 "$out/tests.log"

for dtype in bfloat16 float32; do
  FASTRES_BENCH_DTYPE=$dtype "$python" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$out/bn_act_$dtype.json" > "$out/bench_$dtype.log" 2>&1 || status=1
  "$python" benchmarks/report.py "$out/bn_act_$dtype.json" --out "$out/$dtype" | tee "$out/report_$dtype.txt"
done
exit $status
