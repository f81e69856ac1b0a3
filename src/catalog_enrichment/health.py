"""Health of a run: does tonight's scoring still look like the calibration the thresholds rest on?

The 95 % guarantee is proven on the calibration split and holds for products that look like it. At
training, every attribute keeps a :class:`HealthBaseline` of its calibration scores (in the bundle's
``calibration.json``); each scoring task tallies the same quantities for the products it scores
(:class:`HealthTally`, summed by a Spark accumulator in the scoring pass itself); the driver compares
them (:func:`assess`). Three checks per attribute:

* **score drift**: the population stability index (PSI) of the top score over the baseline's ten
  calibration deciles. For a batch of ``n`` products drawn from the calibration distribution,
  ``n * PSI`` is close to a chi-square with 9 degrees of freedom (plus the sampling noise of the
  ``m`` calibration products the deciles were cut from), so the limit
  ``chi2.ppf(0.99, 9) * (1/n + 1/m)`` raises a false alarm on about 1 % of clean batches at every
  batch size;
* **coverage**: the share of scored products given a value against the calibration split's share, a
  two-sided binomial test at the 1 % level (its variance again includes the calibration's);
* **estimated precision**: what was written, each value weighted by the calibration split's precision
  at its confidence (20 confidence bins; label-free, in the spirit of NannyML's CBPE); it fails
  below the calibration's target precision.

Fewer than ``MIN_PRODUCTS`` scored products of an attribute are too few to judge: its checks are
skipped and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from catalog_enrichment.metrics import decision_matrix, truth_matrix

__all__ = [
    "MIN_PRODUCTS",
    "AttributeHealth",
    "HealthBaseline",
    "HealthTally",
    "assess",
    "assess_run",
    "baseline",
    "format_health",
    "psi",
    "psi_limit",
]

DECILES = 10
CONFIDENCE_BINS = 20  # equal-width bins of a written value's confidence
FALSE_ALARM = 0.01  # the share of clean batches a check may fail
MIN_PRODUCTS = 50
_FLOOR = 1e-4  # PSI's share floor: an empty bin is not an infinite drift


@dataclass(frozen=True)
class HealthBaseline:
    """One attribute's calibration scores, as the health checks read them."""

    edges: list[float]  # the DECILES - 1 inner edges of the top score's deciles
    shares: list[float]  # the calibration products' share per decile bin
    coverage: float  # share of calibration products the thresholds give a value
    precision: list[float | None]  # precision of written values per confidence bin (None: none)
    written_precision: float | None  # precision of all written calibration values
    products: int  # calibration products the baseline was cut from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HealthBaseline:
        return cls(**d)


def _top(scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores, np.float64).max(axis=1) if scores.shape[1] else np.zeros(len(scores))


def _confidence_bin(confidence: np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(confidence) * CONFIDENCE_BINS).astype(int), 0, CONFIDENCE_BINS - 1)


def baseline(
    scores: np.ndarray, labels: np.ndarray, kind: str, thresholds: np.ndarray
) -> HealthBaseline | None:
    """The baseline of one attribute from its labelled calibration scores ``(m, V)`` and labels
    (None: no calibration products)."""
    scores = np.asarray(scores, np.float64)
    if not len(scores):
        return None
    top = _top(scores)
    edges = np.unique(np.quantile(top, np.arange(1, DECILES) / DECILES))
    counts = np.bincount(np.searchsorted(edges, top, side="right"), minlength=len(edges) + 1)
    written = decision_matrix(scores, kind, thresholds)  # type: ignore[arg-type]
    truth, known = truth_matrix(labels, scores.shape[1], kind)  # type: ignore[arg-type]
    written &= known[:, None]
    bins = _confidence_bin(scores[written])
    right = (written & truth)[written]
    n_bin = np.bincount(bins, minlength=CONFIDENCE_BINS)
    ok_bin = np.bincount(bins, weights=right, minlength=CONFIDENCE_BINS)
    return HealthBaseline(
        edges=[float(e) for e in edges],
        shares=[float(c) / len(top) for c in counts],
        coverage=float(np.asarray(written.any(axis=1))[known].mean()) if known.any() else 0.0,
        precision=[float(ok / n) if n else None for ok, n in zip(ok_bin, n_bin, strict=True)],
        written_precision=float(right.mean()) if right.size else None,
        products=len(top),
    )


@dataclass
class HealthTally:
    """What the scoring tasks count of one attribute; tallies add up (``merge``)."""

    deciles: list[int]  # scored products per baseline decile bin of their top score
    scored: int = 0  # products scored for the attribute
    covered: int = 0  # of them, products given a value
    written: list[int] = field(default_factory=lambda: [0] * CONFIDENCE_BINS)  # per confidence bin

    @classmethod
    def empty(cls, base: HealthBaseline) -> HealthTally:
        return cls([0] * (len(base.edges) + 1))

    def add(self, base: HealthBaseline, top: np.ndarray, covered: int, confidences: np.ndarray) -> None:
        """Count a batch: the top scores of its scored products, how many of them were given a
        value, and the confidences of the values written."""
        bins = np.searchsorted(np.asarray(base.edges), top, side="right")
        self.deciles = (np.asarray(self.deciles) + np.bincount(bins, minlength=len(self.deciles))).tolist()
        self.scored += len(top)
        self.covered += covered
        per_bin = np.bincount(_confidence_bin(confidences), minlength=CONFIDENCE_BINS)
        self.written = (np.asarray(self.written) + per_bin).tolist()

    def merge(self, other: HealthTally) -> HealthTally:
        return HealthTally(
            [a + b for a, b in zip(self.deciles, other.deciles, strict=True)],
            self.scored + other.scored,
            self.covered + other.covered,
            [a + b for a, b in zip(self.written, other.written, strict=True)],
        )


