// The large-K route of ddimgmm::thin_svd, written with ATen ops (called through the stable dispatcher) so one
// code path serves CPU (BLAS, LAPACK) and CUDA (cuBLAS, cuSOLVER). Mathematics as in csrc/cpu/thin_svd.cpp,
// all in float64:
//   G = O^T O = V L V^T (L descending),  U1 = O V L^(-1/2),  U1^T U1 = R^T R,  U = U1 R^(-1),
// then the sign convention of reference.thin_svd. Header-only: included by cpu/thin_svd.cpp and
// cuda/thin_svd.cu.
#pragma once

#include "stable.h"

#include <limits>
#include <string>
#include <tuple>

namespace ddimgmm {
// Internal to each including file, like torch::stable's own types (hidden visibility).
namespace {

// sigma_min / sigma_max below this is "numerically rank-deficient": the Gram route squares the condition
// number, so float64 cannot resolve the smallest directions any further.
constexpr double kMinSigmaRatio = 1e-6;

struct ThinSvdAten {
  Tensor U;            // [S, D, K] in O's dtype, contiguous
  Tensor finite;       // [S] bool: the Gram diagonal is finite (O[s] holds no inf / nan)
  Tensor sigma_ratio;  // [S] float64: sigma_min / sigma_max (0 for a zero matrix)
};

// The ATen ops of this route, through the stable dispatcher (schemas of native_functions.yaml).
namespace op {
inline Tensor mul(const Tensor& a, const Tensor& b) { return aten("aten::mul", "Tensor", a, b); }
inline Tensor where(const Tensor& c, const Tensor& a, const Tensor& b) { return aten("aten::where", "self", c, a, b); }
inline Tensor where(const Tensor& c, const Tensor& a, double b) { return where(c, a, scalar_like(a, b)); }
inline Tensor batch_mask(const Tensor& ok) { return torch::stable::view(ok, {-1, 1, 1}); }
inline Tensor mT(const Tensor& t) { return torch::stable::transpose(t, -2, -1); }
inline Tensor abs(const Tensor& t) { return aten("aten::abs", "", t); }
// Each column multiplied by the sign that makes its first entry of largest magnitude positive (the sign
// convention of reference.thin_svd; argmax returns the first maximal entry).
inline Tensor fix_signs(const Tensor& U) {
  const Tensor index = aten("aten::argmax", "", abs(U), std::optional<int64_t>(1), true);
  const Tensor pivot = aten("aten::gather", "", U, int64_t(1), index, false);
  const Tensor negative = aten("aten::lt", "Tensor", pivot, scalar_like(pivot, 0.0));
  return mul(U, where(negative, scalar_like(U, -1.0), scalar_like(U, 1.0)));
}
}  // namespace op

// `check(finite, sigma_ratio)` runs before the eigen-decomposition (sigma_ratio undefined) and after it. It
// may raise, or let U carry nan for the failed matrices; its second call returns whether the second
// (CholeskyQR2) pass is needed.
template <typename Check>
ThinSvdAten thin_svd_aten(const Tensor& O, Check check) {
  using namespace op;
  const Tensor O64 = torch::stable::to(O, ScalarType::Double);
  const Tensor G = torch::stable::matmul(mT(O64), O64);
  const Tensor diagonal = aten("aten::diagonal", "", G, int64_t(0), int64_t(-2), int64_t(-1));
  const Tensor finite = aten("aten::all", "dim", aten("aten::isfinite", "", diagonal), int64_t(-1), false);
  check(finite, Tensor());
  // Failed matrices get the identity as Gram so the batched solvers run; their U is set to nan below.
  const Tensor eye = aten("aten::eye", "", O.size(2), std::optional<ScalarType>(ScalarType::Double),
                          std::optional<torch::headeronly::Layout>(), std::optional<torch::stable::Device>(O.device()),
                          std::optional<bool>());
  const auto eigh = aten<2>("aten::linalg_eigh", "", where(batch_mask(finite), G, eye), std::string("L"));
  const std::vector<int64_t> last{-1};
  const Tensor lambda = aten("aten::flip", "", eigh[0], last);  // descending
  const Tensor V = aten("aten::flip", "", eigh[1], last);
  const Tensor zero = scalar_like(lambda, 0.0);
  const Tensor ratio = aten(
      "aten::nan_to_num", "",
      aten("aten::sqrt", "",
           aten("aten::div", "Tensor", aten("aten::clamp_min", "Tensor", torch::stable::select(lambda, -1, -1), zero),
                torch::stable::select(lambda, -1, 0))),
      std::optional<double>(0.0), std::optional<double>(), std::optional<double>());
  const bool second_pass = check(finite, ratio);
  const Tensor ok = aten("aten::logical_and", "", finite,
                         aten("aten::gt", "Tensor", ratio, scalar_like(ratio, kMinSigmaRatio)));
  const Tensor inv_sqrt = aten(
      "aten::rsqrt", "", aten("aten::clamp_min", "Tensor", lambda, scalar_like(lambda, std::numeric_limits<double>::min())));
  const Tensor U1 = torch::stable::matmul(O64, mul(V, torch::stable::unsqueeze(inv_sqrt, -2)));
  Tensor U = U1;
  if (second_pass) {
    const Tensor G2 = torch::stable::matmul(mT(U1), U1);
    const Tensor R = aten<2>("aten::linalg_cholesky_ex", "", where(batch_mask(ok), G2, eye), true, false)[0];
    U = aten("aten::linalg_solve_triangular", "", R, U1, true, false, false);
  }
  U = fix_signs(torch::stable::to(U, O.scalar_type()));
  U = torch::stable::contiguous(where(batch_mask(ok), U, std::numeric_limits<double>::quiet_NaN()));
  return {U, finite, ratio};
}

}  // namespace
}  // namespace ddimgmm
