"""k-diffusion's two-stage DPM-Solver++ samplers with the DDIM-GMM noise: :func:`sample_dpmpp_sde_gmm`
(``sample_dpmpp_sde``) and :func:`sample_dpmpp_2s_ancestral_gmm` (``sample_dpmpp_2s_ancestral``), and ComfyUI's
samplers of those names (:func:`sample_two_stage`, ``flavor="comfy"``: the node's). Importable without k-diffusion.

A step evaluates the denoiser at sigma_t (D) and, unless it lands on sigma 0 (DPM++ SDE) or sigma_down is 0
(2S ancestral), at an intermediate sigma_m (D_2). On the path x = alpha D + sigma eps (VE: alpha = 1; ComfyUI's flow
models: alpha = 1 - sigma), with sigma-hat = sigma / alpha the VE sigma and (down, up) k-diffusion's
``get_ancestral_step`` of sigma-hats, each stage is one fused op call in the "sample" prediction on an 8-column row
(a_t, b_t, A, B, c, g, H1, H2), a_t = alpha_t, b_t = sigma_t (eps_hat read from x and that stage's data prediction):

- DPM++ SDE, stage 1 (from x and D to sigma_m = sigma(lambda_t + r h)): (down, up) of (sigma-hat_t, sigma-hat_m),
  x_2 = alpha_m (D + down eps_hat) + alpha_m up s_noise z: A = alpha_m, B = alpha_m down, c = alpha_m up s_noise.
- DPM++ SDE, stage 2 (from x and D_2, D as the op's history h1): (down, up) of (sigma-hat_t, sigma-hat_s),
  rho = down / sigma-hat_t, fac = 1 / (2 r): x_s = alpha_s (rho x / alpha_t + (1 - rho) ((1 - fac) D + fac D_2))
  + alpha_s up s_noise z: A = alpha_s (rho + (1 - rho) fac), B = alpha_s down, H1 = alpha_s (1 - rho) (1 - fac)
  (0 at r = 1/2: no history), c = alpha_s up s_noise. A step to sigma 0 is x = D.
- 2S ancestral (VE), stage 1: Euler to sigma_m = sqrt(sigma_t sigma_down) (A = 1, B = sigma_m, no noise); stage 2:
  Euler from x with D_2 to sigma_down, then the noise sigma_up s_noise (A = 1, B = sigma_down, c = sigma_up s_noise).
  ComfyUI's flow form (its ``sample_dpmpp_2s_ancestral_RF``): sigma_down = s (1 + (s / t - 1) eta), sigma_m from
  the half-log-SNR midpoint, the landing rescaled by (1 - s) / (1 - sigma_down) and renoised to s.

g is the VP tables' scale, sqrt(1 + sigma^2) at the stage's end on VE paths, 1 on flow paths, 0 on a stage with no
noise by construction (2S's stage 1). Of the [2 S, 8] table (S = len(sigmas) - 1 steps), row i is step i's landing
and row S + i its stage 1; the op's step index is the row's, so it picks the Philox counter and the GMM set: the two
noise draws of a DPM++ SDE step are independent, and a GMM holds one parameter set per step (2S: the landing's), or
2 S for DPM++ SDE (set S + i: step i's stage 1), or one shared set. ``gmm_steps`` and ``final_step`` speak of steps
(a step's stages follow it).
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
    _BrownianNoise,
    _check_sigmas,
    _torchsde_available,
    check_dpmpp_eta,
    check_s_noise,
    sampler_noise,
)

__all__ = ["sample_dpmpp_sde_gmm", "sample_dpmpp_2s_ancestral_gmm", "SDE_SAMPLERS"]

#: The two-stage samplers of this module (k-diffusion's and ComfyUI's names).
SDE_SAMPLERS = ("dpmpp_sde", "dpmpp_2s_ancestral")


def check_r(r, name: str = "r") -> float:
    """DPM++ SDE's r: where the intermediate sigma lies (lambda_t + r h), a finite number > 0 (r = 0 divides by
    zero in fac = 1 / (2 r))."""
    if isinstance(r, (bool, torch.Tensor)) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {r!r}")
    return float(r)


def _ancestral(sigma_from, sigma_to, eta):
    """(sigma_down, sigma_up) of a VE step: k-diffusion's ``get_ancestral_step`` (sigma_up capped at sigma_to), for
    host floats (the rows, float64) and 0-d tensors (the sigmas the denoiser and the noise sampler see)."""
    if not eta:
        return sigma_to, 0.0 * sigma_to
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def _check_sde_sigmas(sigmas) -> list[float]:
    """:func:`_check_sigmas`, and every sigma but the last above 0 (a step from sigma 0 divides by it)."""
    sig = _check_sigmas(sigmas)
    if sig[-2] == 0:
        raise ValueError(f"sigmas must be > 0 except the last (a step from sigma 0 divides by it), got {sig}")
    return sig


def _plan(sigmas, sig, sampler, eta, s_noise, r, flavor, path):
    """Per step (sigma the denoiser sees at stage 2 or None, noise-sampler arguments of stage 1 and of the landing
    or None where upstream draws none), and the [2 S, 8] float64 rows: the landings, then the stage-1 rows (module
    docstring)."""
    flow = path == "flow"
    steps, lands, firsts = [], [], []
    for i in range(len(sig) - 1):
        t, s = sig[i], sig[i + 1]
        alpha_t, alpha_s = (1 - t, 1 - s) if flow else (1.0, 1.0)
        g_s = 1.0 if flow else math.sqrt(1 + s * s)
        st, sn = sigmas[i], sigmas[i + 1]
        mid = q1 = q2 = None
        first, land = [alpha_t, t] + [0.0] * 6, [alpha_t, t, 1.0, 0.0, 0.0, g_s, 0.0, 0.0]
        if sampler == "dpmpp_sde":
            noisy = s > 0 and (flavor == "k_diffusion" or eta * s_noise > 0)
            if s > 0:
                if flow:  # ComfyUI's half-log-SNR lambda = log((1 - sigma) / sigma) on CONST models
                    lam_t, lam_s = st.logit().neg(), sn.logit().neg()
                    mid = (lam_t + r * (lam_s - lam_t)).neg().sigmoid()
                else:
                    lam_t, lam_s = st.log().neg(), sn.log().neg()
                    mid = (lam_t + r * (lam_s - lam_t)).neg().exp()
                if noisy:  # k-diffusion queries sigma_fn(t_fn(sigma)), ComfyUI the sigmas themselves
                    at, an = (lam_t.neg().exp(), lam_s.neg().exp()) if flavor == "k_diffusion" else (st, sn)
                    q1, q2 = (at, mid), (at, an)
                m = float(mid)
                alpha_m = 1 - m if flow else 1.0
                hat_t, fac = t / alpha_t, 1 / (2 * r)
                down, up = _ancestral(hat_t, m / alpha_m, eta)
                g_m = 1.0 if flow else math.sqrt(1 + m * m)
                first = [alpha_t, t, alpha_m, alpha_m * down, alpha_m * up * s_noise, g_m, 0.0, 0.0]
                down, up = _ancestral(hat_t, s / alpha_s, eta)
                rho = down / hat_t
                a, h1 = alpha_s * (rho + (1 - rho) * fac), alpha_s * (1 - rho) * (1 - fac)
                land = [alpha_t, t, a, alpha_s * down, alpha_s * up * s_noise, g_s, h1, 0.0]
        elif flow:  # ComfyUI's sample_dpmpp_2s_ancestral_RF
            down = s * (1 + (s / t - 1) * eta)
            if down < 0:
                raise ValueError(
                    f"eta={eta!r} takes sigma_down = s (1 + (s / t - 1) eta) below 0 on the flow step {t} -> {s} "
                    "(ComfyUI's dpmpp_2s_ancestral_RF gives NaN there); use a smaller eta"
                )
            if s > 0:
                if t >= 1:  # ComfyUI's 0.9999 at sigma 1 (lambda is infinite there; above 1 by rounding: NaN there)
                    mid = torch.full_like(st, 0.9999)
                else:
                    d = sn * (1 + (sn / st - 1) * eta)
                    lam_t, lam_d = ((1 - st) / st).log(), ((1 - d) / d).log()
                    mid = ((lam_t + (lam_d - lam_t) / 2).exp() + 1) ** -1
                m = float(mid)
                first = [alpha_t, t, 1 - m, m, 0.0, 0.0, 0.0, 0.0]
                renoise = math.sqrt(max(s * s - (down * alpha_s / (1 - down)) ** 2, 0.0)) if eta > 0 else 0.0
                ratio = alpha_s / (1 - down)
                land = [alpha_t, t, alpha_s, ratio * down, renoise * s_noise, 1.0, 0.0, 0.0]
                q2 = (st, sn) if eta > 0 else None
        else:  # k-diffusion's (and ComfyUI's VE) sample_dpmpp_2s_ancestral
            down_t, _ = _ancestral(st, sn, eta)
            down, up = _ancestral(t, s, eta)
            if float(down_t) > 0:
                lam_t, lam_d = st.log().neg(), torch.as_tensor(down_t).log().neg()
                mid = (lam_t + (lam_d - lam_t) / 2).neg().exp()
                first = [1.0, t, 1.0, float(mid), 0.0, 0.0, 0.0, 0.0]
                land[3] = down
            land[4] = up * s_noise
            q2 = (st, sn) if s > 0 else None
        steps.append((mid, q1, q2))
        lands.append(land)
        firsts.append(first)
    return steps, torch.tensor(lands + firsts, dtype=torch.float64)


def sample_two_stage(
    model, x, sigmas, extra_args=None, callback=None, disable=None, *, sampler, eta=1.0, s_noise=1.0,
    noise_sampler=None, r=0.5, flavor="k_diffusion", path="ve", gmm="ortho-vub", sample_offset=0,
    **gmm_options: Unpack[GMMKwargs],
):  # fmt: skip
    """The loop of both samplers, k-diffusion's (``flavor="k_diffusion"``) or ComfyUI's (``"comfy"``: a step to
    sigma 0 is x = D, DPM++ SDE draws noise only where eta s_noise > 0 and queries its noise sampler at the sigmas;
    ``path="flow"`` its CONST handling, the caller having moved a first flow sigma >= 1): every check first, the
    rows in float64 (module docstring), then per stage one fused op call. Noise: ``noise_sampler`` when given
    (called exactly where upstream calls it); else, k-diffusion's flavor with the GMM off and no seed, k-diffusion's
    default (DPM++ SDE: its Brownian tree, torchsde installed; 2S: ``torch.randn_like(x)``); else the Philox
    stream of the seed."""
    extra_args = check_loop_arguments(model, extra_args, callback, noise_sampler)
    _checks.check_floating("x", x)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension [B, ...], got a 0-d tensor")
    if sampler not in SDE_SAMPLERS:
        raise ValueError(f"sampler must be one of {SDE_SAMPLERS}, got {sampler!r}")
    eta = check_dpmpp_eta(eta)
    s_noise = check_s_noise(s_noise)
    r = check_r(r)
    sig = _check_sde_sigmas(sigmas)
    options = sampler_options(gmm, extra_args, **gmm_options)
    if gmm is not None and eta * s_noise == 0:
        raise ValueError(
            f"gmm={gmm if isinstance(gmm, str) else type(gmm).__name__!r} needs noise to replace: eta={eta!r}, "
            f"s_noise={s_noise!r} give noise std 0 at every step (the mixture's offsets would land on the sample "
            "uncompensated); pass gmm=None, or eta > 0 and s_noise > 0"
        )
    n_steps = len(sig) - 1
    policy = validate_gmm_steps(options.gmm_steps, n_steps)
    _checks.check_index("sample_offset", sample_offset, _checks.MAX_INDEX)
    steps, rows = _plan(sigmas, sig, sampler, eta, s_noise, r, flavor, path)
    n_sets = 2 * n_steps if sampler == "dpmpp_sde" else n_steps  # the rows that re-noise
    gmm = options.resolve(x, n_sets)
    # the step rules on the rows: final_step through g, gmm_steps' explicit forms on both rows of a step
    g = rows[:n_sets, 5] * torch.tensor(options.final_step_g(n_steps) * (n_sets // n_steps), dtype=torch.float64)
    row_policy = policy if isinstance(policy, str) else policy * (n_sets // n_steps)
    gmms = options.replace(gmm_steps=row_policy, final_step="gmm").plan(gmm, rows[:n_sets, 4], g)
    gmms += [None] * (2 * n_steps - n_sets)
    if noise_sampler is None and gmm is None and options.seed is None and flavor == "k_diffusion":
        if sampler == "dpmpp_2s_ancestral":
            noise_sampler, run_seed = (lambda sigma, sigma_next: torch.randn_like(x)), 0
        elif _torchsde_available():  # built (its entropy drawn) as k-diffusion builds it; queried where it adds noise
            needed = eta * s_noise > 0 and any(q is not None for _, _, q in steps)
            tree, run_seed = _BrownianNoise(x, sigmas, needed), 0
            noise_sampler = tree if needed else None
        else:
            run_seed = stream_seed(None)
    else:
        run_seed = stream_seed(options.seed)
    table = rows.to(x.device, _checks.compute_dtype(x.dtype))
    s_in = x.new_ones([x.shape[0]])

    def stage(j, model_output, x, query, history=()):
        noise = None
        if query is not None and noise_sampler is not None:
            sigma, sigma_next = query
            noise = sampler_noise(noise_sampler, sigma, sigma_next, x)
        return api.step_from_table(
            model_output, x, table, j, gmm=gmms[j], prediction_type="sample", seed=run_seed,
            sample_offset=sample_offset, noise=noise, history=history, return_pred_original=False,
        ).prev_sample  # fmt: skip

    for i in progress_bar(range(n_steps), disable, sampler.upper().replace("_", " ") + "-GMM"):
        mid, q1, q2 = steps[i]
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if mid is None:  # one evaluation: x = D (to sigma 0), or Euler to sigma_down = 0 and the noise
            x = stage(i, denoised, x, q2)
            continue
        x_2 = stage(n_steps + i, denoised, x, q1)
        denoised_2 = model(x_2, mid * s_in, **extra_args)
        x = stage(i, denoised_2, x, q2, (denoised,) if rows[i, 6] != 0 else ())
    return x


_DOC = """

    Two fused ``torch.ops.ddimgmm.step`` calls per step, one per model evaluation (rows computed on the host in
    float64 from the sigmas, :mod:`ddim_gmm_ext.integrations.k_diffusion_sde`). GMM off: k-diffusion's sampler of
    the same name to float32 rounding, given the same noise. Arguments as k-diffusion's; ``sigmas``: 1-D, finite,
    >= 0, non-increasing, every one but the last > 0, may end above 0; ``eta``: a finite number >= 0; ``s_noise``
    >= 0. Noise: ``noise_sampler(sigma, sigma_next)`` when given (called exactly when k-diffusion calls it, with
    the same arguments); else, GMM off and no seed (``seed`` None and no ``extra_args["seed"]``), k-diffusion's
    default noise (drawn from torch's default generator as k-diffusion draws it); else the Philox stream of the
    seed. With a GMM the DDIM-GMM mixture of each stage's noise level (c = sigma_up s_noise) replaces c z; the
    VP-unit tables scaled by g = sqrt(1 + sigma^2) at the stage's end. Components come from the Philox stream of
    the seed (a ``noise_sampler`` given with a GMM supplies z). A ``ddim_gmm_ext.GMM`` holds a parameter set per
    step (len(sigmas) - 1; DPM++ SDE: two per step, set S + i for step i's first stage, S = len(sigmas) - 1) or one
    shared set; ``gmm_steps`` and ``final_step`` act on both stages of a step. Other GMM
    options as :func:`ddim_gmm_ext.k_diffusion.sample_ddim_gmm`. Returns the final x."""


@torch.no_grad()
@gmm_keywords
def sample_dpmpp_sde_gmm(
    model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
    disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0, noise_sampler=None, r: float = 1 / 2, *,
    gmm="ortho-vub", sample_offset: int = 0, **gmm_options: Unpack[GMMKwargs],
) -> torch.Tensor:  # fmt: skip
    """DPM-Solver++ SDE (k-diffusion's ``sample_dpmpp_sde``: the intermediate sigma at lambda_t + r h, r a finite
    number > 0, the default noise its ``BrownianTreeNoiseSampler`` over [min positive sigma, max sigma]) with the
    DDIM-GMM noise at both stages."""
    return sample_two_stage(
        model, x, sigmas, extra_args, callback, disable, sampler="dpmpp_sde", eta=eta, s_noise=s_noise,
        noise_sampler=noise_sampler, r=r, gmm=gmm, sample_offset=sample_offset, **gmm_options,
    )  # fmt: skip


@torch.no_grad()
@gmm_keywords
def sample_dpmpp_2s_ancestral_gmm(
    model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
    disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0, noise_sampler=None, *, gmm="ortho-vub",
    sample_offset: int = 0, **gmm_options: Unpack[GMMKwargs],
) -> torch.Tensor:  # fmt: skip
    """Ancestral DPM-Solver++(2S) (k-diffusion's ``sample_dpmpp_2s_ancestral``: a deterministic second-order step to
    sigma_down, then the ancestral noise sigma_up; default noise ``torch.randn_like(x)``) with the DDIM-GMM noise
    in place of the ancestral one."""
    return sample_two_stage(
        model, x, sigmas, extra_args, callback, disable, sampler="dpmpp_2s_ancestral", eta=eta, s_noise=s_noise,
        noise_sampler=noise_sampler, gmm=gmm, sample_offset=sample_offset, **gmm_options,
    )  # fmt: skip


for _f in (sample_dpmpp_sde_gmm, sample_dpmpp_2s_ancestral_gmm):
    _f.__doc__ = (_f.__doc__ or "") + _DOC
