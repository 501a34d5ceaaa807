// The CPU kernels of bn_act compiled for AVX2 + FMA (namespace avx2), as ATen compiles its own
// CPU kernels once per capability. Only called when cpu_kernel_isa() says ATen runs its own AVX2
// kernels (AVX2, FMA and F16C).
#include "bn_act_kernel.h"  // defines FASTRES_CPU_AVX2_BUILT on x86-64

#ifdef FASTRES_CPU_AVX2_BUILT
#pragma GCC target("avx2,fma,f16c")
#include "avx2_macros.h"
// Selects at::vec::Vectorized's AVX2 implementation, in its own namespace (at::vec::AVX2).
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FASTRES_CPU_ISA avx2
#include "bn_act_kernel_impl.h"
#endif
