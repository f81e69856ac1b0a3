"""Reproducible train / validation / calibration / test splits, stratified over every attribute value
(iterative stratification for multi-label data, as in paper 004)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

from catalog_enrichment.config import MAX_AUTO_CALIBRATION
from catalog_enrichment.data.dataset import EncodedLabels
from catalog_enrichment.errors import CatalogEnrichError

__all__ = [
    "AUTO_CALIBRATION_PRODUCTS",
    "AUTO_CROSSFIT_BELOW",
    "MIN_ROWS",
    "Splits",
    "calibration_fraction",
    "crossfit_folds",
    "split_labels",
    "stratified_splits",
]

MIN_ROWS = 50
# The automatic calibration split: this many products, kept between 15 % and 30 % of the table.
AUTO_CALIBRATION_PRODUCTS = 600
_AUTO_CALIBRATION_RANGE = (0.15, MAX_AUTO_CALIBRATION)


# The automatic calibration mode: cross-fitted (3 folds) below this many labelled products.
AUTO_CROSSFIT_BELOW = 10_000
_AUTO_FOLDS = 3


def crossfit_folds(n: int, configured: int | None) -> int:
    """Fold models that calibrate ``n`` labelled products: ``configured``, or the automatic rule.

    The attribute scope's bound tightens with the pooled calibration writes. A held-out split of a
    small catalog leaves few of them, and costs the final model that training data; out-of-fold
    scores over the whole training split give several times more (docs/benchmarks.md measures
    both on the long-tailed benchmark). Below 10,000 labelled products the calibration is therefore
    cross-fitted over 3 folds (4 trainings in all); from there on a 15 % split already holds 1,500
    products.
    """
    if configured is not None:
        return configured
    return _AUTO_FOLDS if n < AUTO_CROSSFIT_BELOW else 0


def calibration_fraction(n: int, configured: float | None) -> float:
    """The calibration share of ``n`` labelled products: ``configured``, or the automatic rule.

    The attribute-scope test proves a threshold level from its pooled calibration writes and tests a
    level only from a few hundred writes on (``calibration.min_testable_writes``: 229 at 95 % / 95 %
    with Wilson). A multi-class attribute writes at most one value per product, so about 600
    calibration products are needed before a typical model's writes reach that count at the levels
    near the target. Below 4,000 products that costs training data, so the share stops at 30 %;
    above it the calibration split stays at 15 %, more than 600 products.
    """
    if configured is not None:
        return configured
    low, high = _AUTO_CALIBRATION_RANGE
    return float(np.clip(AUTO_CALIBRATION_PRODUCTS / max(n, 1), low, high))


@dataclass(frozen=True)
class Splits:
    """Row indices of each split (disjoint, sorted)."""

    train: np.ndarray
    validation: np.ndarray
    calibration: np.ndarray
    test: np.ndarray

    def sizes(self) -> dict[str, int]:
        return {k: int(getattr(self, k).size) for k in ("train", "validation", "calibration", "test")}


def _split_off(y: np.ndarray, idx: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, part) with ``part`` about ``fraction`` of it, stratified on ``y[idx]``."""
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    rest, part = next(splitter.split(np.zeros(idx.size), y[idx]))
    return np.sort(idx[rest]), np.sort(idx[part])


def stratified_splits(
    y: np.ndarray, *, validation: float, calibration: float, test: float, seed: int
) -> Splits:
    """Split ``n`` rows by their ``(n, K)`` 0/1 value matrix ``y``; the same seed gives the same split.

    Raises:
        CatalogEnrichError: a split would be empty (too few rows for the fractions).
    """
    n = y.shape[0]
    if n < MIN_ROWS:
        raise CatalogEnrichError(
            f"{n} labelled products are too few to split into train/validation/calibration/test "
            f"(need at least {MIN_ROWS})"
        )
    idx = np.arange(n)
    rest, test_idx = _split_off(y, idx, test, seed)
    if calibration > 0:
        rest, calib_idx = _split_off(y, rest, calibration / (1 - test), seed + 1)
    else:  # cross-fitted calibration: out-of-fold scores of the training split instead
        calib_idx = np.zeros(0, np.int64)
    train_idx, val_idx = _split_off(y, rest, validation / (1 - test - calibration), seed + 2)
    splits = Splits(train_idx, val_idx, calib_idx, test_idx)
    empty = [k for k, v in splits.sizes().items() if v == 0 and (k != "calibration" or calibration > 0)]
    if empty:
        raise CatalogEnrichError(
            f"{n} labelled products are too few: the {', '.join(empty)} split would be empty"
        )
    return splits


def split_labels(
    labels: EncodedLabels, *, validation: float, calibration: float, test: float, seed: int
) -> Splits:
    """:func:`stratified_splits` of the products with a full label; products only people's verdicts
    label (partial labels: the reviewed products are no random sample, and a partial label cannot
    be scored) all go to the training split, so they never calibrate, select or evaluate a model."""
    partial_only = labels.partial_only()
    rows = np.flatnonzero(~partial_only)
    y = labels.stratification_matrix()[rows]
    splits = stratified_splits(y, validation=validation, calibration=calibration, test=test, seed=seed)
    return Splits(
        np.sort(np.concatenate([rows[splits.train], np.flatnonzero(partial_only)])),
        rows[splits.validation],
        rows[splits.calibration],
        rows[splits.test],
    )
