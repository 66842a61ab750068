// ddimgmm::offset_directions: O[s] ~ N(0, I) (D x K, row-major flat index f = d K + k) of parameter set s,
// element for element reference.offset_directions:
//   O[s].flat[f] = lane f % 4 of normals(philox(c0 = (f / 4) mod 2^32, c1 = (f / 4) >> 32, c2 = s,
//                                               c3 = OFFSETS), key = seed), computed in float64.
// The pure-torch reference spends seconds on the 6.5M draws of [50, 16384, 8]; this is one parallel pass.
#include "../stable.h"
#include "philox.h"

namespace ddimgmm {
namespace {

constexpr uint32_t kOffsetsStream = 2;  // c3 of reference.OFFSETS

Tensor offset_directions(int64_t n_sets, int64_t dim, int64_t n_components, int64_t seed) {
  DDIMGMM_CHECK(n_sets >= 0 && dim >= 0 && n_components >= 0,
                "ddimgmm::offset_directions: n_sets, dim, n_components must be >= 0, got ", n_sets, ", ", dim, ", ",
                n_components);
  DDIMGMM_CHECK(n_sets < (int64_t(1) << 32), "ddimgmm::offset_directions: n_sets must be < 2**32, got ", n_sets);
  // seed: the 64-bit Philox key's bits as an int64 (Python passes seeds >= 2**63 as negative numbers).
  Tensor out = empty_tensor({n_sets, dim, n_components}, ScalarType::Double, torch::headeronly::DeviceType::CPU);
  const int64_t numel = dim * n_components, groups = (numel + 3) / 4;
  const uint32_t k0 = uint32_t(uint64_t(seed)), k1 = uint32_t(uint64_t(seed) >> 32);
  double* base = out.mutable_data_ptr<double>();
  torch::stable::parallel_for(0, n_sets * groups, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = i / groups, g = i % groups;
      uint32_t c0 = uint32_t(g), c1 = uint32_t(uint64_t(g) >> 32), c2 = uint32_t(s), c3 = kOffsetsStream;
      philox::philox4x32_10(c0, c1, c2, c3, k0, k1);
      double z[4];
      philox::BoxMuller<double>::pair(c0, c1, z[0], z[1]);
      philox::BoxMuller<double>::pair(c2, c3, z[2], z[3]);
      double* dst = base + s * numel + 4 * g;
      for (int64_t lane = 0; lane < 4 && 4 * g + lane < numel; ++lane) dst[lane] = z[lane];
    }
  });
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(ddimgmm, CompositeExplicitAutograd, m) {
  m.impl("offset_directions", TORCH_BOX(&offset_directions));
}

}  // namespace ddimgmm
