// The CPU kernels of bn_act for the baseline instruction set (namespace generic), and the
// run-time check that picks the AVX2 build (bn_act_kernel_avx2.cpp) where it can run.
#include "bn_act_kernel.h"

#define FASTRES_CPU_ISA generic
#include "bn_act_kernel_impl.h"
#undef FASTRES_CPU_ISA

namespace fastres::cpu {

bool cpu_has_avx2() {
#ifdef FASTRES_CPU_AVX2_BUILT
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

}  // namespace fastres::cpu
