"""Classification metrics for attribute prediction — pure NumPy in, NumPy/float out.

Shapes and conventions used throughout:

* ``scores``: ``(n_products, n_values)`` float probabilities for one attribute (sigmoid outputs for
  a multi-label attribute, softmax outputs for a multi-class one).
* multi-label ``labels``: ``(n_products, n_values)`` 0/1 matrix; multi-class ``labels``: ``(n,)``
  int class indices. Products without a label are removed by the caller (or marked ``-1`` for
  multi-class, which these functions drop).
* Scores must be out-of-sample for any number here to mean something.

R@P95 follows paper 004: the best recall over all thresholds whose precision is >= 0.95.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from catalog_enrichment.contracts import AttributeKind, Taxonomy

__all__ = [
    "RAtP",
    "attribute_r_at_p",
    "binary_r_at_p",
    "coverage_efficiency",
    "decision_matrix",
    "f1_scores",
    "paired_bootstrap",
    "paired_change",
    "precision_recall_curve_desc",
    "truth_matrix",
    "within_groups",
    "written_precision_and_coverage",
]


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (n_products, n_values), got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or infinity")
    return scores


def _check_labels(labels: np.ndarray, scores: np.ndarray, kind: AttributeKind) -> np.ndarray:
    labels = np.asarray(labels)
    if kind == "multilabel":
        if labels.shape != scores.shape:
            raise ValueError(f"multilabel labels shape {labels.shape} != scores shape {scores.shape}")
        return labels.astype(bool)
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"multiclass labels must have shape ({scores.shape[0]},), got {labels.shape}")
    if labels.size and labels.max() > scores.shape[1]:  # n_values: labelled, none of the values
        raise ValueError("multiclass labels index past the number of values")
    return labels.astype(np.int64)


def precision_recall_curve_desc(
    scores: np.ndarray, correct: np.ndarray, *, n_positive: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative precision/recall at every distinct score cut, highest score first.

    Args:
        scores: ``(m,)`` scores of the candidate predictions.
        correct: ``(m,)`` bool, whether each candidate prediction is right.
        n_positive: recall denominator (default: ``correct.sum()``).

    Returns:
        ``(thresholds, n_predicted, n_correct, recall)``, each ``(k,)``: predicting every candidate
        with ``score >= thresholds[i]`` predicts ``n_predicted[i]`` items, ``n_correct[i]`` right.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=bool).ravel()
    if scores.shape != correct.shape:
        raise ValueError("scores and correct must have the same length")
    total = int(correct.sum()) if n_positive is None else int(n_positive)
    if scores.size == 0:
        empty = np.zeros(0)
        return empty, empty.astype(np.int64), empty.astype(np.int64), empty
    order = np.argsort(-scores, kind="mergesort")
    s, c = scores[order], correct[order]
    cum_correct = np.cumsum(c)
    # keep the last index of each run of equal scores: a threshold cannot split ties
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.size - 1]
    n_pred = last + 1
    n_corr = cum_correct[last]
    recall = n_corr / total if total > 0 else np.zeros(last.size)
    return s[last], n_pred.astype(np.int64), n_corr.astype(np.int64), recall


def binary_r_at_p(
    scores: np.ndarray, correct: np.ndarray, *, target: float = 0.95, n_positive: int | None = None
) -> tuple[float, float | None]:
    """Best recall at any threshold whose precision >= ``target``; returns ``(recall, threshold)``.

    ``(0.0, None)`` when no threshold reaches the target.
    """
    thresholds, n_pred, n_corr, recall = precision_recall_curve_desc(scores, correct, n_positive=n_positive)
    if thresholds.size == 0:
        return 0.0, None
    ok = n_corr / n_pred >= target
    if not ok.any():
        return 0.0, None
    best = int(np.argmax(np.where(ok, recall, -1.0)))
    return float(recall[best]), float(thresholds[best])


def decision_matrix(scores: np.ndarray, kind: AttributeKind, thresholds: np.ndarray) -> np.ndarray:
    """Which values would be written: ``(n, n_values)`` bool.

    Multi-label: every value whose score >= its threshold. Multi-class: the top-1 value if its
    score >= that value's threshold. ``NaN`` thresholds mean "never written"; a score of 0 is never
    written, whatever the threshold (the grid's lowest is 0): a single-valued attribute's scores
    are 0 but for each product's first-ranked value.
    """
    scores = _check_scores(scores)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (scores.shape[1],):
        raise ValueError(f"thresholds must have shape ({scores.shape[1]},), got {thresholds.shape}")
    with np.errstate(invalid="ignore"):
        clears = (scores >= thresholds[None, :]) & (scores > 0)  # NaN compares False
    if kind == "multilabel":
        return clears
    top = scores.argmax(axis=1)
    out = np.zeros_like(clears)
    rows = np.arange(scores.shape[0])
    out[rows, top] = clears[rows, top]
    return out


def within_groups(
    written: dict[str, np.ndarray], taxonomy: Taxonomy, refused: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """``written`` (attribute -> ``(n, V)`` decisions, derived attributes too) with every value
    outside the group decided for the same product taken out, and every value inside a group
    ``refused`` for it (derived attribute -> ``(n, groups)`` bool): a shade is never written beside
    a colour family it is not in. Changes ``written`` in place and returns it."""
    for d in taxonomy.derived.values():
        if d.name not in written or d.parent not in written:
            continue
        family = written[d.name]
        n = family.shape[0]
        group = np.asarray(d.group, np.int64)  # -1: in no group, which the padding column reads
        inside = np.concatenate([family, np.zeros((n, 1), bool)], axis=1)[:, group]
        keep = inside | ~family.any(axis=1, keepdims=True)
        if refused is not None and d.name in refused:
            keep &= ~np.concatenate([np.asarray(refused[d.name], bool), np.zeros((n, 1), bool)], axis=1)[
                :, group
            ]
        written[d.parent] = written[d.parent] & keep
    return written


def truth_matrix(labels: np.ndarray, n_values: int, kind: AttributeKind) -> tuple[np.ndarray, np.ndarray]:
    """Multi-hot truth ``(n, V)`` and the mask of labelled products ``(n,)``."""
    if kind == "multilabel":
        truth = labels.astype(bool)
        return truth, np.ones(truth.shape[0], bool)
    known = labels >= 0
    truth = np.zeros((labels.shape[0], n_values), bool)
    hit = known & (labels < n_values)  # n_values: labelled, none of the values (a derived attribute's)
    truth[np.flatnonzero(hit), labels[hit]] = True
    return truth, known


def written_precision_and_coverage(
    scores: np.ndarray,
    labels: np.ndarray,
    kind: AttributeKind,
    thresholds: np.ndarray,
    written: np.ndarray | None = None,
) -> dict[str, float | int]:
    """Realized precision and coverage of what the thresholds would write (``written``: the
    ``(n, V)`` decisions themselves, where more than the thresholds decides them).

    Returns ``written`` (values written), ``correct``, ``precision`` (NaN when nothing is written),
    ``coverage`` (share of labelled products that get at least one value) and ``recall`` (share of
    true (product, value) pairs written).
    """
    scores = _check_scores(scores)
    labels = _check_labels(labels, scores, kind)
    truth, known = truth_matrix(labels, scores.shape[1], kind)
    if written is None:
        written = decision_matrix(scores, kind, thresholds)
    written = np.asarray(written, bool)[known]
    truth = truth[known]
    n_written = int(written.sum())
    n_correct = int((written & truth).sum())
    return {
        "written": n_written,
        "correct": n_correct,
        "precision": n_correct / n_written if n_written else float("nan"),
        "coverage": float(written.any(axis=1).mean()) if written.shape[0] else 0.0,
        "recall": n_correct / int(truth.sum()) if truth.sum() else 0.0,
    }


@dataclass(frozen=True)
class RAtP:
    """R@P of one attribute: ``pooled`` (one global threshold), ``per_value`` ``(V,)`` (NaN = no support)
    and ``threshold``, the pooled one's (None where no threshold reaches the target)."""

    pooled: float
    per_value: np.ndarray
    threshold: float | None


def attribute_r_at_p(
    scores: np.ndarray, labels: np.ndarray, kind: AttributeKind, *, target: float = 0.95
) -> RAtP:
    """R@P95 for one attribute: pooled (one global threshold) and per value.

    Multi-label: every (product, value) pair is a candidate; pooled recall is over all true pairs.
    Multi-class: each product's top-1 prediction is a candidate; pooled recall is over the products
    labelled with a value (a derived attribute's product in no group is a candidate, never a right
    one); per value, the candidates are the products whose top-1 is that value.
    """
    scores = _check_scores(scores)
    labels = _check_labels(labels, scores, kind)
    truth, known = truth_matrix(labels, scores.shape[1], kind)
    s, t = scores[known], truth[known]
    per_value: list[float] = []
    if kind == "multilabel":
        pooled, threshold = binary_r_at_p(s.ravel(), t.ravel(), target=target)
        for v in range(s.shape[1]):
            per_value.append(binary_r_at_p(s[:, v], t[:, v], target=target)[0] if t[:, v].any() else np.nan)
    else:
        top = s.argmax(axis=1)
        top_score = s[np.arange(s.shape[0]), top]
        right = t[np.arange(s.shape[0]), top]
        pooled, threshold = binary_r_at_p(
            top_score, right, target=target, n_positive=int(t.any(axis=1).sum())
        )
        for v in range(s.shape[1]):
            sel = top == v
            support = int(t[:, v].sum())
            per_value.append(
                binary_r_at_p(top_score[sel], right[sel], target=target, n_positive=support)[0]
                if support
                else np.nan
            )
    return RAtP(float(pooled), np.asarray(per_value, dtype=np.float64), threshold)


def attribute_average_precision(scores: np.ndarray, labels: np.ndarray, kind: AttributeKind) -> float:
    """Average precision over the candidates R@P95 ranks (multi-label: every (product, value) pair;
    multi-class: each labelled product's top-1): the mean, over the true candidates, of the
    precision at their rank. Unlike R@P95 it keeps ranking models when the labels are noisy (with
    more than 5 % of them wrong, no threshold reaches 95 % precision and R@P95 is ~0)."""
    scores = _check_scores(scores)
    labels = _check_labels(labels, scores, kind)
    truth, known = truth_matrix(labels, scores.shape[1], kind)
    s, t = scores[known], truth[known]
    if kind == "multilabel":
        score, right, n_positive = s.ravel(), t.ravel(), int(t.sum())
    else:
        top = s.argmax(axis=1)
        score, right = s[np.arange(s.shape[0]), top], t[np.arange(s.shape[0]), top]
        n_positive = int(t.any(axis=1).sum())
    if n_positive == 0:
        return float("nan")
    found = int(right.sum())
    if found == 0:
        return 0.0
    from sklearn.metrics import average_precision_score

    # scikit-learn's AP (tied scores form one threshold, so row order does not matter) is over the
    # true candidates; a multi-class product whose top-1 is wrong is a true value never ranked
    return float(average_precision_score(right, score)) * found / n_positive


def coverage_efficiency(recall_written: float, r_at_p: float) -> float:
    """Share of the achievable recall that the thresholds deliver: recall written / R@P95.

    Both on the same split; ``NaN`` when no threshold reaches the target precision (R@P95 = 0). It
    can exceed 1: per-value thresholds can beat the best single pooled threshold.
    """
    return float(recall_written) / float(r_at_p) if r_at_p > 0 else float("nan")


def paired_change(new: np.ndarray, old: np.ndarray, *, confidence: float = 0.95) -> tuple[float, float]:
    """Mean change ``new - old`` of two paired 0/1 outcomes and its one-sided upper confidence bound.

    ``new``/``old``: ``(n,)`` bool, the same items in the same order (e.g. which products each model
    gives a value). Exact and paired (McNemar's): of the ``d`` items the two treat differently,
    ``new`` has ``b``; given ``d``, ``b`` is binomial, and the Clopper-Pearson upper bound ``u`` on
    its rate bounds the mean change by ``d (2u - 1) / n`` (items both treat alike add no noise, and
    a few items prove nothing: one product lost of one is not significant). ``(0, 0)`` when empty.
    """
    from scipy.special import betaincinv  # the beta distribution's quantile

    new = np.asarray(new, dtype=bool)
    old = np.asarray(old, dtype=bool)
    if new.shape != old.shape or new.ndim != 1:
        raise ValueError(f"paired outcomes must be 1-D of one length, got {new.shape} and {old.shape}")
    if new.size == 0:
        return 0.0, 0.0
    gained, lost = int((new & ~old).sum()), int((old & ~new).sum())
    d, n = gained + lost, new.size
    mean = (gained - lost) / n
    if d == 0:
        return mean, 0.0
    upper = 1.0 if gained == d else float(betaincinv(gained + 1, d - gained, confidence))
    return mean, d * (2 * upper - 1) / n


def paired_bootstrap(
    new: np.ndarray,
    old: np.ndarray,
    labels: np.ndarray,
    kind: AttributeKind,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """``(difference, low, high)``: pooled R@P95 of scores ``new`` minus that of ``old`` on the same
    products, and its percentile bootstrap interval - each resample draws products with replacement
    and scores both models on that same draw, so what the two share cancels out. With ``groups``
    (each product's group: a product's variants, whose outcomes move together) a resample draws
    whole groups, as the products were sampled; else products."""
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    if groups is None:
        groups = np.arange(n)
    order = np.argsort(groups, kind="stable")
    _, starts = np.unique(np.asarray(groups)[order], return_index=True)
    members = np.split(order, starts[1:])

    def r(scores: np.ndarray, rows: np.ndarray) -> float:
        return attribute_r_at_p(scores[rows], labels[rows], kind).pooled

    every = np.arange(n)
    point = r(new, every) - r(old, every)
    draws = np.empty(resamples)
    for i in range(resamples):
        drawn = rng.integers(0, len(members), size=len(members))
        rows = np.concatenate([members[g] for g in drawn]) if n else every
        draws[i] = r(new, rows) - r(old, rows)
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(point), float(low), float(high)


def f1_scores(scores: np.ndarray, labels: np.ndarray, kind: AttributeKind) -> dict[str, float]:
    """Macro and micro F1 at the natural decision rule (sigmoid >= 0.5 / argmax); 0 where no
    product is labelled (as R@P95 is)."""
    from sklearn.metrics import f1_score  # here, not at the top: the enrichment job never loads it

    scores = _check_scores(scores)
    labels = _check_labels(labels, scores, kind)
    if not labels.shape[0] or (kind == "multiclass" and not (labels >= 0).any()):
        return {"macro_f1": 0.0, "micro_f1": 0.0}
    if kind == "multilabel":
        pred = scores >= 0.5
        truth = labels
    else:
        known = labels >= 0
        n_values = scores.shape[1]
        pred = np.eye(n_values, dtype=bool)[scores[known].argmax(axis=1)]
        truth = np.eye(n_values + 1, n_values, dtype=bool)[labels[known]]
    present = truth.any(axis=0) | pred.any(axis=0)
    macro = (
        f1_score(truth[:, present], pred[:, present], average="macro", zero_division=0)
        if present.any()
        else 0.0
    )
    micro = f1_score(truth, pred, average="micro", zero_division=0)
    return {"macro_f1": float(macro), "micro_f1": float(micro)}
