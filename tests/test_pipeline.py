"""The real entry points, end to end on digits, as a user runs them."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import run_script

MEMBERS = "members/digits-small_cnn"


def newest(out, pattern):
    found = sorted(out.glob(pattern))
    assert found, f"nothing matches {pattern}"
    return found[-1]


def test_train_calibrate_infer(digits_ensemble):
    out = digits_ensemble
    assert sorted(p.name for p in (out / MEMBERS).glob("seed=*.safetensors")) == [
        "seed=0.safetensors",
        "seed=1.safetensors",
        "seed=2.safetensors",
    ]
    meta = json.loads((out / MEMBERS / "seed=0.json").read_text())
    assert meta["num_classes"] == 10 and meta["calib_fingerprint"] and meta["sha256"]

    result = run_script(
        "calibrate.py", f"paths.output_dir={out}", "logger=csv", "calibrate.max_drop=0.05"
    )
    thresholds = json.loads((out / MEMBERS / "thresholds.json").read_text())
    assert str(out / MEMBERS / "thresholds.json") in result.stdout
    assert len(thresholds["thresholds"]) == 2
    assert thresholds["search"]["method"] == "certified (shared)"
    certificate = thresholds["certificate"]
    assert certificate["certified"] and certificate["epsilon"] == 0.05
    assert certificate["num_samples"] == 674 and certificate["upper_bound"] <= 0.05
    line = "certified: accuracy loss ≤ 5.00 pp with 90% confidence (n = 674, fixed-sequence"
    assert line in result.stdout
    assert [m["seed"] for m in thresholds["members"]] == [0, 1, 2]
    assert thresholds["fuse_from"] in (None, 1)  # priced for the chosen thresholds
    assert "fused continuation:" in result.stdout
    cal = thresholds["calibration"]
    assert cal["flexible"]["avg_members"] < 3 and cal["oracle"]["avg_members"] < 3
    assert thresholds["pareto_front"] and thresholds["calibration"]["lambda_curve"]
    run = newest(out, "runs/calibrate/*")
    for png in ("confidence_histogram.png", "accuracy_vs_latency.png", "pareto_front.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"

    result = run_script(
        "infer.py",
        f"paths.output_dir={out}",
        "logger=csv",
        "infer.latency_images=20",
        "infer.throughput_images=256",
    )
    assert line in result.stdout
    metrics = json.loads((newest(out, "runs/infer/*") / "metrics.json").read_text())
    assert metrics["certificate"] == certificate
    for mode in ("flexible", "full", "full_fused"):
        for key in ("accuracy", "avg_members", "latency_mean_ms", "throughput_img_s"):
            assert metrics[mode][key] > 0
        assert metrics[mode]["expected_latency_ms"] > 0  # the fused baseline too
        assert metrics[mode]["latency_p50_ms"] <= metrics[mode]["latency_p99_ms"]
        assert metrics[mode]["threads_batch1"] >= 1 and metrics[mode]["threads_batched"] >= 1
    baseline = metrics["baseline"]
    assert {baseline["latency"], baseline["throughput"]} <= {"full", "full_fused"}
    fastest = metrics[baseline["latency"]]["latency_mean_ms"]
    assert metrics["flexible"]["speedup_latency"] == pytest.approx(
        fastest / metrics["flexible"]["latency_mean_ms"]
    )
    assert metrics["flexible"]["expected_throughput_img_s"] > 0
    staged = metrics["flexible_staged"]  # the same answers, every member at full batches
    assert staged["throughput_img_s"] > 0 and staged["expected_throughput_img_s"] > 0
    assert staged["accuracy"] == metrics["flexible"]["accuracy"]
    assert "latency_mean_ms" not in staged and staged["threads_batched"] >= 1
    assert any(line.startswith("flexible_staged ") for line in result.stdout.splitlines())
    assert "full = fastest full ensemble" in result.stdout
    assert metrics["full"]["avg_members"] == 3
    assert metrics["flexible"]["avg_members"] < metrics["full"]["avg_members"]
    assert abs(metrics["flexible"]["accuracy"] - metrics["full"]["accuracy"]) < 0.05
    assert sum(metrics["flexible"]["exit_histogram"]) == metrics["test_samples"] == 450
    assert "flexible" in result.stdout and "full" in result.stdout
    rows = list(csv.DictReader((newest(out, "runs/infer/*") / "predictions.csv").open()))
    assert len(rows) == 450 and {"prediction", "members_used"} <= set(rows[0])


def test_lambda_sweep_logs_one_offline_wandb_run_per_lambda(digits_ensemble):
    out = digits_ensemble
    run_script(
        "calibrate.py",
        "-m",
        "calibrate.objective=lambda",
        "calibrate.lam=0,10",
        f"paths.output_dir={out}",
    )
    sweep = newest(out, "multirun/calibrate/*")
    for job in ("0", "1"):
        assert (sweep / job / "thresholds.json").exists()
        runs = list((sweep / job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, runs
        images = list(runs[0].glob("files/media/images/*.png"))
        assert len(images) == 3, images
    lams = [json.loads((sweep / j / "thresholds.json").read_text())["lam"] for j in ("0", "1")]
    assert lams == [0.0, 10.0]


def test_operating_point_and_images_in_the_wild(digits_ensemble, tmp_path):
    out = digits_ensemble
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((16, 16), 200, np.uint8)).save(folder / "grey.png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(folder / "clear.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    result = run_script(
        "infer.py",
        f"paths.output_dir={out}",
        "logger=csv",
        f"input={folder}",
        "infer.operating_point.budget_ms=1e9",
    )
    assert "skipped" in result.stdout and "broken.jpg" in result.stdout
    rows = list(csv.DictReader((newest(out, "runs/infer/*") / "predictions.csv").open()))
    assert [r["file"].rsplit("/", 1)[1] for r in rows] == ["clear.png", "grey.png"]
    assert "thresholds (budget_ms=1e+09)" in result.stdout
    assert "not certified: accuracy loss" in result.stdout

    result = run_script(
        "infer.py",
        f"paths.output_dir={out}",
        "logger=csv",
        f"input={folder}",
        "infer.operating_point.max_drop=0.2",
    )
    assert "thresholds (max_drop=0.2)" in result.stdout
    assert "certified: accuracy loss ≤ 20.00 pp with 90% confidence (n = 674" in result.stdout


def test_label_free_calibration_on_a_folder_of_images(digits_ensemble, tmp_path):
    """calibrate.risk=disagreement certifies on unlabelled images in nested folders."""
    from sklearn.datasets import load_digits

    images = load_digits().images[-300:]
    for i, image in enumerate(images):
        folder = tmp_path / "production" / f"day{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        ink = (255 - image * 255 / 16).astype(np.uint8)  # photos: dark ink on white paper
        Image.fromarray(ink).resize((32, 32)).save(folder / f"{i}.png")
    (tmp_path / "production" / "notes.txt").write_text("not an image")
    result = run_script(
        "calibrate.py",
        f"paths.output_dir={digits_ensemble}",
        "logger=csv",
        "calibrate.risk=disagreement",
        f"calibrate.unlabelled={tmp_path / 'production'}",
        "calibrate.max_drop=0.05",
        f"calibrate.output={tmp_path}/label_free.json",
    )
    report = json.loads((tmp_path / "label_free.json").read_text())
    certificate = report["certificate"]
    assert certificate["risk"] == "disagreement" and certificate["num_samples"] == 300
    assert not report["calibration"]["labelled"]
    assert report["calibration"]["full"]["accuracy"] == 1.0  # agreement of full with itself
    assert "disagreement with the full ensemble ≤ 5.00 pp" in result.stdout

    fails = run_script(
        "calibrate.py",
        f"paths.output_dir={digits_ensemble}",
        "logger=csv",
        f"calibrate.unlabelled={tmp_path / 'production'}",
        check=False,
    )
    assert fails.returncode == 2 and "certify calibrate.risk=disagreement" in fails.stderr


def test_too_little_data_serves_the_full_ensemble_and_says_why(digits_ensemble, tmp_path):
    result = run_script(
        "calibrate.py",
        f"paths.output_dir={digits_ensemble}",
        "logger=csv",
        "calibrate.max_drop=0.001",
        f"calibrate.output={tmp_path}/strict.json",
    )
    report = json.loads((tmp_path / "strict.json").read_text())
    assert report["thresholds"] == [1.0, 1.0]
    assert report["calibration"]["flexible"]["avg_members"] == 3
    assert "n = 674 tested samples are too few to certify accuracy loss ≤ 0.10 pp" in result.stdout
    assert "the smallest ε they can certify is 0.44 pp" in result.stdout  # δ/2 for net_drop
    assert "needs at least 2,995" in result.stdout


def test_bad_input_ends_with_one_line_and_writes_nothing(digits_ensemble, tmp_path):
    out = digits_ensemble
    published = out / MEMBERS / "thresholds.json"
    run_script("calibrate.py", f"paths.output_dir={out}", "logger=csv")
    before = published.read_bytes()

    def fails(script, *overrides, match):
        result = run_script(script, *overrides, check=False)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and match in lines[0], result.stderr

    fails(
        "calibrate.py",
        f"paths.output_dir={out}",
        "logger=csv",
        "calibrate.lam=-1",
        match="calibrate.lam must be a finite number >= 0, got -1",
    )
    fails(
        "calibrate.py",
        f"paths.output_dir={out}",
        "logger=csv",
        "calibrate.delta=1.5",
        match="calibrate.delta must be in (0, 1), got 1.5",
    )
    fails(
        "calibrate.py",
        f"paths.output_dir={out}",
        "logger=csv",
        "calibrate.grid_step=0",
        match="grid_step must be in (0, 1], got 0",
    )
    fails(
        "train.py",
        f"paths.output_dir={tmp_path}",
        "logger=csv",
        "model.arch=no_such_net",
        match="unknown model architecture 'no_such_net'",
    )
    fails(
        "train.py",
        f"paths.output_dir={tmp_path}",
        "logger=csv",
        "data=cifar10",
        f"data.root={tmp_path}/missing",
        match="missing' does not exist",
    )
    tampered = json.loads(before)
    tampered["members"][1]["sha256"] = "0" * 64
    (tmp_path / "t.json").write_text(json.dumps(tampered))
    fails(
        "infer.py",
        f"paths.output_dir={out}",
        "logger=csv",
        f"infer.thresholds={tmp_path}/t.json",
        match="seed=1.safetensors changed since",
    )
    tampered = json.loads(before)
    tampered["thresholds"] = [0.5]
    (tmp_path / "t.json").write_text(json.dumps(tampered))
    fails(
        "infer.py",
        f"paths.output_dir={out}",
        "logger=csv",
        f"infer.thresholds={tmp_path}/t.json",
        match="1 thresholds for 3 members",
    )
    assert published.read_bytes() == before
    assert not list(tmp_path.glob("members/*/seed=*.safetensors"))


def test_one_member_has_nothing_to_calibrate(digits_ensemble, tmp_path):
    out = digits_ensemble
    result = run_script(
        "calibrate.py",
        f"paths.output_dir={out}",
        "logger=csv",
        "ensemble.order=[1]",
        f"calibrate.output={tmp_path}/one.json",
    )
    assert "nothing to calibrate" in result.stdout
    report = json.loads((tmp_path / "one.json").read_text())
    assert report["thresholds"] == [] and report["calibration"]["flexible"]["avg_members"] == 1


def test_heterogeneous_members_in_auto_cost_order(digits_ensemble, tmp_path):
    """A wider (costlier) member joins; ensemble.order=auto runs the cheap ones first."""
    shutil.copytree(digits_ensemble / "members", tmp_path / "members")
    run_script(
        "train.py",
        "seed=7",
        f"paths.output_dir={tmp_path}",
        "logger=csv",
        "trainer.max_epochs=1",
        "train.progress_bar=false",
        "model.kwargs.width=64",
    )
    run_script(
        "calibrate.py",
        f"paths.output_dir={tmp_path}",
        "logger=csv",
        "ensemble.order=auto",
        "calibrate.search=shared",
    )
    report = json.loads((tmp_path / MEMBERS / "thresholds.json").read_text())
    assert [m["seed"] for m in report["members"]][-1] == 7
    costs = [m["batch1_ms"] for m in report["latency_profile"]["members"]]
    assert costs == sorted(costs) and len(report["thresholds"]) == 3


@pytest.mark.slow
def test_the_readme_quickstart_certifies_and_halts(tmp_path):
    """The README's quickstart with its defaults (only the output folder moved)."""
    out = f"paths.output_dir={tmp_path}"
    run_script("train.py", "-m", "seed=0,1,2", out, "train.progress_bar=false")
    calibrated = run_script("calibrate.py", out)
    inferred = run_script("infer.py", out)
    line = "certified: accuracy loss ≤ 1.00 pp with 90% confidence (n = 674, fixed-sequence"
    assert line in calibrated.stdout and line in inferred.stdout
    assert "LeafSpec" not in calibrated.stderr + inferred.stderr  # Lightning's noise, silenced
    metrics = json.loads((newest(tmp_path, "runs/infer/*") / "metrics.json").read_text())
    assert metrics["flexible"]["avg_members"] < 2
    assert metrics["full"]["accuracy"] - metrics["flexible"]["accuracy"] <= 0.01
