// The CPU kernels of bn_act compiled for AVX-512 (F, BW, VL, DQ; namespace avx512), ATen's
// AVX512 level. Only called when cpu_kernel_isa() says ATen runs its own AVX512 kernels.
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
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#include "avx2_macros.h"
// AVX-512's predefined macros, which the pragma does not define either (see avx2_macros.h).
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
// Selects at::vec::Vectorized's AVX-512 implementation, in its own namespace (at::vec::AVX512).
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define FASTRES_CPU_ISA avx512
#include "bn_act_kernel_impl.h"
#endif
