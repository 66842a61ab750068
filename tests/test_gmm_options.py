"""GMMOptions, the README's GMM-options table against the non-diffusers samplers, DDIMSampler's old spellings."""

from __future__ import annotations

import dataclasses
import inspect
import pathlib
import warnings

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext import k_diffusion as kd
from ddim_gmm_ext.integrations import comfy

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
FUNCTIONS = {
    "sample_ddim_gmm": kd.sample_ddim_gmm,
    "sample_rfim_gmm": kd.sample_rfim_gmm,
    "sample_dpmpp_2m_gmm": kd.sample_dpmpp_2m_gmm,
    "sample_dpmpp_2m_sde_gmm": kd.sample_dpmpp_2m_sde_gmm,
    "sample_dpmpp_3m_sde_gmm": kd.sample_dpmpp_3m_sde_gmm,
    "sample_rfim": dg.sample_rfim,
}


def _table() -> dict[str, tuple[str, str]]:
    """The README's options table: option -> (function keyword, default cell)."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| option | functions"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = (cells[1].strip("`"), cells[-1])
    return rows


def _value(cell: str):
    return None if cell == "None" else cell.strip("`").strip('"') if cell.startswith("`") else float(cell)


def _variant_defaults() -> dict[str, str | None]:
    """The variant row's default cell: `"ortho-vub"`: names...; None: names... -> sampler name -> default."""
    on, off = _table()["variant"][1].split("; None:")
    names = {n.strip().strip("`"): "ortho-vub" for n in on.split(":", 1)[1].split(",")}
    names.update({n.strip().strip("`"): None for n in off.split(",")})
    return names


def _ldm_model():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0).float()
    return type("M", (), {"alphas_cumprod": abar, "apply_model": lambda self, x, t, c: torch.tanh(x)})()


def test_readme_table_defaults_are_the_samplers():
    # Checked to fail when sample_rfim's gmm default becomes "ortho-vub", when sample_ddim_gmm's n_components
    # default changes to 4, and when DDIMSampler's scale stops resolving None to 1.
    table, variants = _table(), _variant_defaults()
    for name, f in FUNCTIONS.items():
        params = inspect.signature(f).parameters
        assert params["gmm"].default == variants[name], name
        for option, (keyword, default) in table.items():
            if option != "variant":
                assert params[keyword].default == _value(default), (name, keyword)
    options = dg.DDIMSampler(_ldm_model()).gmm_options
    assert options.variant == variants["DDIMSampler"]
    for option, (keyword, default) in table.items():
        if option != "variant":
            assert getattr(options, keyword) == _value(default), ("DDIMSampler", keyword)
    assert comfy.VARIANTS[0] == "off" and variants["the nodes"] == "ortho-vub"


