// CPU kernels of the fused BatchNorm (+ residual) (+ ReLU) op.
//
// Raw pointers and sizes only; the binding (bn_act.cpp) checks tensors and allocates.
// `T` is the activation type (float, double, c10::Half, c10::BFloat16); per-channel values
// (statistics, scale, shift, coefficients) are in `opmath<T>`: float for float/half/bfloat16,
// double for double.
//
// The kernels are declared once per instruction set they are compiled for (see
// bn_act_kernel_impl.h); call them through FASTRES_CPU_DISPATCH, which picks the build ATen
// picks for its own CPU kernels.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../common/bn_act_layout.h"

// On x86-64 the AVX2 and AVX-512 builds exist beside the generic one.
#if defined(__x86_64__) || defined(_M_X64)
#define FASTRES_CPU_AVX2_BUILT 1
#endif

namespace fastres::cpu {

template <typename T>
using opmath = at::opmath_type<T>;

// The instruction sets the kernels are compiled for, lowest first.
enum class CpuIsa { kGeneric, kAvx2, kAvx512 };

// The build the kernels run: ATen's own choice for its CPU kernels (at::get_cpu_capability,
// which honours the ATEN_CPU_CAPABILITY environment variable), checked once. A processor or
// setting below AVX2 runs the generic build.
CpuIsa cpu_kernel_isa();

// The name of cpu_kernel_isa(): "AVX512", "AVX2" or "DEFAULT" (the baseline build).
const char* cpu_kernel_isa_name();

#ifdef FASTRES_CPU_AVX2_BUILT
#define FASTRES_CPU_DISPATCH(fn, ...)                                  \
  (::fastres::cpu::cpu_kernel_isa() == ::fastres::cpu::CpuIsa::kAvx512 \
       ? ::fastres::cpu::avx512::fn(__VA_ARGS__)                       \
   : ::fastres::cpu::cpu_kernel_isa() == ::fastres::cpu::CpuIsa::kAvx2 \
       ? ::fastres::cpu::avx2::fn(__VA_ARGS__)                         \
       : ::fastres::cpu::generic::fn(__VA_ARGS__))
#else
#define FASTRES_CPU_DISPATCH(fn, ...) ::fastres::cpu::generic::fn(__VA_ARGS__)
#endif

}  // namespace fastres::cpu

// The kernel declarations, once per instruction-set namespace.
#define FASTRES_CPU_DECLS_NS generic
#include "bn_act_kernel_decls.h"
#undef FASTRES_CPU_DECLS_NS
#ifdef FASTRES_CPU_AVX2_BUILT
#define FASTRES_CPU_DECLS_NS avx2
#include "bn_act_kernel_decls.h"
#undef FASTRES_CPU_DECLS_NS
#define FASTRES_CPU_DECLS_NS avx512
#include "bn_act_kernel_decls.h"
#undef FASTRES_CPU_DECLS_NS
#endif
