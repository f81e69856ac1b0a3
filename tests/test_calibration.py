"""Calibration: thresholds with a known answer, support rules, non-monotone curves, bounds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from catalog_enrichment.calibration import (
    Calibration,
    calibrate_attribute,
    clopper_pearson_lower,
    wilson_lower,
    wilson_upper,
)


def test_wilson_matches_the_closed_form_and_scipy_style_checks() -> None:
    z = stats.norm.ppf(0.95)
    # all-correct: the Wilson lower bound is n / (n + z^2)
    for n in (10, 52, 400):
        assert wilson_lower(n, n) == pytest.approx(n / (n + z * z))
    assert wilson_lower(51, 51) < 0.95 < wilson_lower(52, 52)  # 52 straight hits prove 95 %
    assert wilson_upper(90, 100) == pytest.approx(1 - wilson_lower(10, 100))
    assert float(wilson_lower(0, 0)) == 0.0 and float(wilson_upper(0, 0)) == 1.0
    # exact bound: (alpha)^(1/n) for all-correct
    assert clopper_pearson_lower(58, 58) == pytest.approx(0.05 ** (1 / 58))
    with pytest.raises(ValueError):
        wilson_lower(5, 3)


def _crossing_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores in [0, 1]; examples above 0.6 are right 99 % of the time, below it 50 %."""
    rng = np.random.default_rng(seed)
    scores = rng.random(20000)
    p_right = np.where(scores >= 0.6, 0.99, 0.5)
    return scores, rng.random(scores.size) < p_right


def test_threshold_lands_where_precision_crosses_the_target() -> None:
    scores, labels = _crossing_data()
    cal = calibrate_attribute("a", "multilabel", ["x"], scores[:, None], labels[:, None])
    v = cal.values[0]
    # Cumulative precision above t: 0.99 above 0.6, then mixed with 50 % below; it stays >= 0.95
    # down to t where (0.4*0.99 + (0.6-t)*0.5) / (1 - t) = 0.95  ->  t ~= 0.5633. The bound costs a bit.
    assert v.threshold is not None and 0.56 < v.threshold < 0.60
    assert v.lower_bound is not None and v.lower_bound >= 0.95
    assert v.precision is not None and v.precision >= v.lower_bound
    # held-out data from the same distribution keeps the promise
    s2, y2 = _crossing_data(seed=1)
    written = s2 >= v.threshold
    assert y2[written].mean() >= 0.95


def test_a_label_with_ten_positives_gets_no_threshold() -> None:
    rng = np.random.default_rng(0)
    labels = np.zeros(500, bool)
    labels[:10] = True
    scores = np.where(labels, 0.99, rng.random(500) * 0.5)  # perfectly separable, but only 10 positives
    cal = calibrate_attribute("a", "multilabel", ["x"], scores[:, None], labels[:, None], min_support=20)
    assert cal.values[0].threshold is None and "support 10" in (cal.values[0].reason or "")
    # even with min_support lowered, 10 straight hits cannot prove 95 % at 95 % confidence
    cal = calibrate_attribute("a", "multilabel", ["x"], scores[:, None], labels[:, None], min_support=5)
    assert cal.values[0].threshold is None and "lower bound" in (cal.values[0].reason or "")


def test_non_monotone_precision_blocks_thresholds_below_the_dip() -> None:
    # 200 top scores all right, then a band of 100 with 60 % right, then 2,000 all right again.
    scores = np.r_[np.linspace(0.99, 0.9, 200), np.linspace(0.899, 0.8, 100), np.linspace(0.799, 0.1, 2000)]
    labels = np.r_[np.ones(200, bool), np.arange(100) % 5 < 3, np.ones(2000, bool)]
    labels[-100:] = False  # lowest scores wrong, so the cumulative curve would re-cross high later
    cal = calibrate_attribute("a", "multilabel", ["x"], scores[:, None], labels[:, None], min_support=20)
    v = cal.values[0]
    # the cumulative precision is >= 0.95 again far below the dip, but the threshold must stay above it
    assert v.threshold is not None and v.threshold >= 0.8
    assert v.precision is not None and v.precision >= 0.95


def test_precision_dip_at_the_top_gives_no_threshold() -> None:
    scores = np.linspace(1.0, 0.0, 1000)
    labels = np.r_[np.arange(100) % 2 == 0, np.ones(900, bool)]  # the top 100 are only 50 % right
    cal = calibrate_attribute("a", "multilabel", ["x"], scores[:, None], labels[:, None])
    assert cal.values[0].threshold is None


def test_multiclass_thresholds_apply_to_top1_only() -> None:
    rng = np.random.default_rng(3)
    n = 3000
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 3.0  # mostly right, with a confidence that tracks correctness
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    cal = calibrate_attribute("t", "multiclass", ["a", "b", "c"], scores, y)
    thresholds = cal.threshold_array()
    assert np.all(np.isfinite(thresholds))
    top = scores.argmax(axis=1)
    for v in range(3):
        sel = (top == v) & (scores[:, v] >= thresholds[v])
        assert (y[sel] == v).mean() >= 0.95
    y_unknown = y.copy()
    y_unknown[:100] = -1  # unlabelled rows are ignored, not counted as wrong
    assert (
        calibrate_attribute("t", "multiclass", ["a", "b", "c"], scores, y_unknown).values[0].threshold
        is not None
    )


def test_calibration_round_trips_through_json_dict() -> None:
    scores, labels = _crossing_data()
    attr = calibrate_attribute("a", "multilabel", ["x"], scores[:, None], labels[:, None])
    cal = Calibration(0.95, 0.95, "wilson", 20, {"a": attr})
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal
    assert np.array_equal(again.thresholds("a"), cal.thresholds("a"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"target": 1.5}, "target"), ({"confidence": 0.3}, "confidence"), ({"min_support": 0}, "min_support")],
)
def test_bad_options_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        calibrate_attribute("a", "multilabel", ["x"], np.zeros((3, 1)), np.zeros((3, 1)), **kwargs)


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="does not match"):
        calibrate_attribute("a", "multilabel", ["x", "y"], np.zeros((3, 1)), np.zeros((3, 1)))
