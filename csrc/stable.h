// The LibTorch stable ABI as the kernels use it: one compiled _C loads in every torch from its target on.
// Only torch/csrc/stable (C shim calls) and torch/headeronly (inline code) are used; ATen ops go through the
// stable dispatcher call (aten()). Included first by every source, .cu included (nvcc gets no extra flags).
//
// What the stable surface of the target cannot express, and the route taken:
//   - tags on a schema (def with tags is 2.12+): the schemas are defined in Python (ddim_gmm_ext/ops/schema.py);
//   - typed errors: only standard exceptions cross; ValueError comes from std::invalid_argument, TypeError from
//     pybind11::type_error (csrc/cpu/type_error.h), both through torch's pybind11 translation;
//   - a failed shim call (an ATen op, parallel_for) raises RuntimeError without the callee's message: the
//     kernels raise their own errors outside parallel regions (thin_svd's status codes);
//   - Scalar arguments of ATen ops: 0-d tensors instead (scalar_like);
//   - the current CUDA stream: the C shim's aoti_torch_get_current_cuda_stream (a C++ wrapper is 2.13+).
#pragma once

// The oldest torch whose stable ABI the kernels target (2.10: parallel_for, get_num_threads, the dispatcher
// call with a build version). MIN_TORCH in ddim_gmm_ext/ops/__init__.py names the same version (a test checks).
#ifndef TORCH_TARGET_VERSION
#define TORCH_TARGET_VERSION 0x020a000000000000ULL
#endif

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// Older torch headers (2.11, the GPU machine's, where this builds from source) lack the stable error-check macro
// of later ones; the plain one checks the same shim error code.
#ifndef STABLE_TORCH_ERROR_CODE_CHECK
#define STABLE_TORCH_ERROR_CODE_CHECK TORCH_ERROR_CODE_CHECK
#endif

namespace ddimgmm {

// Two shapes equal (HeaderOnlyArrayRef has no operator== in the 2.11 headers).
inline bool same_shape(torch::headeronly::IntHeaderOnlyArrayRef a, torch::headeronly::IntHeaderOnlyArrayRef b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// Messages built from stream-printable pieces, as TORCH_CHECK builds them.
template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream out;
  ((out << args), ...);
  return out.str();
}

// "[2, 3, 4]", the spelling of torch's sizes in messages.
template <typename Sizes>
std::string shape(const Sizes& sizes) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << "]";
  return out.str();
}

// "cpu", "cuda:0", "meta": torch's spelling of a device.
inline std::string device_name(const torch::stable::Device& device) {
  using torch::headeronly::DeviceType;
  const DeviceType type = device.type();
  std::string name = type == DeviceType::CPU    ? "cpu"
                     : type == DeviceType::CUDA ? "cuda"
                     : type == DeviceType::Meta ? "meta"
                                                : cat("device type ", int(type));
  return device.has_index() ? cat(name, ":", int(device.index())) : name;
}

// Errors: std::runtime_error reaches Python as RuntimeError (TORCH_CHECK's type), std::invalid_argument as
// ValueError (TORCH_CHECK_VALUE's). TypeError has no standard exception: csrc/cpu/type_error.h.
#define DDIMGMM_CHECK(cond, ...) \
  if (!(cond)) throw std::runtime_error(::ddimgmm::cat(__VA_ARGS__))
#define DDIMGMM_CHECK_VALUE(cond, ...) \
  if (!(cond)) throw std::invalid_argument(::ddimgmm::cat(__VA_ARGS__))

// An ATen op through the stable dispatcher: aten<N>("aten::linalg_eigh", "", A, "L") returns its first N
// outputs (tensors). Arguments in schema order, every one given (std::nullopt for an absent optional).
template <size_t N = 1, typename... Args>
auto aten(const char* op, const char* overload, const Args&... args) {
  std::array<StableIValue, (sizeof...(Args) > N ? sizeof...(Args) : N)> stack{torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION));
  if constexpr (N == 1) {
    return torch::stable::detail::to<Tensor>(stack[0]);
  } else {
    std::array<Tensor, N> out;
    for (size_t i = 0; i < N; ++i) out[i] = torch::stable::detail::to<Tensor>(stack[i]);
    return out;
  }
}

// A new contiguous tensor through the shim's empty_strided, a direct call: torch::stable::empty goes through
// the dispatcher, microseconds that show on a small step.
inline Tensor empty_tensor(torch::headeronly::IntHeaderOnlyArrayRef sizes, ScalarType dtype,
                           const torch::stable::Device& device) {
  std::vector<int64_t> strides(sizes.size());
  int64_t stride = 1;
  for (size_t i = sizes.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= sizes[i] > 1 ? sizes[i] : 1;
  }
  using torch::stable::detail::from;
  using torch::stable::detail::to;
  AtenTensorHandle handle = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(int64_t(sizes.size()), sizes.data(), strides.data(),
                                                  to<int32_t>(from(dtype)), to<int32_t>(from(device.type())),
                                                  device.index(), &handle));
  return Tensor(handle);
}

// A 0-d tensor holding v, in t's dtype (or `dtype`) and on t's device: the Scalar arguments of ATen ops,
// which the stable ABI does not pass, become tensor arguments.
inline Tensor scalar_like(const Tensor& t, double v, std::optional<ScalarType> dtype = std::nullopt) {
  return torch::stable::full({}, v, dtype.value_or(t.scalar_type()), std::nullopt, t.device());
}

// The compute type of a storage type (at::opmath_type for the dtypes the kernels take).
template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

}  // namespace ddimgmm
