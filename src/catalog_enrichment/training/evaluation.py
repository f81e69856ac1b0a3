"""What a trained model is judged and calibrated by: its scores of a split, the test report, the
thresholds from calibration scores and the run health profile from held-out scores.

:func:`predict` scores a split in order; :func:`evaluate` gives per attribute F1, R@P95 and - with a
calibration - the realized precision, coverage and coverage efficiency of what would be written,
per value with Wilson bounds; :class:`EvaluationReport` is the test report a trained version carries
(``evaluation.json``); :func:`calibrate` turns calibration-split scores into thresholds and
:func:`with_health` adds the run health profile (``health/``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from catalog_enrichment import calibration as calibration_lib
from catalog_enrichment.calibration import Calibration, calibrate_attribute, wilson_upper
from catalog_enrichment.config import CalibrationConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import EncodedLabels
from catalog_enrichment.embeddings.frozen import inputs_to
from catalog_enrichment.health import HealthProfile, InputBaseline, attribute_baseline
from catalog_enrichment.metrics import (
    attribute_r_at_p,
    coverage_efficiency,
    decision_matrix,
    f1_scores,
    truth_matrix,
    within_groups,
    written_precision_and_coverage,
)
from catalog_enrichment.models.fusion import FusionInputs
from catalog_enrichment.models.model import AnyModel, ModelOutput, full_float32

__all__ = [
    "EvaluationReport",
    "Predictions",
    "autocast_context",
    "calibrate",
    "evaluate",
    "forward",
    "mean_val_r",
    "on_served_scale",
    "predict",
    "to_device",
    "with_health",
    "written_without_bound",
]


@dataclass
class Predictions:
    """Scores of a split: attribute -> (n, V) probabilities; modality weights -> (n, 2) when available."""

    probs: dict[str, np.ndarray]
    modality_weights: dict[str, np.ndarray] | None
    branch_probs: dict[str, dict[str, np.ndarray]]


@dataclass
class EvaluationReport:
    """The test split's report of a trained version (its bundle's ``evaluation.json``).

    ``attributes``: per attribute, :func:`evaluate`'s metrics (``report[name]`` reads one);
    ``crossfit``: per attribute, how the cross-fit's fold models and the final model rank the
    validation split; ``members``: an ensemble's members alone (member -> attribute -> R@P95);
    ``modality_weights``: the mean text and image weight per attribute, for fusions that have them.
    """

    attributes: dict[str, dict[str, Any]]
    crossfit: dict[str, dict[str, float]] = field(default_factory=dict)
    members: dict[str, dict[str, float]] = field(default_factory=dict)
    modality_weights: dict[str, dict[str, float]] = field(default_factory=dict)

    def __getitem__(self, attribute: str) -> dict[str, Any]:
        return self.attributes[attribute]

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the attributes at the top level, the rest under ``_``-prefixed keys."""
        extra = {"_crossfit": self.crossfit, "_members": self.members}
        extra["_modality_weights"] = self.modality_weights
        return {**self.attributes, **{k: v for k, v in extra.items() if v}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationReport:
        return cls(
            {k: dict(v) for k, v in data.items() if not k.startswith("_")},
            dict(data.get("_crossfit") or {}),
            dict(data.get("_members") or {}),
            dict(data.get("_modality_weights") or {}),
        )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "pixel_values":  # the image encoder trains channels-last (see _fit)
            out[key] = value.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        elif isinstance(value, torch.Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, dict):
            out[key] = {k: v.to(device, non_blocking=True) for k, v in value.items()}
        elif isinstance(value, FusionInputs):
            out[key] = inputs_to(value, device)
        else:
            out[key] = value
    return out


def forward(model: AnyModel, batch: dict[str, Any]) -> ModelOutput:
    """The model on a batch of products, or only its fusion and heads on cached encoder outputs."""
    return model.fuse(batch["inputs"]) if "inputs" in batch else model(batch)


def autocast_context(device: torch.device, enabled: bool) -> Any:
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def predict(
    model: AnyModel, loader: DataLoader, device: torch.device, *, autocast: bool = False
) -> Predictions:
    """Scores of every product the loader yields, in order: in float32, as the enrichment job scores
    by default (``inference.autocast``), unless ``autocast`` (bf16 encoders on GPU: for choosing an
    epoch, never for what calibrates or is fitted into the model). Float32 stays float32 on a GPU
    (``full_float32``, the predictor's setting): cuDNN's default would run convolutions in TF32."""
    model.eval()
    probs: dict[str, list[np.ndarray]] = {}
    weights: dict[str, list[np.ndarray]] = {}
    branches: dict[str, dict[str, list[np.ndarray]]] = {}
    for batch in loader:
        with full_float32(), autocast_context(device, autocast):
            out = forward(model, to_device(batch, device))
        for a, p in out.probs.items():
            probs.setdefault(a, []).append(p.float().cpu().numpy())
        for a, w in (out.modality_weights or {}).items():
            weights.setdefault(a, []).append(w.float().cpu().numpy())
        for b, per in out.branch_probs.items():
            for a, p in per.items():
                branches.setdefault(b, {}).setdefault(a, []).append(p.float().cpu().numpy())
    return Predictions(
        {a: np.concatenate(v) for a, v in probs.items()},
        {a: np.concatenate(v) for a, v in weights.items()} or None,
        {b: {a: np.concatenate(v) for a, v in per.items()} for b, per in branches.items()},
    )


def _outputs(
    preds: Predictions, labels: EncodedLabels, taxonomy: Taxonomy
) -> tuple[dict[str, np.ndarray], EncodedLabels, Taxonomy]:
    """Scores, labels and taxonomy of every attribute a value is written for (derived ones too)."""
    return taxonomy.derive(preds.probs), labels.derive(taxonomy), taxonomy.outputs


def evaluate(
    preds: Predictions, labels: EncodedLabels, taxonomy: Taxonomy, calibration: Calibration | None = None
) -> dict[str, Any]:
    """Per attribute (derived ones too): macro/micro F1, R@P95 (pooled and per value) and, with a
    calibration, the realized precision, coverage, recall, coverage efficiency (recall written /
    R@P95) and per-value precision (with Wilson bounds) of what would be written."""
    report: dict[str, Any] = {}
    probs, labels, taxonomy = _outputs(preds, labels, taxonomy)
    decided = {} if calibration is None else _decided(probs, taxonomy, calibration)
    for attr in taxonomy:
        kind = attr.kind
        scores, y = labels.labelled(probs, attr.name)
        r = attribute_r_at_p(scores, y, kind)
        entry: dict[str, Any] = {
            **f1_scores(scores, y, kind),
            "r_at_p95": r.pooled,
            "r_at_p95_per_value": dict(
                zip(attr.values, np.nan_to_num(r.per_value, nan=0.0).tolist(), strict=True)
            ),
        }
        if calibration is not None:
            thresholds = calibration.thresholds(attr.name)
            decisions, _ = labels.labelled(decided, attr.name)
            written = written_precision_and_coverage(scores, y, kind, thresholds, decisions)
            entry.update(
                {
                    "realized_precision": written["precision"],
                    "coverage": written["coverage"],
                    "written": written["written"],
                    "written_correct": written["correct"],
                    "recall_written": written["recall"],
                    "coverage_efficiency": coverage_efficiency(written["recall"], r.pooled),
                }
            )
            entry["per_value"] = _per_value_written(decisions, y, kind, thresholds, attr.values)
        report[attr.name] = entry
    return report


def _decided(
    probs: Mapping[str, np.ndarray], outputs: Taxonomy, calibration: Calibration
) -> dict[str, np.ndarray]:
    """What the thresholds write for every product, as the job decides: a value only inside the
    group decided for the same product (:func:`~catalog_enrichment.metrics.within_groups`)."""
    return within_groups(
        {a.name: decision_matrix(probs[a.name], a.kind, calibration.thresholds(a.name)) for a in outputs},
        outputs,
    )


def written_without_bound(
    calibration_set: tuple[Predictions, EncodedLabels],
    test_set: tuple[Predictions, EncodedLabels],
    taxonomy: Taxonomy,
    target: float,
) -> dict[str, dict[str, float]]:
    """Per attribute (derived ones too): realized precision and coverage efficiency on the test set
    of one threshold read off the calibration scores without a bound - the pooled threshold where
    their own precision last reaches ``target`` (their R@P95 point). Where the calibrated
    thresholds' efficiency falls short, it tells the bound's cost (this efficiency minus theirs)
    from the test set's being unlike the calibration set (what this one misses). Meaningful only
    where the calibration scores are on the served model's scale."""
    probs, labels, outputs = _outputs(*calibration_set, taxonomy)
    test_probs, test_labels, _ = _outputs(*test_set, taxonomy)
    out = {}
    for attr in outputs:
        threshold = attribute_r_at_p(*labels.labelled(probs, attr.name), attr.kind, target=target).threshold
        scores, y = test_labels.labelled(test_probs, attr.name)
        written = written_precision_and_coverage(
            scores, y, attr.kind, np.full(len(attr.values), np.nan if threshold is None else threshold)
        )
        r = attribute_r_at_p(scores, y, attr.kind).pooled  # as evaluate's efficiency
        out[attr.name] = {
            "realized_precision": written["precision"],
            "coverage_efficiency": coverage_efficiency(written["recall"], r),
        }
    return out


def _per_value_written(
    decisions: np.ndarray, y: np.ndarray, kind: str, thresholds: np.ndarray, values: tuple[str, ...]
) -> dict[str, dict[str, float | int | None]]:
    truth, known = truth_matrix(y, decisions.shape[1], kind)  # type: ignore[arg-type]
    written = decisions & known[:, None]
    out: dict[str, dict[str, float | int | None]] = {}
    for v, value in enumerate(values):
        n = int(written[:, v].sum())
        k = int((written[:, v] & truth[:, v]).sum())
        out[value] = {
            "threshold": None if np.isnan(thresholds[v]) else float(thresholds[v]),
            "written": n,
            "correct": k,
            "precision": k / n if n else None,
            "wilson_upper": float(wilson_upper(k, n)) if n else None,
        }
    return out


def calibrate(
    preds: Predictions,
    labels: EncodedLabels,
    taxonomy: Taxonomy,
    c: CalibrationConfig,
    *,
    family: tuple[Predictions, EncodedLabels] | None = None,
    groups: np.ndarray | None = None,
) -> Calibration:
    """Thresholds for every (attribute, value) from calibration-split scores.

    ``family``: held-out scores and labels independent of the calibration split (the validation
    split) that shape the attribute scope's threshold family (see :mod:`catalog_enrichment.calibration`).
    ``groups``: the group each calibration product was split with (variants of one article), so
    the bound counts a group's writes as the independent trials they are worth.
    """
    attrs = {}
    probs, labels, outputs = _outputs(preds, labels, taxonomy)
    if family is not None:
        family_probs, family_y, _ = _outputs(*family, taxonomy)
    for attr in outputs:
        scores, y = labels.labelled(probs, attr.name)
        family_scores = family_labels = None
        if family is not None:
            family_scores, family_labels = family_y.labelled(family_probs, attr.name)
        of = None if groups is None else labels.labelled({attr.name: np.asarray(groups)}, attr.name)[0]
        attrs[attr.name] = calibrate_attribute(
            attr.name, attr.kind, attr.values, scores, y, c,
            family_scores=family_scores, family_labels=family_labels, groups=of,
        )  # fmt: skip
    return Calibration(c.target_precision, c.confidence, c.bound, c.min_support, attrs, c.scope)


def on_served_scale(
    calibration: Calibration,
    family: tuple[Predictions, EncodedLabels],
    folds: Sequence[Predictions],
    taxonomy: Taxonomy,
    *,
    provable: bool = True,
    groups: np.ndarray | None = None,
) -> Calibration:
    """Cross-fitted ``calibration`` checked on the model that serves: ``family`` holds its scores
    and the labels of the validation split, which each of ``folds`` scored too
    (:func:`catalog_enrichment.calibration.on_served_scale`; ``provable=False``: the served model
    fitted on that split; ``groups``: the group each validation product was split with)."""
    served, labels, _ = _outputs(*family, taxonomy)
    theirs = [taxonomy.derive(f.probs) for f in folds]
    attributes = {}
    for name, a in calibration.attributes.items():
        _, y = labels.labelled(served, name)
        known = labels.known[name] if labels.targets[name].ndim == 2 else None
        attributes[name] = calibration_lib.on_served_scale(
            a,
            served[name],
            [f[name] for f in theirs],
            y,
            calibration.target_precision,
            confidence=calibration.confidence,
            bound=calibration.bound,
            provable=provable,
            labelled=known,
            groups=groups,
        )
    return dataclasses.replace(calibration, attributes=attributes)


def with_health(
    calibration: Calibration,
    preds: Predictions,
    labels: EncodedLabels,
    taxonomy: Taxonomy,
    inputs: InputBaseline | None,
    groups: np.ndarray | None = None,
) -> Calibration:
    """``calibration`` with the run health checks' profile (``health/``): each attribute's
    baseline from the scores of held-out products (``preds``, ``labels``; ``groups``: the group
    each was split with) at its thresholds. They are the served model's scores of the test split,
    or of the validation split where the test products are a table of their own; with neither (a
    separate test table and no validation split, as the stack trains), the calibration set's: with
    cross-fitting, the fold models' out-of-fold scores, not the served model's."""
    attributes = {}
    probs, labels, taxonomy = _outputs(preds, labels, taxonomy)
    decided = _decided(probs, taxonomy, calibration)
    for attr in taxonomy:
        base = attribute_baseline(
            probs[attr.name],
            labels.targets[attr.name],
            attr.kind,
            calibration.thresholds(attr.name),
            labels.known.get(attr.name),
            decided[attr.name],
            groups,
        )
        if base is not None:
            attributes[attr.name] = base
    return dataclasses.replace(calibration, health=HealthProfile(attributes, inputs))


def mean_val_r(preds: Predictions, labels: EncodedLabels, taxonomy: Taxonomy) -> dict[str, float]:
    out = {}
    for attr in taxonomy:
        scores, y = labels.labelled(preds.probs, attr.name)
        out[attr.name] = attribute_r_at_p(scores, y, attr.kind).pooled
    return out
