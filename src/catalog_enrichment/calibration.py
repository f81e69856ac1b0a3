"""Thresholds that keep the precision promise — pure NumPy (and SciPy for the bounds).

For every (attribute, value) the training job picks, on a calibration split the model never trained
on, a score threshold by a fixed-sequence test down a fixed grid of thresholds (dense near 1):

1. the value needs at least ``min_support`` true examples in the calibration split;
2. from the highest grid threshold down, each threshold with enough predictions to be testable is
   accepted when a one-sided lower confidence bound (Wilson or Clopper–Pearson at ``confidence``)
   on the precision of everything scored at or above it is >= ``target``;
3. the sequence stops at the first threshold that fails, so precision holds at every higher
   threshold (a dip in a non-monotone precision curve stops it), and the threshold is the last —
   lowest — accepted one (most recall).

A value for which no threshold is accepted gets ``None`` and is never written. Because the
thresholds are tested in a fixed order at the full confidence, the chance of choosing a threshold
whose true precision is below target is at most ``1 - confidence`` per value — picking the lowest
of many passing cuts instead would be optimistic. Multi-class attributes are thresholded on the
top-1 score of each predicted value: the candidates for value ``v`` are the products whose argmax is
``v``.

Assumptions: calibration scores are out-of-sample, and calibration products are exchangeable with
the products scored later (same distribution); the bound is per value, not simultaneous.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import stats

from catalog_enrichment.metrics import AttributeKind

__all__ = [
    "THRESHOLD_GRID",
    "AttributeCalibration",
    "Calibration",
    "ValueThreshold",
    "calibrate_attribute",
    "clopper_pearson_lower",
    "lower_bound",
    "wilson_lower",
    "wilson_upper",
]

BoundName = Literal["wilson", "clopper_pearson"]


def _counts(successes: np.ndarray | int, trials: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= successes <= trials")
    return k, n


def wilson_lower(
    successes: np.ndarray | int, trials: np.ndarray | int, *, confidence: float = 0.95
) -> np.ndarray:
    """One-sided Wilson score lower bound on a binomial proportion (0 where ``trials == 0``)."""
    k, n = _counts(successes, trials)
    z = stats.norm.ppf(confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        centre = p + z * z / (2 * n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        bound = (centre - half) / (1 + z * z / n)
    return np.where(n > 0, np.clip(bound, 0.0, 1.0), 0.0)


def wilson_upper(
    successes: np.ndarray | int, trials: np.ndarray | int, *, confidence: float = 0.95
) -> np.ndarray:
    """One-sided Wilson score upper bound (1 where ``trials == 0``)."""
    k, n = _counts(successes, trials)
    return np.where(n > 0, 1.0 - wilson_lower(n - k, n, confidence=confidence), 1.0)


def clopper_pearson_lower(
    successes: np.ndarray | int, trials: np.ndarray | int, *, confidence: float = 0.95
) -> np.ndarray:
    """One-sided exact (Clopper–Pearson) lower bound (0 where ``successes == 0``)."""
    k, n = _counts(successes, trials)
    with np.errstate(invalid="ignore"):
        bound = stats.beta.ppf(1 - confidence, k, n - k + 1)
    return np.where(k > 0, np.nan_to_num(bound), 0.0)


def lower_bound(
    successes: np.ndarray | int, trials: np.ndarray | int, *, confidence: float, method: BoundName
) -> np.ndarray:
    """The configured one-sided lower bound."""
    if method == "wilson":
        return wilson_lower(successes, trials, confidence=confidence)
    if method == "clopper_pearson":
        return clopper_pearson_lower(successes, trials, confidence=confidence)
    raise ValueError(f"unknown bound {method!r}; use 'wilson' or 'clopper_pearson'")


@dataclass(frozen=True)
class ValueThreshold:
    """The calibration of one (attribute, value).

    ``threshold`` is ``None`` when the value cannot be written. ``support`` counts true examples in
    the calibration split; ``n_written``/``n_correct``/``precision``/``lower_bound``/``recall``
    describe what the threshold writes on that split. ``reason`` says why there is no threshold.
    """

    value: str
    threshold: float | None
    support: int
    n_written: int = 0
    n_correct: int = 0
    precision: float | None = None
    lower_bound: float | None = None
    recall: float = 0.0
    reason: str | None = None


@dataclass(frozen=True)
class AttributeCalibration:
    """Thresholds for every value of one attribute, in taxonomy order."""

    attribute: str
    kind: AttributeKind
    values: tuple[ValueThreshold, ...]

    def threshold_array(self) -> np.ndarray:
        """``(n_values,)`` thresholds, ``NaN`` for values that are never written."""
        return np.array([np.nan if v.threshold is None else v.threshold for v in self.values])


@dataclass(frozen=True)
class Calibration:
    """Everything the decision step needs, plus how it was made. JSON round-trips via to/from_dict."""

    target_precision: float
    confidence: float
    bound: BoundName
    min_support: int
    attributes: Mapping[str, AttributeCalibration] = field(default_factory=dict)

    def thresholds(self, attribute: str) -> np.ndarray:
        return self.attributes[attribute].threshold_array()

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_precision": self.target_precision,
            "confidence": self.confidence,
            "bound": self.bound,
            "min_support": self.min_support,
            "attributes": {
                name: {"kind": a.kind, "values": [asdict(v) for v in a.values]}
                for name, a in self.attributes.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        attributes = {
            name: AttributeCalibration(name, spec["kind"], tuple(ValueThreshold(**v) for v in spec["values"]))
            for name, spec in data["attributes"].items()
        }
        return cls(
            data["target_precision"], data["confidence"], data["bound"], data["min_support"], attributes
        )


# The candidate thresholds: a fixed grid, dense near 1 (1 - 10^(-3 + 3 i / 63)), tested from the top.
THRESHOLD_GRID = 1.0 - np.logspace(-3.0, 0.0, 64)


def _pick_threshold(
    scores: np.ndarray,
    correct: np.ndarray,
    support: int,
    *,
    target: float,
    confidence: float,
    bound: BoundName,
    min_support: int,
) -> tuple[float | None, dict[str, Any]]:
    """Fixed-sequence test down the threshold grid (Learn-then-Test style).

    For each grid threshold t, from the highest down, H_t = "precision of everything scored >= t is
    below target" is rejected when the lower confidence bound is >= target. Grid points with too few
    predictions to ever pass (or fewer than ``min_support``) are skipped — that depends on the scores
    only, not on the labels. The sequence stops at the first failure; the threshold is the last
    (lowest) rejected point. Testing in a fixed order at the full confidence controls the chance of
    choosing any threshold whose precision is below target, without the optimism of picking the
    best of many looks.
    """
    if support < min_support:
        return None, {"reason": f"support {support} < min_support {min_support}"}
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=bool)
    if s.size == 0:
        return None, {"reason": "never predicted"}
    order = np.argsort(-s, kind="mergesort")
    s_sorted, cum = s[order], np.cumsum(c[order])
    n = np.searchsorted(-s_sorted, -THRESHOLD_GRID, side="right")  # predictions with score >= t
    k = np.where(n > 0, cum[np.maximum(n - 1, 0)], 0)
    best_possible = lower_bound(n, n, confidence=confidence, method=bound)  # all correct
    testable = (n >= min_support) & (best_possible >= target)
    lb = lower_bound(k, n, confidence=confidence, method=bound)
    chosen = None
    tested = 0
    for g in np.flatnonzero(testable):
        tested += 1
        if lb[g] < target:
            break
        chosen = int(g)
    if chosen is None:
        why = (
            "too few predictions to prove the target"
            if tested == 0
            else (
                f"lower bound {lb[np.flatnonzero(testable)[0]]:.3f} < {target} at the first testable "
                "threshold"
            )
        )
        return None, {"reason": why}
    n_i, k_i = int(n[chosen]), int(k[chosen])
    return float(THRESHOLD_GRID[chosen]), {
        "n_written": n_i,
        "n_correct": k_i,
        "precision": k_i / n_i,
        "lower_bound": float(lb[chosen]),
        "recall": k_i / support,
    }


def calibrate_attribute(
    name: str,
    kind: AttributeKind,
    values: Sequence[str],
    scores: np.ndarray,
    labels: np.ndarray,
    *,
    target: float = 0.95,
    confidence: float = 0.95,
    bound: BoundName = "wilson",
    min_support: int = 20,
) -> AttributeCalibration:
    """Thresholds for one attribute from out-of-sample calibration scores.

    Args:
        name, kind, values: the taxonomy attribute (``values`` in head output order).
        scores: ``(n, n_values)`` probabilities on the calibration split.
        labels: multi-label ``(n, n_values)`` 0/1; multi-class ``(n,)`` indices, ``-1`` = unlabelled.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(values):
        raise ValueError(f"{name}: scores shape {scores.shape} does not match {len(values)} values")
    if not 0 < target < 1 or not 0.5 < confidence < 1:
        raise ValueError("need 0 < target < 1 and 0.5 < confidence < 1")
    if min_support < 1:
        raise ValueError("min_support must be >= 1")
    # per value: (candidate scores, whether each candidate prediction is right, support)
    candidates: list[tuple[np.ndarray, np.ndarray, int]]
    if kind == "multilabel":
        labels = np.asarray(labels).astype(bool)
        if labels.shape != scores.shape:
            raise ValueError(f"{name}: labels shape {labels.shape} != scores shape {scores.shape}")
        candidates = [(scores[:, v], labels[:, v], int(labels[:, v].sum())) for v in range(len(values))]
    else:
        labels = np.asarray(labels).astype(np.int64)
        known = labels >= 0
        s, y = scores[known], labels[known]
        top = s.argmax(axis=1) if s.size else np.zeros(0, np.int64)
        top_score = s[np.arange(s.shape[0]), top] if s.size else np.zeros(0)
        candidates = [
            (top_score[top == v], y[top == v] == v, int((y == v).sum())) for v in range(len(values))
        ]
    out = []
    for value, (cand_scores, correct, support) in zip(values, candidates, strict=True):
        thr, info = _pick_threshold(
            cand_scores,
            correct,
            support,
            target=target,
            confidence=confidence,
            bound=bound,
            min_support=min_support,
        )
        out.append(ValueThreshold(value, thr, support, **info))
    return AttributeCalibration(name, kind, tuple(out))
