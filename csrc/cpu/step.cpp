// CPU kernel of ddimgmm::step (docs/design.md sections 1-3; semantics: ddim_gmm_ext/reference.py,
// `step_from_table`).
//
// One pass over memory: each task is one block of one sample; per chunk of CH elements it draws the normals
// z (Philox4x32-10 in registers, Box-Muller, 4 normals per Philox call), builds the GMM mean offset and noise
// std of the sample's component, and runs one branch-free, vectorisable loop that reads x_t and the model
// output and writes x_s (and x0_hat on request). Without a GMM the noise std is one number: the loop takes it
// as a constant, and runs over the whole block at once when no normals are drawn (a pure stream, as fast as
// an ATen binary op over the same bytes). Nothing the size of the batch is allocated besides outputs.
// A multistep solver's history (up to two previous data predictions h_j, 8-column rows) is read in the same
// loop: mean = A x0 + B eps + H1 h1 + H2 h2.
//
// Compute precision: float64 samples in float64, every other dtype in float32 (opmath_t).
// The random stream is the reference's, element for element:
//   z[n, j]  = lane j % 4 of normals(philox(c0 = j / 4, c1 = n, c2 = step_index, c3 = NOISE), key = seed)
//   (seed: the 64-bit key, passed as the int64 with its bits)
//   k[n]     = #{j < K - 1 : u >= cdf_j},  u = (word0 of philox(0, n, step_index, COMPONENT) >> 8) 2^-24
// with n = sample_offset + b the global sample index.
#include "type_error.h"  // first: it includes pybind11 before stable.h defines TORCH_TARGET_VERSION
#include "../stable.h"
#include "normals.h"
#include "philox.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace ddimgmm {
namespace {

using namespace philox;

// Optional tensors: a default-constructed stable Tensor allocates a handle, std::nullopt does not.
using Opt = std::optional<Tensor>;

// Elements per sample: the product of the sizes after the batch dimension.
int64_t per_sample_numel(const Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

constexpr uint32_t kNoiseStream = 0, kComponentStream = 1;  // c3 of reference.NOISE / reference.COMPONENT
constexpr int64_t kChunk = 256;                              // elements per inner loop (64 Philox calls)
constexpr int64_t kBlock = 16 * kChunk;                      // elements per parallel task
constexpr int64_t kDrawSpan = 4 * kChunk;  // normals per draw without a GMM (each draw's set-up costs ~30 ns)
constexpr int64_t kMaxIndex = int64_t(1) << 32;              // sample and step indices are 32-bit counters
// Tasks per thread below which a pass runs on the calling thread: waking the pool costs a few us, the cost
// of about 64k noiseless elements (16 tasks) but of only 8k noisy ones (the normals are ~2 ns each).
constexpr int64_t kGrainNoiseless = 16, kGrainNoisy = 2;

// z[i] for elements j0 .. j0 + n of one sample (j0 a multiple of 4): 4 ceil(n / 4) values written.
template <typename T>
DDIMGMM_INLINE void draw_normals(T* z, int64_t j0, int64_t n, uint32_t sample, uint32_t step, uint32_t k0, uint32_t k1) {
  const int64_t groups = (n + 3) / 4;
  const uint32_t g0 = uint32_t(j0 / 4);
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t c0 = g0 + uint32_t(g), c1 = sample, c2 = step, c3 = kNoiseStream;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    BoxMuller<T>::pair(c0, c1, z[4 * g], z[4 * g + 1]);
    BoxMuller<T>::pair(c2, c3, z[4 * g + 2], z[4 * g + 3]);
  }
}

// The normals dominate the cost of a noisy step: float32 takes the vector paths of normals.h.
inline void draw_normals_any(float* z, int64_t j0, int64_t n, uint32_t sample, uint32_t step, uint32_t k0,
                             uint32_t k1) {
  philox::normals(z, uint32_t(j0 / 4), (n + 3) / 4, sample, step, kNoiseStream, k0, k1);
}
inline void draw_normals_any(double* z, int64_t j0, int64_t n, uint32_t sample, uint32_t step, uint32_t k0,
                             uint32_t k1) {
  draw_normals(z, j0, n, sample, step, k0, k1);
}

// Component of global sample n: inverse CDF of the priors. cdf_j is rounded from a float64 running sum,
// which is what torch.cumsum does on CPU, so the draw equals reference.draw_components bit for bit.
template <typename T>
int64_t draw_component(const T* priors, int64_t K, uint32_t sample, uint32_t step, uint32_t k0, uint32_t k1) {
  uint32_t c0 = 0, c1 = sample, c2 = step, c3 = kComponentStream;
  philox4x32_10(c0, c1, c2, c3, k0, k1);
  const T u = T(c0 >> 8) * T(0x1p-24);
  double cum = 0.0;
  int64_t k = 0;
  for (int64_t j = 0; j < K - 1; ++j) {
    cum += double(priors[j]);
    k += u >= T(cum) ? 1 : 0;
  }
  return k;
}

// Per-call constants from the coefficient row (a_t, b_t, A, B, c, g[, H1, H2]). x0_hat = (p_x x + p_m m) p_s and
// eps_hat = q_x x + q_m m are linear in (x_t, m) for every prediction type. The scale p_s is 1 / a_t for epsilon
// prediction (x0 = (x - b_t m) / a_t, as the reference and Triton compute it: +-inf at a_t = 0, which clipping
// turns into +-r as diffusers does; the affine (1 / a_t) x + (-b_t / a_t) m was inf - inf = NaN there) and
// exactly 1 otherwise.
template <typename T>
struct Coeffs {
  T p_x, p_m, p_s;       // x0_hat from (x_t, m)
  T q_x, q_m;            // eps_hat from (x_t, m)
  T a_t, inv_b_t;        // eps re-derived from the clipped x0_hat: (x_t - a_t x0) / b_t
  T a_s, eps_coef;       // mean = A x0 + B eps (+ H1 h1 + H2 h2)
  T h1, h2;              // history coefficients (0 for a 6-column row)
  T c2, c;               // noise variance and std of the Gaussian kernel
  T g, g2;               // GMM scale of the step: offsets g delta, variance offsets g^2 v
  T lo, hi;              // clip range (+-inf without clipping)
  T w;                   // guidance scale
  bool rederive_eps;     // clip_sample_range and use_clipped_model_output
};

template <typename T>
Coeffs<T> make_coeffs(const T* v, int64_t n_cols, int64_t prediction_type, std::optional<double> guidance,
                      std::optional<double> clip, bool use_clipped) {
  const T a_t = v[0], b_t = v[1];
  Coeffs<T> k{};
  k.p_s = 1;
  switch (prediction_type) {
    case 0:  // epsilon: x0 = (x - b_t m) (1 / a_t), eps = m
      k.p_x = 1, k.p_m = -b_t, k.p_s = T(1) / a_t, k.q_x = 0, k.q_m = 1;
      break;
    case 1:  // sample: x0 = m, eps = (x - a_t m) / b_t
      k.p_x = 0, k.p_m = 1, k.q_x = T(1) / b_t, k.q_m = -a_t / b_t;
      break;
    case 2: {  // v_prediction, n^2 = a_t^2 + b_t^2 (1 on VP paths): x0 = (a_t x - b_t n m) / n^2,
               // eps = (b_t x + a_t n m) / n^2
      const T n2 = a_t * a_t + b_t * b_t, n = std::sqrt(n2);
      k.p_x = a_t / n2, k.p_m = -b_t / n, k.q_x = b_t / n2, k.q_m = a_t / n;
      break;
    }
    default:  // flow (v = eps - x0, a_t = 1 - t, b_t = t): x0 = x - b_t m, eps = x + a_t m
      k.p_x = 1, k.p_m = -b_t, k.q_x = 1, k.q_m = a_t;
  }
  k.a_t = a_t;
  k.inv_b_t = T(1) / b_t;
  k.a_s = v[2];
  k.eps_coef = v[3];
  k.c = v[4];
  k.c2 = k.c * k.c;
  k.g = v[5];
  k.g2 = k.g * k.g;
  k.h1 = n_cols == 8 ? v[6] : T(0);
  k.h2 = n_cols == 8 ? v[7] : T(0);
  const T inf = std::numeric_limits<T>::infinity();
  k.lo = clip ? -T(*clip) : -inf;
  k.hi = clip ? T(*clip) : inf;
  k.rederive_eps = clip.has_value() && use_clipped;
  k.w = guidance ? T(*guidance) : T(1);
  return k;
}

// sqrt(max(c^2 - g^2 v, 0)), NaN propagating as torch.clamp does.
template <typename T>
DDIMGMM_INLINE T clipped_sd(T c2, T g2, T v) {
  const T r = c2 - g2 * v;
  return std::sqrt(r < T(0) ? T(0) : r);
}

// sd[i] = clipped_sd(v[i]) for n elements; whether any is nonzero. The row's constants come by value and the
// reduction is an int: otherwise the loop stays scalar, reloading them after each store.
template <typename T>
DDIMGMM_ISA_CLONES bool clipped_sds(T c2, T g2, const T* __restrict__ v, T* __restrict__ sd, int64_t n) {
  int any = 0;
#pragma omp simd reduction(| : any)
  for (int64_t i = 0; i < n; ++i) {
    sd[i] = clipped_sd(c2, g2, v[i]);
    any |= sd[i] != T(0);
  }
  return any != 0;
}

// What an element adds to its mean: nothing (no noise: c = 0 and none given), c z (no GMM: one noise std for
// every element, z given or drawn), g delta (a GMM's offset with no noise in the chunk: every sd 0, none given)
// or add + sd z (a GMM's offsets and per-element std). Each is the general form's arithmetic with its zeros and
// constants: mean + add + sd z, left to right.
enum Noise { kNone, kUniform, kOffset, kPerElement };

// The fused update of n elements. x, m_u, m_c, h1, h2, out, x0_out point at the chunk's first element; add (the
// GMM term added to the mean), sd (noise std) and z are chunk buffers (or z the given noise). With guidance,
// m = m_u + w (m_c - m_u); without, m = m_c. kHist: how many multistep history terms H_j h_j are added (0, 1 or
// 2). kNoise: see Noise (kNone reads neither add, sd nor z; kOffset reads add as the offsets delta_k and adds
// g delta_k; both + 0 as the general form's sd z adds it: -0 becomes +0 alike).
template <typename scalar_t, typename m_t, typename h_t, typename T, bool kGuidance, bool kWriteX0, int kHist,
          Noise kNoise>
DDIMGMM_ISA_CLONES void update(const Coeffs<T>& k, int64_t n, const scalar_t* __restrict__ x, const m_t* __restrict__ m_u,
                   const m_t* __restrict__ m_c, const h_t* __restrict__ h1, const h_t* __restrict__ h2,
                   const T* __restrict__ add, const T* __restrict__ sd,
                   const T* __restrict__ z, scalar_t* __restrict__ out, scalar_t* __restrict__ x0_out) {
  // the row's constants in locals: the stores through out cannot then be assumed to change them
  const T p_x = k.p_x, p_m = k.p_m, p_s = k.p_s, q_x = k.q_x, q_m = k.q_m, a_t = k.a_t, inv_b_t = k.inv_b_t;
  const T a_s = k.a_s, eps_coef = k.eps_coef, w_h1 = k.h1, w_h2 = k.h2, lo = k.lo, hi = k.hi, w = k.w, c = k.c;
  const T g = k.g;
  const bool rederive_eps = k.rederive_eps;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T xi = T(x[i]);
    T mi = T(m_c[i]);
    if constexpr (kGuidance) {
      const T mu = T(m_u[i]);
      mi = mu + w * (mi - mu);
    }
    T x0 = (p_x * xi + p_m * mi) * p_s;
    x0 = x0 < lo ? lo : x0;  // NaN passes through, as in torch.clamp
    x0 = x0 > hi ? hi : x0;
    const T eps = rederive_eps ? (xi - a_t * x0) * inv_b_t : q_x * xi + q_m * mi;
    T mean = a_s * x0 + eps_coef * eps;
    if constexpr (kHist >= 1) mean = mean + w_h1 * T(h1[i]);
    if constexpr (kHist >= 2) mean = mean + w_h2 * T(h2[i]);
    if constexpr (kNoise == kNone) {
      out[i] = scalar_t(mean + T(0));
    } else if constexpr (kNoise == kUniform) {
      out[i] = scalar_t(mean + T(0) + c * z[i]);
    } else if constexpr (kNoise == kOffset) {
      out[i] = scalar_t(mean + g * add[i] + T(0));
    } else {
      out[i] = scalar_t(mean + add[i] + sd[i] * z[i]);
    }
    if constexpr (kWriteX0) x0_out[i] = scalar_t(x0);
  }
}

