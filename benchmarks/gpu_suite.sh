#!/usr/bin/env bash
# The whole GPU run in one command, for a machine with a GPU and a preinstalled CUDA torch where
# nothing can be downloaded: build fastres against that torch, run the CUDA tests (and the rest),
# compute-sanitizer on a representative subset where it exists, python -m fastres.bench and the
# microbenchmarks in float32 and bfloat16, and write every result into one folder.
#
# Usage: bash benchmarks/gpu_suite.sh OUT_DIR [all|tests|bench|kernels|triton]
#   tests: build, tests, compute-sanitizer; bench: build, fastres.bench fp32 and bf16; kernels:
#   build, bn_act microbenchmarks; triton: build, Triton convolutions vs cuDNN and bottleneck
#   steps vs eager and torch.compile (bf16). Each phase alone fits a 10-minute call where the
#   whole run may not.
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR [all|tests|bench|kernels|triton]}
phase=${2:-all}
case $phase in all|tests|bench|kernels|triton) ;; *) echo "phase must be all, tests, bench, kernels or triton, got $phase"; exit 2;; esac
mkdir -p "$out"
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
status=0

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
FASTRES_CUDA=1 FASTRES_CUDA_ARCHS=${FASTRES_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  "$python" -m pip install --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1 \
  || { echo "build failed, see $out/build.log"; exit 1; }
"$python" -m fastres.info | tee "$out/info.txt"

if [ "$phase" = all ] || [ "$phase" = tests ]; then
# Every test, the GPU-marked ones included (they run only here); not the compile-only check of
# the Triton kernels (tests/test_triton_compile.py), which is for machines without a GPU: here
# the kernels run for real, and device time is short.
"$python" -m pytest tests -q -p no:cacheprovider --junitxml="$out/tests.xml" \
  --ignore=tests/test_triton_compile.py > "$out/tests.log" 2>&1 || status=1
tail -3 "$out/tests.log"

# Memory errors in the CUDA kernels: a small subset under compute-sanitizer, where installed.
if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 1 "$python" -m pytest tests/test_bn_act.py \
    -q -p no:cacheprovider -k "odd_shapes and cuda and float32" > "$out/sanitizer.log" 2>&1 \
    || { status=1; echo "compute-sanitizer reported errors, see $out/sanitizer.log"; }
else
  echo "compute-sanitizer not found: skipped" | tee "$out/sanitizer.log"
fi

fi

if [ "$phase" = all ] || [ "$phase" = bench ]; then
# The main job: ResNet-50 parity and throughput against torchvision, fp32 and bf16 autocast.
for dtype in fp32 bf16; do
  "$python" -m fastres.bench --dtype $dtype --out "$out" 2>>"$out/bench_cli.log" \
    | tee "$out/resnet50_$dtype.txt" || status=1
done
fi

if [ "$phase" = all ] || [ "$phase" = kernels ]; then

for dtype in bfloat16 float32; do
  FASTRES_BENCH_DTYPE=$dtype "$python" -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --ignore=benchmarks/test_conv_bn_benchmark.py \
    --benchmark-json="$out/bn_act_$dtype.json" > "$out/bench_$dtype.log" 2>&1 || status=1
  "$python" benchmarks/report.py "$out/bn_act_$dtype.json" --out "$out/$dtype" | tee "$out/report_$dtype.txt"
done
fi
if [ "$phase" = all ] || [ "$phase" = triton ]; then
FASTRES_BENCH_DTYPE=bfloat16 "$python" -m pytest benchmarks/test_conv_bn_benchmark.py --benchmark-only \
  -q -p no:cacheprovider --benchmark-json="$out/conv_bn_bfloat16.json" > "$out/bench_triton.log" 2>&1 \
  || status=1
"$python" benchmarks/report.py "$out/conv_bn_bfloat16.json" --out "$out/bfloat16" | tee "$out/report_triton.txt"
fi
exit $status
