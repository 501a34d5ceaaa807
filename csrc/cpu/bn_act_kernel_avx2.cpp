// The CPU kernels of bn_act compiled for AVX2 + FMA (namespace avx2), as ATen compiles its own
// CPU kernels once per capability. Only called when cpu_kernel_isa() says ATen runs its own AVX2
// kernels (AVX2, FMA and F16C).
#include "bn_act_kernel.h"  // defines FASTRES_CPU_AVX2_BUILT on x86-64

// Everything but the vector headers is included before the pragma below, so that the inline
// functions these headers define (the standard library's, c10's, ATen's parallel_for) are
// compiled for the baseline here too: the linker keeps one copy of each, which must run on any
// processor. bn_act_kernel.h (and through it OpMathType.h, Half and BFloat16) comes before
// CPU_CAPABILITY is defined for the same reason: their conversions must be the same code in
// every build.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef FASTRES_CPU_AVX2_BUILT
#pragma GCC target("avx2,fma,f16c")
#include "avx2_macros.h"
// Selects at::vec::Vectorized's AVX2 implementation, in its own namespace (at::vec::AVX2).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FASTRES_CPU_ISA avx2
#include "bn_act_kernel_impl.h"
#endif
