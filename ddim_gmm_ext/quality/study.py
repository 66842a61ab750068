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
