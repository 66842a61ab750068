"""k-diffusion style sampler: :func:`sample_ddim_gmm`. Importable without k-diffusion installed.

k-diffusion conventions: ``model(x, sigma * s_in, **extra_args)`` is a denoiser returning x0 on the VE path
x = x0 + sigma * eps; ``sigmas`` do not increase and may end above 0 (the high half of a split schedule, a
partial denoise) or repeat; ``callback`` receives a dict with x, i, sigma, sigma_hat and denoised before each
update; noise is drawn only for steps whose next sigma is > 0.
"""

from __future__ import annotations

import math

import torch

from .. import _checks, api, reference
from ._common import check_eta, check_gmm_options, check_seed, progress_bar, resolve_gmm, stream_seed

__all__ = ["sample_ddim_gmm", "sample_rfim_gmm", "FLOW_NOISE"]

#: Flow times above 1 by at most this much are float32 rounding of 1 and are taken as 1: ComfyUI's float32
#: ``time_snr_shift`` gives sigmas[0] = 1 + 2^-23 for some shifts (1.32, 4.03, ...) and up to 1 + 8 * 2^-23 for
#: shifts below 1; its own samplers run them. 16 float32 ulps at 1; a real time above 1 is still refused.
FLOW_TIME_ROUNDING = 16 * 2.0**-23

#: How sample_rfim_gmm sets the noise std c of a flow step t -> s from eta (B^2 + c^2 = s^2 either way):
#: "rfim": c = eta s (the paper's RFIM); "ancestral_rf": ComfyUI's euler_ancestral_RF (Euler to
#: sigma_down = s (1 + (s / t - 1) eta), then renoise to s).
FLOW_NOISE = ("rfim", "ancestral_rf")


@torch.no_grad()
def sample_ddim_gmm(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback=None,
    disable: bool | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler=None,
    *,
    gmm="ortho-vub",
    n_components: int = 8,
    scale: float = 1.0,
    share_across_steps: bool = False,
    uniform_priors: bool = True,
    seed: int | None = None,
    sample_offset: int = 0,
    final_step: str = "gaussian",
    scale_per_dim: float | None = None,
) -> torch.Tensor:
    """DDIM-GMM sampling of a k-diffusion denoiser over ``sigmas`` (eta = 0: DDIM / Euler; eta = 1: ancestral).

    Each step is the VP DDIM(-GMM) step of the equivalent VP path, abar = 1 / (1 + sigma^2) and
    x_VP = x * sqrt(abar), mapped back to VE: a run equals the DDIM(-GMM) run of the same model on the VP path
    (offsets and GMM scale are in VP units, as the tables are for diffusers and latent-diffusion).

    x: x_T on the VE path (x0 + sigmas[0] * noise), [B, ...]. sigmas: 1-D, finite, >= 0, non-increasing (the
    schedules k-diffusion's sample_euler / sample_euler_ancestral run); a step between equal sigmas leaves x
    as it is, as theirs do; a last sigma above 0 returns the partially denoised x. eta in [0, 1]: noise std
    as k-diffusion's ancestral sigma_up. s_noise scales the drawn noise.
    noise_sampler(sigma, sigma_next) -> standard normal like x; default: the Philox stream.
    GMM options (extra keyword arguments): ``gmm`` None (plain DDIM), a variant name ("rand", "ortho",
    "ortho-vub", "ortho-vub*", "ortho-lr") built with n_components / scale / share_across_steps / uniform_priors, or a
    ``ddim_gmm_ext.GMM`` with a parameter set per step (len(sigmas) - 1) or shared; ``seed`` as described in
    ``ddim_gmm_ext.integrations._common`` (None: ``extra_args["seed"]`` when present, as ComfyUI passes it, else drawn
    from torch's default generator); ``sample_offset`` the global index of this batch's first sample;
    ``final_step`` "gaussian" (default: no mixture on the last step, the paper's model) or "gmm";
    ``scale_per_dim`` instead of ``scale`` (s = scale_per_dim * sqrt(D)).
    Returns the final x (sigma = 0).
    """
    sig = _check_sigmas(sigmas)

    def ve_step(i, x, denoised, gmm, run_seed, noise):
        # the VP DDIM step of x_VP = x sqrt(abar), abar = 1 / (1 + sigma^2), mapped back to VE
        abar_t, abar_s = 1.0 / (1.0 + sig[i] ** 2), 1.0 / (1.0 + sig[i + 1] ** 2)
        out = api.ddim_step(
            denoised,
            x * math.sqrt(abar_t),
            abar_t,
            abar_s,
            eta=eta,
            prediction_type="sample",
            gmm=gmm,
            step_index=i,
            seed=run_seed,
            sample_offset=sample_offset,
            noise=noise,
        )
        return out.prev_sample / math.sqrt(abar_s)

    return _sample(
        model, x, sigmas, sig, extra_args, callback, disable, eta, s_noise, noise_sampler, ve_step, "DDIM-GMM",
        gmm=gmm, n_components=n_components, scale=scale, share_across_steps=share_across_steps,
        uniform_priors=uniform_priors, seed=seed, sample_offset=sample_offset, final_step=final_step,
        scale_per_dim=scale_per_dim,
    )  # fmt: skip


