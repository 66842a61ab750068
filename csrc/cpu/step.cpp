// CPU kernel of ddimgmm::step (DESIGN.md 2.1-2.3 and 3; semantics: ddim_gmm_ext/reference.py, `step`).
//
// One pass over memory: each task is one block of one sample; per chunk of CH elements it draws the normals
// z (Philox4x32-10 in registers, Box-Muller, 4 normals per Philox call), builds the GMM mean offset and noise
// std of the sample's component, and runs one branch-free, vectorisable loop that reads x_t and the model
// output and writes x_s (and x0_hat on request). Nothing the size of the batch is allocated besides outputs.
//
// Compute precision: float64 samples in float64, every other dtype in float32 (at::opmath_type).
// The random stream is the reference's, element for element:
//   z[n, j]  = lane j % 4 of normals(philox(c0 = j / 4, c1 = n, c2 = step_index, c3 = NOISE), key = seed)
//   k[n]     = #{j < K - 1 : u >= cdf_j},  u = (word0 of philox(0, n, step_index, COMPONENT) >> 8) 2^-24
// with n = sample_offset + b the global sample index.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "philox.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

namespace ddimgmm {
namespace {

using namespace philox;

constexpr uint32_t kNoiseStream = 0, kComponentStream = 1;  // c3 of reference.NOISE / reference.COMPONENT
constexpr int64_t kChunk = 256;                              // elements per inner loop (64 Philox calls)
constexpr int64_t kBlock = 16 * kChunk;                      // elements per parallel task
constexpr int64_t kMaxIndex = int64_t(1) << 32;              // sample and step indices are 32-bit counters

// z[i] for elements j0 .. j0 + n of one sample (j0 a multiple of 4, n <= kChunk).
template <typename T>
DDIMGMM_INLINE void draw_normals(T* z, int64_t j0, int64_t n, uint32_t sample, uint32_t step, uint32_t k0, uint32_t k1) {
  const int64_t groups = (n + 3) / 4;
  const uint32_t g0 = uint32_t(j0 / 4);
#pragma omp simd
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t c0 = g0 + uint32_t(g), c1 = sample, c2 = step, c3 = kNoiseStream;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    BoxMuller<T>::pair(c0, c1, z[4 * g], z[4 * g + 1]);
    BoxMuller<T>::pair(c2, c3, z[4 * g + 2], z[4 * g + 3]);
  }
}

// The normals dominate the cost of a noisy step.
DDIMGMM_ISA_CLONES
void draw_normals_f32(float* z, int64_t j0, int64_t n, uint32_t sample, uint32_t step, uint32_t k0, uint32_t k1) {
  draw_normals(z, j0, n, sample, step, k0, k1);
}

inline void draw_normals_any(float* z, int64_t j0, int64_t n, uint32_t sample, uint32_t step, uint32_t k0,
                             uint32_t k1) {
  draw_normals_f32(z, j0, n, sample, step, k0, k1);
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

// Per-call constants. x0_hat = p_x x + p_m m and eps_hat = q_x x + q_m m are linear for every prediction type.
template <typename T>
struct Coeffs {
  T p_x, p_m, q_x, q_m;  // x0_hat, eps_hat from (x_t, m)
  T a_t, inv_b_t;        // eps re-derived from the clipped x0_hat: (x_t - a_t x0) / b_t
  T a_s, eps_coef;       // mu = a_s x0 + sqrt(b_s^2 - c^2) eps
  T c2, c;               // noise variance and std of the Gaussian kernel
  T lo, hi;              // clip range (+-inf without clipping)
  T w;                   // guidance scale
  bool rederive_eps;     // clip_sample_range and use_clipped_model_output
};

template <typename T>
Coeffs<T> make_coeffs(const T* v, int64_t prediction_type, std::optional<double> guidance,
                      std::optional<double> clip, bool use_clipped) {
  const T a_t = v[0], b_t = v[1], a_s = v[2], b_s = v[3], c = v[4];
  Coeffs<T> k{};
  switch (prediction_type) {
    case 0:  // epsilon: x0 = (x - b_t m) / a_t, eps = m
      k.p_x = T(1) / a_t, k.p_m = -b_t / a_t, k.q_x = 0, k.q_m = 1;
      break;
    case 1:  // sample: x0 = m, eps = (x - a_t m) / b_t
      k.p_x = 0, k.p_m = 1, k.q_x = T(1) / b_t, k.q_m = -a_t / b_t;
      break;
    case 2:  // v_prediction: x0 = a_t x - b_t m, eps = a_t m + b_t x
      k.p_x = a_t, k.p_m = -b_t, k.q_x = b_t, k.q_m = a_t;
      break;
    default:  // flow (v = eps - x0, a_t = 1 - t, b_t = t): x0 = x - b_t m, eps = x + a_t m
      k.p_x = 1, k.p_m = -b_t, k.q_x = 1, k.q_m = a_t;
  }
  k.a_t = a_t;
  k.inv_b_t = T(1) / b_t;
  k.a_s = a_s;
  k.c2 = c * c;
  k.c = c;
  k.eps_coef = std::sqrt(std::max(b_s * b_s - k.c2, T(0)));
  const T inf = std::numeric_limits<T>::infinity();
  k.lo = clip ? -T(*clip) : -inf;
  k.hi = clip ? T(*clip) : inf;
  k.rederive_eps = clip.has_value() && use_clipped;
  k.w = guidance ? T(*guidance) : T(1);
  return k;
}

// The fused update of n elements. x, m_u, m_c, out, x0_out point at the chunk's first element; add (the mean
// offset delta_k), sd (noise std) and z are chunk buffers. With guidance, m = m_u + w (m_c - m_u); without,
// m = m_c.
template <typename scalar_t, typename m_t, typename T, bool kGuidance, bool kWriteX0>
DDIMGMM_ISA_CLONES void update(const Coeffs<T>& k, int64_t n, const scalar_t* __restrict__ x, const m_t* __restrict__ m_u,
                   const m_t* __restrict__ m_c, const T* __restrict__ add, const T* __restrict__ sd,
                   const T* __restrict__ z, scalar_t* __restrict__ out, scalar_t* __restrict__ x0_out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T xi = T(x[i]);
    T mi = T(m_c[i]);
    if constexpr (kGuidance) {
      const T mu = T(m_u[i]);
      mi = mu + k.w * (mi - mu);
    }
    T x0 = k.p_x * xi + k.p_m * mi;
    x0 = x0 < k.lo ? k.lo : x0;  // NaN passes through, as in torch.clamp
    x0 = x0 > k.hi ? k.hi : x0;
    const T eps = k.rederive_eps ? (xi - k.a_t * x0) * k.inv_b_t : k.q_x * xi + k.q_m * mi;
    out[i] = scalar_t(k.a_s * x0 + k.eps_coef * eps + add[i] + sd[i] * z[i]);
    if constexpr (kWriteX0) x0_out[i] = scalar_t(x0);
  }
}

struct Tables {
  const void* priors = nullptr;
  const void* offsets = nullptr;
  const void* var_offsets = nullptr;
  int64_t K = 0, Dv = 0;
};

template <typename scalar_t, typename m_t, bool kGuidance, bool kWriteX0>
void run(const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& coeffs, const Tables& tab,
         const at::Tensor& noise, const at::Tensor& comps_in, int64_t prediction_type, std::optional<double> guidance,
         std::optional<double> clip, bool use_clipped, int64_t seed, int64_t sample_offset, int64_t step_index,
         at::Tensor& prev, at::Tensor& x0_out, at::Tensor& comps_out) {
  using T = at::opmath_type<scalar_t>;
  const int64_t B = sample.size(0), D = c10::multiply_integers(sample.sizes().slice(1));
  const Coeffs<T> k = make_coeffs(coeffs.contiguous().data_ptr<T>(), prediction_type, guidance, clip, use_clipped);
  const uint32_t k0 = uint32_t(uint64_t(seed) & 0xFFFFFFFFu), k1 = uint32_t(uint64_t(seed) >> 32);
  const uint32_t step = uint32_t(step_index);

  const scalar_t* x = sample.data_ptr<scalar_t>();
  const m_t* m = model_output.data_ptr<m_t>();
  const T* z_given = noise.defined() ? noise.data_ptr<T>() : nullptr;
  const int64_t* k_given = comps_in.defined() ? comps_in.data_ptr<int64_t>() : nullptr;
  const T* priors = static_cast<const T*>(tab.priors);
  const T* offsets = static_cast<const T*>(tab.offsets);
  const T* var_offsets = static_cast<const T*>(tab.var_offsets);
  scalar_t* out = prev.data_ptr<scalar_t>();
  scalar_t* x0p = kWriteX0 ? x0_out.data_ptr<scalar_t>() : nullptr;
  int64_t* kout = priors ? comps_out.data_ptr<int64_t>() : nullptr;

  const int64_t blocks = std::max<int64_t>(1, (D + kBlock - 1) / kBlock);  // >= 1: components even when D = 0
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) T z[kChunk], sd[kChunk];
    alignas(64) static const T zeros[kChunk] = {};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, j_begin = (task % blocks) * kBlock, j_end = std::min(D, j_begin + kBlock);
      const uint32_t n = uint32_t(sample_offset + b);
      const T* delta = nullptr;
      const T* var = nullptr;
      if (priors) {
        const int64_t kb = k_given ? k_given[b] : draw_component(priors, tab.K, n, step, k0, k1);
        if (j_begin == 0) kout[b] = kb;
        delta = offsets + kb * D;
        var = var_offsets + kb * tab.Dv;
      }
      const scalar_t* xb = x + b * D;
      const m_t* m_c = m + (kGuidance ? B + b : b) * D;
      const m_t* m_u = m + b * D;
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kChunk) {
        const int64_t len = std::min(kChunk, j_end - j0);
        // noise std sqrt(max(c^2 - v_k, 0)), v_k zero beyond Dv; the noise is drawn only where it is used.
        const int64_t nv = var ? std::clamp(tab.Dv - j0, int64_t(0), len) : 0;
        bool noisy = false;
        for (int64_t i = 0; i < nv; ++i) {
          sd[i] = std::sqrt(std::max(k.c2 - var[j0 + i], T(0)));
          noisy |= sd[i] != T(0);
        }
        std::fill(sd + nv, sd + len, std::abs(k.c));  // beyond Dv: sqrt(max(c^2 - 0, 0)) = |c|
        noisy |= nv < len && k.c2 != T(0);
        const T* zc = zeros;
        if (z_given) {
          zc = z_given + b * D + j0;
        } else if (noisy) {
          draw_normals_any(z, j0, len, n, step, k0, k1);
          zc = z;
        }
        const T* addc = delta ? delta + j0 : zeros;
        update<scalar_t, m_t, T, kGuidance, kWriteX0>(k, len, xb + j0, m_u + j0, m_c + j0, addc, sd, zc, out + b * D + j0,
                                                       kWriteX0 ? x0p + b * D + j0 : nullptr);
      }
    }
  });
}

