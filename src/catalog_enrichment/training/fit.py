"""Fitting one model: AdamW with a linear warm-up and cosine decay, early stopping on the validation
metric, the best epoch's weights kept, then the fusion's held-out fit - and the K-fold runs built on
it: cross-fitting (out-of-fold calibration scores) and confident-learning noise pruning (001).

Pretrained encoder weights train at their own, lower learning rate, and ``training.encoders`` says
which of their layers train at all (004 §6.3): all (``finetune``), the top ``unfreeze_layers``
(``last_n``) or none (``frozen``, over cached embeddings).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from catalog_enrichment.config import ModelConfig, TrainingConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import Collator, EncodedLabels, ProductDataset
from catalog_enrichment.embeddings.frozen import EmbeddedDataset
from catalog_enrichment.errors import ConfigError
from catalog_enrichment.metrics import attribute_average_precision
from catalog_enrichment.models.encoders import ImageEncoder, TextEncoder
from catalog_enrichment.models.fusion import fusion_class, fusion_options
from catalog_enrichment.models.losses import attribute_loss
from catalog_enrichment.models.model import AnyModel, MultimodalModel
from catalog_enrichment.progress import progress
from catalog_enrichment.training.evaluation import (
    Predictions,
    autocast_context,
    forward,
    mean_val_r,
    predict,
    to_device,
)
from catalog_enrichment.training.splits import FoldPlan, Splits
from catalog_enrichment.types import Say

__all__ = [
    "PRETRAINED_ENCODER_LR",
    "EpochMetrics",
    "FitFn",
    "FitResult",
    "Optimisation",
    "ScoreFn",
    "Validation",
    "check_encoders_mode",
    "crossfit",
    "fit_model",
    "fold_gap",
    "make_loader",
    "param_groups",
    "prune_noisy_labels",
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


def make_loader(
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


def _reads(fusion: str) -> tuple[bool, ...]:
    cls = fusion_class(fusion)
    return (cls.needs_text, cls.needs_image, cls.needs_tokens, cls.needs_fields)


def check_encoders_mode(mcfg: ModelConfig, tcfg: TrainingConfig) -> None:
    """``frozen`` needs pretrained weights for every encoder the fusion reads: a fixed random encoder
    gives features no better than noise."""
    members = mcfg.member_configs()
    for member in members:  # a typo in fusion_kwargs is named before any data is read
        fusion_options(member.fusion, member.fusion_kwargs)
    if tcfg.encoders != "frozen":
        if fusion_class(mcfg.fusion).needs_lexical:
            raise ConfigError(
                "fusion 'stack' is fitted in closed form over fixed encoders: set training.encoders: frozen"
            )
        if mcfg.encoder_runtime == "onnx":
            raise ConfigError(
                "model.encoder_runtime: onnx serves graphs exported before training, so the encoders must "
                f"not change while it trains: set training.encoders: frozen (not {tcfg.encoders})"
            )
        return
    if fusion_class(mcfg.fusion).needs_lexical and len(members) > 1:
        raise ConfigError("fusion 'stack' is an ensemble of its own: set model.ensemble.members: 1")
    if fusion_class(mcfg.fusion).needs_lexical and tcfg.noise_pruning.enabled:
        raise ConfigError(
            "fusion 'stack' learns from every training label (pruning the ones its out-of-fold "
            "scores doubt ranks worse on real catalogs): set training.noise_pruning.enabled: false"
        )
    reads = {_reads(m.fusion) for m in members}
    if len(reads) > 1:
        raise ConfigError(
            "training.encoders: frozen embeds every product once for all ensemble members, so their "
            f"fusions must read the same encoder outputs; {sorted({m.fusion for m in members})} do not"
        )
    fusion = fusion_class(mcfg.fusion)
    missing = [
        f"model.{name}.pretrained_path"
        for name, needed, path in (
            ("text", fusion.needs_text, mcfg.text.pretrained_path),
            ("image", fusion.needs_image, mcfg.image.pretrained_path),
        )
        if needed and not path
    ]
    if missing:
        raise ConfigError(
            "training.encoders: frozen trains only the fusion and heads over fixed encoders, which needs "
            f"pretrained weights: set {' and '.join(missing)} (or use finetune)"
        )


def param_groups(model: MultimodalModel, tcfg: TrainingConfig) -> list[dict[str, Any]]:
    """AdamW groups: fusion and heads at ``learning_rate``; each encoder at its own rate (pretrained
    weights lower, 004 §6.3), with only the layers ``training.encoders`` trains."""
    encoders: list[TextEncoder | ImageEncoder] = [*model.text_encoders]
    if model.image_encoder is not None:
        encoders.append(model.image_encoder)
    groups: list[dict[str, Any]] = []
    encoder_ids: set[int] = set()
    for encoder in encoders:
        encoder_ids.update(id(p) for p in encoder.parameters())
        params = _encoder_trainable(encoder, tcfg.encoders, tcfg.unfreeze_layers)
        pretrained = bool(encoder.cfg.pretrained_path)
        lr = tcfg.encoder_learning_rate or (PRETRAINED_ENCODER_LR if pretrained else tcfg.learning_rate)
        if params:
            groups.append({"params": params, "lr": lr})
    head = [p for p in model.parameters() if id(p) not in encoder_ids]
    return [{"params": head, "lr": tcfg.learning_rate}, *groups]


def _train_mode(model: torch.nn.Module) -> None:
    """Training mode, except for modules with no trained weight (a fixed encoder layer's BatchNorm
    keeps its statistics, its dropout stays off)."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


