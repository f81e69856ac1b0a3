"""Reproducible train / validation / calibration / test splits, stratified over every attribute value
(iterative stratification for multi-label data, as in paper 004), and grouped: products that share a
title or a description (a product's colour or size variants) always land in the same split.

Why grouped: variants share a name and a description. Split one by one, the calibration split holds
siblings of training products, which the model scores as if it had seen them (it has): calibrated
there, a threshold is too low for products that are new, and what it writes falls below the target.
New products in production are new groups, so every held-out split is made of whole groups."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

from catalog_enrichment.catalog.groups import MAX_GROUP, group_ids
from catalog_enrichment.config import MAX_AUTO_CALIBRATION
from catalog_enrichment.data.dataset import EncodedLabels
from catalog_enrichment.errors import CatalogEnrichError

__all__ = [
    "AUTO_CALIBRATION_PRODUCTS",
    "AUTO_CROSSFIT_BELOW",
    "MAX_GROUP",
    "MIN_ROWS",
    "FoldPlan",
    "Splits",
    "calibration_fraction",
    "crossfit_folds",
    "group_folds",
    "group_ids",
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
    level only from a few hundred writes on (``calibration.min_testable_writes``: from 234 on a
    small calibration set). A multi-class attribute writes at most one value per product, so about
    600 calibration products are the least with which a strong model's writes reach that count at
    the levels near the target. Below 4,000 products that costs training data, so the share stops
    at 30 %; above it the calibration split stays at 15 %, more than 600 products.
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


def _indicator(y: np.ndarray) -> np.ndarray:
    """``y`` as iterative stratification takes it: a one-column matrix (one attribute with one value,
    or a multi-class one labelled with its first value only) gains its complement, so the products
    without the value are spread as evenly as those with it (iterstrat refuses a single column)."""
    return np.concatenate([y, 1 - y], axis=1) if y.shape[1] == 1 else y


def _split_off(y: np.ndarray, idx: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, part) with ``part`` about ``fraction`` of it, stratified on ``y[idx]``."""
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    rest, part = next(splitter.split(np.zeros(idx.size), _indicator(y[idx])))
    return np.sort(idx[rest]), np.sort(idx[part])


