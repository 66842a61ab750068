// The large-K route of ddimgmm::thin_svd, written with ATen ops so one code path serves CPU (BLAS, LAPACK)
// and CUDA (cuBLAS, cuSOLVER). Mathematics as in csrc/cpu/thin_svd.cpp, all in float64:
//   G = O^T O = V L V^T (L descending),  U1 = O V L^(-1/2),  U1^T U1 = R^T R,  U = U1 R^(-1),
// then the sign convention of reference.thin_svd. Header-only: included by cpu/thin_svd.cpp and
// cuda/thin_svd.cu.
#pragma once

#include <ATen/ATen.h>

#include <limits>

namespace ddimgmm {

// sigma_min / sigma_max below this is "numerically rank-deficient": the Gram route squares the condition
// number, so float64 cannot resolve the smallest directions any further.
constexpr double kMinSigmaRatio = 1e-6;

struct ThinSvdAten {
  at::Tensor U;            // [S, D, K] in O's dtype, contiguous
  at::Tensor finite;       // [S] bool: the Gram diagonal is finite (O[s] holds no inf / nan)
  at::Tensor sigma_ratio;  // [S] float64: sigma_min / sigma_max (0 for a zero matrix)
};

// `check(finite, sigma_ratio)` runs before the eigen-decomposition (sigma_ratio undefined) and after it. It
// may raise, or let U carry nan for the failed matrices; its second call returns whether the second
// (CholeskyQR2) pass is needed.
template <typename Check>
ThinSvdAten thin_svd_aten(const at::Tensor& O, Check check) {
  const at::Tensor O64 = O.to(at::kDouble);
  const at::Tensor G = at::matmul(O64.mT(), O64);
  const at::Tensor finite = at::isfinite(G.diagonal(0, -2, -1)).all(-1);
  check(finite, at::Tensor());
  // Failed matrices get the identity as Gram so the batched solvers run; their U is set to nan below.
  const at::Tensor eye = at::eye(O.size(2), G.options());
  auto [lambda, V] = at::_linalg_eigh(at::where(finite.view({-1, 1, 1}), G, eye));
  lambda = lambda.flip(-1);  // descending
  V = V.flip(-1);
  const at::Tensor ratio = (lambda.select(-1, -1).clamp_min(0) / lambda.select(-1, 0)).sqrt().nan_to_num(0.0);
  const bool second_pass = check(finite, ratio);
  const at::Tensor ok = finite.logical_and(ratio > kMinSigmaRatio);
  const at::Tensor U1 = at::matmul(O64, V * lambda.clamp_min(std::numeric_limits<double>::min()).rsqrt().unsqueeze(-2));
  at::Tensor U = U1;
  if (second_pass) {
    const at::Tensor G2 = at::matmul(U1.mT(), U1);
    const at::Tensor R = std::get<0>(at::linalg_cholesky_ex(at::where(ok.view({-1, 1, 1}), G2, eye), /*upper=*/true));
    U = at::linalg_solve_triangular(R, U1, /*upper=*/true, /*left=*/false);
  }
  U = U.to(O.scalar_type());
  const at::Tensor pivot = at::gather(U, 1, U.abs().argmax(1, /*keepdim=*/true));  // first maximal entry
  U = U * at::where(pivot < 0, -1.0, 1.0).to(U.scalar_type());
  U = at::where(ok.view({-1, 1, 1}), U, std::numeric_limits<double>::quiet_NaN()).contiguous();
  return {U, finite, ratio};
}

}  // namespace ddimgmm
