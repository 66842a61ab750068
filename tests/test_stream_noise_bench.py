"""benchmarks/stream_noise_results.py runs and records what docs/performance.md reads from it: per normals path
its speed and the bare Philox bound, per step case its bytes, bandwidth and fraction of a copy of the same bytes.
A tiny run (one shape of 2 x 4 x 16 x 16, two rounds): the figures are not checked, their presence and sense are.
Checked to fail with the eta 0 step counted at 8 bytes an element instead of 12."""

import json
import os
import subprocess
import sys

from ddim_gmm_ext.ops import cpu_normals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stream_noise_results_writes_its_tables(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "benchmarks/stream_noise_results.py", "--only", "normals,step", "--shapes", "2x4x16x16"]
    cmd += ["--threads", "1", "--rounds", "2", "--block-ms", "1", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, check=True, capture_output=True)
    doc = json.loads(out.read_text())
    assert doc["machine"]["cpu_count"] >= 1 and doc["versions"]["torch"]
    paths = [p for p in cpu_normals.PATHS if cpu_normals.supported(p)]
    assert doc["normals_path"] == paths[-1]
    per_normal = doc["normals"]["per_normal"]
    assert set(per_normal) == {f"{kind} {p}" for p in paths for kind in ("normals", "bare philox")} | {"torch.randn"}
    assert all(v["ns_per_normal"] > 0 for v in per_normal.values())
    (run,) = doc["step"]
    assert run["shape"] == [2, 4, 16, 16] and run["threads"] == 1
    rows = run["rows"]
    numel = 2 * 4 * 16 * 16
    assert rows["eta 0"]["bytes"] == 12 * numel and rows["eta 1, noise given"]["bytes"] == 16 * numel
    assert rows["copy 12"]["fraction_of_copy"] == 1.0 and rows["copy 16"]["fraction_of_copy"] == 1.0
    for name in ("GMM ORTHO-VUB, noise given", "GMM ORTHO-LR, in-kernel"):
        assert rows[name]["bytes"] > 12 * numel  # the tables of the step are counted
    assert all(r["us"] > 0 and r["GB_s"] > 0 for r in rows.values())
    assert {f"eta 1, in-kernel ({p})" for p in paths} <= set(rows)