def test_each_sampler_builds_with_the_documented_options(monkeypatch):
    # Every non-diffusers sampler, called with the table's keywords, builds its tables from them. Checked to
    # fail when sampler_options drops scale_per_dim (the build gets scale=1) and when DDIMSampler passes
    # n_components=8 whatever it was given.
    builds = []
    create = dg.GMM.create
    monkeypatch.setattr(dg.GMM, "create", staticmethod(lambda *a, **k: builds.append(k) or create(*a, **k)))
    table = _table()
    documented = {table["K"][0]: 3, table["s / sqrt(D)"][0]: 0.25, table["last step"][0]: "gmm",
                  table["where it acts"][0]: [0, 2], table["seed"][0]: 7}  # fmt: skip
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([8.0, 3.0, 1.0, 0.3, 0.0])
    times = torch.tensor([1.0, 0.7, 0.4, 0.2, 0.0])
    runs = {
        "sample_ddim_gmm": lambda o: kd.sample_ddim_gmm(lambda v, s: torch.tanh(v), x, sigmas, eta=1.0, **o),
        "sample_rfim_gmm": lambda o: kd.sample_rfim_gmm(lambda v, s: 0.5 * v, x, times, eta=0.5, **o),
        "sample_dpmpp_2m_sde_gmm": lambda o: kd.sample_dpmpp_2m_sde_gmm(lambda v, s: torch.tanh(v), x, sigmas, **o),
        "sample_dpmpp_3m_sde_gmm": lambda o: kd.sample_dpmpp_3m_sde_gmm(lambda v, s: torch.tanh(v), x, sigmas, **o),
        "sample_rfim": lambda o: dg.sample_rfim(lambda v, t: -v, x, times, eta=0.5, progress=False, **o),
        "DDIMSampler": lambda o: dg.DDIMSampler(_ldm_model(), **o).sample(
            S=4, batch_size=2, shape=(16,), eta=1.0, x_T=x, progress=False
        ),
    }
    for name, run in runs.items():
        builds.clear()
        out = run({table["variant"][0]: "ortho", **documented})
        out = out[0] if isinstance(out, tuple) else out
        assert torch.isfinite(out).all(), name
        assert len(builds) == 1, name
        (k,) = builds
        assert (k["variant"], k["n_components"], k["scale_per_dim"], k["scale"], k["seed"]) == (
            "ortho", 3, 0.25, None, 7
        ), name  # fmt: skip
    builds.clear()
    kd.sample_dpmpp_2m_gmm(lambda v, s: torch.tanh(v), x, sigmas, **documented)  # deterministic: GMM off
    assert builds == []
    node = comfy.node_options(0.5, 1.0, "ortho", 3, 2.0, "matched")
    assert (node["gmm"], node["n_components"], node["scale"], node["gmm_steps"]) == ("ortho", 3, 2.0, "matched")


def test_ddim_sampler_old_gmm_spellings_warn_and_run_the_same():
    # gmm=True / gmm=False / gmm=True, gmm_params=tables keep working for one release with a DeprecationWarning
    # and sample exactly as the new spelling. Checked to fail when the warning is dropped and when gmm=True maps
    # to "ortho" instead of "ortho-vub".
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))

    def run(**options):
        sampler = dg.DDIMSampler(_ldm_model(), seed=5, **options)
        return sampler.sample(S=4, batch_size=2, shape=(16,), eta=1.0, x_T=x, progress=False)[0]

    tables = dg.GMM.create(16, n_components=3, n_steps=4, variant="ortho", seed=2)
    for old, new in (
        ({"gmm": True}, {"gmm": "ortho-vub"}),
        ({"gmm": False}, {"gmm": None}),
        ({"gmm": True, "gmm_params": tables}, {"gmm": tables}),
    ):
        with pytest.warns(DeprecationWarning, match="is deprecated: pass"):
            got = run(**old)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # the new spelling warns nothing
            expected = run(**new)
        assert torch.equal(got, expected), old
    with pytest.raises(ValueError, match="gmm_params given with gmm=False"):
        dg.DDIMSampler(_ldm_model(), gmm_params=tables)


def test_gmm_options_is_one_checked_value_with_one_final_step_rule():
    # Checked to fail when _checks.final_step_allows always allows (the last step keeps the mixture) and when
    # __post_init__ skips the final_step check.
    options = dg.GMMOptions(variant="ortho", n_components=2, seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.scale = 2.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="final_step must be one of"):
        options.replace(final_step="last")
    with pytest.raises(ValueError, match="n_components must be an int >= 1"):
        dg.GMMOptions(n_components=0)
    with pytest.raises(ValueError, match="pass scale or scale_per_dim, not both"):
        dg.GMMOptions(scale=2.0, scale_per_dim=0.1)
    x = torch.zeros(1, 8)
    gmm = options.resolve(x, 3)
    assert gmm is not None and gmm.dim == 8 and gmm.n_steps == 3
    c = [0.9, 0.5, 0.1]
    assert options.plan(gmm, c) == [gmm, gmm, None]
    assert options.replace(final_step="gmm").plan(gmm, c) == [gmm, gmm, gmm]
    assert options.replace(final_step="gmm", gmm_steps=[1]).plan(gmm, c) == [None, gmm, None]
    sampler = dg.DDIMSampler(_ldm_model(), gmm="ortho")
    sampler.final_step = "gmm"  # the old attributes replace the one value, checked
    assert sampler.gmm_options.final_step == "gmm"
    with pytest.raises(ValueError, match="final_step must be one of"):
        sampler.final_step = "last"


