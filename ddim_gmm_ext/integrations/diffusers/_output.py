"""The output dataclass of a scheduler step, built by hand: diffusers' ``BaseOutput`` construction runs a generic
``__post_init__`` that costs about a quarter of a small fused step on CPU, and its field lookup fails inside a
graph Dynamo compiles."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch

_OUTPUT_FIELDS: dict[type, tuple[str, ...] | None] = {}
_MISSING = object()


def output_fields(cls) -> tuple[str, ...] | None:
    """The field names of a diffusers output dataclass whose construction is ``BaseOutput``'s (None otherwise),
    cached. Looked up eagerly when a scheduler module is imported (:func:`publish`): ``dataclasses.fields`` inside
    a graph Dynamo compiles fails ("dataclass fields failure"), a dict lookup does not."""
    names = _OUTPUT_FIELDS.get(cls, ())
    if names == ():
        from diffusers.utils import BaseOutput

        standard = all(
            getattr(cls, m) is getattr(BaseOutput, m) for m in ("__post_init__", "__setattr__", "__setitem__")
        )
        names = _OUTPUT_FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls)) if standard else None
    return names


def scheduler_output(cls, **values):
    """``cls(**values)`` for a diffusers output dataclass, built without ``BaseOutput``'s generic
    ``__post_init__`` (about a quarter of a small fused step on CPU): the same entries (the non-None fields, in
    field order) and attributes (every field). Falls back to ``cls(**values)`` for a class whose construction
    is not ``BaseOutput``'s, a class not looked up before a compiled call, or a call that is not one value per
    field."""
    names = _OUTPUT_FIELDS.get(cls, ())
    if names == ():
        names = None if torch.compiler.is_compiling() else output_fields(cls)
    if names is None or len(values) != len(names) or isinstance(values.get(names[0]), dict):
        return cls(**values)
    out = cls.__new__(cls)  # an empty OrderedDict (its __init__ with no arguments adds nothing)
    for name in names:
        value = values.get(name, _MISSING)
        if value is _MISSING:  # as many values as fields, but not these fields' values
            return cls(**values)
        # BaseOutput's own __setitem__ / __setattr__ each set the other as well: the base classes' set one (called
        # by their names, which Dynamo traces)
        if value is not None:
            OrderedDict.__setitem__(out, name, value)
        object.__setattr__(out, name, value)
    return out
