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
//   K <= kSmallK: one fused pass per stage over the rows of O, a cyclic Jacobi eigensolver per matrix; with
//     many matrices each thread takes whole matrices through every stage (O read from memory once, then
//     from cache), with few it splits the rows.
//   K >  kSmallK: the stages as ATen ops in float64 (BLAS GEMMs, LAPACK syevd; csrc/thin_svd_aten.h, shared
//     with CUDA), where the K^2 work per row makes BLAS the right tool.
//
// Squaring the condition number limits what the Gram route can resolve: a matrix whose smallest singular
// value is below kMinSigmaRatio times its largest is rejected as numerically rank-deficient (LAPACK would
// return arbitrary vectors for the null space anyway). Non-finite input is rejected too. A matrix past
// kGramMaxCond (below kMinSigmaRatio) is handed to LAPACK, and one whose Gram would over- or underflow is
// scaled by a power of two first, so dg.thin_svd needs no pass of its own over O on CPU.
#include "../stable.h"
#include "../thin_svd_aten.h"
#include "isa.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

namespace ddimgmm {
namespace {

constexpr int64_t kSmallK = 32;
// Rows per work item of the fused route. The chunking depends only on the shape (never on the thread
// count), so partial sums are added in a fixed order and the result is bitwise deterministic.
constexpr int64_t kChunkRows = 4096;
constexpr int64_t kMaxWorkItems = 256;

enum Status : int { kOk = 0, kNonFinite = 1, kRankDeficient = 2, kIllConditioned = 3, kSecondPassFailed = 4 };

// Past this condition number the Gram route's U (off LAPACK's by ~eps64 cond^2 in its columns, though
// orthonormal after the second pass) gives way to LAPACK for that matrix: U then agrees with LAPACK to ~1e-11
// (float64) at any condition. The eigenvalues of G resolve sigma_min / sigma_max to ~eps64 cond^2 relative,
// plenty to draw this line.
template <typename scalar_t>
constexpr double kGramMaxCond = std::is_same_v<scalar_t, float> ? 1e4 : 1e3;

// A Gram diagonal below this (2^-700) means products of O's entries may have lost bits to underflow.
constexpr double kTinyGram = 0x1p-700;

void check_input(const Tensor& O) {
  DDIMGMM_CHECK(O.dim() == 3, "thin_svd: O must have shape [S, D, K], got ", O.dim(), " dimensions");
  DDIMGMM_CHECK(O.scalar_type() == ScalarType::Float || O.scalar_type() == ScalarType::Double,
                "thin_svd: O must be float32 or float64, got ", O.scalar_type());
  DDIMGMM_CHECK(O.size(2) <= O.size(1), "thin_svd: O [S, D, K] needs K <= D, got shape ", shape(O.sizes()));
}

// Raises for the first failed matrix; `sigma_ratio` holds sigma_min / sigma_max of each matrix.
void raise_on_status(const std::vector<int>& status, const std::vector<double>& sigma_ratio) {
  for (size_t s = 0; s < status.size(); ++s) {
    DDIMGMM_CHECK(status[s] != kNonFinite, "thin_svd: O must be finite; O[", s,
                  "] holds inf or nan (or values whose squares overflow)");
    DDIMGMM_CHECK(status[s] != kRankDeficient, "thin_svd: O[", s,
                  "] is numerically rank-deficient: sigma_min / sigma_max = ", sigma_ratio[s], " <= ",
                  kMinSigmaRatio, " (the Gram route cannot resolve it; use reference.thin_svd)");
    DDIMGMM_CHECK(status[s] != kSecondPassFailed, "thin_svd: second orthogonalisation pass failed for O[", s, "]");
  }
}

// The first pass leaves ||U1^T U1 - I|| of order eps64 K sqrt(D) cond(O)^2 (rounding of G). The second
// pass runs when that could show in the output dtype (eps `out_eps`).
bool needs_second_pass(double min_sigma_ratio, int64_t D, int64_t K, double out_eps) {
  const double first_pass_error = std::numeric_limits<double>::epsilon() * K * std::sqrt(static_cast<double>(D)) /
                                  (min_sigma_ratio * min_sigma_ratio);
  return first_pass_error > 1e-3 * out_eps;
}

// U[ill] = LAPACK's U of O[ill] (float64, rounded to O's dtype), each column's first entry of largest
// magnitude made positive as in reference.thin_svd (argmax returns the first maximal entry).
void lapack_fallback(const Tensor& O, Tensor& U, const std::vector<int64_t>& ill) {
  Tensor index = empty_tensor({int64_t(ill.size())}, ScalarType::Long, O.device());
  std::copy(ill.begin(), ill.end(), index.mutable_data_ptr<int64_t>());
  const Tensor picked = torch::stable::to(aten("aten::index_select", "", O, int64_t(0), index), ScalarType::Double);
  const Tensor V = aten<3>("aten::linalg_svd", "", picked, /*full_matrices=*/false, std::optional<std::string>())[0];
  aten("aten::index_copy_", "", U, int64_t(0), index, op::fix_signs(torch::stable::to(V, O.scalar_type())));
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
// functions so that each gets ISA clones (AVX2 / AVX-512 where the CPU has them). `scale` is a power of two
// (exact; 1 unless the matrix's Gram would over- or underflow).

// Rows as GCC vectors of KP doubles: GCC's own vectorisation of the scalar loops shuffled lanes through
// scalar adds and ran 2-3x slower than these. Element-wise IEEE operations with no contraction: every clone
// rounds alike.
template <typename T, int N>
struct Vector {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};
template <int KP>
using Row = typename Vector<double, KP>::type;
template <typename scalar_t, int KP>
using StoredRow = typename Vector<scalar_t, KP>::type;

// y = scale o[:K] (m == nullptr) or scale o[:K] M (m: KP x KP padded, rows added in order), zero beyond K;
// o is one row of O. kFull: K == KP, so the row is loaded as one vector.
template <typename scalar_t, int KP, bool kFull>
DDIMGMM_INLINE void load_row(const scalar_t* o, int64_t K, double scale, const double* m, Row<KP>& y) {
  Row<KP> x{};
  if (kFull) {
    StoredRow<scalar_t, KP> r;
    __builtin_memcpy(&r, o, sizeof(r));
    x = __builtin_convertvector(r, Row<KP>) * scale;
  } else {
    for (int64_t j = 0; j < K; ++j) x[j] = static_cast<double>(o[j]) * scale;
  }
  if (m == nullptr) {
    y = x;
    return;
  }
  Row<KP> acc{};
  for (int64_t k = 0; k < (kFull ? KP : K); ++k) {
    Row<KP> mk;
    __builtin_memcpy(&mk, m + k * KP, sizeof(mk));
    acc += x[k] * mk;
  }
  y = acc;
}

// g [KP, KP] += sum over rows d0 .. d1 of O (row stride K) of y^T y, y = load_row(row, m). Rows go through
// an L1-sized block Y [kBlock]; g is updated kPanel rows at a time, the panel's accumulators in registers
// across the block: 64 doubles, i.e. 8 independent AVX-512 add chains, so the loop runs at the adder's
// throughput. Every entry of g adds its rows in order, whatever the panel width.
template <typename scalar_t, int KP, bool kFull>
DDIMGMM_ISA_CLONES void gram_rows(const scalar_t* O, int64_t K, int64_t d0, int64_t d1, double scale, const double* m,
                                  double* g) {
  constexpr int kBlock = 64, kPanel = KP * KP <= 64 ? KP : 64 / KP;
  Row<KP> Y[kBlock];
  for (int64_t b0 = d0; b0 < d1; b0 += kBlock) {
    const int rows = static_cast<int>(std::min<int64_t>(kBlock, d1 - b0));
    for (int b = 0; b < rows; ++b) load_row<scalar_t, KP, kFull>(O + (b0 + b) * K, K, scale, m, Y[b]);
    for (int i = 0; i < KP; i += kPanel) {
      Row<KP> acc[kPanel];
      __builtin_memcpy(acc, &g[i * KP], sizeof(acc));
      for (int b = 0; b < rows; ++b)
        for (int p = 0; p < kPanel; ++p) acc[p] += Y[b][i + p] * Y[b];
      __builtin_memcpy(&g[i * KP], acc, sizeof(acc));
    }
  }
}

// U rows d0 .. d1 = O rows M rounded to scalar_t; hi / lo [KP] get the running column max / min (branch-free
// and in registers).
template <typename scalar_t, int KP, bool kFull>
DDIMGMM_ISA_CLONES void write_rows(const scalar_t* O, scalar_t* U, int64_t K, int64_t d0, int64_t d1, double scale,
                                   const double* m, double* hi, double* lo) {
  Row<KP> h, l, y;
  __builtin_memcpy(&h, hi, sizeof(h));
  __builtin_memcpy(&l, lo, sizeof(l));
  for (int64_t d = d0; d < d1; ++d) {
    load_row<scalar_t, KP, kFull>(O + d * K, K, scale, m, y);
    const StoredRow<scalar_t, KP> v = __builtin_convertvector(y, StoredRow<scalar_t, KP>);
    if (kFull) {
      __builtin_memcpy(U + d * K, &v, sizeof(v));
    } else {
      for (int64_t j = 0; j < K; ++j) U[d * K + j] = v[j];
    }
    const Row<KP> r = __builtin_convertvector(v, Row<KP>);  // 0 beyond K
    h = h < r ? r : h;
    l = r < l ? r : l;
  }
  __builtin_memcpy(hi, &h, sizeof(h));
  __builtin_memcpy(lo, &l, sizeof(l));
}

// U rows d0 .. d1, column j, times sign[j] (+-1: exact, and 0 becomes -0 as negation does; no branch).
template <typename scalar_t>
DDIMGMM_ISA_CLONES void flip_rows(scalar_t* U, int64_t K, int64_t d0, int64_t d1, const scalar_t* sign) {
  for (int64_t d = d0; d < d1; ++d)
    for (int64_t j = 0; j < K; ++j) U[d * K + j] *= sign[j];
}

// Every stage works on one matrix s, row chunk by row chunk (chunks fixed by the shape), with scratch that
// the caller owns; two schedules run the same stages (run()), so they give the same bits.
template <typename scalar_t, int KP>
struct SmallK {
  const scalar_t* O;
  scalar_t* U;
  int64_t S, D, K, chunks, chunk_rows;
  std::vector<double> scale;   // [S] power of two applied to O[s] (1 unless its Gram over- or underflows)
  std::vector<double> M;       // [S, KP, KP] U[s] = scale O[s] M[s], zero-padded
  std::vector<int> status;     // [S]
  std::vector<double> ratio;   // [S] sigma_min / sigma_max from the Gram's eigenvalues

  SmallK(const scalar_t* O_, scalar_t* U_, int64_t S_, int64_t D_, int64_t K_, int64_t chunks_, int64_t chunk_rows_)
      : O(O_), U(U_), S(S_), D(D_), K(K_), chunks(chunks_), chunk_rows(chunk_rows_), scale(S_, 1.0),
        M(S_ * KP * KP, 0.0), status(S_, kOk), ratio(S_, 0.0) {}

  int64_t row_begin(int64_t c) const { return c * chunk_rows; }
  int64_t row_end(int64_t c) const { return std::min(D, (c + 1) * chunk_rows); }
  const scalar_t* Os(int64_t s) const { return O + s * D * K; }

  // part [KP, KP] = Gram of chunk c of O[s] (m == nullptr) or of O[s] M[s] (m = M[s]).
  void gram_chunk(int64_t s, int64_t c, const double* m, double* part) const {
    std::fill_n(part, KP * KP, 0.0);
    if (K == KP) {
      gram_rows<scalar_t, KP, true>(Os(s), K, row_begin(c), row_end(c), scale[s], m, part);
    } else {
      gram_rows<scalar_t, KP, false>(Os(s), K, row_begin(c), row_end(c), scale[s], m, part);
    }
  }

  // G [K, K] = the chunks' partial Grams (parts [chunks, KP, KP]) added in chunk order.
  void sum_chunks(const double* parts, double* G) const {
    std::fill_n(G, K * K, 0.0);
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t i = 0; i < K; ++i)
        for (int64_t j = 0; j < K; ++j) G[i * K + j] += parts[(c * KP + i) * KP + j];
  }

  // From the first Gram: status, ratio and M[s] = V L^(-1/2). A Gram whose diagonal is not finite or is so
  // small that products of O's entries lose bits to underflow comes from a matrix with non-finite entries
  // (status kNonFinite) or from one whose scale is extreme: that one is scaled by a power of two and its
  // Gram recomputed (U does not depend on the scale; python scaling cost two passes over O).
  void first_stage(int64_t s, double* parts) {
    std::vector<double> A(K * K), lambda(K), V(K * K);
    sum_chunks(parts, A.data());
    bool finite = true;
    double top = 0.0;
    for (int64_t i = 0; i < K; ++i) {
      finite = finite && std::isfinite(A[i * K + i]);
      top = std::max(top, A[i * K + i]);
    }
    if (!finite || top < kTinyGram) {
      bool entries_finite = true;
      double peak = 0.0;
      for (int64_t i = 0; i < D * K; ++i) {
        const double v = std::abs(static_cast<double>(Os(s)[i]));
        entries_finite = entries_finite && std::isfinite(v);
        peak = std::max(peak, v);
      }
      if (!entries_finite) {
        status[s] = kNonFinite;
        return;
      }
      if (peak > 0.0) {
        scale[s] = std::ldexp(1.0, -std::ilogb(peak));
        for (int64_t c = 0; c < chunks; ++c) gram_chunk(s, c, nullptr, &parts[c * KP * KP]);
        sum_chunks(parts, A.data());
      }
    }
    jacobi_eigh(K, A, lambda, V);
    ratio[s] = lambda[0] > 0.0 ? std::sqrt(std::max(lambda[K - 1], 0.0) / lambda[0]) : 0.0;
    if (!(ratio[s] > kMinSigmaRatio)) {
      status[s] = kRankDeficient;
      return;
    }
    if (ratio[s] * kGramMaxCond<scalar_t> < 1.0) {
      status[s] = kIllConditioned;
      return;
    }
    double* m = &M[s * KP * KP];
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) m[i * KP + j] = V[i * K + j] / std::sqrt(lambda[j]);
  }

