"""The output dataclass of a scheduler step, built by hand: diffusers' ``BaseOutput`` construction runs a generic
``__post_init__`` that costs about a quarter of a small fused step on CPU, and its field lookup fails inside a
graph Dynamo compiles."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch

_OUTPUT_FIELDS: dict[type, tuple[str, ...] | None] = {}
_FIELD_SETS: dict[type, frozenset[str]] = {}  # the same names as a set: what a call's keywords are compared with


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
        if names is not None:
            _FIELD_SETS[cls] = frozenset(names)
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
    if names is None or values.keys() != _FIELD_SETS[cls] or isinstance(values[names[0]], dict):
        return cls(**values)
    out = cls.__new__(cls)
    OrderedDict.__init__(out)
    for name in names:
        value = values[name]
        if value is not None:
            OrderedDict.__setitem__(out, name, value)
        object.__setattr__(out, name, value)
    return out