// sum_j w[j] z[j] over n elements in a fixed order whatever the ISA: kLanes running sums (lane l takes j = l mod
// kLanes), then the lanes and the tail in order. A single running sum would be a chain of dependent adds, one
// per element, that no compiler may vectorise or reorder.
template <typename T>
DDIMGMM_ISA_CLONES T dot(const T* __restrict__ w, const T* __restrict__ z, int64_t n) {
  constexpr int64_t kLanes = 16;
  T acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += w[j + l] * z[j + l];
  }
  T sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
  for (; j < n; ++j) sum += w[j] * z[j];
  return sum;
}

// One GMM parameter set, already offset to the step's set: priors [K], offsets [K, D], var_offsets [K, Dv]
// and, for the low-rank form, basis [Dv, D] (var_offsets then hold eigenvalues in that basis).
struct Tables {
  const void* priors = nullptr;
  const void* offsets = nullptr;
  const void* var_offsets = nullptr;
  const void* basis = nullptr;
  int64_t K = 0, Dv = 0;
};

template <typename scalar_t, typename m_t, typename h_t, bool kGuidance, bool kWriteX0, int kHist>
void run(const Tensor& model_output, const Tensor& sample, const void* row, int64_t n_cols, const Opt& hist0,
         const Opt& hist1, const Tables& tab, const Opt& noise, const Opt& comps_in, int64_t prediction_type, std::optional<double> guidance,
         std::optional<double> clip, bool use_clipped, int64_t seed, int64_t sample_offset, int64_t step_index,
         Tensor& prev, Tensor& x0_out, Tensor& comps_out) {
  using T = opmath_t<scalar_t>;
  const int64_t B = sample.size(0), D = per_sample_numel(sample);
  const Coeffs<T> k = make_coeffs(static_cast<const T*>(row), n_cols, prediction_type, guidance, clip, use_clipped);
  const uint32_t k0 = uint32_t(uint64_t(seed) & 0xFFFFFFFFu), k1 = uint32_t(uint64_t(seed) >> 32);
  const uint32_t step = uint32_t(step_index);

  const scalar_t* x = sample.const_data_ptr<scalar_t>();
  const m_t* m = model_output.const_data_ptr<m_t>();
  const h_t* h1 = kHist >= 1 ? hist0->const_data_ptr<h_t>() : nullptr;
  const h_t* h2 = kHist >= 2 ? hist1->const_data_ptr<h_t>() : nullptr;
  const T* z_given = noise ? noise->const_data_ptr<T>() : nullptr;
  const int64_t* k_given = comps_in ? comps_in->const_data_ptr<int64_t>() : nullptr;
  const T* priors = static_cast<const T*>(tab.priors);
  const T* offsets = static_cast<const T*>(tab.offsets);
  const T* var_offsets = static_cast<const T*>(tab.var_offsets);
  const T* basis = static_cast<const T*>(tab.basis);
  const int64_t Dv = tab.Dv;
  scalar_t* out = prev.mutable_data_ptr<scalar_t>();
  scalar_t* x0p = kWriteX0 ? x0_out.mutable_data_ptr<scalar_t>() : nullptr;
  int64_t* kout = priors ? comps_out.mutable_data_ptr<int64_t>() : nullptr;

  const int64_t blocks = std::max<int64_t>(1, (D + kBlock - 1) / kBlock);  // >= 1: components even when D = 0
  // Components first (one per sample), so both passes below read them.
  std::vector<int64_t> comp(priors ? B : 0);
  if (priors) {
    torch::stable::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        comp[b] = k_given ? k_given[b] : draw_component(priors, tab.K, uint32_t(sample_offset + b), step, k0, k1);
        kout[b] = comp[b];
      }
    });
  }
  // z of chunk [j0, j0 + len) of sample b: the given noise, the Philox normals, or zeros when unused.
  alignas(64) static const T zeros[kChunk] = {};
  auto noise_chunk = [&](T* buf, int64_t b, int64_t j0, int64_t len, bool needed) -> const T* {
    if (z_given) return z_given + b * D + j0;
    if (!needed) return zeros;
    draw_normals_any(buf, j0, len, uint32_t(sample_offset + b), step, k0, k1);
    return buf;
  };

  // Low-rank form, first pass: partial projections p[b, blk, i] = sum_{j in block} w_i[j] z[b, j], summed per
  // sample in block order below (deterministic whatever the thread count). The noise is needed only if c != 0.
  const bool lowrank = basis != nullptr;
  const bool lowrank_noise = lowrank && k.c2 != T(0);
  std::vector<T> partial(lowrank ? B * blocks * Dv : 0, T(0));
  const int64_t grain = k.c2 != T(0) ? kGrainNoisy : kGrainNoiseless;  // c = 0: no element draws noise
  if (lowrank_noise && Dv > 0) {
    torch::stable::parallel_for(0, B * blocks, kGrainNoisy, [&](int64_t begin, int64_t end) {
      alignas(64) T z[kChunk];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, j_begin = (task % blocks) * kBlock, j_end = std::min(D, j_begin + kBlock);
        T* p = partial.data() + task * Dv;
        for (int64_t j0 = j_begin; j0 < j_end; j0 += kChunk) {
          const int64_t len = std::min(kChunk, j_end - j0);
          const T* zc = noise_chunk(z, b, j0, len, true);
          for (int64_t i = 0; i < Dv; ++i) p[i] += dot(basis + i * D + j0, zc, len);
        }
      }
    });
  }

  if (!priors) {
    // No GMM: one update over each block, or a chunk at a time behind its normals when they are drawn here (no
    // per-element buffers besides z).
    const bool draw = !z_given && k.c != T(0);
    torch::stable::parallel_for(0, B * blocks, grain, [&](int64_t begin, int64_t end) {
      alignas(64) T z[kDrawSpan];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, j_begin = (task % blocks) * kBlock, j_end = std::min(D, j_begin + kBlock);
        const int64_t span = draw ? kDrawSpan : kBlock;
        for (int64_t j0 = j_begin; j0 < j_end; j0 += span) {
          const int64_t len = std::min(span, j_end - j0), o = b * D + j0;
          const T* zc = noise_chunk(z, b, j0, len, draw);
          auto fused = [&](auto noise) {
            update<scalar_t, m_t, h_t, T, kGuidance, kWriteX0, kHist, decltype(noise)::value>(
                k, len, x + o, m + o, m + (kGuidance ? B + b : b) * D + j0, kHist >= 1 ? h1 + o : nullptr,
                kHist >= 2 ? h2 + o : nullptr, nullptr, nullptr, zc, out + o, kWriteX0 ? x0p + o : nullptr);
          };
          if (zc == zeros) {  // 0 * z, z of the given noise, may be NaN: only with no noise given
            fused(std::integral_constant<Noise, kNone>{});
          } else {
            fused(std::integral_constant<Noise, kUniform>{});
          }
        }
      }
    });
    return;
  }
  torch::stable::parallel_for(0, B * blocks, grain, [&](int64_t begin, int64_t end) {
    alignas(64) T z[kChunk], sd[kChunk], add[kChunk];
    std::vector<T> coef(lowrank ? Dv : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, j_begin = (task % blocks) * kBlock, j_end = std::min(D, j_begin + kBlock);
      const T* delta = offsets + comp[b] * D;
      const T* var = var_offsets + comp[b] * Dv;
      if (lowrank) {  // (sqrt(max(c^2 - g^2 v_k[i], 0)) - c) (w_i . z)
        for (int64_t i = 0; i < Dv; ++i) {
          T p = 0;
          for (int64_t blk = 0; blk < blocks; ++blk) p += partial[(b * blocks + blk) * Dv + i];
          coef[i] = (clipped_sd(k.c2, k.g2, var[i]) - k.c) * p;
        }
      }
      const scalar_t* xb = x + b * D;
      const m_t* m_c = m + (kGuidance ? B + b : b) * D;
      const m_t* m_u = m + b * D;
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kChunk) {
        const int64_t len = std::min(kChunk, j_end - j0), o = b * D + j0;
        // x_s = mean + add + sd z: add the GMM's offset term, sd the noise std. Low rank: sd = c, and
        // add = g delta_k + sum_i coef_i w_i. Else add = g delta_k, sd = sqrt(max(c^2 - g^2 v_k, 0)), v_k zero
        // beyond Dv.
        const int64_t nv = lowrank ? 0 : std::clamp(Dv - j0, int64_t(0), len);
        bool noisy = lowrank_noise;
        if (!lowrank) {
          noisy = clipped_sds(k.c2, k.g2, var + j0, sd, nv) || (nv < len && k.c != T(0));
        }
        auto fused = [&](auto noise, const T* a) {
          update<scalar_t, m_t, h_t, T, kGuidance, kWriteX0, kHist, decltype(noise)::value>(
              k, len, xb + j0, m_u + j0, m_c + j0, kHist >= 1 ? h1 + o : nullptr, kHist >= 2 ? h2 + o : nullptr, a, sd,
              noise_chunk(z, b, j0, len, noisy), out + o, kWriteX0 ? x0p + o : nullptr);
        };
        if (!noisy && !z_given) {
          // sd z is 0 everywhere (z the zeros), and so is each coef_i (z = 0 in w_i . z): mean + g delta_k + 0
          fused(std::integral_constant<Noise, kOffset>{}, delta + j0);
          continue;
        }
        for (int64_t j = 0; j < len; ++j) add[j] = k.g * delta[j0 + j];
        if (lowrank) {
          std::fill(sd, sd + len, k.c);
          for (int64_t i = 0; i < Dv; ++i) {
            const T* w = basis + i * D + j0;
            const T ci = coef[i];
            for (int64_t j = 0; j < len; ++j) add[j] += ci * w[j];
          }
        } else {
          std::fill(sd + nv, sd + len, k.c);
        }
        fused(std::integral_constant<Noise, kPerElement>{}, add);
      }
    }
  });
}

