"""Every bad input named in the foundation issue raises a clear error naming the argument."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference as ref

STEP_FNS = {"api": dg.ddim_step, "reference": ref.ddim_step}


@pytest.fixture(scope="module")
def gmm():
    return dg.GMM.create(12, n_components=3, n_steps=4, variant="ortho")


def _args(B=2, shape=(3, 4)):
    return torch.randn(B, *shape), torch.randn(B, *shape)


@pytest.mark.parametrize("step_fn", STEP_FNS.values(), ids=STEP_FNS.keys())
@pytest.mark.parametrize(
    "change, match",
    [
        (dict(model_output=torch.randn(2, 3, 5)), "model_output shape"),
        (dict(model_output=torch.randn(4, 3, 4)), "guidance_scale"),
        (
            dict(model_output=torch.randn(3, 3, 4), guidance_scale=2.0),
            r"with guidance_scale, model_output must have shape \(4, 3, 4\)",
        ),
        (dict(step_index=4), r"step_index must be in \[0, 4\)"),
        (dict(step_index=-1), "step_index"),
        (dict(eta=-0.1), "eta must be a finite number >= 0"),
        (dict(prediction_type="x0"), "prediction_type must be one of"),
        (dict(sample=torch.randint(0, 3, (2, 3, 4))), "sample must have a floating dtype"),
        (dict(model_output=torch.randint(0, 3, (2, 3, 4))), "model_output must have a floating dtype"),
        (dict(noise=torch.randn(2, 12)), "noise must have the sample's shape"),
        (dict(components=torch.zeros(3, dtype=torch.long)), "components must be an int32/int64 tensor of shape"),
        (dict(components=torch.zeros(2)), "components must be an int32/int64"),
        (dict(components=torch.tensor([0, 3])), r"components must be in \[0, 3\)"),
        (dict(seed=-1), "seed"),
        (dict(sample_offset=2**32 - 1), "sample_offset"),
        (dict(clip_sample_range=0.0), "clip_sample_range"),
        (dict(sample=torch.randn(2, 4, 4), model_output=torch.randn(2, 4, 4)), r"gmm dim \(12\) must equal"),
        (dict(model_output=torch.randn(2, 3, 4, device="meta")), "is on meta but sample is on cpu"),
    ],
)
def test_bad_step_input_raises(step_fn, gmm, change, match):
    m, x = _args()
    kwargs = dict(model_output=m, sample=x, alpha_prod_t=0.3, alpha_prod_prev=0.5, eta=1.0, gmm=gmm, step_index=1)
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        step_fn(**kwargs)


def test_components_without_gmm_raise():
    m, x = _args()
    with pytest.raises(ValueError, match="components given but gmm is None"):
        dg.ddim_step(m, x, 0.3, 0.5, components=torch.zeros(2, dtype=torch.long))


def test_noise_std_above_b_s_raises():
    m, x = _args()
    with pytest.raises(ValueError, match=r"noise_std \(0.9\) must not exceed b_s \(0.5\)"):
        dg.step(m, x, 0.5, 0.8, 0.8, 0.5, 0.9)
    with pytest.raises(ValueError, match="noise_std must be a finite number >= 0"):
        dg.step(m, x, 0.5, 0.8, 0.8, 0.5, -0.1)


def test_unknown_noise_schedule_raises():
    with pytest.raises(ValueError, match="noise schedule must be one of"):
        ref.noise_std(1, 1, 1, 1, 0.5, "karras")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dim=8, n_components=8), r"n_components \(8\) must be < dim \(8\)"),
        (dict(dim=8, n_components=0), "n_components must be an int >= 1"),
        (dict(dim=8, n_components=2, scale=-1.0), "scale must be a finite number >= 0"),
        (dict(dim=8, n_components=2, n_steps=0), "n_steps must be an int >= 1"),
        (dict(dim=8, n_components=2, variant="pca"), "variant must be one of"),
        (dict(dim=0, n_components=2), "dim must be an int >= 2"),
        (dict(dim=-1, n_components=2), "dim must be an int >= 2"),
        (dict(dim=8, n_components=2, device="meta"), "device must hold data"),
        (dict(dim=8, n_components=2, uniform_priors="no"), "uniform_priors must be a bool"),
        (dict(dim=8, n_components=2, share_across_steps="no"), "share_across_steps must be a bool"),
        (dict(dim=8, n_components=2.0), "n_components must be an int >= 1"),
        # A scale whose square overflows is named (9e9d80e: a bare OverflowError from float ** 2)
        (dict(dim=8, n_components=2, variant="ortho-vub", scale=1.5e154), "scale 1.5e.154 is too large"),
        (dict(dim=8, n_components=2, variant="ortho-vub", scale=1.5e154, dtype=torch.float64), "is too large"),
        (dict(dim=8, n_components=2, variant="ortho-lr", scale=1.5e154), "scale 1.5e.154 is too large"),
    ],
)
def test_bad_gmm_config_raises(kwargs, match):
    # The three below the variant row were, before their checks: a message about n_components for dim <= 0,
    # "Tensor.item() cannot be called on meta tensors", and a truthy string silently taken as True.
    error = TypeError if "must be a bool" in match else ValueError
    with pytest.raises(error, match=match):
        dg.GMM.create(**kwargs)


@pytest.mark.parametrize("variant", ["ortho-lr", "ortho-vub"])
@pytest.mark.parametrize("scale", [1e155, 1e300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("uniform_priors", [True, False])
def test_an_overflowing_scale_is_named_before_any_table_is_drawn(monkeypatch, variant, scale, dtype, uniform_priors):
    # ORTHO-LR from ~1e155 on raised LinAlgError from eigh (its Gram matrix held inf) after drawing and decomposing
    # the directions. Their variances follow from the scale and the priors: refused before the draw, by the
    # runtime and the specification alike. Checked to fail without _checks.check_gmm_scale (16 of 16 cases: the
    # draw starts; unpatched, ORTHO-LR then raises LinAlgError).
    from ddim_gmm_ext import _gmm_tables

    def started(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(_gmm_tables.api, "offset_directions", started)
    options = dict(variant=variant, uniform_priors=uniform_priors, dtype=dtype)
    message = re.escape(f"scale {scale} is too large: the GMM tables overflow {dtype}")
    with pytest.raises(ValueError, match=message):
        dg.GMM.create(64, n_components=8, n_steps=2, scale=scale, **options)
    with pytest.raises(ValueError, match=message):
        ref.gmm_parameters(64, 8, 2, scale, offset_directions_fn=started, **options)


def test_the_largest_scale_that_fits_still_builds():
    # The up-front check is exact for ORTHO-LR (uniform priors: every variance offset is s^2 / K), so it refuses no
    # scale whose tables fit: s = 2e154 has s^2 = inf in float64 but s^2 / 8 = 5e307.
    gmm = dg.GMM.create(64, n_components=8, n_steps=2, scale=2e154, variant="ortho-lr", dtype=torch.float64)
    assert ((gmm.var_offsets / (2e154 * (2e154 / 8)) - 1).abs() < 1e-12).all()


def test_upper_bound_vars_needs_orthonormal():
    with pytest.raises(ValueError, match="upper_bound_vars=True needs orthonormal=True"):
        dg.GMM().initialize(8, 2, 3, orthonormal=False, upper_bound_vars=True)


def test_uninitialised_gmm_raises():
    m, x = _args(shape=(8,))
    with pytest.raises(RuntimeError, match="GMM is not initialised"):
        dg.ddim_step(m, x, 0.3, 0.5, gmm=dg.GMM())


@pytest.mark.parametrize(
    "priors, match",
    [
        (torch.tensor([[0.5, 0.7, -0.2]]), "non-negative"),
        (torch.tensor([[0.5, 0.4, 0.2]]), "sum to 1"),
        (torch.tensor([[0.5, float("nan"), 0.5]]), "finite"),
    ],
)
def test_bad_priors_raise(priors, match):
    with pytest.raises(ValueError, match=match):
        dg.GMM.from_params(priors, torch.zeros(1, 3, 8), torch.zeros(1, 3, 8))


def test_from_params_checks_eq8_and_shapes():
    priors = torch.full((1, 2), 0.5)
    with pytest.raises(ValueError, match="sum_k priors_k offsets_k = 0"):
        dg.GMM.from_params(priors, torch.ones(1, 2, 8), torch.zeros(1, 2, 8))
    with pytest.raises(ValueError, match="inconsistent GMM tables"):
        dg.GMM.from_params(priors, torch.zeros(1, 2, 8), torch.zeros(1, 2, 9))
    ok = dg.GMM.from_params(priors, torch.tensor([[[1.0] * 8, [-1.0] * 8]]), torch.ones(1, 2, 8), n_steps=5)
    assert ok.shared and ok.set_index(4) == 0


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 4, 1), (1, 2, 3)])
def test_thin_svd_bad_shapes_raise(shape):
    A = torch.randn(shape)
    with pytest.raises(ValueError, match=r"O must have shape \[S, D, K\] with K <= D"):
        dg.thin_svd(A)


def test_thin_svd_integer_raises():
    with pytest.raises(TypeError, match="O must have a floating dtype"):
        dg.thin_svd(torch.ones(1, 4, 2, dtype=torch.int64))


def test_no_top_level_triton_kernels_from_us(tmp_path):
    """triton_kernels/ installs as ddim_gmm_ext.triton_kernels; in the installed environment (a clean
    interpreter outside the checkout) a top-level `triton_kernels` (triton ships one) never resolves to ours."""
    probe = (
        "import importlib.util, os\n"
        "installed = importlib.util.find_spec('ddim_gmm_ext') is not None\n"
        "ours = importlib.util.find_spec('ddim_gmm_ext.triton_kernels') if installed else None\n"
        "top = importlib.util.find_spec('triton_kernels')\n"
        "print(os.path.dirname(ours.origin) if ours is not None else '')\n"
        "print(os.path.dirname(top.origin) if top is not None else '')\n"
    )
    out = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    ours, top = out.stdout.split("\n")[:2]
    if not ours:  # e.g. the GPU verification, which runs a checkout from PYTHONPATH (ignored by -I)
        pytest.skip("ddim_gmm_ext is not installed in this interpreter")
    assert os.path.basename(ours) == "triton_kernels"
    assert top != ours


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m, x: dg.ddim_step(m, x, float("nan"), 0.5), r"alpha_prod_t must be a finite number in \[0, 1\]"),
        # The caller's argument is named, not a_t / b_t, which it did not pass (9e9d80e: "a_t")
        (lambda m, x: dg.ddim_step(m, x, 0.0, 0.5), "alpha_prod_t must not be 0 with prediction_type 'epsilon'"),
        (lambda m, x: ref.ddim_step(m, x, 0.0, 0.5), "alpha_prod_t must not be 0 with prediction_type 'epsilon'"),
        (lambda m, x: dg.ddim_step(m, x, 1.0, 0.5, prediction_type="sample"), "alpha_prod_t must not be 1 with"),
        (
            lambda m, x: dg.ddim_step(m, x, 1.0, 0.5, clip_sample_range=1.0, use_clipped_model_output=True),
            "alpha_prod_t must not be 1 with .* use_clipped_model_output True.: the step divides eps by b_t",
        ),
        (lambda m, x: dg.rfim_step(m, x, 1.0, 0.5, prediction_type="epsilon"), "t must not be 1 with"),
        (lambda m, x: ref.rfim_step(m, x, 0.0, 0.0, prediction_type="sample"), "t must not be 0 with"),
        (lambda m, x: dg.ddim_step(m, x, 0.3, float("inf")), r"alpha_prod_prev must be a finite number"),
        (lambda m, x: dg.rfim_step(m, x, float("nan"), 0.2), r"t must be a finite number in \[0, 1\]"),
        (lambda m, x: dg.step(m, x, 0.0, 1.0, 1.0, 0.0, 0.0), "a_t must be a finite number > 0"),
        (
            lambda m, x: dg.step(m, x, 1.0, 0.0, 1.0, 0.0, 0.0, prediction_type="sample"),
            "b_t must be a finite number > 0",
        ),
        (lambda m, x: dg.step(m, x, 0.6, float("inf"), 0.8, 0.6, 0.1), "b_t must be a finite number >= 0"),
        (lambda m, x: dg.step(m, x, 0.6, 0.8, 0.8, torch.ones(2), 0.1), "b_s must be a number or a one-element tensor"),
        (lambda m, x: dg.ddim_step(torch.cat([m, m]), x, 0.3, 0.5, guidance_scale=float("nan")), "guidance_scale"),
    ],
)
def test_non_finite_or_out_of_domain_coefficients_raise(call, match):
    # Each of these returned NaN / Inf samples silently before the check (checked by removing check_coefficients).
    m, x = _args()
    with pytest.raises(ValueError, match=match):
        call(m, x)


def test_eta_must_be_a_number():
    m, x = _args()
    with pytest.raises(TypeError, match="eta must be a number, got str"):
        dg.ddim_step(m, x, 0.3, 0.5, eta="0.5")


# Mutation checked: the old message, which listed "ortho-vub*" among the values (GMM.create's alias, refused
# here), fails.
def test_the_spec_names_the_variants_it_accepts():
    with pytest.raises(ValueError) as refused:
        ref.gmm_parameters(8, 2, 1, 1.0, "ortho-vub*")
    assert str(refused.value) == "variant must be one of ('rand', 'ortho', 'ortho-vub', 'ortho-lr'), got 'ortho-vub*'"
    for variant in ("rand", "ortho", "ortho-vub", "ortho-lr"):
        ref.gmm_parameters(8, 2, 1, 1.0, variant)
    with pytest.raises(ValueError, match=r"variant must be one of \(.*'ortho-lr', 'ortho-vub\*'\), got 'vub'"):
        dg.GMM.create(8, n_components=2, n_steps=1, variant="vub")  # the public call names its alias too


@pytest.mark.parametrize("variant", ["ortho-vub", "ortho-lr"])
def test_reference_names_an_overflowing_scale(variant):
    # reference.gmm_parameters raised a bare OverflowError for ORTHO-VUB (ORTHO-LR named it).
    with pytest.raises(ValueError, match="scale 1.5e.154 is too large"):
        ref.gmm_parameters(8, 2, 1, 1.5e154, variant)


def test_numpy_integers_are_ints_everywhere():
    # One rule (_checks.is_int): on 9e9d80e np.uint64 seeds >= 2**63 and np.int64 indices were
    # refused by the step (TypeError) and np.int64 counts by GMM.create; a scheduler's np.uint64 seed overflowed
    # in op_seed. Each result must equal the Python-int call's.
    m, x = _args()
    seed = 2**63 + 5
    gmm = dg.GMM.create(np.int64(12), n_components=np.int64(3), n_steps=np.int64(4), seed=np.uint64(seed))
    assert gmm.n_steps == 4 and type(gmm.n_steps) is int
    assert torch.equal(gmm.offsets, dg.GMM.create(12, n_components=3, n_steps=4, seed=seed).offsets)
    for fn in (dg.ddim_step, ref.ddim_step):
        options = dict(eta=1.0, gmm=gmm, step_index=1, seed=seed, sample_offset=3)
        want = fn(m, x, 0.3, 0.5, **options).prev_sample
        options.update(step_index=np.int64(1), seed=np.uint64(seed), sample_offset=np.int64(3))
        assert torch.equal(fn(m, x, 0.3, 0.5, **options).prev_sample, want), fn
    rows = torch.tensor([ref.coefficient_row(0.6, 0.8, 0.8, 0.6, 0.3)] * 4)
    want = dg.step_from_table(m, x, rows, 2, gmm=gmm, seed=seed).prev_sample
    assert torch.equal(dg.step_from_table(m, x, rows, np.int64(2), gmm=gmm, seed=np.uint64(seed)).prev_sample, want)
    assert dg.reference.offset_directions(1, 4, 2, seed).equal(dg.api.offset_directions(1, 4, 2, np.uint64(seed)))
    with pytest.raises(TypeError, match="step_index must be an int"):
        dg.ddim_step(m, x, 0.3, 0.5, gmm=gmm, step_index=np.float64(1))
    with pytest.raises(ValueError, match="seed must be an int"):
        dg.GMM.create(12, n_components=3, seed=np.bool_(True))


_ROW = [0.9, 0.4, 0.8, 0.3, 0.2, 1.0, 0.5, -0.1]  # (a_t, b_t, A, B, c, g, H1, H2): a step that reads h1 and h2
TABLE_FNS = {"api": dg.step_from_table, "reference": ref.step_from_table}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("step_fn", TABLE_FNS.values(), ids=TABLE_FNS.keys())
@pytest.mark.parametrize(
    ("history", "error", "match"),
    [
        (None, TypeError, r"history must be a tuple of at most 2 tensors: \(\) for none.*got NoneType"),
        ("h1", TypeError, "history must be a tuple.*got str"),
        (lambda m: m, TypeError, "history must be a tuple.*got Tensor"),
        (lambda m: (m, None), TypeError, r"history\[1\] must be a torch.Tensor, got NoneType"),
        (lambda m: (m.bool(), m), TypeError, r"history\[0\] must have a floating dtype .* got torch.bool"),
        (lambda m: (m.to(torch.complex64),), TypeError, r"history\[0\] must have a floating .* got torch.complex64"),
        (lambda m: (m.long(),), TypeError, r"history\[0\] must have a floating dtype .* got torch.int64"),
        (lambda m: (m, m, m), ValueError, r"history takes at most 2 tensors \(h1, h2\), got 3"),
    ],
)
def test_bad_history_is_refused_naming_it(device, step_fn, history, error, match):
    # The public step functions, on the CPU path and on meta (the op's fake kernel): the same exception, raised
    # before the op. Checked to fail (30 of 32) without check_history: the api converted bool, int and complex
    # histories to float32 and ran (the complex one dropping its imaginary part) and named neither None entry;
    # the reference raised AttributeError / "Boolean value of Tensor" / "object of type 'NoneType' has no len()",
    # or failed on meta before any check.
    m, x = torch.randn(2, 3, 4, device=device), torch.randn(2, 3, 4, device=device)
    coeffs = torch.tensor([_ROW], device=device)
    with pytest.raises(error, match=match):
        step_fn(m, x, coeffs, 0, history=history(m) if callable(history) else history, prediction_type="sample")


def test_history_as_a_list_is_still_taken():
    m, x, h = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    coeffs = torch.tensor([_ROW])
    kw = dict(prediction_type="sample", noise=torch.zeros_like(x))
    as_list = dg.step_from_table(m, x, coeffs, 0, history=[h, h], **kw).prev_sample
    expected = ref.step_from_table(m, x, coeffs, 0, history=(h, h), **kw).prev_sample
    torch.testing.assert_close(as_list, expected)


# Mutation checked: a StepKwargs field renamed (seed -> seeds) or retyped fails the first assertion; step_options
# without its TypeError (StepOptions.__new__'s own message) fails the second.
def test_step_options_are_defined_once_and_an_unknown_one_is_named():
    from ddim_gmm_ext._checks import StepKwargs, StepOptions

    def spelled(annotations):  # ForwardRef or str: the type as written
        return {k: getattr(v, "__forward_arg__", v) for k, v in annotations.items()}

    assert list(StepKwargs.__annotations__) == list(StepOptions._fields)
    assert spelled(StepKwargs.__annotations__) == spelled(StepOptions.__annotations__)
    m, x = _args()
    calls = {
        "step": lambda **kw: dg.step(m, x, 0.8, 0.6, 0.9, 0.4, 0.1, **kw),
        "step_from_table": lambda **kw: dg.step_from_table(
            m, x, torch.tensor(dg.coefficient_row(0.8, 0.6, 0.9, 0.4, 0.1)), 0, **kw
        ),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"^{name}\(\) got an unexpected keyword argument 'seeds'$"):
            call(seeds=1)
        assert torch.equal(call().prev_sample, call(**StepOptions()._asdict()).prev_sample)  # the defaults
    with pytest.raises(TypeError, match=r"^step\(\) got an unexpected keyword argument 'seeds'$"):
        ref.step(m, x, 0.8, 0.6, 0.9, 0.4, 0.1, seeds=1)
