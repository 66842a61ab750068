"""k-diffusion style sampler: :func:`sample_ddim_gmm`. Importable without k-diffusion installed.

k-diffusion conventions: ``model(x, sigma * s_in, **extra_args)`` is a denoiser returning x0 on the VE path
x = x0 + sigma * eps; ``sigmas`` do not increase and may end above 0 (the high half of a split schedule, a
partial denoise) or repeat; ``callback`` receives a dict with x, i, sigma, sigma_hat and denoised before each
update; noise is drawn only for steps whose next sigma is > 0.
"""

from __future__ import annotations

import math

import torch
from typing_extensions import Unpack

from .. import _checks, _rows, _schedules, api, reference
from ..gmm import validate_gmm_steps
from ..gmm_options import GMMKwargs
from ._common import (
    check_eta,
    check_loop_arguments,
    gmm_keywords,
    multistep_weights,
    progress_bar,
    sampler_options,
    stream_seed,
)

__all__ = [
    "sample_ddim_gmm",
    "sample_rfim_gmm",
    "sample_dpmpp_2m_gmm",
    "sample_dpmpp_2m_sde_gmm",
    "sample_dpmpp_3m_sde_gmm",
    "FLOW_NOISE",
    "DPMPP_SAMPLERS",
    "SOLVER_TYPES",
]

#: sample_rfim_gmm takes a first flow time above 1 by at most this much, float32 rounding of 1 (ComfyUI's float32
#: ``time_snr_shift`` gives sigmas[0] = 1 + 2^-23 for some shifts (1.32, 4.03, ...) and up to 1 + 8 * 2^-23 for
#: shifts below 1), and runs it as given; a real time above 1 (VE sigmas, say) is refused. 16 float32 ulps at 1.
FLOW_TIME_ROUNDING = 16 * 2.0**-23

#: How sample_rfim_gmm sets the noise std c of a flow step t -> s from eta (B^2 + c^2 = s^2 either way):
#: "rfim": c = eta s (the paper's RFIM); "ancestral_rf": ComfyUI's euler_ancestral_RF (Euler to
#: sigma_down = s (1 + (s / t - 1) eta), then renoise to s).
FLOW_NOISE = ("rfim", "ancestral_rf")


