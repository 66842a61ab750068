"""pytest-benchmark: the diffusers schedulers' step against the bare fused op and diffusers' own schedulers,
side by side (the scheduler's Python overhead is the difference to the bare op), and a whole 20-step
DPM-Solver++ loop with a cheap model:

pytest benchmarks/bench_schedulers.py --benchmark-group-by=param:family,param:gmm

The case builders here are also what ``benchmarks/scheduler_results.py`` runs interleaved (the ratios in
benchmarks/results/schedulers_cpu.json and docs/performance.md).
"""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

from ddim_gmm_ext._checks import StepOptions  # noqa: E402
from ddim_gmm_ext.diffusers import DDIMGMMScheduler, FlowMatchEulerDiscreteGMMScheduler  # noqa: E402
from ddim_gmm_ext.ops.step import step as step_op  # noqa: E402 (the op call the package makes)

SHAPE = (1, 4, 64, 64)
STEPS = 50
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _bare_op(scheduler, x, m, i, prediction_type, return_pred_original=True):
    """The op call the scheduler makes, with everything precomputed: its floor."""
    gmm = scheduler.gmm
    seed = scheduler._stream_seed
    table = scheduler._table_at(0.0, x.device, torch.float32) if prediction_type == "epsilon" else scheduler._table(x)
    tables = None if gmm is None else gmm.step_tables(x)
    index = torch.tensor(i, device=x.device)
    options = StepOptions(prediction_type, seed=seed, return_pred_original=return_pred_original)
    return lambda: step_op(m, x, table, options, step_index=index, tables=tables)


def _cases(family, gmm_variant, device, shape=SHAPE):
    x = torch.randn(shape, device=device)
    m = torch.randn(shape, device=device)
    i = STEPS // 2
    gmm = dict(gmm_variant=gmm_variant, gmm_n_components=8, seed=0)
    if family == "ddim":
        ours, stock = DDIMGMMScheduler(clip_sample=False, **gmm), DDIMScheduler(clip_sample=False)
        for s in (ours, stock):
            s.set_timesteps(STEPS, device)
        t = ours.timesteps[i]
        ours.prepare_gmm(x)
        return {
            "ours": lambda: ours.step(m, t, x),
            "bare_op": _bare_op(ours, x, m, i, "epsilon"),
            "diffusers": None if gmm_variant else (lambda: stock.step(m, t, x)),
        }
    ours = FlowMatchEulerDiscreteGMMScheduler(shift=3.0, rfim_eta=1.0 if gmm_variant else 0.0, **gmm)
    stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    for s in (ours, stock):
        s.set_timesteps(STEPS, device)
    t = ours.timesteps[i]
    ours.prepare_gmm(x)

    def step(s):
        s._step_index = i  # the base class counts steps; keep stepping the same one
        return s.step(m, t, x)

    return {
        "ours": lambda: step(ours),
        "bare_op": _bare_op(ours, x, m, i, "flow", return_pred_original=False),  # its output has no x0
        "diffusers": None if gmm_variant else (lambda: step(stock)),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gmm", [None, "ortho-vub"])
@pytest.mark.parametrize("family", ["ddim", "flow"])
@pytest.mark.parametrize("name", ["ours", "bare_op", "diffusers"])
def test_scheduler_step(benchmark, name, family, gmm, device):
    fn = _cases(family, gmm, device)[name]
    if fn is None:
        pytest.skip("diffusers has no GMM step")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()

    def run():
        fn()
        sync()

    benchmark(run)


# -- DDPM and Euler: each fused scheduler's step next to its diffusers base class, on two CPU shapes -----------
def _new_family_case(family, which, shape, generator):
    """One step (the middle one of a 50-step schedule) of ``family`` by ours or by the diffusers base class,
    with a torch.Generator (noise drawn by randn_tensor on both sides, as diffusers draws it) or without one
    (ours: the in-kernel Philox stream of seed 0; diffusers: randn_tensor from the global generator)."""
    from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    from ddim_gmm_ext.diffusers import (
        DDPMGMMScheduler,
        EulerAncestralDiscreteGMMScheduler,
        EulerDiscreteGMMScheduler,
    )

    classes = {
        "ddpm": (DDPMGMMScheduler, DDPMScheduler),
        "euler": (EulerDiscreteGMMScheduler, EulerDiscreteScheduler),
        "euler_a": (EulerAncestralDiscreteGMMScheduler, EulerAncestralDiscreteScheduler),
    }[family]
    # ours with seed=0 where the class has the key (DDPM, Euler ancestral; Euler is deterministic): without a
    # generator the noise is the in-kernel Philox stream (with seed None and the GMM off it would be torch's
    # global RNG, drawn exactly as the stock class draws it)
    s = (classes[0](**({} if family == "euler" else {"seed": 0}))) if which == "ours" else classes[1]()
    s.set_timesteps(STEPS)
    x, m = torch.randn(shape), torch.randn(shape)
    i = STEPS // 2
    t = s.timesteps[i]
    gen = torch.Generator().manual_seed(0) if generator else None
    s.is_scale_input_called = True  # as after a pipeline's scale_model_input (else Euler logs a warning per step)
    if family == "ddpm":
        return lambda: s.step(m, t, x, generator=gen)

    def step():
        s._step_index = i  # the base class counts steps; keep stepping the same one
        return s.step(m, t, x, generator=gen)

    return step


@pytest.mark.parametrize("generator", [False, True], ids=["no_generator", "generator"])
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (4, 4, 128, 128)], ids=["1x4x64x64", "4x4x128x128"])
@pytest.mark.parametrize("family", ["ddpm", "euler", "euler_a"])
@pytest.mark.parametrize("which", ["ours", "diffusers"])
def test_new_scheduler_step_vs_base(benchmark, which, family, shape, generator):
    benchmark(_new_family_case(family, which, shape, generator))


