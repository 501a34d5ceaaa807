// CPU kernels of the fused BatchNorm (+ residual) (+ ReLU) op.
//
// Raw pointers and sizes only; the binding (bn_act.cpp) checks tensors and allocates.
// `T` is the activation type (float, double, c10::Half, c10::BFloat16); per-channel values
// (statistics, scale, shift, coefficients) are in `opmath<T>`: float for float/half/bfloat16,
// double for double.
//
// The kernels are declared twice, once per instruction set they are compiled for (see
// bn_act_kernel_impl.h); call them through FASTRES_CPU_DISPATCH, which picks the AVX2 build
// where the processor can run it.
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "../common/bn_act_layout.h"

#if defined(__x86_64__) || defined(_M_X64)
#define FASTRES_CPU_AVX2_BUILT 1
#endif

namespace fastres::cpu {

template <typename T>
using opmath = at::opmath_type<T>;

// True when the processor runs AVX2, FMA and F16C (checked once).
bool cpu_has_avx2();

#ifdef FASTRES_CPU_AVX2_BUILT
#define FASTRES_CPU_DISPATCH(fn, ...)                                     \
  (::fastres::cpu::cpu_has_avx2() ? ::fastres::cpu::avx2::fn(__VA_ARGS__) \
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
#endif
