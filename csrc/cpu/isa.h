// Portability macros of the CPU kernels.
#pragma once

// Helpers forced inline, so that ISA clones of their callers compile them for the clone's ISA.
#if defined(__GNUC__)
#define DDIMGMM_INLINE inline __attribute__((always_inline))
#else
#define DDIMGMM_INLINE inline
#endif

// Hot loops built for the widest vectors the CPU has; the clone is picked at load time. Results are
// bit-identical across clones: same operations, and no FMA contraction (-ffp-contract=off, setup.py).
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define DDIMGMM_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DDIMGMM_ISA_CLONES
#endif