# -- DPM-Solver++ multistep: the fused step and a whole loop next to DPMSolverMultistepScheduler ---------------
DPM_STEPS = 20
#: dpmsolver++ (order 2, karras sigmas) and sde-dpmsolver++ (order 2, default sigmas)
DPM_ALGORITHMS = {"dpmsolver++": {"use_karras_sigmas": True}, "sde-dpmsolver++": {}}


def _dpm_scheduler(which, algorithm):
    """Ours with ``seed=0`` (no generator: the SDE noise is the in-kernel Philox stream; with the GMM off and seed
    None it would be torch's global RNG drawn exactly as the stock class draws it), or the stock class."""
    from diffusers import DPMSolverMultistepScheduler

    from ddim_gmm_ext.diffusers import DPMSolverMultistepGMMScheduler

    config = dict(algorithm_type=algorithm, solver_order=2, **DPM_ALGORITHMS[algorithm])
    return (
        DPMSolverMultistepGMMScheduler(seed=0, **config) if which == "ours" else DPMSolverMultistepScheduler(**config)
    )


def _multistep_case(s, shape, generator):
    """The middle step of a 20-step schedule of the multistep scheduler ``s``, after the steps before it (so the
    history and the order count are a real run's), re-run in place: the history keeps its length (the newest
    output replaces the oldest)."""
    s.set_timesteps(DPM_STEPS)
    x, m = torch.randn(shape), torch.randn(shape)
    # no generator keyword without a generator: UniPC's step has none
    gen = {"generator": torch.Generator().manual_seed(0)} if generator else {}
    i = DPM_STEPS // 2
    for t in s.timesteps[:i]:
        s.step(m, t, x, **gen)
    t = s.timesteps[i]

    def step():
        s._step_index = i  # the base class counts steps; keep stepping the same one
        return s.step(m, t, x, **gen)

    return step


def _dpm_case(which, algorithm, shape, generator):
    return _multistep_case(_dpm_scheduler(which, algorithm), shape, generator)


def _unipc_case(which, shape):
    """UniPC (bh2, order 2, the corrector on: diffusers' defaults) at the middle step of 20; deterministic."""
    from diffusers import UniPCMultistepScheduler

    from ddim_gmm_ext.diffusers import UniPCMultistepGMMScheduler

    cls = UniPCMultistepGMMScheduler if which == "ours" else UniPCMultistepScheduler
    return _multistep_case(cls(), shape, generator=False)


