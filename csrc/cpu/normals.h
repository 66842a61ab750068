// float32 normals of the package's random stream (philox.h, docs/design.md section 2), a run of groups at a
// time, on the widest path the CPU has: AVX-512 (16 Philox counters per vector), AVX2 (8) or the portable loop
// (draw_normals in step.cpp's terms: philox4x32_10 and BoxMuller<float>::pair, vectorised by the compiler).
// Every path gives the same bits: the vector paths run the portable code's operations in its order (the same
// log / sin / cos polynomials, no FMA, IEEE sqrt), and tests/ops/test_normals_paths.py compares them.
#pragma once

#include <cstdint>

namespace ddimgmm {
namespace philox {

enum class NormalsPath { portable = 0, avx2 = 1, avx512 = 2 };

// The path normals() takes: the widest the CPU supports, or a narrower one named by the environment variable
// DDIMGMM_CPU_NORMALS ("portable", "avx2", "avx512"; read at the first call; a path the CPU lacks falls back to
// the widest it has below it). Tests and benchmarks switch it through ddimgmm_cpu_normals_path (normals.cpp;
// ddim_gmm_ext/ops/cpu_normals.py).
NormalsPath normals_path();
const char* normals_path_name(NormalsPath path);

// z[4 g + l] = lane l of the Box-Muller normals of philox(g0 + g, c1, c2, c3) under the key (k0, k1), for
// g in [0, groups): 4 * groups floats written.
void normals(float* z, uint32_t g0, int64_t groups, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1);

// The same through a given path (the benchmark's and the path tests' entry; `path` must be supported).
void normals_on(NormalsPath path, float* z, uint32_t g0, int64_t groups, uint32_t c1, uint32_t c2, uint32_t c3,
                uint32_t k0, uint32_t k1);

}  // namespace philox
}  // namespace ddimgmm
