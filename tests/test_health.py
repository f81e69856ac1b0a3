"""Run health checks with known answers: PSI and its limit, the estimated precision, coverage, and a
false-alarm rate on clean batches that stays at the 1 % the limits are set for."""

from __future__ import annotations

import math

import numpy as np
import pytest

from catalog_enrichment.health import (
    CONFIDENCE_BINS,
    HealthBaseline,
    HealthTally,
    assess,
    baseline,
    format_health,
    psi,
    psi_limit,
)

pytestmark = [pytest.mark.timeout(120)]


def test_psi_of_fixed_arrays() -> None:
    assert psi([0.5, 0.5], [50, 50]) == 0.0
    expected = 0.25 * math.log(1.5) + 0.25 * math.log(2)  # (0.75-0.5)ln(0.75/0.5) + (0.25-0.5)ln(0.25/0.5)
    assert psi([0.5, 0.5], [75, 25]) == pytest.approx(expected, abs=1e-12)
    # an empty bin is floored, not infinite
    assert math.isfinite(psi([0.5, 0.5], [100, 0]))


def test_psi_limit_is_the_chi_square_quantile_over_both_sample_sizes() -> None:
    assert psi_limit(1000, 1000) == pytest.approx(21.665994 * (2 / 1000), rel=1e-6)
    assert psi_limit(100, 10**9) == pytest.approx(0.21666, rel=1e-4)


def _baseline(rng: np.random.Generator, m: int) -> HealthBaseline:
    scores, labels = _draw(rng, m)
    base = baseline(scores, labels, "multiclass", np.full(3, 0.8))
    assert base is not None
    return base


def _draw(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Three-value softmax scores whose top value is right more often as it is surer."""
    logits = rng.normal(0, 1.5, (n, 3)) + np.array([shift, 0, 0])
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    right = rng.random(n) < scores.max(axis=1)
    labels = np.where(right, scores.argmax(axis=1), (scores.argmax(axis=1) + 1) % 3)
    return scores, labels


def _tally(base: HealthBaseline, scores: np.ndarray, threshold: float = 0.8) -> HealthTally:
    tally = HealthTally.empty(base)
    top = scores.max(axis=1)
    written = top >= threshold
    tally.add(base, top, int(written.sum()), top[written])
    return tally


@pytest.mark.parametrize("n", [100, 1000, 5000])
def test_clean_batches_raise_a_false_alarm_about_one_time_in_a_hundred(n: int) -> None:
    """400 clean batches per size against one baseline of 4,000 calibration products: the score
    drift and coverage checks each fail on about 1 % of them. Failing on 12 or more of 400 (3 %)
    has probability < 0.001 for a check that is right at 1 % (binomial(400, 0.01)), so the test
    fails only when a limit is wrong."""
    rng = np.random.default_rng(n)
    base = _baseline(rng, 4000)
    drift = coverage = 0
    for _ in range(400):
        health = assess("color", base, _tally(base, _draw(rng, n)[0]), target=0.0)
        drift += any("score drift" in f for f in health.failures)
        coverage += any("coverage" in f for f in health.failures)
    assert drift < 12 and coverage < 12


def test_a_shifted_batch_fails_the_drift_and_coverage_checks() -> None:
    rng = np.random.default_rng(0)
    base = _baseline(rng, 4000)
    health = assess("color", base, _tally(base, _draw(rng, 1000, shift=2.0)[0]), target=0.0)
    assert health.psi is not None and health.psi_limit is not None and health.psi > health.psi_limit
    assert [f.split(":")[1].split()[0] for f in health.failures] == ["score", "coverage"]


def test_the_estimated_precision_is_the_calibration_curve_at_the_written_confidences() -> None:
    precision: list[float | None] = [None] * CONFIDENCE_BINS
    precision[18], precision[19] = 0.93, 0.99  # confidences in [0.90, 0.95) and [0.95, 1]
    base = HealthBaseline([0.5], [0.5, 0.5], 0.5, precision, 0.97, 1000)
    tally = HealthTally.empty(base)
    top = np.repeat([0.3, 0.9], 50)  # the baseline's two halves: no drift
    tally.add(base, top, 50, np.array([0.92] * 25 + [0.97] * 25))
    health = assess("color", base, tally, target=0.95)
    assert health.estimated_precision == pytest.approx((25 * 0.93 + 25 * 0.99) / 50)
    assert health.failures == []
    # a batch written at lower confidences: 0.93 < 0.95 fails, naming the attribute and the target
    low = HealthTally.empty(base)
    low.add(base, top, 50, np.full(50, 0.91))
    assert assess("color", base, low, target=0.95).failures == ["color: estimated precision 0.930 < 0.95"]
    # a confidence bin the calibration never wrote in takes the calibration's overall precision
    other = HealthTally.empty(base)
    other.add(base, top, 50, np.full(50, 0.5))
    assert assess("color", base, other, target=0.95).estimated_precision == pytest.approx(0.97)


def test_too_few_products_are_not_judged_and_the_table_says_so() -> None:
    base = HealthBaseline([0.5], [0.5, 0.5], 0.5, [None] * CONFIDENCE_BINS, None, 1000)
    tally = HealthTally.empty(base)
    tally.add(base, np.full(10, 0.9), 10, np.full(10, 0.9))
    health = assess("color", base, tally, target=0.95)
    assert health.failures == [] and health.skipped == "10 products scored (fewer than 50)"
    text = format_health("r1", [health.to_dict()])
    assert "skipped: 10 products scored" in text and "every check passed" in text
    assert "no health checks" in format_health("r1", None)


def test_tallies_merge_and_a_baseline_round_trips() -> None:
    rng = np.random.default_rng(1)
    base = _baseline(rng, 500)
    assert HealthBaseline.from_dict(base.to_dict()) == base
    scores = _draw(rng, 300)[0]
    whole = _tally(base, scores)
    parts = _tally(base, scores[:100]).merge(_tally(base, scores[100:]))
    assert parts == whole and sum(whole.deciles) == 300
