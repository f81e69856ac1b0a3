"""Thresholds that keep the precision promise — pure NumPy (and SciPy for the bounds).

The training job picks, on a calibration split the model never trained on, one score threshold per
(attribute, value). Thresholds are points of a fixed grid (dense near 1). Two guarantee scopes:

``scope="attribute"`` (the default): of everything written for an attribute, at least ``target`` is
right, with probability ``confidence``. Learn-then-Test over a one-parameter family:

1. **The family** comes from held-out *family data* (the validation split), never from the
   calibration labels. For a level ``lam`` in :data:`LEVELS` (from 0.999 down), value ``v``'s
   threshold ``t_v(lam)`` is the lowest grid point at which its estimated precision (of everything
   it writes there) is ``>= max(lam, value_floor)``. The estimate shrinks the value's own curve
   toward the attribute's pooled curve, ``(k_v(t) + m P(t)) / (n_v(t) + m)`` with
   ``m = shrinkage``: a value with much evidence gets its own threshold, a tail value with little
   or none shares the pooled one; no value is planned below the floor, however much the others
   would carry it. Without family data (a model that trains on every product and calibrates out
   of fold) every value shares one threshold and the family is the grid itself, from the top down:
   on calibrated scores one threshold is what keeps the most writes at a pooled precision.
2. **The test**: down the levels in a fixed order, ``H_lam`` = "the pooled precision of what
   ``t(lam)`` writes is below target" is rejected when a one-sided lower bound (Clopper–Pearson,
   the default, or Wilson at ``confidence``) on the calibration split's pooled precision is ``>=
   target``. The sequence stops at the first failure; the chosen level is the last rejected one.
   A level is *tested* only once it writes enough calibration values that a precision a third of
   the way from the target to 1 would prove the target (this depends on the scores alone, not the
   labels), so neither a chance error among the few most confident writes nor the label noise of
   a real catalog (its most confident predictions are rarely right more often than that) ends
   the sequence before the levels that matter (a small calibration set starts sooner:
   :func:`min_testable_writes`).
   Because the family is fixed before the calibration labels are looked at and the levels are
   tested in a fixed order at the full confidence, the chance of choosing a level whose pooled
   precision is below target is at most ``1 - confidence`` with the exact Clopper–Pearson bound
   (Wilson's approximation passes a level exactly at the target up to a point or two more often at
   a few hundred writes).
3. **The per-value guard** then asks of every value with evidence at its threshold whether that
   evidence (calibration and family writes) misses the target: its one-sided upper bound (the
   configured bound's), at the attribute's confidence shared over those values (Bonferroni), is
   below it. Such a value's threshold rises up the grid to where its evidence stops missing, or
   the value is kept out where nothing is left to write on. Either only removes writes that are
   likely worse than the target, so it does not weaken the pooled guarantee; and a night whose mix
   of values differs from calibration's cannot fill up on a value that is known to miss it.

``scope="value"``: the strict rule — every (attribute, value) proves the target on its own by a
fixed-sequence test down the grid, with at least ``min_support`` true examples. About 59
confident calibration examples with no error are needed per value, so a long tail is never written.

Multi-class attributes are thresholded on the top-1 score: the candidates for value ``v`` are the
products whose argmax is ``v``. Multi-label: every (product, value) pair is a candidate.

Variants of one article (products of one group: a shared title or description) share their score
and often their label, so they are evidence of fewer trials than their number. Given each
calibration product's group, both scopes divide what a level or threshold writes, and its rights,
by the design effect of its share right over those groups
(:func:`~catalog_enrichment.health.share_design_effect`) before the bound, and so does the guard;
which levels or thresholds are tested still depends on the scores alone (what they write counted
one by one: many variants of a few articles can end the sequence on one wrong article). A
multi-label product's pairs
share its group too.

Assumptions: calibration (and family) scores are out-of-sample, and those groups of products are
exchangeable with the products scored later (same distribution). Cross-fitted calibration scores
come from fold models, not from the model that serves: :func:`on_served_scale` raises them until
the served model writes no larger share of the validation products than the fold models did, so
what is left to assume is that it ranks at least as well as they do. Only where the validation
labels did not shape the thresholds (the value scope) may the served model's writes there prove the
target instead, each value's on its own: in the attribute scope they shaped the family and the
guard, and a check on them would pass thresholds that fit those labels by chance. The
attribute-scope bound is on the pooled precision of the attribute, not on each value.

Over 600 lines because both guarantee scopes share the grid, the family and the bounds.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from catalog_enrichment.config import CalibrationConfig
from catalog_enrichment.contracts import AttributeKind
from catalog_enrichment.errors import ConfigError
from catalog_enrichment.health import HealthProfile, share_design_effect
from catalog_enrichment.metrics import decision_matrix, truth_matrix

__all__ = [
    "LEVELS",
    "THRESHOLD_GRID",
    "AttributeCalibration",
    "Calibration",
    "PooledEvidence",
    "Scope",
    "ValueThreshold",
    "calibrate_attribute",
    "clopper_pearson_lower",
    "lower_bound",
    "min_testable_writes",
    "on_served_scale",
    "precision_proving",
    "version_target",
    "wilson_lower",
    "wilson_upper",
]

BoundName = Literal["wilson", "clopper_pearson"]
Scope = Literal["attribute", "value"]


def _counts(successes: np.ndarray | float, trials: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= successes <= trials")
    return k, n


def wilson_lower(
    successes: np.ndarray | float, trials: np.ndarray | float, *, confidence: float = 0.95
) -> np.ndarray:
    """One-sided Wilson score lower bound on a binomial proportion (0 where ``trials == 0``); the
    counts may be fractional (an effective sample size)."""
    k, n = _counts(successes, trials)
    # scipy.special, not scipy.stats (the same functions, a lighter import); here, not at the top:
    # a job that only applies thresholds never loads it
    from scipy.special import ndtri

    z = ndtri(confidence)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        centre = p + z * z / (2 * n)
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        bound = (centre - half) / (1 + z * z / n)
    return np.where(n > 0, np.clip(bound, 0.0, 1.0), 0.0)


def wilson_upper(
    successes: np.ndarray | float, trials: np.ndarray | float, *, confidence: float = 0.95
) -> np.ndarray:
    """One-sided Wilson score upper bound (1 where ``trials == 0``)."""
    k, n = _counts(successes, trials)
    return np.where(n > 0, 1.0 - wilson_lower(n - k, n, confidence=confidence), 1.0)


def clopper_pearson_lower(
    successes: np.ndarray | float, trials: np.ndarray | float, *, confidence: float = 0.95
) -> np.ndarray:
    """One-sided exact (Clopper–Pearson) lower bound (0 where ``successes == 0``); the counts may be
    fractional (an effective sample size)."""
    k, n = _counts(successes, trials)
    with np.errstate(invalid="ignore"):
        from scipy.special import betaincinv

        bound = betaincinv(k, n - k + 1, 1 - confidence)  # the beta distribution's quantile
    return np.where(k > 0, np.nan_to_num(bound), 0.0)


def lower_bound(
    successes: np.ndarray | float, trials: np.ndarray | float, *, confidence: float, method: BoundName
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
    describe what the threshold writes on that split (for a threshold :func:`on_served_scale` raised
    or kept out: what the threshold the fold models proved wrote), ``upper_bound`` the value's own
    one-sided upper bound (calibration and family writes, attribute scope). ``reason`` says why
    there is no threshold.
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
    upper_bound: float | None = None


@dataclass(frozen=True)
class PooledEvidence:
    """What the attribute-scope test proved on the calibration split.

    ``level`` is the chosen family level - without family data, the shared threshold - (``None``:
    no level passed, nothing is written);
    ``n_written``/``n_correct``/``precision``/``lower_bound`` describe every value written at that
    level before the guard; ``levels_tested`` counts the tests run (the last one failed unless the
    grid ran out); ``guarded`` names the values the per-value guard raised or kept out;
    ``stop_written``/``stop_correct``: the calibration writes of the level whose failed test ended
    the sequence (``0`` where the grid ran out first); ``design_effect``: how many of the chosen
    level's writes count as one independent trial where calibration products come in groups
    (variants of one article), by which the bound divides the counts (1: one by one).
    """

    level: float | None
    n_written: int
    n_correct: int
    precision: float | None
    lower_bound: float | None
    levels_tested: int
    guarded: tuple[str, ...] = ()
    stop_written: int = 0
    stop_correct: int = 0
    design_effect: float = 1.0


@dataclass(frozen=True)
class AttributeCalibration:
    """Thresholds for every value of one attribute, in taxonomy order (``pooled``: attribute scope).

    Cross-fitted calibration (:func:`on_served_scale`), at the thresholds the fold models' scores
    proved, on the validation split: ``served_precision``, the precision of what the model that
    serves wrote there, and ``served_lower_bound`` its one-sided bound; ``served_ratio``, how much it
    wrote over what the fold models wrote. Where what it wrote there did not or could not prove the
    target (:func:`on_served_scale`), the thresholds were raised to the served model's scale.
    """

    attribute: str
    kind: AttributeKind
    values: tuple[ValueThreshold, ...]
    pooled: PooledEvidence | None = None
    served_ratio: float | None = None
    served_precision: float | None = None
    served_lower_bound: float | None = None

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
    scope: Scope = "value"
    # what the run health checks compare a run with (health/); None: a model trained before them
    health: HealthProfile | None = None

    def thresholds(self, attribute: str) -> np.ndarray:
        return self.attributes[attribute].threshold_array()

    def describe(self, attribute: str) -> str:
        """One line on what the calibration proved for ``attribute`` and where its test stopped."""
        a = self.attributes[attribute]
        written = [v for v in a.values if v.threshold is not None]
        p = a.pooled
        if p is None:  # the value scope
            line = f"{attribute}: {len(written)} of {len(a.values)} values proved the target on their own"
        elif p.level is None or p.precision is None:
            reason = next((v.reason for v in a.values if v.reason), "no value is written")
            return f"{attribute}: writes nothing: {reason}"
        else:
            line = (
                f"{attribute}: writes {len(written)} of {len(a.values)} values where {p.n_written:,} "
                f"calibration values were {p.precision:.1%} right (lower bound {p.lower_bound:.3f} >= "
                f"{self.target_precision:g})"
            )
            if p.design_effect > 1:
                line += f" as {p.n_written / p.design_effect:,.0f} independent ones (variants of one product)"
            if p.stop_written:
                line += (
                    f"; the next level tested ({p.stop_written:,} writes, "
                    f"{p.stop_correct / p.stop_written:.1%} right) did not prove it"
                )
            if p.guarded:
                line += f"; raised or kept out on their own evidence: {', '.join(p.guarded)}"
        served = [v.value for v in a.values if v.reason and v.reason.startswith(_SERVED_OUT)]
        if served:
            line += f"; kept out on the served model's scale: {', '.join(served)}"
        return line

    def kept_bound(self, attribute: str, kept: Collection[str]) -> float | None:
        """The one-sided lower bound on the pooled calibration precision of what ``kept``'s values
        write at their thresholds: what the attribute scope proves of a subset of its values (a
        taxonomy that drops some). ``None`` for the value scope, where each value proved the target
        on its own. A value raised to the served model's scale counts the evidence of the threshold
        the fold models proved (raising only removes writes)."""
        return _kept_bound(self.attributes[attribute], kept, self.confidence, self.bound)

    def keep_out(self, values: Mapping[str, Sequence[str]], reason: str) -> Calibration:
        """These values (attribute -> values) never written whatever their scores: no threshold, and
        ``reason`` recorded."""
        attributes = dict(self.attributes)
        for name, out in values.items():
            a = attributes[name]
            kept = tuple(replace(v, threshold=None, reason=reason) if v.value in out else v for v in a.values)
            attributes[name] = replace(a, values=kept)
        return replace(self, attributes=attributes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_precision": self.target_precision,
            "confidence": self.confidence,
            "bound": self.bound,
            "min_support": self.min_support,
            "scope": self.scope,
            "attributes": {
                name: {
                    "kind": a.kind,
                    "values": [asdict(v) for v in a.values],
                    "pooled": None
                    if a.pooled is None
                    else {**asdict(a.pooled), "guarded": list(a.pooled.guarded)},
                    "served_ratio": a.served_ratio,
                    "served_precision": a.served_precision,
                    "served_lower_bound": a.served_lower_bound,
                }
                for name, a in self.attributes.items()
            },
            "health": None if self.health is None else self.health.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """Read :meth:`to_dict`'s form (bundles written before scopes existed read as ``value``)."""
        attributes = {}
        for name, spec in data["attributes"].items():
            pooled = spec.get("pooled")
            if pooled is not None:
                pooled = PooledEvidence(**{**pooled, "guarded": tuple(pooled.get("guarded", ()))})
            values = tuple(ValueThreshold(**v) for v in spec["values"])
            attributes[name] = AttributeCalibration(
                name,
                spec["kind"],
                values,
                pooled,
                spec.get("served_ratio"),
                spec.get("served_precision"),
                spec.get("served_lower_bound"),
            )
        return cls(
            data["target_precision"],
            data["confidence"],
            data["bound"],
            data["min_support"],
            attributes,
            data.get("scope", "value"),
            HealthProfile.from_dict(data.get("health")),
        )


