"""Metrics with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from catalog_enrichment.metrics import (
    attribute_r_at_p,
    binary_r_at_p,
    decision_matrix,
    f1_scores,
    precision_recall_curve_desc,
    written_precision_and_coverage,
)


def test_r_at_p95_is_the_best_recall_at_precision_95() -> None:
    # 100 positives scored 1..0.01 interleaved with 3 negatives at known places
    scores = np.r_[np.linspace(1.0, 0.5, 100), [0.95, 0.6, 0.2]]
    correct = np.r_[np.ones(100, bool), np.zeros(3, bool)]
    recall, threshold = binary_r_at_p(scores, correct)
    # cut at 0.5: 100 right of 102 predicted = 0.98 >= 0.95 -> recall 1.0
    assert recall == pytest.approx(1.0) and threshold == pytest.approx(0.5)
    recall, _ = binary_r_at_p(scores, correct, target=0.995)
    # precision >= 0.995 only above the first negative (0.95): 11 positives >= 0.95? positives >= 0.95
    # are 1.0 .. 0.95 (11 of them) plus the negative at 0.95 ties -> excluded; above 0.95: 10
    assert recall == pytest.approx(0.10)
    assert binary_r_at_p(np.array([0.9]), np.array([False])) == (0.0, None)


def test_ties_are_not_split() -> None:
    thresholds, n_pred, n_corr, _ = precision_recall_curve_desc(
        np.array([0.5, 0.5, 0.4]), np.array([1, 0, 1])
    )
    assert thresholds.tolist() == [0.5, 0.4] and n_pred.tolist() == [2, 3] and n_corr.tolist() == [1, 2]


def test_multiclass_r_at_p_uses_top1() -> None:
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 1])  # the last product is predicted 0 with 0.6 and is wrong
    out = attribute_r_at_p(scores, labels, "multiclass")
    assert out.pooled == pytest.approx(0.75)  # cut at 0.7: 3 right of 3 predicted, 3 of 4 products
    assert out.threshold == pytest.approx(0.7)
    assert out.per_value.tolist() == [1.0, 0.5]


def test_decision_matrix_and_written_precision() -> None:
    scores = np.array([[0.9, 0.8, 0.1], [0.6, 0.7, 0.2], [0.2, 0.1, 0.05]])
    ml = decision_matrix(scores, "multilabel", np.array([0.85, 0.65, np.nan]))
    assert ml.tolist() == [[True, True, False], [False, True, False], [False, False, False]]
    mc = decision_matrix(scores, "multiclass", np.array([0.85, 0.65, np.nan]))
    assert mc.tolist() == [[True, False, False], [False, True, False], [False, False, False]]
    truth = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    out = written_precision_and_coverage(scores, truth, "multilabel", np.array([0.85, 0.65, np.nan]))
    assert out["written"] == 3 and out["correct"] == 2 and out["precision"] == pytest.approx(2 / 3)
    assert out["coverage"] == pytest.approx(2 / 3) and out["recall"] == pytest.approx(2 / 3)
    nothing = written_precision_and_coverage(scores, truth, "multilabel", np.full(3, np.nan))
    assert nothing["written"] == 0 and np.isnan(nothing["precision"])


def test_a_zero_score_is_never_written_even_at_the_grid_s_lowest_threshold() -> None:
    """A single-valued attribute's scores are 0 but for each product's first-ranked value; a value
    nearly every product holds can be calibrated down to the grid's 0.0, which must not write it a
    second time beside another product's own."""
    from catalog_enrichment.calibration import THRESHOLD_GRID, _curve

    scores = np.array([[0.0, 0.96], [0.97, 0.0]])
    assert decision_matrix(scores, "multilabel", np.array([0.0, 0.0])).tolist() == [
        [False, True],
        [True, False],
    ]
    n, k = _curve(np.array([0.0, 0.0, 0.5]), np.array([True, True, False]))
    assert THRESHOLD_GRID[-1] == 0.0 and (n[-1], k[-1]) == (1, 0)  # calibration counts it so too


def test_f1() -> None:
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.6]])
    labels = np.array([[1, 0], [0, 1], [1, 0]])
    f1 = f1_scores(scores, labels, "multilabel")
    # value 0: tp 2, fp 0, fn 0 -> 1.0; value 1: tp 1, fp 1, fn 0 -> 2/3
    assert f1["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)
    mc = f1_scores(scores, np.array([0, 1, -1]), "multiclass")
    assert mc["macro_f1"] == pytest.approx(1.0)


def test_an_attribute_no_product_is_labelled_for_scores_zero_not_an_error() -> None:
    scores = np.full((4, 3), 1 / 3)
    assert f1_scores(scores, np.full(4, -1), "multiclass") == {"macro_f1": 0.0, "micro_f1": 0.0}
    assert f1_scores(scores[:0], np.zeros((0, 3), bool), "multilabel") == {"macro_f1": 0.0, "micro_f1": 0.0}
    assert attribute_r_at_p(scores, np.full(4, -1), "multiclass").pooled == 0.0


def test_bad_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="2-D"):
        attribute_r_at_p(np.zeros(3), np.zeros(3), "multiclass")
    with pytest.raises(ValueError, match="NaN"):
        attribute_r_at_p(np.full((2, 2), np.nan), np.zeros(2), "multiclass")
    with pytest.raises(ValueError, match="shape"):
        attribute_r_at_p(np.zeros((2, 2)), np.zeros((3, 2)), "multilabel")