  // The first pass leaves ||U1^T U1 - I|| of order eps64 K sqrt(D) cond^2 (rounding of G); the second runs
  // when that could show in the output dtype: always for float64 output, for float32 output only past
  // cond ~ 20 (not for the GMM's Gaussian draws).
  bool second_pass_needed(int64_t s) const {
    return status[s] == kOk && needs_second_pass(ratio[s], D, K, std::numeric_limits<scalar_t>::epsilon());
  }

  // Second pass from the Gram of O M (parts): G2 = R^T R, M <- M R^(-1). R is near the identity, so its
  // Cholesky cannot fail once the rank check has passed (if it did: status kSecondPassFailed, raised after the
  // parallel region, which would not carry the message).
  void second_stage(int64_t s, const double* parts) {
    std::vector<double> R(K * K), W(K * K);
    sum_chunks(parts, R.data());
    if (!cholesky_upper(K, R)) {
      status[s] = kSecondPassFailed;
      return;
    }
    double* m = &M[s * KP * KP];
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) W[i * K + j] = m[i * KP + j];
    right_solve_upper(K, R, W);
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) m[i * KP + j] = W[i * K + j];
  }

  // Chunk c of U[s] = scale O[s] M[s] rounded to scalar_t; best / negative [K]: the chunk's largest |u| per
  // column and whether its first entry of that magnitude is negative. The row loop keeps branch-free running
  // max and min (it vectorises); only an exact tie |max| = |min| rescans the chunk.
  void write_chunk(int64_t s, int64_t c, double* best, char* negative) const {
    const int64_t d0 = row_begin(c), d1 = row_end(c);
    double hi[KP], lo[KP];
    std::fill_n(hi, KP, -std::numeric_limits<double>::infinity());
    std::fill_n(lo, KP, std::numeric_limits<double>::infinity());
    scalar_t* Us = U + s * D * K;
    if (K == KP) {
      write_rows<scalar_t, KP, true>(Os(s), Us, K, d0, d1, scale[s], &M[s * KP * KP], hi, lo);
    } else {
      write_rows<scalar_t, KP, false>(Os(s), Us, K, d0, d1, scale[s], &M[s * KP * KP], hi, lo);
    }
    for (int64_t j = 0; j < K; ++j) {
      best[j] = d1 > d0 ? std::max(hi[j], -lo[j]) : -1.0;
      negative[j] = d1 > d0 && -lo[j] > hi[j];
      if (d1 <= d0 || hi[j] != -lo[j]) continue;
      for (int64_t d = d0; d < d1; ++d) {
        const double v = static_cast<double>(Us[d * K + j]);
        if (std::abs(v) == best[j]) {
          negative[j] = v < 0;
          break;
        }
      }
    }
  }

  // sign [KP] of each column of U[s] from its chunks (best / negative [chunks, K]), combined in row order
  // with strict comparisons so that the first maximal entry wins as in reference.thin_svd. Returns whether
  // any column flips.
  bool column_signs(const double* best, const char* negative, scalar_t* sign) const {
    bool any = false;
    for (int64_t j = 0; j < K; ++j) {
      double top = -1.0;
      bool flip = false;
      for (int64_t c = 0; c < chunks; ++c) {
        if (best[c * K + j] > top) {
          top = best[c * K + j];
          flip = negative[c * K + j];
        }
      }
      sign[j] = flip ? scalar_t(-1) : scalar_t(1);
      any = any || flip;
    }
    return any;
  }

  void flip_chunk(int64_t s, int64_t c, const scalar_t* sign) const {
    flip_rows(U + s * D * K, K, row_begin(c), row_end(c), sign);
  }

  // By matrix: each thread runs every stage of its matrices, so a matrix read from memory by the first Gram
  // is still in cache for the second Gram, the output pass and the sign pass (O [16384, 8] float64 and its U
  // are 2 MB). Per stage over the whole batch (the other schedule), every pass streams all of O from DRAM:
  // that schedule is kept for few, tall matrices, where it splits a matrix's rows between threads.
  void run_by_matrix() {
    torch::stable::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> parts(chunks * KP * KP), best(chunks * K);
      std::vector<char> negative(chunks * K);
      scalar_t sign[KP];
      for (int64_t s = begin; s < end; ++s) {
        for (int64_t c = 0; c < chunks; ++c) gram_chunk(s, c, nullptr, &parts[c * KP * KP]);
        first_stage(s, parts.data());
        if (status[s] != kOk) continue;
        if (second_pass_needed(s)) {
          for (int64_t c = 0; c < chunks; ++c) gram_chunk(s, c, &M[s * KP * KP], &parts[c * KP * KP]);
          second_stage(s, parts.data());
          if (status[s] != kOk) continue;
        }
        for (int64_t c = 0; c < chunks; ++c) write_chunk(s, c, &best[c * K], &negative[c * K]);
        if (column_signs(best.data(), negative.data(), sign))
          for (int64_t c = 0; c < chunks; ++c) flip_chunk(s, c, sign);
      }
    });
  }

  // By (matrix, row chunk) work item, one stage at a time over the whole batch.
  template <typename F>
  void for_items(F fn) const {
    torch::stable::parallel_for(0, S * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) fn(item / chunks, item % chunks);
    });
  }

  void run_by_item() {
    std::vector<double> parts(S * chunks * KP * KP), best(S * chunks * K);
    std::vector<char> negative(S * chunks * K);
    auto part = [&](int64_t s, int64_t c) { return &parts[(s * chunks + c) * KP * KP]; };
    for_items([&](int64_t s, int64_t c) { gram_chunk(s, c, nullptr, part(s, c)); });
    torch::stable::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) first_stage(s, part(s, 0));
    });
    for_items([&](int64_t s, int64_t c) {
      if (second_pass_needed(s)) gram_chunk(s, c, &M[s * KP * KP], part(s, c));
    });
    torch::stable::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s)
        if (second_pass_needed(s)) second_stage(s, part(s, 0));
    });
    for_items([&](int64_t s, int64_t c) {
      if (status[s] == kOk) write_chunk(s, c, &best[(s * chunks + c) * K], &negative[(s * chunks + c) * K]);
    });
    std::vector<scalar_t> sign(S * KP, scalar_t(1));
    std::vector<char> flip(S, 0);
    for (int64_t s = 0; s < S; ++s)
      flip[s] = status[s] == kOk && column_signs(&best[s * chunks * K], &negative[s * chunks * K], &sign[s * KP]);
    for_items([&](int64_t s, int64_t c) {
      if (flip[s]) flip_chunk(s, c, &sign[s * KP]);
    });
  }

  // Returns the matrices left to LAPACK (ill-conditioned); raises for non-finite or rank-deficient ones.
  std::vector<int64_t> run(bool by_matrix) {
    if (by_matrix) {
      run_by_matrix();
    } else {
      run_by_item();
    }
    raise_on_status(status, ratio);
    std::vector<int64_t> ill;
    for (int64_t s = 0; s < S; ++s)
      if (status[s] == kIllConditioned) ill.push_back(s);
    return ill;
  }
};

