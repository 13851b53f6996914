"""The benchmark scripts run end to end at toy sizes and write the JSON a report reads.

Only that they work is checked here; their timing targets are for a quiet machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_script

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


def on_digits_members(name: str, digits_ensemble: Path, tmp_path: Path, options: list[str]):
    """Run ``benchmarks/<name>.py`` on the calibrated digits members (calibrated here if no
    test did yet); returns the JSON it wrote and what it printed."""
    members = digits_ensemble / "members/digits-small_cnn"
    if not (members / "thresholds.json").is_file():
        run_script("calibrate.py", f"paths.output_dir={digits_ensemble}", "logger=csv")
    out = tmp_path / f"{name}.json"
    script = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--out", str(out)]
    paths = ["--members-dir", str(members), "--thresholds", str(members / "thresholds.json")]
    done = subprocess.run([*script, *options, *paths], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text()), done.stdout


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


@pytest.mark.slow
def test_cifar10_benchmark_pipeline_end_to_end_on_digits(tmp_path):
    """The BENCHMARKS.md pipeline (train, calibrate ×10, time, table, plot) at toy size."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "cifar10.py"),
            "--quick",
            "--output-dir",
            str(tmp_path / "outputs"),
            "--results",
            str(tmp_path / "results"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "results" / "cifar10.json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names[:3] == ["member seed=0", "member seed=1", "member seed=2"]
    assert sum(n.startswith("flexible") for n in names) == 13 and names[-1] == "oracle"
    assert "full ensemble (fused)" in names and any("fused after stage 1" in n for n in names)
    assert report["fused_continuation_identical"] is True
    assert report["staged_identical"] is True
    assert report["baseline"]["latency"] in ("full ensemble k=3", "full ensemble (fused)")
    rows = {row["name"]: row for row in report["rows"]}
    default = rows["flexible margin λ=10 (default)"]
    assert default["latency_p50_ms"] <= default["latency_p99_ms"]
    assert default["expected_ms"] > 0 and default["expected_img_s"] > 0
    assert default["threads_batch1"] >= 1
    staged = rows["flexible margin λ=10 (default), staged stream"]  # throughput only
    assert "latency_mean_ms" not in staged and staged["expected_img_s"] > 0
    assert staged["throughput_img_s"] > 0 and staged["same_run_img_s"] > 0
    assert sum("certified" in n for n in names) == 2
    for batch in ("batch1", "batch"):  # the inference form timed against the trained form
        form = report["overheads"]["inference_form"][batch]
        assert form["inference_ms"] > 0 and form["trained_ms"] > 0
    for figures in report["drift"].values():  # the members profiled again after the timing
        assert min(figures.values()) > 0
    assert (tmp_path / "results" / "cifar10_accuracy_vs_latency.png").read_bytes()[:4] == b"\x89PNG"
    assert (
        "| target | result | measured |" in (tmp_path / "results" / "cifar10_table.md").read_text()
    )


@pytest.mark.slow
def test_lambda_sweep_writes_its_figures(digits_ensemble, tmp_path):
    published = digits_ensemble / "members/digits-small_cnn/thresholds.json"
    before = published.read_bytes() if published.exists() else None
    result = run_benchmark(
        "lambda_sweep",
        tmp_path / "sweep.json",
        "--experiment",
        "none",
        "--output-dir",
        str(digits_ensemble),
        "--loggers",
        "csv",
        "--lambdas",
        "0,10",
        "--repeats",
        "1",
    )
    csv = result["loggers"]["csv"]
    assert result["lambdas"] == 2 and len(csv["single_s"]) == len(csv["sweep_s"]) == 1
    assert csv["median_job_interval_s"] > 0 and isinstance(csv["passed"], bool)
    assert (published.read_bytes() if published.exists() else None) == before


@pytest.mark.slow
def test_guarantee_benchmark_writes_its_table(tmp_path):
    """benchmarks/guarantee.py end to end at toy size: every procedure at every ε."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "guarantee.py"),
            "--quick",
            "--repeats",
            "5",
            "--output-dir",
            str(tmp_path / "outputs"),
            "--results",
            str(tmp_path / "results"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "results" / "guarantee.json").read_text())
    assert report["repeats"] == 5 and report["pool"]["calibration_split"] == 674
    for procedure, rows in report["summary"].items():
        if procedure.endswith("seconds"):
            continue
        assert [r["epsilon"] for r in rows] == [0.0025, 0.005, 0.01, 0.02]
        assert all(0 <= r["violation_rate"] <= 1 and 1 <= r["avg_members"] <= 3 for r in rows)
    assert (tmp_path / "results" / "guarantee.png").read_bytes()[:4] == b"\x89PNG"
    assert "| procedure | ε (pp) | violation rate |" in result.stdout


def test_transforms_benchmark_times_both_forms_and_compares_them(tmp_path):
    from PIL import Image

    for i in range(3):
        folder = tmp_path / "tree" / "test" / f"class{i}"
        folder.mkdir(parents=True)
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / "a.jpg")
    out = tmp_path / "transforms.json"
    args = ["--root", str(tmp_path / "tree"), "--images", "3", "--rounds", "2", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "transforms.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["images"] == 3 and len(report["paths"]) == 3
    for path in report["paths"].values():
        assert path["identical"] is True
        assert path["v2"]["mean_us"] > 0 and path["fast"]["mean_us"] > 0
    assert "| training sample (decoded split) |" in result.stdout


def test_a_generated_section_replaces_only_its_own_markers(tmp_path):
    from flexens.artifacts import replace_marked_section

    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("intro\n<!-- a:begin -->\nold\n<!-- a:end -->\nprose\n")
    replace_marked_section(doc, "a", "new\n")
    replace_marked_section(doc, "b", "added\n")
    assert doc.read_text() == (
        "intro\n<!-- a:begin -->\nnew\n<!-- a:end -->\nprose\n\n<!-- b:begin -->\nadded\n"
        "<!-- b:end -->\n"
    )


@pytest.mark.slow
def test_the_litserve_floor_is_timed_through_the_echo_server(tmp_path, monkeypatch):
    """serve_load.py's floor: LitServe alone answers real bodies, then stops with its workers."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import serve_load

    args = serve_load.parse_args(["--data", "digits", "--port", "8797"])
    images = serve_load.labelled_images("digits", 5, tmp_path)
    floor = serve_load.litserve_floor(args, images)
    assert 0 < floor["p50_ms"] < 1000 and 0 < floor["mean_ms"] < 1000
    with pytest.raises(serve_load.httpx.TransportError):  # stopped: nothing listens any more
        serve_load.httpx.get("http://127.0.0.1:8797/health", timeout=2)


def test_load_summary_counts_waiting_requests_in_the_tail_and_sheds_apart(monkeypatch):
    """serve_load.py's open loop: a request unanswered at the end (status 0) is in the p99 at
    its wait so far; a 503 is shed, neither answered nor timed; throughput counts answers."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import serve_load

    answered = [(i * 0.01, 10.0, 200, 1, 2, "calibrated") for i in range(98)]
    records = [*answered, (0.5, 5000.0, 0, 0, 0, ""), (0.6, 1.0, 503, 0, 0, "")]
    summary = serve_load.summarise(records, offered=100.0)
    assert summary["unanswered"] == 1 and summary["shed"] == 1 and summary["errors"] == 1
    assert summary["p50_ms"] == 10.0 and summary["p99_ms"] > 10.0
    assert summary["points"] == {"calibrated": 98} and summary["accuracy"] == 1.0
    assert summary["throughput_rps"] == pytest.approx(98 / (0.97 + 0.01))


def test_server_cpu_is_charged_per_answered_request_by_role(monkeypatch):
    """serve_load.py's CPU column: the server's CPU time over a level, per answered request
    (shed and unanswered requests excluded), split into the HTTP side and the workers."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import serve_load

    readings = iter([{"http": 1.0, "workers": 2.0}, {"http": 1.2, "workers": 2.5}])

    class Server:
        def cpu_seconds(self):
            return next(readings)

    level = {"requests": 110, "errors": 5, "unanswered": 5}
    result = serve_load.cpu_per_request(Server(), lambda: dict(level))
    assert result["cpu_http_ms"] == pytest.approx(2.0)
    assert result["cpu_workers_ms"] == pytest.approx(5.0)


@pytest.mark.slow
def test_gpu_benchmark_runs_anywhere_and_renders_a_batch_sweep(digits_ensemble, tmp_path):
    """benchmarks/gpu.py on the CPU (no graphs there): export, run, render."""
    out = tmp_path / "outputs"
    shutil.copytree(digits_ensemble / "members", out / "members")
    run_script("calibrate.py", f"paths.output_dir={out}", "logger=csv", "device=cpu")
    members, images = out / "members" / "digits-small_cnn", tmp_path / "images.pt"
    script = [sys.executable, str(ROOT / "benchmarks" / "gpu.py")]
    run = lambda *args: subprocess.run(  # noqa: E731
        [*script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=True
    )
    run("--export-images", str(images), "--count", "48", "data=digits", f"paths.output_dir={out}")
    run(
        "--images", str(images), "--members-dir", str(members),
        "--thresholds", f"default:{members / 'thresholds.json'}", "--device", "cpu",
        "--batch-size", "16", "--latency-images", "6", "--rounds", "2", "--round-batches", "1",
        "--profile-seconds", "0.5", "--out", str(tmp_path / "gpu.json"),
    )  # fmt: skip
    result = json.loads((tmp_path / "gpu.json").read_text())
    rows = {row["name"]: row for row in result["rows"]}
    assert set(rows) == {
        "member 1 alone",
        "full ensemble",
        "full ensemble (fused)",
        "flexible default",
        "flexible default, staged stream",
    }
    assert all(r["same_prediction_as_cpu"] == r["same_exit_as_cpu"] == 48 for r in rows.values())
    assert rows["flexible default"]["expected_img_s"] > 0 and result["images"]["count"] == 48
    staged = rows["flexible default, staged stream"]
    assert staged["speedup_latency"] is None and "latency_mean_ms" not in staged
    assert (
        staged["expected_img_s"] > 0
        and staged["avg_members"] == rows["flexible default"]["avg_members"]
    )
    sweep = run("--render", str(tmp_path / "gpu.json"), str(tmp_path / "gpu.json")).stdout
    assert "| configuration | top-1 % |" in sweep and "| flexible default | " in sweep
    assert "| flexible default, staged stream | " in sweep


def test_gpu_benchmark_refuses_a_crafted_pickle_with_one_line_and_runs_nothing(
    tmp_path, monkeypatch
):
    """``--images`` is loaded with ``weights_only``: a pickle that would run a command is
    refused, the command never runs, and the refusal is one line, as are a missing file and
    a tensors-only file of the wrong shape."""
    import pickle

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    crafted = tmp_path / "crafted.pt"
    crafted.write_bytes(pickle.dumps(Payload()))
    wrong = tmp_path / "wrong.pt"
    gpu.torch.save({"tensor": gpu.torch.zeros(2)}, wrong)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(wrong.read_bytes()[:50])
    for path, says in (
        (truncated, "is not a readable --export-images file"),
        (crafted, "holds more than tensors"),
        (tmp_path / "absent.pt", "does not exist"),
        (wrong, "is not an --export-images file"),
    ):
        with pytest.raises(SystemExit) as refused:
            gpu.read_images(path)
        message = str(refused.value)
        assert message.startswith(f"error: --images {path}") and says in message
        assert "\n" not in message and "--export-images FILE" in message
    assert not marker.exists()


def test_serve_ab_refuses_a_variant_that_is_not_an_override(capsys, monkeypatch):
    """serve_ab.py compares two ``KEY=VALUE`` settings; anything else is one line, no server."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import serve_ab

    with pytest.raises(SystemExit):
        serve_ab.main(["serve.batch_timeout", "serve.batch_timeout=0.002"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'serve.batch_timeout' is neither an override (KEY=VALUE) nor a revision" in error


def test_serve_ab_runs_a_revision_from_a_worktree_it_removes(tmp_path, monkeypatch):
    """``@REV``: that commit's serve.py and src/ in a temporary worktree, gone afterwards;
    a revision git does not know is one line."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import serve_ab

    with serve_ab.server_of("@HEAD", tmp_path) as (root, overrides):
        assert (root / "serve.py").is_file() and (root / "src/flexens").is_dir()
        assert overrides == ()
    assert not root.exists()
    with serve_ab.server_of("serve.mode=full", tmp_path) as (root, overrides):
        assert root == ROOT and overrides == ("serve.mode=full",)
    with pytest.raises(SystemExit) as refused, serve_ab.server_of("@no-such-revision", tmp_path):
        pass
    message = str(refused.value)
    assert message.startswith("error: cannot check out @no-such-revision") and "\n" not in message


@pytest.mark.slow
def test_the_serving_benchmark_compares_server_and_module_answer_by_answer(
    digits_ensemble, tmp_path
):
    """benchmarks/serve_gpu.py on the CPU: every answer through serve.py is the module's."""
    options = ["--device", "cpu", "--data", "digits", "--images", "6", "--port", "8798"]
    result, stdout = on_digits_members("serve_gpu", digits_ensemble, tmp_path, options)
    assert set(result["configurations"]) == {"flexible", "full"}  # no graphs on a CPU
    for row in result["configurations"].values():
        assert row["same_as_module"] == row["same_as_cpu"] == 6
        assert row["server"]["mean_ms"] > 0 and row["module"]["mean_ms"] > 0
    assert result["configurations"]["full"]["avg_members"] == 3
    assert "| flexible |" in stdout


def test_the_serving_bound_prices_a_batch_as_each_mode_runs_it():
    """benchmarks/serve_bound.py's model: full runs every member on the whole batch;
    flexible runs member k on the requests that reach it, at that sub-batch's cost."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_bound

    calls = np.array([1.0, 1.5, 2.0, 2.5])  # ms per call at batch 1..4
    everyone_first = serve_bound.worker_ms(np.zeros(50, dtype=int), calls, 3, 4)
    assert everyone_first == (3 * 2.5 / 4, 2.5 / 4)
    everyone_last = serve_bound.worker_ms(np.full(50, 2), calls, 3, 4)
    assert everyone_last[1] == pytest.approx(everyone_last[0])
    # half stop at once: member 1 on all four, members 2 and 3 on the n ~ Binomial(4, 1/2)
    # others, a call of n costing calls[n - 1] (nothing for n = 0)
    later = (4 * 1.0 + 6 * 1.5 + 4 * 2.0 + 1 * 2.5) / 16
    full, flexible = serve_bound.worker_ms(np.array([0, 2] * 25), calls, 3, 4)
    assert flexible == pytest.approx((2.5 + 2 * later) / 4, rel=0.02) and flexible < full


@pytest.mark.slow
def test_the_serving_bound_runs_on_the_served_members(digits_ensemble, tmp_path):
    options = ["--data", "digits", "--images", "60", "--widths", "8,16", "--seconds", "0.5"]
    result, stdout = on_digits_members("serve_bound", digits_ensemble, tmp_path, options)
    assert result["images"] == 60 and result["served_width"] == 8
    assert [r["width"] for r in result["widths"]] == [8, 16]
    for row in result["widths"]:
        assert len(row["call_ms"]) == 8 and row["full_workers_ms"] >= row["flexible_workers_ms"]
    assert "| 8 (served) |" in stdout


@pytest.mark.slow
def test_the_allocator_benchmark_runs_both_arms_in_fresh_processes(digits_ensemble, tmp_path):
    options = ["--pairs", "1", "--profiles", "1", "--profile-seconds", "0.5", "--batch-size", "64"]
    result, stdout = on_digits_members("allocator", digits_ensemble, tmp_path, options)
    assert set(result["runs"]) == {"default", "retained"}
    for (run,) in result["runs"].values():
        assert set(run["member"]) == {"1", "2"} and len(run["profiles"]) == 1
    assert result["runs"]["retained"][0]["member"]["1"]["faults_per_call"] == 0
    assert "| kept (flexens) | 1 |" in stdout