def test_from_config_reads_every_diffusers_scheduler_with_a_gmm():
    # The gmm_-prefixed config keys map onto GMMOptions' fields (what the diffusers schedulers adopt next).
    # Checked to fail when CONFIG_KEYS maps scale to "scale" (the config's default 1 read instead of 2.5) and when
    # from_config checks without the gmm_ prefix.
    import ddim_gmm_ext.diffusers as dd
    from ddim_gmm_ext.gmm_options import CONFIG_KEYS

    given = dict(variant="ortho", n_components=3, scale=2.5, share_across_steps=True, uniform_priors=False, seed=9,
                 final_step="gmm", gmm_steps=[0, 2])  # fmt: skip
    for cls in (dd.DDIMGMMScheduler, dd.DDPMGMMScheduler, dd.DPMSolverMultistepGMMScheduler,
                dd.EulerAncestralDiscreteGMMScheduler, dd.FlowMatchEulerDiscreteGMMScheduler):  # fmt: skip
        extra = {"algorithm_type": "sde-dpmsolver++"} if cls is dd.DPMSolverMultistepGMMScheduler else {}
        scheduler = cls(**{CONFIG_KEYS[k]: v for k, v in given.items()}, **extra)
        assert dg.GMMOptions.from_config(scheduler.config) == dg.GMMOptions(**given), cls.__name__
    with pytest.raises(ValueError, match="gmm_n_components must be an int >= 1"):
        dg.GMMOptions.from_config({"gmm_variant": "ortho", "gmm_n_components": 0})


def test_sampler_gmm_keywords_are_defined_once_and_an_unknown_one_is_named():
    # GMMKwargs (a sampler's **gmm_options) is GMMOptions' fields but variant / tables, with their types; every
    # public sampler's signature lists them keyword-only with GMMOptions' defaults, and a keyword none of its
    # parameters is Python's TypeError naming the sampler, before any work (the model is never called). Checked to
    # fail when a GMMKwargs field is retyped (uniform_priors: int), when gmm_keywords drops its keyword check
    # (GMMOptions.__init__()'s message instead), and when it lists the keywords without defaults.
    from ddim_gmm_ext.gmm_options import GMMKwargs, GMMOptions

    fields = {f.name: f for f in dataclasses.fields(GMMOptions) if f.name not in ("variant", "tables")}
    assert set(GMMKwargs.__annotations__) == set(fields)
    assert {k: getattr(v, "__forward_arg__", v) for k, v in GMMKwargs.__annotations__.items()} == {
        name: f.type for name, f in fields.items()
    }
    samplers = {name: getattr(kd, name) for name in dir(kd) if name.startswith("sample_")}
    samplers["sample_rfim"] = dg.sample_rfim
    assert len(samplers) == 11
    calls = []

    def model(x, sigma, **kwargs):
        calls.append(sigma)
        return x

    x, sigmas = torch.zeros(1, 4), torch.tensor([0.9, 0.5, 0.0])
    for name, sampler in samplers.items():
        params = inspect.signature(sampler).parameters
        for key, field in fields.items():
            assert params[key].kind is inspect.Parameter.KEYWORD_ONLY, (name, key)
            assert params[key].default == field.default, (name, key)
        with pytest.raises(TypeError, match=rf"^{name}\(\) got an unexpected keyword argument 'n_component'$"):
            sampler(model, x, sigmas, n_component=4)
    assert calls == []
