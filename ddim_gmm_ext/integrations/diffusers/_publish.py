"""The registration of a drop-in scheduler with diffusers (what importing ``ddim_gmm_ext.diffusers`` does)."""

from __future__ import annotations

from ._output import output_fields


def publish(cls, output_cls) -> None:
    """What importing ``ddim_gmm_ext.diffusers`` does for a scheduler ``cls``; no stock class changes behaviour:

    * ``cls.__module__`` is the public ``ddim_gmm_ext.diffusers``: ``save_pretrained`` records the component as
      ["ddim_gmm_ext.diffusers", name] and ``from_pretrained`` resolves it there once the module is imported;
    * ``diffusers.<cls name>`` is set (a new name in diffusers' namespace, where diffusers resolves the class
      named in a saved config: a stock scheduler loading our config then drops the GMM keys quietly, and
      ``cls.compatibles`` lists ``cls``);
    * the fields of its output dataclass ``output_cls`` are looked up now (see :func:`output_fields`).

    Listing ``cls`` in the stock schedulers' ``compatibles`` changes stock classes: that is
    :func:`ddim_gmm_ext.diffusers.patch_diffusers`'s, an explicit call."""
    import diffusers

    cls.__module__ = "ddim_gmm_ext.diffusers"
    setattr(diffusers, cls.__name__, cls)
    output_fields(output_cls)
