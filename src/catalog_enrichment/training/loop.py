"""Train, calibrate and evaluate a multimodal attribute model on a labelled products table.

``train_and_calibrate`` is the library entry point (no Spark, no MLflow): it leaves out products
whose image cannot be used (serving quarantines those), splits the data, takes the pretrained text
model's own tokenizer or trains a WordPiece one on the training texts, optionally prunes suspected
label errors (``training.noise_pruning``, 001), trains the model - or each ensemble member - with
AdamW and a linear warm-up + cosine schedule (early stopping on validation R@P95 or average
precision; pretrained encoder weights at their own, lower learning rate; ``training.encoders``
trains them all, only their top layers, or none over cached embeddings), fits what a fusion picks on
held-out data (late: alpha; decision: the cross-validated decision nets), calibrates thresholds on
out-of-fold scores of fold models over the training split (``training.crossfit_folds``; the default
below 10,000 products) or on a held-out calibration split — the validation split shapes the
attribute scope's threshold family — and reports metrics on the test split. Rows are put in a
canonical order first, so the same data, seed, config and torch thread count train the same weights
in any process. The caller picks the device.
"""

from __future__ import annotations

import dataclasses
import math
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from catalog_enrichment.calibration import Calibration, calibrate_attribute, wilson_upper
from catalog_enrichment.config import AppConfig, ModelConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import (
    Collator,
    EncodedLabels,
    ProductDataset,
    ProductRecords,
    build_tokenizer,
    canonical_order,
    encode_labels,
)
from catalog_enrichment.data.images import ImagePolicy, image_tone
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.errors import CatalogEnrichError, ConfigError
from catalog_enrichment.health import HealthProfile, InputBaseline, attribute_baseline, input_baseline
from catalog_enrichment.inference.bundle import ModelBundle, json_safe
from catalog_enrichment.metrics import (
    attribute_average_precision,
    attribute_r_at_p,
    coverage_efficiency,
    f1_scores,
    written_precision_and_coverage,
)
from catalog_enrichment.models import runtime
from catalog_enrichment.models.encoders import ImageEncoder
from catalog_enrichment.models.fusion import FusionInputs, fusion_class
from catalog_enrichment.models.losses import attribute_loss
from catalog_enrichment.models.model import (
    AnyModel,
    EnsembleModel,
    ModelOutput,
    MultimodalModel,
    build_model,
    needs_image,
)
from catalog_enrichment.training.embeddings import (
    EmbeddedDataset,
    Embeddings,
    default_cache_dir,
    deterministic_algorithms,
    embed_products,
    inputs_to,
)
from catalog_enrichment.training.splits import (
    Splits,
    calibration_fraction,
    crossfit_folds,
    group_folds,
    group_ids,
    split_labels,
)
from catalog_enrichment.types import Say

__all__ = [
    "EpochMetrics",
    "Predictions",
    "TrainedModel",
    "evaluate",
    "predict",
    "train_and_calibrate",
    "warmup_cosine",
]


