"""The drop-in schedulers' ``__init__`` signatures, as diffusers reads them (``inspect.signature(cls.__init__)``):
every stock config key with the stock default, in the stock order, then the scheduler's own keys and its GMM keys
with the defaults of :class:`ddim_gmm_ext.gmm_options.GMMOptions`; every key in ``scheduler.config`` and back
through ``save_pretrained`` / ``from_pretrained``.

Checked to fail when ``_config.scheduler_init`` leaves out the stock class's last parameter
(``stock_parameters[:-1]``: the stock key vanishes from the signature and the config) and when it leaves out the
last GMM key (``GMM_KEYS[:-1]``: ``gmm_steps`` vanishes)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

pytest.importorskip("diffusers")

from ddim_gmm_ext.gmm_options import CONFIG_KEYS, GMMOptions  # noqa: E402
from ddim_gmm_ext.integrations import diffusers as dd  # noqa: E402

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GMMOptions)}
ALL_GMM = {key: _DEFAULTS[field] for field, key in CONFIG_KEYS.items()}

#: per scheduler: the keys it adds after the stock ones (its own, then the GMM keys), written out here, not
#: taken from the code under test
ADDED = {
    "DDIMGMMScheduler": ALL_GMM,
    "DDPMGMMScheduler": ALL_GMM,
    "DPMSolverMultistepGMMScheduler": ALL_GMM,
    "DPMSolverSDEGMMScheduler": ALL_GMM,
    "EDMDPMSolverMultistepGMMScheduler": ALL_GMM,
    "EDMEulerGMMScheduler": {},
    "EulerAncestralDiscreteGMMScheduler": ALL_GMM,
    "EulerDiscreteGMMScheduler": {},
    "FlowMatchEulerDiscreteGMMScheduler": {"rfim_eta": 0.0, **ALL_GMM},
    "FlowMatchLCMGMMScheduler": ALL_GMM,
    "LCMGMMScheduler": ALL_GMM,
    "TCDGMMScheduler": ALL_GMM,
    "UniPCMultistepGMMScheduler": {"gmm_variant": None},
}


def _schedulers():
    return sorted(dd._STOCK.items(), key=lambda item: item[0].__name__)


def _parameters(cls) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(cls.__init__).parameters.values()][1:]


def test_every_scheduler_is_listed():
    assert sorted(cls.__name__ for cls, _ in _schedulers()) == sorted(ADDED)
    assert set(ALL_GMM) == {
        "gmm_variant",
        "gmm_n_components",
        "gmm_scale",
        "gmm_share_across_steps",
        "gmm_uniform_priors",
        "seed",
        "gmm_scale_per_dim",
        "final_step",
        "gmm_steps",
    }


@pytest.mark.parametrize("cls, stock_name", _schedulers(), ids=lambda v: getattr(v, "__name__", None))
def test_signature_lists_every_stock_and_gmm_key(cls, stock_name, tmp_path):
    import diffusers

    stock = getattr(diffusers, stock_name)
    stock_parameters = _parameters(stock)
    expected = stock_parameters + list(ADDED[cls.__name__].items())
    parameters = _parameters(cls)
    assert [name for name, _ in parameters] == [name for name, _ in expected]
    for (name, default), (_, want) in zip(parameters, expected, strict=True):
        assert default == want or (default != default and want != want), name  # NaN-safe
        kind = inspect.signature(cls.__init__).parameters[name].kind
        assert kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
    # what ConfigMixin reads from the signature: every key is a config key, with its default, and survives the
    # save / load round trip
    keys = [name for name, _ in expected]
    assert cls._get_init_keys(cls) == {"self", *keys}
    scheduler = cls()
    assert [k for k in scheduler.config if not k.startswith("_")] == keys
    scheduler.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in scheduler.config.items() if not k.startswith("_")
    }


@pytest.mark.parametrize(
    "cls", [dd.DDIMGMMScheduler, dd.FlowMatchEulerDiscreteGMMScheduler, dd.UniPCMultistepGMMScheduler]
)
def test_given_keys_reach_the_config_and_the_stock_class(cls):
    scheduler = cls(500, **({"gmm_variant": "ortho"} if "gmm_n_components" in ADDED[cls.__name__] else {}))
    assert scheduler.config["num_train_timesteps"] == 500  # positional: the stock order
    trained = scheduler.alphas_cumprod if hasattr(scheduler, "alphas_cumprod") else scheduler.sigmas
    assert len(trained) == 500  # the stock __init__ got it
    if "gmm_n_components" in ADDED[cls.__name__]:
        assert scheduler.config.gmm_variant == "ortho"
    with pytest.raises(
        TypeError, match=rf"^{cls.__name__}\.__init__\(\) got an unexpected keyword argument 'gmm_nope'"
    ):
        cls(gmm_nope=1)
    with pytest.raises(TypeError, match="multiple values for argument 'num_train_timesteps'"):
        cls(500, num_train_timesteps=500)


@pytest.mark.parametrize("method", ["step", "set_timesteps"])
@pytest.mark.parametrize("cls, stock_name", _schedulers(), ids=lambda v: getattr(v, "__name__", None))
def test_public_methods_take_the_stock_parameters(cls, stock_name, method):
    # step / set_timesteps as diffusers pipelines read them (prepare_extra_step_kwargs passes eta and generator only
    # where inspect.signature(scheduler.step) names them): the stock method's names, order, kinds and defaults, and
    # its annotations (stock_signature). Checked to fail when TCDGMMScheduler.step's eta default becomes 0.5, when
    # LCMGMMScheduler.step takes return_dict before generator, and when DDPMGMMScheduler.step loses its
    # stock_signature decorator (its annotations are then its own).
    import diffusers

    ours = inspect.signature(getattr(cls, method))
    stock = inspect.signature(getattr(getattr(diffusers, stock_name), method))
    assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
        (p.name, p.kind, p.default) for p in stock.parameters.values()
    ]
    assert ours == stock
