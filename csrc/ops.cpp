// The ddimgmm operator library's C++ side: importing ddim_gmm_ext._C as a Python module runs the kernels'
// static registrations (STABLE_TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp, csrc/cuda/*.cu). The schemas, with their
// documentation and tags, are defined in Python (ddim_gmm_ext/ops/schema.py): the stable ABI of the oldest
// torch this library targets cannot attach tags such as pt2_compliant_tag to a definition. The CUDA step
// kernel is a Triton launcher registered from Python (ddim_gmm_ext/ops/step.py); fake (meta) kernels are
// registered in Python. The semantics of every op are defined by ddim_gmm_ext/reference.py.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
