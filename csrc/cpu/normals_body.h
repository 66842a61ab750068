// The vector paths' body, included by normals.cpp once per ISA inside a `#pragma GCC target` region and a
// namespace that defines the vector type V (W 32-bit lanes: V::W) and its operations. Each function is the
// portable code of philox.h written on W counters at once, operation for operation (see the notes there).

// The round keys of a call, each broadcast once: (k0 + r W0, k1 + r W1) for r = 0 .. 9.
struct RoundKeys {
  V::I k0[10], k1[10];
  RoundKeys(uint32_t a, uint32_t b) {
    for (int r = 0; r < 10; ++r, a += 0x9E3779B9u, b += 0xBB67AE85u) k0[r] = V::set1(a), k1[r] = V::set1(b);
  }
};

// Philox4x32-10 of W / 2 counters held in the low words of 64-bit lanes (c1, c2, c3 and the key shared). The
// high words carry garbage that nothing reads: the 32 x 32 -> 64-bit multiply reads the low words only, its
// product's low word is the product's lo and a 32-bit shift right its hi.
DDIMGMM_INLINE void philox64(V::I& c0, V::I& c1, V::I& c2, V::I& c3, const RoundKeys& key) {
  const V::I m0 = V::set1(0xD2511F53u), m1 = V::set1(0xCD9E8D57u);
#pragma GCC unroll 10
  for (int r = 0; r < 10; ++r) {
    const V::I p0 = V::mul_epu32(c0, m0), p1 = V::mul_epu32(c2, m1);
    c0 = V::xor3(V::srl64(p1, 32), c1, key.k0[r]);
    c2 = V::xor3(V::srl64(p0, 32), c3, key.k1[r]);
    c1 = p1;
    c3 = p0;
  }
}

// Philox4x32-10 of the W counters g0 + (0 .. W - 1) under (c1, c2, c3): the four words, W 32-bit lanes each.
DDIMGMM_INLINE void philox(uint32_t g0, uint32_t c1, uint32_t c2, uint32_t c3, const RoundKeys& key, V::I& w0,
                           V::I& w1, V::I& w2, V::I& w3) {
  V::I h[2][4];
  for (int half = 0; half < 2; ++half) {
    V::I* c = h[half];
    c[0] = V::add64(V::set1(g0), V::iota64(half)), c[1] = V::set1(c1), c[2] = V::set1(c2), c[3] = V::set1(c3);
    philox64(c[0], c[1], c[2], c[3], key);
  }
  w0 = V::pack64(h[0][0], h[1][0]);
  w1 = V::pack64(h[0][1], h[1][1]);
  w2 = V::pack64(h[0][2], h[1][2]);
  w3 = V::pack64(h[0][3], h[1][3]);
}

// log_unit of philox.h: log x for x in (0, 1].
DDIMGMM_INLINE V::F log_unit(V::F x) {
  const V::I bits = V::as_int(x);
  const V::I mant = V::and_(bits, V::set1(0x007FFFFFu));
  V::F m = V::as_float(V::or_(mant, V::set1(0x3F000000u)));
  const V::F low = V::to_float(V::srl32(V::sub(mant, V::set1(0x3504F3u)), 31));
  const V::F e = V::fsub(V::to_float(V::sub(V::srl32(bits, 23), V::set1(126u))), low);
  m = V::fsub(V::fmul(m, V::fadd(V::fset1(1.0f), low)), V::fset1(1.0f));
  const V::F z = V::fmul(m, m);
  V::F y = V::fset1(7.0376836292e-2f);
  y = V::fsub(V::fmul(y, m), V::fset1(1.1514610310e-1f));
  y = V::fadd(V::fmul(y, m), V::fset1(1.1676998740e-1f));
  y = V::fsub(V::fmul(y, m), V::fset1(1.2420140846e-1f));
  y = V::fadd(V::fmul(y, m), V::fset1(1.4249322787e-1f));
  y = V::fsub(V::fmul(y, m), V::fset1(1.6668057665e-1f));
  y = V::fadd(V::fmul(y, m), V::fset1(2.0000714765e-1f));
  y = V::fsub(V::fmul(y, m), V::fset1(2.4999993993e-1f));
  y = V::fadd(V::fmul(y, m), V::fset1(3.3333331174e-1f));
  y = V::fmul(V::fmul(y, m), z);
  y = V::fadd(y, V::fmul(V::fset1(-2.12194440e-4f), e));
  y = V::fadd(y, V::fmul(V::fset1(-0.5f), z));
  return V::fadd(V::fadd(m, y), V::fmul(V::fset1(0.693359375f), e));
}

