"""Rectified-flow sampling with the RFIM(-GMM) kernels (paper section 4): :func:`sample_rfim`."""

from __future__ import annotations

import math

import torch
from typing_extensions import Unpack

from .. import api
from ..gmm_options import GMMKwargs
from ._common import check_eta, check_loop_arguments, gmm_keywords, progress_bar, sampler_options, stream_seed

__all__ = ["sample_rfim"]

_PREDICTION_TYPES = ("flow", "sample")


@torch.no_grad()
@gmm_keywords
def sample_rfim(
    model,
    x: torch.Tensor,
    times,
    *,
    eta: float = 0.0,
    gmm=None,
    prediction_type: str = "flow",
    extra_args: dict | None = None,
    callback=None,
    progress: bool = True,
    sample_offset: int = 0,
    **gmm_options: Unpack[GMMKwargs],
) -> torch.Tensor:
    """RFIM / RFIM-GMM sampling of a flow model on x_t = (1 - t) x0 + t eps (t = 1 noise, t = 0 data).

    model(x, t, **extra_args), with t a [B] tensor of x's dtype, returns the velocity v = eps - x0
    (``prediction_type="flow"``, as SD3 / Flux-style models) or x0 (``"sample"``).
    x: x at times[0] (pure noise when times[0] = 1). times: 1-D, strictly decreasing, in [0, 1], e.g.
    ``ddim_gmm_ext.reference.rf_times(n)``. eta in [0, 1]: noise std c = eta * s at each step t -> s (eta = 0
    without GMM is Euler integration of dx/dt = v). gmm: None, a variant name ("rand", "ortho", "ortho-vub",
    "ortho-vub*", "ortho-lr") built from the other GMM options, or a ``ddim_gmm_ext.GMM``; seed / sample_offset: the
    randomness contract (see ``ddim_gmm_ext.integrations._common``); final_step: "gaussian" (default: no
    mixture on the last step, the paper's model) or "gmm"; scale_per_dim instead of scale (s = scale_per_dim
    * sqrt(D)); gmm_steps: where the mixture acts, "all" (default), "matched" (only steps whose kernel does
    not clip, :func:`ddim_gmm_ext.gmm.matched_steps`, decided before the loop from the tables and c = eta * s),
    a list of step indices or a boolean mask of the steps (both it and final_step must allow a step).
    callback({"x", "i", "t", "s", "denoised"}) after each step, with x the new sample at time s and denoised
    the x0 prediction. Returns x at times[-1].
    """
    model_kwargs = check_loop_arguments(model, extra_args, callback)
    eta = check_eta(eta)
    if prediction_type not in _PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")
    ts = _check_times(times)
    n_steps = len(ts) - 1
    options = sampler_options(gmm, **gmm_options)
    gmm = options.resolve(x, n_steps)
    gmms = options.plan(gmm, [eta * s for s in ts[1:]])
    run_seed = stream_seed(options.seed)
    for i in progress_bar(range(n_steps), not progress, "RFIM-GMM" if gmm is not None else "RFIM"):
        t, s = ts[i], ts[i + 1]
        out = api.rfim_step(
            model(x, x.new_full((x.shape[0],), t), **model_kwargs),
            x,
            t,
            s,
            eta=eta,
            prediction_type=prediction_type,
            gmm=gmms[i],
            step_index=i,
            seed=run_seed,
            sample_offset=sample_offset,
        )
        x = out.prev_sample
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "s": s, "denoised": out.pred_original_sample})
    return x


def _check_times(times) -> list[float]:
    t = torch.as_tensor(times, dtype=torch.float64).detach().cpu()
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(f"times must be 1-D with at least 2 entries, got shape {tuple(t.shape)}")
    ts = t.tolist()
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in ts):
        raise ValueError(f"times must lie in [0, 1], got {ts}")
    if any(b >= a for a, b in zip(ts, ts[1:], strict=False)):
        raise ValueError(f"times must be strictly decreasing (from noise at 1 towards data at 0), got {ts}")
    return ts
