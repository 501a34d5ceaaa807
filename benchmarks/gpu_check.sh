#!/usr/bin/env bash
# The GPU check: everything fastres wants from a rare, short-lived GPU machine, in one call that
# fits 8 minutes of wall time on a cold H200 machine (nothing built, empty Triton cache).
#
# Usage: bash benchmarks/gpu_check.sh [--dry-run] OUT
#
# Phases, in order of value, each under `timeout` (its own box, or the time left of the whole
# budget if less); a phase that fails or runs out of time keeps what it wrote and the next runs:
#   1 build      sm_90 only, MAX_JOBS=16                                       box 100 s
#   2 tests      the suite but the compile-only Triton, packaging and dry-run tests, 16 workers,
#                90 s per test, Triton autotuning on its quick set             box 160 s
#   3 sanitizer  compute-sanitizer memcheck, racecheck, synccheck on
#                benchmarks/sanitizer_cases.py                                 box  60 s
#   4 headline   ResNet-50 bf16 autocast, channels_last, batch 256: training step and inference,
#                torchvision eager vs fastres[cuda], then vs fastres[triton]; torch.compile only
#                if time remains                                               box 125 s
#   5 layers     benchmarks/layer_table.py: Triton convolution vs cuDNN (TFLOP/s), bn_act vs
#                eager (GB/s against the copy bandwidth of the same run)       box  60 s
#   6 profile    benchmarks/profile_step.py: a first-stage bottleneck's training step on the
#                triton backend, device time per kernel (the finalize share)   box  30 s
#   7 finalize   benchmarks/finalize_share.py: the BatchNorm finalize kernels alone at every
#                ResNet-50 shape, batch 256, as a share of the headline's triton step, beside
#                an estimate by arithmetic (1.5-4%)                            box  30 s
#                then torch.compile's headline, only if time remains          the rest
# Budget: GPU_CHECK_SECONDS (default 480). Workers: GPU_CHECK_WORKERS (default 16).
#
# OUT gets at most 8 files, none in a sub-folder: summary.md (written last, from the others),
# gpu_check.log (every phase's output, each capped), tests.xml (JUnit), resnet50_cuda_bf16_*.csv
# (fastres.bench, one per run), layers.csv and profile.csv. The finalize phase's table is in the
# log and the summary (its CSV, .finalize.csv, is removed with .phases: 8 files already).
#
# --dry-run (no GPU needed; CI runs it through tests/test_gpu_check.py): prints the plan, then
# runs each phase in the form that needs no GPU: the build is checked rather than redone, the
# suite's GPU tests are collected and skipped, the sanitizer cases and both benchmarks run on CPU
# at toy sizes. Nothing it writes is a measurement.
set -uo pipefail

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
out=${1:?usage: gpu_check.sh [--dry-run] OUT}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
budget=${GPU_CHECK_SECONDS:-480}
workers=${GPU_CHECK_WORKERS:-16}
log_cap_bytes=$((4 * 1024 * 1024))  # per phase, so that gpu_check.log stays far below 16 MiB
start=$(date +%s)
log="$out/gpu_check.log"
phases="$out/.phases"  # name|status|seconds, read by the summary, then removed
: > "$log"
: > "$phases"

elapsed() { echo $(( $(date +%s) - start )); }

# run_phase NAME BOX COMMAND...: COMMAND's output goes to the log (the first log_cap_bytes of
# it); it runs under timeout for BOX seconds or the budget's remainder, whichever is less.
run_phase() {
  local name=$1 box=$2
  shift 2
  local left=$(( budget - $(elapsed) ))
  local limit=$(( box < left ? box : left ))
  if [ "$limit" -lt 10 ]; then
    echo "$name|skipped: budget spent|0" >> "$phases"
    echo "== $name: skipped, the budget is spent" | tee -a "$log"
    return
  fi
  echo "== $name (up to ${limit} s, at $(elapsed) s): $*" | tee -a "$log"
  local t0 rc status
  t0=$(date +%s)
  # SIGINT first, so that pytest writes its JUnit file and python prints what it has.
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | head -c "$log_cap_bytes" >> "$log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  echo "$name|$status|$(( $(date +%s) - t0 ))" >> "$phases"
  echo "== $name: $status in $(( $(date +%s) - t0 )) s" | tee -a "$log"
}

if [ $dry_run = 1 ]; then
  echo "gpu_check dry run: the plan, then every phase in its no-GPU form (no measurements)"
  sed -n '/^# Phases/,/^# Budget/p' "$0" | sed 's/^# \{0,1\}//'
  export TRITON_INTERPRET=1  # the Triton kernels run on CPU tensors
