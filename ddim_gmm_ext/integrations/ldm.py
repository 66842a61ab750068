"""latent-diffusion style sampler: :class:`DDIMSampler`, a drop-in for ``ldm.models.diffusion.ddim.DDIMSampler``
(CompVis latent-diffusion / Stable Diffusion) with the DDIM-GMM kernel."""

from __future__ import annotations

import warnings
from numbers import Integral

import numpy as np
import torch

from .. import _checks, _schedules, api, reference
from ..gmm import GMM, resolve_scale
from ..gmm_options import GMMOptions
from ._common import check_eta, progress_bar, stream_seed

__all__ = ["DDIMSampler"]

_PARAMETERIZATIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def _option(field: str) -> property:
    """A DDIMSampler attribute that reads ``gmm_options.<field>`` and, set, replaces the options (checked)."""

    def get(self):
        return getattr(self.gmm_options, field)

    def set_(self, value):
        self.gmm_options = self.gmm_options.replace(**{field: value})

    return property(get, set_, doc=f"``gmm_options.{field}``")


class DDIMSampler:
    """DDIM(-GMM) sampling of a latent-diffusion model.

    model: exposes ``apply_model(x, t, c)`` (t a [B] long tensor of train timesteps), ``alphas_cumprod`` [T]
    and optionally ``parameterization`` ("eps" default, "x0" or "v"), as ``LatentDiffusion`` does.
    gmm: None (DDIM, the default), a variant name or a ``ddim_gmm_ext.GMM`` (those tables are used; the
    deprecated ``gmm=True, gmm_params=tables`` of the authors' README still works, with a DeprecationWarning, as
    do ``gmm=True`` for "ortho-vub" and ``gmm=False`` for None). A variant's tables are built per ``sample``
    call for the sample size with ``n_components`` / ``scale`` (the paper's s, 1 by default) or
    ``scale_per_dim`` (s = scale_per_dim sqrt(D) for D elements per sample; not both). final_step:
    "gaussian" (default: no mixture on the last step, the paper's model) or "gmm". gmm_steps: where the mixture
    acts, "all" (default), "matched" (only steps whose kernel does not clip, :func:`ddim_gmm_ext.gmm.matched_steps`,
    decided at the start of each sampling loop from the tables and the steps' noise std), a list of step indices
    (sampling order, 0 = first step) or a boolean mask of the steps; both it and final_step must allow a step.
    seed: see ``ddim_gmm_ext.integrations._common``. The options are held as one
    :class:`~ddim_gmm_ext.gmm_options.GMMOptions`, ``gmm_options``; the attributes of the same names (``scale``,
    ``seed``, ...; ``gmm`` the variant, ``gmm_params`` the tables) read it, and setting one replaces it, checked.

    The schedule is latent-diffusion's (:func:`ddim_timesteps`): "uniform" runs every c-th timestep with
    c = T // S, which is more than S steps when S does not divide T (31 for S = 30), and all of them are run,
    each with its own coefficients and GMM parameter set; the last step goes to alphas_cumprod[0]. The
    initial noise x_T is drawn with ``torch.randn`` (the global generator) when not given, as upstream does.
    """

    def __init__(
        self,
        model,
        gmm: str | GMM | None = None,
        gmm_params: GMM | None = None,
        *,
        n_components: int = 8,
        scale: float | None = None,
        seed: int | None = None,
        final_step: str = "gaussian",
        scale_per_dim: float | None = None,
        gmm_steps="all",
        schedule: str = "linear",
        device=None,
        **kwargs,
    ):
        # schedule, device and further keyword arguments are accepted as latent-diffusion / Stable Diffusion's
        # constructors take them: the schedule is the model's alphas_cumprod, the device the model's.
        if schedule != "linear":
            raise ValueError(f"schedule must be 'linear' (the only one upstream implements), got {schedule!r}")
        for attr in ("apply_model", "alphas_cumprod"):
            if not hasattr(model, attr):
                raise TypeError(f"model must expose {attr} (a latent-diffusion LatentDiffusion-like model)")
        if gmm_params is not None and not gmm:
            raise ValueError("gmm_params given with gmm=False: pass gmm=True to sample with them")
        if gmm_params is not None and not isinstance(gmm_params, GMM):
            raise TypeError(f"gmm_params must be a ddim_gmm_ext.GMM, got {type(gmm_params).__name__}")
        variant, tables = _deprecated_gmm(gmm, gmm_params)
        self.model = model
        resolve_scale(scale, scale_per_dim, 1)  # the values' checks (not both; D comes with the first sample)
        self.gmm_options = GMMOptions(
            variant=variant,
            tables=tables,
            n_components=n_components,
            scale=1.0 if scale is None else scale,
            scale_per_dim=scale_per_dim,
            seed=seed,
            final_step=final_step,
            gmm_steps=gmm_steps,  # the form now; indices against the steps of each run
        )
        self.ddpm_num_timesteps = int(model.alphas_cumprod.shape[0])
        self.ddim_timesteps: np.ndarray | None = None
        self.ddim_alphas: torch.Tensor | None = None  # set by make_schedule, with upstream's other attributes
        self.ddim_alphas_prev: np.ndarray | None = None
        self.ddim_eta: float = 0.0
        self._coefficients = torch.empty(0, 5)  # [S, 5] per-step (a_t, b_t, a_s, b_s, c), set by make_schedule
        self._built: tuple[tuple, GMM | None] | None = None  # (request key, tables) of the last built tables

    gmm = _option("variant")
    gmm_params = _option("tables")
    n_components = _option("n_components")
    scale = _option("scale")
    scale_per_dim = _option("scale_per_dim")
    seed = _option("seed")
    final_step = _option("final_step")
    gmm_steps = _option("gmm_steps")

    def _gmm_tables(self, x: torch.Tensor, steps: int) -> GMM | None:
        """The GMM of a run over ``steps`` steps from ``x`` (None: DDIM). Tables built from the options are a
        function of (options, sample size, steps, device, dtype) only, so they are kept and reused while those
        stay the same: building them costs O(steps D K) (about 0.6 s for a 4x64x64 latent, 51 steps, K = 8 on one CPU
        core), more than the steps themselves when a script calls ``sample`` once per batch."""
        options = self.gmm_options
        if options.variant is None:
            return options.resolve(x, steps)
        key = (options, tuple(x.shape[1:]), steps, x.device, x.dtype == torch.float64)
        if self._built is None or self._built[0] != key:
            self._built = (key, options.resolve(x, steps))
        return self._built[1]

    def _schedule(self, steps: int, ddim_discretize: str, eta: float) -> np.ndarray:
        self.make_schedule(steps, ddim_discretize=ddim_discretize, ddim_eta=eta)
        assert self.ddim_timesteps is not None
        return self.ddim_timesteps

    def make_schedule(
        self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = True
    ) -> None:
        """Timesteps and per-step (abar_t, abar_prev, sigma) as latent-diffusion's ``make_schedule``; the five
        step coefficients go to the model's device once. ``verbose`` is accepted for latent-diffusion scripts;
        nothing is printed."""
        T = self.ddpm_num_timesteps
        if isinstance(ddim_num_steps, bool) or not isinstance(ddim_num_steps, Integral) or not 1 <= ddim_num_steps <= T:
            raise ValueError(f"ddim_num_steps must be an int in [1, {T}], got {ddim_num_steps!r}")
        self.ddim_timesteps = ddim_timesteps(ddim_discretize, ddim_num_steps, T)
        eta = check_eta(ddim_eta, "ddim_eta")
        abar = self.model.alphas_cumprod.detach().to("cpu", torch.float64)
        alphas = abar[self.ddim_timesteps]
        alphas_prev = torch.cat([abar[:1], abar[self.ddim_timesteps[:-1]]])
        coeffs = _schedules.ddim_coefficients(alphas, alphas_prev, eta)
        # [S, 5] in step order; a one-step schedule comes back as Python floats, hence as_tensor / expand
        n = len(self.ddim_timesteps)
        table = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(-1).expand(n) for v in coeffs], -1)
        self.ddim_eta = eta
        self._coefficients = table.to(self.model.alphas_cumprod.device)
        # upstream's schedule attributes, with its types: float32 tensors on the model's device, alphas_prev numpy
        device = self.model.alphas_cumprod.device
        self.ddim_alphas = alphas.to(device, torch.float32)
        self.ddim_alphas_prev = alphas_prev.numpy()
        self.ddim_sigmas = table[:, 4].to(device, torch.float32)
        self.ddim_sqrt_one_minus_alphas = (1 - alphas).sqrt().to(device, torch.float32)

    @torch.no_grad()
    def sample(
        self,
        steps: int | None = None,
        batch_size: int = 1,
        shape=None,
        conditioning=None,
        callback=None,
        img_callback=None,
        eta: float = 0.0,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning=None,
        ddim_discretize: str = "uniform",
        verbose: bool = True,
        progress: bool = True,
        sample_offset: int = 0,
        S: int | None = None,
        normals_sequence=None,
        quantize_x0: bool = False,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector=None,
        corrector_kwargs: dict | None = None,
        dynamic_threshold=None,
        ucg_schedule=None,
        **kwargs,
    ):
        """Sample ``batch_size`` latents of ``shape`` (C, H, W, ...) in ``steps`` DDIM(-GMM) steps.

        ``S`` is latent-diffusion's name for ``steps``. With ``unconditional_conditioning`` and a guidance
        scale != 1, one model call on the stacked [uncond, cond] batch and guidance fused into the step.
        callback(i) and img_callback(pred_x0, i) after each step. The progress bar shows unless ``progress``
        is False (with ``verbose=False`` too, as upstream, whose scripts all pass it). Returns (samples,
        intermediates) with intermediates = {"x_inter": [...],
        "pred_x0": [...]} every ``log_every_t`` steps and at the last one.

        latent-diffusion's other arguments, as upstream: ``mask`` and ``x0`` (inpainting: before each step the
        known region, mask = 1, is reset to x0 noised to the step's time), ``temperature`` and
        ``noise_dropout`` (they scale / drop the step's noise, drawn from the package's stream),
        ``score_corrector`` with ``corrector_kwargs`` (``modify_score(model, e_t, x, t, c, **kwargs)`` on the
        guided eps), ``ucg_schedule`` (a guidance scale per step). ``normals_sequence`` is accepted and unused,
        as upstream leaves it; ``quantize_x0`` and ``dynamic_threshold`` need the first-stage model or
        Stable Diffusion's thresholding and raise NotImplementedError.
        """
        if quantize_x0:
            raise NotImplementedError("quantize_x0 needs the first-stage VQ model: not supported by this sampler")
        if (mask is None) != (x0 is None):
            raise ValueError("mask and x0 go together (inpainting): pass both or neither")
        _checks.check_number("temperature", temperature, 0.0)
        _checks.check_number("noise_dropout", noise_dropout, 0.0, 1.0)
        if (steps is None) == (S is None):
            raise ValueError("pass the number of steps once, as steps= (or latent-diffusion's S=)")
        requested = steps if steps is not None else S
        assert requested is not None  # exactly one of them, checked above
        if shape is None:
            raise ValueError("shape (C, H, W) of one sample is required")
        device = self.model.alphas_cumprod.device
        size = _check_request(batch_size, shape, x_T, device, eta, sample_offset)
        if isinstance(log_every_t, bool) or not isinstance(log_every_t, Integral) or log_every_t < 1:
            raise ValueError(f"log_every_t must be an int >= 1, got {log_every_t!r}")
        parameterization = getattr(self.model, "parameterization", "eps")
        if parameterization not in _PARAMETERIZATIONS:
            raise ValueError(
                f"model.parameterization must be one of {tuple(_PARAMETERIZATIONS)}, got {parameterization!r}"
            )
        self._schedule(requested, ddim_discretize, eta)
        x = torch.randn(size, device=device) if x_T is None else x_T
        if unconditional_conditioning is not None:  # refused before any model call, not at the first step
            _checks.check_number("unconditional_guidance_scale", unconditional_guidance_scale)
        return self.ddim_sampling(
            conditioning,
            size,
            x_T=x,
            callback=callback,
            timesteps=kwargs.get("timesteps"),
            mask=mask,
            x0=x0,
            img_callback=img_callback,
            log_every_t=log_every_t,
            temperature=temperature,
            noise_dropout=noise_dropout,
            score_corrector=score_corrector,
            corrector_kwargs=corrector_kwargs,
            unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning,
            dynamic_threshold=dynamic_threshold,
            ucg_schedule=ucg_schedule,
            progress=progress,  # shown with verbose=False, as upstream (every SD script passes it)
            sample_offset=sample_offset,
        )

    @torch.no_grad()
    def ddim_sampling(
        self,
        cond,
        shape,
        x_T: torch.Tensor | None = None,
        ddim_use_original_steps: bool = False,
        callback=None,
        timesteps: int | None = None,
        quantize_denoised: bool = False,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        img_callback=None,
        log_every_t: int = 100,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector=None,
        corrector_kwargs: dict | None = None,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning=None,
        dynamic_threshold: float | None = None,
        ucg_schedule=None,
        *,
        progress: bool = True,
        sample_offset: int = 0,
    ):
        """Upstream's sampling loop over the schedule ``make_schedule`` set (``sample`` calls it): from x_T
        (``torch.randn`` when None) of ``shape`` [B, ...]; ``timesteps`` an int runs the first positions of the
        schedule (upstream's partial schedules). Returns (samples, intermediates)."""
        if (mask is None) != (x0 is None):
            raise ValueError("mask and x0 go together (inpainting): pass both or neither")
        if self.ddim_timesteps is None:
            raise ValueError("call make_schedule first: ddim_sampling runs its schedule")
        schedule = self.ddim_timesteps
        if ddim_use_original_steps:  # every train timestep (the first ``timesteps`` of them when given)
            T = self.ddpm_num_timesteps
            _checks.check_index("timesteps", T if timesteps is None else timesteps - 1, T)
            schedule = np.arange(T if timesteps is None else timesteps)
        elif timesteps is not None:  # upstream's subset: the first int(min(timesteps / n, 1) * n) - 1 positions
            n = len(schedule)
            _checks.check_index("timesteps", timesteps, 2**31)
            schedule = schedule[: int(min(timesteps / n, 1) * n) - 1]
            if len(schedule) == 0:
                raise ValueError(f"timesteps={timesteps} leaves no step of the {n}-step schedule to run")
        device = self.model.alphas_cumprod.device
        x = torch.randn(tuple(shape), device=device) if x_T is None else x_T
        steps = len(schedule)
        if ucg_schedule is not None and len(ucg_schedule) != steps:
            got = len(ucg_schedule)
            raise ValueError(f"ucg_schedule must hold one guidance scale per step run ({steps}), got {got}")
        gmm = self._gmm_tables(x, steps)
        options = dict(
            temperature=temperature,
            noise_dropout=noise_dropout,
            score_corrector=score_corrector,
            corrector_kwargs=corrector_kwargs,
            unconditional_conditioning=unconditional_conditioning,
            quantize_denoised=quantize_denoised,
            dynamic_threshold=dynamic_threshold,
            use_original_steps=ddim_use_original_steps,
            gmm=gmm,
            n_steps=steps,
            seed=stream_seed(self.seed),
            sample_offset=sample_offset,
        )
        if ddim_use_original_steps:
            abar = self.model.alphas_cumprod.detach().to("cpu", torch.float64)
            stds = [float(_schedules.ddim_coefficients(abar[j], abar[j - 1] if j > 0 else 1.0, self.ddim_eta)[4])
                    for j in reversed(range(steps))]  # fmt: skip
        else:
            stds = self._coefficients[:steps, 4].flip(0).tolist()  # one copy, in sampling order
        gmms = self.gmm_options.plan(gmm, stds)
        intermediates = {"x_inter": [x], "pred_x0": [x]}
        order = np.flip(schedule)
        for i in progress_bar(range(steps), not progress, "DDIM-GMM Sampler" if gmm is not None else "DDIM Sampler"):
            index = steps - 1 - i  # into the schedule arrays, which are in increasing time
            t = torch.full((x.shape[0],), int(order[i]), device=device, dtype=torch.long)
            if mask is not None and x0 is not None:
                x = self._q_sample(x0, t) * mask + (1.0 - mask) * x
            w = unconditional_guidance_scale if ucg_schedule is None else ucg_schedule[i]
            options["gmm"] = gmms[i]  # None on a step where final_step or gmm_steps leaves the mixture out
            x, pred_x0 = self.p_sample_ddim(x, cond, t, index, unconditional_guidance_scale=w, step=i, **options)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or i == 0:  # latent-diffusion logs the first and every log_every_t-th
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
        return x, intermediates

    def p_sample_ddim(
        self,
        x: torch.Tensor,
        c,
        t: torch.Tensor,
        index: int,
        repeat_noise: bool = False,
        use_original_steps: bool = False,
        quantize_denoised: bool = False,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector=None,
        corrector_kwargs: dict | None = None,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning=None,
        dynamic_threshold: float | None = None,
        *,
        step: int | None = None,
        gmm: GMM | None = None,
        n_steps: int | None = None,
        seed: int | None = None,
        sample_offset: int = 0,
        prediction_type: str | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM(-GMM) step at schedule position ``index`` (upstream's method): returns (x_prev, pred_x0).
        One model call on [uncond, cond] with guidance fused into the step (or applied here first when a
        score corrector must see the guided eps). ``step`` is the Philox step index (default: the number of
        steps before this one); ``gmm`` the mixture of this step's run (None: DDIM). ``use_original_steps``:
        ``index`` is a train timestep and the step goes to the one before it (DDPM's schedule, the noise
        eta times DDPM's, as upstream)."""
        if quantize_denoised:
            raise NotImplementedError("quantize_denoised needs the first-stage VQ model: not supported")
        if self.ddim_timesteps is None:
            raise ValueError("call make_schedule (or sample) first: the step coefficients are built there")
        n = len(self.ddim_timesteps) if n_steps is None else n_steps
        i = n - 1 - index if step is None else step
        if prediction_type is None:
            prediction_type = _PARAMETERIZATIONS[getattr(self.model, "parameterization", "eps")]
        guided = unconditional_conditioning is not None and unconditional_guidance_scale != 1.0
        if guided:
            both = _stack_conditioning(unconditional_conditioning, c)
            m = self.model.apply_model(torch.cat([x, x]), torch.cat([t, t]), both)
        else:
            m = self.model.apply_model(x, t, c)
        if score_corrector is not None:
            if prediction_type != "epsilon":
                raise ValueError("score_corrector works on eps models (parameterization 'eps') only, as upstream")
            if guided:
                m_u, m_c = m.chunk(2)
                m, guided = m_u + unconditional_guidance_scale * (m_c - m_u), False
            m = score_corrector.modify_score(self.model, m, x, t, c, **(corrector_kwargs or {}))
        noise = None
        if temperature != 1.0 or noise_dropout > 0.0:
            seed_ = stream_seed(self.seed) if seed is None else seed
            z = reference.gaussian_noise(x.shape, seed_, sample_offset, i, x.dtype, x.device) * temperature
            noise = torch.nn.functional.dropout(z, p=noise_dropout) if noise_dropout > 0.0 else z
        if use_original_steps:
            abar = self.model.alphas_cumprod.detach().double()
            prev = abar[index - 1] if index > 0 else torch.ones((), dtype=torch.float64, device=abar.device)
            coefficients = tuple(
                torch.as_tensor(v, dtype=torch.float64, device=x.device)
                for v in _schedules.ddim_coefficients(abar[index], prev, self.ddim_eta)
            )
        else:
            coefficients = self._coefficients[index].unbind()
        w = unconditional_guidance_scale if guided else None
        if dynamic_threshold is not None:
            # Stable Diffusion's norm thresholding of x0_hat (x0 * value / max(rms(x0), value) per sample) keeps
            # eps_hat: the update then takes the thresholded x0 as a "sample" prediction on x shifted by
            # a_t (x0_thr - x0), whose eps is (x - a_t x0) / b_t, the model's.
            a_t, b_t = coefficients[0], coefficients[1]
            pred = api.step(m, x, a_t, b_t, a_t, b_t, 0.0, prediction_type=prediction_type, guidance_scale=w)
            x0_hat = pred.pred_original_sample
            assert x0_hat is not None
            rms = x0_hat.pow(2).flatten(1).mean(1).sqrt().clamp(min=dynamic_threshold)
            x0_thr = x0_hat * (dynamic_threshold / rms).reshape(-1, *([1] * (x.dim() - 1)))
            m, x, prediction_type, w = x0_thr, x + a_t.to(x.dtype) * (x0_thr - x0_hat), "sample", None
        out = api.step(
            m,
            x,
            *coefficients,
            gmm=_checks.gmm_for_step(gmm, i, n, self.final_step),
            step_index=i,
            prediction_type=prediction_type,
            guidance_scale=w,
            seed=stream_seed(self.seed) if seed is None else seed,
            sample_offset=sample_offset,
            noise=noise,
        )
        assert out.pred_original_sample is not None  # return_pred_original defaults to True
        return out.prev_sample, out.pred_original_sample

    def _q_sample(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 noised to train timesteps t [B]: the model's q_sample when it has one (as upstream calls it),
        else sqrt(abar_t) x0 + sqrt(1 - abar_t) noise with torch.randn."""
        if hasattr(self.model, "q_sample"):
            return self.model.q_sample(x0, t)
        abar = self.model.alphas_cumprod.to(x0.dtype)[t].reshape(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn_like(x0)

    @torch.no_grad()
    def stochastic_encode(
        self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x0 noised to the DDIM schedule's position t [B] (img2img's encoder, as upstream): sqrt(abar) x0 +
        sqrt(1 - abar) noise at ``ddim_alphas[t]`` (``alphas_cumprod[t]`` with ``use_original_steps``)."""
        if use_original_steps:
            abar = self.model.alphas_cumprod.double()
        else:
            if self.ddim_timesteps is None:
                raise ValueError("call make_schedule first: stochastic_encode indexes the DDIM schedule")
            assert self.ddim_alphas is not None  # make_schedule sets both
            abar = torch.as_tensor(self.ddim_alphas, dtype=torch.float64)
        noise = torch.randn_like(x0) if noise is None else noise
        a = abar.to(x0.device)[t.long()].reshape(-1, *([1] * (x0.dim() - 1)))
        return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)

    @torch.no_grad()
    def decode(
        self,
        x_latent: torch.Tensor,
        cond,
        t_start: int,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning=None,
        use_original_steps: bool = False,
        callback=None,
        **kwargs,
    ) -> torch.Tensor:
        """img2img's decoder, as upstream: the DDIM steps from schedule position ``t_start`` - 1 down to 0
        (after ``make_schedule`` and ``stochastic_encode``), with guidance; callback(i) after each step.
        The GMM (when on) is built for the ``t_start`` steps run."""
        if self.ddim_timesteps is None:
            raise ValueError("call make_schedule first: decode runs the DDIM schedule")
        full = np.arange(self.ddpm_num_timesteps) if use_original_steps else self.ddim_timesteps
        _checks.check_index("t_start", t_start, len(full) + 1)
        timesteps = np.flip(full[:t_start])
        gmm = self._gmm_tables(x_latent, t_start) if t_start else None
        run_seed = stream_seed(self.seed)
        x = x_latent
        for i, step in enumerate(timesteps):
            index = t_start - 1 - i
            ts = torch.full((x.shape[0],), int(step), device=x.device, dtype=torch.long)
            x, _ = self.p_sample_ddim(
                x,
                cond,
                ts,
                index,
                unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=unconditional_conditioning,
                use_original_steps=use_original_steps,
                step=i,
                gmm=gmm,
                n_steps=t_start,
                seed=run_seed,
            )
            if callback is not None:
                callback(i)
        return x


def ddim_timesteps(discretize: str, num_steps: int, num_train_timesteps: int) -> np.ndarray:
    """The train timesteps latent-diffusion's DDIM sampler runs, increasing (int64 numpy, as upstream).

    "uniform": 1 + (0, c, 2c, ...) below T + 1 with c = T // S: ceil(T / c) timesteps, more than S when S does
    not divide T. "quad": 1 + floor(linspace(0, sqrt(0.8 T), S)^2). Upstream then indexes alphas_cumprod at
    T for some S (S = 3 on T = 1000 gives 1, 334, 667, 1000) and fails; here a timestep past the last train
    timestep is taken as T - 1 (the sampling still starts from the noisiest timestep). Repeated timesteps
    ("quad" for S >= 30 on T = 1000, the clamped S = T) are run once: upstream runs a repeat as an identity
    step (abar_prev = abar_t, sigma = 0) that costs a model call and would put GMM offsets on a step without
    noise.
    """
    if discretize == "uniform":
        steps = np.arange(0, num_train_timesteps, num_train_timesteps // num_steps)
    elif discretize == "quad":
        steps = (np.linspace(0, np.sqrt(num_train_timesteps * 0.8), num_steps) ** 2).astype(int)
    else:
        raise ValueError(f"ddim_discretize must be 'uniform' or 'quad', got {discretize!r}")
    steps = np.minimum(steps + 1, num_train_timesteps - 1)
    return steps[np.concatenate([[True], np.diff(steps) > 0])].astype(np.int64)


def _check_request(batch_size, shape, x_T, device: torch.device, eta, sample_offset) -> tuple[int, ...]:
    """The size (batch_size, *shape) of a sampling request, with its arguments checked before any model call:
    a positive batch size and dimensions, x_T (when given) a finite floating tensor of that size on the
    model's device, eta in [0, 1], and sample indices sample_offset .. sample_offset + batch_size - 1 in the
    noise stream's [0, 2**32)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(
        isinstance(n, Integral) and not isinstance(n, bool) and int(n) >= 1 for n in shape
    ):
        raise ValueError(f"shape must be a tuple of ints >= 1 (C, H, W) for one sample, got {shape!r}")
    size = (int(batch_size), *(int(n) for n in shape))
    if x_T is not None:
        if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
            raise TypeError(f"x_T must be a floating-point tensor, got {getattr(x_T, 'dtype', type(x_T).__name__)}")
        if tuple(x_T.shape) != size:
            raise ValueError(f"x_T must have shape {size} (batch_size, *shape), got {tuple(x_T.shape)}")
        if x_T.device != device:
            raise ValueError(f"x_T must be on the model's device {device}, got {x_T.device}")
        if not bool(torch.isfinite(x_T).all()):  # one reduction per run; a NaN x_T would give NaN samples
            raise ValueError("x_T has non-finite values (NaN or Inf)")
    check_eta(eta, "eta")
    _checks.check_index("sample_offset", sample_offset, _checks.MAX_INDEX)
    if sample_offset + size[0] > _checks.MAX_INDEX:
        raise ValueError(f"sample_offset + batch_size must be <= 2**32, got {sample_offset} + {size[0]}")
    return size


def _stack_conditioning(uncond, cond):
    """[uncond, cond] along the batch, for tensors and latent-diffusion's dicts / lists of them."""
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or uncond.keys() != cond.keys():
            raise ValueError("unconditional_conditioning must be a dict with the conditioning's keys")
        return {k: _stack_conditioning(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(uncond) != len(cond):
            raise ValueError("unconditional_conditioning must be a list as long as the conditioning")
        return [_stack_conditioning(u, c) for u, c in zip(uncond, cond, strict=False)]
    if not isinstance(cond, torch.Tensor) or not isinstance(uncond, torch.Tensor):
        raise TypeError("conditioning and unconditional_conditioning must be tensors (or dicts / lists of them)")
    return torch.cat([uncond, cond])


def _deprecated_gmm(gmm, gmm_params) -> tuple[str | None, GMM | None]:
    """(variant, tables) of DDIMSampler's ``gmm`` / ``gmm_params``: the current spelling is ``gmm`` None, a
    variant name or a GMM; ``gmm=True`` ("ortho-vub"), ``gmm=False`` (None) and ``gmm_params`` (the tables,
    with ``gmm=True``) are the earlier one, kept for one release with a DeprecationWarning."""
    if gmm_params is not None:  # the authors' README: gmm=True, gmm_params=tables
        warnings.warn(
            f"DDIMSampler(gmm={gmm!r}, gmm_params=...) is deprecated: pass the tables as gmm=<the GMM>",
            DeprecationWarning,
            stacklevel=3,
        )
        return None, gmm_params
    if isinstance(gmm, bool):
        new = "gmm='ortho-vub'" if gmm else "gmm=None (the default)"
        warnings.warn(f"DDIMSampler(gmm={gmm}) is deprecated: pass {new}", DeprecationWarning, stacklevel=3)
    if gmm is True:
        return "ortho-vub", None
    if gmm is False:
        return None, None
    if isinstance(gmm, str) or gmm is None:
        return gmm or None, None
    return None, gmm
