"""The per-batch predictor: pandas in, scores out. No Spark here; the Spark job wraps it.

Load once, predict many: construction takes a loaded :class:`ModelBundle` and a device chosen by the
caller; each call scores a pandas batch under ``torch.inference_mode()``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from catalog_enrichment.data.dataset import Collator, ProductDataset, ProductRecords
from catalog_enrichment.errors import ContractError
from catalog_enrichment.inference.bundle import ModelBundle
from catalog_enrichment.training.loop import predict

__all__ = ["BatchPredictor", "score_columns"]

INPUT_COLUMNS = ("product_id", "title", "description", "image")


def score_columns(bundle: ModelBundle) -> list[str]:
    """Output column names, ``<attribute>=<value>``, in taxonomy order."""
    return [f"{a.name}={v}" for a in bundle.taxonomy for v in a.values]


class BatchPredictor:
    """Scores pandas batches of products with one loaded model."""

    def __init__(
        self, bundle: ModelBundle, *, device: torch.device | str = "cpu", batch_size: int = 128
    ) -> None:
        self.bundle = bundle
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.collator = Collator(bundle.tokenizer, bundle.model_config.text.max_length)
        self.bundle.model.to(self.device).eval()

    def score(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """Attribute -> ``(len(frame), n_values)`` probabilities."""
        missing = [c for c in ("title",) if c not in frame.columns]
        if missing:
            raise ContractError(f"input batch lacks columns {missing}; expected {list(INPUT_COLUMNS)}")
        records = ProductRecords(
            product_id=[p if isinstance(p, str) else None for p in _column(frame, "product_id")],
            title=[t if isinstance(t, str) else "" for t in frame["title"].tolist()],
            description=[d if isinstance(d, str) else None for d in _column(frame, "description")],
            image=[
                bytes(b) if isinstance(b, bytes | bytearray | memoryview) else None
                for b in _column(frame, "image")
            ],
            image_uri=[u if isinstance(u, str) else None for u in _column(frame, "image_uri")],
        )
        dataset = ProductDataset(
            records, np.arange(len(records)), image_size=self.bundle.model_config.image.image_size
        )
        loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=self.collator)
        if len(records) == 0:
            return {a.name: np.zeros((0, len(a.values)), np.float32) for a in self.bundle.taxonomy}
        return predict(self.bundle.model, loader, self.device).probs

    def score_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Scores as a DataFrame with one ``<attribute>=<value>`` column per value."""
        scores = self.score(frame)
        blocks = [scores[a.name] for a in self.bundle.taxonomy]
        data = np.concatenate(blocks, axis=1) if blocks else np.zeros((len(frame), 0))
        return pd.DataFrame(data.astype(np.float64), columns=score_columns(self.bundle), index=frame.index)


def _column(frame: pd.DataFrame, name: str) -> list[object]:
    return frame[name].tolist() if name in frame.columns else [None] * len(frame)
