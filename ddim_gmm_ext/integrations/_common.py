"""What the sampler integrations share: argument checks, seeds, a sampler's GMM options, progress bars.

Seeds (one rule for every integration):

* ``seed`` an int: the GMM tables are built from it and the per-step noise / component draws come from the
  Philox stream of ``(seed, sample index, step index)`` (docs/design.md section 2): reproducible, and the same
  sample whatever the batch size or position.
* ``seed=None``: the tables are built from seed 0 and each sampling run draws its stream seed from torch's
  default CPU generator, so ``torch.manual_seed`` controls the run as it does for diffusers / k-diffusion.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from numbers import Real
from typing import TypeVar

import torch
from typing_extensions import Unpack

from ..gmm_options import GMMKwargs, GMMOptions

_Sampler = TypeVar("_Sampler", bound=Callable)


def check_eta(eta, name: str = "eta") -> float:
    """eta as a float in [0, 1] (beyond 1 the noise would exceed the noise level of the target time)."""
    if isinstance(eta, torch.Tensor) or not isinstance(eta, Real) or not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {eta!r}")
    return float(eta)


def check_loop_arguments(model, extra_args, callback, noise_sampler=None) -> Mapping:
    """A sampling loop's model, extra_args, callback and noise_sampler, checked before any work (each is first
    used inside the loop, where a bad one failed naming nothing): model callable, extra_args None or a mapping
    (the model's keyword arguments; returned, {} for None), callback and noise_sampler callable or None."""
    if not callable(model):
        raise TypeError(f"model must be callable (the denoiser), got {type(model).__name__}")
    if extra_args is not None and not isinstance(extra_args, Mapping):
        raise TypeError(
            f"extra_args must be None or a dict of the model's keyword arguments, got {type(extra_args).__name__}"
        )
    for name, value in (("callback", callback), ("noise_sampler", noise_sampler)):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable or None, got {type(value).__name__} {value!r}")
    return {} if extra_args is None else extra_args


def stream_seed(seed: int | None) -> int:
    """The Philox seed of one sampling run (see the module docstring)."""
    if seed is not None:
        return int(seed)  # a NumPy integer too (np.uint64 arithmetic overflows where int does not)
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def multistep_weights(order: int, k: tuple[float, float, float], r0: float, r1: float) -> tuple[float, ...]:
    """(w0, w1, w2): k0 D0 + k1 D1 + k2 D2 as weights of (m0, m1, m2), the data predictions of this step and the
    two before. Order 2: D1 = (m0 - m1) / r0. Order 3: D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
    D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1) (DPM-Solver++ paper, eq. 3.x).
    Shared by the diffusers scheduler and the k-diffusion samplers."""
    k0, k1, k2 = k
    if order == 1:
        return k0, 0.0, 0.0
    if order == 2:
        return k0 + k1 / r0, -k1 / r0, 0.0
    d10 = (1 / r0, -1 / r0, 0.0)
    d11 = (0.0, 1 / r1, -1 / r1)
    diff = [p - q for p, q in zip(d10, d11, strict=True)]
    d1 = [p + r0 / (r0 + r1) * q for p, q in zip(d10, diff, strict=True)]
    d2 = [q / (r0 + r1) for q in diff]
    return tuple(k0 * (j == 0) + k1 * p + k2 * q for j, (p, q) in enumerate(zip(d1, d2, strict=True)))


def sampler_options(gmm, extra_args: Mapping | None = None, **options: Unpack[GMMKwargs]) -> GMMOptions:
    """A sampler's ``gmm`` argument (None: off; a variant name; a :class:`GMM`) with its other GMM keyword
    arguments as one checked :class:`GMMOptions` (a GMM that is not one is refused when the run starts, against
    the sample). ``seed`` None: ``extra_args["seed"]`` when the sampler's ``extra_args`` has one (ComfyUI passes
    its seed there)."""
    if extra_args is not None and options.get("seed") is None:
        options["seed"] = extra_args.get("seed")
    if isinstance(gmm, str):
        return GMMOptions(variant=gmm, **options)
    return GMMOptions(tables=gmm, **options)


_GMM_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GMMOptions)}
#: a sampler function's GMM keywords as :func:`inspect.signature` shows them: keyword-only, GMMOptions' defaults
_GMM_KEYWORDS = tuple(
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=_GMM_DEFAULTS[name], annotation=annotation)
    for name, annotation in GMMKwargs.__annotations__.items()
)


def gmm_keywords(sampler: _Sampler) -> _Sampler:
    """Decorator of a sampler function whose GMM options are ``**gmm_options: Unpack[GMMKwargs]``: its signature
    lists them (keyword-only, with :class:`GMMOptions`' defaults: what ``inspect.signature`` and ``help`` show in
    place of ``**gmm_options``), and a keyword that is none of its parameters is Python's TypeError naming the
    function, before any work, as for a function that spells them out. One call per sampling run."""
    signature = inspect.signature(sampler)
    *own, rest = signature.parameters.values()
    if rest.kind is not inspect.Parameter.VAR_KEYWORD:
        raise TypeError(f"{sampler.__name__} must end with **gmm_options")
    signature = signature.replace(parameters=[*own, *_GMM_KEYWORDS])
    names = frozenset(signature.parameters)

    @functools.wraps(sampler)
    def checked(*args, **kwargs):
        for key in kwargs:
            if key not in names:
                raise TypeError(f"{sampler.__name__}() got an unexpected keyword argument {key!r}")
        return sampler(*args, **kwargs)

    checked.__signature__ = signature  # type: ignore[attr-defined]  # what inspect.signature returns
    return checked  # type: ignore[return-value]  # the same call signature as sampler


def progress_bar(iterable, disable: bool | None, desc: str):
    """A tqdm.auto bar over ``iterable``; ``disable`` as tqdm's (None: off when the output is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, disable=disable)
