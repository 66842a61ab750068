"""The ``ddim-gmm`` command line.

``ddim-gmm demo`` samples the shipped digits model (:mod:`ddim_gmm_ext.digits`) with DDIM and
DDIM-GMM-ORTHO-VUB at 10 steps from the same noise, writes the samples side by side to a PNG and prints
digits-FD, precision and recall of both. ``--model analytic`` compares DDIM with every DDIM-GMM variant on the
analytic digits mixture (:mod:`ddim_gmm_ext.analytic`), whose exact denoiser and density are known: sliced
Wasserstein distance to fresh mixture samples and negative log-likelihood, over paired seeds.

``ddim-gmm eval`` runs the paper's sweep (:mod:`ddim_gmm_ext.evaluate`); ``ddim-gmm train-digits`` trains
the shipped networks.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ._checks import FINAL_STEPS, check_seed
from .quality.sampling import GMM_VARIANTS, make_gmms, sample_ddim, samplers

# The digits demo's setting: at 10 steps the paper's gains, and ours (benchmarks/results/quality_digits.json),
# are largest at eta = 1, where s = 1 is ORTHO-VUB's best offset scale.
DIGITS_DEMO_ETA, DIGITS_DEMO_SCALE = 1.0, 1.0


def run_demo(args) -> dict:
    """The analytic benchmark: {"rows": {(eta, sampler, steps): {"sw": [per seed], "nll": [per seed]}},
    "seconds"}."""
    from .quality.analytic import DigitsMixture, sliced_wasserstein

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


def print_table(args, result, out=None) -> None:
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


def _write_json(path, args, result) -> None:
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


# Defaults of `demo` per model: the analytic benchmark sweeps; the digits demo is one paired comparison.
DEMO_DEFAULTS = {
    "analytic": dict(seeds=[0, 1, 2], samples=500, steps=[5, 10, 20], etas=[0.0, 1.0], scales=[0.1, 1.0], sigma0=0.1),
    "digits": dict(
        seeds=[0], samples=1000, steps=[10], etas=[DIGITS_DEMO_ETA], scales=[DIGITS_DEMO_SCALE], png="ddim_gmm_demo.png"
    ),
}


def cmd_demo(args) -> int:
    if args.model == "digits" and args.sigma0 is not None:
        args.error("--sigma0 applies to --model analytic only")
    if args.model == "digits" and args.upsample != 1:
        args.error("--upsample applies to --model analytic only")
    for name, value in DEMO_DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.model == "analytic":
        if args.png:
            args.error("--png applies to --model digits only")
        result = run_demo(args)
        print_table(args, result)
        if args.json:
            _write_json(args.json, args, result)
        return 0
    for name in ("steps", "etas", "scales"):
        if len(getattr(args, name)) != 1:
            args.error(f"--model digits takes one value of --{name}, got {getattr(args, name)}")
    return digits_demo(args)


def digits_demo(args) -> int:
    """DDIM vs DDIM-GMM-ORTHO-VUB on the shipped eps model: metrics per seed and their mean, and a PNG of the
    first seed's first 64 samples of each sampler (same initial noise, same position)."""
    from .quality import evaluate
    from .quality.metrics import DigitsQuality

    start = time.perf_counter()
    sweep = evaluate.Sweep(
        steps=tuple(args.steps),
        etas=tuple(args.etas),
        variants=("ortho-vub",),
        scales=tuple(args.scales),
        components=args.components,
        samples=args.samples,
        seeds=tuple(args.seeds),
        final_step=args.final_step,
        scale_per_dim=args.scale_per_dim,
    )
    try:
        sweep.check()
    except ValueError as error:
        args.error(str(error))
    model, quality = evaluate.load_model("digits"), DigitsQuality()
    steps, eta = args.steps[0], args.etas[0]
    per_seed = [
        evaluate.sample_and_score(model, sweep, steps, eta, seed, quality, progress=True) for seed in args.seeds
    ]
    print(
        f"ddim-gmm demo: shipped digits eps model, {steps} steps, eta = {eta:g}, K = {args.components}, "
        f"s = {args.scales[0]:g}; {args.samples} samples per seed, seeds {args.seeds} (paired: same x_T and "
        "step noise).\ndigits-FD (lower is better), precision and recall (k = 3, higher is better) on the "
        "shipped classifier's features against the 1797 real digits; mean over seeds."
    )
    print(f"\n{'sampler':<24}{'digits-FD':>10}{'precision':>11}{'recall':>8}")
    results = []
    for i, (name, *_) in enumerate(per_seed[0]):
        mean = {m: statistics.fmean(run[i][4][m] for run in per_seed) for m in evaluate.METRICS}
        results.append({"sampler": name, **mean})
        print(f"{name:<24}{mean['fd']:>10.2f}{mean['precision']:>11.3f}{mean['recall']:>8.3f}")
    ref = evaluate.real_reference(sweep, quality)
    print(f"{'real digits (subset)':<24}{ref['fd']:>10.2f}{ref['precision']:>11.3f}{ref['recall']:>8.3f}")
    save_grid([(name, x0) for name, _, _, x0, _ in per_seed[0]], args.png)
    print(f"\nsamples: {args.png}\ntime: {time.perf_counter() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "config": {k: v for k, v in vars(args).items() if k not in ("func", "error")},
                    "rows": results,
                    "reference": ref,
                },
                f,
                indent=1,
                default=str,
            )
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


