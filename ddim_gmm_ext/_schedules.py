"""Noise schedules and the path coefficients of a step: the definitions the specification
(:mod:`ddim_gmm_ext.reference`) and the runtime (api, the integrations, the quality harness) both use.

A leaf: it imports nothing of the package but the argument rules (:mod:`ddim_gmm_ext._checks`). The schedules are
diffusers' and the rectified-flow grid (checked against upstream), the coefficients a_t, b_t and the noise std c
of docs/design.md 1.1 and 1.2 (checked against their closed forms in tests/test_reference_math.py). What is built
from them (the op's coefficient row, the step, the GMM tables) the specification and the runtime each write
themselves, so that the oracle tests compare two implementations.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _checks

# ---------------------------------------------------------------------------------------------------------
# Schedules (as diffusers' DDIMScheduler computes them: betas in float32, cumprod in float32)
# ---------------------------------------------------------------------------------------------------------


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The "squaredcos_cap_v2" (Glide cosine) betas."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), max_beta)
        for i in range(num_diffusion_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last step has zero SNR (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[0:1], ab[1:] / ab[:-1]])
    return 1 - alphas


def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """Betas [T] float32, as diffusers' DDIMScheduler.__init__ builds them."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    else:
        raise ValueError(
            f"beta_schedule must be one of 'linear', 'scaled_linear', 'squaredcos_cap_v2' (or pass trained_betas), "
            f"got {beta_schedule!r}"
        )
    if rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{i<=t} (1 - beta_i), in the betas' dtype (float32 for diffusers parity)."""
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    timestep_spacing: str = "leading",
    steps_offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, prev_timesteps) int64, sampling order, as diffusers' DDIMScheduler.

    As in diffusers, the previous timestep is always ``t - num_train_timesteps // num_inference_steps`` (for
    every spacing); a negative previous timestep means "use final_alpha_cumprod".
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, num_train_timesteps={num_train_timesteps}], got {num_inference_steps}"
        )
    n, T = num_inference_steps, num_train_timesteps
    if timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif timestep_spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + steps_offset
    elif timestep_spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be 'leading', 'trailing' or 'linspace', got {timestep_spacing!r}")
    return ts, ts - T // n


def rf_times(num_steps: int, shift: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """Rectified-flow time grid [num_steps + 1] from 1 (noise) to 0 (data), uniform in t before the optional
    resolution shift t -> shift t / (1 + (shift - 1) t) used by SD3-style samplers."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype)
    return shift * t / (1 + (shift - 1) * t)


def _scalar(x):
    """A Python float for host scalars (numbers, one-element CPU tensors), else a float64 tensor: the schedule
    formulas below run on either, and device tensors are never read on the host."""
    v = _checks.host_value(x)
    return v if v is not None else torch.as_tensor(x, dtype=torch.float64)


def _sqrt_pos(x):
    """sqrt(max(x, 0)) of a float or a tensor."""
    return max(x, 0.0) ** 0.5 if isinstance(x, float) else x.clamp(min=0).sqrt()


def vp_coefficients(alpha_prod):
    """(a, b) = (sqrt(abar), sqrt(1 - abar)) of the VP path."""
    alpha_prod = _scalar(alpha_prod)
    return _sqrt_pos(alpha_prod), _sqrt_pos(1 - alpha_prod)


def noise_std(a_t, b_t, a_s, b_s, eta: float = 0.0, schedule: str = "ddim"):
    """Noise standard deviation c of the step t -> s (0 <= c <= b_s).

    ddim:  c^2 = eta^2 b_s^2 (1 - r), r = (a_t b_s / (a_s b_t))^2 (DDIM eq. 16 on VP paths, k-diffusion's
           ancestral sigma_up on VE paths; eta = 1 is ancestral sampling)
    rfim:  c = eta b_s (paper sec. 4)
    gddim: c^2 = b_s^2 (1 - r^(eta^2)) (gDDIM Theorem 1 with lambda = eta)
    """
    _checks.check_nonnegative("eta", eta)
    if schedule not in _checks.NOISE_SCHEDULES:
        raise ValueError(f"noise schedule must be one of {_checks.NOISE_SCHEDULES}, got {schedule!r}")
    a_t, b_t, a_s, b_s = (_scalar(v) for v in (a_t, b_t, a_s, b_s))
    if schedule == "rfim":
        return eta * b_s
    if isinstance(a_s, float) and isinstance(b_t, float) and a_s * b_t == 0:
        raise ValueError(
            f"noise_std needs a_s > 0 and b_t > 0 (a step from a noisy time to one with signal), "
            f"got a_s = {a_s}, b_t = {b_t}"
        )
    r = (a_t * b_s / (a_s * b_t)) ** 2
    if schedule == "ddim":
        return eta * _sqrt_pos(b_s**2 * (1 - r))
    return _sqrt_pos(b_s**2 * (1 - r ** (eta**2)))


def ddim_coefficients(alpha_prod_t, alpha_prod_prev, eta: float):
    """(a_t, b_t, a_s, b_s, c) of a DDIM step."""
    _checks.check_number("alpha_prod_t", alpha_prod_t, 0.0, 1.0)  # 0: zero terminal SNR (v / sample prediction)
    _checks.check_number("alpha_prod_prev", alpha_prod_prev, 0.0, 1.0)
    _checks.check_number("eta", eta, 0.0)
    a_t, b_t = vp_coefficients(alpha_prod_t)
    a_s, b_s = vp_coefficients(alpha_prod_prev)
    return a_t, b_t, a_s, b_s, noise_std(a_t, b_t, a_s, b_s, eta, "ddim")


def rfim_coefficients(t, s, eta: float):
    """(a_t, b_t, a_s, b_s, c) of an RFIM step on x_t = (1 - t) x0 + t eps, with c = eta * s."""
    _checks.check_number("t", t, 0.0, 1.0)
    _checks.check_number("s", s, 0.0, 1.0)
    _checks.check_number("eta", eta, 0.0, 1.0)
    t, s = _scalar(t), _scalar(s)
    return 1 - t, t, 1 - s, s, noise_std(1 - t, t, 1 - s, s, eta, "rfim")


def ddim_path(alpha_prod_t, alpha_prod_prev, eta, options: dict) -> tuple:
    """(a_t, b_t, a_s, b_s, c) of ``ddim_step`` (:func:`ddim_coefficients`), with the step's divisions
    checked on the caller's argument: a_t = sqrt(alpha_prod_t), b_t = sqrt(1 - alpha_prod_t)."""
    _checks.check_path_divisors(options, ("alpha_prod_t", alpha_prod_t, 0.0), ("alpha_prod_t", alpha_prod_t, 1.0))
    return ddim_coefficients(alpha_prod_t, alpha_prod_prev, eta)


def rfim_path(t, s, eta, options: dict) -> tuple:
    """(a_t, b_t, a_s, b_s, c) of ``rfim_step`` (:func:`rfim_coefficients`), with the step's divisions
    checked on the caller's argument: a_t = 1 - t, b_t = t. ``options`` hold the step's prediction_type."""
    _checks.check_path_divisors(options, ("t", t, 1.0), ("t", t, 0.0))
    return rfim_coefficients(t, s, eta)
