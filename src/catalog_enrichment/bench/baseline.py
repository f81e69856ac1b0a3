"""The simple baseline every model claim is measured against: what a user would try first.

TF-IDF of the title and description (word 1-2-grams and character 3-5-grams) beside the colour
histogram of the photo's foreground (:func:`catalog_enrichment.models.color.lab_histogram`, a part of
what the recommended model's colour statistics hold), one
scikit-learn logistic regression per attribute (one-vs-rest for a multi-label one; one distribution,
as the recommended model scores it, for a multi-label attribute every labelled product has exactly
one value of, whose groups - colour families - then sum their values' probabilities). It trains on the
same training table the contenders train on and is scored on the same test table, as a user's
script would: thresholds computed by the project's own calibration on out-of-fold scores (3 folds
of whole groups), then one model refitted on the whole table scores the test products. The refit
is more confident than the fold models whose scores proved the thresholds, so what it writes may
fall short of the target: that is the simple path's, shown as it is (the recommended model's
thresholds are checked on the predictor that serves).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from catalog_enrichment.config import AppConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import EncodedLabels, ProductRecords, encode_labels
from catalog_enrichment.data.images import ImagePolicy
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.models.color import lab_histogram
from catalog_enrichment.training.evaluation import Predictions, calibrate, evaluate
from catalog_enrichment.training.splits import group_folds, group_ids
from catalog_enrichment.types import Say

__all__ = ["BASELINE_LABEL", "run_baseline"]

BASELINE_LABEL = "baseline (tf-idf + colour histogram + logistic regression)"
_IMAGE_SIZE = 64
_FOLDS = 3


def _image_features(records: ProductRecords) -> np.ndarray:
    pixels = np.zeros((len(records), _IMAGE_SIZE, _IMAGE_SIZE, 3), np.uint8)
    present = np.zeros(len(records), np.float32)
    for i in range(len(records)):
        decoded, _ = records.pixels(i, ImagePreprocessing(size=_IMAGE_SIZE))
        if decoded is not None:
            pixels[i], present[i] = decoded, 1.0
    feats = lab_histogram(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    return feats * present[:, None]


def _features(train: ProductRecords, others: list[ProductRecords]) -> list[Any]:
    from scipy import sparse
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_union

    def texts(r: ProductRecords) -> list[str]:
        return [f"{t} . {d or ''}" for t, d in zip(r.title, r.description, strict=True)]

    text = make_union(
        TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=2, sublinear_tf=True),
    )
    text.fit(texts(train))
    return [
        sparse.hstack([text.transform(texts(r)), sparse.csr_matrix(_image_features(r))]).tocsr()
        for r in [train, *others]
    ]


def _fit_predict(
    x_fit: Any, labels: EncodedLabels, attribute: str, n_values: int, x_score: Any, single: bool = False
) -> np.ndarray:
    """``(n, n_values)`` scores of ``x_score`` by logistic regressions fitted on ``x_fit``'s labels
    (``single``: a multi-label attribute with one value a product, fitted as one distribution); a
    value or an attribute the labels cannot tell apart (one class, or none) scores its labelled
    share everywhere."""
    from sklearn.linear_model import LogisticRegression

    t = labels.targets[attribute]
    out = np.zeros((x_score.shape[0], n_values), np.float64)
    if t.ndim == 2 and single:
        rows = np.flatnonzero(labels.known[attribute])
        t = np.full(len(t), -1, np.int64)
        t[rows] = labels.targets[attribute][rows].argmax(axis=1)
    elif t.ndim == 2:  # multi-label: one binary model per value
        rows = np.flatnonzero(labels.known[attribute])
        for v in range(n_values):
            y = t[rows, v] > 0.5
            if y.all() or not y.any():
                out[:, v] = float(y.mean()) if y.size else 0.0
                continue
            model = LogisticRegression(C=4.0, max_iter=2000).fit(x_fit[rows], y)
            out[:, v] = model.predict_proba(x_score)[:, 1]
        return out
    rows = np.flatnonzero(t >= 0)
    counts = np.bincount(t[rows], minlength=n_values)
    if np.count_nonzero(counts) < 2:  # nothing to tell apart: the labels' shares (zeros: no label)
        out[:] = counts / max(len(rows), 1)
        return out
    model = LogisticRegression(C=4.0, max_iter=2000).fit(x_fit[rows], t[rows])
    out[:, model.classes_] = model.predict_proba(x_score)
    return out


def _single_valued(labels: EncodedLabels, taxonomy: Taxonomy) -> list[str]:
    """The multi-label attributes every labelled product of the table has exactly one value of."""
    from catalog_enrichment.training.stack import single_valued

    return [a.name for a in taxonomy if a.kind == "multilabel" and single_valued(labels, a.name)]


def run_baseline(
    table: pa.Table,
    test_table: pa.Table,
    taxonomy: Taxonomy,
    cfg: AppConfig,
    *,
    say: Say = lambda _m: None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The baseline trained on ``table`` and tested on ``test_table``: :func:`evaluate`'s report, with
    thresholds calibrated by ``cfg.calibration`` on out-of-fold scores of ``table``, and its scores
    of ``test_table``'s rows (attribute -> ``(n, V)``, derived attributes included)."""
    policy = ImagePolicy.from_config(cfg.images)
    records = ProductRecords.from_arrow(table, policy)
    test_records = ProductRecords.from_arrow(test_table, policy)
    labels, test_labels = encode_labels(table, taxonomy), encode_labels(test_table, taxonomy)
    taxonomy = taxonomy.with_single_valued(single := _single_valued(labels, taxonomy))
    say(f"baseline: features of {len(records):,} + {len(test_records):,} products")
    x, x_test = _features(records, [test_records])
    groups = group_ids(records.title, records.description)
    folds = group_folds(labels.stratification_matrix(), groups, _FOLDS, 0)
    oof: dict[str, np.ndarray] = {}
    test: dict[str, np.ndarray] = {}
    for attr in taxonomy:
        say(f"baseline: {attr.name}")
        n_values = len(attr.values)
        oof[attr.name] = np.zeros((len(records), n_values))
        for fit_rows, fold_rows in folds:
            fold_scores = _fit_predict(
                x[fit_rows], labels.subset(fit_rows), attr.name, n_values, x[fold_rows], attr.name in single
            )
            oof[attr.name][fold_rows] = fold_scores
        test[attr.name] = _fit_predict(x, labels, attr.name, n_values, x_test, attr.name in single)
    calibration = calibrate(Predictions(oof, None, {}), labels, taxonomy, cfg.calibration, groups=groups)
    report = evaluate(Predictions(test, None, {}), test_labels, taxonomy, calibration)
    return report, taxonomy.derive(test)
