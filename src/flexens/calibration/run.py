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
from flexens.calibration.certificate import (
    certificate_line,
    certificate_metrics,
    certification_basis,
    certified_thresholds,
    uncertified,
)
from flexens.calibration.loading import CalibrationInputs, calibration_inputs
from flexens.calibration.objectives import Objective
from flexens.calibration.pareto import ParetoCollector
from flexens.calibration.risk import PROCEDURES, RISKS, CertifiedPath, certified_front, certify
from flexens.calibration.schema import THRESHOLDS_FORMAT
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
    )
    if c.search not in ("shared", "per_stage"):
        raise ValueError(f"unknown calibrate.search {c.search!r}; use shared or per_stage")
    if c.risk not in RISKS:
        raise ValueError(f"unknown calibrate.risk {c.risk!r}; use {' or '.join(RISKS)}")
    if c.procedure not in PROCEDURES:
        raise ValueError(
            f"unknown calibrate.procedure {c.procedure!r}; use {' or '.join(PROCEDURES)}"
        )
    if not 0 < float(c.delta) < 1:
        raise ValueError(f"calibrate.delta must be in (0, 1), got {c.delta}; e.g. 0.1")
    if c.objective == "max_drop" and not 0 < float(c.max_drop) < 1:
        raise ValueError(
            f"calibrate.max_drop must be in (0, 1) to certify, got {c.max_drop}; e.g. 0.005 (0.5 pp)"
        )
    if c.unlabelled and c.risk != "disagreement":
        raise ValueError(
            f"calibrate.unlabelled={c.unlabelled!r} has no labels, so accuracy loss cannot be "
            "measured there; certify calibrate.risk=disagreement instead"
        )


def certification(cfg: DictConfig, inputs: CalibrationInputs) -> tuple[CertifiedPath, list[dict]]:
    """Fixed-sequence testing of the configured procedure's candidates, and its front.

    Like the λ curve it depends on the inputs and the certification settings only, so the
    jobs of a λ sweep share it.
    """
    c = cfg.calibrate
    settings = {
        "risk": str(c.risk),
        "procedure": str(c.procedure),
        "delta": float(c.delta),
        "split_seed": int(cfg.data.get("split_seed", 0)),
        "opt_fraction": float(c.opt_fraction),
        "max_exhaustive_evals": int(c.exhaustive_max_evals),
    }
    key = ("certification", float(c.grid_step), *settings.values())
    if key not in inputs.derived:
        path = certify(inputs.table, grid=make_grid(float(c.grid_step)), **settings)
        inputs.derived[key] = path, certified_front(path, inputs.table)
    return inputs.derived[key]


def choose(cfg: DictConfig, inputs: CalibrationInputs) -> dict:
    """Thresholds, their certificate, and the fronts that later operating points pick from."""
    table = inputs.table
    full = table.full()
    objective = build_objective(cfg, full, table.num_samples)
    risk, delta = str(cfg.calibrate.risk), float(cfg.calibrate.delta)
    if table.num_members == 1:
        print(
            "warning: the ensemble has one member, so there is nothing to calibrate; "
            "thresholds.json says: run it"
        )
        point = {"thresholds": [], "latency_ms": full.latency_ms, "accuracy": full.accuracy}
        return {
            "objective": objective,
            "thresholds": [],
            "search": {"method": "none", "evaluations": 0, "seconds": 0.0},
            "feasible": True,
            "certificate": uncertified(table, [], risk, delta)
            | {"certified": True, "fallback": "one member, which always runs"},
            "certification": None,
            "certified_front": [],
            "pareto_front": [point],
            "lambda_curve": [],
        }
    start = time.perf_counter()
    path, cert_front = certification(cfg, inputs)
    cert_seconds = time.perf_counter() - start
    grid = make_grid(float(cfg.calibrate.grid_step))
    curve, curve_points = lambda_curve(cfg, inputs, grid)
    if objective.kind == "max_drop":
        thresholds, certificate = certified_thresholds(
            cert_front, float(cfg.calibrate.max_drop), certification_basis(path)
        )
        search = {
            "method": f"certified ({path.procedure})",
            "evaluations": len(path.thresholds),
            "seconds": round(cert_seconds, 4),
        }
        front, feasible = curve_points.to_list(), True
    else:
        result, seconds, _ = search_thresholds(cfg, table, objective)
        thresholds = result.thresholds.tolist()
        certificate = uncertified(table, thresholds, risk, delta)
        search = {
            "method": result.method,
            "evaluations": result.evaluations,
            "seconds": round(seconds, 4),
        }
        front = result.pareto.merged(curve_points).to_list()
        feasible = warn_if_infeasible(table, objective, thresholds)
    return {
        "objective": objective,
        "thresholds": [float(t) for t in thresholds],
        "search": search,
        "feasible": feasible,
        "certificate": certificate,
        "certification": certification_basis(path),
        "certified_front": cert_front,
        "pareto_front": front,
        "lambda_curve": curve,
    }


