"""diffusers integration: :class:`DDIMGMMScheduler`, a drop-in ``DDIMScheduler`` whose step is one
``ddim_gmm_ext.step`` call.

    from ddim_gmm_ext.diffusers import DDIMGMMScheduler
    pipe.scheduler = DDIMGMMScheduler.from_config(pipe.scheduler.config, gmm_variant="ortho-vub", seed=0)

Importing this module imports diffusers; ``import ddim_gmm_ext`` does not.
"""

from __future__ import annotations

from numbers import Integral

import torch
from diffusers.schedulers.scheduling_ddim import DDIMScheduler, DDIMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ... import _checks, _schedules, api
from .._common import check_eta
from ._args import check_betas, check_step_arguments, check_timesteps_set, stock_signature
from ._base import (
    GMMSchedulerMixin,
    check_begin_index,
    check_step_count,
    coefficient_rows,
    publish,
    scheduler_output,
    zero_snr_rows,
)
from ._config import InitArgs, scheduler_init

__all__ = ["DDIMGMMScheduler", "DDIMSchedulerOutput"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_SPACINGS = ("leading", "trailing", "linspace")


class DDIMGMMScheduler(GMMSchedulerMixin, DDIMScheduler):
    """``DDIMScheduler`` with the DDIM-GMM kernel (Gabbur, TMLR 2026) and a fused step.

    Every ``DDIMScheduler`` config key, default and method is kept; with ``gmm_variant=None`` (the default) and
    no :meth:`set_gmm_params`, outputs equal ``DDIMScheduler``'s given the same ``variance_noise`` or
    ``generator``. GMM config keys, tables and :meth:`set_gmm_params`: see :class:`GMMSchedulerMixin`.

    Randomness of a step, per source (z: the Gaussian noise, k: the GMM component of each sample):

    * ``variance_noise``: z (as in diffusers); k from the Philox stream.
    * ``generator`` (one, or a list with one per sample): z drawn exactly as ``DDIMScheduler`` draws it
      (``randn_tensor``, only when eta > 0), then k drawn from the same generator(s). Reproduces diffusers'
      DDIM for the same generator; not sync-free (a CPU generator draws on the host).
    * neither, with a GMM or a ``seed``: z and k from the Philox stream of (seed, sample index, step index),
      drawn inside the fused step: no noise tensor, no host sync, compiles with ``fullgraph=True``. With
      ``seed=None`` the stream seed is drawn from torch's global RNG at the first step of each run (or at
      ``prepare_gmm``; a loop rerun without ``set_timesteps`` is a new run: see :class:`GMMSchedulerMixin`).
    * neither, GMM off and ``seed=None``: z drawn from torch's global RNG exactly as ``DDIMScheduler`` draws it
      (only when eta > 0), so the loop leaves the global RNG as ``DDIMScheduler`` does.

    Zero-SNR schedules (``rescale_betas_zero_snr=True``) with ``prediction_type="epsilon"``: where the schedule
    reaches a_t = 0, x0 is clipped to +-clip_sample_range as ``DDIMScheduler`` does; without clip_sample, or
    with thresholding, ``set_timesteps`` raises (``DDIMScheduler`` gives non-finite samples there). A schedule
    that never reaches it (leading spacing) is unaffected.

    Step index. The step's coefficients, GMM parameter set and Philox step all come from the position i of
    ``timestep`` in ``self.timesteps`` (DDIM timesteps are distinct, so i is unambiguous): a loop that starts
    mid-schedule (img2img, a hand-written loop) gets the right step without ``set_begin_index``. A host
    timestep in [0, T) that is not in the schedule is stepped as ``DDIMScheduler`` steps it (to t - T // n,
    its own Philox step n + t) with the GMM off, and refused with a GMM on (no parameter set). A timestep
    tensor on an accelerator, or any tensor under ``torch.compile``, is looked up on its device (a gather, no
    host read); there an off-schedule timestep gives an all-NaN step (the op's out-of-range convention).
    The GMM kernel is applied at every step but the last (``final_step="gaussian"``, the default) or at every
    step (``final_step="gmm"``).

    Compiling: ``set_timesteps(n, device)`` builds the coefficient table [n, 6] of every step on the device;
    with the table op the step is one op call whose step index is a device tensor, so a compiled
    ``model + step`` function compiles once for the whole loop.
    """

    _compatibles = [*DDIMScheduler._compatibles, "DDIMScheduler"]

    @scheduler_init(DDIMScheduler)
    def __init__(self, args: InitArgs) -> None:
        super().__init__(**args.stock)
        # DDIMScheduler reports these only at the first step (or never); the fused step needs them settled.
        if args.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {args.prediction_type!r}")
        if args.timestep_spacing not in _SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {_SPACINGS}, got {args.timestep_spacing!r}")
        if isinstance(args.steps_offset, bool) or not isinstance(args.steps_offset, Integral) or args.steps_offset < 0:
            raise ValueError(f"steps_offset must be an int >= 0, got {args.steps_offset!r}")
        check_betas(self.betas, args.trained_betas, args.beta_schedule, args.num_train_timesteps)
        self._init_gmm()
        self._index_of: torch.Tensor | None = None  # [T] int64: position of each train timestep, -1 if absent
        self._index_of_host: list[int] | None = None
        self._step_index: int = 0
        self._position: int | None = None  # the last step's position in the schedule, where the host knows it

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """As ``DDIMScheduler.from_config``; a flow-matching scheduler's config (SD3, Flux) is refused: it would
        silently become a linear-beta DDIM schedule the model was not trained on."""
        name = config.get("_class_name") if isinstance(config, dict) else None
        # an in-memory config has no _class_name: a flow-matching one has a shift and no beta schedule
        if not isinstance(name, str) and isinstance(config, dict) and "shift" in config and "beta_start" not in config:
            name = "flow-matching scheduler"
        if isinstance(name, str) and name.startswith(("FlowMatch", "flow-matching")):
            raise ValueError(
                f"config is a {name} config (a flow-matching model); use "
                "ddim_gmm_ext.diffusers.FlowMatchEulerDiscreteGMMScheduler.from_config(config) instead"
            )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # -- schedule -------------------------------------------------------------------------------------------
    @property
    def step_index(self) -> int:
        """Index of the next step in sampling order (host-side bookkeeping; the step itself takes its index
        from the timestep)."""
        return self._step_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Accepted for diffusers' img2img pipelines, which call it after ``set_timesteps`` when they skip the
        first steps; the step index comes from the timestep anyway, so this only sets :attr:`step_index`."""
        self._step_index = check_begin_index(begin_index)

    @stock_signature(DDIMScheduler.set_timesteps)
    def set_timesteps(self, num_inference_steps, device=None) -> None:
        """As ``DDIMScheduler.set_timesteps``; also builds on ``device`` the coefficient table of every step
        (eta 0 and 1; other eta on first use), the timestep -> step index map, and picks the stream seed."""
        num_inference_steps = check_step_count(num_inference_steps)
        super().set_timesteps(num_inference_steps, device)
        T = self.config.num_train_timesteps
        t = self.timesteps.cpu()
        if t.min() < 0 or t.max() >= T:
            raise ValueError(
                f"the schedule has timesteps outside [0, {T}) (steps_offset={self.config.steps_offset}, "
                f"timestep_spacing={self.config.timestep_spacing!r}, num_inference_steps={num_inference_steps})"
            )
        index_of = torch.full((T,), -1, dtype=torch.int64)
        index_of[t] = torch.arange(len(t))
        self._index_of_host = index_of.tolist()
        self._index_of = index_of.to(self.timesteps.device)
        # One 0-d step-index tensor per step on the schedule's device, made once: a device step then needs no
        # kernel to find its index (see _index), and a captured CUDA graph reads them as static inputs.
        self._step_tensors = list(torch.arange(len(t), device=self.timesteps.device).unbind(0))
        self._path = self._ddim_path(t)
        # one row set per eta (its noise std column); eta 0 and 1 converted now, so that a compiled loop finds them
        self._set_rows(self._rows_at, default=0.0, warm=(0.0, 1.0))
        self._step_index = 0
        c = self.config  # read once per schedule: a config lookup costs as much as a tenth of the step
        self._step_options = (c.thresholding, c.clip_sample_range if c.clip_sample else None, c.prediction_type)

    def _rows_at(self, eta: float) -> torch.Tensor:
        """[S, 6] float64 rows at this eta on the schedule's device (the row table gates and caches them)."""
        a_t, b_t, a_s, b_s, sigma = self._path
        g = self._final_step_g(len(a_t))
        return coefficient_rows(a_t, b_t, a_s, b_s, eta * sigma, g).to(self.timesteps.device)

    def _table_at(self, eta: float, device: torch.device, cdt: torch.dtype) -> torch.Tensor:
        """The rows at this eta on ``device`` in the compute dtype ``cdt`` (cached by the row table)."""
        return self._row_table_or_raise().table(device, cdt, eta)

    def _index(self, timestep, device: torch.device):
        """Position of ``timestep`` in the schedule: a host int, or a 0-d int64 tensor on ``device`` for device
        timesteps and under ``torch.compile`` (-1 there when the timestep is not in the schedule)."""
        if self._index_of is None or self._index_of_host is None:
            raise ValueError("call set_timesteps before step (the timestep -> step index map is built there)")
        index_of, index_of_host = self._index_of, self._index_of_host
        T = index_of.shape[0]
        self._position = None
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1 or timestep.dtype not in _INT_DTYPES:
                raise ValueError(
                    f"timestep must be one integer timestep, got a {timestep.dtype} tensor of shape "
                    f"{tuple(timestep.shape)}"
                )
            compiling = torch.compiler.is_compiling()
            view = None if compiling else self._schedule_position(timestep)
            if view is not None:  # an element of self.timesteps (a pipeline's loop): its position, no device work
                self._position = view
                return self._step_tensors[view] if timestep.device.type != "cpu" else view
            if compiling or timestep.device.type != "cpu":
                t = timestep.reshape(()).to(device)
                inside = (t >= 0) & (t < T)
                index = index_of.to(device).index_select(0, t.clamp(0, T - 1).reshape(1)).reshape(())
                return torch.where(inside, index, torch.full_like(index, -1))
            timestep = int(timestep)
        elif isinstance(timestep, bool) or not isinstance(timestep, Integral):
            raise TypeError(f"timestep must be an int or an integer tensor, got {type(timestep).__name__}")
        if not 0 <= timestep < T:
            raise ValueError(f"timestep must be in [0, {T}) (num_train_timesteps), got {timestep}")
        i = index_of_host[timestep]
        self._position = None if i < 0 else i
        return self._position  # None: a training timestep outside the schedule (see step)

    def _off_schedule_row(self, timestep: int, eta: float, gmm, device, cdt) -> tuple[torch.Tensor, int]:
        """The coefficient row of a training timestep that is not in ``self.timesteps``, as ``DDIMScheduler``
        computes it for any timestep (previous timestep t - T // N), and the Philox step index of its noise
        (past the schedule's indices, one per timestep). The GMM parameter set of a step is its position in the
        schedule, which such a timestep does not have: with a GMM on it is refused."""
        if gmm is not None:
            raise ValueError(
                f"timestep {timestep} is not in the schedule (scheduler.timesteps), and the GMM parameter set of a "
                f"step is its position there; pass one of {self.timesteps.tolist()[:8]}"
                f"{' ...' if len(self.timesteps) > 8 else ''} or turn the GMM off (gmm_variant=None)"
            )
        n = self.num_inference_steps
        assert n is not None  # step() refuses a scheduler without set_timesteps
        a_t, b_t, a_s, b_s, sigma = self._ddim_path(torch.tensor([timestep]))
        row = coefficient_rows(a_t, b_t, a_s, b_s, eta * sigma)[0]  # g = 1 (unused: no GMM)
        return row.to(device, cdt), n + timestep

    def _ddim_path(self, t: torch.Tensor):
        """(a_t, b_t, a_s, b_s, DDIM sigma) float64 [len(t)] of steps from the int64 timesteps t to
        t - T // N, the previous timestep of DDIMScheduler (final_alpha_cumprod below 0)."""
        prev = t - self.config.num_train_timesteps // self.num_inference_steps
        abar = self.alphas_cumprod.detach().to("cpu", torch.float64)
        abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], self.final_alpha_cumprod.double())
        path = _schedules.ddim_coefficients(abar[t], abar_prev, 1.0)
        # one-element tensors come back as Python floats (the host path for a single step)
        a_t, b_t, a_s, b_s, sigma = (torch.as_tensor(v, dtype=torch.float64).reshape(len(t)) for v in path)
        c = self.config
        zero_snr_rows(a_t, c, c.clip_sample and not c.thresholding)  # DDIMScheduler's thresholding of +-inf is NaN
        return a_t, b_t, a_s, b_s, sigma

    def _schedule_position(self, timestep: torch.Tensor) -> int | None:
        """The position of ``timestep`` in ``self.timesteps`` when it is a 0-d view of that tensor (what
        iterating over the schedule yields), read from its storage offset on the host; None otherwise."""
        ts = self.timesteps
        if (
            timestep.dim() != 0
            or ts.dim() != 1
            or timestep.device != ts.device
            or timestep.untyped_storage().data_ptr() != ts.untyped_storage().data_ptr()
        ):
            return None
        stride = ts.stride(0)
        offset = timestep.storage_offset() - ts.storage_offset()
        if stride <= 0 or offset % stride or not 0 <= offset // stride < len(ts):
            return None
        return offset // stride

    # -- the step ------------------------------------------------------------------------------------------
    @stock_signature(DDIMScheduler.step)
    def step(
        self,
        model_output,
        timestep,
        sample,
        eta=0.0,
        use_clipped_model_output=False,
        generator=None,
        variance_noise=None,
        return_dict=True,
    ) -> DDIMSchedulerOutput | tuple:
        """One DDIM(-GMM) step from ``timestep`` to the previous inference timestep; arguments and outputs as
        ``DDIMScheduler.step`` (randomness: see the class docstring)."""
        check_timesteps_set(self.num_inference_steps is not None)
        if eta.__class__ is not float or not 0.0 <= eta <= 1.0:  # the common case checked in one test
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
        if generator is not None:
            # the model output before randn_tensor(model_output.shape) is checked as noise
            generator = check_step_arguments(model_output, sample, generator)
        i = self._index(timestep, sample.device)
        gmm = self._gmm_for(sample)
        cdt = _checks.compute_dtype(sample.dtype)
        if i is None:  # off the schedule: DDIMScheduler's own arithmetic for this timestep, Gaussian kernel
            table, op_index = self._off_schedule_row(int(timestep), eta, gmm, sample.device, cdt)
        else:
            table, op_index = self._row_table.table(sample.device, cdt, eta), i  # type: ignore[union-attr]  # _index refuses a scheduler without set_timesteps

        noise = variance_noise
        if noise is None and eta > 0 and self._torch_noise(generator, gmm):
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
        components = self._gmm_components(generator, gmm, op_index, sample, self._position)

        thresholding, clip, prediction_type = self._step_options
        if thresholding:
            row = table if table.dim() == 1 else table[int(op_index)]
            out = self._thresholded_step(
                model_output, sample, row, use_clipped_model_output, gmm, op_index, noise, components
            )
        else:
            out = self._fused_step(
                model_output,
                sample,
                op_index,
                prediction_type=prediction_type,
                gmm=gmm,
                clip_sample_range=clip,
                use_clipped_model_output=use_clipped_model_output,
                noise=noise,
                components=components,
                rows=table,
            )
        if isinstance(i, int):
            self._step_index = i + 1

        if not return_dict:
            return (out.prev_sample, out.pred_original_sample)
        return scheduler_output(
            DDIMSchedulerOutput, prev_sample=out.prev_sample, pred_original_sample=out.pred_original_sample
        )

    def _thresholded_step(self, model_output, sample, row, use_clipped_model_output, gmm, i, noise, components):
        """Dynamic thresholding needs x0_hat before the update (two op calls, host step index). The update then
        takes the thresholded x0 as a "sample" prediction on a sample shifted by a_t (x0_thr - x0_hat): that
        keeps eps_hat = (x_t - a_t x0_hat) / b_t, the model's eps, unless use_clipped_model_output re-derives it
        from x0_thr on the unshifted sample (diffusers' semantics)."""
        a_t, b_t = row[0], row[1]
        x0 = api.step(
            model_output, sample, a_t, b_t, 1.0, 0.0, 0.0, prediction_type=self.config.prediction_type
        ).pred_original_sample
        assert x0 is not None  # api.step returns x0_hat unless told not to
        x0_thr = self._threshold_sample(x0)
        shifted = sample if use_clipped_model_output else sample + a_t.to(sample.dtype) * (x0_thr - x0)
        return api.step_from_table(
            x0_thr,
            shifted,
            row,
            int(i),
            prediction_type="sample",
            gmm=gmm,
            seed=self._stream_seed,
            noise=noise,
            components=components,
        )


publish(DDIMGMMScheduler, DDIMSchedulerOutput)
