"""gmm_steps: where the mixture acts ("all", "matched", step indices, a mask), the one rule of which steps are
moment-matched (ddim_gmm_ext.gmm.matched_steps), every integration's option, and the per-step matched-noise
control of the quality tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext.gmm import clipped_fraction, gmm_step_mask, matched_steps, validate_gmm_steps

from .helpers import MC_SIGMAS, assert_close, assert_within

D, K = 6, 3


def _hand_gmm(vmax_per_step, shared=False):
    """A GMM whose step i has variance offsets of largest value vmax_per_step[i] (component 1, coordinate 2);
    the other entries are smaller, so a rule reading anything but the maximum is caught."""
    S = len(vmax_per_step)
    priors = torch.full((S, K), 1.0 / K, dtype=torch.float64)
    offsets = torch.zeros(S, K, D, dtype=torch.float64)
    var = torch.zeros(S, K, D, dtype=torch.float64)
    for i, v in enumerate(vmax_per_step):
        var[i] = 0.25 * v
        var[i, 1, 2] = v
    return dg.GMM.from_params(priors, offsets, var, n_steps=None if not shared else 4)


# step i: c_i^2 against g_i^2 vmax_i -> matched?
RULE_CASES = [
    # c,    g,   vmax, matched
    (0.5, 1.0, 0.25, True),  # equality: nothing clips
    (0.5, 1.0, 0.26, False),  # one direction of one component clips
    (0.1, 2.0, 0.0024, True),  # g^2 v = 0.0096 <= 0.01
    (0.1, 2.0, 0.003, False),  # g^2 v = 0.012 > 0.01 (matched if g were ignored)
    (0.0, 0.0, 5.0, True),  # a Gaussian step (g = 0) does not clip
    (0.3, 1.0, 0.2, False),  # c = 0.3 >= v but c^2 = 0.09 < v
]


def _check_rule(rule):
    c = [case[0] for case in RULE_CASES]
    g = [case[1] for case in RULE_CASES]
    gmm = _hand_gmm([case[2] for case in RULE_CASES])
    assert rule(gmm, c, g) == [case[3] for case in RULE_CASES]


def test_matched_steps_on_hand_built_tables():
    _check_rule(matched_steps)


@pytest.mark.parametrize(
    "mutant",
    [
        # the mean over components and coordinates instead of the maximum
        lambda gmm, c, g: [
            gi**2 * float(v) <= ci**2 for ci, gi, v in zip(c, g, gmm.var_offsets.mean((1, 2)), strict=True)
        ],
        # g ignored
        lambda gmm, c, g: matched_steps(gmm, c, 1.0),
        # c compared with v instead of c^2
        lambda gmm, c, g: [
            gi**2 * float(v) <= ci for ci, gi, v in zip(c, g, gmm.var_offsets.amax((1, 2)), strict=True)
        ],
        # strict inequality
        lambda gmm, c, g: [
            gi**2 * float(v) < ci**2 for ci, gi, v in zip(c, g, gmm.var_offsets.amax((1, 2)), strict=True)
        ],
    ],
)
def test_planted_rule_mutations_fail(mutant):
    with pytest.raises(AssertionError):
        _check_rule(mutant)


def test_shared_gmm_and_clipped_fraction():
    gmm = _hand_gmm([0.04], shared=True)  # one set for all 4 steps
    c = [0.5, 0.3, 0.1, 0.0]
    assert matched_steps(gmm, c) == [True, True, False, False]
    assert clipped_fraction(gmm, c) == 0.5
    assert clipped_fraction(gmm, c, [1, 1, 1, 0]) == pytest.approx(1 / 3)  # the Gaussian last step is left out
    assert clipped_fraction(gmm, c, 1.0, [True, True, False, False]) == 0.0
    assert math.isnan(clipped_fraction(gmm, c, 0.0))
    # the mask: the policy and g != 0 (final_step) both allow the mixture
    assert gmm_step_mask("matched", gmm, c, [1, 1, 1, 0]) == [True, True, False, False]
    assert gmm_step_mask("all", gmm, c, [1, 1, 1, 0]) == [True, True, True, False]
    assert gmm_step_mask([2, 3], gmm, c, [1, 1, 1, 0]) == [False, False, True, False]
    assert gmm_step_mask([True, False, True, False], gmm, c) == [True, False, True, False]


def test_ortho_lr_tables_follow_the_rule():
    # ORTHO-LR at s = 1, K = 8: the eigenvalues of the offsets' covariance over K pi_k; a late step clips.
    gmm = dg.GMM.create(64, n_components=8, n_steps=5, variant="ortho-lr", scale=1.0, seed=0, dtype=torch.float64)
    vmax = gmm.var_offsets.amax((1, 2))
    c = [2 * float(vmax[0]).__pow__(0.5), float(vmax[1]) ** 0.5, 0.055, 0.0, 0.0]
    assert matched_steps(gmm, c) == [True, True, False, False, False]


@pytest.mark.parametrize(
    ("value", "n_steps", "message"),
    [
        ("some", None, "gmm_steps must be one of"),
        (3, None, "gmm_steps must be one of"),
        ([0, 1.5], None, "gmm_steps must hold step indices"),
        ([0, "1"], None, "gmm_steps must hold step indices"),
        ([True, 1], None, "gmm_steps must hold step indices"),
        ([-1], None, r"gmm_steps step indices must be in >= 0"),
        ([0, 5], 5, r"gmm_steps step indices must be in \[0, 5\)"),
        ([True, False], 5, r"gmm_steps as a boolean mask must have one entry per step \(5\), got 2"),
    ],
)
def test_validation_names_the_argument(value, n_steps, message):
    with pytest.raises(ValueError, match=message):
        validate_gmm_steps(value, n_steps)


def test_validation_accepts_numpy_and_json_forms():
    assert validate_gmm_steps([np.int64(1), 3], 5) == (False, True, False, True, False)
    assert validate_gmm_steps(np.array([True, False]), 2) == (True, False)
    assert validate_gmm_steps((1,)) == (1,)
    assert validate_gmm_steps([], 2) == (False, False)
    assert validate_gmm_steps("matched", 2) == "matched"


# -- diffusers schedulers ---------------------------------------------------------------------------------------
def _schedulers():
    pytest.importorskip("diffusers")
    from ddim_gmm_ext.diffusers import (
        DDIMGMMScheduler,
        DDPMGMMScheduler,
        DPMSolverMultistepGMMScheduler,
        EulerAncestralDiscreteGMMScheduler,
        FlowMatchEulerDiscreteGMMScheduler,
    )

    return {
        "ddim": (DDIMGMMScheduler, {"clip_sample": False}, {"eta": 1.0}),
        "ddpm": (DDPMGMMScheduler, {"clip_sample": False}, {}),
        "euler_a": (EulerAncestralDiscreteGMMScheduler, {}, {}),
        "flow": (FlowMatchEulerDiscreteGMMScheduler, {"rfim_eta": 1.0}, {}),
        "dpm_sde": (DPMSolverMultistepGMMScheduler, {"algorithm_type": "sde-dpmsolver++"}, {}),
    }


SCHEDULERS = ["ddim", "ddpm", "euler_a", "flow", "dpm_sde"]
STEPS = 5


def _make(name, **config):
    cls, base, _ = _schedulers()[name]
    s = cls(**base, seed=7, **config)
    s.set_timesteps(STEPS)
    return s


def _loop(name, schedulers, pick=lambda i: 0):
    """One loop over the schedule: every scheduler steps the same x at each step (their step counters stay
    aligned); the output of schedulers[pick(i)] goes on."""
    kwargs = _schedulers()[name][2]
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    for i, t in enumerate(schedulers[0].timesteps):
        outs = [s.step(0.5 * torch.tanh(x), t, x, **kwargs).prev_sample for s in schedulers]
        x = outs[pick(i)]
    return x


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_matched_without_a_matched_step_is_the_gmm_off_loop(name):
    # s = 100: g^2 v ~ 1e4 / K beyond every c^2 <= 1 (c <= b_s), so no step is matched
    options = dict(gmm_variant="ortho", gmm_n_components=3, gmm_scale=100.0)
    matched = _make(name, gmm_steps="matched", **options)
    off = _loop(name, [_make(name)])
    assert torch.equal(_loop(name, [matched]), off)
    assert (matched._rows[:, 5] == 0).all()  # noqa: SLF001  decided at the first step, in the g column
    assert not torch.equal(_loop(name, [_make(name, **options)]), off)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", [[1, 3], [False, True, False, True, False]])
def test_scheduler_explicit_steps_apply_the_mixture_there_only(name, steps):
    options = dict(gmm_variant="ortho", gmm_n_components=3, gmm_scale=2.0, final_step="gmm")
    gated = _loop(name, [_make(name, gmm_steps=steps, **options)])
    # the reference: the GMM scheduler's output at steps 1 and 3, the GMM-off scheduler's elsewhere
    hybrid = _loop(name, [_make(name, **options), _make(name)], pick=lambda i: 0 if i in (1, 3) else 1)
    assert torch.equal(gated, hybrid)


def test_scheduler_matched_depends_on_eta_and_survives_a_json_round_trip(tmp_path):
    from ddim_gmm_ext.diffusers import DDIMGMMScheduler

    s = _make("ddim", gmm_variant="ortho-lr", gmm_n_components=3, gmm_steps="matched")
    s.prepare_gmm(torch.zeros(2, 3, 4, 4))
    a, b = s._row_table.rows(0.0)[:, 5], s._row_table.rows(1.0)[:, 5]  # noqa: SLF001
    assert (a == 0).all() and a.shape == (STEPS,)  # eta 0: c = 0, every step clips
    c = s._row_table.rows(1.0)[:, 4]  # noqa: SLF001
    assert (b != 0).tolist() == [m and i < STEPS - 1 for i, m in enumerate(matched_steps(s.gmm, c))]
    for value in ([1, 3], [False, True, False, True, False], "matched"):
        s = _make("ddim", gmm_variant="ortho", gmm_n_components=3, gmm_steps=value)
        s.save_pretrained(tmp_path)
        loaded = DDIMGMMScheduler.from_pretrained(tmp_path)
        assert loaded.config.gmm_steps == (list(value) if isinstance(value, list) else value)
        loaded.set_timesteps(STEPS)
        assert torch.equal(_loop("ddim", [loaded]), _loop("ddim", [s]))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_validation_names_gmm_steps(name):
    cls, base, _ = _schedulers()[name]
    with pytest.raises(ValueError, match="gmm_steps must be one of"):
        cls(**base, gmm_steps="clipped")
    with pytest.raises(ValueError, match="gmm_steps must hold step indices"):
        cls(**base, gmm_steps=[0.5])
    s = cls(**base, gmm_variant="ortho", gmm_steps=[0, STEPS])
    with pytest.raises(ValueError, match=r"gmm_steps step indices must be in \[0, 5\)"):
        s.set_timesteps(STEPS)


# -- samplers -------------------------------------------------------------------------------------------------
def _zeroed(gmm: dg.GMM, keep) -> dg.GMM:
    """``gmm`` with offsets and variance offsets zeroed outside the sets ``keep``: the mixture only there."""
    priors, offsets, var, _ = gmm.tables(torch.zeros(1, dtype=gmm.dtype))
    mask = torch.zeros(offsets.shape[0], 1, 1, dtype=offsets.dtype)
    mask[list(keep)] = 1
    return dg.GMM.from_params(priors, offsets * mask, var * mask)


def _ldm_model():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0).float()
    return type("M", (), {"alphas_cumprod": abar, "apply_model": lambda self, x, t, c: torch.tanh(x)})()


def _sampler_runs():
    """name -> run(gmm, gmm_steps) -> final x; gmm None (off) or a GMM for the 4 steps of every sampler."""
    from ddim_gmm_ext.k_diffusion import (
        sample_ddim_gmm,
        sample_dpmpp_2m_sde_gmm,
        sample_dpmpp_3m_sde_gmm,
        sample_rfim_gmm,
    )

    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    kd = dict(eta=1.0, seed=3, disable=True, final_step="gmm")
    ve_sigmas, flow_sigmas = torch.tensor([8.0, 2.0, 0.7, 0.2, 0.0]), torch.tensor([1.0, 0.7, 0.45, 0.2, 0.0])
    times = dg.reference.rf_times(4)

    def ldm(gmm, steps):
        sampler = dg.DDIMSampler(_ldm_model(), gmm=gmm, seed=3, final_step="gmm",
                                 gmm_steps=steps)  # fmt: skip
        return sampler.sample(4, 2, (1, 4, 4), x_T=x.reshape(2, 1, 4, 4), eta=1.0, progress=False)[0].reshape(2, 16)

    return {
        "sample_ddim_gmm": lambda gmm, steps: sample_ddim_gmm(
            lambda x, s: torch.tanh(x), x, ve_sigmas, gmm=gmm, gmm_steps=steps, **kd
        ),
        "sample_rfim_gmm": lambda gmm, steps: sample_rfim_gmm(
            lambda x, s: torch.tanh(x), x, flow_sigmas, gmm=gmm, gmm_steps=steps, **kd
        ),
        "sample_rfim": lambda gmm, steps: dg.sample_rfim(
            lambda x, t: torch.tanh(x),
            x,
            times,
            eta=1.0,
            gmm=gmm,
            seed=3,
            progress=False,
            final_step="gmm",
            gmm_steps=steps,
        ),
        "DDIMSampler": ldm,
        "sample_dpmpp_2m_sde_gmm": lambda gmm, steps: sample_dpmpp_2m_sde_gmm(
            lambda x, s: torch.tanh(x), x, ve_sigmas, gmm=gmm, gmm_steps=steps, **kd
        ),
        "sample_dpmpp_3m_sde_gmm": lambda gmm, steps: sample_dpmpp_3m_sde_gmm(
            lambda x, s: torch.tanh(x), x, ve_sigmas, gmm=gmm, gmm_steps=steps, **kd
        ),
    }


SAMPLERS = [
    "sample_ddim_gmm",
    "sample_rfim_gmm",
    "sample_rfim",
    "DDIMSampler",
    "sample_dpmpp_2m_sde_gmm",
    "sample_dpmpp_3m_sde_gmm",
]


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_honours_gmm_steps(name):
    run = _sampler_runs()[name]
    big = dg.GMM.create(16, n_components=3, n_steps=4, variant="ortho", scale=50.0, seed=3)
    off = run(None, "all")
    assert torch.equal(run(big, "matched"), off)  # s = 50: no step is matched
    assert not torch.equal(run(big, "all"), off)
    gmm = dg.GMM.create(16, n_components=3, n_steps=4, variant="ortho", scale=2.0, seed=3)
    only = run(_zeroed(gmm, [1, 2]), "all")  # the mixture on steps 1 and 2 only, by its tables
    assert_close(run(gmm, [1, 2]), only, kind="exact")
    assert_close(run(gmm, [False, True, True, False]), only, kind="exact")
    with pytest.raises(ValueError, match=r"gmm_steps step indices must be in \[0, 4\)"):
        run(gmm, [4])


def test_comfy_node_option():
    from ddim_gmm_ext.integrations.comfy import node_options

    assert node_options(0.5, 1.0, "ortho", 3, 1.0, "matched")["gmm_steps"] == "matched"
    with pytest.raises(ValueError, match="gmm_steps must be one of"):
        node_options(0.5, 1.0, "ortho", 3, 1.0, "some")


# -- the per-step matched-noise control ----------------------------------------------------------------------
def test_matched_noise_control_adds_the_offsets_variance_at_its_steps():
    from ddim_gmm_ext.quality.sampling import CONTROL_STEP, MatchedNoise, _add_control_noise, offset_variance

    gmm = dg.GMM.create(8, n_components=4, n_steps=3, variant="rand", scale=2.0, seed=1, dtype=torch.float64)
    x = torch.zeros(40_000, 8, dtype=torch.float64)
    control = MatchedNoise(gmm, (False, True, False))
    assert torch.equal(_add_control_noise(x, control, 0, seed=5), x)  # no mixture step: nothing added
    added = _add_control_noise(x, control, 1, seed=5)
    # closed form: the variance of the offset g delta_k, k ~ pi (centred offsets, g = 1)
    priors, offsets = gmm.priors[1], gmm.offsets[1]
    mean = (priors[:, None] * offsets).sum(0)
    target = (priors[:, None] * (offsets - mean) ** 2).sum(0)
    assert_close(offset_variance(gmm, 1, x), target, kind="f64_moments")
    # Monte Carlo: the added noise has that variance (se of a variance estimate: var sqrt(2 / N))
    var = added.var(0)
    assert_within(var, target, atol=MC_SIGMAS * float(target.max()) * (2 / len(x)) ** 0.5)
    assert_within(added.mean(0), torch.zeros(8, dtype=torch.float64),
                  atol=MC_SIGMAS * float(target.max().sqrt()) / len(x) ** 0.5)  # fmt: skip
    # independent of the sampling steps' noise: a Philox step index beyond them
    z = dg.reference.gaussian_noise(x.shape, 5, 0, 1, torch.float64)
    assert abs(float((added * z).mean())) < MC_SIGMAS * float(target.max().sqrt()) / len(x) ** 0.5
    assert CONTROL_STEP >= 2**31


def test_eval_entries_pair_each_gmm_with_its_control():
    from ddim_gmm_ext.quality import evaluate
    from ddim_gmm_ext.quality.sampling import MatchedNoise, ddim_noise_stds, make_gmms, samplers

    sweep = evaluate.Sweep(steps=(5,), etas=(1.0,), variants=("ortho-lr",), scales=(1.0,), gmm_steps=("all", "matched"))
    sampler_list = list(samplers(sweep.scales, sweep.variants, "DDIM"))
    gmms = make_gmms(sampler_list, 64, 8, 5, 0)
    entries, policies, clips = evaluate.policy_entries(sweep, sampler_list, gmms, 5, 1.0, "DDIM")
    assert [e[1] for e in entries] == [None, "ortho-lr", "noise~ortho-lr", "ortho-lr@matched", "noise~ortho-lr@matched"]
    stds, g = ddim_noise_stds(5, 1.0), [1, 1, 1, 1, 0]
    for (_, _, _, gmm), (_, _, _, control), policy in zip(entries[1::2], entries[2::2], policies[1::2], strict=True):
        assert isinstance(control, MatchedNoise) and control.gmm is gmm
        assert list(control.acts) == gmm_step_mask(policy, gmm, stds, g)
    assert clips[1] == clipped_fraction(gmm, stds, g) and clips[1] > 0  # the second-to-last step clips
    assert clips[3] == 0.0 and clips[0] is None and clips[2] is None


def test_eval_selection_seeds_must_be_disjoint():
    from ddim_gmm_ext.quality import evaluate

    with pytest.raises(ValueError, match=r"select_seeds must be disjoint from seeds .* \[1\]"):
        evaluate.Sweep(seeds=(0, 1), select_seeds=(1, 2)).check()
    with pytest.raises(ValueError, match="gmm_steps must be one of"):
        evaluate.Sweep(gmm_steps=("some",)).check()


def test_dpm_restart_mid_schedule_keeps_gmm_steps():
    # A run that starts mid-schedule rebuilds the DPM rows (diffusers restarts its order count there): the policy
    # must survive the rebuild (mutation checked: installing the rebuilt rows ungated puts g = 1 back on every step)
    s = _make("dpm_sde", gmm_variant="ortho", gmm_n_components=3, gmm_steps=[1, 3], final_step="gmm")
    s.set_begin_index(2)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    s.step(0.5 * torch.tanh(x), s.timesteps[2], x)
    assert s._rows[:, 5].tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]  # noqa: SLF001