def test_average_precision_known_answers() -> None:
    from catalog_enrichment.metrics import attribute_average_precision

    # multi-label: pairs ranked 0.9 (hit), 0.8 (miss), 0.7 (hit), 0.1 (miss); 2 true pairs
    scores = np.array([[0.9, 0.8], [0.7, 0.1]])
    labels = np.array([[1, 0], [1, 0]], np.float32)
    assert attribute_average_precision(scores, labels, "multilabel") == pytest.approx((1 + 2 / 3) / 2)
    # multi-class: top-1 candidates; product 0 right (0.9), product 1 wrong (0.6), product 2 right (0.5);
    # the unlabelled product 3 is not a candidate
    scores = np.array([[0.9, 0.1], [0.4, 0.6], [0.5, 0.5], [0.99, 0.01]])
    labels = np.array([0, 0, 0, -1])
    assert attribute_average_precision(scores, labels, "multiclass") == pytest.approx((1 + 2 / 3) / 3)
    # tied scores are one threshold, so the row order does not change the answer: at 0.9 precision 1
    # and recall 1/2, at 0.5 precision 2/3 and recall 1 (ranking ties by row order gave 1 or 5/6)
    tied = np.array([[0.5, 0.1], [0.5, 0.1], [0.9, 0.1]])
    for first in ([1, 0], [0, 0]):
        labels = np.array([first, [1 - first[0], 0], [1, 0]], np.float32)
        assert attribute_average_precision(tied, labels, "multilabel") == pytest.approx((1 + 2 / 3) / 2)
    # a perfect ranking is 1 whatever the share of wrong candidates below it
    assert (
        attribute_average_precision(np.array([[0.9, 0.2]]), np.array([[1, 0]], np.float32), "multilabel")
        == 1.0
    )


def test_a_product_labelled_in_no_group_is_a_wrong_write_and_no_positive() -> None:
    """A derived attribute's label ``n_values`` (the product's value is in no group, e.g. the shade
    'Other'): writing a group for it is wrong, and it is not among the products a group could be
    right for (recall's denominator)."""
    scores = np.array([[0.9], [0.8], [0.7]])
    labels = np.array([0, 1, 0])  # 1 == n_values: labelled, in no group
    assert attribute_r_at_p(scores, labels, "multiclass").pooled == pytest.approx(0.5)
    written = written_precision_and_coverage(scores, labels, "multiclass", np.array([0.75]))
    assert (written["written"], written["correct"], written["recall"]) == (2, 1, 0.5)
    with pytest.raises(ValueError, match="past the number of values"):
        attribute_r_at_p(scores, np.array([0, 2, 0]), "multiclass")


def test_the_paired_bootstrap_draws_whole_groups_of_variants() -> None:
    """Three identical variants of each product carry one product's evidence: drawing their groups
    gives the interval of the products drawn alone (the same draws, to the bit), where drawing
    variants one by one would give a narrower, wrong one. Two models that score alike differ by 0."""
    from catalog_enrichment.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    n = 300
    y = rng.integers(0, 3, n)
    old = rng.random((n, 3)).astype(np.float32)
    new = old.copy()
    new[np.arange(n), y] += rng.random(n).astype(np.float32)  # the new model ranks the truth higher
    alone = paired_bootstrap(new, old, y, "multiclass", resamples=200)
    thrice = np.repeat(np.arange(n), 3)
    grouped = paired_bootstrap(
        new[thrice], old[thrice], y[thrice], "multiclass", resamples=200, groups=thrice
    )
    assert grouped == alone and alone[1] < alone[0] < alone[2]
    loose = paired_bootstrap(new[thrice], old[thrice], y[thrice], "multiclass", resamples=200)
    assert loose[0] == alone[0] and loose[2] - loose[1] < 0.8 * (alone[2] - alone[1])
    assert paired_bootstrap(old, old, y, "multiclass", resamples=50) == (0.0, 0.0, 0.0)


def test_the_paired_coverage_change_is_bounded_exactly() -> None:
    """Every product covered by the champion and not by the challenger: one to four such products
    are no evidence (the exact sign test is not significant below five), five are; on many
    products the bound is the normal approximation's."""
    from catalog_enrichment.metrics import paired_change

    for n in range(1, 5):
        mean, upper = paired_change(np.zeros(n, bool), np.ones(n, bool))
        assert mean == -1.0 and upper == pytest.approx(2 * (1 - 0.05 ** (1 / n)) - 1) and upper > 0
    assert paired_change(np.zeros(5, bool), np.ones(5, bool))[1] == pytest.approx(2 * (1 - 0.05**0.2) - 1)
    assert paired_change(np.zeros(5, bool), np.ones(5, bool))[1] < 0
    assert paired_change(np.ones(3, bool), np.ones(3, bool)) == (0.0, 0.0)  # treated alike: no change
    rng = np.random.default_rng(0)
    old = rng.random(2000) < 0.5
    new = np.where(rng.random(2000) < 0.1, ~old, old)
    diff = new.astype(float) - old
    normal = diff.mean() + 1.6449 * diff.std(ddof=1) / np.sqrt(diff.size)
    assert paired_change(new, old) == pytest.approx((diff.mean(), normal), abs=1e-3)
