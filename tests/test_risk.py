"""Certified risk control: p-values, fixed-sequence testing, and the guarantee itself."""

import numpy as np
import pytest
from scipy import stats

from flexens.calibration.certificate import certificate_line, certified_thresholds
from flexens.calibration.objectives import Objective
from flexens.calibration.risk import (
    binomial_p_value,
    binomial_upper_bound,
    certified_front,
    certify,
    fixed_sequence_rejections,
    loss_table,
    pick_certified,
    samples_needed,
    smallest_certifiable_epsilon,
    subset,
)
from flexens.calibration.search import ThresholdSearch, make_grid
from flexens.calibration.simulate import StageTable

DELTA = 0.1


def test_p_value_is_the_binomial_tail():
    for losses, n, eps in [(0, 10, 0.1), (3, 100, 0.05), (40, 5000, 0.005), (7, 7, 0.5)]:
        assert binomial_p_value(losses, n, eps) == pytest.approx(stats.binom.cdf(losses, n, eps))


def test_upper_bound_is_where_the_p_value_crosses_delta():
    losses = np.array([0, 1, 5, 30])
    bound = binomial_upper_bound(losses, 1000, DELTA)
    assert np.allclose(binomial_p_value(losses, 1000, bound), DELTA)
    assert (binomial_p_value(losses, 1000, bound * 1.01) < DELTA).all()
    assert (binomial_p_value(losses, 1000, bound * 0.99) > DELTA).all()
    assert binomial_upper_bound(10, 10, DELTA) == 1.0


def test_fixed_sequence_stops_at_the_first_non_rejection():
    assert fixed_sequence_rejections(np.array([0.01, 0.05, 0.2, 0.01]), DELTA) == 2
    assert fixed_sequence_rejections(np.array([0.5, 0.01]), DELTA) == 0
    assert fixed_sequence_rejections(np.array([0.01, 0.02]), DELTA) == 2


def test_sample_size_messages_agree_with_the_bound():
    n = samples_needed(0.003, DELTA)
    assert binomial_p_value(0, n, 0.003) <= DELTA < binomial_p_value(0, n - 1, 0.003)
    assert smallest_certifiable_epsilon(n, DELTA) <= 0.003
    assert binomial_upper_bound(0, 135, DELTA) == pytest.approx(
        smallest_certifiable_epsilon(135, DELTA)
    )


def population(size: int = 4000, members: int = 3, seed: int = 0) -> StageTable:
    """A known distribution: the uniform one over these columns, so every risk is exact.

    Confident stages are right more often; later members add little, so halting early
    costs a little accuracy — risk near the ε tested below, where overfitting bites.
    """
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(size=(members, size)).astype(np.float32)
    full_right = rng.uniform(size=size) < 0.9
    p_right = np.clip(0.55 + 0.45 * confidence[:-1], 0, 1)
    right = np.vstack([rng.uniform(size=(members - 1, size)) < p_right, full_right])
    right[:-1] |= ~full_right & (rng.uniform(size=(members - 1, size)) < 0.3)
    predictions = np.where(right, 0, 1 + np.arange(members)[:, None]).astype(np.int64)
    return StageTable(confidence, right, predictions, np.ones(members))


def true_risk(table: StageTable, thresholds, risk="drop") -> float:
    return loss_table(table, risk).evaluate(thresholds).error


def violation_rate(
    procedure: str, repeats: int, n: int, epsilon: float, risk: str = "drop"
) -> tuple[float, float]:
    pop = population()
    grid = make_grid(0.02)
    rng = np.random.default_rng(1)
    violations, members = 0, []
    for r in range(repeats):
        draw = subset(pop, rng.integers(0, pop.num_samples, size=n))
        if procedure == "empirical":
            full = draw.full()
            objective = Objective("max_drop", full.latency_ms, full.error, n, max_drop=epsilon)
            t = ThresholdSearch(draw, grid, objective).per_stage(20000, 0).thresholds
        else:
            path = certify(draw, risk, procedure, DELTA, grid, split_seed=r)
            t = pick_certified(certified_front(path, draw), epsilon)["thresholds"]
        violations += pop.full().accuracy - pop.evaluate(t).accuracy > epsilon
        members.append(pop.evaluate(t).avg_members)
    return violations / repeats, float(np.mean(members))


def tolerance(repeats: int) -> float:
    """δ plus three binomial standard errors of a violation rate measured ``repeats`` times."""
    return DELTA + 3 * np.sqrt(DELTA * (1 - DELTA) / repeats)


def test_shared_threshold_keeps_its_promise_where_the_empirical_choice_does_not():
    rate, members = violation_rate("shared", 500, 1000, 0.05)
    assert rate <= tolerance(500)
    assert members < 2.9  # it does halt: the test is not passed by running everything
    empirical, _ = violation_rate("empirical", 100, 1000, 0.05)
    assert empirical > 0.3


def test_net_drop_keeps_its_promise_with_fewer_members():
    """Subtracting a lower bound of the gains certifies the accuracy drop itself."""
    rate, members = violation_rate("shared", 500, 1000, 0.05, risk="net_drop")
    assert rate <= tolerance(500)
    _, members_drop = violation_rate("shared", 100, 1000, 0.05)
    assert members < members_drop


@pytest.mark.slow
@pytest.mark.parametrize("risk", ["drop", "net_drop"])
def test_pareto_testing_keeps_its_promise(risk):
    rate, members = violation_rate("pareto", 500, 1000, 0.05, risk=risk)
    assert rate <= tolerance(500)
    assert members < 2.9


def test_too_few_samples_fall_back_to_the_full_ensemble():
    draw = subset(population(), np.arange(50))
    path = certify(draw, "drop", "shared", DELTA, make_grid(0.05))
    front = certified_front(path, draw)
    basis = {
        "risk": "drop",
        "procedure": "shared",
        "delta": DELTA,
        "num_samples": 50,
        "calibration_samples": 50,
    }
    thresholds, certificate = certified_thresholds(front, 0.01, basis)
    assert thresholds == [1.0, 1.0]
    line = certificate_line(certificate)
    assert "full ensemble" in line and "4.50 pp" in line and "needs at least 230" in line


def test_disagreement_needs_no_labels_and_bounds_the_drop():
    pop = population()
    for t in ([0.3, 0.3], [0.7, 0.1], [0.0, 0.0]):
        assert true_risk(pop, t, "disagreement") >= true_risk(pop, t, "drop")
        drop = pop.full().accuracy - pop.evaluate(t).accuracy
        assert true_risk(pop, t, "drop") >= drop
