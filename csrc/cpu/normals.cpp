// The paths of normals.h. The vector bodies (normals_body.h) are compiled once per ISA in a target region, so
// the library still loads on any x86-64 CPU; the path is chosen at run time from the CPU's features. Results
// are bit-identical across paths only without FMA contraction (-ffp-contract=off, setup.py; the pragma below
// makes it hold whatever the flags).
#pragma GCC optimize("fp-contract=off")
// AVX vector types in the target regions' inline helpers only (no ABI crosses them); GCC 12's set1 intrinsics
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "normals.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "philox.h"

#if defined(__GNUC__)
#define DDIMGMM_EXPORT extern "C" __attribute__((visibility("default")))
#else
#define DDIMGMM_EXPORT extern "C" __declspec(dllexport)
#endif

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define DDIMGMM_NORMALS_SIMD 1
#include <immintrin.h>
#else
#define DDIMGMM_NORMALS_SIMD 0
#endif

namespace ddimgmm {
namespace philox {

namespace portable {

// The portable loop, built for the widest vectors the compiler can use on this CPU (ISA clones).
DDIMGMM_ISA_CLONES
void normals(float* z, uint32_t g0, int64_t groups, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#pragma omp simd
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t w0 = g0 + uint32_t(g), w1 = c1, w2 = c2, w3 = c3;
    philox4x32_10(w0, w1, w2, w3, k0, k1);
    BoxMuller<float>::pair(w0, w1, z[4 * g], z[4 * g + 1]);
    BoxMuller<float>::pair(w2, w3, z[4 * g + 2], z[4 * g + 3]);
  }
}

DDIMGMM_ISA_CLONES
uint32_t philox_only(int64_t begin, int64_t end, uint32_t k0, uint32_t k1) {
  uint32_t acc = 0;
#pragma omp simd reduction(^ : acc)
  for (int64_t g = begin; g < end; ++g) {
    uint32_t w0 = uint32_t(g), w1 = 0, w2 = 0, w3 = 0;
    philox4x32_10(w0, w1, w2, w3, k0, k1);
    acc ^= w0 ^ w1 ^ w2 ^ w3;
  }
  return acc;
}

}  // namespace portable

#if DDIMGMM_NORMALS_SIMD

#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {

struct V {
  using I = __m512i;
  using F = __m512;
  static constexpr int W = 16;
  static DDIMGMM_INLINE I set1(uint32_t v) { return _mm512_set1_epi32(int(v)); }
  static DDIMGMM_INLINE F fset1(float v) { return _mm512_set1_ps(v); }
  static DDIMGMM_INLINE I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static DDIMGMM_INLINE I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static DDIMGMM_INLINE I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static DDIMGMM_INLINE I andnot(I a, I b) { return _mm512_andnot_si512(a, b); }  // ~a & b
  static DDIMGMM_INLINE I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static DDIMGMM_INLINE I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  static DDIMGMM_INLINE I xor3(I a, I b, I c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static DDIMGMM_INLINE I srl32(I a, int n) { return _mm512_srli_epi32(a, unsigned(n)); }
  static DDIMGMM_INLINE I sll32(I a, int n) { return _mm512_slli_epi32(a, unsigned(n)); }
  static DDIMGMM_INLINE I srl64(I a, int n) { return _mm512_srli_epi64(a, unsigned(n)); }
  static DDIMGMM_INLINE I mul_epu32(I a, I b) { return _mm512_mul_epu32(a, b); }
  // Philox runs on counters held in 64-bit lanes (the low word; the high word is ignored): half h of the W
  // counters, offsets h W / 2 + (0 .. W / 2 - 1), packed back to W 32-bit lanes in counter order.
  static DDIMGMM_INLINE I iota64(int half) {
    return half ? _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15) : _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  }
  static DDIMGMM_INLINE I add64(I a, I b) { return _mm512_add_epi64(a, b); }
  static DDIMGMM_INLINE I pack64(I lo, I hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo)), _mm512_cvtepi64_epi32(hi), 1);
  }
  static DDIMGMM_INLINE F as_float(I a) { return _mm512_castsi512_ps(a); }
  static DDIMGMM_INLINE I as_int(F a) { return _mm512_castps_si512(a); }
  static DDIMGMM_INLINE F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  static DDIMGMM_INLINE I to_int_trunc(F a) { return _mm512_cvttps_epi32(a); }
  static DDIMGMM_INLINE F fadd(F a, F b) { return _mm512_add_ps(a, b); }
  static DDIMGMM_INLINE F fsub(F a, F b) { return _mm512_sub_ps(a, b); }
  static DDIMGMM_INLINE F fmul(F a, F b) { return _mm512_mul_ps(a, b); }
  static DDIMGMM_INLINE F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static DDIMGMM_INLINE uint32_t fold_xor(I a) {
    alignas(64) uint32_t v[W];
    _mm512_store_si512(reinterpret_cast<__m512i*>(v), a);
    uint32_t acc = 0;
    for (uint32_t x : v) acc ^= x;
    return acc;
  }
  // z[4 i + 0..3] = a[i], b[i], c[i], d[i]: a 4 x 4 transpose in each 128-bit lane, then of the lanes.
  static DDIMGMM_INLINE void store4_interleaved(float* z, F a, F b, F c, F d) {
    const F ab_lo = _mm512_unpacklo_ps(a, b), ab_hi = _mm512_unpackhi_ps(a, b);
    const F cd_lo = _mm512_unpacklo_ps(c, d), cd_hi = _mm512_unpackhi_ps(c, d);
    auto pd = [](F v) { return _mm512_castps_pd(v); };
    auto ps = [](__m512d v) { return _mm512_castpd_ps(v); };
    const F u0 = ps(_mm512_unpacklo_pd(pd(ab_lo), pd(cd_lo))), u1 = ps(_mm512_unpackhi_pd(pd(ab_lo), pd(cd_lo)));
    const F u2 = ps(_mm512_unpacklo_pd(pd(ab_hi), pd(cd_hi))), u3 = ps(_mm512_unpackhi_pd(pd(ab_hi), pd(cd_hi)));
    // u_k holds group 4 l + k in its lane l
    const F v0 = _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(1, 0, 1, 0));
    const F v1 = _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(3, 2, 3, 2));
    const F v2 = _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(1, 0, 1, 0));
    const F v3 = _mm512_shuffle_f32x4(u2, u3, _MM_SHUFFLE(3, 2, 3, 2));
    _mm512_storeu_ps(z, _mm512_shuffle_f32x4(v0, v2, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(z + 16, _mm512_shuffle_f32x4(v0, v2, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(z + 32, _mm512_shuffle_f32x4(v1, v3, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(z + 48, _mm512_shuffle_f32x4(v1, v3, _MM_SHUFFLE(3, 1, 3, 1)));
  }
};

#include "normals_body.h"

}  // namespace avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {

struct V {
  using I = __m256i;
  using F = __m256;
  static constexpr int W = 8;
  static DDIMGMM_INLINE I set1(uint32_t v) { return _mm256_set1_epi32(int(v)); }
  static DDIMGMM_INLINE F fset1(float v) { return _mm256_set1_ps(v); }
  static DDIMGMM_INLINE I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static DDIMGMM_INLINE I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static DDIMGMM_INLINE I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static DDIMGMM_INLINE I andnot(I a, I b) { return _mm256_andnot_si256(a, b); }  // ~a & b
  static DDIMGMM_INLINE I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static DDIMGMM_INLINE I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  static DDIMGMM_INLINE I xor3(I a, I b, I c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static DDIMGMM_INLINE I srl32(I a, int n) { return _mm256_srli_epi32(a, n); }
  static DDIMGMM_INLINE I sll32(I a, int n) { return _mm256_slli_epi32(a, n); }
  static DDIMGMM_INLINE I srl64(I a, int n) { return _mm256_srli_epi64(a, n); }
  static DDIMGMM_INLINE I mul_epu32(I a, I b) { return _mm256_mul_epu32(a, b); }
  static DDIMGMM_INLINE I iota64(int half) { return half ? _mm256_setr_epi64x(4, 5, 6, 7) : _mm256_setr_epi64x(0, 1, 2, 3); }
  static DDIMGMM_INLINE I add64(I a, I b) { return _mm256_add_epi64(a, b); }
  static DDIMGMM_INLINE I pack64(I lo, I hi) {
    const __m256 even = _mm256_shuffle_ps(_mm256_castsi256_ps(lo), _mm256_castsi256_ps(hi), _MM_SHUFFLE(2, 0, 2, 0));
    return _mm256_permute4x64_epi64(_mm256_castps_si256(even), _MM_SHUFFLE(3, 1, 2, 0));
  }
  static DDIMGMM_INLINE F as_float(I a) { return _mm256_castsi256_ps(a); }
  static DDIMGMM_INLINE I as_int(F a) { return _mm256_castps_si256(a); }
  static DDIMGMM_INLINE F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  static DDIMGMM_INLINE I to_int_trunc(F a) { return _mm256_cvttps_epi32(a); }
  static DDIMGMM_INLINE F fadd(F a, F b) { return _mm256_add_ps(a, b); }
  static DDIMGMM_INLINE F fsub(F a, F b) { return _mm256_sub_ps(a, b); }
  static DDIMGMM_INLINE F fmul(F a, F b) { return _mm256_mul_ps(a, b); }
  static DDIMGMM_INLINE F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static DDIMGMM_INLINE uint32_t fold_xor(I a) {
    alignas(32) uint32_t v[W];
    _mm256_store_si256(reinterpret_cast<__m256i*>(v), a);
    uint32_t acc = 0;
    for (uint32_t x : v) acc ^= x;
    return acc;
  }
  static DDIMGMM_INLINE void store4_interleaved(float* z, F a, F b, F c, F d) {
    const F ab_lo = _mm256_unpacklo_ps(a, b), ab_hi = _mm256_unpackhi_ps(a, b);
    const F cd_lo = _mm256_unpacklo_ps(c, d), cd_hi = _mm256_unpackhi_ps(c, d);
    auto pd = [](F v) { return _mm256_castps_pd(v); };
    auto ps = [](__m256d v) { return _mm256_castpd_ps(v); };
    const F u0 = ps(_mm256_unpacklo_pd(pd(ab_lo), pd(cd_lo))), u1 = ps(_mm256_unpackhi_pd(pd(ab_lo), pd(cd_lo)));
    const F u2 = ps(_mm256_unpacklo_pd(pd(ab_hi), pd(cd_hi))), u3 = ps(_mm256_unpackhi_pd(pd(ab_hi), pd(cd_hi)));
    // u_k holds group 4 l + k in its lane l
    _mm256_storeu_ps(z, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(z + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_storeu_ps(z + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(z + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
  }
};

#include "normals_body.h"

}  // namespace avx2
#pragma GCC pop_options

#endif  // DDIMGMM_NORMALS_SIMD

namespace {

bool supported(NormalsPath path) {
#if DDIMGMM_NORMALS_SIMD
  if (path == NormalsPath::avx512) return __builtin_cpu_supports("avx512f");
  if (path == NormalsPath::avx2) return __builtin_cpu_supports("avx2");
#endif
  return path == NormalsPath::portable;
}

NormalsPath choose() {
  NormalsPath want = NormalsPath::avx512;
  if (const char* v = std::getenv("DDIMGMM_CPU_NORMALS")) {
    if (std::strcmp(v, "portable") == 0) want = NormalsPath::portable;
    if (std::strcmp(v, "avx2") == 0) want = NormalsPath::avx2;
  }
  while (!supported(want)) want = NormalsPath(int(want) - 1);
  return want;
}

}  // namespace

// -1 until the first call chooses; a relaxed atomic, read once per chunk of normals.
namespace {
std::atomic<int> chosen_path{-1};
}  // namespace

NormalsPath normals_path() {
  int path = chosen_path.load(std::memory_order_relaxed);
  if (path < 0) {
    path = int(choose());
    chosen_path.store(path, std::memory_order_relaxed);
  }
  return NormalsPath(path);
}

const char* normals_path_name(NormalsPath path) {
  switch (path) {
    case NormalsPath::avx512: return "avx512";
    case NormalsPath::avx2: return "avx2";
    default: return "portable";
  }
}

void normals_on(NormalsPath path, float* z, uint32_t g0, int64_t groups, uint32_t c1, uint32_t c2, uint32_t c3,
                uint32_t k0, uint32_t k1) {
#if DDIMGMM_NORMALS_SIMD
  if (path == NormalsPath::avx512) return avx512::normals(z, g0, groups, c1, c2, c3, k0, k1);
  if (path == NormalsPath::avx2) return avx2::normals(z, g0, groups, c1, c2, c3, k0, k1);
#endif
  portable::normals(z, g0, groups, c1, c2, c3, k0, k1);
}

void normals(float* z, uint32_t g0, int64_t groups, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  normals_on(normals_path(), z, g0, groups, c1, c2, c3, k0, k1);
}

}  // namespace philox
}  // namespace ddimgmm

// For tests and benchmarks (ctypes on the built library; tests/ops/test_normals_paths.py,
// benchmarks/noise_results.py): the normals through a named path (0 portable, 1 AVX2, 2 AVX-512), or the bare
// Philox loop of that path (z ignored; returns the words' xor). -1 where the CPU lacks the path.
DDIMGMM_EXPORT int64_t ddimgmm_cpu_normals(int32_t path, int32_t bare, float* z, uint32_t g0, int64_t groups,
                                           uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  using namespace ddimgmm::philox;
  if (path < 0 || path > 2 || !supported(NormalsPath(path))) return -1;
  if (!bare) {
    normals_on(NormalsPath(path), z, g0, groups, c1, c2, c3, k0, k1);
    return 0;
  }
#if DDIMGMM_NORMALS_SIMD
  if (path == 2) return avx512::philox_only(groups, k0, k1);
  if (path == 1) return avx2::philox_only(groups, k0, k1);
#endif
  return portable::philox_only(0, groups, k0, k1);
}

// The path the step kernel takes in this process (0, 1, 2 as above); with path >= 0, first set it to that path or,
// where the CPU lacks it, to the widest it has below it.
DDIMGMM_EXPORT int32_t ddimgmm_cpu_normals_path(int32_t path) {
  using namespace ddimgmm::philox;
  if (path >= 0) {
    NormalsPath p = NormalsPath(path > 2 ? 2 : path);
    while (!supported(p)) p = NormalsPath(int(p) - 1);
    chosen_path.store(int(p), std::memory_order_relaxed);
  }
  return int32_t(normals_path());
}
