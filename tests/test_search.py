import numpy as np
import pytest
import torch

from flexens.calibration.objectives import Objective
from flexens.calibration.pareto import ParetoCollector, non_dominated, select_point
from flexens.calibration.search import ThresholdSearch, make_grid
from flexens.calibration.simulate import StageTable
from flexens.halting import get_criterion


def known_case() -> StageTable:
    """A halts after member 1, B after member 2, C needs all three (all correct then)."""
    confidence = np.array([[0.9, 0.4, 0.2], [0.95, 0.6, 0.25], [0.99, 0.9, 0.7]], dtype=np.float32)
    correct = np.array([[True, False, False], [True, True, False], [True, True, True]])
    return StageTable(confidence, correct, np.where(correct, 0, 1), np.ones(3))


def random_table(seed: int, members: int = 3, samples: int = 300, classes: int = 5) -> StageTable:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (samples,), generator=g)
    logits = torch.randn(members, samples, classes, generator=g) * 1.5
    logits += 2.0 * torch.nn.functional.one_hot(labels, classes)
    costs = np.linspace(1.0, 2.0, members)
    return StageTable.from_probs(logits.softmax(-1), labels, get_criterion("margin"), costs)


def objective_for(table: StageTable, kind: str = "lambda", **kw) -> Objective:
    full = table.full()
    return Objective(kind, full.latency_ms, full.error, table.num_samples, **kw)


@pytest.mark.parametrize("method", ["shared", "exhaustive", "descent", "per_stage"])
def test_every_search_mode_finds_the_known_optimum(method):
    table = known_case()
    search = ThresholdSearch(table, make_grid(0.01), objective_for(table, lam=100.0))
    if method == "descent":
        result = search.coordinate_descent([np.ones(2), np.zeros(2)])
    elif method == "per_stage":
        result = search.per_stage(max_exhaustive_evals=1, restarts=2)  # forces descent
    else:
        result = getattr(search, method)()
    t1, t2 = result.thresholds
    assert 0.4 <= t1 < 0.9 and 0.25 <= t2 < 0.6
    outcome = table.evaluate(result.thresholds)
    assert outcome.error == 0.0 and outcome.avg_members == pytest.approx(2.0)


def test_per_stage_reports_method_and_evaluations():
    table = random_table(0)
    small = ThresholdSearch(table, make_grid(0.01), objective_for(table)).per_stage(20000, 2)
    assert small.method == "exhaustive" and small.evaluations == 101**2
    big = ThresholdSearch(
        random_table(0, members=5), make_grid(0.01), objective_for(random_table(0, members=5))
    ).per_stage(20000, 2)
    assert big.method == "coordinate_descent" and big.evaluations > 101


@pytest.mark.parametrize("seed", range(10))
def test_coordinate_descent_matches_exhaustive_on_small_cases(seed):
    table = random_table(seed)
    for lam in (0.3, 3.0, 30.0):
        exhaustive = ThresholdSearch(
            table, make_grid(0.02), objective_for(table, lam=lam)
        ).exhaustive()
        descent = ThresholdSearch(table, make_grid(0.02), objective_for(table, lam=lam)).per_stage(
            max_exhaustive_evals=1, restarts=4, seed=seed
        )
        assert descent.score == pytest.approx(exhaustive.score, abs=1e-12)


def test_stage_sweep_is_exact_against_the_shared_halting_function():
    table = random_table(3, members=4)
    grid = make_grid(0.05)
    search = ThresholdSearch(table, grid, objective_for(table))
    base = np.array([0.3, 0.5, 0.2])
    for stage in range(3):
        latency, error = search.sweep_stage(base, stage)
        for g, value in enumerate(grid):
            t = base.copy()
            t[stage] = value
            outcome = table.evaluate(t)  # torch path: halting.exit_stages
            assert latency[g] == pytest.approx(outcome.latency_ms)
            assert error[g] == pytest.approx(outcome.error)


def test_constraint_objectives():
    table = random_table(1, members=4, samples=1000)
    full = table.full()
    grid = make_grid(0.01)
    drop = ThresholdSearch(table, grid, objective_for(table, "max_drop", max_drop=0.0)).per_stage(
        1, 2
    )
    assert table.evaluate(drop.thresholds).error <= full.error + 1e-12
    assert table.evaluate(drop.thresholds).latency_ms < full.latency_ms
    budget_ms = 0.6 * full.latency_ms
    budget = ThresholdSearch(
        table, grid, objective_for(table, "budget", budget_ms=budget_ms)
    ).per_stage(1, 2)
    assert table.evaluate(budget.thresholds).latency_ms <= budget_ms
    # an impossible budget: the closest point (cheapest) is returned, flagged infeasible
    objective = objective_for(table, "budget", budget_ms=0.1)
    impossible = ThresholdSearch(table, grid, objective).per_stage(1, 2)
    outcome = table.evaluate(impossible.thresholds)
    assert objective.violation(np.array([outcome.latency_ms]), np.array([outcome.error]))[0] > 0
    assert outcome.avg_members == pytest.approx(1.0)


def test_bad_objective_and_grid_settings():
    with pytest.raises(ValueError, match="lam must be"):
        Objective("lambda", 1.0, 0.1, 10, lam=-1)
    with pytest.raises(ValueError, match="grid_step must be in"):
        make_grid(0.0)
    with pytest.raises(ValueError, match="grid_step must be in"):
        make_grid(1.5)
    with pytest.raises(ValueError, match="unknown objective"):
        Objective("speed", 1.0, 0.1, 10)
    assert make_grid(1.0).tolist() == [0.0, 1.0]
    assert make_grid(0.3).tolist() == [0.0, 0.3, 0.6, 0.9, 1.0]


def test_pareto_front_and_operating_point_selection():
    latency = np.array([1.0, 2.0, 2.0, 3.0, 1.5])
    error = np.array([0.3, 0.1, 0.2, 0.1, 0.35])
    assert non_dominated(latency, error).tolist() == [0, 1]
    collector = ParetoCollector(1)
    collector.add_points(np.array([[0.1], [0.5], [0.5], [0.9], [0.2]]), latency, error)
    front = collector.to_list()
    assert [p["expected_latency_ms"] for p in front] == [1.0, 2.0]
    cheap, ok = select_point(front, Objective("budget", 2.0, 0.1, 100, budget_ms=1.2))
    assert ok and cheap.latency_ms == 1.0
    best, ok = select_point(front, Objective("max_drop", 2.0, 0.1, 100, max_drop=0.0))
    assert ok and best.latency_ms == 2.0
    _, ok = select_point(front, Objective("max_drop", 2.0, 0.05, 100, max_drop=0.0))
    assert not ok


def test_oracle_is_the_earliest_stage_agreeing_with_the_full_ensemble():
    table = StageTable(
        np.zeros((3, 3), np.float32),
        np.ones((3, 3), bool),
        np.array([[1, 2, 0], [1, 1, 0], [1, 1, 2]]),
        np.array([1.0, 2.0, 3.0]),
    )
    oracle = table.oracle()
    assert oracle.avg_members == pytest.approx((1 + 2 + 3) / 3)
    assert oracle.latency_ms == pytest.approx((1 + 3 + 6) / 3)
