"""What gets written: the model version's calibrated thresholds, the catalog's taxonomy, the merchant.

Pure NumPy on the predictor's scores. For every scored product and every attribute the merchant did
not fill: multi-class -> the top-1 value if it clears its threshold; multi-label -> every value that
clears its own. A value the model knows but the configured taxonomy no longer allows is never
written; a value without a threshold (too little calibration support) is never written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from catalog_enrichment.calibration import Calibration
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.errors import TaxonomyError
from catalog_enrichment.metrics import decision_matrix

__all__ = ["Decision", "DecisionPolicy", "merchant_attributes"]


def merchant_attributes(raw: Any) -> set[str]:
    """Attribute names a merchant filled, from an Arrow map value (list of pairs) or a dict."""
    if raw is None:
        return set()
    items = raw.items() if isinstance(raw, Mapping) else raw
    return {str(k) for k, v in items if v is not None and len(v) > 0}


@dataclass(frozen=True)
class Decision:
    """One written value."""

    attribute: str
    value: str
    confidence: float
    threshold: float


class DecisionPolicy:
    """Thresholds of one model version, restricted to what the configured taxonomy allows.

    Raises:
        TaxonomyError: the model scores an attribute the configured taxonomy lacks, or with a
            different kind (multi-label vs multi-class).
    """

    def __init__(self, model_taxonomy: Taxonomy, calibration: Calibration, allowed: Taxonomy) -> None:
        problems = []
        for attr in model_taxonomy:
            if attr.name not in allowed.names:
                problems.append(f"attribute {attr.name!r} is not in the configured taxonomy")
            elif allowed[attr.name].kind != attr.kind:
                problems.append(
                    f"attribute {attr.name!r} is {attr.kind} in the model but {allowed[attr.name].kind} "
                    "in the configured taxonomy"
                )
        if problems:
            raise TaxonomyError(
                "the model does not fit the configured taxonomy: "
                + "; ".join(problems)
                + " (retrain the model or fix taxonomy_path)"
            )
        self.taxonomy = model_taxonomy
        self.thresholds: dict[str, np.ndarray] = {}
        self.dropped: dict[str, list[str]] = {}
        for attr in model_taxonomy:
            thresholds = calibration.thresholds(attr.name).astype(np.float64).copy()
            allowed_values = set(allowed[attr.name].values)
            gone = [v for v in attr.values if v not in allowed_values]
            for v in gone:
                thresholds[attr.index(v)] = np.nan
            self.thresholds[attr.name] = thresholds
            self.dropped[attr.name] = gone

    @property
    def writable(self) -> dict[str, list[str]]:
        """Values that can be written at all (have a threshold and are allowed)."""
        return {
            a.name: [v for v, t in zip(a.values, self.thresholds[a.name], strict=True) if np.isfinite(t)]
            for a in self.taxonomy
        }

    def decide(
        self, probs: Mapping[str, np.ndarray], merchant: Sequence[set[str]], skip: np.ndarray | None = None
    ) -> tuple[list[list[Decision]], list[list[str]]]:
        """Per product: the values to write and the attributes it was scored for (not merchant-filled).

        ``skip`` marks products that are not decided at all (e.g. an unreadable image).
        """
        n = len(merchant)
        values: list[list[Decision]] = [[] for _ in range(n)]
        scored: list[list[str]] = [[] for _ in range(n)]
        skip = np.zeros(n, bool) if skip is None else np.asarray(skip, bool)
        for attr in self.taxonomy:
            scores = np.asarray(probs[attr.name], dtype=np.float64)
            filled = np.array([attr.name in m for m in merchant], dtype=bool) | skip
            thresholds = self.thresholds[attr.name]
            written = decision_matrix(scores, attr.kind, thresholds) & ~filled[:, None]
            for k in np.flatnonzero(~filled).tolist():
                scored[k].append(attr.name)
            rows, cols = np.nonzero(written)
            for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
                values[i].append(
                    Decision(attr.name, attr.values[j], float(scores[i, j]), float(thresholds[j]))
                )
        return values, scored