@torch.no_grad()
@gmm_keywords
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
    sample_offset: int = 0,
    **gmm_options: Unpack[GMMKwargs],
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
    ``scale_per_dim`` instead of ``scale`` (s = scale_per_dim * sqrt(D)); ``gmm_steps`` where the mixture acts:
    "all" (default), "matched" (only steps whose kernel does not clip, :func:`ddim_gmm_ext.gmm.matched_steps`,
    decided before the loop from the tables and each step's VP noise std), a list of step indices or a boolean
    mask of the steps (both it and ``final_step`` must allow a step).
    Returns the final x (sigma = 0).
    """
    sig = _check_sigmas(sigmas)

    def vp(i):
        return 1.0 / (1.0 + sig[i] ** 2), 1.0 / (1.0 + sig[i + 1] ** 2)

    def noise_std(i):  # c of the VP step, the units of the tables (g = 1)
        alpha_prod_t, alpha_prod_prev = vp(i)
        return _schedules.ddim_coefficients(alpha_prod_t, alpha_prod_prev, eta)[4]

    def ve_step(i, x, denoised, gmm, run_seed, noise):
        # the VP DDIM step of x_VP = x sqrt(abar), abar = 1 / (1 + sigma^2), mapped back to VE
        abar_t, abar_s = vp(i)
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
        noise_std=noise_std, gmm=gmm, sample_offset=sample_offset, **gmm_options,
    )  # fmt: skip


def _sample(model, x, sigmas, sig, extra_args, callback, disable, eta, s_noise, noise_sampler, step, desc, *,
            noise_std, gmm, sample_offset=0, **gmm_options: Unpack[GMMKwargs]):  # fmt: skip
    """The loop both samplers share: checks, GMM tables, the denoiser call and callback, the noise k-diffusion
    would draw (``noise_sampler`` called exactly when k-diffusion calls it, so a shared sampler stays
    aligned), steps between equal sigmas left out (Euler's x + d * 0), then ``step(i, x, denoised, gmm of step
    i, run seed, noise or None) -> x``. ``noise_std(i)``: the step's noise std c in the units the GMM tables
    are in (for ``gmm_steps="matched"``). The GMM options' defaults are the public samplers' (the ComfyUI node
    passes only its widgets)."""
    extra_args = check_loop_arguments(model, extra_args, callback, noise_sampler)
    _checks.check_floating("x", x)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension [B, ...], got a 0-d tensor")
    eta = check_eta(eta)
    check_s_noise(s_noise)
    options = sampler_options(gmm, extra_args, **gmm_options)
    n_steps = len(sig) - 1
    gmm = options.resolve(x, n_steps)
    stds = [noise_std(i) if sig[i + 1] != sig[i] else 0.0 for i in range(n_steps)]  # equal sigmas: skipped steps
    gmms = options.plan(gmm, stds)
    run_seed = stream_seed(options.seed)
    s_in = x.new_ones([x.shape[0]])
    for i in progress_bar(range(n_steps), disable, desc):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        noise = None
        if sig[i + 1] > 0 and eta > 0:
            if noise_sampler is not None:
                noise = sampler_noise(noise_sampler, sigmas[i], sigmas[i + 1], x) * s_noise
            elif s_noise != 1.0:
                noise = s_noise * reference.gaussian_noise(x.shape, run_seed, sample_offset, i, x.dtype, x.device)
        if sig[i + 1] == sig[i]:
            continue
        x = step(i, x, denoised, gmms[i], run_seed, noise)
    return x


def sampler_noise(noise_sampler, sigma, sigma_next, x: torch.Tensor) -> torch.Tensor:
    """``noise_sampler(sigma, sigma_next)`` as the op's noise for ``x``: what k-diffusion's samplers take (they add
    the draw to x, so a real tensor that broadcasts to x's shape, in any real dtype), else an error naming
    noise_sampler (k-diffusion raises TypeError on a None draw; a complex draw would make x complex)."""
    z = noise_sampler(sigma, sigma_next)
    if not isinstance(z, torch.Tensor) or z.is_complex():
        what = f"a {z.dtype} tensor" if isinstance(z, torch.Tensor) else type(z).__name__
        raise TypeError(f"noise_sampler(sigma, sigma_next) must return a real tensor like x, got {what}")
    if z.shape != x.shape:
        try:
            z = z.expand(x.shape).contiguous()
        except RuntimeError:
            raise ValueError(
                f"noise_sampler(sigma, sigma_next) must return noise of x's shape {tuple(x.shape)} (or one that "
                f"broadcasts to it), got {tuple(z.shape)}"
            ) from None
    cdt = _checks.compute_dtype(x.dtype)
    return z if z.dtype in (x.dtype, cdt) else z.to(cdt)  # e.g. ComfyUI's tree returns the sigmas' dtype


def check_s_noise(s_noise, name: str = "s_noise") -> float:
    if isinstance(s_noise, bool) or not isinstance(s_noise, (int, float)) or not math.isfinite(s_noise) or s_noise < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {s_noise!r}")
    return float(s_noise)


def _check_sigmas(sigmas) -> list[float]:
    """The sigmas as host floats (one copy per run), checked: 1-D, >= 2 entries, finite, >= 0, non-increasing
    (an increasing step would need noise added, which neither these samplers nor k-diffusion's do)."""
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a 1-D tensor with at least 2 entries, got {type(sigmas).__name__}")
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got {sigmas!r}")
    if sigmas.is_complex():  # k-diffusion's sigmas > 0 raises; the cast below would drop the imaginary part
        raise TypeError(f"sigmas must be real, got a {sigmas.dtype} tensor")
    sig = sigmas.detach().to("cpu", torch.float64).tolist()
    if not all(math.isfinite(s) and s >= 0 for s in sig):
        raise ValueError(f"sigmas must be finite and >= 0, got {sig}")
    rising = [i for i, (a, b) in enumerate(zip(sig, sig[1:], strict=False)) if b > a]
    if rising:
        i = rising[0]
        raise ValueError(f"sigmas must not increase, got sigmas[{i}] = {sig[i]} < sigmas[{i + 1}] = {sig[i + 1]}")
    return sig


def check_flow_start(sig: list[float], max_start: float) -> None:
    """Flow sigmas are times in [0, 1]: the first one above 0 and at most ``max_start`` (see :func:`_sample_flow`)."""
    if sig[0] > max_start or sig[0] == 0:
        raise ValueError(f"flow sigmas are times in [0, 1] starting above 0, got sigmas[0] = {sig[0]}")


def flow_noise_std(t: float, s: float, eta: float, noise: str = "rfim") -> float:
    """Noise std c of the flow step t -> s on x_t = (1 - t) x0 + t eps (see :data:`FLOW_NOISE`)."""
    if noise == "rfim" or s == 0:
        return eta * s
    sigma_down = s * (1 + (s / t - 1) * eta)
    return math.sqrt(max(s * s - (sigma_down * (1 - s) / (1 - sigma_down)) ** 2, 0.0))


@torch.no_grad()
@gmm_keywords
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
    sample_offset: int = 0,
    **gmm_options: Unpack[GMMKwargs],
) -> torch.Tensor:
    """RFIM(-GMM) sampling of a k-diffusion-style flow denoiser (ComfyUI's CONST model sampling: SD3, Flux).

    ``model(x, sigma * s_in, **extra_args)`` returns x0 on the flow path x = (1 - sigma) x0 + sigma eps, and
    sigmas (in [0, 1], non-increasing, as ComfyUI passes them for flow models; a first one above 1 by float32
    rounding, :data:`FLOW_TIME_ROUNDING`, runs as given) are the flow times t. Each step
    t -> s is x_s = (1 - s) x0 + sqrt(s^2 - c^2) eps + c z (the GMM kernel in place of c z when ``gmm``):
    with GMM off it is Euler at eta = 0 and, with ``noise="ancestral_rf"``, ComfyUI's euler_ancestral_RF for
    every eta; ``noise="rfim"`` is the paper's c = eta s. A step between equal sigmas leaves x as it is; a
    last sigma above 0 returns the partially denoised x. Other arguments as :func:`sample_ddim_gmm`.
    """
    return _sample_flow(
        model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler, noise=noise,
        max_start=1 + FLOW_TIME_ROUNDING, gmm=gmm, sample_offset=sample_offset, **gmm_options,
    )  # fmt: skip


def _sample_flow(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, s_noise=1.0,
                 noise_sampler=None, *, noise, max_start, gmm, sample_offset=0,
                 **gmm_options: Unpack[GMMKwargs]):  # fmt: skip
    """:func:`sample_rfim_gmm` with the largest first sigma it takes: ``max_start`` (ComfyUI's nodes take any,
    as its samplers run any). A time t above 1 runs ComfyUI's arithmetic: the step reads eps_hat = (x - (1 - t)
    x0) / t, a_t = 1 - t < 0 (the op takes the row; the path checks of ``api.step`` would refuse it)."""
    if noise not in FLOW_NOISE:
        raise ValueError(f"noise must be one of {FLOW_NOISE}, got {noise!r}")
    sig = _check_sigmas(sigmas)
    check_flow_start(sig, max_start)

    def noise_std(i):
        return flow_noise_std(sig[i], sig[i + 1], eta, noise)

    def flow_step(i, x, denoised, gmm, run_seed, z):
        t, s = sig[i], sig[i + 1]
        row = _rows.step_row(1.0 - t, t, 1.0 - s, s, noise_std(i), 1.0, _checks.compute_dtype(x.dtype), x.device)
        return api.step_from_table(
            denoised, x, row, i, gmm=gmm, prediction_type="sample", seed=run_seed,
            sample_offset=sample_offset, noise=z, return_pred_original=False,
        ).prev_sample  # fmt: skip

    return _sample(
        model, x, sigmas, sig, extra_args, callback, disable, eta, s_noise, noise_sampler, flow_step, "RFIM-GMM",
        noise_std=noise_std, gmm=gmm, sample_offset=sample_offset, **gmm_options,
    )  # fmt: skip


# ---- DPM-Solver++ multistep (k-diffusion's sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde) --------

#: The multistep samplers: name -> (highest order, SDE).
DPMPP_SAMPLERS = {"dpmpp_2m": (2, False), "dpmpp_2m_sde": (2, True), "dpmpp_3m_sde": (3, True)}
#: sample_dpmpp_2m_sde's solver_type (the first-difference term: DPM-Solver++'s midpoint or its Heun form).
SOLVER_TYPES = ("midpoint", "heun")


def check_dpmpp_eta(eta, name: str = "eta") -> float:
    """The SDE samplers' eta: a finite number >= 0 (the noise std sigma_s sqrt(1 - e^(-2 h eta)) stays below
    sigma_s for every eta; k-diffusion takes any)."""
    if isinstance(eta, (bool, torch.Tensor)) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {eta!r}")
    return float(eta)


def _check_dpmpp_sigmas(sigmas) -> list[float]:
    """:func:`_check_sigmas`, then strictly decreasing: a repeated sigma is a step of h = 0, which k-diffusion's
    DPM++ samplers divide by (NaN / inf from the next step on), and a schedule must start above 0."""
    sig = _check_sigmas(sigmas)
    flat = [i for i, (a, b) in enumerate(zip(sig, sig[1:], strict=False)) if b == a]
    if flat:
        i = flat[0]
        raise ValueError(
            f"sigmas must strictly decrease for the DPM++ samplers (a repeated sigma is a step of h = 0, which "
            f"k-diffusion's formulas divide by), got sigmas[{i}] = sigmas[{i + 1}] = {sig[i]}"
        )
    return sig


def dpmpp_rows(
    sig: list[float],
    sampler: str,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    path: str = "ve",
) -> torch.Tensor:
    """[S, 8] float64 rows (a_t, b_t, A, B, c, g, H1, H2) of k-diffusion's DPM++ multistep samplers over the host
    sigmas ``sig`` (strictly decreasing), one per step: x_s = X x_t + w0 D + w1 D_1 + w2 D_2 + c z, D the
    denoiser output of this step, D_1, D_2 those of the two before, with

        lambda = -log sigma (VE)  or  log((1 - sigma) / sigma) (``path="flow"``: ComfyUI's CONST models),
        h = lambda_s - lambda_t,  hh = (1 + eta) h,  alpha_s = 1 (VE) or 1 - sigma_s (flow),
        X = (sigma_s / sigma_t) e^(-eta h),   c = sigma_s sqrt(1 - e^(-2 eta h)) s_noise,
        (k0, k1, k2) = alpha_s (1 - e^(-hh), k1, -phi_3),  phi_2 = (e^(-hh) - 1) / hh + 1,  phi_3 = phi_2 / hh - 1/2,
        k1 = k0 / 2 (2M midpoint; 2M is the SDE form at eta = 0) or phi_2 (Heun form; 3M at order 2 and 3),

    and (w0, w1, w2) from k0 D + k1 D1 + k2 D2 (:func:`multistep_weights`, r_j = h_(j) / h). Order 1 on the
    first step, 2 on the second, up to 3 for 3M, as k-diffusion's loops; a step to sigma 0 is x = D. Since
    x_t = a_t D + b_t eps_hat with (a_t, b_t) = (1, sigma_t) (VE) or (1 - sigma_t, sigma_t) (flow), X x_t folds
    into A = X a_t + w0, B = X b_t (the op's "sample" prediction). g: the GMM scale of VP tables on the path,
    1 / a_s^VP = sqrt(1 + sigma_s^2) on VE paths, 1 on flow paths (as :func:`sample_rfim_gmm`); 0 never here
    (``final_step`` / ``gmm_steps`` act by passing no GMM)."""
    order_max, sde = DPMPP_SAMPLERS[sampler]
    eta = eta if sde else 0.0
    flow = path == "flow"

    def lam(v: float) -> float:
        return math.log((1 - v) / v) if flow else -math.log(v)

    rows = []
    for i in range(len(sig) - 1):
        t, s = sig[i], sig[i + 1]
        a_t = 1 - t if flow else 1.0
        g = 1.0 if flow else math.sqrt(1 + s * s)
        if s == 0:  # the denoising step: x = D
            rows.append([a_t, t, 1.0, 0.0, 0.0, g, 0.0, 0.0])
            continue
        order = min(i + 1, order_max)
        h = lam(s) - lam(t)
        hh = (1 + eta) * h
        alpha_s = 1 - s if flow else 1.0
        k0 = -alpha_s * math.expm1(-hh)
        phi_2 = math.expm1(-hh) / hh + 1
        heun = order == 3 or sampler == "dpmpp_3m_sde" or solver_type == "heun"
        k1 = alpha_s * phi_2 if heun else 0.5 * k0
        k2 = -alpha_s * (phi_2 / hh - 0.5)
        r0 = (lam(t) - lam(sig[i - 1])) / h if order >= 2 else 1.0
        r1 = (lam(sig[i - 1]) - lam(sig[i - 2])) / h if order >= 3 else 1.0
        w0, w1, w2 = multistep_weights(order, (k0, k1, k2), r0, r1)
        x_coef = s / t * math.exp(-eta * h)
        c = s * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise if eta > 0 else 0.0
        rows.append([a_t, t, x_coef * a_t + w0, x_coef * t, c, g, w1, w2])
    return torch.tensor(rows, dtype=torch.float64)


class _BrownianNoise:
    """k-diffusion's default noise sampler of its SDE samplers (``BrownianTreeNoiseSampler(x, sigma_min,
    sigma_max)``, from its behaviour): one torchsde.BrownianTree over [min positive sigma, max sigma] with
    w0 = zeros like x and an entropy seed drawn from torch's default generator as k-diffusion draws it;
    a call returns the increment W(sigma_next) - W(sigma) over sqrt(|sigma_next - sigma|), signed by the
    direction of the interval."""

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, needed: bool):
        seed = int(torch.randint(0, 2**63 - 1, []).item())  # drawn even when unused, as k-diffusion draws it
        self.tree = None
        if needed:
            import torchsde

            lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
            self.tree = torchsde.BrownianTree(lo, torch.zeros_like(x), hi, entropy=seed)

    def __call__(self, sigma, sigma_next):
        assert self.tree is not None
        a, b = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = (a, b, 1) if a < b else (b, a, -1)
        return self.tree(lo, hi) * sign / (b - a).abs().sqrt()


def _torchsde_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchsde") is not None


def _sample_dpmpp(
    model, x, sigmas, extra_args, callback, disable, *, sampler, eta=1.0, s_noise=1.0, noise_sampler=None,
    solver_type="midpoint", path="ve", gmm="ortho-vub", sample_offset=0, default_noise=True,
    **gmm_options: Unpack[GMMKwargs],
):  # fmt: skip
    """The DPM++ loop (public samplers and the ComfyUI node): every check first, the rows of the schedule in
    float64 (:func:`dpmpp_rows`), then per step the denoiser call, the callback, the noise k-diffusion would draw
    and one fused op call with the history (the previous denoiser outputs). ``default_noise``: with the GMM off,
    no ``noise_sampler`` and no seed, draw k-diffusion's default Brownian-tree noise (torchsde installed)."""
    extra_args = check_loop_arguments(model, extra_args, callback, noise_sampler)
    _checks.check_floating("x", x)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension [B, ...], got a 0-d tensor")
    _, sde = DPMPP_SAMPLERS[sampler]
    eta = check_dpmpp_eta(eta)
    s_noise = check_s_noise(s_noise)
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    sig = _check_dpmpp_sigmas(sigmas)
    options = sampler_options(gmm, extra_args, **gmm_options)
    seed = options.seed
    if gmm is not None and (not sde or eta * s_noise == 0):
        why = (
            f"{sampler} is deterministic"
            if not sde
            else f"eta={eta!r}, s_noise={s_noise!r} give noise std 0 at every step"
        )
        raise ValueError(
            f"gmm={gmm if isinstance(gmm, str) else type(gmm).__name__!r} needs SDE noise to replace: {why} (the "
            "mixture's offsets would land on the sample uncompensated); pass gmm=None, or use "
            "sample_dpmpp_2m_sde_gmm / sample_dpmpp_3m_sde_gmm with eta > 0 and s_noise > 0"
        )
    n_steps = len(sig) - 1
    validate_gmm_steps(options.gmm_steps, n_steps)
    _checks.check_index("sample_offset", sample_offset, _checks.MAX_INDEX)
    rows = dpmpp_rows(sig, sampler, eta=eta, s_noise=s_noise, solver_type=solver_type, path=path)
    n_history = [2 if h2 != 0 else 1 if h1 != 0 else 0 for h1, h2 in rows[:, 6:].tolist()]
    gmm = options.resolve(x, n_steps)
    gmms = options.plan(gmm, rows[:, 4], rows[:, 5])
    noisy = [sde and eta > 0 and s > 0 for s in sig[1:]]  # the steps k-diffusion draws noise for
    if noise_sampler is None and gmm is None and seed is None and sde and default_noise and _torchsde_available():
        noise_sampler, run_seed = _BrownianNoise(x, sigmas, any(noisy)), 0
    else:
        run_seed = stream_seed(seed)
    table = rows.to(x.device, _checks.compute_dtype(x.dtype))
    s_in = x.new_ones([x.shape[0]])
    history: tuple[torch.Tensor, ...] = ()
    for i in progress_bar(range(n_steps), disable, sampler.upper().replace("_", " ") + "-GMM"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        noise = None
        if noisy[i] and noise_sampler is not None:
            noise = sampler_noise(noise_sampler, sigmas[i], sigmas[i + 1], x)
        x = api.step_from_table(
            denoised, x, table, i, gmm=gmms[i], prediction_type="sample", seed=run_seed,
            sample_offset=sample_offset, noise=noise, history=history[: n_history[i]], return_pred_original=False,
        ).prev_sample  # fmt: skip
        history = (denoised, *history[:1])
    return x


_DPMPP_DOC = """

    One fused ``torch.ops.ddimgmm.step`` call per step: the step's row (:func:`dpmpp_rows`, computed on the host in
    float64 from the sigmas, VE units a_t = 1, b_t = sigma) with the previous denoiser outputs as the op's history.
    GMM off: k-diffusion's sampler of the same name to float32 rounding, given the same noise.
    Arguments as k-diffusion's; ``sigmas``: 1-D, finite, >= 0, strictly decreasing (a repeated sigma is a step
    of h = 0, which k-diffusion divides by), may end above 0; ``eta``: a finite number >= 0; ``s_noise`` >= 0.
    Noise: ``noise_sampler(sigma, sigma_next)`` when given (called exactly when k-diffusion calls it); else, GMM
    off and no seed (``seed`` None and no ``extra_args["seed"]``), k-diffusion's default
    ``BrownianTreeNoiseSampler(x, sigma_min, sigma_max)`` (its entropy drawn from torch's default generator as
    k-diffusion draws it; torchsde must be installed, else the Philox stream); else the Philox stream of the seed.
    With a GMM the DDIM-GMM mixture of the step's noise level replaces c z, c = sigma_s sqrt(1 - e^(-2 h eta))
    s_noise (s_noise is part of the level, not a factor on the draw); the VP-unit tables scaled by
    g = sqrt(1 + sigma_s^2). Components always come from the Philox stream of the seed (a noise sampler returns
    only normals): a ``noise_sampler`` given with a GMM supplies z, and the components still come from the stream,
    as in :func:`sample_ddim_gmm`. GMM options as :func:`sample_ddim_gmm` (``gmm`` a variant name or a
    ``ddim_gmm_ext.GMM``; ``gmm_steps`` "matched" reads c and g above). Returns the final x."""


@torch.no_grad()
@gmm_keywords
def sample_dpmpp_2m_gmm(
    model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
    disable: bool | None = None, *, gmm=None, sample_offset: int = 0, **gmm_options: Unpack[GMMKwargs],
) -> torch.Tensor:  # fmt: skip
    """DPM-Solver++(2M), k-diffusion's ``sample_dpmpp_2m``, deterministic: a GMM is refused (no noise to
    replace); the GMM options are accepted for a uniform call and checked, as with ``gmm=None`` elsewhere."""
    return _sample_dpmpp(
        model, x, sigmas, extra_args, callback, disable, sampler="dpmpp_2m", eta=0.0, s_noise=1.0,
        noise_sampler=None, solver_type="midpoint", gmm=gmm, sample_offset=sample_offset, **gmm_options,
    )  # fmt: skip


@torch.no_grad()
@gmm_keywords
def sample_dpmpp_2m_sde_gmm(
    model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
    disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0, noise_sampler=None,
    solver_type: str = "midpoint", *, gmm="ortho-vub", sample_offset: int = 0, **gmm_options: Unpack[GMMKwargs],
) -> torch.Tensor:  # fmt: skip
    """DPM-Solver++(2M) SDE (k-diffusion's ``sample_dpmpp_2m_sde``, ``solver_type`` "midpoint" or "heun") with
    the DDIM-GMM noise."""
    return _sample_dpmpp(
        model, x, sigmas, extra_args, callback, disable, sampler="dpmpp_2m_sde", eta=eta, s_noise=s_noise,
        noise_sampler=noise_sampler, solver_type=solver_type, gmm=gmm, sample_offset=sample_offset, **gmm_options,
    )  # fmt: skip


@torch.no_grad()
@gmm_keywords
def sample_dpmpp_3m_sde_gmm(
    model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback=None,
    disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0, noise_sampler=None, *, gmm="ortho-vub",
    sample_offset: int = 0, **gmm_options: Unpack[GMMKwargs],
) -> torch.Tensor:  # fmt: skip
    """DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``) with the DDIM-GMM noise."""
    return _sample_dpmpp(
        model, x, sigmas, extra_args, callback, disable, sampler="dpmpp_3m_sde", eta=eta, s_noise=s_noise,
        noise_sampler=noise_sampler, solver_type="midpoint", gmm=gmm, sample_offset=sample_offset, **gmm_options,
    )  # fmt: skip


for _f in (sample_dpmpp_2m_gmm, sample_dpmpp_2m_sde_gmm, sample_dpmpp_3m_sde_gmm):
    _f.__doc__ = (_f.__doc__ or "") + _DPMPP_DOC
