// The CPU kernels of bn_act compiled for AVX2 + FMA (namespace avx2), as ATen compiles its own
// CPU kernels once per capability. Only called when cpu_kernel_isa() says ATen runs its own AVX2
// kernels (AVX2, FMA and F16C).
#include "bn_act_kernel.h"  // defines FASTRES_CPU_AVX2_BUILT on x86-64

#ifdef FASTRES_CPU_AVX2_BUILT
#pragma GCC target("avx2,fma,f16c")
// The pragma switches code generation, but not the predefined macros that sleef.h and ATen's
// vec256 headers test, as -mavx2 -mfma -mf16c would; define them for this translation unit.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
// Selects at::vec::Vectorized's AVX2 implementation, in its own namespace (at::vec::AVX2).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FASTRES_CPU_ISA avx2
#include "bn_act_kernel_impl.h"
#endif
