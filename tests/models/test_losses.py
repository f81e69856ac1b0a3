"""The training loss with hand-computed answers: multi-label BCE summed over values, multi-class CE,
unlabelled products skipped, people's partial verdicts."""

from __future__ import annotations

import math

import pytest
import torch

from catalog_enrichment.models.losses import attribute_loss

pytestmark = pytest.mark.timeout(30)

KINDS = {"color": "multilabel", "type": "multiclass"}


def _bce(logit: float, target: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_each_attribute_averages_over_its_labelled_products_and_attributes_count_alike() -> None:
    logits = {
        "color": torch.tensor([[2.0, -1.0], [0.5, 0.0]]),
        "type": torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]]),
    }
    targets = {"color": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "type": torch.tensor([0, -1])}
    known = {"color": torch.tensor([True, True]), "type": torch.tensor([True, False])}
    color = (_bce(2.0, 1) + _bce(-1.0, 0) + _bce(0.5, 0) + _bce(0.0, 1)) / 2  # summed over values
    kind = -math.log(math.e / (math.e + 2))  # product 1 has no type label: skipped
    assert attribute_loss(logits, targets, known, KINDS).item() == pytest.approx((color + kind) / 2, rel=1e-6)
    nobody = {"color": torch.tensor([False, False]), "type": torch.tensor([False, False])}
    assert attribute_loss(logits, targets, nobody, KINDS).item() == 0.0


def test_a_rejected_value_costs_log_one_minus_its_probability_and_a_confirmed_one_its_ce() -> None:
    logits = {"type": torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])}
    targets = {"type": torch.tensor([-1, -1])}
    known = {"type": torch.tensor([False, False])}
    partial = {"type": torch.tensor([[-1, 0, 0], [0, 1, 0]], dtype=torch.int8)}
    p0 = math.e / (math.e + 2)
    want = (-math.log(1 - p0) + -math.log(1 / 3)) / 2
    got = attribute_loss(logits, targets, known, {"type": "multiclass"}, partial)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # multi-label: BCE on the judged values only
    ml = attribute_loss(
        {"color": torch.tensor([[2.0, -1.0]])},
        {"color": torch.zeros((1, 2))},
        {"color": torch.tensor([False])},
        {"color": "multilabel"},
        {"color": torch.tensor([[0, -1]], dtype=torch.int8)},
    )
    assert ml.item() == pytest.approx(_bce(-1.0, 0), rel=1e-6)