@dataclass(frozen=True)
class FitResult:
    """One model's training: the epochs, the one kept, and what the fusion fitted on held-out data."""

    history: list[EpochMetrics]
    best_epoch: int
    heldout: dict[str, Any]


@dataclass(frozen=True)
class Optimisation:
    """AdamW over the trained parameters, its warm-up + cosine schedule, those parameters and the
    norm their gradients are clipped to (004 §6.3, 003 §4.1)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    trained: list[torch.nn.Parameter]
    clip_norm: float

    @classmethod
    def adamw(
        cls,
        params: Any,
        *,
        weight_decay: float,
        steps: int,
        warmup_ratio: float,
        clip_norm: float,
        lr: float = 1e-3,
    ) -> Optimisation:
        """Over ``params`` (parameters, or groups with their own rates) for ``steps`` steps, the first
        ``warmup_ratio`` of them warming up."""
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        warmup = int(warmup_ratio * steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total=steps, warmup=warmup)
        )
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        return cls(optimizer, scheduler, trained, clip_norm)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trained, self.clip_norm)
        self.optimizer.step()
        self.scheduler.step()


def _optimizer(model: MultimodalModel, tcfg: TrainingConfig, steps_per_epoch: int) -> Optimisation:
    return Optimisation.adamw(
        param_groups(model, tcfg),
        weight_decay=tcfg.weight_decay,
        steps=tcfg.epochs * steps_per_epoch,
        warmup_ratio=tcfg.warmup_ratio,
        clip_norm=tcfg.grad_clip_norm,
    )


def _train_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimisation: Optimisation,
    kinds: dict[str, str],
    device: torch.device,
    desc: str,
    say: Say,
) -> float:
    """One pass over ``loader``; the mean training loss (``model``: the model, or the wrapper whose
    forward also synchronises it, e.g. ``DistributedDataParallel``)."""
    _train_mode(model)
    losses = []
    for batch in progress(loader, desc=desc, unit="step", total=len(loader), say=say):
        batch = to_device(batch, device)
        with autocast_context(device, device.type == "cuda"):
            out = forward(model, batch)  # type: ignore[arg-type]
            loss = sum(
                attribute_loss(lg, batch["targets"], batch["known"], kinds, batch.get("partial"))
                for lg in out.train_logits
            )
            loss = loss + out.aux_loss
        optimisation.step(loss)
        losses.append(float(loss.detach()))
    return _sync_ranks(model, float(np.mean(losses)))


def _sync_ranks(model: torch.nn.Module, loss: float) -> float:
    """In a distributed run, every rank ends the epoch like rank 0 and reports the same loss: the
    buffers from rank 0 (BatchNorm's running statistics already agree, being the global batch's,
    but any other buffer a rank moved would not), the loss averaged over the ranks. Every rank then
    validates the same weights (and stops on rank 0's score: :func:`_rank0_score`). Outside one,
    ``loss``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return loss
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    # on the model's device: NCCL (the GPUs' backend) reduces CUDA tensors only
    where = next(model.parameters(), torch.empty(0)).device
    total = torch.tensor([loss], dtype=torch.float64, device=where)
    dist.all_reduce(total)
    return float(total.item()) / dist.get_world_size()


def _rank0_score(model: torch.nn.Module, score: float) -> float:
    """In a distributed run, rank 0's validation score on every rank, so every rank takes the same
    early-stopping decision: each scores the split itself, and where torch has no deterministic
    algorithm (it only warns) the scores can differ in the last bits; a rank that stopped while
    another trained on would leave that one waiting in its next all-reduce. Outside one, ``score``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return score
    where = next(model.parameters(), torch.empty(0)).device  # NCCL broadcasts CUDA tensors only
    rank0 = torch.tensor([score], dtype=torch.float64, device=where)
    dist.broadcast(rank0, src=0)
    return float(rank0.item())


def _validation_score(
    preds: Predictions, labels: EncodedLabels, taxonomy: Taxonomy, metric: str
) -> tuple[dict[str, float], float]:
    """Per attribute validation R@P95, and the score epochs are selected on (mean R@P95, or mean
    average precision over the attributes with a positive validation label: with none it is not
    defined, and a NaN mean would never improve, so no epoch would be kept)."""
    val_r = mean_val_r(preds, labels, taxonomy)
    if metric != "average_precision":
        return val_r, float(np.mean(list(val_r.values())))
    aps = [attribute_average_precision(*labels.labelled(preds.probs, a.name), a.kind) for a in taxonomy]
    defined = [ap for ap in aps if not np.isnan(ap)]
    return val_r, float(np.mean(defined)) if defined else 0.0


def _fit_heldout(
    model: MultimodalModel, val_loader: DataLoader, labels: EncodedLabels, device: torch.device
) -> dict[str, Any]:
    """What the fusion fits on the validation split (late: alpha; decision: its nets), if anything."""
    if not model.fusion.fits_on_heldout:
        return {}
    vp = predict(model, val_loader, device)
    return model.fusion.fit_heldout(
        {b: {a: torch.from_numpy(p) for a, p in per.items()} for b, per in vp.branch_probs.items()},
        {a: torch.from_numpy(t) for a, t in labels.targets.items()},
        {a: torch.from_numpy(k) for a, k in labels.known.items()},
    )


@dataclass(frozen=True)
class Validation:
    """The split training stops and selects on: its batches (``loader``), their ``labels`` and the
    ``taxonomy`` they are scored against."""

    loader: DataLoader
    labels: EncodedLabels
    taxonomy: Taxonomy


def fit_model(
    model: MultimodalModel,
    train_loader: DataLoader,
    validation: Validation,
    tcfg: TrainingConfig,
    device: torch.device,
    say: Say,
    tag: str,
    *,
    step_model: torch.nn.Module | None = None,
) -> FitResult:
    """Train ``model`` in place: AdamW, warm-up + cosine, early stopping on the validation metric, the
    best epoch's weights kept; then the fusion's held-out fit on the validation split. Training
    steps run through ``step_model`` when given (``model`` wrapped for distributed training)."""
    val_loader, val_labels, taxonomy = validation.loader, validation.labels, validation.taxonomy
    kinds = {a.name: a.kind for a in taxonomy}
    if model.image_encoder is not None:  # convolutions train faster channels-last (oneDNN)
        model.image_encoder.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimisation = _optimizer(model, tcfg, len(train_loader))
    history: list[EpochMetrics] = []
    best_score, best_epoch, best_state, stale = -1.0, 0, None, 0
    for epoch in range(1, tcfg.epochs + 1):
        started = time.perf_counter()
        desc = f"{tag}epoch {epoch}/{tcfg.epochs}"
        loss = _train_epoch(step_model or model, train_loader, optimisation, kinds, device, desc, say)
        val_r, score = _validation_score(
            predict(model, val_loader, device, autocast=True), val_labels, taxonomy, tcfg.selection_metric
        )
        score = _rank0_score(model, score)
        mean_r = float(np.mean(list(val_r.values())))
        lr = float(optimisation.scheduler.get_last_lr()[0])
        history.append(EpochMetrics(epoch, loss, val_r, mean_r, time.perf_counter() - started, lr))
        selected = f"  val AP {score:.3f}" if tcfg.selection_metric == "average_precision" else ""
        say(
            f"{desc}  loss {loss:.4f}{selected}  val R@P95 {mean_r:.3f}  "
            + " ".join(f"{a}={r:.3f}" for a, r in val_r.items())
            + f"  ({history[-1].seconds:.0f}s)"
        )
        if score > best_score + 1e-6:
            best_score, best_epoch, stale = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            continue
        stale += 1
        if tcfg.early_stopping_patience and stale >= tcfg.early_stopping_patience:
            say(
                f"{tag}early stopping: no validation gain ({tcfg.selection_metric}) for {stale} epochs "
                f"(best epoch {best_epoch})"
            )
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    heldout = _fit_heldout(model, val_loader, val_labels, device)
    if heldout:
        say(f"{tag}held-out fit: {heldout}")
    return FitResult(history, best_epoch, heldout)


# trains fresh models (one, or an ensemble's members) on the given rows with a seed and a log tag
FitFn = Callable[[np.ndarray, int, str], tuple[AnyModel, list[FitResult]]]
# a model's scores of the given rows
ScoreFn = Callable[[AnyModel, np.ndarray], Predictions]


def crossfit(
    plan: FoldPlan,
    fit: FitFn,
    score: ScoreFn,
    say: Say,
    *,
    tag: str = "cross-fit",
    also: np.ndarray | None = None,
) -> tuple[Predictions, EncodedLabels, tuple[Predictions, ...]]:
    """Out-of-fold scores over the plan's rows: K fold models, each trained on the other folds and
    scoring its own; returned in row order. ``also``: rows no fold model trains on, scored by every
    fold model (one set of scores per fold model; none without ``also``)."""
    rows, k = plan.rows, plan.k
    probs: dict[str, np.ndarray] = {}
    extra: list[Predictions] = []
    for f, (fit_pos, out_pos) in enumerate(plan.folds()):
        say(f"{tag}: fold {f + 1}/{k} ({fit_pos.size:,} products to train, {out_pos.size:,} to score)")
        model, _ = fit(rows[fit_pos], plan.seed + 1 + f, f"  fold {f + 1}: ")
        for attr, p in score(model, rows[out_pos]).probs.items():
            probs.setdefault(attr, np.zeros((rows.size, p.shape[1]), np.float32))[out_pos] = p
        if also is not None:
            extra.append(score(model, also))
    return Predictions(probs, None, {}), plan.labels.subset(rows), tuple(extra)


def mean_scores(folds: Sequence[Predictions]) -> Predictions:
    """The fold models' mean scores (of the same rows)."""
    total: dict[str, Any] = {}
    for scores in folds:
        for attr, p in scores.probs.items():
            total[attr] = total.get(attr, 0) + p / len(folds)
    return Predictions(total, None, {})


# fold models this much weaker (validation average precision) than the final model get a warning
FOLD_GAP_WARNING = 0.05


def fold_gap(
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


def prune_noisy_labels(
    splits: Splits,
    plan: FoldPlan,
    taxonomy: Taxonomy,
    fraction: float,
    fit: FitFn,
    score: ScoreFn,
    say: Say,
    product_ids: list[str | None],
) -> tuple[EncodedLabels, EncodedLabels, pd.DataFrame]:
    """001 §3.2.1: out-of-fold scores of the training split by K fold models, cleanlab's label
    issues, the top ``fraction`` of each attribute's labels left out (see ``training/noise.py``).
    The validation labels that pick the best epoch and fit the held-out parts are pruned alike (the
    fold models' mean scores them). Returns the labels to train on (over every product), the
    validation labels to select on, and the table of the training labels left out."""
    from catalog_enrichment.training.noise import find_label_issues

    say(f"noise pruning: out-of-fold scores by {plan.k} fold models")
    oof, train_labels, fold_val = crossfit(plan, fit, score, say, tag="noise pruning", also=splits.validation)
    val_scores = mean_scores(fold_val)
    issues = find_label_issues(oof.probs, train_labels, taxonomy, fraction)
    labels = plan.labels
    val_labels = labels.subset(splits.validation)
    val_issues = find_label_issues(val_scores.probs, val_labels, taxonomy, fraction)
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
