"""The argument rules of the diffusers schedulers' public calls (config values, step counts, begin indices,
generators, model outputs), each defined once; a leaf of the package's diffusers integration."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from numbers import Integral, Real
from typing import TypeVar

import numpy as np
import torch

_Method = TypeVar("_Method", bound=Callable)


def python_value(value):
    """``value`` with NumPy scalars / arrays and tensors made Python numbers and lists (a tuple becomes a list),
    as a config key stores it: ``save_pretrained`` writes JSON, and the JSON round trip gives the same value."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()  # a 0-d one gives a number
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [python_value(v) for v in value]
    return value


def stock_signature(stock: Callable) -> Callable[[_Method], _Method]:
    """Decorator of a drop-in's public ``step`` / ``set_timesteps``: the method takes ``stock``'s parameters, its stock
    class's method's (the same names, order, kinds and defaults, written in its ``def``: diffusers pipelines read
    them with ``inspect.signature``, ``prepare_extra_step_kwargs`` passing ``eta`` and ``generator`` only where the
    step names them; a test holds every drop-in's equal to its stock class's), and carries the stock's annotations,
    read from the stock method rather than copied into each drop-in. The method itself is returned: no call is
    added to a step."""

    def decorate(method: _Method) -> _Method:
        names = inspect.signature(method).parameters.keys()
        method.__annotations__ = {k: v for k, v in stock.__annotations__.items() if k in names or k == "return"}
        return method

    return decorate


def check_begin_index(begin_index) -> int:
    """``set_begin_index``'s argument: an int >= 0, the position of the run's first step (stock diffusers stores
    any value; -1 would index the schedule from its end)."""
    if isinstance(begin_index, bool) or not isinstance(begin_index, Integral) or begin_index < 0:
        raise ValueError(
            f"begin_index must be an int >= 0 (the position in scheduler.timesteps of the run's first step), "
            f"got {begin_index!r}"
        )
    return int(begin_index)


class CheckedBeginIndexMixin:
    """``set_begin_index`` of a stock scheduler that has one, with its argument checked (:func:`check_begin_index`)
    when it is given, not at the step that reads it. Listed before the stock class."""

    def set_begin_index(self, begin_index: int = 0) -> None:
        super().set_begin_index(check_begin_index(begin_index))


def check_host_step(i: int, n_steps: int) -> None:
    """A host step counter past the schedule (a loop run again without ``set_timesteps``): the call to make."""
    if not 0 <= i < n_steps:
        raise ValueError(
            f"step {i} is past the end of the {n_steps}-step schedule; call set_timesteps before sampling again"
        )


def check_timesteps_set(ready: bool) -> None:
    """A step before ``set_timesteps`` (``ready`` False): diffusers' own ValueError, word for word."""
    if not ready:
        raise ValueError(
            "Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler"
        )


def check_sample_tensor(sample) -> None:
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"sample must be a torch.Tensor, got {type(sample).__name__}")


def check_step_count(value, name: str = "num_inference_steps") -> int:
    """A step count as a positive int (bool refused: True is not a step count)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def check_optional_step_count(value) -> int | None:
    """``set_timesteps``'s ``num_inference_steps`` where the stock class also takes ``timesteps`` or ``sigmas``
    instead: None passes (the stock class counts those), else :func:`check_step_count`."""
    return None if value is None else check_step_count(value)


def check_generator(generator, batch: int):
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


def check_model_output(model_output, sample: torch.Tensor, name: str = "model_output") -> None:
    """The model output of a fused step: a real floating tensor of the sample's shape (checked before any noise is
    drawn for it, so that an error names the caller's argument)."""
    # dtype.is_floating_point, not the tensor method: an attribute costs half a method call (this runs every step)
    if not isinstance(model_output, torch.Tensor) or not model_output.dtype.is_floating_point:
        what = model_output.dtype if isinstance(model_output, torch.Tensor) else type(model_output).__name__
        raise TypeError(f"{name} must be a real floating-point tensor, got {what}")
    if model_output.shape != sample.shape:
        raise ValueError(f"{name} must have the sample's shape {tuple(sample.shape)}, got {tuple(model_output.shape)}")


def check_step_arguments(model_output, sample, generator, *, check_sample: bool = False):
    """A fused step's arguments, before any noise is drawn: with ``check_sample`` the sample (a real floating tensor
    with a batch dimension: the flow-matching steps, whose stock step casts it to float32), then the model output
    (:func:`check_model_output`) and the generator, returned as the step uses it (:func:`check_generator`)."""
    if check_sample and (
        not isinstance(sample, torch.Tensor) or not sample.dtype.is_floating_point or sample.ndim == 0
    ):
        what = (
            f"a {sample.dtype} tensor of shape {tuple(sample.shape)}"
            if isinstance(sample, torch.Tensor)
            else type(sample).__name__
        )
        raise ValueError(f"sample must be a real floating-point tensor with a batch dimension, got {what}")
    check_model_output(model_output, sample)
    return None if generator is None else check_generator(generator, sample.shape[0])


def integer_timestep(timestep) -> bool:
    """Whether a flow-matching step's ``timestep`` is an integer index (an int or an integer tensor; a bool
    too, an int to Python and to torch alike), which the stock flow-matching steps do not take as a sigma."""
    if isinstance(timestep, int):
        return True
    if isinstance(timestep, torch.Tensor):
        dtype = timestep.dtype
        return not (dtype.is_floating_point or dtype.is_complex)
    return False


def check_solver_order(value, *, up_to_3: bool = False) -> None:
    """A multistep solver's ``solver_order``: an int >= 1 (a bool refused: True is not an order); with ``up_to_3``,
    where the fused step's solver has orders 1 to 3 only, one of those."""
    bad = isinstance(value, bool) or not isinstance(value, Integral) or value < 1
    if up_to_3 and (bad or value > 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {value!r}")
    if bad:
        raise ValueError(f"solver_order must be an int >= 1, got {value!r}")


def check_positive(value, name: str) -> None:
    """A finite real number > 0 (a bool refused)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and float(value) > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_shift_terminal(value) -> None:
    """A flow-matching ``shift_terminal``: None, or where the shifted schedule ends, a number in [0, 1)."""
    if value is not None and not (isinstance(value, Real) and 0 <= float(value) < 1):
        raise ValueError(f"shift_terminal must be None or a number in [0, 1), got {value!r}")


def check_betas(betas: torch.Tensor, trained_betas, beta_schedule: str, n_train: int) -> None:
    """The training betas in [0, 1] (beta_end = 2 makes alphas negative: the stock step takes square roots of
    negative alpha_bar and returns NaN) and ``trained_betas`` of num_train_timesteps values."""
    if trained_betas is not None and len(trained_betas) != n_train:
        raise ValueError(f"trained_betas must have num_train_timesteps={n_train} values, got {len(trained_betas)}")
    b = betas.double()
    if not (torch.isfinite(b).all() and (b >= 0).all() and (b <= 1).all()):
        source = "trained_betas" if trained_betas is not None else f"beta_start / beta_end ({beta_schedule})"
        raise ValueError(f"{source} must give betas in [0, 1], got values in [{b.min().item()}, {b.max().item()}]")