template <typename scalar_t>
std::vector<int64_t> run_small_k(const scalar_t* O, scalar_t* U, int64_t S, int64_t D, int64_t K, int64_t chunks,
                                 int64_t chunk_rows, bool by_matrix) {
  // KP: the smallest of 1, 2, 4, 8, 16, 32 that holds K.
  switch (K <= 1 ? 1 : K <= 2 ? 2 : K <= 4 ? 4 : K <= 8 ? 8 : K <= 16 ? 16 : 32) {
    case 1: return SmallK<scalar_t, 1>(O, U, S, D, K, chunks, chunk_rows).run(by_matrix);
    case 2: return SmallK<scalar_t, 2>(O, U, S, D, K, chunks, chunk_rows).run(by_matrix);
    case 4: return SmallK<scalar_t, 4>(O, U, S, D, K, chunks, chunk_rows).run(by_matrix);
    case 8: return SmallK<scalar_t, 8>(O, U, S, D, K, chunks, chunk_rows).run(by_matrix);
    case 16: return SmallK<scalar_t, 16>(O, U, S, D, K, chunks, chunk_rows).run(by_matrix);
    default: return SmallK<scalar_t, 32>(O, U, S, D, K, chunks, chunk_rows).run(by_matrix);
  }
}

Tensor thin_svd_small_k(const Tensor& O) {
  const int64_t S = O.size(0), D = O.size(1), K = O.size(2);
  const Tensor Oc = torch::stable::contiguous(O);
  Tensor U = empty_tensor(O.sizes(), O.scalar_type(), O.device());
  // Rows are split into chunks only while there are few matrices: enough items to keep every core busy,
  // never more than kMaxWorkItems (bounds the S * chunks * K^2 partial sums). The chunks depend only on the
  // shape and both schedules add their partial sums in chunk order, so the result is bitwise the same for
  // any thread count.
  const int64_t chunks =
      std::max<int64_t>(1, std::min((D + kChunkRows - 1) / kChunkRows, kMaxWorkItems / std::max<int64_t>(S, 1)));
  const int64_t chunk_rows = (D + chunks - 1) / chunks;
  const bool by_matrix = chunks == 1 || S >= 4 * int64_t(torch::stable::get_num_threads());
  std::vector<int64_t> ill;
  if (O.scalar_type() == ScalarType::Float) {
    ill = run_small_k(Oc.const_data_ptr<float>(), U.mutable_data_ptr<float>(), S, D, K, chunks, chunk_rows, by_matrix);
  } else {
    ill = run_small_k(Oc.const_data_ptr<double>(), U.mutable_data_ptr<double>(), S, D, K, chunks, chunk_rows,
                      by_matrix);
  }
  if (!ill.empty()) lapack_fallback(Oc, U, ill);
  return U;
}

