"""The paper's sample-quality protocol on 8x8 digits models: sweep steps, eta, GMM variant, offset scale s and
K with paired seeds, score every sampler with digits-FD, precision and recall (:mod:`ddim_gmm_ext.quality.metrics`),
and write CSV / JSON, a figure in the style of the paper's Fig. 1 and a table in the style of its Table 8.

Two families: "ddim" (an epsilon model on the paper's VP schedule, DDIM vs DDIM-GMM-*) and "rfim" (a
rectified-flow velocity model, RFIM vs RFIM-GMM-*, the paper's Table 1). Models are given as "digits" (the
shipped network of the family) or "module:callable" (see :mod:`ddim_gmm_ext.quality.digits` for the call contract).

Two data sets: "digits" (D = 64, digits-FD on the digits classifier) and "fashion" (Fashion-MNIST, D = 784,
``--model fashion``: fashion-FD on the Fashion-MNIST classifier, precision / recall, and with ``fid`` the
Inception FID; :mod:`ddim_gmm_ext.quality.fid`). The fashion sweep draws x_T from the Philox stream of the global
sample index (:func:`ddim_gmm_ext.quality.sampling.initial_noise`) and runs under ``torchrun``, each rank
sampling a slice of the samples (:mod:`ddim_gmm_ext.quality.distributed`); the digits sweep keeps its
``torch.randn`` x_T, so its published tables reproduce, and runs in one process.
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._checks import check_final_step, check_seed
from ..gmm import clipped_fraction, gmm_step_mask, validate_gmm_steps
from ..gmm_options import GMMOptions
from . import distributed
from .sampling import (
    GMM_VARIANTS,
    MAX_DDIM_STEPS,
    MatchedNoise,
    check_final_alpha,
    ddim_noise_stds,
    make_gmms,
    rfim_noise_stds,
    sample_ddim,
    sample_rfim,
    samplers,
)
from .sampling import initial_noise as philox_initial_noise

DIM = 64
#: data set -> (dimension D, FD label, real-set description)
DATASETS = {
    "digits": (64, "digits-FD", "the 1797 scikit-learn digits"),
    "fashion": (784, "fashion-FD", "Fashion-MNIST's 10,000 test images"),
}
NOISES = ("torch", "philox")
FAMILIES: dict[str, tuple[str, Callable[..., list], str]] = {
    "ddim": ("DDIM", sample_ddim, "eps"),
    "rfim": ("RFIM", sample_rfim, "flow"),
}
METRICS = ("fd", "precision", "recall")
#: the variant of a GMM sampler's matched-noise control is this prefix + the GMM's variant ("noise~ortho-lr")
CONTROL_PREFIX = "noise~"


@dataclass
class Sweep:
    """One evaluation grid; every (seed, steps, eta) runs all samplers on the same x_T and step noise."""

    family: str = "ddim"
    steps: tuple = (5, 10, 20, 50)
    etas: tuple = (0.0, 0.2, 0.5, 1.0)
    variants: tuple = GMM_VARIANTS
    scales: tuple = (0.01, 0.1, 1.0, 10.0)
    components: int = 8
    samples: int = 1000
    seeds: tuple = (0, 1, 2, 3, 4)
    final_step: str = "gaussian"
    scale_per_dim: bool = False  # the scales are per-coordinate: s = scale * sqrt(64)
    precision_floor: float = 0.9  # best-s selection refuses a mean precision below this fraction of the baseline's
    # add per GMM sampler "DDIM + matched noise": white noise of the offsets' variance at the steps the GMM acts
    controls: bool = True
    gmm_steps: tuple = ("all",)  # each GMM sampler runs under each of these policies (see gmm.validate_gmm_steps)
    select_seeds: tuple = ()  # seeds on which s is chosen (disjoint from seeds); empty: chosen on seeds
    dataset: str = "digits"
    noise: str | None = None  # x_T: "torch" (digits' torch.randn of the seed) or "philox"; None: by data set
    model_batch: int | None = None  # model calls on chunks of this many global sample indices (None: one batch)
    fid: bool = False  # fashion: also the Inception FID (the fid extra)
    final_alpha: str = "one"  # ddim: the last step to abar = 1 (x0_hat) or "abar0" (quality.sampling.FINAL_ALPHAS)

    @property
    def dim(self) -> int:
        return DATASETS[self.dataset][0]

    @property
    def noise_kind(self) -> str:
        return self.noise or ("torch" if self.dataset == "digits" else "philox")

    def check(self) -> None:
        """ValueError naming the field for a grid that cannot run."""
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {self.family!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {tuple(DATASETS)}, got {self.dataset!r}")
        if self.noise_kind not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {self.noise!r}")
        if self.model_batch is not None and self.model_batch < 1:
            raise ValueError(f"model_batch must be >= 1, got {self.model_batch}")
        if self.fid and self.dataset != "fashion":
            raise ValueError("fid applies to the fashion data set only")
        unknown = [v for v in self.variants if v not in GMM_VARIANTS]
        if unknown:
            raise ValueError(f"variants: unknown {unknown}; choose from {GMM_VARIANTS}")
        if not self.steps or any(not isinstance(s, int) or s < 1 for s in self.steps):
            raise ValueError(f"steps must be integers >= 1, got {self.steps}")
        if self.family == "ddim" and max(self.steps) > MAX_DDIM_STEPS:
            raise ValueError(f"steps must be <= {MAX_DDIM_STEPS} (the leading timesteps + 1), got {max(self.steps)}")
        if not self.etas or any(not (e >= 0 and math.isfinite(e)) for e in self.etas):
            raise ValueError(f"etas must be finite and >= 0, got {self.etas}")
        if self.family == "rfim" and max(self.etas) > 1:
            raise ValueError(f"etas must be <= 1 for rfim (c = eta * s <= s), got {max(self.etas)}")
        if any(not (s >= 0 and math.isfinite(s)) for s in self.scales):
            raise ValueError(f"scales must be finite and >= 0, got {self.scales}")
        if self.variants and not self.scales:
            raise ValueError("scales must not be empty when GMM variants are evaluated")
        if not 1 <= self.components < self.dim:
            raise ValueError(
                f"components (K) must be in [1, {self.dim - 1}] (K < D = {self.dim}), got {self.components}"
            )
        if self.samples < 4:
            raise ValueError(f"samples must be >= 4 (k-NN radii with k = 3), got {self.samples}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        for seed in self.seeds:
            check_seed(seed, "seeds")
        check_final_step(self.final_step)
        check_final_alpha(self.final_alpha)
        if not self.gmm_steps:
            raise ValueError("gmm_steps must not be empty")
        for policy in self.gmm_steps:
            validate_gmm_steps(policy, None if isinstance(policy, str) else min(self.steps), "gmm_steps")
        for seed in self.select_seeds:
            check_seed(seed, "select_seeds")
        shared = sorted(set(self.select_seeds) & set(self.seeds))
        if shared:
            raise ValueError(f"select_seeds must be disjoint from seeds (s is chosen on them), both hold {shared}")
        if not 0 <= self.precision_floor <= 1:
            raise ValueError(f"precision_floor must be in [0, 1], got {self.precision_floor}")


def load_model(spec: str, family: str = "ddim", dim: int = DIM):
    """The model named by ``spec``: "digits" (the shipped network of ``family``), "fashion" (the shipped
    Fashion-MNIST eps model; ddim only), "fashion:PATH" (a folder holding fashion_eps.pt / .json, or a training
    checkpoint fashion_eps.ckpt, whose EMA weights are used), "exact-fashion[:N]" / "exact-digits[:N]" (the
    exact denoiser of the first N training images, :mod:`ddim_gmm_ext.quality.exact`; ddim only) or
    "module:callable", checked on a [2, dim] batch before any sampling (ValueError naming --model on failure)."""
    model: Callable
    if spec == "digits":
        from . import digits

        model = digits.load(FAMILIES[family][2])
    elif spec.startswith("exact-"):
        from . import exact

        if family != "ddim":
            raise ValueError(f"--model {spec!r} is an epsilon model: use --family ddim")
        try:
            model = exact.load(spec)  # callable: its __call__ is eps_model
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(f"--model {spec!r}: {error}") from error
    elif spec == "fashion" or spec.startswith("fashion:"):
        from . import fashion

        if family != "ddim":
            raise ValueError(f"--model {spec!r} is an epsilon model: use --family ddim")
        path = spec.partition(":")[2]
        try:
            if not path:
                model = fashion.load("eps")
            elif path.endswith(".ckpt"):
                model = fashion.load_checkpoint_ema(path)
            else:
                model = fashion.load("eps", path)
        except (FileNotFoundError, ValueError, KeyError) as error:
            raise ValueError(f"--model {spec!r}: {error}") from error
    else:
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise ValueError(f"--model must be 'digits' or 'module:callable', got {spec!r}")
        try:
            model = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"--model {spec!r} cannot be imported: {error}") from error
        if not callable(model):
            raise ValueError(f"--model {spec!r} is not callable")
    check_model(model, family, spec, dim)
    return model


def check_model(model, family: str, name: str = "model", dim: int = DIM) -> None:
    """Call ``model`` once on a [2, dim] batch at the start time of ``family`` and check it returns a finite
    [2, dim] tensor."""
    x = torch.zeros(2, dim)
    t = torch.full((2,), 1000 - 1, dtype=torch.int64) if family == "ddim" else torch.ones(2)
    with torch.no_grad():
        try:
            out = model(x, t)
        except Exception as error:  # noqa: BLE001  (any failure of a user model is reported as a bad --model)
            raise ValueError(f"--model {name!r} fails on x [2, {dim}], t [2]: {error!r}") from error
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"--model {name!r} must return a tensor of shape [2, {dim}] for x [2, {dim}], got {got}")
    if not out.is_floating_point():  # an int64 output failed inside the first step, with a traceback
        raise ValueError(f"--model {name!r} must return a floating-point tensor, got {out.dtype}")
    if not torch.isfinite(out).all():
        raise ValueError(f"--model {name!r} returned non-finite values")


def sweep_initial_noise(samples: int, dim: int, seed: int, kind: str = "torch", sample_offset: int = 0) -> torch.Tensor:
    """x_T [samples, dim] of a seed, shared by every sampler of that seed (paired runs): "torch" is
    torch.randn(samples, dim) of torch.Generator().manual_seed(seed) (the digits tables'; not a function of the
    sample index, so one process only), "philox" the randomness contract's stream of (seed, global sample index)
    (:func:`ddim_gmm_ext.quality.sampling.initial_noise`), rows [sample_offset, sample_offset + samples)."""
    if kind == "philox":
        return philox_initial_noise(samples, dim, seed, sample_offset)
    if sample_offset:
        raise ValueError("torch initial noise is drawn for the whole run: sample_offset must be 0")
    return torch.randn(samples, dim, generator=torch.Generator().manual_seed(seed))


def sample_and_score(
    model,
    sweep: Sweep,
    steps: int,
    eta: float,
    seed: int,
    quality,
    progress: bool = False,
    ctx: distributed.Context | None = None,
):
    """Samples and metrics {"fd", "precision", "recall"[, "fid"]} of every sampler of ``sweep`` at one
    (steps, eta, seed): [(name, variant, scale, x0, metrics)], x0 this rank's rows [n_r, D] (all N rows in one
    process). The initial noise is :func:`sweep_initial_noise` of ``sweep.noise_kind``; GMM tables and step noise use
    ``seed`` too. Under torchrun each rank samples its slice (global indices [offset, offset + n_r)) and the
    metrics are those of the union."""
    ctx = ctx or distributed.Context()
    baseline, sample_fn, _ = FAMILIES[sweep.family]
    sampler_list = list(samplers(sweep.scales, sweep.variants, baseline, per_dim=sweep.scale_per_dim))
    offset, count = distributed.shard(sweep.samples, ctx, align=sweep.model_batch or 1)
    x_T = sweep_initial_noise(count, sweep.dim, seed, sweep.noise_kind, offset)
    gmms = make_gmms(sampler_list, sweep.dim, sweep.components, steps, seed, per_dim=sweep.scale_per_dim)
    entries, policies, clips = policy_entries(sweep, sampler_list, gmms, steps, eta, baseline)
    with torch.no_grad():
        xs = sample_fn(
            model,
            x_T,
            steps,
            eta,
            [e[3] for e in entries],
            seed,
            progress=progress,
            final_step=sweep.final_step,
            gmm_steps=policies,
            sample_offset=offset,
            model_batch=sweep.model_batch,
            **({"final_alpha": sweep.final_alpha} if sweep.family == "ddim" else {}),
        )
    pairs = zip(entries, xs, clips, strict=True)
    return [
        (name, variant, scale, x0, {**score(quality, x0, ctx), "clip_fraction": clip})
        for (name, variant, scale, _), x0, clip in pairs
    ]


def policy_entries(sweep: Sweep, sampler_list, gmms, steps: int, eta: float, baseline: str):
    """The samplers of one (steps, eta, seed): the baseline, each GMM sampler under each of ``sweep.gmm_steps``
    (variant "ortho-lr" for "all", "ortho-lr@matched", ...) and, with ``sweep.controls``, its matched-noise
    control (:class:`MatchedNoise` at the steps that GMM acts, variant "noise~..."). Returns
    ([(name, variant, scale, entry of gmms)], the gmm_steps policy of each, the fraction of its mixture steps
    whose kernel clips, None for the baseline and the controls)."""
    stds = ddim_noise_stds(steps, eta, sweep.final_alpha) if sweep.family == "ddim" else rfim_noise_stds(steps, eta)
    g = GMMOptions(final_step=sweep.final_step).final_step_g(steps)
    entries: list[tuple] = []
    policies: list = []
    clips: list[float | None] = []
    for (name, variant, scale), gmm in zip(sampler_list, gmms, strict=True):
        if gmm is None:
            entries.append((name, variant, scale, None))
            policies.append("all")
            clips.append(None)
            continue
        for policy in sweep.gmm_steps:
            tag = "" if policy == "all" else f"@{policy}" if isinstance(policy, str) else f"@{_steps_label(policy)}"
            acts = tuple(gmm_step_mask(policy, gmm, stds, g))
            clip = clipped_fraction(gmm, stds, g, acts)
            entries.append((name + tag, variant + tag, scale, gmm))
            policies.append(policy)
            clips.append(None if math.isnan(clip) else clip)
            if sweep.controls:
                control = MatchedNoise(gmm, acts)
                entries.append(
                    (f"{baseline}+{CONTROL_PREFIX}{name}{tag}", f"{CONTROL_PREFIX}{variant}{tag}", scale, control)
                )
                policies.append("all")
                clips.append(None)
    return entries, policies, clips


def _steps_label(policy) -> str:
    """An explicit gmm_steps as a label: "steps=3,4" (indices, or a mask's True positions)."""
    indices = [i for i, v in enumerate(policy) if v is True] if all(isinstance(v, bool) for v in policy) else policy
    return "steps=" + ",".join(str(int(i)) for i in indices)


def score(quality, x0: torch.Tensor, ctx: distributed.Context) -> dict:
    """``quality`` of the union of the ranks' samples: a quality object marked ``distributed`` takes this rank's
    rows and combines statistics itself; any other gets all rows, gathered."""
    if getattr(quality, "distributed", False):
        return quality(x0)
    return quality(distributed.gather_rows(x0, ctx))


def real_reference(sweep: Sweep, quality, ctx: distributed.Context | None = None) -> dict:
    """Metrics of ``samples`` real images (drawn without replacement, seed of the first seed) against the
    reference set: digits, a subset of the 1797 against all of them (optimistic: the subset is part of the set);
    fashion, training images against the test split (held out). The floor a perfect sampler reaches with this
    sample count."""
    ctx = ctx or distributed.Context()
    gen = torch.Generator().manual_seed(sweep.seeds[0])
    if sweep.dataset == "fashion":
        from . import fashion

        train = fashion.load_images("train").flatten(1)
        subset = train[torch.randperm(len(train), generator=gen)[: min(sweep.samples, len(train))]]
        offset, count = distributed.shard(len(subset), ctx)
        return score(quality, subset[offset : offset + count], ctx)
    real = quality.real
    subset = real[torch.randperm(len(real), generator=gen)[: min(sweep.samples, len(real))]]
    return quality(subset)


def run(model, sweep: Sweep, quality, progress: bool = True, ctx: distributed.Context | None = None) -> dict:
    """Every sampler of ``sweep``: {"rows": one dict per (seed, steps, eta, sampler) with the metrics and the
    clip fraction, "selection_rows": the same on ``sweep.select_seeds``, "summary": mean and std over seeds,
    "best": best s by mean FD per (eta, steps, variant) (chosen on the selection seeds when given, reported on
    the scored ones), "reference", "seconds"}. Under torchrun (``ctx``) each rank samples its slice and the
    metrics are those of the union."""
    ctx = ctx or distributed.Context()
    sweep.check()
    if ctx.active and sweep.noise_kind != "philox":
        raise ValueError("a torchrun evaluation needs the philox initial noise (the torch one is not sharded)")
    start = time.perf_counter()
    metrics = getattr(quality, "metrics", METRICS)
    rows = score_rows(model, sweep, sweep.seeds, quality, progress, ctx)
    summary = summarise(rows, metrics)
    best = best_scales(summary, sweep.precision_floor)
    selection_rows: list[dict] = []
    if sweep.select_seeds:  # s chosen on the selection seeds, reported on the scored ones
        selection_rows = score_rows(model, sweep, sweep.select_seeds, quality, progress, ctx)
        scored = {(e["steps"], e["eta"], e["sampler"]): e for e in summary}
        chosen = best_scales(summarise(selection_rows, metrics), sweep.precision_floor)
        best = [scored[(e["steps"], e["eta"], e["sampler"])] for e in chosen]
    return {
        "rows": rows,
        "selection_rows": selection_rows,
        "summary": summary,
        "best": best,
        "reference": real_reference(sweep, quality, ctx),
        "seconds": time.perf_counter() - start,
    }


def score_rows(model, sweep: Sweep, seeds, quality, progress: bool, ctx: distributed.Context) -> list[dict]:
    """One row per (seed, steps, eta, sampler) of ``seeds`` with its metrics and clip fraction."""
    from tqdm import tqdm

    grid = [(seed, steps, eta) for seed in seeds for steps in sweep.steps for eta in sweep.etas]
    rows = []
    for seed, steps, eta in tqdm(grid, desc=f"eval {sweep.family}", disable=not (progress and ctx.main)):
        for name, variant, scale, _, metrics in sample_and_score(model, sweep, steps, eta, seed, quality, ctx=ctx):
            rows.append(
                {
                    "seed": seed,
                    "steps": steps,
                    "eta": eta,
                    "sampler": name,
                    "variant": variant or FAMILIES[sweep.family][0],
                    "scale": scale,
                    "components": sweep.components if variant else None,
                    **metrics,
                }
            )
    return rows


def summarise(rows: list[dict], metrics=METRICS) -> list[dict]:
    """Per (steps, eta, sampler): mean and standard deviation over seeds of each metric ("fd", "fd_std", ...)
    and of its paired difference to the baseline of the same seed ("fd_diff", "fd_diff_std", ...; the
    baseline is the row whose scale is None), which the shared noise makes far more precise than the
    difference of the means."""
    baseline = {(r["seed"], r["steps"], r["eta"]): r for r in rows if r["scale"] is None}
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["steps"], row["eta"], row["sampler"]), []).append(row)
    out = []
    for group in groups.values():
        entry = {k: group[0][k] for k in ("steps", "eta", "sampler", "variant", "scale", "components")}
        entry["seeds"] = len(group)
        clips = [r["clip_fraction"] for r in group if r.get("clip_fraction") is not None]
        entry["clip_fraction"] = statistics.fmean(clips) if clips else None
        for m in metrics:
            diffs = [r[m] - baseline[(r["seed"], r["steps"], r["eta"])][m] for r in group]
            for name, values in ((m, [r[m] for r in group]), (f"{m}_diff", diffs)):
                entry[name] = statistics.fmean(values)
                entry[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def best_scales(summary: list[dict], precision_floor: float = 0.0) -> list[dict]:
    """Per (eta, steps, variant), the summary entry of the scale with the lowest mean digits-FD (the paper's
    selection rule; its precision and recall are reported with it) among those whose mean precision is at
    least ``precision_floor`` times the baseline's at the same (steps, eta): FD alone rewards samplers that
    spread samples off the data (precision collapsing while FD improves). A (eta, steps, variant) whose every
    scale falls below the floor is left out (the tables show it as refused).

    A matched-noise control (variant ``CONTROL_PREFIX + v``) is not chosen on its own: it is the entry at the s
    chosen for ``v``, so that it adds exactly the variance that GMM's offsets add (left out where ``v`` is)."""
    base = {(e["steps"], e["eta"]): e["precision"] for e in summary if e["scale"] is None}
    best: dict = {}
    for entry in summary:
        key = (entry["eta"], entry["steps"], entry["variant"])
        if entry["variant"].startswith(CONTROL_PREFIX):
            continue
        if entry["scale"] is not None and entry["precision"] < precision_floor * base[(entry["steps"], entry["eta"])]:
            continue
        if key not in best or entry["fd"] < best[key]["fd"]:
            best[key] = entry
    for entry in summary:
        if entry["variant"].startswith(CONTROL_PREFIX):
            gmm = best.get((entry["eta"], entry["steps"], entry["variant"][len(CONTROL_PREFIX) :]))
            if gmm is not None and entry["scale"] == gmm["scale"]:
                best[(entry["eta"], entry["steps"], entry["variant"])] = entry
    return list(best.values())


def machine() -> str:
    """CPU model (from /proc/cpuinfo where there is one), core count, OS, torch version and threads used."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def write_outputs(result: dict, sweep: Sweep, out_dir, model_name: str) -> list[Path]:
    """results.csv (per seed), results.json (config, rows, summary, best, reference), table.md and
    quality.png in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in ("results.csv", "results.json", "table.md", "quality.png")]
    with open(paths[0], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
        writer.writeheader()
        writer.writerows(result["rows"])
    config = {
        **asdict(sweep),
        "model": model_name,
        "machine": machine(),
        "seconds": round(result["seconds"], 1),
        "initial_noise": f"torch.randn(samples, {sweep.dim}, generator=torch.Generator().manual_seed(seed))"
        if sweep.noise_kind == "torch"
        else "Philox stream of (seed, global sample index, step 2^32 - 1): quality.sampling.initial_noise",
        "metrics": f"{DATASETS[sweep.dataset][1]}, k-NN precision / recall (k = 3) on the shipped classifier's "
        f"penultimate features, against {DATASETS[sweep.dataset][2]}"
        + ("; Inception FID (ddim_gmm_ext.quality.fid)" if sweep.fid else ""),
    }
    keys = ("rows", "selection_rows", "summary", "best", "reference")
    payload = {"config": config, **{k: result[k] for k in keys if k in result}}
    paths[1].write_text(json.dumps(payload, indent=1) + "\n")
    paths[2].write_text(table_markdown(result, sweep, model_name))
    plot(result, sweep, paths[3])
    return paths


def table_markdown(result: dict, sweep: Sweep, model_name: str) -> str:
    """Two tables, rows eta x sampler, columns steps, means over seeds: "FD (best s) P / R" (the paper's Table 8
    layout), then each GMM sampler's paired difference to the baseline at that s, "dFD +- std, dP, dR"."""
    baseline = FAMILIES[sweep.family][0]
    best = {(e["eta"], e["steps"], e["variant"]): e for e in result["best"]}
    header = [
        "| eta | sampler | " + " | ".join(f"{s} steps" for s in sweep.steps) + " |",
        "|---|---|" + "---|" * len(sweep.steps),
    ]

    def rows(variants, cell):
        for eta in sweep.etas:
            for variant in variants:
                name = (
                    baseline
                    if variant == baseline
                    else f"{baseline}+{CONTROL_PREFIX}GMM-{variant[len(CONTROL_PREFIX) :].upper()}"
                    if variant.startswith(CONTROL_PREFIX)
                    else f"{baseline}-GMM-{variant.upper()}"
                )
                cells = [
                    cell(best[(eta, steps, variant)]) if (eta, steps, variant) in best else "refused"
                    for steps in sweep.steps
                ]
                yield f"| {eta:g} | {name} | " + " | ".join(cells) + " |"

    def metrics(e):
        s = f" ({e['scale']:g})" if e["scale"] is not None else ""
        fid = f" FID {e['fid']:.2f}±{e['fid_std']:.2f}" if "fid" in e else ""
        return (
            f"{e['fd']:.2f}±{e['fd_std']:.2f}{s} {e['precision']:.2f}±{e['precision_std']:.2f} / "
            f"{e['recall']:.2f}±{e['recall_std']:.2f}{fid}"
        )

    def clip(e):
        return "-" if e.get("clip_fraction") is None else f"{e['clip_fraction']:.2f}"

    def differences(e):
        return (
            f"{e['fd_diff']:+.2f}±{e['fd_diff_std']:.2f}, {e['precision_diff']:+.3f}±{e['precision_diff_std']:.3f}, "
            f"{e['recall_diff']:+.3f}±{e['recall_diff_std']:.3f}"
        )

    # GMM samplers (each gmm_steps policy) and their controls, in the order they were run
    variants = list(dict.fromkeys(e["variant"] for e in result["best"] if e["scale"] is not None))
    ref = result["reference"]
    seeds = (
        f"mean ± std over seeds {list(sweep.seeds)}, {sweep.samples} samples each, K = {sweep.components}, "
        f"final step {sweep.final_step}, s chosen by FD among settings with precision >= "
        f"{sweep.precision_floor:g} x {baseline}'s (else 'refused')"
        + (f"; scales per coordinate (s = value * sqrt({sweep.dim}))" if sweep.scale_per_dim else "")
        + (f"; s chosen on seeds {list(sweep.select_seeds)}" if sweep.select_seeds else "")
        + f"; gmm_steps {', '.join(str(p) for p in sweep.gmm_steps)}"
        + (
            f"; controls: {baseline} + white noise of the offsets' variance where the GMM acts, at that GMM's s"
            if sweep.controls
            else ""
        )
    )
    fd_name = DATASETS[sweep.dataset][1]
    if sweep.dataset == "digits":
        real = f"Real digits ({min(sweep.samples, 1797)} of the 1797, against all)"
    else:
        real = f"Real Fashion-MNIST ({sweep.samples} training images, against the test split)"
    real_fid = f", FID {ref['fid']:.2f}" if "fid" in ref else ""
    return "\n".join(
        [
            f"{baseline} vs {baseline}-GMM on {sweep.dataset}, model {model_name}: {fd_name} (lower is better) "
            f"with the best s in parentheses, then precision / recall (higher is better); {seeds}.",
            "",
            *header,
            *rows([baseline] + variants, metrics),
            "",
            f"Paired differences to {baseline} at that s (same seed, same initial noise): "
            f"{fd_name}, precision, recall (each ± std over seeds of the paired difference).",
            "",
            *header,
            *rows(variants, differences),
            "",
            "Fraction of the mixture steps whose kernel clips (g^2 v_k > c^2 in some direction: not moment-matched) "
            "at that s, mean over seeds ('-': no mixture step, or a control).",
            "",
            *header,
            *rows(variants, clip),
            "",
            f"{real}: {fd_name} {ref['fd']:.2f}, precision {ref['precision']:.2f}, recall {ref['recall']:.2f}"
            f"{real_fid}.",
            "",
        ]
    )


def plot(result: dict, sweep: Sweep, path) -> None:
    """Fig. 1 style: one column per eta, rows digits-FD / precision / recall vs steps, one line per sampler
    (GMM variants at their best s by FD); the dashed line is the real-digits reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = FAMILIES[sweep.family][0]
    best = {(e["eta"], e["steps"], e["variant"]): e for e in result["best"]}
    labels = {"fd": f"{DATASETS[sweep.dataset][1]} (lower is better)", "precision": "precision", "recall": "recall"}
    fig, axes = plt.subplots(3, len(sweep.etas), figsize=(3.2 * len(sweep.etas), 7.5), squeeze=False, sharex=True)
    for col, eta in enumerate(sweep.etas):
        for row, metric in enumerate(METRICS):
            ax = axes[row][col]
            for variant in [baseline] + list(sweep.variants):
                ys = [best[(eta, s, variant)][metric] if (eta, s, variant) in best else math.nan for s in sweep.steps]
                label = variant if variant == baseline else f"GMM-{variant.upper()}"
                ax.plot(sweep.steps, ys, marker="o", ms=3, label=label)
            ax.axhline(result["reference"][metric], color="gray", ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.set_xticks(sweep.steps, [str(s) for s in sweep.steps])
            ax.minorticks_off()
            if row == 0:
                ax.set_title(f"eta = {eta:g}")
            if col == 0:
                ax.set_ylabel(labels[metric])
            if row == 2:
                ax.set_xlabel("steps")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"{baseline} vs {baseline}-GMM, {sweep.dataset} ({sweep.samples} samples x {len(sweep.seeds)} seeds, "
        f"best s by FD; dashed: real {sweep.dataset})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
