// Batched thin SVD, CPU kernel of ddimgmm::thin_svd (docs/design.md 1.4; semantics: reference.thin_svd).
//
// For each of the S matrices O_s [D, K] (K <= D) the left singular vectors U_s [D, K] come from the K x K
// Gram matrix instead of a full SVD:
//
//   G  = O^T O = V L V^T                   (symmetric eigen-decomposition, L descending)
//   U1 = O W,   W = V L^(-1/2)             (U1^T U1 = I up to rounding of G: error ~ eps * cond(O)^2)
//   U1^T U1 = R^T R,   U = U1 R^(-1)       (second, CholeskyQR2-style pass: orthonormal to rounding)
//
// so U = O M with M = W R^(-1), which equals LAPACK's U up to column signs when the singular values are
// distinct. Everything but the storage of O and U is float64: for float32 input the products are exact and
// the result is accurate to float32 rounding. Signs follow reference.thin_svd: each column's entry of
// largest magnitude (in the output dtype, first on ties) is positive.
//
// Two routes with the same mathematics:
//   K <= kSmallK: one fused pass per stage over the rows of O, blocked over (matrix, row chunk) with
//     at::parallel_for, and a cyclic Jacobi eigensolver per matrix. Memory traffic is a few reads of O.
//   K >  kSmallK: the stages as ATen ops in float64 (BLAS GEMMs, LAPACK syevd; csrc/thin_svd_aten.h, shared
//     with CUDA), where the K^2 work per row makes BLAS the right tool.
//
// Squaring the condition number limits what the Gram route can resolve: a matrix whose smallest singular
// value is below kMinSigmaRatio times its largest is rejected as numerically rank-deficient (LAPACK would
// return arbitrary vectors for the null space anyway). Non-finite input is rejected too.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../thin_svd_aten.h"
#include "isa.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace ddimgmm {
namespace {

constexpr int64_t kSmallK = 32;
// Rows per work item of the fused route. The chunking depends only on the shape (never on the thread
// count), so partial sums are added in a fixed order and the result is bitwise deterministic.
constexpr int64_t kChunkRows = 4096;
constexpr int64_t kMaxWorkItems = 256;

enum Status : int { kOk = 0, kNonFinite = 1, kRankDeficient = 2 };

void check_input(const at::Tensor& O) {
  TORCH_CHECK(O.dim() == 3, "thin_svd: O must have shape [S, D, K], got ", O.dim(), " dimensions");
  TORCH_CHECK(O.scalar_type() == at::kFloat || O.scalar_type() == at::kDouble,
              "thin_svd: O must be float32 or float64, got ", O.scalar_type());
  TORCH_CHECK(O.size(2) <= O.size(1), "thin_svd: O [S, D, K] needs K <= D, got shape ", O.sizes());
}

// Raises for the first failed matrix; `sigma_ratio` holds sigma_min / sigma_max of each matrix.
void raise_on_status(const std::vector<int>& status, const std::vector<double>& sigma_ratio) {
  for (size_t s = 0; s < status.size(); ++s) {
    TORCH_CHECK(status[s] != kNonFinite, "thin_svd: O must be finite; O[", s,
                "] holds inf or nan (or values whose squares overflow)");
    TORCH_CHECK(status[s] != kRankDeficient, "thin_svd: O[", s,
                "] is numerically rank-deficient: sigma_min / sigma_max = ", sigma_ratio[s], " <= ",
                kMinSigmaRatio, " (the Gram route cannot resolve it; use reference.thin_svd)");
  }
}

// The first pass leaves ||U1^T U1 - I|| of order eps64 K sqrt(D) cond(O)^2 (rounding of G). The second
// pass runs when that could show in the output dtype (eps `out_eps`): always for float64 output, not for
// float32 output of well-conditioned O such as the GMM's Gaussian draws.
bool needs_second_pass(double min_sigma_ratio, int64_t D, int64_t K, double out_eps) {
  const double first_pass_error = std::numeric_limits<double>::epsilon() * K * std::sqrt(static_cast<double>(D)) /
                                  (min_sigma_ratio * min_sigma_ratio);
  return first_pass_error > 1e-3 * out_eps;
}

// ---------------------------------------------------------------------------------------------------------
// Small dense kernels on K x K row-major float64 matrices (K <= kSmallK)
// ---------------------------------------------------------------------------------------------------------

// Cyclic Jacobi: A (symmetric, destroyed) = V diag(lambda) V^T. Returns lambda descending and V's columns
// in that order. Rotations are skipped when |a_pq| is negligible against sqrt(a_pp a_qq) (relative
// accuracy for positive definite A, Demmel & Veselic 1992); the sweep loop ends when none is applied.
void jacobi_eigh(int64_t K, std::vector<double>& A, std::vector<double>& lambda, std::vector<double>& V) {
  std::vector<double> Vt(K * K, 0.0);  // V^T: row j is eigenvector j, so rotations touch contiguous rows
  for (int64_t i = 0; i < K; ++i) Vt[i * K + i] = 1.0;
  const double eps = std::numeric_limits<double>::epsilon();
  for (int sweep = 0; sweep < 64; ++sweep) {
    bool rotated = false;
    for (int64_t p = 0; p < K - 1; ++p) {
      for (int64_t q = p + 1; q < K; ++q) {
        const double apq = A[p * K + q];
        const double app = A[p * K + p], aqq = A[q * K + q];
        if (std::abs(apq) <= eps * std::sqrt(std::abs(app * aqq))) continue;
        rotated = true;
        const double theta = (aqq - app) / (2.0 * apq);
        const double t = std::copysign(1.0, theta) / (std::abs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (int64_t k = 0; k < K; ++k) {  // A <- A J (columns p, q)
          const double akp = A[k * K + p], akq = A[k * K + q];
          A[k * K + p] = c * akp - s * akq;
          A[k * K + q] = s * akp + c * akq;
        }
        for (int64_t k = 0; k < K; ++k) {  // A <- J^T A (rows p, q)
          const double apk = A[p * K + k], aqk = A[q * K + k];
          A[p * K + k] = c * apk - s * aqk;
          A[q * K + k] = s * apk + c * aqk;
        }
        A[p * K + q] = A[q * K + p] = 0.0;
        for (int64_t k = 0; k < K; ++k) {  // V <- V J, i.e. rows p, q of V^T
          const double vp = Vt[p * K + k], vq = Vt[q * K + k];
          Vt[p * K + k] = c * vp - s * vq;
          Vt[q * K + k] = s * vp + c * vq;
        }
      }
    }
    if (!rotated) break;
  }
  std::vector<int64_t> order(K);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return A[a * K + a] > A[b * K + b]; });
  for (int64_t j = 0; j < K; ++j) {
    lambda[j] = A[order[j] * K + order[j]];
    for (int64_t i = 0; i < K; ++i) V[i * K + j] = Vt[order[j] * K + i];
  }
}