def psi(expected: Sequence[float], counts: Sequence[int]) -> float:
    """Population stability index of ``counts`` against the ``expected`` shares (both floored)."""
    e = np.maximum(np.asarray(expected, np.float64), _FLOOR)
    a = np.maximum(np.asarray(counts, np.float64) / max(1, int(np.sum(counts))), _FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def psi_limit(n: int, m: int, bins: int = DECILES) -> float:
    """The PSI a batch of ``n`` clean products exceeds with probability ``FALSE_ALARM``, against a
    baseline cut from ``m`` products (see the module docstring)."""
    from scipy.stats import chi2

    return float(chi2.ppf(1 - FALSE_ALARM, bins - 1) * (1 / n + 1 / m))


@dataclass(frozen=True)
class AttributeHealth:
    """One attribute's checks for one run; ``failures`` names each failed check and its limit."""

    attribute: str
    scored: int
    psi: float | None = None
    psi_limit: float | None = None
    coverage: float | None = None
    expected_coverage: float | None = None
    coverage_z: float | None = None
    estimated_precision: float | None = None
    target_precision: float | None = None
    skipped: str | None = None
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def assess(attribute: str, base: HealthBaseline, tally: HealthTally, target: float) -> AttributeHealth:
    """The three checks of one attribute (see the module docstring)."""
    n, m = tally.scored, base.products
    if n < MIN_PRODUCTS:
        return AttributeHealth(attribute, n, skipped=f"{n} products scored (fewer than {MIN_PRODUCTS})")
    drift = psi(base.shares, tally.deciles)
    limit = psi_limit(n, m, len(base.shares))
    p = base.coverage
    coverage = tally.covered / n
    spread = math.sqrt(max(p * (1 - p), 1e-12) * (1 / n + 1 / m))
    z = (coverage - p) / spread
    z_limit = _normal_quantile(1 - FALSE_ALARM / 2)
    written = np.asarray(tally.written, np.float64)
    curve = np.array(
        [q if q is not None else (base.written_precision or 0.0) for q in base.precision], np.float64
    )
    estimated = float(written @ curve / written.sum()) if written.sum() else None
    failures = []
    if drift > limit:
        failures.append(f"{attribute}: score drift PSI {drift:.4f} > {limit:.4f}")
    if abs(z) > z_limit:
        failures.append(
            f"{attribute}: coverage {coverage:.3f} against {p:.3f} at calibration "
            f"(|z| {abs(z):.1f} > {z_limit:.2f})"
        )
    if estimated is not None and estimated < target:
        failures.append(f"{attribute}: estimated precision {estimated:.3f} < {target:.2f}")
    return AttributeHealth(attribute, n, drift, limit, coverage, p, z, estimated, target, None, failures)


def _normal_quantile(q: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(q))


def assess_run(
    baselines: Mapping[str, HealthBaseline], tallies: Mapping[str, HealthTally], target: float
) -> list[AttributeHealth]:
    """Every attribute with a baseline, in the baselines' order (an attribute no product was scored
    for is skipped)."""
    return [
        assess(name, base, tallies.get(name) or HealthTally.empty(base), target)
        for name, base in baselines.items()
    ]


def format_health(run_id: str, checks: Sequence[Mapping[str, Any]] | None) -> str:
    """The health checks of one run as a table, failed checks last."""
    if not checks:
        return f"run {run_id}: no health checks (nothing scored, or a model calibrated before them)"

    def num(x: Any, digits: int = 3) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    lines = [
        f"run {run_id}: health against the model's calibration",
        f"  {'attribute':<16}{'scored':>8}{'PSI':>9}{'limit':>9}{'coverage':>10}{'calib.':>8}"
        f"{'est. precision':>16}",
    ]
    for c in checks:
        if c.get("skipped"):
            lines.append(f"  {c['attribute']:<16}{c['scored']:>8}  skipped: {c['skipped']}")
            continue
        lines.append(
            f"  {c['attribute']:<16}{c['scored']:>8}{num(c['psi'], 4):>9}{num(c['psi_limit'], 4):>9}"
            f"{num(c['coverage']):>10}{num(c['expected_coverage']):>8}{num(c['estimated_precision']):>16}"
        )
    failures = [f for c in checks for f in c.get("failures", [])]
    lines.append("failed: " + "; ".join(failures) if failures else "every check passed")
    return "\n".join(lines)
