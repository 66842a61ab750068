// Philox4x32-10 and Box-Muller exactly as ddim_gmm_ext/reference.py defines the package's random stream.
// Shared by the CPU kernels (step.cpp, offset_directions.cpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "isa.h"

namespace ddimgmm {
namespace philox {

// ---- Philox4x32-10 (Salmon et al. 2011), as reference.philox4x32 ---------------------------------------
DDIMGMM_INLINE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// ---- log, sin, cos for Box-Muller ----------------------------------------------------------------------
// Branch-free float32 versions (Cephes logf / sinf / cosf polynomials, ~1 ulp) so that the normals loop
// vectorises; std:: calls would keep it scalar. Domains are those Box-Muller needs: log on (0, 1] normal
// floats, sin / cos on [-pi, pi]. float64 uses std:: (float64 is not the fast path).
DDIMGMM_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
DDIMGMM_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

DDIMGMM_INLINE float log_unit(float x) {
  const uint32_t bits = float_to_bits(x);
  const uint32_t mant = bits & 0x007FFFFFu;
  float m = bits_to_float(mant | 0x3F000000u);  // x = m 2^e, m in [1/2, 1)
  // centre m on 1: m < sqrt(1/2) (float 0x3F3504F3) -> (2m - 1, e - 1), else (m - 1, e); written as
  // arithmetic so that the loop stays branch-free (both forms are exact)
  const float low = float((mant - 0x3504F3u) >> 31);
  const float e = float(int32_t(bits >> 23) - 126) - low;
  m = m * (1.0f + low) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;  // log 2 = 0.693359375 - 2.12194440e-4, split for an exact e * log 2
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

DDIMGMM_INLINE void sincos_pi(float x, float& s, float& c) {
  const float ax = std::fabs(x);
  const int32_t j = (int32_t(ax * 1.27323954473516f) + 1) & ~1;  // octant of |x|, rounded up to even: 0, 2, 4
  const float y = float(j);
  const float r = ((ax - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const float z = r * r;
  const float ps = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float pc =
      ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z - 0.5f * z + 1.0f;
  // j = 2: the polynomials swap roles; sin(|x|) changes sign for j = 4, cos(x) for j = 2 and j = 4.
  // Selects and sign flips on the bit patterns keep the loop branch-free.
  const uint32_t swap = 0u - uint32_t((j >> 1) & 1);
  const uint32_t bs = float_to_bits(ps), bc = float_to_bits(pc);
  const uint32_t sin_ax = (bs & ~swap) | (bc & swap), cos_ax = (bc & ~swap) | (bs & swap);
  const uint32_t sin_sign = (uint32_t(j & 4) << 29) ^ (float_to_bits(x) & 0x80000000u);
  const uint32_t cos_sign = uint32_t(((j >> 2) ^ (j >> 1)) & 1) << 31;
  s = bits_to_float(sin_ax ^ sin_sign);
  c = bits_to_float(cos_ax ^ cos_sign);
}

template <typename T>
struct BoxMuller;

template <>
struct BoxMuller<float> {
  // Two normals from two words, exactly the reference's formula in float32.
  static DDIMGMM_INLINE void pair(uint32_t wa, uint32_t wb, float& n0, float& n1) {
    const float u1 = float((wa >> 8) + 1u) * 0x1p-24f;  // (0, 1]
    const float u2 = float(wb >> 8) * 0x1p-24f;         // [0, 1)
    const float th = 6.28318530717958647692f * (u2 - 0.5f);
    const float r = std::sqrt(-2.0f * log_unit(u1));
    float s, c;
    sincos_pi(th, s, c);
    n0 = r * c;
    n1 = r * s;
  }
};

template <>
struct BoxMuller<double> {
  static inline void pair(uint32_t wa, uint32_t wb, double& n0, double& n1) {
    const double u1 = double((wa >> 8) + 1u) * 0x1p-24;
    const double u2 = double(wb >> 8) * 0x1p-24;
    const double th = 6.28318530717958647692 * (u2 - 0.5);
    const double r = std::sqrt(-2.0 * std::log(u1));
    n0 = r * std::cos(th);
    n1 = r * std::sin(th);
  }
};

}  // namespace philox
}  // namespace ddimgmm
