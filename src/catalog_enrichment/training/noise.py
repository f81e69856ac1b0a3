"""Confident-learning label-noise pruning (001 §3.2.1) with cleanlab.

Out-of-fold probabilities of the training split (K fold models, each scoring the fold it did not
see) go to ``cleanlab.filter.find_label_issues``, which ranks the labels most likely wrong; the top
of that ranking, at most ``fraction`` of each attribute's labelled training products, is left out
of the final training. Only that attribute's label is dropped: the product still teaches the
others. Calibration and evaluation keep every label - a label dropped from calibration because the
model disagrees with it would make the measured precision optimistic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import EncodedLabels

__all__ = ["LabelIssues", "find_label_issues"]


@dataclass(frozen=True)
class LabelIssues:
    """Per attribute, the positions (into the scored rows) of the labels pruned, most suspect first."""

    positions: Mapping[str, np.ndarray]
    flagged: Mapping[str, int]
    labelled: Mapping[str, int]

    def prune(self, labels: EncodedLabels, rows: np.ndarray) -> EncodedLabels:
        """``labels`` (over every product) with the pruned labels unknown; ``rows`` maps the scored
        rows' positions to products."""
        targets = {a: t.copy() for a, t in labels.targets.items()}
        known = {a: k.copy() for a, k in labels.known.items()}
        for attr, pos in self.positions.items():
            known[attr][rows[pos]] = False
            if targets[attr].ndim == 1:
                targets[attr][rows[pos]] = -1
        return EncodedLabels(targets, known, labels.partial)  # people's verdicts are not pruned

    def table(
        self,
        taxonomy: Taxonomy,
        labels: EncodedLabels,
        probs: Mapping[str, np.ndarray],
        product_ids: Sequence[str | None],
    ) -> pd.DataFrame:
        """One row per pruned label: product, attribute, rank, the given label and what the
        out-of-fold model scored highest (``labels``/``probs``/``product_ids`` over the scored rows)."""
        rows = []
        for attr in taxonomy:
            t, p = labels.targets[attr.name], probs[attr.name]
            for rank, i in enumerate(self.positions.get(attr.name, []), start=1):
                given = np.flatnonzero(t[i] > 0.5) if t.ndim == 2 else [int(t[i])]
                rows.append(
                    {
                        "product_id": product_ids[i],
                        "attribute": attr.name,
                        "rank": rank,
                        "given": "|".join(attr.values[v] for v in given),
                        "given_probability": float(p[i, given].mean()),
                        "model_top": attr.values[int(p[i].argmax())],
                        "model_top_probability": float(p[i].max()),
                    }
                )
        columns = ["product_id", "attribute", "rank", "given", "given_probability", "model_top"]
        return pd.DataFrame(rows, columns=[*columns, "model_top_probability"])


def find_label_issues(
    probs: Mapping[str, np.ndarray], labels: EncodedLabels, taxonomy: Taxonomy, fraction: float
) -> LabelIssues:
    """The labels to prune from out-of-fold ``probs`` of the rows ``labels`` describes (see the
    module docstring); cleanlab's ranking is by self-confidence (the model's probability of the
    given label)."""
    from cleanlab.filter import find_label_issues as multiclass_issues
    from cleanlab.multilabel_classification.filter import find_label_issues as multilabel_issues

    positions: dict[str, np.ndarray] = {}
    flagged: dict[str, int] = {}
    labelled: dict[str, int] = {}
    for attr in taxonomy:
        t, known, p = labels.targets[attr.name], labels.known[attr.name], probs[attr.name]
        rows = np.flatnonzero(known)
        labelled[attr.name] = rows.size
        if rows.size == 0:
            positions[attr.name], flagged[attr.name] = np.zeros(0, np.int64), 0
            continue
        scores = p[rows].astype(np.float64)
        if attr.kind == "multilabel":
            given: list[list[int]] | np.ndarray = [np.flatnonzero(t[i] > 0.5).tolist() for i in rows]
        else:
            given = t[rows]
            scores /= scores.sum(axis=1, keepdims=True)  # float32 softmax rows, summed again in float64
        find = multilabel_issues if attr.kind == "multilabel" else multiclass_issues
        # n_jobs=1: cleanlab's pool forks this process, whose other threads (Spark's gateway, torch,
        # MLflow) may hold a lock at that moment; a forked worker then waits on it for ever
        ranked = find(given, scores, return_indices_ranked_by="self_confidence", n_jobs=1)
        flagged[attr.name] = len(ranked)
        positions[attr.name] = rows[np.asarray(ranked[: math.floor(fraction * rows.size)], np.int64)]
    return LabelIssues(positions, flagged, labelled)
