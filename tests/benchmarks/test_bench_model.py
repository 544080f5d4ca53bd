"""benchmarks/bench_model.py runs end to end (CPU, tiny): every pattern trains a step and reports."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_model_benchmark_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_model.py", "--smoke", "--patterns", "*", "R*", "R", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "model.json").read_text())["rows"]
    assert [r["pattern"] for r in rows] == ["*", "R*", "R"]
    for row in rows:
        assert row["tokens_per_s"] > 0 and 4.0 < row["loss"] < 7.0, row  # ln(256) = 5.5 at initialization
    assert "| 64 (2) |" in (tmp_path / "model.md").read_text()
