"""``ddim-gmm demo``: what the package is for, offline, in seconds on a CPU.

The digits demo (default) samples the shipped digits eps model (:mod:`ddim_gmm_ext.quality.digits`) at the
setting where the project's 5-seed tables show an effect (5 steps, eta 1): DDIM, DDIM-GMM-ORTHO-LR (Gaussian
last step, the package's default), its per-step matched-noise control (DDIM plus white noise of the offsets'
variance at exactly the steps where the mixture acts; :class:`ddim_gmm_ext.quality.sampling.MatchedNoise`),
and the mixture only where it is moment-matched (``gmm_steps="matched"``), each with the fraction of its
mixture steps whose kernel clips. It prints digits-FD, precision and recall as
mean ± std over paired seeds with each sampler's paired difference to DDIM, writes a PNG of the first seed's
samples, and times the fused step against diffusers' ``DDIMScheduler.step`` in the same run.

The analytic demo (``--model analytic``) compares DDIM with every DDIM-GMM variant on the analytic digits
mixture (:mod:`ddim_gmm_ext.quality.analytic`), whose exact denoiser and density are known: sliced Wasserstein
distance to fresh mixture samples and negative log-likelihood, over paired seeds.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
import time

import torch

from ..gmm_options import GMMOptions
from .sampling import make_gmms, sample_ddim, samplers

# The digits demo's setting: the project's 5-seed tables (benchmarks/results/quality_digits.json, README
# "Sample quality") show DDIM-GMM's gain at 5 steps, largest at eta = 1, where s = 1 is ORTHO-LR's best scale
# (-2.25 ± 0.64 digits-FD); from 10 steps on the differences are mostly within the seed-to-seed spread.
DIGITS_STEPS, DIGITS_ETA, DIGITS_VARIANT, DIGITS_SCALE = 5, 1.0, "ortho-lr", 1.0

#: Defaults of ``demo`` per model: the analytic benchmark sweeps; the digits demo is one paired comparison.
DEMO_DEFAULTS = {
    "analytic": dict(
        seeds=[0, 1, 2],
        samples=500,
        steps=[5, 10, 20],
        etas=[0.0, 1.0],
        scales=[0.1, 1.0],
        sigma0=0.1,
        final_step="gaussian",
    ),
    "digits": dict(
        seeds=[0, 1, 2, 3, 4],
        samples=1000,
        steps=[DIGITS_STEPS],
        etas=[DIGITS_ETA],
        scales=[DIGITS_SCALE],
        png="ddim_gmm_demo.png",
    ),
}

# The speed line: one Stable Diffusion latent, the demo's eta, medians of interleaved calls on one thread (on a
# shared 2-core machine two threads measure how busy the other core is).
SPEED_SHAPE, SPEED_CALLS, SPEED_WARMUP = (1, 4, 64, 64), 200, 20


def run_analytic(args) -> dict:
    """The analytic benchmark: {"rows": {(eta, sampler, steps): {"sw": [per seed], "nll": [per seed]}},
    "seconds"}."""
    from .analytic import DigitsMixture, sliced_wasserstein

    start = time.perf_counter()
    mixture = DigitsMixture(sigma0=args.sigma0, upsample=args.upsample)
    sampler_list = list(samplers(args.scales, per_dim=args.scale_per_dim))
    rows: dict = {}
    for seed in args.seeds:
        x_T = torch.randn(args.samples, mixture.dim, generator=torch.Generator().manual_seed(seed))
        fresh = mixture.sample(args.samples, torch.Generator().manual_seed(10_000 + seed))
        for steps in args.steps:
            gmms = make_gmms(sampler_list, mixture.dim, args.components, steps, seed, per_dim=args.scale_per_dim)
            for eta in args.etas:
                x0s = sample_ddim(mixture.eps_model, x_T, steps, eta, gmms, seed, final_step=args.final_step)
                for (name, _, _), x0 in zip(sampler_list, x0s, strict=False):
                    row = rows.setdefault((eta, name, steps), {"sw": [], "nll": []})
                    row["sw"].append(sliced_wasserstein(x0.double(), fresh, seed=seed))
                    row["nll"].append(float(mixture.nll(x0).mean()))
    return {"rows": rows, "seconds": time.perf_counter() - start}


def _fmt(values) -> str:
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:7.3f}±{spread:5.3f}"


def print_analytic(args, result, out=None) -> None:
    out = out or sys.stdout
    rows = result["rows"]
    names = [name for name, _, _ in samplers(args.scales, per_dim=args.scale_per_dim)]
    print(
        f"ddim-gmm demo: analytic digits mixture (1797 x {64 * args.upsample**2}, sigma0 = {args.sigma0}), "
        "exact epsilon model;\n"
        f"{args.samples} samples per run, seeds {args.seeds} (paired: same x_T and step noise for every sampler), "
        f"K = {args.components}, uniform priors.\n"
        "SW = sliced Wasserstein-2 to fresh mixture samples (lower is better); NLL = exact negative "
        "log-likelihood, nats/sample (lower is better). mean±std over seeds.",
        file=out,
    )
    header = "".join(f"{'SW@' + str(s):>15}" for s in args.steps) + "".join(
        f"{'NLL@' + str(s):>16}" for s in args.steps
    )
    for eta in args.etas:
        print(f"\neta = {eta:g}\n{'sampler':<22}{header}", file=out)
        for name in names:
            cells = [_fmt(rows[(eta, name, s)]["sw"]) for s in args.steps]
            cells += [f"{_fmt(rows[(eta, name, s)]['nll']):>16}" for s in args.steps]
            print(
                f"{name:<22}" + "".join(f"{c:>15}" if i < len(args.steps) else c for i, c in enumerate(cells)), file=out
            )
    print(f"\ntime: {result['seconds']:.1f} s", file=out)


def write_analytic_json(path, args, result) -> None:
    rows = [
        {"eta": eta, "sampler": name, "steps": steps, **values} for (eta, name, steps), values in result["rows"].items()
    ]
    with open(path, "w") as f:
        json.dump(
            {
                "config": {k: v for k, v in vars(args).items() if k not in ("func", "error")},
                "rows": rows,
                "seconds": result["seconds"],
            },
            f,
            indent=1,
            default=str,
        )


# Row labels of the digits demo, in print order.
DDIM_ROW, GMM_ROW, CONTROL_ROW, MATCHED_ROW = "DDIM", "DDIM-GMM", "DDIM + matched noise", "DDIM-GMM, matched steps"
ROWS = (DDIM_ROW, GMM_ROW, CONTROL_ROW, MATCHED_ROW)


def run_digits(args) -> dict:
    """Every seed's samples and metrics of the four digits samplers (:data:`ROWS`): {"rows": per (seed, sampler)
    with its "clip_fraction" (None for DDIM and the control), "summary":
    mean ± std over seeds and paired differences to DDIM, "reference", "samples": the first seed's x0 per row,
    "speed", "seconds"}. Runs on one thread (see :func:`one_thread`)."""
    from ..gmm import clipped_fraction, gmm_step_mask
    from . import evaluate
    from .metrics import DigitsQuality
    from .sampling import MatchedNoise, ddim_noise_stds

    start = time.perf_counter()
    sweep = evaluate.Sweep(
        steps=tuple(args.steps),
        etas=tuple(args.etas),
        variants=(DIGITS_VARIANT,),
        scales=tuple(args.scales),
        components=args.components,
        samples=args.samples,
        seeds=tuple(args.seeds),
        scale_per_dim=args.scale_per_dim,
    )
    sweep.check()
    steps, eta = args.steps[0], args.etas[0]
    (sampler,) = samplers(sweep.scales, sweep.variants, None, per_dim=args.scale_per_dim)
    rows, first = [], {}
    stds = ddim_noise_stds(steps, eta)
    g = GMMOptions().final_step_g(steps)  # final_step="gaussian", the default
    with one_thread():
        model, quality = evaluate.load_model("digits"), DigitsQuality()
        for seed in args.seeds:
            x_T = evaluate.sweep_initial_noise(args.samples, evaluate.DIM, seed)
            (gmm,) = make_gmms([sampler], evaluate.DIM, args.components, steps, seed, per_dim=args.scale_per_dim)
            acts = {
                GMM_ROW: gmm_step_mask("all", gmm, stds, g),
                MATCHED_ROW: gmm_step_mask("matched", gmm, stds, g),
            }
            clip = {label: clipped_fraction(gmm, stds, g, mask) for label, mask in acts.items()}
            entries = [None, gmm, MatchedNoise(gmm, tuple(acts[GMM_ROW])), gmm]
            with torch.no_grad():
                x0s = sample_ddim(model, x_T, steps, eta, entries, seed, gmm_steps=["all", "all", "all", "matched"])
            runs = dict(zip(ROWS, x0s, strict=True))
            for label, x0 in runs.items():
                base = label == DDIM_ROW
                fraction = clip.get(label)
                rows.append(
                    {
                        "seed": seed,
                        "steps": steps,
                        "eta": eta,
                        "sampler": label,
                        "variant": None if base else DIGITS_VARIANT,
                        "scale": None if base else sampler[2],
                        "components": None if base else args.components,
                        "clip_fraction": None if fraction is None or math.isnan(fraction) else fraction,
                        **quality(x0),
                    }
                )
            if seed == args.seeds[0]:
                first = runs
        reference = evaluate.real_reference(sweep, quality)
        sampling = time.perf_counter() - start
        speed = step_speed(eta)
    return {
        "rows": rows,
        "summary": evaluate.summarise(rows),
        "reference": reference,
        "samples": first,
        "speed": speed,
        "sampling_seconds": sampling,
        "seconds": time.perf_counter() - start,
    }


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside: the demo's ops are small (1000 x 64 samples, a 128-d covariance), and on a
    busy 2-core machine two threads made them up to 10x slower (each op waiting for the other core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def step_speed(eta: float, shape=SPEED_SHAPE, calls: int = SPEED_CALLS) -> dict | None:
    """Median seconds per call of diffusers' ``DDIMScheduler.step`` and of ``DDIMGMMScheduler.step`` (GMM off,
    and with ORTHO-LR K = 8) at ``shape`` float32, 50-step schedule, ``eta``, no generator, calls interleaved,
    on one thread. None when diffusers is not installed (the ``demo`` extra installs it)."""
    try:
        from diffusers import DDIMScheduler

        from ..integrations.diffusers import DDIMGMMScheduler
    except ImportError:
        return None
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    schedulers = {
        "diffusers": DDIMScheduler(),
        "fused": DDIMGMMScheduler(gmm_variant=None, seed=0),  # seed: the noise is drawn in the kernel
        "fused_ortho_lr": DDIMGMMScheduler(gmm_variant="ortho-lr", gmm_n_components=8, seed=0),
    }
    for scheduler in schedulers.values():
        scheduler.set_timesteps(50)
    t = schedulers["diffusers"].timesteps[10]
    times: dict[str, list[float]] = {name: [] for name in schedulers}
    with one_thread():
        for i in range(SPEED_WARMUP + calls):
            for name, scheduler in schedulers.items():
                t0 = time.perf_counter()
                scheduler.step(eps, t, x, eta=eta)
                if i >= SPEED_WARMUP:
                    times[name].append(time.perf_counter() - t0)
    return {"shape": list(shape), "eta": eta, "calls": calls, **{k: statistics.median(v) for k, v in times.items()}}


def print_digits(args, result, out=None) -> None:
    out = out or sys.stdout
    summary = {e["sampler"]: e for e in result["summary"]}
    steps, eta, n = args.steps[0], args.etas[0], len(args.seeds)
    scale = f"s/vD = {args.scales[0]:g}" if args.scale_per_dim else f"s = {args.scales[0]:g}"
    print(
        f"ddim-gmm demo: the shipped digits eps model, {steps} steps, eta = {eta:g}; GMM {DIGITS_VARIANT.upper()}, "
        f"K = {args.components}, {scale};\n{args.samples} samples x {n} paired seeds {args.seeds} (same x_T and step "
        "noise for every sampler).\ndigits-FD (lower is better), precision and recall (higher is better) on the "
        "shipped classifier's features\nagainst the 1797 real digits: mean ± std over seeds; dFD: paired difference "
        "to DDIM, mean ± std.",
        file=out,
    )
    clips = {r["sampler"]: r["clip_fraction"] for r in result["rows"]}
    print(f"\n{'sampler':<26}{'digits-FD':>14}{'precision':>14}{'recall':>14}{'dFD vs DDIM':>15}{'clips':>7}", file=out)
    for label in ROWS:
        e = summary[label]
        cells = [
            f"{e[m]:.2f}±{e[m + '_std']:.2f}" if m == "fd" else f"{e[m]:.3f}±{e[m + '_std']:.3f}"
            for m in ("fd", "precision", "recall")
        ]
        diff = "" if label == DDIM_ROW else f"{e['fd_diff']:+.2f}±{e['fd_diff_std']:.2f}"
        clip = "" if clips[label] is None else f"{clips[label]:.2f}"
        print(f"{label:<26}" + "".join(f"{c:>14}" for c in cells) + f"{diff:>15}{clip:>7}", file=out)
    ref = result["reference"]
    real = f"{ref['fd']:.2f}", f"{ref['precision']:.3f}", f"{ref['recall']:.3f}"
    print(f"{'real digits (subset)':<26}" + "".join(f"{c:>14}" for c in real), file=out)
    print(
        f"\n{GMM_ROW}: the mixture on steps 1-{steps - 1}, Gaussian last step (the default, the paper's model).\n"
        f"{CONTROL_ROW}: DDIM plus white noise of the offsets' per-coordinate variance at exactly the steps\n"
        f"where {GMM_ROW} mixes: a gain it shares is a noise effect, not moment matching.\n"
        f"{MATCHED_ROW}: the mixture only where nothing clips (gmm_steps='matched').\n"
        "clips: the fraction of the mixture's steps where c^2 < g^2 v_k (its variance term clips, so the offsets\n"
        "add variance that no noise compensates).",
        file=out,
    )
    speed = result["speed"]
    if speed is None:
        print("\nstep speed: diffusers is not installed, comparison with DDIMScheduler.step skipped", file=out)
    else:
        us = {k: 1e6 * speed[k] for k in ("diffusers", "fused", "fused_ortho_lr")}
        print(
            f"\nstep speed, {speed['shape']} float32, eta = {speed['eta']:g}, no generator, one thread, median of "
            f"{speed['calls']} interleaved calls:\nDDIMGMMScheduler.step {us['fused']:.0f} us (GMM off; seed=0: noise "
            "drawn in the kernel), "
            f"{us['fused_ortho_lr']:.0f} us (ORTHO-LR, K = 8); diffusers DDIMScheduler.step {us['diffusers']:.0f} us: "
            f"{us['diffusers'] / us['fused']:.1f}x with the GMM off.",
            file=out,
        )
    print(
        f"\nsamples: {args.png}\ntime: {result['seconds']:.1f} s ({result['sampling_seconds']:.1f} s sampling and "
        "scoring)",
        file=out,
    )


def digits_demo(args) -> int:
    result = run_digits(args)
    print_digits(args, result)
    save_grid([(label, x0) for label, x0 in result["samples"].items()], args.png)
    if args.json:
        with open(args.json, "w") as f:
            payload = {k: result[k] for k in ("rows", "summary", "reference", "speed", "seconds")}
            config = {k: v for k, v in vars(args).items() if k not in ("func", "error")}
            json.dump({"config": config, **payload}, f, indent=1, default=str)
    return 0


def analytic_demo(args) -> int:
    result = run_analytic(args)
    print_analytic(args, result)
    if args.json:
        write_analytic_json(args.json, args, result)
    return 0


def save_grid(named_samples, path, n: int = 64) -> None:
    """One panel per (name, samples [N, 64]) with the first min(n, N) samples, rounded down to a square, as
    8x8 images, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = math.isqrt(min(n, len(named_samples[0][1])))
    fig, axes = plt.subplots(1, len(named_samples), figsize=(3.6 * len(named_samples), 3.9), squeeze=False)
    for ax, (name, x) in zip(axes[0], named_samples, strict=False):
        imgs = x[: side * side].reshape(side, side, 8, 8).clamp(-1, 1)
        imgs = torch.nn.functional.pad(imgs, (0, 1, 0, 1), value=1.0)  # white lines between the digits
        ax.imshow(imgs.permute(0, 2, 1, 3).reshape(side * 9, side * 9).numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