def _by_group(y: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each row's group position ``(n,)``, the groups' value matrix ``(G, K)``: any member's)."""
    _, position = np.unique(groups, return_inverse=True)
    grouped = np.zeros((int(position.max(initial=-1)) + 1, y.shape[1]), y.dtype)
    np.maximum.at(grouped, position, y)
    return position, grouped


@dataclass(frozen=True)
class FoldPlan:
    """K cross-fit folds of the ``rows`` of a labelled table (``labels`` and ``groups``, the
    duplicate groups, are every product's), stratified over every attribute value, never cutting a
    group, the same for the same ``seed``."""

    rows: np.ndarray
    labels: EncodedLabels
    groups: np.ndarray
    k: int
    seed: int

    def folds(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(positions in ``rows`` to fit on, positions of the fold) per fold, made once."""
        made = self.__dict__.get("_folds")
        if made is None:
            y = self.labels.subset(self.rows).stratification_matrix()
            made = group_folds(y, self.groups[self.rows], self.k, self.seed)
            object.__setattr__(self, "_folds", made)  # frozen: a cache, not state
        return made


def group_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K folds of ``n`` rows, stratified over the ``(n, K)`` value matrix ``y`` and never cutting a
    group: (rows to fit on, rows of the fold) per fold, sorted.

    Raises:
        CatalogEnrichError: fewer groups than folds, or a fold left without a product.
    """
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    position, grouped = _by_group(y, groups)
    too_few = CatalogEnrichError(
        f"{_counted(y.shape[0], grouped.shape[0])} are too few for {k} cross-fit folds, each of whole "
        f"groups: label more distinct products or set fewer folds (training.crossfit_folds)"
    )
    if grouped.shape[0] < k:
        raise too_few
    folds = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    out = []
    for fit_groups, fold_groups in folds.split(np.zeros(grouped.shape[0]), _indicator(grouped)):
        if not fold_groups.size:
            raise too_few
        out.append(
            (np.flatnonzero(np.isin(position, fit_groups)), np.flatnonzero(np.isin(position, fold_groups)))
        )
    return out


def _counted(n: int, groups: int | None) -> str:
    """``n`` products, and the groups they form where splits keep groups whole (``None``: none)."""
    if groups is None:
        return f"{n} labelled products"
    return f"{n} labelled products in {groups} groups (variants sharing a title or a description)"


def stratified_splits(
    y: np.ndarray,
    *,
    validation: float,
    calibration: float,
    test: float,
    seed: int,
    groups: np.ndarray | None = None,
) -> Splits:
    """Split ``n`` rows by their ``(n, K)`` 0/1 value matrix ``y``; the same seed gives the same split.
    ``groups`` ``(n,)``: rows of one group always land in one split (``None``: every row alone).

    Raises:
        CatalogEnrichError: a split would be empty (too few rows or groups for the fractions).
    """
    n = y.shape[0]
    position, grouped = (np.arange(n), y) if groups is None else _by_group(y, groups)
    counted = _counted(n, None if groups is None else grouped.shape[0])
    if min(n, grouped.shape[0]) < MIN_ROWS:
        raise CatalogEnrichError(
            f"{counted} are too few to split into train/validation/calibration/test (need at least "
            f"{MIN_ROWS} {'products' if n < MIN_ROWS else 'groups'}): label more distinct products"
        )
    by_group = _split_rows(grouped, validation=validation, calibration=calibration, test=test, seed=seed)
    optional = {"validation": validation > 0, "calibration": calibration > 0, "test": test > 0}
    empty = [k for k, v in by_group.sizes().items() if v == 0 and optional.get(k, True)]
    if empty:
        raise CatalogEnrichError(f"{counted} are too few: the {', '.join(empty)} split would be empty")
    if groups is None:
        return by_group
    return Splits(*(np.flatnonzero(np.isin(position, part)) for part in dataclasses.astuple(by_group)))


def _split_rows(y: np.ndarray, *, validation: float, calibration: float, test: float, seed: int) -> Splits:
    """:func:`stratified_splits` of every row alone, unchecked."""
    n = y.shape[0]
    idx = np.arange(n)
    if test > 0:
        rest, test_idx = _split_off(y, idx, test, seed)
    else:  # evaluated on another table
        rest, test_idx = idx, np.zeros(0, np.int64)
    if calibration > 0:
        rest, calib_idx = _split_off(y, rest, calibration / (1 - test), seed + 1)
    else:  # cross-fitted calibration: out-of-fold scores of the training split instead
        calib_idx = np.zeros(0, np.int64)
    if validation > 0:
        train_idx, val_idx = _split_off(y, rest, validation / (1 - test - calibration), seed + 2)
    else:  # nothing stops early or selects on a split (the stack: chosen out of fold)
        train_idx, val_idx = rest, np.zeros(0, np.int64)
    return Splits(train_idx, val_idx, calib_idx, test_idx)


def split_labels(
    labels: EncodedLabels,
    *,
    validation: float,
    calibration: float,
    test: float,
    seed: int,
    groups: np.ndarray | None = None,
    held_groups: np.ndarray | None = None,
) -> Splits:
    """:func:`stratified_splits` of the products with a full label; products only people's verdicts
    label (partial labels: the reviewed products are no random sample, and a partial label cannot
    be scored) go to the training split, so they never calibrate, select or evaluate a model -
    except those whose group (``groups``: variants of one article) holds a validation, calibration
    or test product, or is among ``held_groups`` (a separate test table's products), which are left
    out (trained on, a variant would carry that product's answer)."""
    partial_only = labels.partial_only()
    rows = np.flatnonzero(~partial_only)
    y = labels.stratification_matrix()[rows]
    splits = stratified_splits(
        y,
        validation=validation,
        calibration=calibration,
        test=test,
        seed=seed,
        groups=None if groups is None else groups[rows],
    )
    partial = np.flatnonzero(partial_only)
    if groups is not None:
        held = np.concatenate([rows[splits.validation], rows[splits.calibration], rows[splits.test]])
        elsewhere = np.zeros(0, groups.dtype) if held_groups is None else held_groups
        partial = partial[~np.isin(groups[partial], np.concatenate([groups[held], elsewhere]))]
    return Splits(
        np.sort(np.concatenate([rows[splits.train], partial])),
        rows[splits.validation],
        rows[splits.calibration],
        rows[splits.test],
    )
