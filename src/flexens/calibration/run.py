"""``calibrate.py``: cached member outputs on the calibration split → thresholds.json."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from flexens.artifacts import write_json
from flexens.calibration.inputs import CalibrationInputs, calibration_inputs
from flexens.calibration.objectives import Objective
from flexens.calibration.pareto import ParetoCollector
from flexens.calibration.search import ThresholdSearch, make_grid
from flexens.calibration.simulate import Outcome, StageTable
from flexens.halting import get_criterion
from flexens.reporting import plots
from flexens.reporting.loggers import (
    build_logger,
    close_logger,
    log_config,
    log_images,
    log_table,
    run_dir,
)

log = logging.getLogger(__name__)

LAMBDA_LADDER = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
"""λ values traced for the accuracy-vs-latency curve and to widen the Pareto front."""

THRESHOLDS_FORMAT = "flexens-thresholds-v1"


def summary(outcome: Outcome) -> dict:
    return {
        "accuracy": outcome.accuracy,
        "avg_members": outcome.avg_members,
        "expected_latency_ms": outcome.latency_ms,
    }


def build_objective(cfg: DictConfig, full: Outcome, num_samples: int) -> Objective:
    c = cfg.calibrate
    budget = float("inf")
    if c.objective == "budget":
        if c.budget_ms is None and c.budget_fraction is None:
            raise ValueError(
                "calibrate.objective=budget needs calibrate.budget_ms=... or "
                "calibrate.budget_fraction=... (of the full ensemble's latency)"
            )
        budget = (
            float(c.budget_ms)
            if c.budget_ms is not None
            else float(c.budget_fraction) * full.latency_ms
        )
    return Objective(
        kind=str(c.objective),
        latency_full_ms=full.latency_ms,
        error_full=full.error,
        num_samples=num_samples,
        lam=float(c.lam),
        max_drop=float(c.max_drop),
        drop_mode=str(c.drop_mode),
        budget_ms=budget,
    )


def search_thresholds(cfg: DictConfig, table: StageTable, objective: Objective):
    c = cfg.calibrate
    grid = make_grid(float(c.grid_step))
    search = ThresholdSearch(table, grid, objective)
    start = time.perf_counter()
    if c.search == "shared":
        result = search.shared()
    else:
        result = search.per_stage(int(c.exhaustive_max_evals), int(c.restarts), seed=0)
    seconds = time.perf_counter() - start
    return result, seconds, grid


def lambda_curve(
    cfg: DictConfig, inputs: CalibrationInputs, grid: np.ndarray
) -> tuple[list[dict], ParetoCollector]:
    """Flexible execution across :data:`LAMBDA_LADDER`, and the Pareto points it met.

    It depends on the inputs and the grid only, not on this run's objective, so every job of
    a sweep over the same inputs reuses the first job's curve.
    """
    key = ("lambda_curve", float(cfg.calibrate.grid_step), int(cfg.calibrate.exhaustive_max_evals))
    if key in inputs.derived:
        return inputs.derived[key]
    table = inputs.table
    full = table.full()
    pareto = ParetoCollector(table.num_members - 1)
    curve = []
    for lam in LAMBDA_LADDER:
        objective = Objective("lambda", full.latency_ms, full.error, table.num_samples, lam=lam)
        search = ThresholdSearch(table, grid, objective, pareto=pareto)
        result = search.per_stage(int(cfg.calibrate.exhaustive_max_evals), 0)
        curve.append(
            {
                "lam": lam,
                "thresholds": result.thresholds.tolist(),
                **summary(table.evaluate(result.thresholds)),
            }
        )
    inputs.derived[key] = curve, pareto
    return curve, pareto


def output_path(cfg: DictConfig, run: Path) -> Path | None:
    """Where thresholds.json is published for infer.py; a sweep keeps per-run files only."""
    if cfg.calibrate.output:
        return Path(cfg.calibrate.output)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return None
    return Path(cfg.paths.members_dir) / "thresholds.json"


def check_settings(cfg: DictConfig) -> None:
    """Fail on bad calibrate.* values before any member is loaded or run."""
    c = cfg.calibrate
    get_criterion(c.criterion)
    make_grid(float(c.grid_step))
    Objective(
        kind=str(c.objective),
        latency_full_ms=1.0,
        error_full=0.0,
        num_samples=1,
        lam=float(c.lam),
        max_drop=float(c.max_drop),
        drop_mode=str(c.drop_mode),
    )
    if c.search not in ("shared", "per_stage"):
        raise ValueError(f"unknown calibrate.search {c.search!r}; use shared or per_stage")


def calibrate(cfg: DictConfig) -> dict:
    check_settings(cfg)
    inputs = calibration_inputs(cfg)
    members, table, profile = inputs.members, inputs.table, inputs.profile
    full, oracle = table.full(), table.oracle()
    objective = build_objective(cfg, full, table.num_samples)

    run = run_dir(cfg)
    logger = build_logger(cfg, run, name=f"{cfg.ensemble.name}-calibrate-{objective.describe()}")
    log_config(logger, cfg)
    if len(members) == 1:
        log.warning("one member: nothing to calibrate; the thresholds mean 'run it'")
        print(
            "warning: the ensemble has one member, so there is nothing to calibrate; "
            "thresholds.json says: run it"
        )
        thresholds, method, evaluations, seconds, feasible = [], "none", 0, 0.0, True
        front, curve = (
            [{"thresholds": [], "latency_ms": full.latency_ms, "accuracy": full.accuracy}],
            [],
        )
    else:
        result, seconds, grid = search_thresholds(cfg, table, objective)
        thresholds, method, evaluations = (
            result.thresholds.tolist(),
            result.method,
            result.evaluations,
        )
        chosen = table.evaluate(thresholds)
        feasible = bool(
            objective.violation(np.array([chosen.latency_ms]), np.array([chosen.error]))[0] == 0
        )
        if not feasible:
            print(
                f"warning: no threshold set meets {objective.describe()}; the closest one reaches "
                f"{chosen.accuracy:.2%} calibration accuracy at {chosen.latency_ms:.3f} ms "
                f"(full ensemble: {full.accuracy:.2%} at {full.latency_ms:.3f} ms)"
            )
        curve, curve_points = lambda_curve(cfg, inputs, grid)
        front = result.pareto.merged(curve_points).to_list()
    flexible = table.evaluate(thresholds)

    report = {
        "format": THRESHOLDS_FORMAT,
        "ensemble": str(cfg.ensemble.name),
        "members": [m.describe() for m in members],
        "criterion": str(cfg.calibrate.criterion),
        "objective": {
            "kind": objective.kind,
            "lam": objective.lam,
            "max_drop": objective.max_drop,
            "drop_mode": objective.drop_mode,
            "budget_ms": None if np.isinf(objective.budget_ms) else objective.budget_ms,
            "feasible": feasible,
        },
        "lam": objective.lam,
        "thresholds": thresholds,
        "search": {
            "method": method,
            "evaluations": evaluations,
            "grid_step": float(cfg.calibrate.grid_step),
            "seconds": round(seconds, 4),
        },
        "calibration": {
            "num_samples": table.num_samples,
            "calib_fingerprint": inputs.calib_fingerprint,
            "flexible": summary(flexible),
            "full": summary(full),
            "oracle": summary(oracle),
            "prefix": [summary(table.prefix(k)) for k in range(1, len(members) + 1)],
            "lambda_curve": curve,
        },
        "latency_profile": profile,
        "pareto_front": front,
    }
    images = make_plots(run, table, report)
    path = write_json(run / "thresholds.json", report)
    published = output_path(cfg, run)
    if published is not None:
        write_json(published, report)
        path = published
    print_summary(report, path)
    if logger is not None:
        logger.log_metrics(
            {
                f"calib/{mode}/{k}": v
                for mode in ("flexible", "full", "oracle")
                for k, v in report["calibration"][mode].items()
            }
        )
        log_table(
            logger,
            "thresholds",
            ["stage", "threshold"],
            [[k + 1, t] for k, t in enumerate(thresholds)],
        )
        log_table(
            logger,
            "lambda_curve",
            ["lam", "accuracy", "avg_members", "expected_latency_ms"],
            [[c["lam"], c["accuracy"], c["avg_members"], c["expected_latency_ms"]] for c in curve],
        )
        log_images(logger, images)
    close_logger(logger)
    return report


def make_plots(run: Path, table: StageTable, report: dict) -> dict[str, Path]:
    cal = report["calibration"]
    point = lambda s: (s["expected_latency_ms"], s["accuracy"])  # noqa: E731
    images = {
        "confidence_histogram": plots.plot_confidence_histogram(
            table.confidence[0],
            table.correct[0],
            run / "confidence_histogram.png",
            criterion=report["criterion"],
        ),
        "accuracy_vs_latency": plots.plot_accuracy_vs_latency(
            run / "accuracy_vs_latency.png",
            full=[point(p) for p in cal["prefix"]],
            flexible={
                report["criterion"]: [(*point(c), f"λ={c['lam']:g}") for c in cal["lambda_curve"]]
            },
            oracle=point(cal["oracle"]),
        ),
    }
    front = report["pareto_front"]
    images["pareto_front"] = plots.plot_pareto_front(
        run / "pareto_front.png",
        np.array([p["latency_ms"] for p in front]),
        np.array([p["accuracy"] for p in front]),
        chosen=point(cal["flexible"]),
        full=point(cal["full"]),
        oracle=point(cal["oracle"]),
    )
    return images


def print_summary(report: dict, path: Path) -> None:
    cal = report["calibration"]
    print(
        f"criterion {report['criterion']}, objective {report['objective']['kind']}, "
        f"search {report['search']['method']} ({report['search']['evaluations']} evaluations, "
        f"{report['search']['seconds']:.3f} s)"
    )
    print("thresholds: " + ", ".join(f"{t:.2f}" for t in report["thresholds"]))
    print(f"{'calibration split':<12} {'accuracy':>9} {'members':>8} {'latency ms':>11}")
    for mode in ("flexible", "full", "oracle"):
        s = cal[mode]
        print(
            f"{mode:<12} {s['accuracy']:>9.4f} {s['avg_members']:>8.3f} {s['expected_latency_ms']:>11.3f}"
        )
    print(f"thresholds: {path}")
