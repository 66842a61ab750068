"""ComfyUI's few-step samplers as k-diffusion-style functions: :func:`sample_lcm_gmm` (ComfyUI's ``sample_lcm``),
:func:`sample_res_multistep_gmm` and :func:`sample_res_multistep_ancestral_gmm` (its ``res_multistep`` family).
Importable without k-diffusion or ComfyUI installed; conventions as :mod:`ddim_gmm_ext.integrations.k_diffusion`.

Each model evaluation is followed by one fused ``torch.ops.ddimgmm.step`` call whose row is computed on the host
in float64 from the sigmas (the op's "sample" prediction: x0_hat is the denoiser output):

* LCM: x_s = A D + c z, the denoiser output D re-noised to the next sigma s as the model sampling's
  ``noise_scaling`` does it: (A, c) = (1, s) on VE paths (eps / v models), (1 - s, s) on flow paths; x_s = D
  on the step to 0. Every other step adds noise of level c, always.
* res_multistep (arXiv 2308.02157's second-order multistep, as ComfyUI writes it, in VE arithmetic on the sigmas
  for every model type): with (sigma_down, sigma_up) the ancestral step of eta (eta 0: (s, 0)), lambda = -log
  sigma, h = lambda(sigma_down) - lambda(t) and the previous step's denoiser output D_1 as the op's history,

      x_s = e^(-h) x + h (b1 D + b2 D_1) + sigma_up s_noise z,
      c2 = (lambda(sigma_(i-1)) - lambda(sigma_down of step i-1)) / h,  phi1 = (1 - e^(-h)) / h,
      phi2 = (phi1 - 1) / (-h),  b2 = phi2 / c2,  b1 = phi1 - b2,

  the Euler step to sigma_down on the first step and where sigma_down is 0. Since x = D + t eps_hat, e^(-h) x
  folds into A = e^(-h) + h b1, B = e^(-h) t; H1 = h b2.

With a GMM the noise of level c is replaced by the DDIM-GMM mixture of that level (tables in VP units scaled by
g = sqrt(1 + s^2) on VE paths, 1 on flow paths, as the DPM++ twins); a deterministic configuration (res_multistep,
or eta or s_noise 0) has no noise to replace and refuses a GMM.
"""

from __future__ import annotations

import math

import torch
from typing_extensions import Unpack

from .. import _checks, api
from ..gmm import validate_gmm_steps
from ..gmm_options import GMMKwargs
from ._common import check_loop_arguments, gmm_keywords, progress_bar, sampler_options, stream_seed
from .k_diffusion import (
    FLOW_TIME_ROUNDING,
    _check_dpmpp_sigmas,
    _check_sigmas,
    check_dpmpp_eta,
    check_flow_start,
    check_s_noise,
    sampler_noise,
)

__all__ = ["sample_lcm_gmm", "sample_res_multistep_gmm", "sample_res_multistep_ancestral_gmm", "LCM_PATHS"]

#: The paths a sampler's ``path`` names: "ve" (x = x0 + sigma eps: eps / v models) or "flow" (x = (1 - sigma) x0 +
#: sigma eps: ComfyUI's CONST models).
LCM_PATHS = ("ve", "flow")


def _check_path(path) -> bool:
    """True for the flow path."""
    if path not in LCM_PATHS:
        raise ValueError(f"path must be one of {LCM_PATHS}, got {path!r}")
    return path == "flow"


def path_gmm_scale(s: float, flow: bool) -> float:
    """g of a step to sigma s: the VP tables in the path's units (1 / a_s^VP on VE paths)."""
    return 1.0 if flow else math.sqrt(1.0 + s * s)


def path_renoise(flow: bool):
    """LCM's re-noising to sigma s as (A, c, g): x_s = A D + c z, ComfyUI's ``noise_scaling`` of eps / v models
    (VE) or of CONST models (flow, noise_scale 1)."""
    return lambda s: (1.0 - s if flow else 1.0, s, path_gmm_scale(s, flow))


