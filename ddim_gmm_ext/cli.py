"""The ``ddim-gmm`` command line.

``ddim-gmm demo`` compares DDIM with every DDIM-GMM variant on the analytic digits mixture
(:mod:`ddim_gmm_ext.analytic`), where the exact denoiser and the exact density are known: for each sampler it
reports the sliced Wasserstein distance to fresh samples of the mixture and the negative log-likelihood of its
samples, over paired seeds (every sampler of a seed starts from the same noise and draws the same step noise).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from . import reference
from .api import ddim_step
from .gmm import GMM

# The paper's training schedule (its appendix A.5) and latent-diffusion's DDIM timesteps (leading, +1, the
# last step going to abar_0).
BETAS = dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="linear")
GMM_VARIANTS = ("rand", "ortho", "ortho-vub", "ortho-vub*")


def vp_schedule(steps: int):
    """[(abar_t, abar_prev)] in sampling order."""
    abar = reference.alphas_cumprod(reference.make_betas(**BETAS)).double()
    timesteps, prev = reference.ddim_timesteps(steps, 1000, "leading", steps_offset=1)
    return [(abar[t], abar[p] if p >= 0 else abar[0]) for t, p in zip(timesteps, prev)]


def sample_ddim(eps_model, x_T, steps: int, eta: float, gmms, seed: int) -> list[torch.Tensor]:
    """DDIM(-GMM) sampling loops of an epsilon model ``eps_model(x, abar_t)``, one per entry of ``gmms``
    (None = DDIM), all from ``x_T`` with the same step noise (paired); the model sees one stacked batch."""
    xs = [x_T] * len(gmms)
    for i, (abar_t, abar_prev) in enumerate(vp_schedule(steps)):
        eps = eps_model(torch.cat(xs), float(abar_t)).split(len(x_T))
        xs = [ddim_step(e, x, abar_t, abar_prev, eta=eta, gmm=gmm, step_index=i, seed=seed).prev_sample
              for e, x, gmm in zip(eps, xs, gmms)]  # fmt: skip
    return xs


def samplers(scales):
    yield "DDIM", None, None
    for variant in GMM_VARIANTS:
        for s in scales:
            yield f"GMM-{variant.upper()} s={s:g}", variant, s


def run_demo(args) -> dict:
    from .analytic import DigitsMixture, sliced_wasserstein

    start = time.perf_counter()
    mixture = DigitsMixture(sigma0=args.sigma0)
    rows: dict = {}
    for seed in args.seeds:
        x_T = torch.randn(args.samples, mixture.dim, generator=torch.Generator().manual_seed(seed))
        fresh = mixture.sample(args.samples, torch.Generator().manual_seed(10_000 + seed))
        for steps in args.steps:
            names, gmms = [], []
            for name, variant, scale in samplers(args.scales):
                names.append(name)
                gmms.append(None if variant is None else GMM.create(
                    mixture.dim, n_components=args.components, n_steps=steps, scale=scale, variant=variant,
                    seed=seed))  # fmt: skip
            for eta in args.etas:
                for name, x0 in zip(names, sample_ddim(mixture.eps, x_T, steps, eta, gmms, seed)):
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
    names = [name for name, _, _ in samplers(args.scales)]
    print(
        f"ddim-gmm demo: analytic digits mixture (1797 x 64, sigma0 = {args.sigma0}), exact epsilon model;\n"
        f"{args.samples} samples per run, seeds {args.seeds} (paired: same x_T and step noise for every sampler), "
        f"K = {args.components}, uniform priors.\n"
        "SW = sliced Wasserstein-2 to fresh mixture samples (lower is better); NLL = exact negative "
        "log-likelihood, nats/sample (lower is better). mean±std over seeds.",
        file=out,
    )
    header = "".join(f"{'SW@' + str(s):>15}" for s in args.steps) + "".join(f"{'NLL@' + str(s):>16}" for s in args.steps)
    for eta in args.etas:
        print(f"\neta = {eta:g}\n{'sampler':<22}{header}", file=out)
        for name in names:
            cells = [_fmt(rows[(eta, name, s)]["sw"]) for s in args.steps]
            cells += [f"{_fmt(rows[(eta, name, s)]['nll']):>16}" for s in args.steps]
            print(f"{name:<22}" + "".join(f"{c:>15}" if i < len(args.steps) else c for i, c in enumerate(cells)), file=out)
    print(f"\ntime: {result['seconds']:.1f} s", file=out)


def _write_json(path, args, result) -> None:
    rows = [
        {"eta": eta, "sampler": name, "steps": steps, **values}
        for (eta, name, steps), values in result["rows"].items()
    ]
    with open(path, "w") as f:
        json.dump({"config": {k: v for k, v in vars(args).items() if k != "func"}, "rows": rows,
                   "seconds": result["seconds"]}, f, indent=1)  # fmt: skip


def cmd_demo(args) -> int:
    result = run_demo(args)
    print_table(args, result)
    if args.json:
        _write_json(args.json, args, result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddim-gmm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="DDIM vs DDIM-GMM on the analytic digits mixture (under a minute on CPU)")
    demo.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="paired seeds (default 0 1 2)")
    demo.add_argument("--samples", type=_positive_int, default=500, help="samples per run (default 500)")
    demo.add_argument("--steps", type=_positive_int, nargs="+", default=[5, 10, 20])
    demo.add_argument("--etas", type=_nonnegative_float, nargs="+", default=[0.0, 1.0])
    demo.add_argument("--scales", type=_nonnegative_float, nargs="+", default=[0.1, 1.0], help="offset scale s")
    demo.add_argument("--components", type=_positive_int, default=8, help="K (default 8)")
    demo.add_argument("--sigma0", type=float, default=0.1, help="width of each mixture component (default 0.1)")
    demo.add_argument("--json", help="also write the results to this JSON file")
    demo.set_defaults(func=cmd_demo)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv=None) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
