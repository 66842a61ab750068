"""Schemas of the ``ddimgmm`` operator library. Defined here rather than in C++: the LibTorch stable ABI that
the compiled kernels target (csrc/stable.h) cannot attach tags to a definition before torch 2.12, and every op
is pt2-compliant. Kernels: csrc/cpu/*.cpp (CPU), csrc/cuda/*.cu (the CUDA thin SVD), ops/step.py (the CUDA
step, a Triton launcher, and the fake kernels). The semantics of every op are defined by
ddim_gmm_ext/reference.py."""

from __future__ import annotations

import torch

_TAGS = (torch.Tag.pt2_compliant_tag,)

# One sampler step x_t -> x_s of a Gaussian path (docs/design.md section 3; spec: reference.step_from_table).
#   model_output [B, ...] or [2B, ...] with guidance (unconditional half first); sample [B, ...].
#   coeffs: one row [6] / [8] or a table [S, 6] / [S, 8] of (a_t, b_t, A, B, c, g[, H1, H2]), compute dtype,
#     sample's device: x_t = a_t x0 + b_t eps, mean = A x0 + B eps + H1 h1 + H2 h2, noise std c, GMM scale g
#     (offsets g delta, variance offsets g^2 v; 0: a Gaussian step). 6 columns: H1 = H2 = 0.
#   step index i: the 0-d int64 step_tensor (read on the device; step_index must then be 0) or step_index.
#     i selects the row of a table, the GMM parameter set of stacked [S_g, ...] tables and the Philox step
#     counter. Out of range of the table or of the stacked sets (S_g == 1 included): an error for
#     step_index; NaN outputs and components -1 for a tensor.
#   priors [(S_g,) K], offsets [(S_g,) K, D], var_offsets [(S_g,) K, Dv] (Dv <= D, zero beyond): compute
#     dtype, all three or none. Unstacked ([K], [K, D], ...): one set shared by every step (no range check);
#     stacked: one set per step. basis [(S_g,) Dv, D] (orthonormal rows): the low-rank form, var_offsets are
#     then eigenvalues in that basis: noise c z + sum_i (sqrt(max(c^2 - g^2 v_k[i], 0)) - c)(w_i . z) w_i.
#   noise [B, ...] and components [B] (int32/int64) override the Philox draws of (seed, sample_offset + b, i).
#   prediction_type: 0 epsilon, 1 sample, 2 v_prediction, 3 flow. seed: the 64-bit key's bits as an int64.
#   history0, history1 [B, ...] (sample's dtype or compute dtype): h1, h2 of a linear multistep solver, the
#     data predictions of the previous steps (history0 the latest), kept by the caller from this op's
#     pred_original_sample; need 8-column coeffs; history1 needs history0. A row with H_j != 0 and no h_j: an
#     error on CPU, NaN outputs on CUDA (the row is read on the device). Two optional tensors rather than a
#     Tensor[]: a fixed arity keeps one autograd slot, one fake and one Triton pointer per history, and a
#     compiled loop sees the same signature at every step; two cover multistep solvers up to order 3.
# Returns (prev_sample, pred_original_sample or an empty tensor, components [B] int64 or an empty tensor).
torch.library.define(
    "ddimgmm::step",
    "(Tensor model_output, Tensor sample, Tensor coeffs, Tensor? step_tensor, Tensor? priors, "
    "Tensor? offsets, Tensor? var_offsets, Tensor? basis, Tensor? noise, Tensor? components, "
    "int prediction_type, float? guidance_scale, float? clip_sample_range, bool use_clipped_model_output, "
    "int seed, int sample_offset, int step_index, bool return_pred_original, Tensor? history0=None, "
    "Tensor? history1=None) -> (Tensor, Tensor, Tensor)",
    tags=_TAGS,
)
# Batched thin SVD (docs/design.md 1.4): O [S, D, K] -> U [S, D, K], orthonormal columns ordered by singular
# value, equal to LAPACK's U up to column signs (sign convention in reference.thin_svd).
torch.library.define("ddimgmm::thin_svd", "(Tensor O) -> Tensor", tags=_TAGS)
# The GMM direction matrices O [n_sets, dim, n_components] float64 (CPU) of the package's random stream
# (reference.offset_directions). No tensor input: one implementation serves every backend.
torch.library.define(
    "ddimgmm::offset_directions", "(int n_sets, int dim, int n_components, int seed) -> Tensor", tags=_TAGS
)