// torch's spelling (float32, ...) in messages, as Python users write it.
std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: return c10::toString(t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_cpu(
    const at::Tensor& model_output, const at::Tensor& sample, const at::Tensor& coeffs,
    const std::optional<at::Tensor>& priors, const std::optional<at::Tensor>& offsets,
    const std::optional<at::Tensor>& var_offsets, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& components, int64_t prediction_type, std::optional<double> guidance_scale,
    std::optional<double> clip_sample_range, bool use_clipped_model_output, int64_t seed, int64_t sample_offset,
    int64_t step_index, bool return_pred_original) {
  const auto dtype = sample.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "ddimgmm::step: sample must be float16, bfloat16, float32 or float64, got ", dtype_name(dtype));
  TORCH_CHECK(sample.dim() >= 1, "ddimgmm::step: sample must have a batch dimension, got a 0-d tensor");
  const auto cdt = dtype == at::kDouble ? at::kDouble : at::kFloat;  // compute dtype
  const int64_t B = sample.size(0), D = c10::multiply_integers(sample.sizes().slice(1));
  const bool guided = guidance_scale.has_value();

  auto expected = sample.sizes().vec();
  if (guided) expected[0] = 2 * B;
  TORCH_CHECK(model_output.sizes() == at::IntArrayRef(expected), "ddimgmm::step: model_output must have shape ",
              at::IntArrayRef(expected), guided ? " ([2B, ...], unconditional half first)" : " (the sample's)",
              ", got ", model_output.sizes());
  TORCH_CHECK(model_output.scalar_type() == dtype || model_output.scalar_type() == cdt,
              "ddimgmm::step: model_output must have the sample's dtype (", dtype_name(dtype),
              ") or the compute dtype (", dtype_name(cdt), "), got ", dtype_name(model_output.scalar_type()));
  TORCH_CHECK(model_output.device() == sample.device(), "ddimgmm::step: model_output is on ", model_output.device(),
              " but sample is on ", sample.device());
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.numel() == 5 && coeffs.scalar_type() == cdt && coeffs.is_cpu(),
              "ddimgmm::step: coeffs must be a 1-D ", dtype_name(cdt),
              " tensor of 5 values (a_t, b_t, a_s, b_s, noise_std) on the sample's device (cpu), got ",
              dtype_name(coeffs.scalar_type()), " ", coeffs.sizes(), " on ", coeffs.device());
  TORCH_CHECK(prediction_type >= 0 && prediction_type <= 3,
              "ddimgmm::step: prediction_type must be 0 (epsilon), 1 (sample), 2 (v_prediction) or 3 (flow), got ",
              prediction_type);
  TORCH_CHECK(!clip_sample_range || *clip_sample_range > 0, "ddimgmm::step: clip_sample_range must be > 0, got ",
              clip_sample_range.value_or(0));
  TORCH_CHECK(seed >= 0, "ddimgmm::step: seed must be >= 0, got ", seed);
  TORCH_CHECK(step_index >= 0 && step_index < kMaxIndex, "ddimgmm::step: step_index must be in [0, 2**32), got ",
              step_index);
  TORCH_CHECK(sample_offset >= 0 && sample_offset + B <= kMaxIndex,
              "ddimgmm::step: sample_offset must be >= 0 with sample_offset + batch size <= 2**32, got ", sample_offset,
              " + ", B);
  TORCH_CHECK(D <= 4 * kMaxIndex, "ddimgmm::step: per-sample numel must be <= 2**34 (32-bit Philox counter), got ", D);

  Tables tab;
  at::Tensor pri, off, var;
  const int n_tables = int(priors.has_value()) + int(offsets.has_value()) + int(var_offsets.has_value());
  TORCH_CHECK(n_tables == 0 || n_tables == 3, "ddimgmm::step: pass all of priors, offsets, var_offsets or none");
  if (n_tables == 3) {
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"priors", *priors},
                                  {"offsets", *offsets}, {"var_offsets", *var_offsets}}) {
      TORCH_CHECK(t.device() == sample.device(), "ddimgmm::step: ", name, " is on ", t.device(),
                  " but sample is on ", sample.device(), "; move the GMM tables to the sample's device");
      TORCH_CHECK(t.scalar_type() == cdt, "ddimgmm::step: ", name, " must be ", dtype_name(cdt),
                  " (the compute dtype of a ", dtype_name(dtype), " sample), got ", dtype_name(t.scalar_type()));
    }
    TORCH_CHECK(priors->dim() == 1 && priors->numel() >= 1, "ddimgmm::step: priors must have shape [K], K >= 1, got ",
                priors->sizes());
    tab.K = priors->numel();
    TORCH_CHECK(offsets->dim() == 2 && offsets->size(0) == tab.K && offsets->size(1) == D,
                "ddimgmm::step: offsets must have shape [K, D] = [", tab.K, ", ", D, "] (D = per-sample numel), got ",
                offsets->sizes());
    TORCH_CHECK(var_offsets->dim() == 2 && var_offsets->size(0) == tab.K && var_offsets->size(1) <= D,
                "ddimgmm::step: var_offsets must have shape [K, Dv] with K = ", tab.K, " and Dv <= ", D, ", got ",
                var_offsets->sizes());
    pri = priors->contiguous();
    off = offsets->contiguous();
    var = var_offsets->contiguous();
    tab.priors = pri.data_ptr();
    tab.offsets = off.data_ptr();
    tab.var_offsets = var.data_ptr();
    tab.Dv = var.size(1);
  }
  at::Tensor z, kin;
  if (noise) {
    TORCH_CHECK(noise->is_floating_point() && noise->sizes() == sample.sizes() && noise->device() == sample.device(),
                "ddimgmm::step: noise must be a floating tensor of the sample's shape ", sample.sizes(), " on ",
                sample.device(), ", got ", dtype_name(noise->scalar_type()), " ", noise->sizes(), " on ",
                noise->device());
    z = noise->to(cdt).contiguous();
  }
  if (components) {
    TORCH_CHECK(n_tables == 3, "ddimgmm::step: components given without GMM tables");
    TORCH_CHECK((components->scalar_type() == at::kLong || components->scalar_type() == at::kInt) &&
                    components->dim() == 1 && components->size(0) == B && components->device() == sample.device(),
                "ddimgmm::step: components must be an int32/int64 tensor of shape [", B, "] on ", sample.device(),
                ", got ", dtype_name(components->scalar_type()), " ", components->sizes(), " on ",
                components->device());
    kin = components->to(at::kLong).contiguous();
    if (B > 0) {
      const int64_t lo = kin.min().item<int64_t>(), hi = kin.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < tab.K, "ddimgmm::step: components must be in [0, ", tab.K, "), got values in [", lo,
                  ", ", hi, "]");
    }
  }

  const at::Tensor x = sample.contiguous(), m = model_output.contiguous();
  at::Tensor prev = at::empty(sample.sizes(), sample.options());
  at::Tensor x0 = return_pred_original ? at::empty(sample.sizes(), sample.options()) : at::empty({0}, sample.options());
  at::Tensor comps = at::empty({n_tables ? B : 0}, sample.options().dtype(at::kLong));
  if (B == 0) return {prev, x0, comps};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ddimgmm_step_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    auto go = [&](auto m_tag) {
      using m_t = decltype(m_tag);
      auto args = std::tie(m, x, coeffs, tab, z, kin, prediction_type, guidance_scale, clip_sample_range,
                           use_clipped_model_output, seed, sample_offset, step_index, prev, x0, comps);
      if (guided && return_pred_original) std::apply(run<scalar_t, m_t, true, true>, args);
      if (guided && !return_pred_original) std::apply(run<scalar_t, m_t, true, false>, args);
      if (!guided && return_pred_original) std::apply(run<scalar_t, m_t, false, true>, args);
      if (!guided && !return_pred_original) std::apply(run<scalar_t, m_t, false, false>, args);
    };
    if (m.scalar_type() == dtype) {
      go(scalar_t{});
    } else {
      go(T{});
    }
  });
  return {prev, x0, comps};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddimgmm, CPU, m) { m.impl("step", &step_cpu); }

}  // namespace ddimgmm
