// Host test of csrc/cuda/nchw_steps.h (run by tests/test_cuda_compile.py): for every shape, the
// NCHW reduction's steps and slots read each element of a channel exactly once, and small planes
// fill their steps.
#include "cuda/nchw_steps.h"

#include <cstdio>
#include <vector>

using fastres::cuda::nchw_element;
using fastres::cuda::nchw_slot;
using fastres::cuda::NchwSlot;
using fastres::cuda::NchwSteps;

constexpr int kUnit = 1024;  // bn_act_kernel.cu's kNchwUnit

int check(int64_t planes, int64_t plane_size) {
  const NchwSteps steps = NchwSteps::of(planes, plane_size, kUnit);
  std::vector<int> reads(static_cast<size_t>(planes * plane_size), 0);
  int64_t used = 0;
  for (int64_t step = 0; step < steps.count(); ++step) {
    for (int s = 0; s < kUnit; ++s) {
      const NchwSlot slot = nchw_slot(steps, s);
      int64_t plane, hw;
      if (nchw_element(steps, slot, step, plane, hw)) {
        ++reads[static_cast<size_t>(plane * plane_size + hw)];
        ++used;
      }
    }
  }
  for (size_t i = 0; i < reads.size(); ++i) {
    if (reads[i] != 1) {
      std::printf("n=%lld hw=%lld: element %zu read %d times\n", static_cast<long long>(planes),
                  static_cast<long long>(plane_size), i, reads[i]);
      return 1;
    }
  }
  // Small planes: every step but the last reads at least half its slots.
  const int64_t full_steps = steps.count() - 1;
  if (2 * plane_size <= kUnit && full_steps > 0 && used < full_steps * kUnit / 2) {
    std::printf("n=%lld hw=%lld: %lld reads in %lld steps\n", static_cast<long long>(planes),
                static_cast<long long>(plane_size), static_cast<long long>(used),
                static_cast<long long>(steps.count()));
    return 1;
  }
  return 0;
}

int main() {
  const int64_t planes[] = {1, 2, 3, 21, 256};
  const int64_t sizes[] = {1, 7, 49, 196, 511, 512, 513, 784, 1023, 1024, 1025, 3136, 12544};
  int failures = 0;
  for (int64_t n : planes) {
    for (int64_t hw : sizes) failures += check(n, hw);
  }
  std::printf(failures ? "FAILED\n" : "ok\n");
  return failures ? 1 : 0;
}
