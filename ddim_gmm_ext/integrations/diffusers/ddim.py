"""diffusers integration: :class:`DDIMGMMScheduler`, a drop-in ``DDIMScheduler`` whose step is one
``ddim_gmm_ext.step`` call.

    from ddim_gmm_ext.diffusers import DDIMGMMScheduler
    pipe.scheduler = DDIMGMMScheduler.from_config(pipe.scheduler.config, gmm_variant="ortho-vub", seed=0)

Importing this module imports diffusers; ``import ddim_gmm_ext`` does not.
"""

from __future__ import annotations

from numbers import Integral

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMScheduler, DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ... import api, reference
from ...gmm import GMM
from .._common import build_gmm, check_eta, check_gmm, check_gmm_options, check_gmm_steps, check_seed, stream_seed

__all__ = ["DDIMGMMScheduler", "DDIMSchedulerOutput"]

_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_SPACINGS = ("leading", "trailing", "linspace")


class DDIMGMMScheduler(DDIMScheduler):
    """``DDIMScheduler`` with the DDIM-GMM kernel (Gabbur, TMLR 2026) and a fused step.

    Every ``DDIMScheduler`` config key, default and method is kept; with ``gmm_variant=None`` (the default) and
    no :meth:`set_gmm_params`, outputs equal ``DDIMScheduler``'s given the same ``variance_noise`` or
    ``generator``.

    GMM config keys (saved with ``save_pretrained``, overridable in ``from_config(config, **keys)``):

    * ``gmm_variant``: None (off), "rand", "ortho", "ortho-vub" or "ortho-vub*" (ORTHO-VUB shared by all steps);
    * ``gmm_n_components`` (K), ``gmm_scale`` (s), ``gmm_share_across_steps``, ``gmm_uniform_priors``: as
      :meth:`ddim_gmm_ext.GMM.create`;
    * ``seed``: the GMM tables and the Philox noise / component stream (see "Randomness"); None: tables from
      seed 0, stream seed drawn from torch's default generator at each ``set_timesteps``.

    GMM tables are built on the first ``step`` after ``set_timesteps`` from that sample's per-sample size,
    device and dtype, with one parameter set per inference step, and cached; a sample of another per-sample
    size rebuilds them. Tables given with :meth:`set_gmm_params` take precedence and are never rebuilt (a
    size mismatch is an error).

    Randomness of a step, per source (z: the Gaussian noise, k: the GMM component of each sample):

    * ``variance_noise``: z (as in diffusers); k from the Philox stream.
    * ``generator`` (one, or a list with one per sample): z drawn exactly as ``DDIMScheduler`` draws it
      (``randn_tensor``, only when eta > 0), then k drawn from the same generator(s). Reproduces diffusers'
      DDIM for the same generator; not sync-free (a CPU generator draws on the host).
    * neither: z and k from the Philox stream of (seed, sample index, step index), drawn inside the fused
      step: no noise tensor, no host sync, compiles with ``fullgraph=True``.

    Step index. The step coefficients follow the ``timestep`` argument exactly as in ``DDIMScheduler`` (a
    gather from a table built in ``set_timesteps``, no ``.item()``), while the GMM parameter set and the
    Philox step index come from a counter: 0 after ``set_timesteps`` (or ``set_begin_index(i)``, which
    img2img pipelines call), +1 per step. The GMM kernel is applied at every step, the last one included.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        gmm_variant: str | None = None,
        gmm_n_components: int = 8,
        gmm_scale: float = 1.0,
        gmm_share_across_steps: bool = False,
        gmm_uniform_priors: bool = True,
        seed: int | None = None,
    ):
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one,
            steps_offset=steps_offset,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        # DDIMScheduler reports these only at the first step; the fused step needs them settled up front.
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {prediction_type!r}")
        if timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_SPACINGS}, got {timestep_spacing!r}")
        check_gmm_options(gmm_variant, gmm_n_components, gmm_scale)
        check_seed(seed)
        self._user_gmm: GMM | None = None
        self._built_gmm: GMM | None = None
        self._built_key = None
        self._coefficients: torch.Tensor | None = None  # [num_train_timesteps, 5]: a_t, b_t, a_s, b_s, DDIM sigma
        self._step_index = 0
        self._stream_seed = 0

    # -- configuration -----------------------------------------------------------------------------------
    def set_gmm_params(self, gmm_params: GMM | None = None) -> None:
        """Use these GMM tables (one parameter set per inference step, or shared) instead of building them
        from the config; None goes back to the config."""
        if gmm_params is not None:
            if not isinstance(gmm_params, GMM):
                raise TypeError(f"gmm_params must be a ddim_gmm_ext.GMM, got {type(gmm_params).__name__}")
            if self.num_inference_steps is not None:
                check_gmm_steps(gmm_params, self.num_inference_steps, "gmm_params")
        self._user_gmm = gmm_params

    @property
    def gmm(self) -> GMM | None:
        """The GMM tables in use: those of :meth:`set_gmm_params`, else the ones built at the last step."""
        return self._user_gmm if self._user_gmm is not None else self._built_gmm

    @property
    def step_index(self) -> int:
        """Index of the next step in sampling order (selects the GMM parameter set and the noise stream)."""
        return self._step_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the step counter at ``begin_index`` (diffusers' img2img pipelines call this after
        ``set_timesteps`` when they skip the first steps)."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, Integral) or begin_index < 0:
            raise ValueError(f"begin_index must be an int >= 0, got {begin_index!r}")
        self._step_index = int(begin_index)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """As ``DDIMScheduler.set_timesteps``; also builds the step coefficients of every timestep on
        ``device``, resets the step counter and picks the run's stream seed."""
        super().set_timesteps(num_inference_steps, device)
        self._coefficients = self._coefficient_table().to(device)
        self._step_index = 0
        self._stream_seed = stream_seed(self.config.seed)
        if self._user_gmm is not None:
            check_gmm_steps(self._user_gmm, num_inference_steps, "gmm_params")

    def _coefficient_table(self) -> torch.Tensor:
        """(a_t, b_t, a_s, b_s, sigma) of the step from each train timestep t, with s = t - T // n as in
        ``DDIMScheduler.step`` (final_alpha_cumprod below 0); sigma is DDIM's noise std at eta = 1."""
        T = self.config.num_train_timesteps
        prev = torch.arange(T) - T // self.num_inference_steps
        abar = self.alphas_cumprod.detach().to("cpu", torch.float64)
        abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], self.final_alpha_cumprod.double())
        return torch.stack(reference.ddim_coefficients(abar, abar_prev, 1.0), dim=-1).float()

    # -- the step ------------------------------------------------------------------------------------------
    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """One DDIM(-GMM) step from ``timestep`` to the previous inference timestep; arguments and outputs as
        ``DDIMScheduler.step`` (randomness: see the class docstring)."""
        if self.num_inference_steps is None:
            raise ValueError(
                "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
            )
        eta = check_eta(eta)
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError(
                "Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                " `variance_noise` stays `None`."
            )
        if variance_noise is not None and tuple(variance_noise.shape) != tuple(sample.shape):
            raise ValueError(
                f"variance_noise must have the sample's shape {tuple(sample.shape)}, got {tuple(variance_noise.shape)}"
            )
        generator = _check_generator(generator, sample.shape[0])
        a_t, b_t, a_s, b_s, sigma = self._coefficients_at(timestep, sample.device)
        gmm = self._gmm_for(sample)
        i = self._step_index

        noise, components = variance_noise, None
        if noise is None and generator is not None and eta > 0:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
        if generator is not None and gmm is not None:
            components = _draw_components(generator, gmm, i, sample)
        options = dict(gmm=gmm, step_index=i, seed=self._stream_seed, noise=noise, components=components)
        coeffs = (a_t, b_t, a_s, b_s, eta * sigma)

        if self.config.thresholding:
            # Dynamic thresholding needs x0_hat before the update. The update then takes the thresholded x0 as
            # a "sample" prediction on a sample shifted by a_t (x0_thr - x0_hat): that keeps eps_hat =
            # (x_t - a_t x0_hat) / b_t, the model's eps, unless use_clipped_model_output re-derives it from x0_thr
            # on the unshifted sample (diffusers' semantics).
            x0 = api.step(
                model_output, sample, a_t, b_t, a_t, b_t, 0.0, prediction_type=self.config.prediction_type
            ).pred_original_sample
            x0_thr = self._threshold_sample(x0)
            shifted = sample if use_clipped_model_output else sample + a_t * (x0_thr - x0)
            out = api.step(x0_thr, shifted, *coeffs, prediction_type="sample", **options)
        else:
            clip = self.config.clip_sample_range if self.config.clip_sample else None
            out = api.step(
                model_output,
                sample,
                *coeffs,
                prediction_type=self.config.prediction_type,
                clip_sample_range=clip,
                use_clipped_model_output=use_clipped_model_output,
                **options,
            )
        self._step_index = i + 1

        if not return_dict:
            return (out.prev_sample, out.pred_original_sample)
        return DDIMSchedulerOutput(prev_sample=out.prev_sample, pred_original_sample=out.pred_original_sample)

    def _coefficients_at(self, timestep, device: torch.device):
        """The five step coefficients of ``timestep`` as 0-d tensors on ``device``, without a device sync."""
        if self._coefficients.device != device:  # once, when set_timesteps was not given the sample's device
            self._coefficients = self._coefficients.to(device)
        table = self._coefficients
        T = table.shape[0]
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1 or timestep.is_floating_point() or timestep.is_complex():
                raise ValueError(
                    f"timestep must be one integer timestep, got a {timestep.dtype} tensor of shape "
                    f"{tuple(timestep.shape)}"
                )
            if timestep.device.type == "cpu" and table.device.type != "cpu":
                row = table[int(timestep)]  # a host read: no device sync
            else:
                row = table.index_select(0, timestep.reshape(1).to(device))[0]
        elif isinstance(timestep, Integral) and not isinstance(timestep, bool):
            if not 0 <= timestep < T:
                raise ValueError(f"timestep must be in [0, num_train_timesteps={T}), got {timestep}")
            row = table[int(timestep)]
        else:
            raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
        return row.unbind()

    def _gmm_for(self, sample: torch.Tensor) -> GMM | None:
        """The GMM tables of this step (None when GMM is off), built or checked against ``sample``."""
        gmm = self._user_gmm
        if gmm is not None:
            check_gmm(gmm, sample, self.num_inference_steps, "gmm_params")
        elif self.config.gmm_variant is not None:
            key = (tuple(sample.shape[1:]), self.num_inference_steps, sample.device, sample.dtype == torch.float64)
            if key != self._built_key:
                c = self.config
                self._built_gmm = build_gmm(
                    c.gmm_variant,
                    sample,
                    self.num_inference_steps,
                    n_components=c.gmm_n_components,
                    scale=c.gmm_scale,
                    share_across_steps=c.gmm_share_across_steps,
                    uniform_priors=c.gmm_uniform_priors,
                    seed=c.seed,
                )
                self._built_key = key
            gmm = self._built_gmm
        if gmm is not None and not gmm.shared and self._step_index >= gmm.n_steps:
            raise ValueError(
                f"step was called {self._step_index + 1} times since set_timesteps but the GMM has parameter sets "
                f"for {gmm.n_steps} steps; call set_timesteps before sampling again"
            )
        return gmm


def _check_generator(generator, batch: int):
    """A generator, or a list of one per sample; a one-element list is one generator (as in randn_tensor)."""
    if isinstance(generator, (list, tuple)):
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError("generator must be a torch.Generator or a list of torch.Generator")
        if len(generator) == 1:
            return generator[0]
        if len(generator) != batch:
            raise ValueError(
                f"generator is a list of {len(generator)} generators but the batch has {batch} samples; pass one "
                "generator per sample"
            )
        return list(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    return generator


def _draw_components(generator, gmm: GMM, step_index: int, sample: torch.Tensor) -> torch.Tensor:
    """k [B] ~ Categorical(priors of the step), from one generator for the batch or one per sample."""
    priors = gmm.priors[gmm.set_index(step_index)]
    if isinstance(generator, list):
        k = torch.cat([torch.multinomial(priors.to(g.device), 1, generator=g) for g in generator])
    else:
        k = torch.multinomial(priors.to(generator.device), sample.shape[0], replacement=True, generator=generator)
    return k.to(sample.device)