else
  nvidia-smi >> "$log" 2>&1
fi
# Correctness-only Triton work (tests, sanitizer) autotunes over 2 configurations, not 8.
quick_autotune="env FASTRES_TRITON_AUTOTUNE=quick"

# 1. Build
if [ $dry_run = 1 ]; then
  run_phase build 100 "$python" -c "import fastres, sys; from fastres._info import format_info; \
print(format_info(fastres.info())); sys.exit(0 if fastres.info()['backends']['cuda']['built'] \
else 'the CUDA kernels were not built')"
else
  run_phase build 100 env FASTRES_CUDA=1 FASTRES_CUDA_ARCHS=9.0 MAX_JOBS=16 \
    "$python" -m pip install --no-build-isolation --no-deps -e .
  "$python" -m fastres >> "$log" 2>&1
fi

# 2. Tests (on a GPU the Triton kernels run for real: the compile-only check is for CPUs; the
# packaging test needs the network and the `build` tool, and the dry run of this script is
# CI's: neither says anything about the GPU).
pytest_gpu=("$python" -m pytest tests -q -p no:cacheprovider --ignore=tests/test_triton_compile.py
            --ignore=tests/test_packaging.py --ignore=tests/test_gpu_check.py
            -n "$workers" --timeout 90 --junitxml="$out/tests.xml")
if [ $dry_run = 1 ]; then
  run_phase tests 160 "${pytest_gpu[@]}" -n 2 -m cuda
else
  run_phase tests 160 $quick_autotune "${pytest_gpu[@]}"
fi

# 3. compute-sanitizer on a handful of cases: tails, a storage offset, odd channels, both layouts
if [ $dry_run = 1 ]; then
  run_phase sanitizer 45 "$python" benchmarks/sanitizer_cases.py --device cpu
else
  for tool in memcheck racecheck synccheck; do
    run_phase "sanitizer $tool" 20 $quick_autotune compute-sanitizer --tool "$tool" \
      --error-exitcode 1 "$python" benchmarks/sanitizer_cases.py --device cuda
  done
fi

# 4. Headline figures, one fastres.bench run per backend so that each leaves its own CSV
if [ $dry_run = 1 ]; then
  run_phase "headline cpu" 135 "$python" -m fastres.bench --device cpu --model resnet18 \
    --batch-size 2 --image-size 32 --rounds 2 --no-compile --backend cpu --no-chart \
    --csv "$out/resnet50_cuda_bf16_dry-run.csv"
else
  headline=("$python" -m fastres.bench --device cuda --dtype bf16 --batch-size 256 --rounds 10
            --no-chart)
  run_phase "headline cuda" 50 "${headline[@]}" --backend cuda --no-compile \
    --csv "$out/resnet50_cuda_bf16_cuda.csv"
  run_phase "headline triton" 75 $quick_autotune "${headline[@]}" --backend triton --no-compile \
    --csv "$out/resnet50_cuda_bf16_triton.csv"
fi

# 5, 6, 7. Per-layer table, the profiled step, the finalize kernels alone (and torch.compile,
# which only fits a warm machine)
if [ $dry_run = 1 ]; then
  run_phase layers 60 "$python" benchmarks/layer_table.py --device cpu --batch-size 2 \
    --scale 8 --rounds 2 --csv "$out/layers.csv"
  run_phase profile 60 "$python" benchmarks/profile_step.py --device cpu --side 4 --steps 1 \
    --csv "$out/profile.csv"
  run_phase finalize 60 "$python" benchmarks/finalize_share.py --device cpu --rounds 2 \
    --csv "$out/.finalize.csv"
else
  run_phase layers 60 "$python" benchmarks/layer_table.py --device cuda --csv "$out/layers.csv"
  run_phase profile 30 "$python" benchmarks/profile_step.py --device cuda \
    --csv "$out/profile.csv"
  run_phase finalize 30 "$python" benchmarks/finalize_share.py --device cuda \
    --csv "$out/.finalize.csv"
  run_phase "headline compile" 600 "${headline[@]}" --backend cuda --compile --rounds 5 \
    --csv "$out/resnet50_cuda_bf16_compile.csv"
fi

"$python" benchmarks/gpu_check_summary.py "$out" $([ $dry_run = 1 ] && echo --dry-run) \
  || echo "summary failed; see $log"
rm -f "$phases" "$out/.finalize.csv"
echo "gpu_check done in $(elapsed) s; results in $out"
! grep -qE "\| (failed|timed out)" "$out/summary.md" 2>/dev/null
