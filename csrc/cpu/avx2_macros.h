// The predefined macros of AVX2 + FMA + F16C, for a translation unit that switches code
// generation with `#pragma GCC target` (which, unlike -mavx2 -mfma -mf16c, defines none of
// them): sleef.h and ATen's vector headers test them. Include after the pragma.
#pragma once

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
