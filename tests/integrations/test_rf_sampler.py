"""sample_rfim: the RFIM marginal oracle, Euler integration at eta = 0, options and bad input."""

import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext import sample_rfim
from tests.helpers import MC_SIGMAS

D = 6


def _oracle(x0):
    """The exact velocity of x_t = (1 - t) x0 + t eps for a known x0: v = eps - x0 = (x - x0) / t."""
    return lambda x, t: (x - x0) / t[:, None]


@pytest.mark.parametrize("eta, gmm", [(0.0, None), (0.5, None), (1.0, None), (1.0, "rand"), (0.9, "ortho")])
def test_marginal_oracle(eta, gmm):
    """E[x_s | x0] = (1 - s) x0 and Var[x_s[d] | x0] = s^2 after every step (Monte Carlo, 5 standard errors).
    With GMM the moments match where c^2 = (eta s)^2 >= max v_k, checked below for every s > 0."""
    B = 20000
    times = dg.reference.rf_times(4)
    x0 = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)
    tables = (
        None
        if gmm is None
        else dg.GMM.create(D, n_components=2, n_steps=4, scale=0.3, variant=gmm, seed=3, dtype=torch.float64)
    )
    if tables is not None:
        assert (eta * times[-2]) ** 2 >= tables.var_offsets.max()
    x1 = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = []
    sample_rfim(_oracle(x0), x1, times, eta=eta, gmm=tables, seed=1, progress=False, callback=seen.append)
    for step in seen[:-1]:  # s > 0
        s, x = step["s"], step["x"]
        torch.testing.assert_close(step["denoised"], x0.expand(B, D))
        assert (x.mean(0) - (1 - s) * x0).abs().max() < MC_SIGMAS * s / B**0.5
        assert (x.var(0) / s**2 - 1).abs().max() < MC_SIGMAS * (2 / B) ** 0.5


def _velocity(x, t):
    return torch.tanh(x) * (1 + t[:, None]) - 0.3 * x


def test_eta_zero_without_gmm_is_euler():
    times = dg.reference.rf_times(6, shift=3.0)
    x = torch.randn(4, D, dtype=torch.float64)
    expected = x
    for t, s in zip(times[:-1], times[1:], strict=False):
        expected = expected + (s - t) * _velocity(expected, t.expand(4))
    torch.testing.assert_close(sample_rfim(_velocity, x, times, progress=False), expected)


def test_x0_prediction_matches_velocity():
    """A model predicting x0 = x - t v gives the run of the velocity model, GMM included."""
    times = dg.reference.rf_times(3)
    x = torch.randn(4, D, dtype=torch.float64)
    common = dict(eta=0.4, gmm="ortho-vub", n_components=2, seed=5, progress=False)
    flow = sample_rfim(_velocity, x, times, **common)
    x0_model = lambda x, t: x - t[:, None] * _velocity(x, t)  # noqa: E731
    torch.testing.assert_close(sample_rfim(x0_model, x, times, prediction_type="sample", **common), flow)


def test_extra_args_progress_and_callback(capsys):
    seen = {}
    times = dg.reference.rf_times(2)
    steps = []
    sample_rfim(
        lambda x, t, **kw: seen.update(kw) or _velocity(x, t),
        torch.zeros(2, D),
        times,
        extra_args={"cond": 1},
        callback=steps.append,
    )
    assert seen == {"cond": 1}
    assert [s["i"] for s in steps] == [0, 1] and steps[-1]["s"] == 0.0
    assert "RFIM" in capsys.readouterr().err
    sample_rfim(_velocity, torch.zeros(2, D), times, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(times=[1.0, 0.5, 0.7]), "strictly decreasing"),
        (dict(times=[1.5, 0.0]), r"lie in \[0, 1\]"),
        (dict(times=[1.0]), "at least 2 entries"),
        (dict(eta=1.1), "eta must be"),
        (dict(prediction_type="epsilon"), "prediction_type"),
        (dict(gmm="ortho", n_components=D), "must be < dim"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(times=[1.0, 0.5, 0.0])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sample_rfim(_velocity, torch.zeros(2, D), progress=False, **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(model="v"), "model must be callable"),
        (dict(extra_args=["cond"]), "extra_args must be None or a dict"),
        (dict(callback=1), "callback must be callable or None, got int"),
    ],
)
def test_bad_loop_arguments_are_refused_before_any_work(kwargs, match):
    # They failed inside the loop naming nothing ("'int' object is not callable", "argument after ** must be a
    # mapping"). Checked to fail (3 of 3) without the check_loop_arguments call.
    args = dict(model=lambda x, t: pytest.fail("the model is called"), x=torch.zeros(2, 4), times=[1.0, 0.5, 0.0])
    with pytest.raises(TypeError, match=match):
        sample_rfim(**(args | kwargs), progress=False)