def cmd_eval(args) -> int:
    from .quality import evaluate
    from .quality.metrics import DigitsQuality

    settings: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in _eval_settings(args).items()}
    sweep = evaluate.Sweep(family=args.family, **settings)
    try:
        sweep.check()
        model = evaluate.load_model(args.model, args.family)
    except ValueError as error:
        args.error(str(error))
    result = evaluate.run(model, sweep, DigitsQuality(), progress=not args.no_progress)
    paths = evaluate.write_outputs(result, sweep, args.out, args.model)
    print((Path(args.out) / "table.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths) + f" in {result['seconds']:.0f} s")
    return 0


# The paper's grids (Fig. 1 / Table 8 for ddim, Table 1 for rfim) and the --quick ones.
EVAL_DEFAULTS = {
    "ddim": dict(steps=[5, 10, 20, 50], etas=[0.0, 0.2, 0.5, 1.0], scales=[0.01, 0.1, 1.0, 10.0]),
    "rfim": dict(steps=[2, 5, 10], etas=[0.0, 0.2, 0.5], scales=[0.01, 0.1, 1.0, 10.0]),
}
EVAL_QUICK = {
    "ddim": dict(steps=[5, 10, 20], etas=[0.0, 0.5, 1.0], scales=[0.1, 1.0], samples=500, seeds=[0, 1]),
    "rfim": dict(steps=[2, 5, 10], etas=[0.0, 0.5], scales=[0.1, 1.0], samples=500, seeds=[0, 1]),
}


def _eval_settings(args) -> dict[str, Any]:
    """The sweep settings: explicit options, else --quick's, else the family's paper grid."""
    defaults = dict(EVAL_DEFAULTS[args.family], variants=list(GMM_VARIANTS), samples=1000, seeds=[0, 1, 2, 3, 4])
    if args.quick:
        defaults.update(EVAL_QUICK[args.family])
    settings = {
        k: getattr(args, k) if getattr(args, k) is not None else defaults[k]
        for k in ("steps", "etas", "scales", "variants", "samples", "seeds")
    }
    return settings | {
        "components": args.components,
        "final_step": args.final_step,
        "scale_per_dim": args.scale_per_dim,
        "precision_floor": args.precision_floor,
        "controls": not args.no_controls,
    }


def cmd_train_digits(args) -> int:
    from .quality import digits

    iters = args.iters or (3000 if args.net == "classifier" else 10_000)
    progress = not args.no_progress
    info = digits.train(args.net, args.out, iters, args.batch, args.lr, args.seed, progress=progress)
    print(json.dumps(info, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddim-gmm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="DDIM vs DDIM-GMM on the shipped digits model (under a minute on CPU)")
    demo.add_argument(
        "--model",
        choices=("digits", "analytic"),
        default="digits",
        help="digits: the shipped trained eps model (default); analytic: the exact-denoiser "
        "mixture benchmark over every variant",
    )
    demo.add_argument("--seeds", type=_seed, nargs="+", help="paired seeds (digits: 0; analytic: 0 1 2)")
    demo.add_argument("--samples", type=_positive_int, help="samples per run (digits: 1000; analytic: 500)")
    demo.add_argument("--steps", type=_ddim_steps, nargs="+", help="digits: 10; analytic: 5 10 20")
    demo.add_argument("--etas", type=_eta, nargs="+", help=f"digits: {DIGITS_DEMO_ETA:g}; analytic: 0 1")
    demo.add_argument(
        "--scales",
        type=_nonnegative_float,
        nargs="+",
        help=f"offset scale s (digits: {DIGITS_DEMO_SCALE:g}; analytic: 0.1 1)",
    )
    demo.add_argument("--components", type=_components, default=8, help="K (default 8)")
    demo.add_argument("--sigma0", type=_positive_float, help="analytic: width of each mixture component (default 0.1)")
    demo.add_argument(
        "--upsample",
        type=_positive_int,
        default=1,
        help="analytic: digits upsampled to 8u x 8u (D = 64 u^2; 4: D = 1024) to compare dimensions",
    )
    demo.add_argument(
        "--png", type=_output_file, help="digits: where to write the sample grid (default ddim_gmm_demo.png)"
    )
    demo.add_argument("--json", type=_output_file, help="also write the results to this JSON file")
    demo.add_argument(
        "--final-step",
        choices=FINAL_STEPS,
        default="gaussian",
        help="gaussian (default, the paper's model): no mixture on the last step; gmm: offsets on every step",
    )
    demo.add_argument(
        "--scale-per-dim",
        action="store_true",
        help="read --scales as per-coordinate scales: s = value * sqrt(D), the same meaning at every D",
    )
    demo.set_defaults(func=cmd_demo, error=demo.error)

    ev = sub.add_parser(
        "eval", help="the paper's sweep on a digits model: CSV/JSON, Fig. 1 style plot, Table 8 style table"
    )
    ev.add_argument(
        "--model",
        default="digits",
        help="'digits' (shipped) or 'module:callable': eps(x [B, 64], "
        "t [B] int64 timesteps) for ddim, v(x [B, 64], t [B] float in [0, 1]) for rfim",
    )
    ev.add_argument("--family", choices=tuple(EVAL_DEFAULTS), default="ddim", help="ddim (default) or rfim")
    ev.add_argument("--steps", type=_positive_int, nargs="+", help="ddim: 5 10 20 50; rfim: 2 5 10")
    ev.add_argument("--etas", type=_eta, nargs="+", help="ddim: 0 0.2 0.5 1; rfim: 0 0.2 0.5")
    ev.add_argument(
        "--variants", nargs="+", help=f"GMM variants (default all: {' '.join(GMM_VARIANTS)}); the baseline always runs"
    )
    ev.add_argument("--scales", type=_nonnegative_float, nargs="+", help="offset scales s (0.01 0.1 1 10)")
    ev.add_argument("--components", type=_components, default=8, help="K (default 8)")
    ev.add_argument("--samples", type=_positive_int, help="samples per seed and sampler (default 1000)")
    ev.add_argument("--seeds", type=_seed, nargs="+", help="paired seeds (default 0 1 2 3 4)")
    ev.add_argument(
        "--quick",
        action="store_true",
        help="a small grid (ddim: 5, 10, 20 steps, eta 0, 0.5, 1; "
        "rfim: 2, 5, 10 steps, eta 0, 0.5; every variant, s 0.1, 1, 500 samples, seeds 0 1) in a few "
        "minutes; explicit options still apply",
    )
    ev.add_argument("--out", type=_output_folder, default="ddim_gmm_eval", help="output folder (default ddim_gmm_eval)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument(
        "--final-step",
        choices=FINAL_STEPS,
        default="gaussian",
        help="gaussian (default, the paper's model): no mixture on the last step; gmm: offsets on every step",
    )
    ev.add_argument(
        "--scale-per-dim",
        action="store_true",
        help="read --scales as per-coordinate scales: s = value * sqrt(D), the same meaning at every D",
    )
    ev.add_argument(
        "--no-controls",
        action="store_true",
        help="leave out the 'baseline + matched output noise' control of each GMM sampler (run with --final-step gmm)",
    )
    ev.add_argument(
        "--precision-floor",
        type=_unit_float,
        default=0.9,
        help="best-s selection refuses settings whose mean precision is below this fraction of the baseline's "
        "(default 0.9)",
    )
    ev.set_defaults(func=cmd_eval, error=ev.error)

    train = sub.add_parser("train-digits", help="train a shipped digits network (eps, flow, classifier)")
    train.add_argument("--net", choices=("eps", "flow", "classifier"), required=True)
    train.add_argument("--iters", type=_positive_int, help="optimiser steps (default 10000; classifier 3000)")
    train.add_argument("--batch", type=_positive_int, default=256, help="batch size (default 256)")
    train.add_argument("--lr", type=_positive_float, default=1e-3, help="peak learning rate (default 1e-3)")
    train.add_argument("--seed", type=_seed, default=0, help="seed of the initialisation and batches (default 0)")
    train.add_argument(
        "--out",
        default=".",
        type=_output_folder,
        help="folder for digits_<net>.pt / .json (default: current folder; "
        "the shipped files live in ddim_gmm_ext/data)",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train_digits, error=train.error)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _ddim_steps(text: str) -> int:
    value = _positive_int(text)
    if value > 1000:
        raise argparse.ArgumentTypeError(f"must be <= 1000 (the training timesteps), got {value}")
    return value


def _eta(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (c = eta * sigma <= the step's noise budget), got {value}")
    return value


def _components(text: str) -> int:
    value = _positive_int(text)
    if value >= 64:
        raise argparse.ArgumentTypeError(f"K must be < D = 64 (the digits' dimension), got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {value}")
    return value


def _check_writable(folder: Path, text: str) -> None:
    """Create and remove a probe file in ``folder``: the one check that holds for read-only mounts, /proc and
    permissions alike, made before any work starts."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot write into the folder of {text!r}: {err.strerror}") from None


def _output_folder(text: str) -> Path:
    """A folder to write into: an existing directory, or a new one whose parent exists; writable."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    if not path.exists() and not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"the parent folder of {text!r} does not exist")
    _check_writable(path if path.exists() else path.absolute().parent, text)
    return path


def _output_file(text: str) -> Path:
    """A file to write: not a directory, in an existing, writable folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, expected a file name")
    if not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist")
    _check_writable(path.absolute().parent, text)
    return path


def _seed(text: str) -> int:
    try:
        seed = check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {text!r}") from None
    assert seed is not None
    return seed


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv=None) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FloatingPointError as error:  # a model or a training run that went NaN / Inf: say where, exit 1
        print(f"ddim-gmm {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
