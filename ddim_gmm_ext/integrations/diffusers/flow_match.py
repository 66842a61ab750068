"""diffusers integration: :class:`FlowMatchEulerDiscreteGMMScheduler`, a drop-in
``FlowMatchEulerDiscreteScheduler`` (Stable Diffusion 3, Flux and other rectified-flow pipelines) whose step is
one fused RFIM(-GMM) op call.

    from ddim_gmm_ext.diffusers import FlowMatchEulerDiscreteGMMScheduler
    pipe.scheduler = FlowMatchEulerDiscreteGMMScheduler.from_config(
        pipe.scheduler.config, rfim_eta=1.0, gmm_variant="ortho-vub", seed=0
    )
"""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchEulerDiscreteSchedulerOutput,
)
from diffusers.utils.torch_utils import randn_tensor

from .._common import check_eta
from ._args import (
    check_positive,
    check_shift_terminal,
    check_step_arguments,
    check_timesteps_set,
    integer_timestep,
    stock_signature,
)
from ._base import (
    CheckedBeginIndexMixin,
    GMMSchedulerMixin,
    HostCounterIndexMixin,
    check_step_count,
    coefficient_rows,
    publish,
    python_value,
    scheduler_output,
)
from ._config import InitArgs, scheduler_init

__all__ = ["FlowMatchEulerDiscreteGMMScheduler", "FlowMatchEulerDiscreteSchedulerOutput"]


def fused_flow_step(scheduler, model_output, sample, i, gmm, noise, components, output_cls, return_dict: bool):
    """The fused step of a flow-matching scheduler at step ``i`` (the op's "flow" prediction; its output has no x0,
    so the op skips writing it: one pass less over memory), the host step counter advanced where ``i`` is a host
    int, and the sample in the model output's dtype (as the stock steps) as ``return_dict`` asks."""
    out = scheduler._fused_step(
        model_output,
        sample,
        i,
        prediction_type="flow",
        gmm=gmm,
        noise=noise,
        components=components,
        return_pred_original=False,
    )
    if not isinstance(i, torch.Tensor):
        scheduler._step_index += 1
    prev_sample = out.prev_sample
    if prev_sample.dtype != model_output.dtype:  # tested first: a .to that changes nothing still costs a call
        prev_sample = prev_sample.to(model_output.dtype)
    if not return_dict:
        return (prev_sample,)
    return scheduler_output(output_cls, prev_sample=prev_sample)


def flow_schedule(scheduler, stock_set_timesteps, num_inference_steps, device, sigmas, mu, timesteps) -> torch.Tensor:
    """A flow-matching scheduler's ``set_timesteps``: its arguments checked, the stock ``set_timesteps`` called, and
    the schedule's float64 sigmas (on the host) returned, checked to lie in [0, 1]."""
    if num_inference_steps is not None:
        num_inference_steps = check_step_count(num_inference_steps)
    elif sigmas is None and timesteps is None:
        raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
    for name, values in (("sigmas", sigmas), ("timesteps", timesteps)):
        if values is not None and len(values) == 0:
            raise ValueError(f"{name} must hold at least one value (one per inference step), got an empty {name}")
    stock_set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)
    sig = scheduler.sigmas.detach().to("cpu", torch.float64)
    if not torch.isfinite(sig).all() or (sig < 0).any() or (sig > 1).any():
        raise ValueError(f"the schedule's sigmas must lie in [0, 1], got {sig.tolist()[:8]}")
    return sig


