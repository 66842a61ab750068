// TypeError from a stable-ABI kernel. The stable ABI has no typed errors (a kernel throws standard exceptions,
// which torch's Python bindings translate with pybind11's rules: std::invalid_argument -> ValueError, any other
// std::exception -> RuntimeError), and no standard exception becomes TypeError. pybind11::type_error does: its
// base class is exported for catching across modules, and it raises through the Python C API, so it crosses
// from this library to torch's bindings without touching libtorch's C++ ABI. Host-only (not for nvcc).
#pragma once

#include <pybind11/detail/common.h>

#include "../stable.h"

#define DDIMGMM_CHECK_TYPE(cond, ...) \
  if (!(cond)) throw pybind11::type_error(::ddimgmm::cat(__VA_ARGS__))
