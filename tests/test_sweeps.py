"""A sweep runs on past a job with bad input, and says which jobs failed."""

from conftest import run_script


def test_one_bad_job_does_not_stop_the_sweep(digits_ensemble):
    out = digits_ensemble
    result = run_script(
        "calibrate.py",
        "-m",
        f"paths.output_dir={out}",
        "logger=csv",
        "calibrate.delta=7,0.2",
        "hydra.sweep.dir=" + str(out / "multirun" / "bad_job_sweep"),
        check=False,
    )
    sweep = out / "multirun" / "bad_job_sweep"
    assert result.returncode == 2, result.stderr
    assert "error: calibrate.delta must be in (0, 1), got 7" in result.stderr
    summary = [line for line in result.stderr.splitlines() if "job(s) of this sweep failed" in line]
    assert len(summary) == 1 and "#0 (" in summary[0] and "#1" not in summary[0]
    assert not (sweep / "0" / "thresholds.json").exists()
    assert (sweep / "1" / "thresholds.json").exists()  # the job after the bad one ran