using Sizes = torch::headeronly::IntHeaderOnlyArrayRef;

// t itself when contiguous (no dispatcher call on the hot path), else a contiguous copy.
Tensor dense(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

// The data of t[i] (of t itself unless `stacked`), contiguous. A contiguous t is addressed directly (select
// and contiguous are dispatcher calls, microseconds on a small step); otherwise `kept` holds a contiguous copy.
const void* pick(const Tensor& t, bool stacked, int64_t i, std::optional<Tensor>& kept) {
  if (t.is_contiguous()) {
    return static_cast<const char*>(t.const_data_ptr()) + (stacked ? i * t.stride(0) * int64_t(t.element_size()) : 0);
  }
  kept = torch::stable::contiguous(stacked ? torch::stable::select(t, 0, i) : t);
  return kept->const_data_ptr();
}

bool is_floating(ScalarType t) {
  switch (t) {
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Float:
    case ScalarType::Double:
    case ScalarType::Float8_e5m2:
    case ScalarType::Float8_e4m3fn:
    case ScalarType::Float8_e5m2fnuz:
    case ScalarType::Float8_e4m3fnuz:
    case ScalarType::Float8_e8m0fnu: return true;
    default: return false;
  }
}

// torch's spelling (float32, ...) in messages, as Python users write it.
std::string dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Float: return "float32";
    case ScalarType::Double: return "float64";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    default: return torch::headeronly::toString(t);
  }
}

