// The CPU kernels of bn_act for the baseline instruction set (namespace generic), and the
// run-time choice of the build (generic, bn_act_kernel_avx2.cpp or bn_act_kernel_avx512.cpp).
#include "bn_act_kernel.h"

#include <ATen/Version.h>

#include <string>

#define FASTRES_CPU_ISA generic
#include "bn_act_kernel_impl.h"
#undef FASTRES_CPU_ISA

namespace fastres::cpu {

namespace {

CpuIsa detect_cpu_kernel_isa() {
#ifdef FASTRES_CPU_AVX2_BUILT
  // ATen checks the processor (and the operating system's support for the registers) before
  // choosing; the checks here guard against an ATen built for another processor family.
  const std::string aten = at::get_cpu_capability();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  if (aten == "AVX512" && avx512) return CpuIsa::kAvx512;
  if ((aten == "AVX512" || aten == "AVX2") && avx2) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kGeneric;
}

}  // namespace

CpuIsa cpu_kernel_isa() {
  static const CpuIsa isa = detect_cpu_kernel_isa();
  return isa;
}

const char* cpu_kernel_isa_name() {
  switch (cpu_kernel_isa()) {
    case CpuIsa::kAvx512:
      return "AVX512";
    case CpuIsa::kAvx2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

}  // namespace fastres::cpu