// Upper Cholesky factor R of symmetric positive definite A (A = R^T R), in place in the upper triangle.
// Returns false if A is not numerically positive definite.
bool cholesky_upper(int64_t K, std::vector<double>& A) {
  for (int64_t j = 0; j < K; ++j) {
    double d = A[j * K + j];
    for (int64_t k = 0; k < j; ++k) d -= A[k * K + j] * A[k * K + j];
    if (!(d > 0.0)) return false;
    const double r = std::sqrt(d);
    A[j * K + j] = r;
    for (int64_t i = j + 1; i < K; ++i) {
      double v = A[j * K + i];
      for (int64_t k = 0; k < j; ++k) v -= A[k * K + j] * A[k * K + i];
      A[j * K + i] = v / r;
    }
  }
  return true;
}

// W <- W R^(-1) for upper triangular R (row by row forward substitution: x R = w).
void right_solve_upper(int64_t K, const std::vector<double>& R, std::vector<double>& W) {
  for (int64_t i = 0; i < K; ++i) {
    double* w = &W[i * K];
    for (int64_t j = 0; j < K; ++j) {
      double v = w[j];
      for (int64_t k = 0; k < j; ++k) v -= w[k] * R[k * K + j];
      w[j] = v / R[j * K + j];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Fused route, K <= kSmallK
// ---------------------------------------------------------------------------------------------------------

// The row passes run with the column count padded to the compile-time KP >= K (a power of two), so the
// per-row K x K products unroll and vectorize; padded columns of M are zero and never stored. They are free
// functions so that each gets ISA clones (AVX2 / AVX-512 where the CPU has them).

// y = o[:K] (m == nullptr) or o[:K] M (m: KP x KP padded), zero beyond K; o is one row of O.
template <typename scalar_t, int KP>
DDIMGMM_INLINE void load_row(const scalar_t* o, int64_t K, const double* m, double* y) {
  if (m == nullptr) {
    for (int j = 0; j < KP; ++j) y[j] = j < K ? static_cast<double>(o[j]) : 0.0;
    return;
  }
  for (int j = 0; j < KP; ++j) y[j] = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double ok = o[k];
    for (int j = 0; j < KP; ++j) y[j] += ok * m[k * KP + j];
  }
}

// g [KP, KP] += sum over rows d0 .. d1 of O (row stride K) of y^T y, y = load_row(row, m). Rows go through
// an L1-sized block Y [kBlock, KP]; g is updated kPanel rows at a time so that the panel's accumulators stay
// in registers across the block.
template <typename scalar_t, int KP>
DDIMGMM_ISA_CLONES void gram_rows(const scalar_t* O, int64_t K, int64_t d0, int64_t d1, const double* m, double* g) {
  constexpr int kBlock = 64, kPanel = KP >= 2 && KP <= 8 ? 2 : 1;
  alignas(64) double Y[kBlock * KP];
  for (int64_t b0 = d0; b0 < d1; b0 += kBlock) {
    const int rows = static_cast<int>(std::min<int64_t>(kBlock, d1 - b0));
    for (int b = 0; b < rows; ++b) load_row<scalar_t, KP>(O + (b0 + b) * K, K, m, &Y[b * KP]);
    for (int i = 0; i < KP; i += kPanel) {
      double acc[kPanel * KP];
      std::copy_n(&g[i * KP], kPanel * KP, acc);
      for (int b = 0; b < rows; ++b)
        for (int p = 0; p < kPanel; ++p)
          for (int j = 0; j < KP; ++j) acc[p * KP + j] += Y[b * KP + i + p] * Y[b * KP + j];
      std::copy_n(acc, kPanel * KP, &g[i * KP]);
    }
  }
}

// U rows d0 .. d1 = O rows M rounded to scalar_t; hi / lo [KP] get the running column max / min (branch-free,
// so the loop vectorises).
template <typename scalar_t, int KP>
DDIMGMM_ISA_CLONES void write_rows(const scalar_t* O, scalar_t* U, int64_t K, int64_t d0, int64_t d1, const double* m,
                                   double* hi, double* lo) {
  double y[KP];
  for (int64_t d = d0; d < d1; ++d) {
    load_row<scalar_t, KP>(O + d * K, K, m, y);
    scalar_t* u = U + d * K;
    for (int64_t j = 0; j < K; ++j) {
      const scalar_t v = static_cast<scalar_t>(y[j]);
      u[j] = v;
      hi[j] = std::max(hi[j], static_cast<double>(v));
      lo[j] = std::min(lo[j], static_cast<double>(v));
    }
  }
}

// U rows d0 .. d1, column j, times sign[j] (+-1: exact, and 0 becomes -0 as negation does; no branch).
template <typename scalar_t>
DDIMGMM_ISA_CLONES void flip_rows(scalar_t* U, int64_t K, int64_t d0, int64_t d1, const scalar_t* sign) {
  for (int64_t d = d0; d < d1; ++d)
    for (int64_t j = 0; j < K; ++j) U[d * K + j] *= sign[j];
}

template <typename scalar_t, int KP>
struct SmallK {
  const scalar_t* O;
  scalar_t* U;
  int64_t S, D, K, chunks, chunk_rows;

  // Runs fn(s, row_begin, row_end, item) for every (matrix, row chunk) work item in parallel.
  template <typename F>
  void for_items(F fn) const {
    at::parallel_for(0, S * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t s = item / chunks, c = item % chunks;
        fn(s, c * chunk_rows, std::min(D, (c + 1) * chunk_rows), item);
      }
    });
  }

  // M_s [K, K] (row-major, stride K) zero-padded to KP x KP.
  std::vector<double> pad(const std::vector<double>& M) const {
    std::vector<double> P(S * KP * KP, 0.0);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t i = 0; i < K; ++i)
        for (int64_t j = 0; j < K; ++j) P[(s * KP + i) * KP + j] = M[(s * K + i) * K + j];
    return P;
  }

  // sum_rows y^T y per matrix (y from load_row, M padded or nullptr), partial sums added in chunk order.
  // Returns [S, K, K].
  std::vector<double> gram(const std::vector<double>* M) const {
    std::vector<double> partial(S * chunks * KP * KP, 0.0);
    for_items([&](int64_t s, int64_t d0, int64_t d1, int64_t item) {
      gram_rows<scalar_t, KP>(O + s * D * K, K, d0, d1, M ? &(*M)[s * KP * KP] : nullptr, &partial[item * KP * KP]);
    });
    std::vector<double> G(S * K * K, 0.0);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < K; ++j) G[(s * K + i) * K + j] += partial[((s * chunks + c) * KP + i) * KP + j];
    return G;
  }

  // U[s] = O[s] M_s rounded to scalar_t, then each column's sign fixed by its entry of largest magnitude.
  void write_output(const std::vector<double>& M) const {
    // Per work item and column: largest |u| and its sign. The row loop keeps branch-free running max and
    // min (it vectorises); only an exact tie |max| = |min| rescans the item for its first entry of that
    // magnitude. Items are combined in row order with strict comparisons, so the first maximal entry wins
    // as in reference.thin_svd.
    std::vector<double> best(S * chunks * K, -1.0);
    std::vector<char> negative(S * chunks * K, 0);
    for_items([&](int64_t s, int64_t d0, int64_t d1, int64_t item) {
      double* b = &best[item * K];
      char* neg = &negative[item * K];
      double hi[KP], lo[KP];
      std::fill_n(hi, KP, -std::numeric_limits<double>::infinity());
      std::fill_n(lo, KP, std::numeric_limits<double>::infinity());
      write_rows<scalar_t, KP>(O + s * D * K, U + s * D * K, K, d0, d1, &M[s * KP * KP], hi, lo);
      for (int64_t j = 0; j < K && d1 > d0; ++j) {
        b[j] = std::max(hi[j], -lo[j]);
        neg[j] = -lo[j] > hi[j];
        if (hi[j] != -lo[j]) continue;
        for (int64_t d = d0; d < d1; ++d) {
          const double v = static_cast<double>(U[(s * D + d) * K + j]);
          if (std::abs(v) == b[j]) {
            neg[j] = v < 0;
            break;
          }
        }
      }
    });
    std::vector<char> flip(S * K, 0);
    bool any_flip = false;
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t j = 0; j < K; ++j) {
        double top = -1.0;
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t i = (s * chunks + c) * K + j;
          if (best[i] > top) {
            top = best[i];
            flip[s * K + j] = negative[i];
          }
        }
        any_flip = any_flip || flip[s * K + j];
      }
    }
    if (!any_flip) return;
    for_items([&](int64_t s, int64_t d0, int64_t d1, int64_t) {
      scalar_t sign[KP];
      for (int64_t j = 0; j < K; ++j) sign[j] = flip[s * K + j] ? scalar_t(-1) : scalar_t(1);
      flip_rows(U + s * D * K, K, d0, d1, sign);
    });
  }

  void run() const {
    const std::vector<double> G = gram(nullptr);
    // Per matrix: eigen-decomposition of G, W = V L^(-1/2).
    std::vector<double> W(S * K * K);
    std::vector<int> status(S, kOk);
    std::vector<double> sigma_ratio(S, 0.0);
    at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> A(K * K), lambda(K), V(K * K);
      for (int64_t s = begin; s < end; ++s) {
        std::copy_n(&G[s * K * K], K * K, A.begin());
        bool finite = true;
        for (int64_t i = 0; i < K; ++i) finite = finite && std::isfinite(A[i * K + i]);
        if (!finite) {
          status[s] = kNonFinite;
          continue;
        }
        jacobi_eigh(K, A, lambda, V);
        sigma_ratio[s] = lambda[0] > 0.0 ? std::sqrt(std::max(lambda[K - 1], 0.0) / lambda[0]) : 0.0;
        if (!(sigma_ratio[s] > kMinSigmaRatio)) {
          status[s] = kRankDeficient;
          continue;
        }
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < K; ++j) W[s * K * K + i * K + j] = V[i * K + j] / std::sqrt(lambda[j]);
      }
    });
    raise_on_status(status, sigma_ratio);
    // Second pass: G2 = (O W)^T (O W) = R^T R, M = W R^(-1). R is near the identity, so its Cholesky
    // cannot fail once the rank check has passed.
    const double min_ratio = *std::min_element(sigma_ratio.begin(), sigma_ratio.end());
    if (needs_second_pass(min_ratio, D, K, std::numeric_limits<scalar_t>::epsilon())) second_pass(W);
    write_output(pad(W));
  }

  void second_pass(std::vector<double>& W) const {
    const std::vector<double> Wp = pad(W);
    const std::vector<double> G2 = gram(&Wp);
    at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> R(K * K), Ws(K * K);
      for (int64_t s = begin; s < end; ++s) {
        std::copy_n(&G2[s * K * K], K * K, R.begin());
        TORCH_CHECK(cholesky_upper(K, R), "thin_svd: second orthogonalisation pass failed for O[", s, "]");
        std::copy_n(&W[s * K * K], K * K, Ws.begin());
        right_solve_upper(K, R, Ws);
        std::copy_n(Ws.begin(), K * K, &W[s * K * K]);
      }
    });
  }
};