def lcm_rows(sig: list[float], renoise) -> torch.Tensor:
    """[S, 6] float64 rows of LCM over the host sigmas: (0, 1, A, 0, c, g) with (A, c, g) = ``renoise(s)`` for a
    next sigma s > 0, (1, 0, 1) for the step to 0 (x_s = D). x enters a row only through eps_hat = (x - a_t D) /
    b_t, which B = 0 drops; (a_t, b_t) = (0, 1) keeps it finite at any sigma, 0 included."""
    rows = []
    for s in sig[1:]:
        a_s, c, g = renoise(s) if s > 0 else (1.0, 0.0, 1.0)
        rows.append([0.0, 1.0, float(a_s), 0.0, float(c), float(g)])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 6)


def ancestral_step(t: float, s: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral VE step t -> s: sigma_up = min(s, eta s sqrt(t^2 - s^2) / t),
    sigma_down = sqrt(s^2 - sigma_up^2); (s, 0) at eta 0. A large eta clamps at sigma_up = s (sigma_down 0)."""
    if eta == 0:
        return s, 0.0
    up = min(s, eta * math.sqrt(s * s * (t * t - s * s) / (t * t)))
    return math.sqrt(s * s - up * up), up


def res_multistep_rows(sig: list[float], *, eta: float, s_noise: float, flow: bool = False) -> torch.Tensor:
    """[S, 8] float64 rows (1, t, A, B, c, g, H1, 0) of ComfyUI's res_multistep(_ancestral) over the strictly
    decreasing host sigmas (the module docstring's formulas; ``flow`` sets only g). lambda(0) = inf: after a step
    whose sigma_down is 0 (an eta large enough to clamp), c2 is -inf and b2 0, as in ComfyUI's arithmetic."""

    def lam(v: float) -> float:
        return math.inf if v == 0 else -math.log(v)

    rows, old_down = [], 0.0
    for i in range(len(sig) - 1):
        t, s = sig[i], sig[i + 1]
        down, up = ancestral_step(t, s, eta)
        c = up * s_noise if s > 0 else 0.0
        if down == 0 or i == 0:  # Euler to sigma_down: x = D + sigma_down eps_hat
            a, b, h1 = 1.0, down, 0.0
        else:
            h = lam(down) - lam(t)
            c2 = (lam(sig[i - 1]) - lam(old_down)) / h
            phi1 = -math.expm1(-h) / h
            phi2 = (phi1 - 1.0) / -h
            b2 = phi2 / c2
            decay = math.exp(-h)
            a, b, h1 = decay + h * (phi1 - b2), decay * t, h * b2
        rows.append([1.0, t, a, b, c, path_gmm_scale(s, flow), h1, 0.0])
        old_down = down
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 8)


def _no_noise_refusal(gmm, why: str) -> ValueError:
    name = gmm if isinstance(gmm, str) else type(gmm).__name__
    return ValueError(
        f"gmm={name!r} has no noise to replace: {why} (the mixture's offsets would land on the sample "
        "uncompensated); pass gmm=None, or use sample_res_multistep_ancestral_gmm with eta > 0 and s_noise > 0"
    )


def _sample_rows(model, x, sigmas, sig, extra_args, callback, disable, noise_sampler, rows, options, *,
                 sample_offset, desc):  # fmt: skip
    """The loop of these samplers, every argument checked: the GMM tables (``options``), the steps the mixture acts
    on, then per step the denoiser call, the callback, the noise ComfyUI would draw (``noise_sampler`` called for
    every next sigma > 0, as ComfyUI's samplers call theirs, whatever c; the draw passed to the op where c != 0)
    and one fused op call on row i with the history (the previous denoiser output) where H1 != 0."""
    n_steps = len(sig) - 1
    gmm = options.resolve(x, n_steps)
    gmms = options.plan(gmm, rows[:, 4], rows[:, 5])
    noisy = [c != 0 for c in rows[:, 4].tolist()]
    n_history = [1 if h1 != 0 else 0 for h1 in rows[:, 6].tolist()] if rows.shape[1] == 8 else [0] * n_steps
    run_seed = stream_seed(options.seed)
    table = rows.to(x.device, _checks.compute_dtype(x.dtype))
    s_in = x.new_ones([x.shape[0]])
    history: tuple[torch.Tensor, ...] = ()
    for i in progress_bar(range(n_steps), disable, desc):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        noise = None
        if sig[i + 1] > 0 and noise_sampler is not None:
            z = sampler_noise(noise_sampler, sigmas[i], sigmas[i + 1], x)
            noise = z if noisy[i] else None
        x = api.step_from_table(
            denoised, x, table, i, gmm=gmms[i], prediction_type="sample", seed=run_seed,
            sample_offset=sample_offset, noise=noise, history=history[: n_history[i]], return_pred_original=False,
        ).prev_sample  # fmt: skip
        history = (denoised,)
    return x


def _start(model, x, extra_args, callback, noise_sampler, gmm, *, sample_offset, **gmm_options: Unpack[GMMKwargs]):
    """The checks every sampler here makes first: the loop's arguments, x, the GMM options (``seed`` None:
    ``extra_args["seed"]`` when present, as ComfyUI passes it) and sample_offset. Returns (extra_args, options)."""
    extra_args = check_loop_arguments(model, extra_args, callback, noise_sampler)
    _checks.check_floating("x", x)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension [B, ...], got a 0-d tensor")
    options = sampler_options(gmm, extra_args, **gmm_options)
    _checks.check_index("sample_offset", sample_offset, _checks.MAX_INDEX)
    return extra_args, options


def _sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *, renoise,
                max_start, flow, gmm="ortho-vub", sample_offset=0, **gmm_options: Unpack[GMMKwargs]):  # fmt: skip
    """:func:`sample_lcm_gmm` with the re-noising ``renoise(s) -> (A, c, g)`` given (the ComfyUI node reads it
    from the model sampling) and the largest first flow sigma it takes (``max_start``; checked when ``flow``)."""
    extra_args, options = _start(
        model, x, extra_args, callback, noise_sampler, gmm, sample_offset=sample_offset, **gmm_options
    )
    sig = _check_sigmas(sigmas)
    if flow:
        check_flow_start(sig, max_start)
    validate_gmm_steps(options.gmm_steps, len(sig) - 1)
    rows = lcm_rows(sig, renoise)
    return _sample_rows(
        model, x, sigmas, sig, extra_args, callback, disable, noise_sampler, rows, options,
        sample_offset=sample_offset, desc="LCM-GMM",
    )  # fmt: skip