// ---------------------------------------------------------------------------------------------------------
// BLAS route, K > kSmallK
// ---------------------------------------------------------------------------------------------------------

Tensor thin_svd_blas(const Tensor& O) {
  const int64_t D = O.size(1), K = O.size(2);
  const bool is_float = O.scalar_type() == ScalarType::Float;
  const double out_eps = is_float ? std::numeric_limits<float>::epsilon() : std::numeric_limits<double>::epsilon();
  const double max_cond = is_float ? kGramMaxCond<float> : kGramMaxCond<double>;
  Tensor In = O;
  if (!is_float) {  // scaled by a power of two (exact): the Gram of a 1e-170 or 1e170 matrix under- or overflows
    const Tensor peak = torch::stable::amax(op::abs(O), {1, 2}, /*keepdim=*/true);
    const Tensor one = torch::stable::full(peak.sizes(), 1.0, ScalarType::Double, std::nullopt, O.device());
    const Tensor usable = aten("aten::logical_and", "", aten("aten::isfinite", "", peak),
                               aten("aten::gt", "Tensor", peak, scalar_like(peak, 0.0)));
    const Tensor exponent = aten<2>("aten::frexp", "Tensor", peak)[1];
    const Tensor scale = aten("aten::ldexp", "Tensor", one, aten("aten::neg", "", exponent));
    In = op::mul(O, op::where(usable, scale, one));
  }
  std::vector<int64_t> ill;
  Tensor U = thin_svd_aten(In, [&](const Tensor& finite, const Tensor& sigma_ratio) {
    const int64_t S = finite.size(0);
    std::vector<int> status(S, kOk);
    std::vector<double> ratio(S, 1.0);
    const Tensor f = torch::stable::contiguous(finite);
    for (int64_t s = 0; s < S; ++s) status[s] = f.const_data_ptr<bool>()[s] ? kOk : kNonFinite;
    if (sigma_ratio.defined()) {
      const Tensor r = torch::stable::contiguous(sigma_ratio);
      for (int64_t s = 0; s < S; ++s) {
        ratio[s] = r.const_data_ptr<double>()[s];
        if (!(ratio[s] > kMinSigmaRatio)) status[s] = kRankDeficient;
        if (status[s] == kOk && ratio[s] * max_cond < 1.0) ill.push_back(s);
      }
    }
    raise_on_status(status, ratio);
    return needs_second_pass(*std::min_element(ratio.begin(), ratio.end()), D, K, out_eps);
  }).U;
  if (!ill.empty()) lapack_fallback(torch::stable::contiguous(O), U, ill);
  return U;
}

Tensor thin_svd_cpu(const Tensor& O) {
  check_input(O);
  if (O.numel() == 0) return empty_tensor(O.sizes(), O.scalar_type(), O.device());
  return O.size(2) <= kSmallK ? thin_svd_small_k(O) : thin_svd_blas(O);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ddimgmm, CPU, m) { m.impl("thin_svd", TORCH_BOX(&thin_svd_cpu)); }

}  // namespace ddimgmm