template <typename scalar_t>
void run_small_k(const scalar_t* O, scalar_t* U, int64_t S, int64_t D, int64_t K, int64_t chunks, int64_t chunk_rows) {
  // KP: the smallest of 1, 2, 4, 8, 16, 32 that holds K.
  switch (K <= 1 ? 1 : K <= 2 ? 2 : K <= 4 ? 4 : K <= 8 ? 8 : K <= 16 ? 16 : 32) {
    case 1: return SmallK<scalar_t, 1>{O, U, S, D, K, chunks, chunk_rows}.run();
    case 2: return SmallK<scalar_t, 2>{O, U, S, D, K, chunks, chunk_rows}.run();
    case 4: return SmallK<scalar_t, 4>{O, U, S, D, K, chunks, chunk_rows}.run();
    case 8: return SmallK<scalar_t, 8>{O, U, S, D, K, chunks, chunk_rows}.run();
    case 16: return SmallK<scalar_t, 16>{O, U, S, D, K, chunks, chunk_rows}.run();
    default: return SmallK<scalar_t, 32>{O, U, S, D, K, chunks, chunk_rows}.run();
  }
}

at::Tensor thin_svd_small_k(const at::Tensor& O) {
  const int64_t S = O.size(0), D = O.size(1), K = O.size(2);
  at::Tensor Oc = O.contiguous();
  at::Tensor U = at::empty_like(Oc);
  // Split rows only while there are few matrices: enough items to keep every core busy, never more than
  // kMaxWorkItems (bounds the S * chunks * K^2 partial sums).
  const int64_t chunks =
      std::max<int64_t>(1, std::min((D + kChunkRows - 1) / kChunkRows, kMaxWorkItems / std::max<int64_t>(S, 1)));
  const int64_t chunk_rows = (D + chunks - 1) / chunks;
  AT_DISPATCH_FLOATING_TYPES(O.scalar_type(), "thin_svd_cpu", [&] {
    run_small_k<scalar_t>(Oc.data_ptr<scalar_t>(), U.data_ptr<scalar_t>(), S, D, K, chunks, chunk_rows);
  });
  return U;
}