# why on_served_scale keeps a value out
_SERVED_OUT = "the served model writes more than the fold models did"
# The candidate thresholds: a fixed grid, dense near 1 (1 - 10^(-3 + 3 i / 191)), tested from the top.
THRESHOLD_GRID = 1.0 - np.logspace(-3.0, 0.0, 192)
# The attribute scope's family levels (required estimated precision), from 0.999 down to 0.5.
LEVELS = 1.0 - np.logspace(-3.0, np.log10(0.5), 96)


def min_testable_writes(
    *, target: float, confidence: float, bound: BoundName, products: int | None = None
) -> int:
    """Fewest writes at which an observed precision a third of the way from ``target`` to 1 proves
    ``target`` - on a calibration set of few ``products``, a sixth of them, but never fewer than
    where a precision halfway to 1 would.

    The attribute scope tests a level only from this many calibration writes on: a test on fewer
    could fail on a chance error, or on the few wrong labels among the most confident writes, and
    end the fixed sequence before the levels that matter. A small calibration set has little more
    than its most confident writes to prove the target on, so there the tests start sooner.
    """
    third, half = (
        _writes_proving(target + (1.0 - target) / share, target, confidence, bound) for share in (3, 2)
    )
    return third if products is None else int(np.clip(products // 6, half, third))


def precision_proving(writes: int, *, target: float, confidence: float, bound: BoundName) -> float | None:
    """The lowest observed precision of ``writes`` calibration writes that proves ``target``
    (``None`` where even none wrong would not)."""
    k = np.arange(int(np.floor(writes * target)), writes + 1)
    ok = lower_bound(k, writes, confidence=confidence, method=bound) >= target
    return float(k[np.argmax(ok)] / writes) if ok.any() else None


@functools.cache  # a bound at 100,000 counts; every attribute of every calibration asks the same
def _writes_proving(precision: float, target: float, confidence: float, bound: BoundName) -> int:
    """Fewest writes at which an observed ``precision`` proves ``target``."""
    n = np.arange(1, 100_000)
    ok = lower_bound(np.floor(n * precision), n, confidence=confidence, method=bound) >= target
    return int(n[np.argmax(ok)]) if ok.any() else int(n[-1])


def _curve(scores: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, k)`` at every grid threshold: candidates scored ``>= t`` and how many are right (a
    candidate scored 0 at none: it is never written, :func:`~catalog_enrichment.metrics.decision_matrix`)."""
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(correct, dtype=bool)
    s, c = s[s > 0], c[s > 0]
    if s.size == 0:
        zero = np.zeros(THRESHOLD_GRID.size, np.int64)
        return zero, zero.copy()
    order = np.argsort(-s, kind="mergesort")
    s_sorted, cum = s[order], np.cumsum(c[order])
    n = np.searchsorted(-s_sorted, -THRESHOLD_GRID, side="right")
    k = np.where(n > 0, cum[np.maximum(n - 1, 0)], 0)
    return n.astype(np.int64), k.astype(np.int64)


def _candidates(
    name: str, kind: AttributeKind, n_values: int, scores: np.ndarray, labels: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per value: (candidate scores, whether each candidate prediction is right, support)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != n_values:
        raise ValueError(f"{name}: scores shape {scores.shape} does not match {n_values} values")
    if kind == "multilabel":
        y = np.asarray(labels).astype(bool)
        if y.shape != scores.shape:
            raise ValueError(f"{name}: labels shape {y.shape} != scores shape {scores.shape}")
        return [(scores[:, v], y[:, v], int(y[:, v].sum())) for v in range(n_values)]
    y = np.asarray(labels).astype(np.int64)
    if y.shape != (scores.shape[0],):
        raise ValueError(f"{name}: multiclass labels must have shape ({scores.shape[0]},), got {y.shape}")
    known = y >= 0
    s, y = scores[known], y[known]
    top = s.argmax(axis=1) if s.size else np.zeros(0, np.int64)
    top_score = s[np.arange(s.shape[0]), top] if s.size else np.zeros(0)
    return [(top_score[top == v], y[top == v] == v, int((y == v).sum())) for v in range(n_values)]


def _candidate_groups(
    name: str, kind: AttributeKind, n_values: int, scores: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> list[np.ndarray]:
    """Per value: the group of each of its candidates' products, in :func:`_candidates`' order."""
    groups = np.asarray(groups)
    if groups.shape != (np.shape(scores)[0],):
        raise ValueError(f"{name}: groups shape {groups.shape} != one per product ({np.shape(scores)[0]})")
    groups = np.unique(groups, return_inverse=True)[1]  # integers: each level's count sorts them again
    if kind == "multilabel":
        return [groups] * n_values
    known = np.asarray(labels) >= 0
    s, g = np.asarray(scores, np.float64)[known], groups[known]
    top = s.argmax(axis=1) if s.size else np.zeros(0, np.int64)
    return [g[top == v] for v in range(n_values)]


def _curves(cands: list[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(V, G)`` counts written and right at every grid threshold, per value."""
    pairs = [_curve(s, c) for s, c, _ in cands]
    return np.array([n for n, _ in pairs]), np.array([k for _, k in pairs])


def _fixed_sequence(
    lb: np.ndarray, testable: np.ndarray, target: float
) -> tuple[int | None, int, int | None]:
    """Test the testable hypotheses in index order until the first whose lower bound misses the
    target; returns (the last index that passed or ``None``, how many were tested, the index whose
    test failed or ``None`` where none did)."""
    chosen, tested = None, 0
    for i in np.flatnonzero(testable):
        tested += 1
        if lb[i] < target:
            return chosen, tested, int(i)
        chosen = int(i)
    return chosen, tested, None


def _pick_threshold(
    scores: np.ndarray,
    correct: np.ndarray,
    support: int,
    *,
    target: float,
    confidence: float,
    bound: BoundName,
    min_support: int,
    groups: np.ndarray | None = None,
) -> tuple[float | None, dict[str, Any]]:
    """Value scope: a fixed-sequence test of one value down the threshold grid.

    For each grid threshold t, from the highest down, H_t = "precision of everything scored >= t is
    below target" is rejected when the lower confidence bound is >= target. Grid points with too few
    predictions to ever pass (or fewer than ``min_support``) are skipped — that depends on the scores
    only, not on the labels. The sequence stops at the first failure; the threshold is the last
    (lowest) rejected point, raised to the highest grid point that writes the same calibration
    products: grid points below every score that supports it repeat the same test on the same
    writes, and would write scores the calibration never saw. ``groups``: each candidate's group,
    whose variants count as the independent trials they are worth (:func:`_pooled_test`); a grid
    point is testable where its writes would prove the target were every one right, counted so.
    """
    if support < min_support:
        return None, {"reason": f"support {support} < min_support {min_support}"}
    if np.asarray(scores).size == 0:
        return None, {"reason": "never predicted"}
    n, k = _curve(scores, correct)
    alike = deff = np.ones(THRESHOLD_GRID.size)
    if groups is not None:  # the grid as levels, each writing what scores at or above it
        grouped = _Grouped([(scores, correct, support)], [groups])
        first, right, of = grouped.first_levels(np.arange(THRESHOLD_GRID.size)[:, None])
        alike = _level_design_effects(first, np.ones_like(right), of, n >= min_support)  # all right
        deff = _level_design_effects(first, right, of, n >= min_support)
    best_possible = lower_bound(n / alike, n / alike, confidence=confidence, method=bound)  # all correct
    testable = (n >= min_support) & (best_possible >= target)
    lb = lower_bound(k / deff, n / deff, confidence=confidence, method=bound)
    chosen, tested, _ = _fixed_sequence(lb, testable, target)
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
    chosen = int(np.flatnonzero(n[: chosen + 1] == n[chosen])[0])  # n grows down the grid
    n_i, k_i = int(n[chosen]), int(k[chosen])
    return float(THRESHOLD_GRID[chosen]), {
        "n_written": n_i,
        "n_correct": k_i,
        "precision": k_i / n_i,
        "lower_bound": float(lb[chosen]),
        "recall": k_i / support,
    }


def threshold_family(
    n: np.ndarray | None, k: np.ndarray | None, *, n_values: int, shrinkage: float, floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """The attribute-scope family: ``(levels (L,), grid indices (L, V))``, ``-1`` = value not written.

    ``n``/``k``: ``(V, G)`` family-data counts written and right at each grid threshold. Row ``l``
    holds, per value, the lowest grid point at which the value's shrunk precision estimate (of
    everything it writes there) is ``>= max(LEVELS[l], floor)``: a point that passes a level passes
    every lower one, so the thresholds only fall as the level falls; no value is planned below the
    floor however much the others would carry it. Without family data (``None``) the levels are the
    grid's thresholds, each shared by every value.
    """
    if n is None or k is None or int(n.sum()) == 0:
        shared = np.arange(THRESHOLD_GRID.size)
        return THRESHOLD_GRID, np.repeat(shared[:, None], n_values, axis=1)
    levels = np.maximum(LEVELS, floor)
    big_n, big_k = n.sum(axis=0), k.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(big_n > 0, big_k / big_n, np.nan)
        own = (k + shrinkage * pooled[None, :]) / (n + shrinkage)
        estimate = np.where(n + shrinkage > 0, own, pooled[None, :])  # no evidence of its own: pooled
    # grid points above every family candidate carry no evidence: they pass any level
    estimate = np.where(big_n[None, :] > 0, estimate, np.inf)
    passes = estimate[None, :, :] >= levels[:, None, None]  # (L, V, G)
    # the lowest passing point (no running minimum: a dip among the few most confident family
    # products would block every point below it)
    lowest = passes.shape[2] - 1 - np.argmax(passes[:, :, ::-1], axis=2)
    return LEVELS, np.where(passes.any(axis=2), lowest, -1)


def _pooled_test(
    family: np.ndarray,
    n: np.ndarray,
    k: np.ndarray,
    *,
    target: float,
    confidence: float,
    bound: BoundName,
    min_writes: int,
    grouped: _Grouped | None = None,
) -> tuple[int | None, int, int | None, np.ndarray, np.ndarray, np.ndarray]:
    """Fixed-sequence test down the family's levels on calibration counts ``n``/``k`` ``(V, G)``.
    A level that writes nothing more than the level before it is not tested: the chosen level is
    the first (highest) of those that write what it writes, never one below every calibration
    score that supports it. ``grouped``: the candidates and their products' groups; each tested
    level's counts are divided by the design effect of its writes' share right (variants of one
    article are not independent trials). Which levels are tested depends on the scores alone, as
    without groups.

    Returns (chosen level index or ``None``, levels tested, the index of the level whose test
    failed or ``None``, pooled writes, rights and design effects per level).
    """
    cols = np.arange(n.shape[0])
    idx = np.maximum(family, 0)
    live = family >= 0
    writes = np.where(live, n[cols[None, :], idx], 0).sum(axis=1)
    rights = np.where(live, k[cols[None, :], idx], 0).sum(axis=1)
    more = np.diff(writes, prepend=0) > 0
    deff = np.ones(writes.size)
    testable = (writes >= min_writes) & more
    if grouped is not None:
        deff = _level_design_effects(*grouped.first_levels(family), testable)
    lb = lower_bound(rights / deff, writes / deff, confidence=confidence, method=bound)
    chosen, tested, stop = _fixed_sequence(lb, testable, target)
    return chosen, tested, stop, writes, rights, deff


@dataclass(frozen=True)
class _Grouped:
    """Calibration candidates (:func:`_candidates`) with their products' groups, per value."""

    cands: list[tuple[np.ndarray, np.ndarray, int]]
    groups: list[np.ndarray]

    def first_levels(self, family: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every candidate's first family level that writes it (the level count where none does),
        whether it is right and its group, over all values. A value's threshold only falls as the
        level falls (``+inf`` above its first level), so its candidates' levels are a search."""
        first = []
        for v, (s, _, _) in enumerate(self.cands):
            thr = np.where(family[:, v] >= 0, THRESHOLD_GRID[np.maximum(family[:, v], 0)], np.inf)
            level = np.searchsorted(-thr, -s, side="left")
            first.append(np.where(s > 0, level, family.shape[0]))  # a score of 0 is never written
        right = [np.asarray(c, bool) for _, c, _ in self.cands]
        return np.concatenate(first), np.concatenate(right), np.concatenate(self.groups)


def _level_design_effects(
    first: np.ndarray, right: np.ndarray, groups: np.ndarray, where: np.ndarray
) -> np.ndarray:
    """At the levels ``where`` marks, the design effect of the share right of what each writes
    (``first``: each candidate's first level that writes it) over the candidates' ``groups``; 1
    elsewhere."""
    deff = np.ones(where.size)
    for level in np.flatnonzero(where):
        written = first <= level
        deff[level] = share_design_effect(right[written], groups[written])
    return deff


def calibrate_attribute(
    name: str,
    kind: AttributeKind,
    values: Sequence[str],
    scores: np.ndarray,
    labels: np.ndarray,
    rule: CalibrationConfig | None = None,
    *,
    family_scores: np.ndarray | None = None,
    family_labels: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> AttributeCalibration:
    """Thresholds for one attribute from out-of-sample calibration scores (module docstring).

    Args:
        name, kind, values: the taxonomy attribute (``values`` in head output order).
        scores: ``(n, n_values)`` probabilities on the calibration split.
        labels: multi-label ``(n, n_values)`` 0/1; multi-class ``(n,)`` indices, ``-1`` = unlabelled.
        rule: the target, its confidence and bound, the scope (``attribute``: the pooled guarantee;
            ``value``: strict, per value) and each scope's options; default: the config's defaults.
        family_scores, family_labels: held-out data independent of the calibration split (the
            validation split) that shapes the attribute-scope family; ``None`` = one shared threshold.
        groups: ``(n,)`` the group of each calibration product (variants of one article share
            one); the tests then count what each level or threshold writes as the independent
            trials it is worth. ``None``: every product is its own.
    """
    rule = rule or CalibrationConfig()
    if (family_scores is None) != (family_labels is None):
        raise ValueError("give both family_scores and family_labels, or neither")
    cands = _candidates(name, kind, len(values), scores, labels)
    of = None if groups is None else _candidate_groups(name, kind, len(values), scores, labels, groups)
    if rule.scope == "value":
        out = [
            _pick(value, c, rule, None if of is None else of[v])
            for v, (value, c) in enumerate(zip(values, cands, strict=True))
        ]
        return AttributeCalibration(name, kind, tuple(out))
    family = None
    if family_scores is not None and family_labels is not None:
        family = _curves(_candidates(name, kind, len(values), family_scores, family_labels))
    grouped = None if of is None else _Grouped(cands, of)
    return _attribute_scope(name, kind, values, cands, family, rule, grouped)


def _attribute_scope(
    name: str,
    kind: AttributeKind,
    values: Sequence[str],
    cands: list[tuple[np.ndarray, np.ndarray, int]],
    fam: tuple[np.ndarray, np.ndarray] | None,
    rule: CalibrationConfig,
    grouped: _Grouped | None = None,
) -> AttributeCalibration:
    """The attribute scope: a family of per-value thresholds (from ``fam``, the validation split's
    curves) tested down from the strictest level on the pooled calibration writes (``grouped``:
    counted as independent trials, :func:`_pooled_test`)."""
    target, confidence, bound = rule.target_precision, rule.confidence, rule.bound
    levels, family = threshold_family(
        *(fam or (None, None)), n_values=len(values), shrinkage=rule.shrinkage, floor=rule.value_floor
    )
    n_cal, k_cal = _curves(cands)
    sizes = [len(s) for s, _, _ in cands]  # a multi-label value is scored on every product
    products = max(sizes, default=0) if kind == "multilabel" else sum(sizes)
    testable = min_testable_writes(target=target, confidence=confidence, bound=bound, products=products)
    min_writes = max(rule.min_support, testable)
    chosen, tested, stop, writes, rights, deff = _pooled_test(
        family, n_cal, k_cal, target=target, confidence=confidence, bound=bound, min_writes=min_writes,
        grouped=grouped,
    )  # fmt: skip
    stopped = (0, 0) if stop is None else (int(writes[stop]), int(rights[stop]))
    if chosen is None:
        why = f"fewer than {min_writes} calibration writes at every level"
        if stop is not None:
            w, r = stopped
            d = float(deff[stop])
            why = (
                f"the first level tested wrote {w:,} calibration values {r / w:.1%} right: lower bound "
                f"{float(lower_bound(r / d, w / d, confidence=confidence, method=bound)):.3f} < {target:g}"
            )
            needed = precision_proving(int(w / d), target=target, confidence=confidence, bound=bound)
            if d > 1:
                why += f" as {w / d:,.0f} independent trials (variants of one product)"
            if needed is not None:
                why += f" ({needed:.1%} would prove it at that many writes)"
        none = tuple(
            ValueThreshold(v, None, s, reason=why) for v, (_, _, s) in zip(values, cands, strict=True)
        )
        evidence = PooledEvidence(None, 0, 0, None, None, tested, (), *stopped)
        return AttributeCalibration(name, kind, none, evidence)
    seen = n_cal if fam is None else n_cal + fam[0]
    tested_values = [g >= 0 and seen[v, g] > 0 for v, g in enumerate(family[chosen])]
    # the guard asks of every value with evidence (calibration or family) at its threshold whether
    # it misses the target: at the attribute's confidence over them all (Bonferroni), so a value
    # that does reach the target is held back by chance at most at that rate
    guard = 1.0 - (1.0 - confidence) / max(sum(tested_values), 1)
    out = [
        _value_at_level(
            value,
            int(family[chosen, v]),
            (n_cal[v], k_cal[v]),
            None if fam is None else (fam[0][v], fam[1][v]),
            support,
            rule,
            guard,
            None if grouped is None else (scores, right, grouped.groups[v]),
        )
        for v, (value, (scores, right, support)) in enumerate(zip(values, cands, strict=True))
    ]
    w, r, d = int(writes[chosen]), int(rights[chosen]), float(deff[chosen])
    pooled = PooledEvidence(
        float(levels[chosen]),
        w,
        r,
        r / w,
        float(lower_bound(r / d, w / d, confidence=confidence, method=bound)),
        tested,
        tuple(t.value for t in out if t.reason is not None and t.reason.startswith("guard:")),
        *stopped,
        design_effect=d,
    )
    return AttributeCalibration(name, kind, tuple(out), pooled)


def _pick(
    value: str,
    candidate: tuple[np.ndarray, np.ndarray, int],
    rule: CalibrationConfig,
    groups: np.ndarray | None = None,
) -> ValueThreshold:
    """Value scope: one value's threshold and its evidence (:func:`_pick_threshold`)."""
    scores, correct, support = candidate
    thr, info = _pick_threshold(
        scores, correct, support, target=rule.target_precision, confidence=rule.confidence,
        bound=rule.bound, min_support=rule.min_support, groups=groups,
    )  # fmt: skip
    return ValueThreshold(value, thr, support, **info)


def _value_at_level(
    value: str,
    g: int,
    cal: tuple[np.ndarray, np.ndarray],
    fam: tuple[np.ndarray, np.ndarray] | None,
    support: int,
    rule: CalibrationConfig,
    guard: float,
    candidates: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> ValueThreshold:
    """Attribute scope: one value at the chosen level's threshold index ``g`` (-1: never reaches
    it), with its calibration evidence (``cal``: its writes and rights per threshold; ``fam``: the
    family's). The guard: where the value's own evidence (both together) shows it below ``target``
    - its upper bound (the configured bound's) at confidence ``guard`` is below it - its threshold
    rises up the grid to the first point where it does not; a value whose evidence misses the
    target wherever it writes anything is kept out. ``candidates``: the value's calibration
    candidates (scores, whether right, their products' groups), whose writes then count as the
    independent trials they are worth, as the pooled test counts them (variants of one article
    wrong together are one error, not many); ``None``: one by one.
    Either only removes writes that are likely worse than the target."""
    if g < 0:
        return ValueThreshold(value, None, support, reason="never reaches the level in the family")
    target, confidence, bound = rule.target_precision, rule.confidence, rule.bound
    n_all, k_all = cal[0].copy(), cal[1].copy()
    if fam is not None:
        n_all, k_all = n_all + fam[0], k_all + fam[1]

    def upper_at(i: int) -> float:
        """The configured bound's upper side at grid point ``i``: 1 - the lower bound on the share wrong."""
        d = 1.0
        if candidates is not None:
            scores, right, groups = candidates
            written = (scores > 0) & (scores >= THRESHOLD_GRID[i])
            d = share_design_effect(right[written], groups[written])
        n_fam, k_fam = (0, 0) if fam is None else (fam[0][i], fam[1][i])  # the family's one by one
        n = cal[0][i] / d + n_fam
        wrong = (cal[0][i] - cal[1][i]) / d + (n_fam - k_fam)
        return 1.0 - float(lower_bound(wrong, n, confidence=guard, method=bound))

    upper_g = upper = upper_at(g)
    raised = g
    while upper < target:  # up the grid, to where it stops missing
        raised -= 1
        if raised < 0:
            break
        upper = upper_at(raised)
    if raised < g and (raised < 0 or n_all[raised] == 0):  # ... with evidence left to write on
        raised = -1
    while 0 < raised < g and n_all[raised - 1] == n_all[raised]:  # the highest that writes as much
        raised -= 1
    n_v, k_v = (int(cal[0][raised]), int(cal[1][raised])) if raised >= 0 else (0, 0)
    evidence: dict[str, Any] = {
        "n_written": n_v,
        "n_correct": k_v,
        "precision": k_v / n_v if n_v else None,
        "lower_bound": float(lower_bound(k_v, n_v, confidence=confidence, method=bound)),
        "recall": k_v / support if support else 0.0,
        "upper_bound": upper_g,
    }
    if raised == g:
        return ValueThreshold(value, float(THRESHOLD_GRID[g]), support, **evidence)
    missed = f"upper bound {upper_g:.3f} < target {target} ({int(k_all[g])}/{int(n_all[g])} right)"
    if raised < 0:
        return ValueThreshold(value, None, support, **evidence, reason=f"guard: {missed}; kept out")
    reason = f"guard: {missed} at {THRESHOLD_GRID[g]:.4f}; raised to {THRESHOLD_GRID[raised]:.4f}"
    return ValueThreshold(value, float(THRESHOLD_GRID[raised]), support, **evidence, reason=reason)


def _shares(scores: np.ndarray, kind: AttributeKind) -> np.ndarray:
    """The share of ``scores``' candidates (multi-class: each product's top-1 score; multi-label:
    every pair) at or above each grid threshold: non-decreasing down the grid."""
    candidates = np.sort(scores.max(axis=1) if kind == "multiclass" else scores.ravel())
    return 1.0 - np.searchsorted(candidates, THRESHOLD_GRID, side="left") / max(candidates.size, 1)


def _kept_bound(
    a: AttributeCalibration, kept: Collection[str], confidence: float, bound: BoundName
) -> float | None:
    """:meth:`Calibration.kept_bound` of one attribute."""
    if a.pooled is None:
        return None
    kept = set(kept)
    ours = [v for v in a.values if v.threshold is not None and v.value in kept]
    writes, rights = sum(v.n_written for v in ours), sum(v.n_correct for v in ours)
    deff = a.pooled.design_effect
    return float(lower_bound(rights / deff, writes / deff, confidence=confidence, method=bound))


def on_served_scale(
    cal: AttributeCalibration,
    served: np.ndarray,
    folds: Sequence[np.ndarray],
    labels: np.ndarray,
    target: float,
    *,
    confidence: float = 0.95,
    bound: BoundName = "wilson",
    provable: bool = True,
    labelled: np.ndarray | None = None,
    groups: np.ndarray | None = None,
) -> AttributeCalibration:
    """Cross-fitted thresholds checked on the model that serves, and raised where it falls short.

    The thresholds were proven on the out-of-fold scores of fold models that each trained on part
    of the training split; the model that serves trained on all of it and is usually more
    confident, so at the same threshold it writes more. ``served`` and ``folds``: ``(n, n_values)``
    scores of the same held-out products (the validation split) by the model that serves and by
    each fold model; ``labels`` those of the rows ``labelled`` marks (None: every row; the shares
    below count every row, labelled or not); ``groups`` the group of each row (variants of one
    article share one; None: every product is its own). Where what the served model writes there
    at the proven thresholds proves ``target`` by itself (the one-sided ``bound`` at ``confidence``
    reaches it, its writes counted as the independent trials they are worth over ``groups``, so a
    few hundred validation products cannot pass a model that is only as good as the target by
    chance), they stand: in the attribute scope, what it writes of every value together; in the
    value scope (``cal.pooled`` is ``None``), each value on its own, as its threshold was proven.
    Otherwise each rises up the grid to the lowest point at which the served model writes no
    larger share of those products' candidates than the fold models wrote, on average, at the
    proven threshold: it then writes as much as a fold model would, chosen by a model that ranks
    at least as well (the test report's fold gap compares the two on the same split); a value with
    no such point, not even the grid's top, is not written, and in the attribute scope, where all
    the values proved the target together, then neither are the rest unless their own calibration
    writes still prove it (:meth:`Calibration.kept_bound`). None falls.
    ``provable=False``: the served model fitted part of itself on these products (a late or
    decision fusion's held-out fit), or their labels shaped the thresholds (the attribute scope's
    family and guard), so what it writes there proves nothing and the thresholds always go to the
    fold models' share; so do they where it wrote nothing labelled there.
    """
    if not folds or served.shape[0] == 0:
        return cal
    thresholds = cal.threshold_array()
    known = served if labelled is None else served[labelled]
    truth, has = truth_matrix(labels, served.shape[1], cal.kind)
    pair_groups = None  # the group of each (labelled product, value) pair's product
    if groups is not None:
        of = np.asarray(groups) if labelled is None else np.asarray(groups)[labelled]
        pair_groups = np.broadcast_to(of[:, None], known.shape)

    def evidence(t: np.ndarray) -> tuple[float | None, float | None]:
        """The served model's precision at thresholds ``t`` on the labelled rows, and its bound."""
        written = decision_matrix(known, cal.kind, t) & has[:, None]
        right = truth[written]
        if not right.size:
            return None, None
        deff = 1.0 if pair_groups is None else share_design_effect(right, pair_groups[written])
        lb = lower_bound(right.sum() / deff, right.size / deff, confidence=confidence, method=bound)
        return float(right.mean()), float(lb)

    proven = float(np.mean([decision_matrix(f, cal.kind, thresholds).sum() for f in folds]))
    ratio = int(decision_matrix(served, cal.kind, thresholds).sum()) / proven if proven else None
    precision, proof = evidence(thresholds)
    checked = replace(cal, served_ratio=ratio, served_precision=precision, served_lower_bound=proof)
    proofs = [proof] * thresholds.size
    if cal.pooled is None:  # the value scope: each value on its own (row v: only v's threshold)
        alone = np.where(np.eye(thresholds.size, dtype=bool), thresholds, np.nan)
        proofs = [evidence(t)[1] for t in alone]
    stands = [provable and p is not None and p >= target for p in proofs]
    if all(stands):
        return checked
    shares = _shares(served, cal.kind)
    theirs = np.mean([_shares(f, cal.kind) for f in folds], axis=0)
    values = []
    for v, ok in zip(cal.values, stands, strict=True):
        if v.threshold is None or ok:
            values.append(v)
            continue
        g = int(np.argmin(np.abs(THRESHOLD_GRID - v.threshold)))
        fits = np.flatnonzero(shares[: g + 1] <= theirs[g])  # grid points at or above the threshold
        if not fits.size:  # even the grid's top writes more than the fold models did: not written
            why = f"{_SERVED_OUT} at every grid point from {v.threshold:.4f} up"
            values.append(replace(v, threshold=None, reason=why))
            continue
        raised = int(fits[-1])
        values.append(v if raised == g else replace(v, threshold=float(THRESHOLD_GRID[raised])))
    moved = replace(checked, values=tuple(values))
    dropped = [
        v.value
        for v, w in zip(cal.values, values, strict=True)
        if v.threshold is not None and w.threshold is None
    ]
    proof = _kept_bound(moved, [v.value for v in values if v.threshold is not None], confidence, bound)
    if not dropped or proof is None or proof >= target:
        return moved
    # the attribute scope proved what every value writes together: without these, the rest must
    why = f"{_SERVED_OUT} for {', '.join(dropped)}, and the rest prove a lower bound of {proof:.3f} only"
    out = tuple(v if v.threshold is None else replace(v, threshold=None, reason=why) for v in values)
    return replace(moved, values=out)


def version_target(configured: float, calibrated: float, version: str) -> float:
    """The precision target a model version is judged against: the one it was calibrated for.

    Raises:
        ConfigError: ``calibration.target_precision`` in the config says otherwise (both named).
    """
    if abs(configured - calibrated) > 1e-12:
        raise ConfigError(
            f"calibration.target_precision is {configured} but {version} was calibrated for {calibrated}: a "
            f"version is judged against its own target; set calibration.target_precision: {calibrated}, or "
            f"train a version for {configured}"
        )
    return calibrated
