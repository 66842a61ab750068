"""The study merger (`python -m ddim_gmm_ext.quality.study`): s chosen on the selection seeds, every role reported at
that s, paired differences per seed, and a refusal when two stages disagree on a shared DDIM row."""

import json

import pytest

from ddim_gmm_ext.quality import study


def _row(seed, variant, scale, fd, precision=0.8, clip=None):
    sampler = "DDIM" if scale is None else f"{variant} s={scale:g}"
    return {
        "seed": seed,
        "steps": 5,
        "eta": 1.0,
        "sampler": sampler,
        "variant": variant,
        "scale": scale,
        "components": None if scale is None else 8,
        "fd": fd,
        "precision": precision,
        "recall": 0.5,
        "clip_fraction": clip,
    }


def _stage(ddim_fd=(10.0, 12.0)):
    """Scored seeds 0, 1 and selection seed 5. On the scored seeds s = 3 has the lower FD, on the selection seed
    s = 1: the merger must report s = 1."""
    rows, selection = [], []
    for seed, base in zip((0, 1), ddim_fd, strict=True):
        rows += [
            _row(seed, "DDIM", None, base),
            _row(seed, "rand", 1.0, base - 1.0, clip=0.5),
            _row(seed, "noise~rand", 1.0, base - 0.5 - seed),
            _row(seed, "rand@matched", 1.0, base - 0.25, clip=0.0),
            _row(seed, "rand", 3.0, base - 4.0, clip=1.0),
            _row(seed, "noise~rand", 3.0, base - 4.0),
        ]
    selection += [
        _row(5, "DDIM", None, 11.0),
        _row(5, "rand", 1.0, 9.0),
        _row(5, "rand", 3.0, 9.5),
        _row(5, "noise~rand", 1.0, 9.0),
        _row(5, "noise~rand", 3.0, 9.0),
    ]
    config = {
        "seeds": [0, 1],
        "select_seeds": [5],
        "precision_floor": 0.9,
        "steps": [5],
        "etas": [1.0],
        "family": "ddim",
        "variants": ["rand"],
        "scales": [1.0, 3.0],
        "samples": 200,
        "components": 8,
        "machine": "test",
        "model": "fashion",
    }
    reference = {"fd": 1.0, "precision": 1.0, "recall": 1.0}
    return {"config": config, "rows": rows, "selection_rows": selection, "reference": reference}


def _fid_stage():
    """A stage run with --fid at one s, no selection seeds (s chosen on the scored rows): FID beside the FD."""
    rows = []
    for seed, (ddim, gmm, control) in enumerate(((50.0, 60.0, 58.0), (52.0, 63.0, 60.0))):
        for variant, scale, fid in (("DDIM", None, ddim), ("rand", 1.0, gmm), ("noise~rand", 1.0, control)):
            rows.append({**_row(seed, variant, scale, fid / 5), "fid": fid})
    payload = _stage()
    payload["config"].update(fid=True, samples=500, scales=[1.0], select_seeds=[])
    payload.update(rows=rows, selection_rows=[], summary=[])
    payload["reference"].update(fid=20.0)
    return payload


def test_cells_report_every_role_at_the_s_chosen_on_the_selection_seeds():
    # mutation checked: choosing s on payload["rows"] (the scored seeds) reports s = 3 and fails
    (cell,) = study.stage_cells("a", _stage())
    assert cell["scale"] == 1.0
    assert cell["gmm"]["diff"]["fd"] == {"mean": -1.0, "std": 0.0}
    assert cell["gmm"]["clip_fraction"] == 0.5 and cell["matched"]["clip_fraction"] == 0.0
    # control: -0.5 and -1.5 -> mean -1.0, std 0.707; GMM minus control per seed: -0.5, +0.5
    assert cell["control"]["diff"]["fd"]["mean"] == pytest.approx(-1.0)
    assert cell["control"]["diff"]["fd"]["std"] == pytest.approx(0.5**0.5)
    assert cell["gmm_minus_control"]["fd"]["mean"] == pytest.approx(0.0)
    assert cell["gmm_minus_control"]["fd"]["std"] == pytest.approx(0.5**0.5)
    assert cell["matched"]["diff"]["fd"]["mean"] == pytest.approx(-0.25)
    assert "matched_control" not in cell and "matched_minus_control" not in cell
    assert cell["ddim"]["fd"]["mean"] == pytest.approx(11.0)


def test_merge_writes_table_and_figure_and_refuses_inconsistent_ddim(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "run" / name).mkdir(parents=True)
        (tmp_path / "run" / name / "results.json").write_text(json.dumps(_stage()))
    assert study.main([str(tmp_path / "run"), "--out", str(tmp_path / "out" / "study")]) == 0
    merged = json.loads((tmp_path / "out" / "study.json").read_text())
    assert len(merged["cells"]) == 2 and {r["stage"] for r in merged["rows"]} == {"a", "b"}
    table = (tmp_path / "out" / "study.md").read_text()
    assert "| 1 | 5 | 8 | RAND (1) | 0.50 | 11.00 ± 1.41 | -1.00 ± 0.00 |" in table
    # every s in the moment-matching table, the chosen one starred; s = 3 has no "matched" rows
    assert "| 1 | 5 | 8 | RAND (1)* | 0.50 | -1.00 ± 0.00 | -1.00 ± 0.71 | -0.25 ± 0.00 | - | - |" in table
    assert "RAND (3)" not in table
    assert [c["selected"] for c in merged["cells_every_scale"][:2]] == [True, False]
    assert (tmp_path / "out" / "study.png").stat().st_size > 10_000
    # mutation checked: without the consistency check in merge the next call passes
    (tmp_path / "run" / "b" / "results.json").write_text(json.dumps(_stage(ddim_fd=(10.0, 12.5))))
    with pytest.raises(ValueError, match="DDIM at"):
        study.merge(study.load_stages(tmp_path / "run"))
    assert study.chosen_scale(tmp_path / "run" / "a", 5, 1.0, "rand") == 1.0
    # an FID stage (another sample count: its DDIM rows are not compared) is reported apart from the cells
    (tmp_path / "run" / "b" / "results.json").write_text(json.dumps(_stage()))
    (tmp_path / "run" / "c").mkdir()
    (tmp_path / "run" / "c" / "results.json").write_text(json.dumps(_fid_stage()))
    merged = study.merge(study.load_stages(tmp_path / "run"))
    assert list(merged["fid"]) == ["c"] and {c["stage"] for c in merged["cells"]} == {"a", "b"}
    # FID per seed: DDIM 50, 52; GMM 60, 63 (+10, +11); control 58, 60 (+8, +8); GMM - control +2, +3.
    # Mutation checked: FID left out of the stage's metrics (METRICS only) fails with a KeyError here.
    table = study.table_markdown(merged)
    assert "seeds [0, 1]" in table
    row = "| RAND (1) | 51.00 ± 1.41 | 61.50 ± 2.12 | 59.00 ± 1.41 | +10.50 ± 0.71 | +8.00 ± 0.00 | +2.50 ± 0.71 |"
    assert row in table
    assert "FID 20.00, fashion-FD 1.00" in table
    with pytest.raises(KeyError, match="no chosen s"):
        study.chosen_scale(tmp_path / "run" / "a", 10, 1.0, "rand")