@torch.no_grad()
@gmm_keywords
def sample_lcm_gmm(
    model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
    disable: bool | None = None, noise_sampler=None, *, path: str = "ve", gmm="ortho-vub", sample_offset: int = 0,
    **gmm_options: Unpack[GMMKwargs],
) -> torch.Tensor:  # fmt: skip
    """LCM sampling (ComfyUI's ``sample_lcm``): per step x = D, the denoiser output, re-noised to the next sigma s
    as ComfyUI's model sampling does it: x = D + s z on the VE path (``path="ve"``, eps / v models: sigmas as
    k-diffusion's), x = (1 - s) D + s z on the flow path (``path="flow"``, ComfyUI's CONST models: sigmas are flow
    times in [0, 1], a first one above 1 by float32 rounding taken as :func:`sample_rfim_gmm` takes it); x = D on
    the step to 0. A step between equal sigmas re-noises too, as ComfyUI's does.

    One fused ``torch.ops.ddimgmm.step`` call per step (a row with B = 0, c = the noise level s). GMM off: ComfyUI's
    sample_lcm to float32 rounding, given the same noise. ``noise_sampler(sigma, sigma_next)`` when given (called
    exactly where ComfyUI calls it, for every next sigma > 0), else the Philox stream of the seed. With a GMM the
    mixture of level c = s replaces c z (VP tables scaled by g = sqrt(1 + s^2) on the VE path, 1 on the flow path);
    a noise sampler then supplies z and the components come from the stream. Other arguments (sigmas: 1-D,
    finite, >= 0, non-increasing; the GMM options) as :func:`ddim_gmm_ext.k_diffusion.sample_ddim_gmm`. Returns
    the final x."""
    flow = _check_path(path)
    return _sample_lcm(
        model, x, sigmas, extra_args, callback, disable, noise_sampler, renoise=path_renoise(flow),
        max_start=1 + FLOW_TIME_ROUNDING, flow=flow, gmm=gmm, sample_offset=sample_offset, **gmm_options,
    )  # fmt: skip


