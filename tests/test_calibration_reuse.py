"""Jobs of a sweep share what they can, and still give what independent runs give."""

import json
import os
import shutil

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import ROOT
from flexens.latency import resolve_device
from flexens.memo import SweepMemo
from flexens.tasks.calibrate import calibrate, calibration_inputs, ensemble_files


@pytest.fixture
def outputs(digits_ensemble, tmp_path):
    """A private copy of the trained digits members (their files get touched here)."""
    shutil.copytree(digits_ensemble / "members", tmp_path / "members")
    return tmp_path


def config(out, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "calibrate",
            # profile_check off: a quick check that finds the stored latency profile "stale"
            # on a noisy machine would re-measure it, and the runs would price differently
            overrides=[
                f"paths.output_dir={out}",
                "logger=csv",
                "device=cpu",
                "calibrate.profile_check=false",
                *overrides,
            ],
        )


def test_inputs_are_reused_until_something_that_shapes_them_changes(outputs):
    memo = SweepMemo()

    def inputs(*overrides):
        cfg = config(outputs, *overrides)
        settings = instantiate(cfg.calibrate)
        return calibration_inputs(cfg, settings, ensemble_files(cfg), resolve_device("cpu"), memo)

    first = inputs("calibrate.lam=0")
    assert inputs("calibrate.lam=3") is first
    assert inputs("calibrate.objective=max_drop") is first

    by_entropy = inputs("calibrate.criterion=entropy")
    assert by_entropy is not first and by_entropy.table.num_samples == first.table.num_samples
    assert len(memo.inputs) == 1  # the old inputs were let go

    member = outputs / "members/digits-small_cnn/seed=1.safetensors"
    stat = member.stat()
    os.utime(member, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # "retrained"
    assert inputs("calibrate.criterion=entropy") is not by_entropy


def strip_timing(report: dict) -> dict:
    report = json.loads(json.dumps(report))
    report["search"].pop("seconds")
    report["latency_profile"].pop("source")  # "measured" by the first job, a path later
    return report


def test_a_sweep_job_reports_what_an_independent_run_reports(outputs, tmp_path):
    def run(lam, name, memo):
        cfg = config(
            outputs,
            "calibrate.objective=lambda",
            f"calibrate.lam={lam}",
            f"paths.run_dir={tmp_path / name}",
            f"calibrate.output={tmp_path / name}.json",
        )
        return strip_timing(calibrate(cfg, memo))

    sweep = SweepMemo()
    run(0, "warm", sweep)  # leaves its inputs, λ curve and plots in the sweep's memo
    in_sweep = run(10, "in_sweep", sweep)
    assert len(sweep.derived) and len(sweep.plots)
    independent = run(10, "independent", SweepMemo())
    assert in_sweep == independent
    for png in ("confidence_histogram.png", "accuracy_vs_latency.png", "pareto_front.png"):
        assert (tmp_path / "in_sweep" / png).read_bytes() == (
            tmp_path / "independent" / png
        ).read_bytes()