def _sample(model, x, sigmas, sig, extra_args, callback, disable, eta, s_noise, noise_sampler, step, desc, *,
            gmm, n_components, scale, share_across_steps, uniform_priors, seed, sample_offset, final_step,
            scale_per_dim):  # fmt: skip
    """The loop both samplers share: checks, GMM tables, the denoiser call and callback, the noise k-diffusion
    would draw (``noise_sampler`` called exactly when k-diffusion calls it, so a shared sampler stays
    aligned), steps between equal sigmas left out (Euler's x + d * 0), then ``step(i, x, denoised, gmm of step
    i, run seed, noise or None) -> x``."""
    extra_args = {} if extra_args is None else extra_args
    _checks.check_floating("x", x)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension [B, ...], got a 0-d tensor")
    eta = check_eta(eta)
    check_s_noise(s_noise)
    if gmm is None or not isinstance(gmm, str):  # checked with the tables otherwise; unused, as the schedulers do
        check_gmm_options(None, n_components, scale, scale_per_dim)
    _checks.check_final_step(final_step)
    n_steps = len(sig) - 1
    seed = check_seed(seed if seed is not None else extra_args.get("seed"))
    gmm = resolve_gmm(
        gmm,
        x,
        n_steps,
        n_components=n_components,
        scale=scale,
        share_across_steps=share_across_steps,
        uniform_priors=uniform_priors,
        seed=seed,
        scale_per_dim=scale_per_dim,
    )
    run_seed = stream_seed(seed)
    s_in = x.new_ones([x.shape[0]])
    for i in progress_bar(range(n_steps), disable, desc):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        noise = None
        if sig[i + 1] > 0 and eta > 0:
            if noise_sampler is not None:
                noise = noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise
            elif s_noise != 1.0:
                noise = s_noise * reference.gaussian_noise(x.shape, run_seed, sample_offset, i, x.dtype, x.device)
        if sig[i + 1] == sig[i]:
            continue
        x = step(i, x, denoised, _checks.gmm_for_step(gmm, i, n_steps, final_step), run_seed, noise)
    return x


def check_s_noise(s_noise, name: str = "s_noise") -> float:
    if isinstance(s_noise, bool) or not isinstance(s_noise, (int, float)) or not math.isfinite(s_noise) or s_noise < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {s_noise!r}")
    return float(s_noise)