def _dpm_loop_case(which, algorithm, generator, shape=(1, 4, 64, 64), steps=DPM_STEPS):
    """A whole pipeline-style call under no_grad: set_timesteps, then ``steps`` steps of a 3x3-convolution model
    (cheap, so the scheduler's share shows; run_loop_bench.py's model) and the scheduler step."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(shape[1], shape[1], 3, padding=1).eval()
    s = _dpm_scheduler(which, algorithm)
    x_T = torch.randn(shape)

    def loop():
        gen = torch.Generator().manual_seed(0) if generator else None
        with torch.no_grad():
            s.set_timesteps(steps)
            x = x_T
            for t in s.timesteps:
                x = s.step(conv(x), t, x, generator=gen).prev_sample
        return x

    return loop


@pytest.mark.parametrize("generator", [False, True], ids=["no_generator", "generator"])
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (4, 4, 128, 128)], ids=["1x4x64x64", "4x4x128x128"])
@pytest.mark.parametrize("algorithm", list(DPM_ALGORITHMS))
@pytest.mark.parametrize("which", ["ours", "diffusers"])
def test_dpm_step_vs_base(benchmark, which, algorithm, shape, generator):
    benchmark(_dpm_case(which, algorithm, shape, generator))


@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (4, 4, 128, 128)], ids=["1x4x64x64", "4x4x128x128"])
@pytest.mark.parametrize("which", ["ours", "diffusers"])
def test_unipc_step_vs_base(benchmark, which, shape):
    benchmark(_unipc_case(which, shape))


@pytest.mark.parametrize("generator", [False, True], ids=["no_generator", "generator"])
@pytest.mark.parametrize("algorithm", list(DPM_ALGORITHMS))
@pytest.mark.parametrize("which", ["ours", "diffusers"])
def test_dpm_loop_vs_base(benchmark, which, algorithm, generator):
    benchmark(_dpm_loop_case(which, algorithm, generator))


# -- LCM, TCD and flow-matching LCM: the fused consistency steps next to their diffusers base classes -----------
CONSISTENCY_STEPS = 8
#: family -> (ours, stock class name, step keywords): TCD at the eta of its model cards (0.3, re-noising)
CONSISTENCY = {
    "lcm": ("LCMGMMScheduler", "LCMScheduler", {}),
    "tcd": ("TCDGMMScheduler", "TCDScheduler", {"eta": 0.3}),
    "flow_lcm": ("FlowMatchLCMGMMScheduler", "FlowMatchLCMScheduler", {}),
}


def _consistency_case(family, which, shape, generator):
    """A re-noising step (the middle one of an 8-step schedule) of ``family`` by ours (``seed=0``: without a
    generator the noise is the in-kernel Philox stream) or by the diffusers base class (randn_tensor from the
    generator, or from the global one)."""
    import diffusers

    import ddim_gmm_ext.diffusers as ours_module

    ours_name, stock_name, kw = CONSISTENCY[family]
    s = getattr(ours_module, ours_name)(seed=0) if which == "ours" else getattr(diffusers, stock_name)()
    s.set_timesteps(CONSISTENCY_STEPS)
    x, m = torch.randn(shape), torch.randn(shape)
    i = CONSISTENCY_STEPS // 2
    t = s.timesteps[i]
    gen = torch.Generator().manual_seed(0) if generator else None
    s.step(m, t, x, generator=gen, **kw)  # the first step: TCD's rows for this eta are built here

    def step():
        s._step_index = i  # the base class counts steps; keep stepping the same one
        return s.step(m, t, x, generator=gen, **kw)

    return step


# -- DPM++ SDE: one step (its two model evaluations) and a loop next to DPMSolverSDEScheduler, same noise source --
SDE_STEPS = 20
SDE_LOOP_STEPS = 10  # 19 model evaluations


class _FixedNoise:
    """A noise sampler that returns one precomputed tensor: both sides timed without the Brownian tree."""

    def __init__(self, z):
        self.z = z

    def __call__(self, sigma, sigma_next):
        return self.z


def _sde_scheduler(which):
    """Ours (GMM off) or the stock class, Karras sigmas (the "DPM++ SDE Karras" of model cards), a fixed tree seed."""
    from diffusers import DPMSolverSDEScheduler

    from ddim_gmm_ext.diffusers import DPMSolverSDEGMMScheduler

    cls = DPMSolverSDEGMMScheduler if which == "ours" else DPMSolverSDEScheduler
    return cls(use_karras_sigmas=True, noise_sampler_seed=0)


def _sde_case(which, shape):
    """One DPM++ SDE step at the middle of a 20-step schedule, both model evaluations (stage 1, then stage 2 from
    the step's sample), each side with the same fixed-noise sampler: the step without the tree
    (:func:`_sde_loop_case` times the tree)."""
    s = _sde_scheduler(which)
    s.set_timesteps(SDE_STEPS)
    x, m = torch.randn(shape), torch.randn(shape)
    s.noise_sampler = _FixedNoise(torch.randn(shape))
    i = SDE_STEPS  # an even position: a step's first evaluation
    t1, t2 = s.timesteps[i], s.timesteps[i + 1]

    def step():
        s._step_index = i  # the base class counts evaluations; keep stepping the same pair
        mid = s.step(m, t1, x).prev_sample
        return s.step(m, t2, mid)

    return step


# -- EDM Euler and EDM DPM-Solver++: the fused step next to diffusers' EDM schedulers ---------------------------
#: EDM Euler, EDM DPM-Solver++ (Playground v2.5's config: order 2, karras, sigma_data 0.5) and its SDE variant
EDM_CASES = {
    "edm_euler": {},
    "edm_dpm": {"algorithm_type": "dpmsolver++"},
    "edm_sde_dpm": {"algorithm_type": "sde-dpmsolver++"},
}


def _edm_case(which, family, shape, generator=False):
    """The middle step of a 20-step EDM schedule (the steps before it taken, so the multistep history and order
    are a real run's), re-run in place. Ours with ``seed=0`` where it draws noise (no generator: the Philox stream;
    with a generator both draw randn_tensor as diffusers does)."""
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    from ddim_gmm_ext.diffusers import EDMDPMSolverMultistepGMMScheduler, EDMEulerGMMScheduler

    if family == "edm_euler":
        s = EDMEulerGMMScheduler() if which == "ours" else EDMEulerScheduler()
        s.is_scale_input_called = True  # as after a pipeline's scale_model_input (else a warning per step)
        s.set_timesteps(DPM_STEPS)
        x, m = torch.randn(shape), torch.randn(shape)
        i = DPM_STEPS // 2
        t = s.timesteps[i]

        def step():
            s._step_index = i  # the base class counts steps; keep stepping the same one
            return s.step(m, t, x)

        return step
    config = EDM_CASES[family]
    seed = {"seed": 0} if config["algorithm_type"].startswith("sde") else {}
    s = (
        EDMDPMSolverMultistepGMMScheduler(**config, **seed)
        if which == "ours"
        else EDMDPMSolverMultistepScheduler(**config)
    )
    return _multistep_case(s, shape, generator)


@pytest.mark.parametrize("generator", [False, True], ids=["no_generator", "generator"])
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (4, 4, 128, 128)], ids=["1x4x64x64", "4x4x128x128"])
@pytest.mark.parametrize("family", list(CONSISTENCY))
@pytest.mark.parametrize("which", ["ours", "diffusers"])
def test_consistency_step_vs_base(benchmark, which, family, shape, generator):
    benchmark(_consistency_case(family, which, shape, generator))


@pytest.mark.parametrize("generator", [False, True], ids=["no_generator", "generator"])
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (4, 4, 128, 128)], ids=["1x4x64x64", "4x4x128x128"])
@pytest.mark.parametrize("family", list(EDM_CASES))
@pytest.mark.parametrize("which", ["ours", "diffusers"])
def test_edm_step_vs_base(benchmark, which, family, shape, generator):
    if generator and family != "edm_sde_dpm":
        pytest.skip("deterministic: no noise to draw")
    benchmark(_edm_case(which, family, shape, generator))


def _sde_loop_case(which, shape, tree):
    """A whole 10-step loop (set_timesteps and 19 evaluations) with one fixed model output (the scheduler's
    share only): with diffusers' Brownian tree (``tree``; a fresh one per loop, as set_timesteps drops it) or the
    fixed-noise sampler on both sides. The difference of the two is what the tree costs."""
    s = _sde_scheduler(which)
    x_T, m, z = torch.randn(shape), torch.randn(shape), torch.randn(shape)

    def loop():
        s.set_timesteps(SDE_LOOP_STEPS)
        if not tree:
            s.noise_sampler = _FixedNoise(z)
        x = x_T
        for t in s.timesteps:
            x = s.step(m, t, x).prev_sample
        return x

    return loop


@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (4, 4, 128, 128)], ids=["1x4x64x64", "4x4x128x128"])
@pytest.mark.parametrize("which", ["ours", "diffusers"])
def test_dpm_sde_step_vs_base(benchmark, which, shape):
    benchmark(_sde_case(which, shape))


@pytest.mark.parametrize("tree", [False, True], ids=["fixed_noise", "brownian_tree"])
@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (4, 4, 128, 128)], ids=["1x4x64x64", "4x4x128x128"])
@pytest.mark.parametrize("which", ["ours", "diffusers"])
def test_dpm_sde_loop_vs_base(benchmark, which, shape, tree):
    benchmark(_sde_loop_case(which, shape, tree))
