"""torch.ops.ddimgmm.step (through dg.step / dg.ddim_step / dg.rfim_step) against the pure-torch reference,
the randomness contract (docs/design.md 2), moment oracles, and op registration (opcheck, compile)."""

import math
import typing

import pytest
import torch
from scipy import stats

import ddim_gmm_ext as dg
from ddim_gmm_ext import reference as R
from tests.helpers import DEVICES, MC_SIGMAS, assert_close, assert_within

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
VARIANTS = [None, "rand", "ortho", "ortho-vub"]
SHAPE = (3, 3, 5, 7)  # per-sample numel 105: not a multiple of 4 nor of a block
BIG = (2, 3, 50, 47)  # 7050 per sample: several blocks and chunks of the CPU kernel


def _gmm(shape, variant, device, dtype=torch.float32, K=4, scale=1.0):
    return dg.GMM.create(
        math.prod(shape[1:]),
        n_components=K,
        n_steps=3,
        scale=scale,
        variant=variant,
        uniform_priors=False,
        seed=11,
        device=device,
        dtype=dtype,
    )


def _inputs(shape, dtype, device, guided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    m_shape = (2 * shape[0],) + shape[1:] if guided else shape
    x = torch.randn(shape, generator=g).to(device, dtype)
    m = torch.randn(m_shape, generator=g).to(device, dtype)
    z = torch.randn(shape, generator=g).to(device, dtype)
    return x, m, z


def _ref64(fn, m, x, *coeffs, gmm=None, noise=None, **kw):
    """The reference in float64 on the CPU, from the op's (already rounded) inputs."""
    gmm64 = gmm.to("cpu", torch.float64) if gmm is not None else None
    noise64 = noise.to("cpu", torch.float64) if noise is not None else None
    return fn(m.to("cpu", torch.float64), x.to("cpu", torch.float64), *coeffs, gmm=gmm64, noise=noise64, **kw)


def _check(out, ref, dtype, scale=1.0):
    assert out.prev_sample.dtype == dtype and out.pred_original_sample.dtype == dtype
    assert_close(out.prev_sample, ref.prev_sample, dtype, scale)
    assert_close(out.pred_original_sample, ref.pred_original_sample, dtype, scale)
    if ref.components is None:
        assert out.components is None
    else:
        assert torch.equal(out.components.cpu(), ref.components)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", R.PREDICTION_TYPES)
def test_matches_reference(device, dtype, variant, eta, prediction_type):
    x, m, z = _inputs(SHAPE, dtype, device)
    gmm = _gmm(SHAPE, variant, device) if variant else None
    k = torch.tensor([2, 0, 3], device=device) if variant else None
    kw = dict(eta=eta, gmm=gmm, step_index=1, prediction_type=prediction_type, noise=z, components=k)
    out = dg.ddim_step(m, x, 0.5, 0.8, **kw)
    _check(out, _ref64(R.ddim_step, m, x, 0.5, 0.8, **kw), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("guidance_scale", [None, 4.0])
@pytest.mark.parametrize("clip", [None, 0.7])
@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("variant", [None, "rand"])
def test_guidance_and_clip(device, guidance_scale, clip, use_clipped, prediction_type, variant):
    # without a GMM the CPU kernel takes its own loop (one noise std): swapping its two guidance halves fails here
    x, m, z = _inputs(SHAPE, torch.float32, device, guided=guidance_scale is not None)
    gmm = _gmm(SHAPE, variant, device) if variant else None
    kw = dict(
        eta=0.5,
        gmm=gmm,
        step_index=2,
        prediction_type=prediction_type,
        guidance_scale=guidance_scale,
        clip_sample_range=clip,
        use_clipped_model_output=use_clipped,
        noise=z,
        components=torch.tensor([1, 1, 0], dtype=torch.int32, device=device) if variant else None,
    )
    out = dg.ddim_step(m, x, 0.3, 0.6, **kw)
    _check(out, _ref64(R.ddim_step, m, x, 0.3, 0.6, **kw), torch.float32, scale=4.0)
    if clip is not None:
        assert out.pred_original_sample.abs().max() <= clip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prediction_type", ["flow", "sample"])
def test_rfim_and_general_step(device, prediction_type):
    x, m, z = _inputs(SHAPE, torch.float32, device)
    gmm = _gmm(SHAPE, "ortho-vub", device)
    kw = dict(eta=0.7, gmm=gmm, prediction_type=prediction_type, seed=4, step_index=2)
    _check(dg.rfim_step(m, x, 0.6, 0.4, **kw), _ref64(R.rfim_step, m, x, 0.6, 0.4, **kw), torch.float32)
    # VE path (a = 1) given directly to the general step, with a device tensor coefficient
    c = torch.tensor(0.3, device=device)
    out = dg.step(m, x, 1.0, 2.0, 1.0, 1.2, c, noise=z)
    _check(out, _ref64(R.step, m, x, 1.0, 2.0, 1.0, 1.2, 0.3, noise=z), torch.float32)


# a_t = 0 (the zero-SNR timestep) with epsilon prediction and clipping: x0 = (x - b_t m) / a_t is +-inf, clipped
# to exactly +-r as the reference and diffusers do, and the step is finite. Checked to fail on the old C++ kernel
# (x0 = (1 / a_t) x + (-b_t / a_t) m: inf - inf = NaN wherever x and m have the same sign).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_clipped", [False, True])
def test_zero_snr_epsilon_with_clipping_is_finite_and_matches_reference(device, dtype, use_clipped):
    x, m, z = _inputs(SHAPE, dtype, device)
    gmm = _gmm(SHAPE, "rand", device, dtype=R.compute_dtype(dtype))
    row = torch.tensor([[0.0, 1.0, 0.3, 0.8, 0.5, 1.0]], dtype=torch.float64)  # a_t = 0, b_t = 1
    kw = dict(gmm=gmm, prediction_type="epsilon", clip_sample_range=0.7, use_clipped_model_output=use_clipped)
    kw |= dict(noise=z, components=torch.tensor([1, 0, 2], device=device))
    out = dg.step_from_table(m, x, row.to(device, R.compute_dtype(dtype)), 0, **kw)
    ref = _ref64(R.step_from_table, m, x, row, 0, **kw)
    assert torch.isfinite(out.prev_sample).all() and torch.isfinite(ref.prev_sample).all()
    assert torch.equal(out.pred_original_sample.cpu().abs(), torch.full(SHAPE, 0.7, dtype=dtype))
    assert torch.equal(out.pred_original_sample.cpu(), ref.pred_original_sample.to(dtype))
    _check(out, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_multi_block_layouts_and_no_input_mutation(device):
    """channels_last and non-contiguous inputs, several blocks per sample, the internal stream."""
    x, m, _ = _inputs(BIG, torch.float32, device)
    x_cl = x.to(memory_format=torch.channels_last)
    m_nc = m.transpose(2, 3).contiguous().transpose(2, 3)  # same values, transposed strides
    assert not m_nc.is_contiguous() and not x_cl.is_contiguous()
    before = (x_cl.clone(), m_nc.clone())
    gmm = _gmm(BIG, "ortho", device)
    kw = dict(eta=1.0, gmm=gmm, step_index=0, seed=9, sample_offset=5)
    out = dg.ddim_step(m_nc, x_cl, 0.4, 0.7, **kw)
    ref = R.ddim_step(m.double().cpu(), x.double().cpu(), 0.4, 0.7, **{**kw, "gmm": gmm.to("cpu", torch.float64)})
    _check(out, ref, torch.float32)
    assert torch.equal(x_cl, before[0]) and torch.equal(m_nc, before[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_internal_stream_equals_reference_stream(device, dtype):
    """Without noise= / components=, the in-kernel draws are the reference's Philox stream."""
    x, m, _ = _inputs(BIG, dtype, device)
    gmm = _gmm(BIG, "rand", device, dtype=dtype, K=7)
    kw = dict(eta=1.0, gmm=gmm, step_index=2, seed=2**40 + 3, sample_offset=2**32 - 2)
    out = dg.ddim_step(m, x, 0.5, 0.8, **kw)
    ref = R.ddim_step(m.cpu(), x.cpu(), 0.5, 0.8, **{**kw, "gmm": gmm.to("cpu")})
    assert torch.equal(out.components.cpu(), ref.components)
    assert_close(out.prev_sample.cpu(), ref.prev_sample, kind="f32_step" if dtype == torch.float32 else "f64_abs")


# A GMM step that draws no noise (c = 0, no noise= given) takes its own CPU loop (x_s = mean + g delta_k, the
# noise std and the low-rank terms all 0). It must give the bits of the general loop, which the same step takes
# when the noise is given as zeros, and the reference. Checked to fail with g left out of that loop (g = 0.6
# here; a DDIM row has g = 1).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("variant", ["rand", "ortho", "ortho-vub", "ortho-lr"])
@pytest.mark.parametrize("guided", [False, True])
def test_noise_free_gmm_step_equals_the_general_loop(device, dtype, variant, guided):
    x, m, h = _inputs(BIG, dtype, device, guided=guided)
    cdt = R.compute_dtype(dtype)
    gmm = _gmm(BIG, variant, device, dtype=cdt, K=5, scale=0.7)
    row = torch.tensor([0.6, 0.8, 0.7, 0.5, 0.0, 0.6, 0.2, 0.0], dtype=cdt, device=device)  # c = 0, g = 0.6, H1
    kw = dict(gmm=gmm, history=(h,), seed=9, guidance_scale=3.0 if guided else None)
    drawn = dg.step_from_table(m, x, row, 2, **kw)
    given = dg.step_from_table(m, x, row, 2, **kw, noise=torch.zeros_like(x), components=drawn.components)
    assert torch.equal(drawn.prev_sample, given.prev_sample)
    ref = R.step_from_table(*(t.cpu().double() for t in (m, x, row)), 2, **{**kw, "gmm": gmm.to("cpu", torch.float64),
                            "history": (h.cpu().double(),)})  # fmt: skip
    _check(drawn, ref, dtype, scale=4.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", [None, "ortho-vub"])
def test_empty_and_single_batch(device, variant):
    gmm = _gmm((1, 4, 3, 3), variant, device) if variant else None
    x, m, _ = _inputs((1, 4, 3, 3), torch.float32, device)
    out = dg.ddim_step(m, x, 0.5, 0.8, eta=1.0, gmm=gmm, seed=1)
    ref = R.ddim_step(m.cpu(), x.cpu(), 0.5, 0.8, eta=1.0, gmm=gmm.to("cpu") if gmm else None, seed=1)
    _check(out, ref, torch.float32)
    # B = 0 (the reference's GMM path cannot reshape an empty batch, so only shapes are checked)
    empty = torch.zeros(0, 4, 3, 3, device=device)
    out = dg.ddim_step(empty, empty, 0.5, 0.8, eta=1.0, gmm=gmm, seed=1)
    assert out.prev_sample.shape == empty.shape and out.pred_original_sample.shape == empty.shape
    if variant:
        assert out.components.shape == (0,) and out.components.dtype == torch.int64


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_model_output_dtype(device):
    x, m, z = _inputs(SHAPE, torch.float32, device)
    out = dg.ddim_step(m.half(), x, 0.5, 0.8, eta=1.0, noise=z)
    assert_close(out.prev_sample, _ref64(R.ddim_step, m.half(), x, 0.5, 0.8, eta=1.0, noise=z).prev_sample)
    x16 = x.half()
    out = dg.ddim_step(m.bfloat16(), x16, 0.5, 0.8, eta=1.0, noise=z)
    assert out.prev_sample.dtype == torch.float16
    assert_close(out.prev_sample, _ref64(R.ddim_step, m.bfloat16(), x16, 0.5, 0.8, eta=1.0, noise=z).prev_sample)


# ---- the randomness contract (docs/design.md 2) -------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_batch_invariance_determinism_and_seeds(device):
    x, m, _ = _inputs((6, 3, 9, 9), torch.float32, device)
    gmm = _gmm((6, 3, 9, 9), "rand", device)

    def run(sl, seed=0, step_index=1, offset=0):
        return dg.ddim_step(
            m[sl], x[sl], 0.5, 0.8, eta=1.0, gmm=gmm, seed=seed, step_index=step_index, sample_offset=offset
        )

    full = run(slice(None))
    part = run(slice(2, 5), offset=2)
    assert torch.equal(full.prev_sample[2:5], part.prev_sample)
    assert torch.equal(full.components[2:5], part.components)
    again = run(slice(None))
    assert torch.equal(full.prev_sample, again.prev_sample) and torch.equal(full.components, again.components)
    for other in (run(slice(None), seed=1), run(slice(None), step_index=2)):
        assert (other.prev_sample != full.prev_sample).float().mean() > 0.99


@pytest.mark.parametrize("device", DEVICES)
def test_noise_moments(device):
    """c = 1, x = m = 0: the step returns z itself. N(0, 1) moments, and no correlation between lanes."""
    n = 2**18
    zeros = torch.zeros(4, n // 4, device=device)
    z = dg.step(zeros, zeros, 1.0, 0.0, 0.0, 1.0, 1.0, seed=5).prev_sample.double().cpu().flatten()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < MC_SIGMAS * se
    assert abs(z.var() - 1) < MC_SIGMAS * math.sqrt(2) * se
    assert abs((z**4).mean() - 3) < MC_SIGMAS * math.sqrt(96) * se
    lanes = z.reshape(-1, 4)
    corr = torch.corrcoef(lanes.T) - torch.eye(4, dtype=torch.float64)
    assert corr.abs().max() < MC_SIGMAS * se * 2
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1]) < MC_SIGMAS * se


@pytest.mark.parametrize("device", DEVICES)
def test_component_frequencies_match_priors(device):
    B, K = 20000, 5
    gmm = _gmm((B, 16), "rand", device, K=K)
    x = torch.zeros(B, 16, device=device)
    k = dg.ddim_step(x, x, 0.5, 0.8, gmm=gmm, step_index=0, seed=3).components.cpu()
    counts = torch.bincount(k, minlength=K).double()
    priors = gmm.priors[0].double().cpu()
    expected = priors / priors.sum() * B
    assert stats.chisquare(counts, expected).pvalue > 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["rand", "ortho"])
def test_moment_matching_oracle(device, variant):
    """Oracle: x_t = a_t x0 + b_t eps with the exact eps as model output gives E[x_s] = a_s x0 and
    Var[x_s[d]] = b_s^2 per coordinate when c^2 >= max v_k; in-kernel noise and components."""
    N, D = 40000, 16
    a_t, b_t = R.vp_coefficients(0.3)
    a_s, b_s = R.vp_coefficients(0.7)
    c = R.noise_std(a_t, b_t, a_s, b_s, 1.0)
    gmm = _gmm((N, D), variant, device, dtype=torch.float64, K=4, scale=0.5)
    assert c**2 >= gmm.var_offsets.max()  # the oracle's precondition (no clipping of the variance)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(D, generator=g, dtype=torch.float64).to(device)
    eps = torch.randn(N, D, generator=g, dtype=torch.float64).to(device)
    x_t = float(a_t) * x0 + float(b_t) * eps
    x_s = dg.step(eps, x_t, a_t, b_t, a_s, b_s, c, gmm=gmm, step_index=1, seed=7).prev_sample.cpu()
    se = float(b_s) / math.sqrt(N)
    assert_within(x_s.mean(0), float(a_s) * x0.cpu(), MC_SIGMAS * se)
    assert_within(
        x_s.var(0),
        torch.full((D,), float(b_s) ** 2, dtype=torch.float64),
        MC_SIGMAS * math.sqrt(2) * float(b_s) ** 2 / math.sqrt(N),
    )


# ---- registration ----------------------------------------------------------------------------------------


from ddim_gmm_ext._checks import compute_dtype  # noqa: E402
from ddim_gmm_ext.ops.step import ARGUMENTS, StepArgs  # noqa: E402 (the schema's arguments, in order)


def test_step_args_are_the_registered_schema():
    # StepArgs is the one Python list of the op's arguments (the wrapper, the checks, the fake and CUDA kernels,
    # autograd and the Triton launch plan read it by name): names, order, types and defaults are the schema's.
    # Checked to fail with StepArgs's seed and sample_offset fields swapped.
    schema = torch.ops.ddimgmm.step.default._schema
    python_type = {"Tensor": torch.Tensor, "Optional[Tensor]": torch.Tensor | None, "int": int, "bool": bool}
    python_type["Optional[float]"] = float | None
    want = [(a.name, python_type[str(a.type)]) for a in schema.arguments]
    assert list(typing.get_type_hints(StepArgs).items()) == want
    assert StepArgs._field_defaults == {a.name: None for a in schema.arguments if a.has_default_value()}
    assert all(a.default_value is None for a in schema.arguments if a.has_default_value())


def test_the_wrapper_passes_every_argument_under_its_name(monkeypatch):
    # ops.step.step passes the op's arguments positionally (the fast way): each of its inputs must reach the op as the
    # field of that name. Checked to fail with seed and sample_offset swapped in the wrapper's tuple.
    from ddim_gmm_ext._checks import StepOptions
    from ddim_gmm_ext.ops import step as step_module

    seen = []
    # the eager call goes to the dispatcher's boxed call of the op's handle, a traced or recorded one through torch.ops
    monkeypatch.setattr(step_module, "_call_boxed", lambda handle, *args: seen.append(StepArgs(*args)))
    monkeypatch.setattr(torch.ops.ddimgmm, "step", lambda *args: seen.append(StepArgs(*args)))
    t = {n: torch.zeros(i + 1) for i, n in enumerate(("m", "x", "c", "i", "p", "o", "v", "b", "z", "k", "h0", "h1"))}
    options = StepOptions("flow", 2.0, 3.0, True, 5, 6, t["z"], t["k"], False)
    tables = (t["p"], t["o"], t["v"], t["b"])
    for index, history in ((7, (t["h0"], t["h1"])), (t["i"], ())):
        step_module.step(t["m"], t["x"], t["c"], options, step_index=index, tables=tables, history=history)
    by_tensor = seen.pop()
    a = seen.pop()
    assert (a.model_output, a.sample, a.coeffs, a.step_tensor) == (t["m"], t["x"], t["c"], None)
    assert (a.priors, a.offsets, a.var_offsets, a.basis, a.noise, a.components) == tables + (t["z"], t["k"])
    assert (a.prediction_type, a.guidance_scale, a.clip_sample_range, a.use_clipped_model_output) == (3, 2.0, 3.0, True)
    assert (a.seed, a.sample_offset, a.step_index, a.return_pred_original) == (5, 6, 7, False)
    assert (a.history0, a.history1) == (t["h0"], t["h1"])
    assert (by_tensor.step_tensor, by_tensor.step_index, by_tensor.history0, by_tensor.history1) == (
        t["i"],
        0,
        None,
        None,
    )


def test_the_eager_call_reaches_modes_subclasses_and_the_profiler_as_torch_ops_does():
    # The eager call below autograd skips torch.ops' callable for the dispatcher's boxed call: a torch-function
    # mode and a tensor subclass's __torch_function__ (which that callable hands the call to) must still see the op,
    # as must a dispatch mode and the profiler (the dispatcher's). Checked to fail with the wrapper's
    # _has_torch_function test removed (the function mode and the subclass then see nothing).
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    op = torch.ops.ddimgmm.step.default
    seen = []  # who saw the op (the modes see the tensors' other calls too)

    class FunctionMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.extend(["function mode"] if func is op else [])
            return func(*args, **(kwargs or {}))

    class DispatchMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.extend(["dispatch mode"] if func is op else [])
            return func(*args, **(kwargs or {}))

    class Subclass(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.extend(["subclass"] if func is op else [])
            return super().__torch_function__(func, types, args, kwargs)

    x, m = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    row = torch.tensor(dg.coefficient_row(0.9, 0.4, 0.95, 0.3, 0.1), dtype=torch.float64)
    want = dg.step_from_table(m, x, row, 0, seed=3).prev_sample
    with torch.no_grad():
        for name, mode in (("function mode", FunctionMode), ("dispatch mode", DispatchMode)):
            with mode():
                got = dg.step_from_table(m, x, row, 0, seed=3).prev_sample
            assert seen == [name]
            assert torch.equal(got, want)
            seen.clear()
        got = dg.step_from_table(m, x.as_subclass(Subclass), row, 0, seed=3).prev_sample
        assert seen == ["subclass"]
        assert torch.equal(got.as_subclass(torch.Tensor), want)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            dg.step_from_table(m, x, row, 0, seed=3)
    assert "ddimgmm::step" in {e.name for e in prof.events()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_host_row_has_the_bits_torch_tensor_gives(dtype):
    # dg.step's coefficient row is built over a C array (a third of torch.tensor's cost on a list): each value
    # must be the float64 row rounded to the compute dtype exactly as torch.tensor stores it (ties to even,
    # subnormals, overflow to inf). Checked to fail with g left out of the array and with the float32 / float64
    # array codes swapped.
    from ddim_gmm_ext._rows import coefficient_row, step_row

    g = torch.Generator().manual_seed(0)
    mantissas = torch.rand(300, 6, generator=g, dtype=torch.float64)
    values = (mantissas * 10.0 ** torch.randint(-48, 42, (300, 6), generator=g)).tolist()
    values[0] = [1 + 2**-24, 1 + 3 * 2**-24, 3.5e38, 1e-46, 0.0, 2.0]  # float32 ties, overflow, underflow
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    for a_t, b_t, a_s, b_s, c, gmm_scale in values:
        got = step_row(a_t, b_t, a_s, b_s, c, gmm_scale, dtype, torch.device("cpu"))
        want = torch.tensor(coefficient_row(a_t, b_t, a_s, b_s, c, gmm_scale), dtype=dtype)
        assert got.dtype == dtype and got.shape == (6,)
        assert torch.equal(got.view(bits), want.view(bits)), (got, want)


def _op_args(device, dtype=torch.float32, gmm=True, guided=False, table=False):
    """Positional arguments of one valid op call, as a name -> value dict in schema order."""
    x, m, _ = _inputs(SHAPE, dtype, device, guided=guided)
    cdt = compute_dtype(dtype)
    tables = tuple(t[0] for t in _gmm(SHAPE, "ortho-vub", device, dtype=cdt).tables(x)[:3]) if gmm else (None,) * 3
    row = [0.7, 0.7, 0.8, 0.6, 0.3, 1.0]
    coeffs = torch.tensor([row, row] if table else row, dtype=cdt, device=device)
    values = [m, x, coeffs, None, *tables, None, None, None, 0, 2.0 if guided else None, 1.0, True, 3, 0, 1, True]
    values += [None, None]  # no history
    return dict(zip(ARGUMENTS, values, strict=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["gmm", "plain_guided", "half", "noise_and_components", "table_step_tensor"])
def test_opcheck(device, case):
    args = _op_args(
        device,
        torch.float16 if case == "half" else torch.float32,
        gmm=case != "plain_guided",
        guided=case == "plain_guided",
        table=case == "table_step_tensor",
    )
    if case == "noise_and_components":
        args["noise"] = torch.randn(SHAPE, device=device)
        args["components"] = torch.tensor([0, 3, 1], device=device)
    if case == "table_step_tensor":
        args["step_tensor"], args["step_index"] = torch.tensor(1, device=device), 0
    torch.library.opcheck(torch.ops.ddimgmm.step, tuple(args.values()))


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    x, m, _ = _inputs(SHAPE, torch.float32, device)
    gmm = _gmm(SHAPE, "ortho-vub", device)

    def sample_step(m, x, alpha_prod_t, alpha_prod_prev):
        return dg.ddim_step(m, x, alpha_prod_t, alpha_prod_prev, eta=1.0, gmm=gmm, step_index=1, seed=2).prev_sample

    torch._dynamo.reset()
    compiled = torch.compile(sample_step, fullgraph=True)
    assert torch.equal(compiled(m, x, 0.5, 0.8), sample_step(m, x, 0.5, 0.8))


# ---- bad input -------------------------------------------------------------------------------------------

# One table of bad op calls: (expected exception, message pattern, changes to a valid call). Every backend
# (the C++ CPU kernel, the fake kernel on meta tensors, the Triton launcher on CUDA) must raise the same type
# with the same message, before any work.
BAD_OP_CALLS = [
    (TypeError, "sample must be float16, bfloat16, float32 or float64, got int32",
     dict(sample=lambda a: a["sample"].int(), model_output=lambda a: a["model_output"].int())),
    (ValueError, "model_output must have shape", dict(model_output=lambda a: a["model_output"][:2])),
    (ValueError, "coeffs must be one row", dict(coeffs=lambda a: a["coeffs"][:5])),
    (ValueError, "coeffs must be float32", dict(coeffs=lambda a: a["coeffs"].double())),
    (ValueError, "step_tensor must be a 0-d int64", dict(step_tensor=lambda a: a["coeffs"].new_zeros(1).long())),
    (ValueError, "step_tensor must be a 0-d int64", dict(step_tensor=lambda a: a["coeffs"].new_zeros(()).int())),
    (ValueError, "not both", dict(step_tensor=lambda a: a["coeffs"].new_zeros((), dtype=torch.int64))),
    (ValueError, "prediction_type", dict(prediction_type=4)),
    (ValueError, "clip_sample_range must be > 0, got -1", dict(clip_sample_range=-1.0)),
    (ValueError, r"step_index must be in \[0, 2\*\*32\)", dict(step_index=2**32)),
    # sample_offset + B near 2**63 must not wrap around (it would alias other samples' noise)
    (ValueError, "sample_offset must be >= 0", dict(sample_offset=2**63 - 2)),
    (ValueError, "sample_offset must be >= 0", dict(sample_offset=-1)),
    (ValueError, "all of priors, offsets, var_offsets", dict(var_offsets=None)),
    (ValueError, "basis given without GMM tables", dict(priors=None, offsets=None, var_offsets=None,
                                                        basis=lambda a: a["sample"].new_zeros(2, 16))),
    (ValueError, "on the sample's device", dict(offsets=lambda a: a["offsets"].to("meta"))),
    (ValueError, "priors must be float32 .the compute dtype", dict(priors=lambda a: a["priors"].double())),
    (ValueError, "offsets must have shape", dict(offsets=lambda a: a["offsets"][:, :-1])),
    (ValueError, "var_offsets must have shape", dict(var_offsets=lambda a: a["sample"].new_zeros(4, 200))),
    (ValueError, "basis must have shape", dict(basis=lambda a: a["sample"].new_zeros(3, 16))),
    (ValueError, "noise must be", dict(noise=lambda a: a["sample"].new_zeros(3, 2))),
    (ValueError, "components must be an int32/int64",
     dict(components=lambda a: a["sample"].new_zeros(2, dtype=torch.int64))),
    (ValueError, "components given without GMM", dict(priors=None, offsets=None, var_offsets=None,
                                                      components=lambda a: a["sample"].new_zeros(3).long())),
    (ValueError, r"step_index 2 is outside the coefficient table \[2, 6\]",
     dict(coeffs=lambda a: torch.stack([a["coeffs"]] * 2), step_index=2)),
    # One stacked set is one step's, not shared (9e9d80e took S_g == 1 for shared: no error).
    (ValueError, r"step_index 3 is outside the GMM tables \(1 parameter sets\)",
     dict(priors=lambda a: a["priors"][None], offsets=lambda a: a["offsets"][None],
          var_offsets=lambda a: a["var_offsets"][None], step_index=3)),
]  # fmt: skip


def _bad_call(device, changes):
    """The bad call on ``device``; for "meta", tensors are swapped cpu <-> meta, so one put on another device
    than the sample stays on another device."""
    args = _op_args("cpu" if device == "meta" else device)
    for name, value in changes.items():
        args[name] = value(args) if callable(value) else value
    if device == "meta":

        def swap(a):
            return torch.empty_like(a, device="cpu") if a.device.type == "meta" else a.to("meta")

        args = {n: swap(a) if isinstance(a, torch.Tensor) else a for n, a in args.items()}
    return tuple(args.values())


@pytest.mark.parametrize("device", [*DEVICES, "meta"])
@pytest.mark.parametrize(("error", "match", "changes"), BAD_OP_CALLS, ids=[c[1][:40] for c in BAD_OP_CALLS])
def test_bad_input_to_the_op(device, error, match, changes):
    # meta runs the fake kernel (what torch.compile traces); the messages are checked equal across backends
    # below. Checked to fail when the C++ kernel raises RuntimeError (TORCH_CHECK) instead of ValueError.
    args = _bad_call(device, changes)
    with pytest.raises(error, match=match) as info:
        torch.ops.ddimgmm.step(*args)
    assert type(info.value) is error  # not a subclass such as torch's own error types


@pytest.mark.parametrize(("error", "match", "changes"), BAD_OP_CALLS, ids=[c[1][:40] for c in BAD_OP_CALLS])
def test_bad_input_same_message_on_every_backend(error, match, changes):
    # The C++ checks mirror ops/step.py's `check`: same text, so a user sees one message whatever the device.
    messages = set()
    for device in ["cpu", "meta"]:
        with pytest.raises(error) as info:
            torch.ops.ddimgmm.step(*_bad_call(device, changes))
        messages.add(str(info.value).split("\n")[0].replace("meta", "X").replace("cpu", "X"))
    assert len(messages) == 1, messages


def test_components_out_of_range_rejected_on_cpu():
    args = _op_args("cpu")
    args["components"] = torch.tensor([0, 4, 1])
    with pytest.raises(ValueError, match=r"components must be in \[0, 4\)"):
        torch.ops.ddimgmm.step(*args.values())


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_to_the_api(device):
    x, m, _ = _inputs(SHAPE, torch.float32, device)
    gmm = _gmm(SHAPE, "rand", device)
    with pytest.raises(ValueError, match="model_output shape"):
        dg.ddim_step(m[:2], x, 0.5, 0.8)
    with pytest.raises(ValueError, match="gmm dim"):
        dg.ddim_step(m[:, :2], x[:, :2], 0.5, 0.8, gmm=gmm)
    with pytest.raises(ValueError, match="noise_std"):
        dg.step(m, x, 0.7, 0.7, 0.8, 0.6, 0.9)
    with pytest.raises(ValueError, match="step_index"):
        dg.ddim_step(m, x, 0.5, 0.8, gmm=gmm, step_index=3)