// Argument checks, in the order and with the messages and exception types of the Python checks of the CUDA
// and fake kernels (ddim_gmm_ext/ops/step.py, `check`): one bad call raises the same error on every backend.
#define STEP_CHECK(cond, ...) DDIMGMM_CHECK_VALUE(cond, "ddimgmm::step: ", __VA_ARGS__)

std::tuple<Tensor, Tensor, Tensor> step_cpu(
    const Tensor& model_output, const Tensor& sample, const Tensor& coeffs,
    const std::optional<Tensor>& step_tensor, const std::optional<Tensor>& priors,
    const std::optional<Tensor>& offsets, const std::optional<Tensor>& var_offsets,
    const std::optional<Tensor>& basis, const std::optional<Tensor>& noise,
    const std::optional<Tensor>& components, int64_t prediction_type, std::optional<double> guidance_scale,
    std::optional<double> clip_sample_range, bool use_clipped_model_output, int64_t seed, int64_t sample_offset,
    int64_t step_index, bool return_pred_original, const std::optional<Tensor>& history0,
    const std::optional<Tensor>& history1) {
  const auto dtype = sample.scalar_type();
  DDIMGMM_CHECK_TYPE(dtype == ScalarType::Float || dtype == ScalarType::Double || dtype == ScalarType::Half ||
                         dtype == ScalarType::BFloat16,
                     "ddimgmm::step: sample must be float16, bfloat16, float32 or float64, got ", dtype_name(dtype));
  STEP_CHECK(sample.dim() >= 1, "sample must have a batch dimension, got a 0-d tensor");
  const auto cdt = dtype == ScalarType::Double ? ScalarType::Double : ScalarType::Float;  // compute dtype
  const int64_t B = sample.size(0), D = per_sample_numel(sample);
  const bool guided = guidance_scale.has_value();

  auto expected = sample.sizes().vec();
  if (guided) expected[0] = 2 * B;
  STEP_CHECK(same_shape(model_output.sizes(), Sizes(expected)), "model_output must have shape ", shape(expected),
             guided ? " ([2B, ...], unconditional half first)" : " (the sample's)", ", got ",
             shape(model_output.sizes()));
  STEP_CHECK(model_output.scalar_type() == dtype || model_output.scalar_type() == cdt,
             "model_output must have the sample's dtype (", dtype_name(dtype), ") or the compute dtype (",
             dtype_name(cdt), "), got ", dtype_name(model_output.scalar_type()));
  const int64_t n_cols = coeffs.dim() >= 1 ? coeffs.size(-1) : 0;
  STEP_CHECK((n_cols == 6 || n_cols == 8) && (coeffs.dim() == 1 || (coeffs.dim() == 2 && coeffs.size(0) >= 1)),
             "coeffs must be one row [6] or [8], or a table [S, 6] or [S, 8], of (a_t, b_t, A, B, c, g[, H1, H2]), "
             "got shape ", shape(coeffs.sizes()));
  STEP_CHECK(coeffs.scalar_type() == cdt, "coeffs must be ", dtype_name(cdt), " (the compute dtype of a ",
             dtype_name(dtype), " sample), got ", dtype_name(coeffs.scalar_type()));
  if (step_tensor) {
    STEP_CHECK(step_tensor->dim() == 0 && step_tensor->scalar_type() == ScalarType::Long,
               "step_tensor must be a 0-d int64 tensor, got ", dtype_name(step_tensor->scalar_type()), " of shape ",
               shape(step_tensor->sizes()));
    STEP_CHECK(step_index == 0, "pass the step index as step_tensor or as step_index, not both (step_index = ",
               step_index, ")");
  }
  STEP_CHECK(prediction_type >= 0 && prediction_type <= 3,
             "prediction_type must be 0 (epsilon), 1 (sample), 2 (v_prediction) or 3 (flow), got ", prediction_type);
  STEP_CHECK(!clip_sample_range || *clip_sample_range > 0, "clip_sample_range must be > 0, got ",
             clip_sample_range.value_or(0));
  STEP_CHECK(step_index >= 0 && step_index < kMaxIndex, "step_index must be in [0, 2**32), got ", step_index);
  // sample_offset + B <= 2**32 written without the sum, which could overflow int64.
  STEP_CHECK(sample_offset >= 0 && sample_offset <= kMaxIndex && B <= kMaxIndex - sample_offset,
             "sample_offset must be >= 0 with sample_offset + batch size <= 2**32, got ", sample_offset, " + ", B);
  STEP_CHECK(D <= 4 * kMaxIndex, "per-sample numel must be <= 2**34 (32-bit Philox counter), got ", D);

  const int n_tables = int(priors.has_value()) + int(offsets.has_value()) + int(var_offsets.has_value());
  STEP_CHECK(n_tables == 0 || n_tables == 3, "pass all of priors, offsets, var_offsets or none");
  STEP_CHECK(!basis || n_tables == 3, "basis given without GMM tables (priors, offsets, var_offsets)");
  const bool gmm = n_tables == 3;
  auto on_device = [&](const char* name, const Tensor* t) {
    STEP_CHECK(!t || t->device() == sample.device(), "every tensor must be on the sample's device ",
               device_name(sample.device()), "; ", name, " is on ", device_name(t->device()));
  };
  auto opt = [](const std::optional<Tensor>& t) { return t ? &*t : nullptr; };
  on_device("model_output", &model_output);
  on_device("coeffs", &coeffs);
  on_device("step_tensor", opt(step_tensor));
  on_device("priors", opt(priors));
  on_device("offsets", opt(offsets));
  on_device("var_offsets", opt(var_offsets));
  on_device("basis", opt(basis));
  on_device("noise", opt(noise));
  on_device("components", opt(components));
  on_device("history0", opt(history0));
  on_device("history1", opt(history1));
  // n_sets: 0 for one set given as is ([K], ...: shared by every step), else S_g of stacked [S_g, K] tables,
  // whose index is always range-checked (a GMM built for one step is not a shared one).
  int64_t n_sets = 0, K = 0, Dv = 0;
  if (gmm) {
    auto in_cdt = [&](const char* name, const Tensor* t) {
      STEP_CHECK(!t || t->scalar_type() == cdt, name, " must be ", dtype_name(cdt), " (the compute dtype of a ",
                 dtype_name(dtype), " sample), got ", dtype_name(t->scalar_type()));
    };
    in_cdt("priors", opt(priors));
    in_cdt("offsets", opt(offsets));
    in_cdt("var_offsets", opt(var_offsets));
    in_cdt("basis", opt(basis));
    const bool stacked = priors->dim() == 2;
    STEP_CHECK((priors->dim() == 1 || stacked) && priors->size(-1) >= 1 && (!stacked || priors->size(0) >= 1),
               "priors must have shape [K] or [S, K] with K >= 1, got ", shape(priors->sizes()));
    K = priors->size(-1);
    n_sets = stacked ? priors->size(0) : 0;
    const int64_t lead = stacked ? 1 : 0;
    auto head = [&]() { return stacked ? std::vector<int64_t>{n_sets} : std::vector<int64_t>{}; };
    std::vector<int64_t> want = head();
    want.insert(want.end(), {K, D});
    STEP_CHECK(same_shape(offsets->sizes(), Sizes(want)), "offsets must have shape ", shape(want), " (priors ",
               shape(priors->sizes()), ", D = per-sample numel), got ", shape(offsets->sizes()));
    Dv = var_offsets->dim() == 2 + lead ? var_offsets->size(-1) : -1;
    want = head();
    want.insert(want.end(), {K, Dv});
    STEP_CHECK(var_offsets->dim() == 2 + lead && same_shape(var_offsets->sizes(), Sizes(want)) && Dv <= D,
               "var_offsets must have shape [", stacked ? "S, " : "", "K, Dv] with K = ", K, " and Dv <= ", D,
               ", got ", shape(var_offsets->sizes()));
    if (basis) {
      want = head();
      want.insert(want.end(), {Dv, D});
      STEP_CHECK(same_shape(basis->sizes(), Sizes(want)), "basis must have shape ", shape(want),
                 " (one row per variance offset), got ", shape(basis->sizes()));
    }
  }
  if (noise) {
    STEP_CHECK(is_floating(noise->scalar_type()) && same_shape(noise->sizes(), sample.sizes()),
               "noise must be a floating tensor of the sample's shape ", shape(sample.sizes()), ", got ",
               dtype_name(noise->scalar_type()), " ", shape(noise->sizes()));
  }
  if (components) {
    STEP_CHECK(gmm, "components given without GMM tables");
    STEP_CHECK((components->scalar_type() == ScalarType::Long || components->scalar_type() == ScalarType::Int) &&
                   components->dim() == 1 && components->size(0) == B,
               "components must be an int32/int64 tensor of shape [", B, "], got ",
               dtype_name(components->scalar_type()), " ", shape(components->sizes()));
  }
  STEP_CHECK(!history1 || history0, "history1 given without history0 (history0 is the latest prediction, history1 "
             "the one before)");
  for (const auto* h : {opt(history0), opt(history1)}) {
    if (!h) continue;
    const char* name = h == opt(history0) ? "history0" : "history1";
    STEP_CHECK(same_shape(h->sizes(), sample.sizes()), name, " must have the sample's shape ", shape(sample.sizes()),
               " (a previous step's prediction of each sample), got ", shape(h->sizes()));
    STEP_CHECK(h->scalar_type() == dtype || h->scalar_type() == cdt, name, " must have the sample's dtype (",
               dtype_name(dtype), ") or the compute dtype (", dtype_name(cdt), "), got ", dtype_name(h->scalar_type()));
    STEP_CHECK(n_cols == 8, name, " given with ", n_cols, "-column coeffs (no H1, H2): pass rows of 8 columns "
               "(a_t, b_t, A, B, c, g, H1, H2)");
  }
  STEP_CHECK(!history1 || history1->scalar_type() == history0->scalar_type(), "history1 must have history0's dtype (",
             dtype_name(history0->scalar_type()), "), got ", dtype_name(history1 ? history1->scalar_type() : dtype));
  // A host step index must address the tables; a tensor index is data (out of range: NaN outputs, below).
  const int64_t n_rows = coeffs.dim() == 2 ? coeffs.size(0) : 0;
  if (!step_tensor) {
    STEP_CHECK(n_rows == 0 || step_index < n_rows, "step_index ", step_index, " is outside the coefficient table [",
               n_rows, ", ", n_cols, "]");
    STEP_CHECK(n_sets == 0 || step_index < n_sets, "step_index ", step_index, " is outside the GMM tables (",
               n_sets, " parameter sets)");
  }

  Opt kin;
  if (components) {
    kin = dense(torch::stable::to(*components, ScalarType::Long));
    if (B > 0) {
      const int64_t* v = kin->const_data_ptr<int64_t>();
      const auto [lo_at, hi_at] = std::minmax_element(v, v + B);
      const int64_t lo = *lo_at, hi = *hi_at;
      STEP_CHECK(lo >= 0 && hi < K, "components must be in [0, ", K, "), got values in [", lo, ", ", hi, "]");
    }
  }

  auto empty = [&](Sizes sizes, ScalarType type) { return empty_tensor(sizes, type, sample.device()); };
  Tensor prev = empty(sample.sizes(), dtype);
  Tensor x0 = return_pred_original ? empty(sample.sizes(), dtype) : empty({0}, dtype);
  Tensor comps = empty({gmm ? B : 0}, ScalarType::Long);
  if (B == 0) return {prev, x0, comps};

  int64_t i = step_index;
  if (step_tensor) {
    i = step_tensor->const_data_ptr<int64_t>()[0];
    const bool ok = i >= 0 && i < kMaxIndex && (n_rows == 0 || i < n_rows) && (n_sets == 0 || i < n_sets);
    if (!ok) {  // the device convention: this call's outputs are NaN and its components -1
      torch::stable::fill_(prev, std::numeric_limits<double>::quiet_NaN());
      torch::stable::fill_(x0, std::numeric_limits<double>::quiet_NaN());
      torch::stable::fill_(comps, -1.0);
      return {prev, x0, comps};
    }
  }
  Opt row_kept;
  const void* row = pick(coeffs, n_rows != 0, i, row_kept);
  const int n_hist = int(history0.has_value()) + int(history1.has_value());
  for (int j = n_hist; j < n_cols - 6; ++j) {  // a history term the caller did not pass
    const double h = cdt == ScalarType::Double ? static_cast<const double*>(row)[6 + j]
                                               : static_cast<const float*>(row)[6 + j];
    STEP_CHECK(h == 0.0, "coeffs row ", i, " has H", j + 1, " = ", h, " but history", j, " is None");
  }
  const int64_t set = n_sets ? i : 0;
  Tables tab;
  Opt pri, off, var, bas;  // contiguous copies of non-contiguous tables
  if (gmm) {
    tab.priors = pick(*priors, n_sets != 0, set, pri);
    tab.offsets = pick(*offsets, n_sets != 0, set, off);
    tab.var_offsets = pick(*var_offsets, n_sets != 0, set, var);
    if (basis) tab.basis = pick(*basis, n_sets != 0, set, bas);
    tab.K = K;
    tab.Dv = Dv;
  }
  const Opt z = noise ? Opt(dense(torch::stable::to(*noise, cdt))) : std::nullopt;
  const Tensor x = dense(sample), m = dense(model_output);
  const Opt h0 = history0 ? Opt(dense(*history0)) : std::nullopt;
  const Opt h1 = history1 ? Opt(dense(*history1)) : std::nullopt;

  auto dispatch = [&](auto sample_tag) {
    using scalar_t = decltype(sample_tag);
    using T = opmath_t<scalar_t>;
    auto go = [&](auto m_tag, auto h_tag, auto n_hist_tag) {
      using m_t = decltype(m_tag);
      using h_t = decltype(h_tag);
      constexpr int H = decltype(n_hist_tag)::value;
      auto args = std::tie(m, x, row, n_cols, h0, h1, tab, z, kin, prediction_type, guidance_scale, clip_sample_range,
                           use_clipped_model_output, seed, sample_offset, i, prev, x0, comps);
      if (guided && return_pred_original) std::apply(run<scalar_t, m_t, h_t, true, true, H>, args);
      if (guided && !return_pred_original) std::apply(run<scalar_t, m_t, h_t, true, false, H>, args);
      if (!guided && return_pred_original) std::apply(run<scalar_t, m_t, h_t, false, true, H>, args);
      if (!guided && !return_pred_original) std::apply(run<scalar_t, m_t, h_t, false, false, H>, args);
    };
    // history dtype: the sample's or the compute dtype (both histories the same); no history: T, unused
    auto with_m = [&](auto m_tag) {
      if (n_hist == 0) return go(m_tag, T{}, std::integral_constant<int, 0>{});
      auto with_h = [&](auto h_tag) {
        if (n_hist == 1) return go(m_tag, h_tag, std::integral_constant<int, 1>{});
        return go(m_tag, h_tag, std::integral_constant<int, 2>{});
      };
      if (h0->scalar_type() == dtype) return with_h(scalar_t{});
      return with_h(T{});
    };
    if (m.scalar_type() == dtype) {
      with_m(scalar_t{});
    } else {
      with_m(T{});
    }
  };
  switch (dtype) {
    case ScalarType::Half: dispatch(c10::Half{}); break;
    case ScalarType::BFloat16: dispatch(c10::BFloat16{}); break;
    case ScalarType::Float: dispatch(float{}); break;
    default: dispatch(double{});
  }
  return {prev, x0, comps};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ddimgmm, CPU, m) { m.impl("step", TORCH_BOX(&step_cpu)); }

}  // namespace ddimgmm
