// The CPU kernels of bn_act compiled for AVX-512 (F, BW, VL, DQ; namespace avx512), ATen's
// AVX512 level. Only called when cpu_kernel_isa() says ATen runs its own AVX512 kernels.
#include "bn_act_kernel.h"  // defines FASTRES_CPU_AVX2_BUILT on x86-64

#ifdef FASTRES_CPU_AVX2_BUILT
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
// The pragma switches code generation, but not the predefined macros that sleef.h and ATen's
// vec512 headers test, as -mavx512f etc. would; define them for this translation unit.
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