// sincos_pi of philox.h: sin x and cos x for x in [-pi, pi].
DDIMGMM_INLINE void sincos_pi(V::F x, V::F& s, V::F& c) {
  const V::I sign_bit = V::set1(0x80000000u);
  const V::F ax = V::as_float(V::andnot(sign_bit, V::as_int(x)));
  const V::I j = V::and_(V::add(V::to_int_trunc(V::fmul(ax, V::fset1(1.27323954473516f))), V::set1(1u)), V::set1(~1u));
  const V::F y = V::to_float(j);
  const V::F r = V::fsub(V::fsub(V::fsub(ax, V::fmul(y, V::fset1(0.78515625f))),
                                 V::fmul(y, V::fset1(2.4187564849853515625e-4f))),
                         V::fmul(y, V::fset1(3.77489497744594108e-8f)));
  const V::F z = V::fmul(r, r);
  V::F ps = V::fadd(V::fmul(V::fset1(-1.9515295891e-4f), z), V::fset1(8.3321608736e-3f));
  ps = V::fsub(V::fmul(ps, z), V::fset1(1.6666654611e-1f));
  ps = V::fadd(V::fmul(V::fmul(ps, z), r), r);
  V::F pc = V::fsub(V::fmul(V::fset1(2.443315711809948e-5f), z), V::fset1(1.388731625493765e-3f));
  pc = V::fadd(V::fmul(pc, z), V::fset1(4.166664568298827e-2f));
  pc = V::fadd(V::fsub(V::fmul(V::fmul(pc, z), z), V::fmul(V::fset1(0.5f), z)), V::fset1(1.0f));
  // j = 2 swaps the polynomials; the signs as in philox.h, on the bit patterns
  const V::I swap = V::sub(V::set1(0u), V::and_(V::srl32(j, 1), V::set1(1u)));
  const V::I bs = V::as_int(ps), bc = V::as_int(pc);
  const V::I sin_ax = V::or_(V::andnot(swap, bs), V::and_(bc, swap));
  const V::I cos_ax = V::or_(V::andnot(swap, bc), V::and_(bs, swap));
  const V::I sin_sign = V::xor_(V::sll32(V::and_(j, V::set1(4u)), 29), V::and_(V::as_int(x), sign_bit));
  const V::I cos_sign = V::sll32(V::and_(V::xor_(V::srl32(j, 2), V::srl32(j, 1)), V::set1(1u)), 31);
  s = V::as_float(V::xor_(sin_ax, sin_sign));
  c = V::as_float(V::xor_(cos_ax, cos_sign));
}

// BoxMuller<float>::pair of philox.h on W pairs of words.
DDIMGMM_INLINE void box_muller(V::I wa, V::I wb, V::F& n0, V::F& n1) {
  const V::F scale = V::fset1(0x1p-24f);
  const V::F u1 = V::fmul(V::to_float(V::add(V::srl32(wa, 8), V::set1(1u))), scale);
  const V::F u2 = V::fmul(V::to_float(V::srl32(wb, 8)), scale);
  const V::F th = V::fmul(V::fset1(6.28318530717958647692f), V::fsub(u2, V::fset1(0.5f)));
  const V::F r = V::sqrt(V::fmul(V::fset1(-2.0f), log_unit(u1)));
  V::F s, c;
  sincos_pi(th, s, c);
  n0 = V::fmul(r, c);
  n1 = V::fmul(r, s);
}

// 4 W U normals of the counters g0 + (0 .. U W - 1) into z (unaligned), in element order. U blocks at once: each
// normal is a chain of dependent operations (the Philox rounds, then the log and sin / cos polynomials), so one
// block leaves the vector units waiting on latencies that the other blocks' chains fill.
template <int U>
DDIMGMM_INLINE void normals_block(float* z, uint32_t g0, uint32_t c1, uint32_t c2, uint32_t c3, const RoundKeys& key) {
  V::I w[4 * U];
  for (int u = 0; u < U; ++u) {
    philox(g0 + uint32_t(u * V::W), c1, c2, c3, key, w[4 * u], w[4 * u + 1], w[4 * u + 2], w[4 * u + 3]);
  }
  V::F n[4 * U];
  for (int u = 0; u < 2 * U; ++u) box_muller(w[2 * u], w[2 * u + 1], n[2 * u], n[2 * u + 1]);
  for (int u = 0; u < U; ++u) V::store4_interleaved(z + 4 * V::W * u, n[4 * u], n[4 * u + 1], n[4 * u + 2], n[4 * u + 3]);
}

void normals(float* z, uint32_t g0, int64_t groups, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const RoundKeys key(k0, k1);
  constexpr int U = 4;  // 4 blocks: on AVX-512 256 normals, one chunk of the step kernel (step.cpp)
  int64_t g = 0;
  for (; g + U * V::W <= groups; g += U * V::W) normals_block<U>(z + 4 * g, g0 + uint32_t(g), c1, c2, c3, key);
  for (; g + V::W <= groups; g += V::W) normals_block<1>(z + 4 * g, g0 + uint32_t(g), c1, c2, c3, key);
  if (g < groups) {  // the last, partial block through a buffer
    alignas(64) float tail[4 * V::W];
    normals_block<1>(tail, g0 + uint32_t(g), c1, c2, c3, key);
    for (int64_t i = 0; i < 4 * (groups - g); ++i) z[4 * g + i] = tail[i];
  }
}

// The bare generator, the bound of normals(): Philox of the counters 0 .. groups - 1, its words folded by xor
// (what no optimiser can drop), no Box-Muller, no store; the last, partial block by the portable loop.
uint32_t philox_only(int64_t groups, uint32_t k0, uint32_t k1) {
  const RoundKeys key(k0, k1);
  V::I acc = V::set1(0u);
  int64_t g = 0;
  for (; g + V::W <= groups; g += V::W) {
    V::I w0, w1, w2, w3;
    philox(uint32_t(g), 0, 0, 0, key, w0, w1, w2, w3);
    acc = V::xor_(acc, V::xor3(w0, w1, V::xor_(w2, w3)));
  }
  return V::fold_xor(acc) ^ portable::philox_only(g, groups, k0, k1);
}
