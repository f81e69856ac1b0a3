"""Pictures logged with a training run: precision-recall curves with the chosen thresholds, and a
reliability diagram, one PNG per attribute (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from catalog_enrichment.calibration import AttributeCalibration
from catalog_enrichment.metrics import precision_recall_curve_desc, truth_matrix

__all__ = ["plot_precision_recall", "plot_reliability"]


def _candidates(
    scores: np.ndarray, truth: np.ndarray, kind: str, v: int
) -> tuple[np.ndarray, np.ndarray, int]:
    if kind == "multilabel":
        return scores[:, v], truth[:, v], int(truth[:, v].sum())
    top = scores.argmax(axis=1)
    sel = top == v
    return scores[sel, v], truth[sel, v], int(truth[:, v].sum())


def plot_precision_recall(
    scores: np.ndarray, labels: np.ndarray, calibration: AttributeCalibration, out: Path, *, target: float
) -> Path:
    """One PR curve per value (test split) with a dot at the calibrated threshold."""
    kind, values = calibration.kind, [v.value for v in calibration.values]
    truth, _ = truth_matrix(labels, len(values), kind)
    fig, ax = plt.subplots(figsize=(7, 5))
    for v, spec in enumerate(calibration.values):
        s, c, support = _candidates(scores, truth, kind, v)
        if support == 0 or s.size == 0:
            continue
        thr, n_pred, n_corr, recall = precision_recall_curve_desc(s, c, n_positive=support)
        (line,) = ax.plot(recall, n_corr / n_pred, lw=1, label=spec.value)
        if spec.threshold is not None:
            i = min(int(np.searchsorted(-thr, -spec.threshold, side="right")) - 1, thr.size - 1)
            if i >= 0:
                ax.plot(recall[i], n_corr[i] / n_pred[i], "o", color=line.get_color())
    ax.axhline(target, color="k", ls="--", lw=0.8)
    ax.set(
        xlabel="recall",
        ylabel="precision",
        ylim=(0, 1.02),
        xlim=(0, 1),
        title=f"{calibration.attribute}: precision-recall (test), dots = calibrated thresholds",
    )
    ax.legend(fontsize=6, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def plot_reliability(scores: np.ndarray, labels: np.ndarray, kind: str, attribute: str, out: Path) -> Path:
    """Mean predicted score vs observed frequency in 10 bins (all values pooled; top-1 for multi-class)."""
    truth, _ = truth_matrix(labels, scores.shape[1], kind)  # type: ignore[arg-type]
    if kind == "multilabel":
        s, c = scores.ravel(), truth.ravel()
    else:
        top = scores.argmax(axis=1)
        s, c = scores[np.arange(len(top)), top], truth[np.arange(len(top)), top]
    bins = np.minimum((s * 10).astype(int), 9)
    xs, ys, ns = [], [], []
    for b in range(10):
        sel = bins == b
        if sel.any():
            xs.append(s[sel].mean())
            ys.append(c[sel].mean())
            ns.append(int(sel.sum()))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.plot(xs, ys, "o-")
    for x, y, n in zip(xs, ys, ns, strict=True):
        ax.annotate(str(n), (x, y), fontsize=6, textcoords="offset points", xytext=(3, -8))
    ax.set(
        xlabel="mean score",
        ylabel="observed frequency",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"{attribute}: reliability (test)",
    )
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
