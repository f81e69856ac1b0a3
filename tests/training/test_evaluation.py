"""Scoring held-out splits: the float32 the thresholds are fitted on."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from catalog_enrichment.models.model import ModelOutput
from catalog_enrichment.training.evaluation import predict


class _Recording(nn.Module):
    """Scores each product its mean feature, and records the float32 settings its forward ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        self.seen.append(_float32_settings())
        p = batch["x"].mean(dim=1, keepdim=True)
        return ModelOutput({"colour": p}, [], torch.zeros(()), None, {})


def _float32_settings() -> tuple[str, str]:
    return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("autocast", [False, True])
def test_held_out_scores_are_computed_in_full_float32_as_the_predictor_scores(autocast: bool) -> None:
    """cuDNN's default runs float32 convolutions in TF32; the scores thresholds are fitted on run as
    the predictor's do (``full_float32``), and the process's settings are put back afterwards."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul  # type: ignore[attr-defined]
    before = _float32_settings()
    conv.fp32_precision = matmul.fp32_precision = "tf32"
    try:
        model = _Recording()
        batches = [{"x": torch.full((2, 3), float(i))} for i in range(3)]
        loader: DataLoader[Any] = DataLoader(cast(Any, batches), batch_size=None)
        preds = predict(model, loader, torch.device("cpu"), autocast=autocast)  # type: ignore[arg-type]
        np.testing.assert_array_equal(preds.probs["colour"][:, 0], [0, 0, 1, 1, 2, 2])
        assert model.seen == [("ieee", "ieee")] * 3
        assert _float32_settings() == ("tf32", "tf32")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
