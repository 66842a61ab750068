"""A drop-in scheduler's ``__init__``, made from its stock class's signature (:func:`scheduler_init`).

Diffusers reads a scheduler's config keys from ``inspect.signature(cls.__init__)`` (``register_to_config``,
``ConfigMixin.extract_init_dict`` / ``_get_init_keys``, ``from_config``): every key must be a parameter there, with
its default. A drop-in keeps every stock key and default and adds its own keys and the GMM keys; written by hand
that is the stock parameter list twice per scheduler (the signature, then ``key=key`` to the stock ``__init__``)
and the GMM keys once per scheduler. Here the signature is built once from the stock class and the GMM options.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from diffusers.configuration_utils import register_to_config

from ...gmm_options import CONFIG_KEYS, GMMOptions

__all__ = ["GMM_KEYS", "InitArgs", "scheduler_init"]

_FIELDS = {f.name: f for f in dataclasses.fields(GMMOptions)}
_PARAMETER = inspect.Parameter.POSITIONAL_OR_KEYWORD

#: the GMM config keys of a scheduler whose steps draw noise, in signature order, each with its GMMOptions default
GMM_KEYS: tuple[inspect.Parameter, ...] = tuple(
    inspect.Parameter(key, _PARAMETER, default=_FIELDS[field].default, annotation=_FIELDS[field].type)
    for field, key in CONFIG_KEYS.items()
)


class InitArgs:
    """The config keys of one ``__init__`` call, defaults applied, as attributes (``args.prediction_type``);
    :attr:`stock` holds those the stock class takes, to pass on as ``super().__init__(**args.stock)``."""

    def __init__(self, values: Mapping[str, Any], stock_keys: Sequence[str]) -> None:
        self.__dict__.update(values)
        self._stock = {key: values[key] for key in stock_keys}

    @property
    def stock(self) -> dict[str, Any]:
        return dict(self._stock)

    def __getattr__(self, name: str) -> Any:  # a key the signature lacks (typing: every key reads as Any)
        raise AttributeError(f"no config key {name!r}")


def _stock_parameters(stock: type) -> list[inspect.Parameter]:
    parameters = list(inspect.signature(stock.__init__).parameters.values())[1:]
    for p in parameters:
        if p.kind is not _PARAMETER or p.default is inspect.Parameter.empty:
            raise TypeError(f"{stock.__name__}.__init__ has {p.name!r} ({p.kind}): a config key needs a default")
    return parameters


def scheduler_init(
    stock: type, *, own: Mapping[str, Any] | None = None, gmm_keys: Sequence[str] | None = None
) -> Callable[[Callable[[Any, InitArgs], None]], Any]:
    """Decorator making a scheduler's ``__init__`` from its body ``setup(self, args: InitArgs)``.

    The ``__init__`` takes (and its ``__signature__`` lists, as diffusers reads it) every parameter of
    ``stock.__init__`` with the stock default, in the stock order, then ``own`` (this scheduler's keys, name ->
    default), then the GMM keys (:data:`GMM_KEYS`; ``gmm_keys``: only these names, e.g. ``("gmm_variant",)`` or
    ``()`` for a scheduler that takes no GMM). It is wrapped by diffusers' ``register_to_config``, so every key is
    in ``scheduler.config`` and survives ``save_pretrained`` / ``from_config``. The call binds its arguments to that
    signature (a TypeError for an unknown or repeated one, as a hand-written ``__init__`` raises) and runs
    ``setup``, which checks what it must, calls ``super().__init__(**args.stock)`` and sets its own state."""
    gmm = GMM_KEYS if gmm_keys is None else tuple(p for p in GMM_KEYS if p.name in gmm_keys)
    if gmm_keys is not None and len(gmm) != len(gmm_keys):
        raise ValueError(f"gmm_keys must name GMM config keys ({[p.name for p in GMM_KEYS]}), got {gmm_keys}")
    stock_parameters = _stock_parameters(stock)
    own_parameters = [inspect.Parameter(key, _PARAMETER, default=value) for key, value in (own or {}).items()]
    signature = inspect.Signature(
        [inspect.Parameter("self", _PARAMETER), *stock_parameters, *own_parameters, *gmm]
    )  # a key in two groups is a ValueError here ("duplicate parameter name")
    stock_keys = tuple(p.name for p in stock_parameters)

    def decorate(setup: Callable[[Any, InitArgs], None]) -> Any:  # Any: as register_to_config (untyped)
        def __init__(self, *args, **kwargs) -> None:
            try:
                bound = signature.bind(self, *args, **kwargs)
            except TypeError as error:
                raise TypeError(f"{type(self).__name__}.__init__() {error}") from None
            bound.apply_defaults()
            values = dict(bound.arguments)
            del values["self"]
            setup(self, InitArgs(values, stock_keys))

        __init__.__signature__ = signature
        for attribute in ("__module__", "__qualname__", "__doc__"):
            setattr(__init__, attribute, getattr(setup, attribute))
        return register_to_config(__init__)

    return decorate