// ---------------------------------------------------------------------------------------------------------
// BLAS route, K > kSmallK
// ---------------------------------------------------------------------------------------------------------

at::Tensor thin_svd_blas(const at::Tensor& O) {
  const int64_t D = O.size(1), K = O.size(2);
  const double out_eps = O.scalar_type() == at::kFloat ? std::numeric_limits<float>::epsilon()
                                                       : std::numeric_limits<double>::epsilon();
  return thin_svd_aten(O, [&](const at::Tensor& finite, const at::Tensor& sigma_ratio) {
    const int64_t S = finite.size(0);
    std::vector<int> status(S, kOk);
    std::vector<double> ratio(S, 1.0);
    const at::Tensor f = finite.contiguous();
    for (int64_t s = 0; s < S; ++s) status[s] = f.data_ptr<bool>()[s] ? kOk : kNonFinite;
    if (sigma_ratio.defined()) {
      const at::Tensor r = sigma_ratio.contiguous();
      for (int64_t s = 0; s < S; ++s) {
        ratio[s] = r.data_ptr<double>()[s];
        if (!(ratio[s] > kMinSigmaRatio)) status[s] = kRankDeficient;
      }
    }
    raise_on_status(status, ratio);
    return needs_second_pass(*std::min_element(ratio.begin(), ratio.end()), D, K, out_eps);
  }).U;
}

at::Tensor thin_svd_cpu(const at::Tensor& O) {
  check_input(O);
  if (O.numel() == 0) return at::empty_like(O, at::MemoryFormat::Contiguous);
  return O.size(2) <= kSmallK ? thin_svd_small_k(O) : thin_svd_blas(O);
}

}  // namespace

TORCH_LIBRARY_IMPL(ddimgmm, CPU, m) { m.impl("thin_svd", &thin_svd_cpu); }

}  // namespace ddimgmm
