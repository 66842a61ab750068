// Schemas of the ddimgmm operator library. Kernels live one file per device: csrc/cpu/*.cpp registers the
// CPU kernels with TORCH_LIBRARY_IMPL(ddimgmm, CPU); the CUDA step kernel is a Triton launcher registered from
// Python (ddim_gmm_ext/ops.py), the CUDA thin SVD is csrc/cuda/*.cu. Fake (meta) kernels are registered in
// Python. The semantics of every op are defined by ddim_gmm_ext/reference.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing ddim_gmm_ext._C as a Python module runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ddimgmm, m) {
  // One DDIM / RFIM / DDIM-GMM sampler step x_t -> x_s (DESIGN.md 2.1-2.3, reference.step).
  //   model_output [B, ...] or [2B, ...] with guidance (unconditional half first); sample [B, ...].
  //   coeffs: 1-D, 5 values (a_t, b_t, a_s, b_s, noise_std c), on the sample's device.
  //   priors [K], offsets [K, D], var_offsets [K, Dv] (Dv <= D, zero beyond): one GMM parameter set, in the
  //     compute dtype (float64 for float64 samples, float32 otherwise); all three or none.
  //   noise [B, ...] and components [B] (int64) override the Philox draws of (seed, sample_offset + b,
  //     step_index).
  //   prediction_type: 0 epsilon, 1 sample, 2 v_prediction, 3 flow.
  // Returns (prev_sample, pred_original_sample or an empty tensor, components [B] int64 or an empty tensor).
  m.def(
      "step(Tensor model_output, Tensor sample, Tensor coeffs, Tensor? priors, Tensor? offsets, "
      "Tensor? var_offsets, Tensor? noise, Tensor? components, int prediction_type, float? guidance_scale, "
      "float? clip_sample_range, bool use_clipped_model_output, int seed, int sample_offset, int step_index, "
      "bool return_pred_original) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});
  // Batched thin SVD (DESIGN.md 2.4): O [S, D, K] -> U [S, D, K], orthonormal columns ordered by singular
  // value, equal to LAPACK's U up to column signs (sign convention in reference.thin_svd).
  m.def("thin_svd(Tensor O) -> Tensor", {at::Tag::pt2_compliant_tag});
  // The GMM direction matrices O [n_sets, dim, n_components] float64 (CPU) of the package's random stream
  // (reference.offset_directions). No tensor input: one implementation serves every backend.
  m.def("offset_directions(int n_sets, int dim, int n_components, int seed) -> Tensor", {at::Tag::pt2_compliant_tag});
}