def warmup_cosine(step: int, *, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0 (004)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch: mean training loss and validation R@P95 (pooled per attribute, then averaged)."""

    epoch: int
    train_loss: float
    val_r_at_p95: dict[str, float]
    val_mean_r_at_p95: float
    seconds: float
    learning_rate: float


@dataclass
class Predictions:
    """Scores of a split: attribute -> (n, V) probabilities; modality weights -> (n, 2) when available."""

    probs: dict[str, np.ndarray]
    modality_weights: dict[str, np.ndarray] | None
    branch_probs: dict[str, dict[str, np.ndarray]]


@dataclass
class TrainedModel:
    """Everything a trained version consists of (packaged by registry.py in a later step)."""

    model: AnyModel
    tokenizer: Any
    taxonomy: Taxonomy
    config: AppConfig
    calibration: Calibration
    history: list[EpochMetrics]
    best_epoch: int
    splits: Splits
    test_report: dict[str, Any]
    heldout_fit: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    test_predictions: Predictions | None = None
    test_labels: EncodedLabels | None = None
    calibration_set: tuple[Predictions, EncodedLabels] | None = None
    family_set: tuple[Predictions, EncodedLabels] | None = None
    label_issues: pd.DataFrame | None = None
    product_ids: list[str | None] = field(default_factory=list)
    health_set: tuple[Predictions, EncodedLabels] | None = None  # what the run health baselines come from

    def bundle(self) -> ModelBundle:
        """The trained model as a loaded bundle (what serving holds), without writing it."""
        return ModelBundle(
            self.model,
            self.tokenizer,
            self.taxonomy,
            self.calibration,
            self.config.model,
            json_safe(self.test_report),
        )

    def recalibrate(self, cfg: AppConfig) -> tuple[Calibration, dict[str, Any]]:
        """Thresholds under other calibration settings (e.g. the other scope) from the stored
        held-out scores, and the test report they give; the model is not touched."""
        assert self.calibration_set is not None and self.test_predictions is not None
        assert self.test_labels is not None and self.health_set is not None
        calibration = calibrate(*self.calibration_set, self.taxonomy, cfg, family=self.family_set)
        inputs = None if self.calibration.health is None else self.calibration.health.inputs
        calibration = with_health(calibration, *self.health_set, self.taxonomy, inputs)
        return calibration, evaluate(self.test_predictions, self.test_labels, self.taxonomy, calibration)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
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


def _forward(model: AnyModel, batch: dict[str, Any]) -> ModelOutput:
    """The model on a batch of products, or only its fusion and heads on cached encoder outputs."""
    return model.fuse(batch["inputs"]) if "inputs" in batch else model(batch)


def _autocast(device: torch.device, enabled: bool) -> Any:
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.inference_mode()
def predict(
    model: AnyModel, loader: DataLoader, device: torch.device, *, autocast: bool = True
) -> Predictions:
    """Scores of every product the loader yields, in order."""
    model.eval()
    probs: dict[str, list[np.ndarray]] = {}
    weights: dict[str, list[np.ndarray]] = {}
    branches: dict[str, dict[str, list[np.ndarray]]] = {}
    for batch in loader:
        with _autocast(device, autocast):
            out = _forward(model, _to_device(batch, device))
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


def evaluate(
    preds: Predictions, labels: EncodedLabels, taxonomy: Taxonomy, calibration: Calibration | None = None
) -> dict[str, Any]:
    """Per attribute: macro/micro F1, R@P95 (pooled and per value) and, with a calibration, the
    realized precision, coverage, recall, coverage efficiency (recall written / R@P95) and per-value
    precision (with Wilson bounds) of what would be written."""
    report: dict[str, Any] = {}
    for attr in taxonomy:
        kind = attr.kind
        scores, y = labels.labelled(preds.probs, attr.name)
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
            written = written_precision_and_coverage(scores, y, kind, thresholds)
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
            entry["per_value"] = _per_value_written(scores, y, kind, thresholds, attr.values)
        report[attr.name] = entry
    return report


def _per_value_written(
    scores: np.ndarray, y: np.ndarray, kind: str, thresholds: np.ndarray, values: tuple[str, ...]
) -> dict[str, dict[str, float | int | None]]:
    from catalog_enrichment.metrics import decision_matrix, truth_matrix

    truth, known = truth_matrix(y, scores.shape[1], kind)  # type: ignore[arg-type]
    written = decision_matrix(scores, kind, thresholds) & known[:, None]  # type: ignore[arg-type]
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
    cfg: AppConfig,
    *,
    family: tuple[Predictions, EncodedLabels] | None = None,
) -> Calibration:
    """Thresholds for every (attribute, value) from calibration-split scores.

    ``family``: held-out scores and labels independent of the calibration split (the validation
    split) that shape the attribute scope's threshold family (see :mod:`catalog_enrichment.calibration`).
    """
    c = cfg.calibration
    attrs = {}
    for attr in taxonomy:
        scores, y = labels.labelled(preds.probs, attr.name)
        family_scores = family_labels = None
        if family is not None:
            family_scores, family_labels = family[1].labelled(family[0].probs, attr.name)
        attrs[attr.name] = calibrate_attribute(
            attr.name,
            attr.kind,
            attr.values,
            scores,
            y,
            scope=c.scope,
            family_scores=family_scores,
            family_labels=family_labels,
            target=c.target_precision,
            confidence=c.confidence,
            bound=c.bound,
            min_support=c.min_support,
            value_floor=c.value_floor,
            shrinkage=c.shrinkage,
        )
    return Calibration(c.target_precision, c.confidence, c.bound, c.min_support, attrs, c.scope)


def with_health(
    calibration: Calibration,
    preds: Predictions,
    labels: EncodedLabels,
    taxonomy: Taxonomy,
    inputs: InputBaseline | None,
) -> Calibration:
    """``calibration`` with the run health checks' profile (``health.py``): each attribute's
    baseline from the scores of the model that serves on held-out products (``preds``, ``labels``;
    not the calibration set, which with cross-fitting the fold models scored), at its thresholds."""
    attributes = {}
    for attr in taxonomy:
        base = attribute_baseline(
            preds.probs[attr.name],
            labels.targets[attr.name],
            attr.kind,
            calibration.thresholds(attr.name),
            labels.known.get(attr.name),
        )
        if base is not None:
            attributes[attr.name] = base
    return dataclasses.replace(calibration, health=HealthProfile(attributes, inputs))


def _loader(
    dataset: ProductDataset | EmbeddedDataset,
    collator: Collator,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        drop_last=shuffle and len(dataset) > batch_size,  # no 1-row training batch (BatchNorm)
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=dataset.collate if isinstance(dataset, EmbeddedDataset) else collator,
        generator=generator,
        num_workers=0,
    )


# pretrained encoder weights train at this rate unless training.encoder_learning_rate says otherwise
PRETRAINED_ENCODER_LR = 3e-5


def _layer_of(name: str) -> int | None:
    """The index of the repeated layer/block a parameter belongs to (``encoder.layer.3.…`` -> 3)."""
    import re

    found = re.findall(r"(?:^|\.)(?:layer|layers|blocks|stages)\.(\d+)\.", name)
    return int(found[-1]) if found else None


def _encoder_trainable(encoder: torch.nn.Module, mode: str, top_n: int) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` on an encoder's parameters for the training mode; return the trained ones.

    ``last_n`` trains the top ``top_n`` repeated layers (transformer layers, timm blocks/stages) and
    everything above them (final norms, poolers); embeddings and the lower layers stay fixed.
    """
    named = list(encoder.named_parameters())
    if mode == "finetune":
        keep = [True] * len(named)
    elif mode == "frozen":
        keep = [False] * len(named)
    else:
        layers = [_layer_of(n) for n, _ in named]
        deepest = max((i for i in layers if i is not None), default=-1)
        first_trained = deepest - top_n + 1
        seen_top = False
        keep = []
        for layer in layers:
            if layer is not None:
                seen_top = seen_top or layer >= first_trained
                keep.append(layer >= first_trained)
            else:
                keep.append(seen_top)  # after the trained layers: heads, final norms
    for (_, p), k in zip(named, keep, strict=True):
        p.requires_grad_(k)
    return [p for (_, p), k in zip(named, keep, strict=True) if k]


def _param_groups(model: MultimodalModel, cfg: AppConfig) -> list[dict[str, Any]]:
    """AdamW groups: fusion and heads at ``learning_rate``; each encoder at its own rate (pretrained
    weights lower, 004 §6.3), with only the layers ``training.encoders`` trains."""
    tcfg = cfg.training
    encoders: list[tuple[torch.nn.Module, bool]] = [
        (e, bool(cfg.model.text.pretrained_path)) for e in model.text_encoders
    ]
    if model.image_encoder is not None:
        encoders.append((model.image_encoder, bool(cfg.model.image.pretrained_path)))
    groups: list[dict[str, Any]] = []
    encoder_ids: set[int] = set()
    for encoder, pretrained in encoders:
        encoder_ids.update(id(p) for p in encoder.parameters())
        params = _encoder_trainable(encoder, tcfg.encoders, tcfg.unfreeze_layers)
        lr = tcfg.encoder_learning_rate or (PRETRAINED_ENCODER_LR if pretrained else tcfg.learning_rate)
        if params:
            groups.append({"params": params, "lr": lr})
    head = [p for p in model.parameters() if id(p) not in encoder_ids]
    return [{"params": head, "lr": tcfg.learning_rate}, *groups]


def _train_mode(model: MultimodalModel) -> None:
    """Training mode, except for modules with no trained weight (a fixed encoder layer's BatchNorm
    keeps its statistics, its dropout stays off)."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def _mean_val_r(preds: Predictions, labels: EncodedLabels, taxonomy: Taxonomy) -> dict[str, float]:
    out = {}
    for attr in taxonomy:
        scores, y = labels.labelled(preds.probs, attr.name)
        out[attr.name] = attribute_r_at_p(scores, y, attr.kind).pooled
    return out


@dataclass(frozen=True)
class _Fit:
    history: list[EpochMetrics]
    best_epoch: int
    heldout: dict[str, Any]


def _fit(
    model: MultimodalModel,
    train_loader: DataLoader,
    val_loader: DataLoader,
    val_labels: EncodedLabels,
    taxonomy: Taxonomy,
    cfg: AppConfig,
    device: torch.device,
    say: Say,
    tag: str,
) -> _Fit:
    """Train ``model`` in place: AdamW, warm-up + cosine, early stopping on the validation metric, the
    best epoch's weights kept; then the fusion's held-out fit on the validation split."""
    tcfg = cfg.training
    kinds = {a.name: a.kind for a in taxonomy}
    if model.image_encoder is not None:  # convolutions train faster channels-last (oneDNN)
        model.image_encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), weight_decay=tcfg.weight_decay)
    total_steps = tcfg.epochs * len(train_loader)
    warmup = int(tcfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total=total_steps, warmup=warmup)
    )
    use_amp = device.type == "cuda"
    history: list[EpochMetrics] = []
    best_score, best_epoch, best_state = -1.0, 0, None
    stale = 0
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    for epoch in range(1, tcfg.epochs + 1):
        _train_mode(model)
        epoch_start = time.perf_counter()
        losses = []
        steps = tqdm(
            train_loader, desc=f"{tag}epoch {epoch}/{tcfg.epochs}", unit="step", leave=False, disable=None
        )
        for batch in steps:
            batch = _to_device(batch, device)
            with _autocast(device, use_amp):
                out = _forward(model, batch)
                loss = sum(
                    attribute_loss(lg, batch["targets"], batch["known"], kinds, batch.get("partial"))
                    for lg in out.train_logits
                )
                loss = loss + out.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, tcfg.grad_clip_norm)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        val_preds = predict(model, val_loader, device)
        val_r = _mean_val_r(val_preds, val_labels, taxonomy)
        mean_r = float(np.mean(list(val_r.values())))
        selection, selected = mean_r, ""
        if tcfg.selection_metric == "average_precision":
            selection = float(
                np.mean(
                    [
                        attribute_average_precision(*val_labels.labelled(val_preds.probs, a.name), a.kind)
                        for a in taxonomy
                    ]
                )
            )
            selected = f"  val AP {selection:.3f}"
        history.append(
            EpochMetrics(
                epoch,
                float(np.mean(losses)),
                val_r,
                mean_r,
                time.perf_counter() - epoch_start,
                float(scheduler.get_last_lr()[0]),
            )
        )
        say(
            f"{tag}epoch {epoch}/{tcfg.epochs}  loss {np.mean(losses):.4f}{selected}  "
            f"val R@P95 {mean_r:.3f}  "
            + " ".join(f"{a}={r:.3f}" for a, r in val_r.items())
            + f"  ({history[-1].seconds:.0f}s)"
        )
        if selection > best_score + 1e-6:
            best_score, best_epoch, stale = selection, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if tcfg.early_stopping_patience and stale >= tcfg.early_stopping_patience:
                say(
                    f"{tag}early stopping: no validation gain ({tcfg.selection_metric}) for {stale} epochs "
                    f"(best epoch {best_epoch})"
                )
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    heldout: dict[str, Any] = {}
    if model.fusion.fits_on_heldout:
        vp = predict(model, val_loader, device)
        heldout = model.fusion.fit_heldout(
            {b: {a: torch.from_numpy(p) for a, p in per.items()} for b, per in vp.branch_probs.items()},
            {a: torch.from_numpy(t) for a, t in val_labels.targets.items()},
            {a: torch.from_numpy(k) for a, k in val_labels.known.items()},
        )
        say(f"{tag}held-out fit: {heldout}")
    return _Fit(history, best_epoch, heldout)


# trains fresh models (one, or an ensemble's members) on the given rows with a seed and a log tag
FitFn = Callable[[np.ndarray, int, str], tuple[AnyModel, list[_Fit]]]


def _crossfit(
    train_idx: np.ndarray,
    labels: EncodedLabels,
    groups: np.ndarray,
    k: int,
    seed: int,
    fit: FitFn,
    scoring: Callable[[np.ndarray], DataLoader],
    device: torch.device,
    say: Say,
    *,
    tag: str = "cross-fit",
    also: np.ndarray | None = None,
) -> tuple[Predictions, EncodedLabels, Predictions | None]:
    """Out-of-fold scores over the training split: K fold models, each trained on the other folds
    (stratified over every attribute value, whole ``groups``) and scoring its own; returned in
    ``train_idx`` order. ``also``: rows no fold model trains on, scored by every fold model (their
    mean is returned)."""
    train_labels = labels.subset(train_idx)
    folds = group_folds(train_labels.stratification_matrix(), groups[train_idx], k, seed)
    probs: dict[str, np.ndarray] = {}
    extra: dict[str, np.ndarray] = {}
    for f, (fit_pos, out_pos) in enumerate(folds):
        say(f"{tag}: fold {f + 1}/{k} ({fit_pos.size:,} products to train, {out_pos.size:,} to score)")
        model, _ = fit(train_idx[fit_pos], seed + 1 + f, f"  fold {f + 1}: ")
        for attr, p in predict(model, scoring(train_idx[out_pos]), device).probs.items():
            probs.setdefault(attr, np.zeros((train_idx.size, p.shape[1]), np.float32))[out_pos] = p
        if also is not None:
            for attr, p in predict(model, scoring(also), device).probs.items():
                extra[attr] = extra.get(attr, 0) + p / k
    return Predictions(probs, None, {}), train_labels, None if also is None else Predictions(extra, None, {})


# fold models this much weaker (validation average precision) than the final model get a warning
FOLD_GAP_WARNING = 0.05


def _fold_gap(
    folds: Predictions, final: Predictions, labels: EncodedLabels, taxonomy: Taxonomy, say: Say
) -> dict[str, dict[str, float]]:
    """How well the cross-fit's fold models (their mean) and the final model rank the validation
    split, per attribute: cross-fitting assumes the final model is at least as good as the fold
    models whose out-of-fold scores calibrate it; weaker fold models make the thresholds too strict."""
    out = {}
    for attr in taxonomy:
        fold_ap = attribute_average_precision(*labels.labelled(folds.probs, attr.name), attr.kind)
        final_ap = attribute_average_precision(*labels.labelled(final.probs, attr.name), attr.kind)
        out[attr.name] = {"fold_models_val_ap": fold_ap, "final_model_val_ap": final_ap}
        if fold_ap < final_ap - FOLD_GAP_WARNING:
            say(
                f"warning: {attr.name}: the cross-fit's fold models rank the validation split worse than "
                f"the final model (average precision {fold_ap:.3f} against {final_ap:.3f}); thresholds "
                "calibrated on their scores may write less than the final model could "
                "(training.crossfit_folds: 0 calibrates on a held-out split the final model scores)"
            )
    return out


def _prune_noisy_labels(
    splits: Splits,
    labels: EncodedLabels,
    groups: np.ndarray,
    taxonomy: Taxonomy,
    cfg: AppConfig,
    fit: FitFn,
    scoring: Callable[[np.ndarray], DataLoader],
    device: torch.device,
    say: Say,
    product_ids: list[str | None],
) -> tuple[EncodedLabels, EncodedLabels, pd.DataFrame]:
    """001 §3.2.1: out-of-fold scores of the training split by K fold models, cleanlab's label
    issues, the top ``fraction`` of each attribute's labels left out (see ``training/noise.py``).
    The validation labels that pick the best epoch and fit the held-out parts are pruned alike (the
    fold models' mean scores them). Returns the labels to train on (over every product), the
    validation labels to select on, and the table of the training labels left out."""
    from catalog_enrichment.training.noise import find_label_issues

    pcfg = cfg.training.noise_pruning
    say(f"noise pruning: out-of-fold scores by {pcfg.folds} fold models")
    oof, train_labels, val_scores = _crossfit(
        splits.train,
        labels,
        groups,
        pcfg.folds,
        cfg.training.seed + 1000,
        fit,
        scoring,
        device,
        say,
        tag="noise pruning",
        also=splits.validation,
    )
    assert val_scores is not None
    issues = find_label_issues(oof.probs, train_labels, taxonomy, pcfg.fraction)
    val_labels = labels.subset(splits.validation)
    val_issues = find_label_issues(val_scores.probs, val_labels, taxonomy, pcfg.fraction)
    say(
        "noise pruning: "
        + ", ".join(
            f"{a} {issues.positions[a].size:,} of {issues.labelled[a]:,} labels left out "
            f"({issues.flagged[a]:,} flagged; validation {val_issues.positions[a].size:,})"
            for a in issues.positions
        )
    )
    table = issues.table(taxonomy, train_labels, oof.probs, [product_ids[i] for i in splits.train])
    pruned_val = val_issues.prune(val_labels, np.arange(splits.validation.size))
    return issues.prune(labels, splits.train), pruned_val, table


def _usable_images(table: pa.Table, policy: ImagePolicy, say: Say) -> tuple[pa.Table, InputBaseline]:
    """The rows whose image is usable or absent (serving quarantines a product whose image exists
    but cannot be read or decoded, so training leaves it out too, counted in the log), and the run
    health checks' input baseline over every row."""
    records = ProductRecords.from_arrow(table, policy)
    prep = ImagePreprocessing(size=32)  # usable or not (and the colour balance) hardly depend on the size
    pixels = [records.pixels(i, prep) for i in range(len(records))]
    errors = [e for _, e in pixels]
    tones = [None if p is None else image_tone(p) for p, _ in pixels]
    inputs = _input_baseline(table, errors, tones)
    bad = [e for e in errors if e is not None]
    if not bad:
        return table, inputs
    counts = {e: bad.count(e) for e in sorted(set(bad))}
    say(f"left out {len(bad):,} products whose image cannot be used: {counts}")
    return table.filter(pa.array([e is None for e in errors])), inputs


def _input_baseline(table: pa.Table, errors: list[str | None], tones: list[float | None]) -> InputBaseline:
    """The run health checks' input baseline over every training product (usable image or not)."""

    def column(name: str) -> list[Any]:
        return table[name].to_pylist() if name in table.column_names else [None] * table.num_rows

    present = np.zeros(table.num_rows, bool)
    for name in ("image", "image_uri"):
        if name in table.column_names:
            present |= table[name].is_valid().to_numpy(zero_copy_only=False)
    texts = column("title"), column("description")
    return input_baseline(*texts, present.tolist(), errors, column("category"), tones)


def _reads(fusion: str) -> tuple[bool, ...]:
    cls = fusion_class(fusion)
    return (cls.needs_text, cls.needs_image, cls.needs_tokens, cls.needs_fields)


def _check_encoders_mode(cfg: AppConfig) -> None:
    """``frozen`` needs pretrained weights for every encoder the fusion reads: a fixed random encoder
    gives features no better than noise."""
    members = cfg.model.member_configs()
    if cfg.training.encoders != "frozen":
        if cfg.model.encoder_runtime == "onnx":
            raise ConfigError(
                "model.encoder_runtime: onnx serves graphs exported before training, so the encoders must "
                f"not change while it trains: set training.encoders: frozen (not {cfg.training.encoders})"
            )
        return
    reads = {_reads(m.fusion) for m in members}
    if len(reads) > 1:
        raise ConfigError(
            "training.encoders: frozen embeds every product once for all ensemble members, so their "
            f"fusions must read the same encoder outputs; {sorted({m.fusion for m in members})} do not"
        )
    fusion = fusion_class(cfg.model.fusion)
    missing = [
        f"model.{name}.pretrained_path"
        for name, needed, path in (
            ("text", fusion.needs_text, cfg.model.text.pretrained_path),
            ("image", fusion.needs_image, cfg.model.image.pretrained_path),
        )
        if needed and not path
    ]
    if missing:
        raise ConfigError(
            "training.encoders: frozen trains only the fusion and heads over fixed encoders, which needs "
            f"pretrained weights: set {' and '.join(missing)} (or use finetune)"
        )


def train_and_calibrate(
    table: pa.Table,
    taxonomy: Taxonomy,
    cfg: AppConfig,
    *,
    test_table: pa.Table | None = None,
    image_roots: Sequence[str | Path] = (),
    device: torch.device | str = "cpu",
    progress: Say | None = None,
    store: Any = None,
) -> TrainedModel:
    """Split, train, fit held-out parts, calibrate and evaluate (see the module docstring).

    Args:
        table: labelled products (contract ``labelled_products``): text, image and label columns.
        taxonomy: attributes and allowed values; every attribute needs a label column.
        cfg: the app config (model, training, calibration sections are used).
        test_table: labelled products to test on instead of a test split of ``table`` (e.g. a
            catalog's own held-out products); ``None`` = ``training.test_fraction`` of ``table``.
        image_roots: folders an ``image_uri`` may name besides ``images.roots`` (the labelled
            table's own folder): merchant URIs are read under the catalog's policy, like serving's.
        device: where to train; the caller decides (CPU in tests).
        progress: called with one line per epoch and stage.
        store: a catalog whose embedding store frozen encoders read and fill
            (``training.embeddings.embed_products``); None: the private cache.

    Raises:
        ContractError / TaxonomyError: missing label column, label values outside the taxonomy.
        CatalogEnrichError: too few rows for the splits.
    """
    with deterministic_algorithms(True):
        return _train_and_calibrate(
            table,
            taxonomy,
            cfg,
            test_table=test_table,
            image_roots=image_roots,
            device=device,
            progress=progress,
            store=store,
        )


def _train_and_calibrate(
    table: pa.Table,
    taxonomy: Taxonomy,
    cfg: AppConfig,
    *,
    test_table: pa.Table | None,
    image_roots: Sequence[str | Path],
    device: torch.device | str,
    progress: Say | None,
    store: Any,
) -> TrainedModel:
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    device = torch.device(device)
    tcfg, mcfg = cfg.training, cfg.model
    seed_everything(tcfg.seed)

    _check_encoders_mode(cfg)
    policy = ImagePolicy.from_config(cfg.images, image_roots)
    table, inputs = _usable_images(canonical_order(table), policy, say)
    n_own = table.num_rows
    if n_own == 0:
        raise CatalogEnrichError("the labelled table is empty")
    if test_table is not None:  # its rows go last: the test split, never trained or calibrated on
        test_table, _ = _usable_images(canonical_order(test_table), policy, say)
        table = pa.concat_tables([table, test_table.select(table.column_names)], promote_options="default")
    records = ProductRecords.from_arrow(table, policy)
    labels = encode_labels(table, taxonomy)
    groups = group_ids(records.title, records.description)
    folds = crossfit_folds(n_own, tcfg.crossfit_folds)
    own = np.arange(n_own)
    try:
        splits = split_labels(
            labels.subset(own),
            validation=tcfg.validation_fraction,
            calibration=0.0 if folds else calibration_fraction(n_own, tcfg.calibration_fraction),
            test=0.0 if test_table is not None else tcfg.test_fraction,
            seed=tcfg.seed,
            groups=groups[own],
        )
    except ValueError as exc:
        raise CatalogEnrichError(f"cannot split {n_own} labelled products: {exc}") from None
    if test_table is not None:
        splits = dataclasses.replace(splits, test=np.arange(n_own, table.num_rows))
    if tcfg.train_fraction < 1:  # fewer labels to learn from; the held-out splits stay whole
        keep = np.random.default_rng(tcfg.seed).permutation(splits.train.size)[
            : round(tcfg.train_fraction * splits.train.size)
        ]
        splits = dataclasses.replace(splits, train=np.sort(splits.train[keep]))
    say(f"splits: {splits.sizes()}")

    tokenizer = build_tokenizer(
        mcfg.text, (f"{records.title[i]} {records.description[i] or ''}" for i in splits.train)
    )
    collator = Collator(tokenizer, mcfg.text.max_length)

    member_cfgs = mcfg.member_configs()

    def fresh_model(seed: int, member: ModelConfig) -> MultimodalModel:
        torch.manual_seed(seed)
        model = build_model(member, taxonomy, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        return cast(MultimodalModel, model).to(device)

    embeddings: Embeddings | None = None
    if tcfg.encoders == "frozen":
        cache = Path(tcfg.embedding_cache) if tcfg.embedding_cache else default_cache_dir()
        embedder = fresh_model(tcfg.seed, member_cfgs[0])
        with tempfile.TemporaryDirectory() as exported:
            if mcfg.encoder_runtime == "onnx":  # every score selected and calibrated on comes from the graphs
                say("model.encoder_runtime onnx: exporting the encoders")
                runtime.attach(embedder, runtime.export_encoders(embedder, exported))
            embeddings = embed_products(
                embedder,
                records,
                tokenizer,
                max_length=mcfg.text.max_length,
                batch_size=tcfg.batch_size * 2,
                device=device,
                cache_dir=cache,
                say=say,
                store=store,
            )
    preprocessing = ImagePreprocessing()
    if embeddings is None and needs_image(mcfg):
        preprocessing = ImageEncoder(mcfg.image).preprocessing  # with weights: timm's pretrained config

    def subset(idx: np.ndarray, with_labels: EncodedLabels = labels) -> ProductDataset | EmbeddedDataset:
        if embeddings is not None:
            return EmbeddedDataset(embeddings, idx, with_labels)
        return ProductDataset(records, idx, preprocessing=preprocessing, labels=with_labels)

    def scoring(idx: np.ndarray) -> DataLoader:
        return _loader(subset(idx), collator, tcfg.batch_size * 2, shuffle=False, seed=0)

    val_loader = scoring(splits.validation)
    val_labels = labels.subset(splits.validation)
    # what the models learn from and are selected on: without the pruned labels, once pruned
    train_labels, selection_labels = labels, val_labels

    def fit(train_idx: np.ndarray, seed: int, tag: str) -> tuple[AnyModel, list[_Fit]]:
        """Fresh models trained on ``train_idx`` (early stopping and held-out fit on validation):
        one, or every ensemble member (member i with ``seed + i``) combined."""
        members, fits = [], []
        for i, member in enumerate(member_cfgs):
            name = (
                f"{tag}member {i + 1}/{len(member_cfgs)} ({member.fusion}): " if len(member_cfgs) > 1 else tag
            )
            fresh = fresh_model(seed + i, member)
            loader = _loader(
                subset(train_idx, train_labels), collator, tcfg.batch_size, shuffle=True, seed=seed + i
            )
            fits.append(_fit(fresh, loader, val_loader, selection_labels, taxonomy, cfg, device, say, name))
            members.append(fresh)
        return (members[0] if len(members) == 1 else EnsembleModel(mcfg, members)), fits

    issues_table = None
    if tcfg.noise_pruning.enabled:
        train_labels, selection_labels, issues_table = _prune_noisy_labels(
            splits, labels, groups, taxonomy, cfg, fit, scoring, device, say, records.product_id
        )
    fold_val = None
    if folds:
        oof, oof_labels, fold_val = _crossfit(
            splits.train, labels, groups, folds, tcfg.seed, fit, scoring, device, say, also=splits.validation
        )
        calibration_set = (oof, oof_labels)
    seed_everything(tcfg.seed)
    model, fits = fit(splits.train, tcfg.seed, "")
    history, best_epoch = fits[0].history, fits[0].best_epoch
    heldout = (
        fits[0].heldout if len(fits) == 1 else {f"member {i + 1}": f.heldout for i, f in enumerate(fits)}
    )
    if not folds:
        calib_loader = scoring(splits.calibration)
        calibration_set = (predict(model, calib_loader, device), labels.subset(splits.calibration))
    family_set = (predict(model, val_loader, device), val_labels)
    calibration = calibrate(*calibration_set, taxonomy, cfg, family=family_set)
    test_loader = scoring(splits.test)
    test_preds = predict(model, test_loader, device)
    test_labels = labels.subset(splits.test)
    # the run health baselines: held-out products the final model never trained, fit or stopped on
    health_set = family_set if test_table is not None else (test_preds, test_labels)
    calibration = with_health(calibration, *health_set, taxonomy, inputs)
    report = evaluate(test_preds, test_labels, taxonomy, calibration)
    if fold_val is not None:
        report["_crossfit"] = _fold_gap(fold_val, family_set[0], val_labels, taxonomy, say)
    if isinstance(model, EnsembleModel):  # each member alone on the same test split
        report["_members"] = {
            f"{i + 1}:{m.cfg.fusion}": {
                a: r["r_at_p95"]
                for a, r in evaluate(predict(m, test_loader, device), test_labels, taxonomy).items()
            }
            for i, m in enumerate(model.member_models)
        }
    if test_preds.modality_weights:
        report["_modality_weights"] = {
            a: {"text_mean": float(w[:, 0].mean()), "image_mean": float(w[:, 1].mean())}
            for a, w in test_preds.modality_weights.items()
        }
    seconds = time.perf_counter() - started
    say(
        f"trained in {seconds:.0f}s; test: "
        + " ".join(
            f"{a.name}: R@P95 {report[a.name]['r_at_p95']:.3f} "
            f"prec {report[a.name]['realized_precision']:.3f} cov {report[a.name]['coverage']:.3f} "
            f"eff {report[a.name]['coverage_efficiency']:.2f}"
            for a in taxonomy
        )
    )
    return TrainedModel(
        model,
        tokenizer,
        taxonomy,
        cfg,
        calibration,
        history,
        best_epoch,
        splits,
        report,
        heldout,
        seconds,
        test_preds,
        test_labels,
        calibration_set,
        family_set,
        issues_table,
        records.product_id,
        health_set,
    )
