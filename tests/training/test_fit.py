"""Fitting one model: the learning-rate schedule."""

from __future__ import annotations

import itertools

import pytest

from catalog_enrichment.training.fit import warmup_cosine

pytestmark = pytest.mark.timeout(30)


def test_warmup_then_cosine() -> None:
    factors = [warmup_cosine(s, total=100, warmup=10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.5, abs=0.02)
    assert factors[-1] < 0.01 and all(a >= b for a, b in itertools.pairwise(factors[10:]))


def test_epochs_are_selected_on_the_attributes_whose_average_precision_is_defined() -> None:
    """An attribute with no positive validation label has no average precision: the selection
    score is the others' mean, not NaN (which no epoch would ever improve on)."""
    import numpy as np

    from catalog_enrichment.contracts import Taxonomy
    from catalog_enrichment.data.dataset import EncodedLabels
    from catalog_enrichment.training.evaluation import Predictions
    from catalog_enrichment.training.fit import _validation_score

    spec = {"version": 1, "attributes": {"a": {"kind": "multiclass", "values": ["x", "y"]},
                                         "b": {"kind": "multiclass", "values": ["u", "v"]}}}  # fmt: skip
    taxonomy = Taxonomy.from_dict(spec)
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    a, b = np.array([0, 1, 0]), np.full(3, -1)
    labels = EncodedLabels({"a": a, "b": b}, {"a": a >= 0, "b": b >= 0})
    _, score = _validation_score(
        Predictions({"a": scores, "b": scores}, None, {}), labels, taxonomy, "average_precision"
    )
    assert score == 1.0  # a's, ranked perfectly
