"""The paper's sample-quality protocol on 8x8 digits models: sweep steps, eta, GMM variant, offset scale s and
K with paired seeds, score every sampler with digits-FD, precision and recall (:mod:`ddim_gmm_ext.quality.metrics`),
and write CSV / JSON, a figure in the style of the paper's Fig. 1 and a table in the style of its Table 8.

Two families: "ddim" (an epsilon model on the paper's VP schedule, DDIM vs DDIM-GMM-*) and "rfim" (a
rectified-flow velocity model, RFIM vs RFIM-GMM-*, the paper's Table 1). Models are given as "digits" (the
shipped network of the family) or "module:callable" (see :mod:`ddim_gmm_ext.quality.digits` for the call contract).
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._checks import check_final_step, check_seed
from .sampling import GMM_VARIANTS, make_gmms, matched_output_noise, sample_ddim, sample_rfim, samplers

DIM = 64
FAMILIES = {"ddim": ("DDIM", sample_ddim, "eps"), "rfim": ("RFIM", sample_rfim, "flow")}
METRICS = ("fd", "precision", "recall")


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
    controls: bool = True  # add "DDIM + matched output noise" per GMM sampler (when final_step is "gmm")

    def check(self) -> None:
        """ValueError naming the field for a grid that cannot run."""
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {self.family!r}")
        unknown = [v for v in self.variants if v not in GMM_VARIANTS]
        if unknown:
            raise ValueError(f"variants: unknown {unknown}; choose from {GMM_VARIANTS}")
        if not self.steps or any(not isinstance(s, int) or s < 1 for s in self.steps):
            raise ValueError(f"steps must be integers >= 1, got {self.steps}")
        if self.family == "ddim" and max(self.steps) > 1000:
            raise ValueError(f"steps must be <= 1000 (the training timesteps), got {max(self.steps)}")
        if not self.etas or any(not (e >= 0 and math.isfinite(e)) for e in self.etas):
            raise ValueError(f"etas must be finite and >= 0, got {self.etas}")
        if self.family == "rfim" and max(self.etas) > 1:
            raise ValueError(f"etas must be <= 1 for rfim (c = eta * s <= s), got {max(self.etas)}")
        if any(not (s >= 0 and math.isfinite(s)) for s in self.scales):
            raise ValueError(f"scales must be finite and >= 0, got {self.scales}")
        if self.variants and not self.scales:
            raise ValueError("scales must not be empty when GMM variants are evaluated")
        if not 1 <= self.components < DIM:
            raise ValueError(f"components (K) must be in [1, {DIM - 1}] (K < D = {DIM}), got {self.components}")
        if self.samples < 4:
            raise ValueError(f"samples must be >= 4 (k-NN radii with k = 3), got {self.samples}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        for seed in self.seeds:
            check_seed(seed, "seeds")
        check_final_step(self.final_step)
        if not 0 <= self.precision_floor <= 1:
            raise ValueError(f"precision_floor must be in [0, 1], got {self.precision_floor}")


def load_model(spec: str, family: str = "ddim"):
    """The model named by ``spec``: "digits" (the shipped network of ``family``) or "module:callable", checked
    on a [2, 64] batch before any sampling (ValueError naming --model on failure)."""
    if spec == "digits":
        from . import digits

        model = digits.load(FAMILIES[family][2])
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
    check_model(model, family, spec)
    return model


def check_model(model, family: str, name: str = "model") -> None:
    """Call ``model`` once on a [2, 64] batch at the start time of ``family`` and check it returns a finite
    [2, 64] tensor."""
    x = torch.zeros(2, DIM)
    t = torch.full((2,), 1000 - 1, dtype=torch.int64) if family == "ddim" else torch.ones(2)
    with torch.no_grad():
        try:
            out = model(x, t)
        except Exception as error:  # noqa: BLE001  (any failure of a user model is reported as a bad --model)
            raise ValueError(f"--model {name!r} fails on x [2, 64], t [2]: {error!r}") from error
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"--model {name!r} must return a tensor of shape [2, 64] for x [2, 64], got {got}")
    if not out.is_floating_point():  # an int64 output failed inside the first step, with a traceback
        raise ValueError(f"--model {name!r} must return a floating-point tensor, got {out.dtype}")
    if not torch.isfinite(out).all():
        raise ValueError(f"--model {name!r} returned non-finite values")


def initial_noise(samples: int, seed: int) -> torch.Tensor:
    """x_T [samples, 64] of a seed, shared by every sampler of that seed (paired runs)."""
    return torch.randn(samples, DIM, generator=torch.Generator().manual_seed(seed))


def sample_and_score(model, sweep: Sweep, steps: int, eta: float, seed: int, quality, progress: bool = False):
    """Samples [N, 64] and metrics {"fd", "precision", "recall"} of every sampler of ``sweep`` at one
    (steps, eta, seed): [(name, variant, scale, x0, metrics)]. The initial noise is
    torch.randn(N, 64) of torch.Generator().manual_seed(seed); GMM tables and step noise use ``seed`` too."""
    baseline, sample_fn, _ = FAMILIES[sweep.family]
    sampler_list = list(samplers(sweep.scales, sweep.variants, baseline, per_dim=sweep.scale_per_dim))
    x_T = initial_noise(sweep.samples, seed)
    gmms = make_gmms(sampler_list, DIM, sweep.components, steps, seed, per_dim=sweep.scale_per_dim)
    with torch.no_grad():
        xs = sample_fn(model, x_T, steps, eta, gmms, seed, progress=progress, final_step=sweep.final_step)
    if sweep.controls and sweep.final_step == "gmm":
        # With a Gaussian last step the mixture adds nothing to the output, and the control would be the baseline.
        for (name, variant, scale), gmm in zip(list(sampler_list), gmms, strict=True):
            if gmm is not None:
                sampler_list.append((f"{baseline}+noise~{name}", f"noise~{variant}", scale))
                xs.append(matched_output_noise(xs[0], gmm, steps, seed))
    pairs = zip(sampler_list, xs, strict=True)
    return [(name, variant, scale, x0, quality(x0)) for (name, variant, scale), x0 in pairs]


def real_reference(sweep: Sweep, quality) -> dict:
    """Metrics of ``samples`` real digits (drawn without replacement, seed of the first seed) against all 1797:
    the floor a perfect sampler reaches with this sample count (optimistic: the subset is part of the set)."""
    gen = torch.Generator().manual_seed(sweep.seeds[0])
    real = quality.real
    subset = real[torch.randperm(len(real), generator=gen)[: min(sweep.samples, len(real))]]
    return quality(subset)


def run(model, sweep: Sweep, quality, progress: bool = True) -> dict:
    """Every sampler of ``sweep``: {"rows": one dict per (seed, steps, eta, sampler) with the metrics,
    "summary": mean and std over seeds, "best": best s by mean FD per (eta, steps, variant), "reference",
    "seconds"}."""
    from tqdm import tqdm

    sweep.check()
    start = time.perf_counter()
    grid = [(seed, steps, eta) for seed in sweep.seeds for steps in sweep.steps for eta in sweep.etas]
    rows = []
    for seed, steps, eta in tqdm(grid, desc=f"eval {sweep.family}", disable=not progress):
        for name, variant, scale, _, metrics in sample_and_score(model, sweep, steps, eta, seed, quality):
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
    summary = summarise(rows)
    return {
        "rows": rows,
        "summary": summary,
        "best": best_scales(summary, sweep.precision_floor),
        "reference": real_reference(sweep, quality),
        "seconds": time.perf_counter() - start,
    }


def summarise(rows: list[dict]) -> list[dict]:
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
        for m in METRICS:
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
    scale falls below the floor is left out (the tables show it as refused)."""
    base = {(e["steps"], e["eta"]): e["precision"] for e in summary if e["scale"] is None}
    best: dict = {}
    for entry in summary:
        key = (entry["eta"], entry["steps"], entry["variant"])
        if entry["scale"] is not None and entry["precision"] < precision_floor * base[(entry["steps"], entry["eta"])]:
            continue
        if key not in best or entry["fd"] < best[key]["fd"]:
            best[key] = entry
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
        "initial_noise": "torch.randn(samples, 64, generator=torch.Generator().manual_seed(seed))",
        "metrics": "digits-FD, k-NN precision / recall (k = 3) on the shipped classifier's penultimate "
        "features, against the 1797 scikit-learn digits",
    }
    payload = {"config": config, **{k: result[k] for k in ("rows", "summary", "best", "reference")}}
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
                    else f"{baseline}+noise~GMM-{variant[6:].upper()}"
                    if variant.startswith("noise~")
                    else f"{baseline}-GMM-{variant.upper()}"
                )
                cells = [
                    cell(best[(eta, steps, variant)]) if (eta, steps, variant) in best else "refused"
                    for steps in sweep.steps
                ]
                yield f"| {eta:g} | {name} | " + " | ".join(cells) + " |"

    def metrics(e):
        s = f" ({e['scale']:g})" if e["scale"] is not None else ""
        return (
            f"{e['fd']:.2f}±{e['fd_std']:.2f}{s} {e['precision']:.2f}±{e['precision_std']:.2f} / "
            f"{e['recall']:.2f}±{e['recall_std']:.2f}"
        )

    def differences(e):
        return (
            f"{e['fd_diff']:+.2f}±{e['fd_diff_std']:.2f}, {e['precision_diff']:+.3f}±{e['precision_diff_std']:.3f}, "
            f"{e['recall_diff']:+.3f}±{e['recall_diff_std']:.3f}"
        )

    controls = sorted({e["variant"] for e in result["best"] if e["variant"].startswith("noise~")})
    ref = result["reference"]
    seeds = (
        f"mean ± std over seeds {list(sweep.seeds)}, {sweep.samples} samples each, K = {sweep.components}, "
        f"final step {sweep.final_step}, s chosen by FD among settings with precision >= "
        f"{sweep.precision_floor:g} x {baseline}'s (else 'refused')"
        + ("; scales per coordinate (s = value * 8)" if sweep.scale_per_dim else "")
    )
    return "\n".join(
        [
            f"{baseline} vs {baseline}-GMM on digits, model {model_name}: digits-FD (lower is better) with the best s "
            f"in parentheses, then precision / recall (higher is better); {seeds}.",
            "",
            *header,
            *rows([baseline] + list(sweep.variants) + controls, metrics),
            "",
            f"Paired differences to {baseline} at that s (same seed, same initial noise): "
            "digits-FD, precision, recall (each ± std over seeds of the paired difference).",
            "",
            *header,
            *rows(list(sweep.variants) + controls, differences),
            "",
            f"Real digits ({min(sweep.samples, 1797)} of the 1797, against all): digits-FD {ref['fd']:.2f}, "
            f"precision {ref['precision']:.2f}, recall {ref['recall']:.2f}.",
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
    labels = {"fd": "digits-FD (lower is better)", "precision": "precision", "recall": "recall"}
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
        f"{baseline} vs {baseline}-GMM, digits ({sweep.samples} samples x {len(sweep.seeds)} seeds, "
        "best s by FD; dashed: real digits)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
