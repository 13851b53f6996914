"""The benchmark scripts run end to end at toy sizes and write the JSON a report reads.

Only that they work is checked here; their timing targets are for a quiet machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, out: Path, *args: str) -> dict:
    """Run ``benchmarks/<name>.py`` as a user would and return the JSON it wrote."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    assert "PASS" in result.stdout or "FAIL" in result.stdout
    return json.loads(out.read_text())


def test_search_speed_writes_its_figures(tmp_path):
    result = run_benchmark(
        "search_speed",
        tmp_path / "search.json",
        "--samples",
        "500",
        "--members",
        "4",
        "--repeats",
        "1",
    )
    assert {"machine", "config", "data", "table_build", "shared", "per_stage", "target"} <= set(
        result
    )
    assert {"device", "cpu_count", "torch", "date"} <= set(result["machine"])
    assert result["per_stage"]["method"] == "coordinate_descent"
    assert result["per_stage"]["evaluations"] > result["shared"]["evaluations"] == 101
    assert isinstance(result["target"]["passed"], bool)


def test_overhead_writes_its_figures(tmp_path):
    # One thread: two would oversubscribe a 2-core machine that is also running pytest.
    result = run_benchmark(
        "overhead",
        tmp_path / "overhead.json",
        "--synthetic",
        "--batch",
        "16",
        "--repeats",
        "3",
        "--batch1-calls",
        "5",
        "--threads",
        "1",
    )
    assert {"machine", "members", "full_vs_loop", "flexible", "targets", "passed"} <= set(result)
    assert result["members"]["source"] == "synthetic" and result["members"]["count"] == 5
    assert [row["batch"] for row in result["full_vs_loop"]] == [1, 16]
    flexible = result["flexible"]
    assert sum(flexible["exit_histogram"]) == 16 and flexible["reach"][0] == 16
    assert flexible["exit_histogram"][0] == 8  # median thresholds halt half at stage 1
    assert flexible["predicted_gain"] > 1 and flexible["measured_gain"] > 0
