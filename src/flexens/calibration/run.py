"""From calibration inputs to the thresholds.json report: search, certify, plot, print.

Everything here takes typed objects (:class:`CalibrateSettings`, :class:`CalibrationInputs`,
a :class:`SweepMemo`); :mod:`flexens.tasks.calibrate` composes them from the config.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from flexens.calibration.certificate import (
    certificate_line,
    certificate_metrics,
    certification_basis,
    certified_thresholds,
    uncertified,
)
from flexens.calibration.loading import CalibrationInputs
from flexens.calibration.objectives import Objective
from flexens.calibration.pareto import ParetoCollector
from flexens.calibration.risk import CertifiedPath, certified_front, certify
from flexens.calibration.schema import THRESHOLDS_FORMAT
from flexens.calibration.search import ThresholdSearch, make_grid
from flexens.calibration.settings import CalibrateSettings
from flexens.calibration.simulate import Outcome, StageTable
from flexens.latency import best_fuse_from, reach_fractions
from flexens.memo import SweepMemo
from flexens.reporting import plots
from flexens.reporting.loggers import log_images, log_table

LAMBDA_LADDER = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
"""λ values traced for the accuracy-vs-latency curve and to widen the Pareto front."""


def summary(outcome: Outcome) -> dict:
    return {
        "accuracy": outcome.accuracy,
        "avg_members": outcome.avg_members,
        "expected_latency_ms": outcome.latency_ms,
    }


def build_objective(settings: CalibrateSettings, full: Outcome, num_samples: int) -> Objective:
    return Objective(
        kind=settings.objective,
        latency_full_ms=full.latency_ms,
        error_full=full.error,
        num_samples=num_samples,
        lam=float(settings.lam),
        max_drop=float(settings.max_drop),
        budget_ms=settings.budget(full.latency_ms),
    )


def search_thresholds(settings: CalibrateSettings, table: StageTable, objective: Objective):
    search = ThresholdSearch(table, make_grid(float(settings.grid_step)), objective)
    start = time.perf_counter()
    if settings.search == "shared":
        result = search.shared()
    else:
        result = search.per_stage(
            int(settings.exhaustive_max_evals), int(settings.restarts), seed=0
        )
    return result, time.perf_counter() - start


def lambda_curve(
    settings: CalibrateSettings, inputs: CalibrationInputs, memo: SweepMemo
) -> tuple[list[dict], ParetoCollector]:
    """Flexible execution across :data:`LAMBDA_LADDER`, and the Pareto points it met.

    It depends on the inputs and the grid only, not on this run's objective, so every job of
    a sweep over the same inputs reuses the first job's curve.
    """
    grid_step, evals = float(settings.grid_step), int(settings.exhaustive_max_evals)
    key = ("lambda_curve", inputs.token, grid_step, evals)
    return memo.derived.get_or_compute(key, lambda: trace_lambdas(inputs.table, grid_step, evals))


def trace_lambdas(
    table: StageTable, grid_step: float, max_evals: int
) -> tuple[list[dict], ParetoCollector]:
    full, grid = table.full(), make_grid(grid_step)
    pareto = ParetoCollector(table.num_members - 1)
    curve = []
    for lam in LAMBDA_LADDER:
        objective = Objective("lambda", full.latency_ms, full.error, table.num_samples, lam=lam)
        result = ThresholdSearch(table, grid, objective, pareto=pareto).per_stage(max_evals, 0)
        curve.append(
            {
                "lam": lam,
                "thresholds": result.thresholds.tolist(),
                **summary(table.evaluate(result.thresholds)),
            }
        )
    return curve, pareto


def certification(
    settings: CalibrateSettings, inputs: CalibrationInputs, memo: SweepMemo
) -> tuple[CertifiedPath, list[dict]]:
    """Fixed-sequence testing of the configured procedure's candidates, and its front.

    Like the λ curve it depends on the inputs and the certification settings only, so the
    jobs of a λ sweep share it.
    """
    keywords = {**settings.certification, "split_seed": inputs.split_seed}
    key = ("certification", inputs.token, float(settings.grid_step), *keywords.values())

    def test() -> tuple[CertifiedPath, list[dict]]:
        path = certify(inputs.table, grid=make_grid(float(settings.grid_step)), **keywords)
        return path, certified_front(path, inputs.table)

    return memo.derived.get_or_compute(key, test)


def one_member_choice(settings: CalibrateSettings, table: StageTable, objective) -> dict:
    """A one-member ensemble: nothing to calibrate, the member always runs."""
    print(
        "warning: the ensemble has one member, so there is nothing to calibrate; "
        "thresholds.json says: run it"
    )
    full = table.full()
    point = {"thresholds": [], "expected_latency_ms": full.latency_ms, "accuracy": full.accuracy}
    certificate = uncertified(table, [], settings.risk, float(settings.delta))
    return {
        "objective": objective,
        "thresholds": [],
        "search": {"method": "none", "evaluations": 0, "seconds": 0.0},
        "feasible": True,
        "certificate": certificate
        | {"certified": True, "fallback": "one member, which always runs"},
        "certification": None,
        "certified_front": [],
        "pareto_front": [point],
        "lambda_curve": [],
    }


def choose(settings: CalibrateSettings, inputs: CalibrationInputs, memo: SweepMemo) -> dict:
    """Thresholds, their certificate, and the fronts that later operating points pick from."""
    table = inputs.table
    objective = build_objective(settings, table.full(), table.num_samples)
    if table.num_members == 1:
        return one_member_choice(settings, table, objective)
    start = time.perf_counter()
    path, cert_front = certification(settings, inputs, memo)
    cert_seconds = time.perf_counter() - start
    curve, curve_points = lambda_curve(settings, inputs, memo)
    if objective.kind == "max_drop":
        thresholds, certificate = certified_thresholds(
            cert_front, float(settings.max_drop), certification_basis(path)
        )
        search = {
            "method": f"certified ({path.procedure})",
            "evaluations": len(path.thresholds),
            "seconds": round(cert_seconds, 4),
        }
        front, feasible = curve_points.to_list(), True
    else:
        result, seconds = search_thresholds(settings, table, objective)
        thresholds = result.thresholds.tolist()
        certificate = uncertified(table, thresholds, settings.risk, float(settings.delta))
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


def build_report(
    settings: CalibrateSettings, inputs: CalibrationInputs, ensemble: str, memo: SweepMemo
) -> dict:
    """thresholds.json: members, the chosen thresholds, their certificate, and the fronts."""
    table = inputs.table
    chosen = choose(settings, inputs, memo)
    objective = chosen["objective"]
    return {
        "format": THRESHOLDS_FORMAT,
        "ensemble": ensemble,
        "members": [m.describe() for m in inputs.members],
        "criterion": settings.criterion,
        "objective": {
            "kind": objective.kind,
            "lam": objective.lam,
            "max_drop": objective.max_drop,
            "budget_ms": None if np.isinf(objective.budget_ms) else objective.budget_ms,
            "feasible": chosen["feasible"],
        },
        "lam": objective.lam,
        "thresholds": chosen["thresholds"],
        "fuse_from": recommended_fuse_from(inputs, chosen["thresholds"]),
        "certificate": chosen["certificate"],
        "search": {**chosen["search"], "grid_step": float(settings.grid_step)},
        "calibration": {
            "num_samples": table.num_samples,
            "labelled": inputs.labelled,
            "source": settings.unlabelled or "calibration split",
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
            [p["certified_epsilon"], p["avg_members"], p["expected_latency_ms"]]
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


def make_plots(run: Path, table: StageTable, report: dict, memo: SweepMemo) -> dict[str, Path]:
    """The report's figures; those that do not mark the chosen point come from ``memo`` when
    an earlier job of the sweep drew the same."""
    cal = report["calibration"]
    point = lambda s: (s["expected_latency_ms"], s["accuracy"])  # noqa: E731
    images = {
        "confidence_histogram": plots.plot_confidence_histogram(
            table.confidence[0],
            table.correct[0],
            run / "confidence_histogram.png",
            criterion=report["criterion"],
            memo=memo.plots,
        ),
        "accuracy_vs_latency": plots.plot_accuracy_vs_latency(
            run / "accuracy_vs_latency.png",
            full=[point(p) for p in cal["prefix"]],
            flexible={
                report["criterion"]: [(*point(c), f"λ={c['lam']:g}") for c in cal["lambda_curve"]]
            },
            oracle=point(cal["oracle"]),
            memo=memo.plots,
        ),
    }
    front = report["pareto_front"]
    images["pareto_front"] = plots.plot_pareto_front(
        run / "pareto_front.png",
        np.array([p["expected_latency_ms"] for p in front]),
        np.array([p["accuracy"] for p in front]),
        chosen=point(cal["flexible"]),
        full=point(cal["full"]),
        oracle=point(cal["oracle"]),
    )
    return images


def recommended_fuse_from(inputs: CalibrationInputs, thresholds) -> int | None:
    """Where fused continuation makes the chosen thresholds' expected batch-1 latency lowest
    on the calibration split (None: one by one is as cheap, or the members cannot fuse).

    The threshold search prices members one by one; fusing changes no answer, only the
    cost of the samples that reach stage ``fuse_from``, so it is decided for the chosen
    thresholds afterwards and ``infer.fuse_from=auto`` follows it.
    """
    exits = inputs.table.exits(thresholds)
    return best_fuse_from(inputs.profile, reach_fractions(exits, inputs.table.num_members))


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
    fuse_from = report["fuse_from"]
    print(
        "fused continuation: one by one is as cheap per the profile (fuse_from null)"
        if fuse_from is None
        else f"fused continuation: expected cheaper from stage {fuse_from} (fuse_from {fuse_from}; "
        "infer.fuse_from=auto uses it)"
    )
    print(certificate_line(report["certificate"]))
    print(f"thresholds: {path}")
