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
