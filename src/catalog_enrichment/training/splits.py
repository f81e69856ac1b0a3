"""Reproducible train / validation / calibration / test splits, stratified over every attribute value
(iterative stratification for multi-label data, as in paper 004)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

from catalog_enrichment.errors import CatalogEnrichError

__all__ = ["MIN_ROWS", "Splits", "stratified_splits"]

MIN_ROWS = 50


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
    rest, calib_idx = _split_off(y, rest, calibration / (1 - test), seed + 1)
    train_idx, val_idx = _split_off(y, rest, validation / (1 - test - calibration), seed + 2)
    splits = Splits(train_idx, val_idx, calib_idx, test_idx)
    empty = [k for k, v in splits.sizes().items() if v == 0]
    if empty:
        raise CatalogEnrichError(
            f"{n} labelled products are too few: the {', '.join(empty)} split would be empty"
        )
    return splits