class FlowMatchEulerDiscreteGMMScheduler(
    GMMSchedulerMixin, HostCounterIndexMixin, CheckedBeginIndexMixin, FlowMatchEulerDiscreteScheduler
):
    """``FlowMatchEulerDiscreteScheduler`` with the RFIM / RFIM-GMM kernel (Gabbur, TMLR 2026, section 4) and a
    fused step.

    Path and step. The model predicts the velocity v = eps - x0 on x_t = (1 - t) x0 + t eps, t = sigma. The step
    from sigma_i = t to sigma_(i+1) = s is

        x0 = x - t v,   eps = x + (1 - t) v,   x_s = (1 - s) x0 + sqrt(s^2 - c^2) eps + c z,   c = rfim_eta * s

    rfim_eta = 0 is the Euler step x + (s - t) v of the base class (with GMM off, outside ``torch.compile``, one
    ``torch.add``: the fused op's fixed cost is more than that step); rfim_eta = 1 is its ``stochastic_sampling``
    step (1 - s) x0 + s z. With GMM on, c z becomes delta_k + sqrt(max(c^2 - v_k, 0)) z (k ~ Categorical(pi)),
    which keeps E[x_s | x0] = (1 - s) x0 and the per-coordinate variance s^2 of the exact-velocity marginal; the
    GMM needs noise (rfim_eta > 0) to replace.

    Config: every key, default and method of the base class, plus ``rfim_eta`` in [0, 1] and the GMM keys of
    :class:`GMMSchedulerMixin`. ``stochastic_sampling=True`` is rfim_eta = 1 (an rfim_eta strictly between 0 and
    1 with it is refused as contradictory). With GMM off and rfim_eta = 0 the samples equal the base class's to
    float32 rounding; with ``stochastic_sampling`` and a ``generator``, the base class's noise is drawn the same
    way, so the samples match too.

    Randomness: with ``generator``, z (and the components k) are drawn from it as the base class draws its noise.
    Without, GMM off and ``seed=None``: z from torch's global RNG as the base class draws it (rfim_eta > 0 only).
    Otherwise z and k come from the Philox stream of (seed, sample index, step index) inside the fused step (no
    host sync, compiles with ``fullgraph=True``; ``seed=None``: the stream seed is drawn from torch's global RNG
    at the first step, or at ``prepare_gmm``).

    Step index: as the base class (the first ``step`` finds the timestep in the schedule, or starts at
    ``set_begin_index``; +1 per step). Under ``torch.compile`` the index is the timestep's first position in
    ``self.timesteps``, looked up on the device, so nothing about the step number is baked into the graph.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]

    @scheduler_init(FlowMatchEulerDiscreteScheduler, own={"rfim_eta": 0.0})
    def __init__(self, args: InitArgs) -> None:
        check_positive(args.shift, "shift")
        check_shift_terminal(args.shift_terminal)
        eta = check_eta(python_value(args.rfim_eta), "rfim_eta")  # a NumPy / 0-d tensor value as the number
        if args.stochastic_sampling and 0 < eta < 1:
            raise ValueError(
                f"stochastic_sampling=True is rfim_eta = 1; got rfim_eta={args.rfim_eta}: set one or the other"
            )
        super().__init__(**args.stock)
        self._init_gmm()

    @property
    def eta(self) -> float:
        """The RFIM noise level in use: 1 with ``stochastic_sampling``, else ``rfim_eta``."""
        return 1.0 if self.config.stochastic_sampling else float(self.config.rfim_eta)

    @stock_signature(FlowMatchEulerDiscreteScheduler.set_timesteps)
    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None) -> None:
        """As the base class; also builds on ``device`` the [n, 6] coefficient table of every step and picks
        the run's stream seed."""
        sig = flow_schedule(self, super().set_timesteps, num_inference_steps, device, sigmas, mu, timesteps)
        t, s = sig[:-1], sig[1:]
        self._run_eta = self.eta  # read once per schedule (a config lookup is a noticeable part of a step)
        # the Euler step's dt = s - t of every step, in the sigmas' dtype as the base class computes it
        sig32 = self.sigmas.detach().to("cpu")
        self._euler_dt = (sig32[1:] - sig32[:-1]).tolist()
        self._set_rows(
            coefficient_rows(1 - t, t, 1 - s, s, self._run_eta * s, self._final_step_g(len(t))).to(self.sigmas.device)
        )

    @stock_signature(FlowMatchEulerDiscreteScheduler.step)
    def step(
        self,
        model_output,
        timestep,
        sample,
        s_churn=0.0,
        s_tmin=0.0,
        s_tmax=float("inf"),
        s_noise=1.0,
        generator=None,
        per_token_timesteps=None,
        return_dict=True,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """One RFIM(-GMM) step from ``timestep`` to the next sigma; arguments and outputs as the base class
        (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise`` are accepted and unused, as there)."""
        check_timesteps_set(self._row_table is not None)
        if integer_timestep(timestep):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                f" `{type(self).__name__}.step()` is not supported. Make sure to pass"
                " one of the `scheduler.timesteps` as a timestep."
            )
        if per_token_timesteps is not None:
            if self.eta > 0 or self.gmm is not None or self.config.gmm_variant is not None:
                raise ValueError("per_token_timesteps is supported only with GMM off and rfim_eta = 0")
            return super().step(
                model_output,
                timestep,
                sample,
                generator=generator,
                per_token_timesteps=per_token_timesteps,
                return_dict=return_dict,
            )
        # a complex output would lose its imaginary part in the op
        generator = check_step_arguments(model_output, sample, generator, check_sample=True)
        if sample.dtype != torch.float32:
            # as the base class: the update in float32 (diffusers annotates sample as FloatTensor)
            sample = sample.to(torch.float32)
        i = self._index(timestep, sample.device)
        gmm = self._gmm_for(sample)
        if gmm is None and self._run_eta == 0 and not isinstance(i, torch.Tensor):
            # The deterministic step is x + (s - t) v: one torch.add moves the same bytes as the fused op (read x
            # and v, write x_s) without the op's fixed cost, which at small shapes exceeded the base class's two
            # eager ops. Under torch.compile (i a device tensor) the op's path stays.
            prev_sample = torch.add(sample, model_output, alpha=self._euler_dt[i])
            self._step_index += 1  # type: ignore[assignment,operator]  # diffusers types _step_index as None
            if prev_sample.dtype != model_output.dtype:
                prev_sample = prev_sample.to(model_output.dtype)
            if not return_dict:
                return (prev_sample,)
            return scheduler_output(FlowMatchEulerDiscreteSchedulerOutput, prev_sample=prev_sample)

        noise = None
        if self._run_eta > 0 and self._torch_noise(generator, gmm):  # as the base class's stochastic_sampling
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        components = self._gmm_components(generator, gmm, i, sample)
        return fused_flow_step(
            self, model_output, sample, i, gmm, noise, components, FlowMatchEulerDiscreteSchedulerOutput, return_dict
        )


publish(FlowMatchEulerDiscreteGMMScheduler, FlowMatchEulerDiscreteSchedulerOutput)