def _sample_res_multistep(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
                          eta, s_noise=1.0, ancestral, flow=False, gmm=None, sample_offset=0,
                          **gmm_options: Unpack[GMMKwargs]):  # fmt: skip
    """The res_multistep loop (public samplers and the ComfyUI node): every check, the rows (float64, host),
    one fused op call per step with the previous denoiser output as the history."""
    extra_args, options = _start(
        model, x, extra_args, callback, noise_sampler, gmm, sample_offset=sample_offset, **gmm_options
    )
    eta = check_dpmpp_eta(eta)
    s_noise = check_s_noise(s_noise)
    sig = _check_dpmpp_sigmas(sigmas)
    if options.on and (not ancestral or eta * s_noise == 0):
        why = (
            "res_multistep is deterministic"
            if not ancestral
            else f"eta={eta!r}, s_noise={s_noise!r} give noise std 0 at every step"
        )
        raise _no_noise_refusal(gmm, why)
    validate_gmm_steps(options.gmm_steps, len(sig) - 1)
    rows = res_multistep_rows(sig, eta=eta, s_noise=s_noise, flow=flow)
    desc = "RES MULTISTEP ANCESTRAL-GMM" if ancestral else "RES MULTISTEP-GMM"
    return _sample_rows(
        model, x, sigmas, sig, extra_args, callback, disable, noise_sampler, rows, options,
        sample_offset=sample_offset, desc=desc,
    )  # fmt: skip


_RES_DOC = """

    ComfyUI's res_multistep (see :mod:`ddim_gmm_ext.integrations.k_diffusion_fewstep` for the update): VE
    arithmetic on ``sigmas`` (1-D, finite, >= 0, strictly decreasing: a repeated sigma is a step of h = 0, after
    which ComfyUI's c2 = 0 blows up; may end above 0). One fused ``torch.ops.ddimgmm.step`` call per step, the
    previous denoiser output as the op's history. GMM off: ComfyUI's sampler to float32 rounding, given the same
    noise; ``noise_sampler(sigma, sigma_next)`` is called exactly where ComfyUI calls it (every next sigma > 0,
    at eta 0 too), else the Philox stream of the seed. GMM options as
    :func:`ddim_gmm_ext.k_diffusion.sample_ddim_gmm`. Returns the final x."""


@torch.no_grad()
@gmm_keywords
def sample_res_multistep_gmm(
    model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
    disable: bool | None = None, s_noise: float = 1.0, noise_sampler=None, *, gmm=None, sample_offset: int = 0,
    **gmm_options: Unpack[GMMKwargs],
) -> torch.Tensor:  # fmt: skip
    """ComfyUI's ``sample_res_multistep`` (eta 0), deterministic: a GMM is refused (there is no noise to replace);
    the GMM options are accepted for a uniform call and checked, and s_noise as ComfyUI's (it scales a noise of
    std 0)."""
    return _sample_res_multistep(
        model, x, sigmas, extra_args, callback, disable, noise_sampler, eta=0.0, s_noise=s_noise, ancestral=False,
        gmm=gmm, sample_offset=sample_offset, **gmm_options,
    )  # fmt: skip


@torch.no_grad()
@gmm_keywords
def sample_res_multistep_ancestral_gmm(
    model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
    disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0, noise_sampler=None, *, gmm="ortho-vub",
    sample_offset: int = 0, **gmm_options: Unpack[GMMKwargs],
) -> torch.Tensor:  # fmt: skip
    """ComfyUI's ``sample_res_multistep_ancestral`` with the DDIM-GMM noise: the step to sigma_down, then noise of
    level c = sigma_up s_noise (eta a finite number >= 0: ComfyUI's ancestral step clamps sigma_up at s). With a
    GMM the mixture of level c replaces c z (s_noise is part of the level); a noise sampler then supplies z and
    the components come from the stream."""
    return _sample_res_multistep(
        model, x, sigmas, extra_args, callback, disable, noise_sampler, eta=eta, s_noise=s_noise, ancestral=True,
        gmm=gmm, sample_offset=sample_offset, **gmm_options,
    )  # fmt: skip


for _f in (sample_res_multistep_gmm, sample_res_multistep_ancestral_gmm):
    _f.__doc__ = (_f.__doc__ or "") + _RES_DOC