def _check_sigmas(sigmas) -> list[float]:
    """The sigmas as host floats (one copy per run), checked: 1-D, >= 2 entries, finite, >= 0, non-increasing
    (an increasing step would need noise added, which neither these samplers nor k-diffusion's do)."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got {sigmas!r}")
    sig = sigmas.detach().to("cpu", torch.float64).tolist()
    if not all(math.isfinite(s) and s >= 0 for s in sig):
        raise ValueError(f"sigmas must be finite and >= 0, got {sig}")
    rising = [i for i, (a, b) in enumerate(zip(sig, sig[1:], strict=False)) if b > a]
    if rising:
        i = rising[0]
        raise ValueError(f"sigmas must not increase, got sigmas[{i}] = {sig[i]} < sigmas[{i + 1}] = {sig[i + 1]}")
    return sig


def flow_noise_std(t: float, s: float, eta: float, noise: str = "rfim") -> float:
    """Noise std c of the flow step t -> s on x_t = (1 - t) x0 + t eps (see :data:`FLOW_NOISE`)."""
    if noise == "rfim" or s == 0:
        return eta * s
    sigma_down = s * (1 + (s / t - 1) * eta)
    return math.sqrt(max(s * s - (sigma_down * (1 - s) / (1 - sigma_down)) ** 2, 0.0))


@torch.no_grad()
def sample_rfim_gmm(
    model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback=None,
    disable: bool | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_sampler=None,
    *,
    noise: str = "rfim",
    gmm="ortho-vub",
    n_components: int = 8,
    scale: float = 1.0,
    share_across_steps: bool = False,
    uniform_priors: bool = True,
    seed: int | None = None,
    sample_offset: int = 0,
    final_step: str = "gaussian",
    scale_per_dim: float | None = None,
) -> torch.Tensor:
    """RFIM(-GMM) sampling of a k-diffusion-style flow denoiser (ComfyUI's CONST model sampling: SD3, Flux).

    ``model(x, sigma * s_in, **extra_args)`` returns x0 on the flow path x = (1 - sigma) x0 + sigma eps, and
    sigmas (in [0, 1], non-increasing, as ComfyUI passes them for flow models) are the flow times t. Each step
    t -> s is x_s = (1 - s) x0 + sqrt(s^2 - c^2) eps + c z (the GMM kernel in place of c z when ``gmm``):
    with GMM off it is Euler at eta = 0 and, with ``noise="ancestral_rf"``, ComfyUI's euler_ancestral_RF for
    every eta; ``noise="rfim"`` is the paper's c = eta s. A step between equal sigmas leaves x as it is; a
    last sigma above 0 returns the partially denoised x. Other arguments as :func:`sample_ddim_gmm`.
    """
    if noise not in FLOW_NOISE:
        raise ValueError(f"noise must be one of {FLOW_NOISE}, got {noise!r}")
    sig = _check_sigmas(sigmas)
    if sig[0] > 1 + FLOW_TIME_ROUNDING or sig[0] == 0:
        raise ValueError(f"flow sigmas are times in [0, 1] starting above 0, got sigmas[0] = {sig[0]}")
    sig = [min(s, 1.0) for s in sig]  # float32 rounding above 1 (see FLOW_TIME_ROUNDING); the model sees sigmas

    def flow_step(i, x, denoised, gmm, run_seed, z):
        t, s = sig[i], sig[i + 1]
        c = flow_noise_std(t, s, eta, noise)
        return api.step(
            denoised,
            x,
            1.0 - t,
            t,
            1.0 - s,
            s,
            c,
            prediction_type="sample",
            gmm=gmm,
            step_index=i,
            seed=run_seed,
            sample_offset=sample_offset,
            noise=z,
        ).prev_sample

    return _sample(
        model, x, sigmas, sig, extra_args, callback, disable, eta, s_noise, noise_sampler, flow_step, "RFIM-GMM",
        gmm=gmm, n_components=n_components, scale=scale, share_across_steps=share_across_steps,
        uniform_priors=uniform_priors, seed=seed, sample_offset=sample_offset, final_step=final_step,
        scale_per_dim=scale_per_dim,
    )  # fmt: skip