def warn_if_infeasible(table: StageTable, objective: Objective, thresholds: list[float]) -> bool:
    chosen, full = table.evaluate(thresholds), table.full()
    violation = objective.violation(np.array([chosen.latency_ms]), np.array([chosen.error]))
    if violation[0] == 0:
        return True
    print(
        f"warning: no threshold set meets {objective.describe()}; the closest one reaches "
        f"{chosen.accuracy:.2%} calibration accuracy at {chosen.latency_ms:.3f} ms "
        f"(full ensemble: {full.accuracy:.2%} at {full.latency_ms:.3f} ms)"
    )
    return False


def build_report(cfg: DictConfig, inputs: CalibrationInputs) -> dict:
    """thresholds.json: members, the chosen thresholds, their certificate, and the fronts."""
    table = inputs.table
    chosen = choose(cfg, inputs)
    objective = chosen["objective"]
    return {
        "format": THRESHOLDS_FORMAT,
        "ensemble": str(cfg.ensemble.name),
        "members": [m.describe() for m in inputs.members],
        "criterion": str(cfg.calibrate.criterion),
        "objective": {
            "kind": objective.kind,
            "lam": objective.lam,
            "max_drop": objective.max_drop,
            "budget_ms": None if np.isinf(objective.budget_ms) else objective.budget_ms,
            "feasible": chosen["feasible"],
        },
        "lam": objective.lam,
        "thresholds": chosen["thresholds"],
        "certificate": chosen["certificate"],
        "search": {**chosen["search"], "grid_step": float(cfg.calibrate.grid_step)},
        "calibration": {
            "num_samples": table.num_samples,
            "labelled": inputs.labelled,
            "source": cfg.calibrate.unlabelled or "calibration split",
            "calib_fingerprint": inputs.calib_fingerprint,
            "flexible": summary(table.evaluate(chosen["thresholds"])),
            "full": summary(table.full()),
            "oracle": summary(table.oracle()),
            "prefix": [summary(table.prefix(k)) for k in range(1, table.num_members + 1)],
            "lambda_curve": chosen["lambda_curve"],
        },
        "latency_profile": inputs.profile,
        "certification": chosen["certification"],
        "certified_front": chosen["certified_front"],
        "pareto_front": chosen["pareto_front"],
    }


def calibrate(cfg: DictConfig) -> dict:
    check_settings(cfg)
    inputs = calibration_inputs(cfg)
    run = run_dir(cfg)
    logger = build_logger(cfg, run, name=f"{cfg.ensemble.name}-calibrate-{cfg.calibrate.objective}")
    status = "failed"
    try:
        log_config(logger, cfg)
        report = build_report(cfg, inputs)
        images = make_plots(run, inputs.table, report)
        path = write_json(run / "thresholds.json", report)
        published = output_path(cfg, run)
        if published is not None:
            path = write_json(published, report)
        print_summary(report, path)
        log_report(logger, report, images)
        status = "success"
    finally:
        close_logger(logger, status)
    return report


def log_report(logger, report: dict, images: dict[str, Path]) -> None:
    if logger is None:
        return
    cal = report["calibration"]
    metrics = {
        f"calib/{mode}/{k}": v
        for mode in ("flexible", "full", "oracle")
        for k, v in cal[mode].items()
    }
    metrics.update(certificate_metrics(report["certificate"]))
    logger.log_metrics(metrics)
    log_table(
        logger,
        "thresholds",
        ["stage", "threshold"],
        [[k + 1, t] for k, t in enumerate(report["thresholds"])],
    )
    log_table(
        logger,
        "certified_front",
        ["certified_epsilon", "avg_members", "expected_latency_ms"],
        [
            [p["certified_epsilon"], p["avg_members"], p["latency_ms"]]
            for p in report["certified_front"]
        ],
    )
    log_table(
        logger,
        "lambda_curve",
        ["lam", "accuracy", "avg_members", "expected_latency_ms"],
        [
            [c["lam"], c["accuracy"], c["avg_members"], c["expected_latency_ms"]]
            for c in cal["lambda_curve"]
        ],
    )
    log_images(logger, images)


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
    score = "accuracy" if cal["labelled"] else "agreement"
    print(f"{'calibration':<12} {score:>9} {'members':>8} {'latency ms':>11}")
    for mode in ("flexible", "full", "oracle"):
        s = cal[mode]
        print(
            f"{mode:<12} {s['accuracy']:>9.4f} {s['avg_members']:>8.3f} {s['expected_latency_ms']:>11.3f}"
        )
    print("latency ms: expected from the latency profile (an estimate, not a promise)")
    print(certificate_line(report["certificate"]))
    print(f"thresholds: {path}")
