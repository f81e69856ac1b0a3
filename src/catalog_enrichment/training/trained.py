"""What every training path ends with: the trained model's held-out scores, thresholds, run health
profile and test report, as one :class:`TrainedModel` (``registry`` packages it).

The pipeline's readings (:mod:`.memory`, :mod:`.distributed`) each fit a model their own way and hand
it over as :class:`Fitted`; :func:`conclude` is the one place a version is scored on its held-out
splits, calibrated, evaluated and built.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import numpy as np
import pandas as pd
import torch

from catalog_enrichment.calibration import AttributeCalibration, Calibration
from catalog_enrichment.config import AppConfig, CalibrationConfig, ModelConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import EncodedLabels, unseen_values
from catalog_enrichment.health import InputBaseline
from catalog_enrichment.inference.bundle import ModelBundle, json_safe
from catalog_enrichment.models.model import AnyModel, EnsembleModel, MultimodalModel, build_model
from catalog_enrichment.training.evaluation import (
    EvaluationReport,
    Predictions,
    calibrate,
    evaluate,
    on_served_scale,
    predict,
    with_health,
)
from catalog_enrichment.training.fit import EpochMetrics, FitResult, fold_gap, mean_scores
from catalog_enrichment.training.splits import Splits
from catalog_enrichment.training.stack import UNLEARNED
from catalog_enrichment.types import Say

__all__ = ["Fitted", "HeldOut", "SplitName", "TrainedModel", "conclude", "seeded_model"]

SplitName = Literal["calibration", "validation", "test"]

# why a value no training product carries is never written (its calibration reason)
UNSEEN = "never seen in the training data"


@dataclass(frozen=True)
class HeldOut:
    """Scores and labels of the held-out sets a version keeps, to calibrate it again
    (:meth:`TrainedModel.recalibrate`): ``calibration`` (out-of-fold or the calibration split),
    ``family`` (the validation split, which shapes the attribute scope's threshold family; None
    without one: every value then shares the threshold), ``health`` (what the run health profile
    is counted on) and ``fold_family`` (cross-fitted: each fold model's scores of the family
    products, which put the thresholds on the served model's scale); ``unseen``, per attribute
    the values no product the model trained on carries, which it never writes; ``unlearned``, per
    attribute the values a stack's out-of-fold scores cannot calibrate (one fold held every training
    product with them, or without them), which it never writes either; ``family_fitted``:
    the model fitted part of itself on the family products (a late or decision fusion), so its
    scores there cannot prove the cross-fitted thresholds."""

    calibration: tuple[Predictions, EncodedLabels]
    family: tuple[Predictions, EncodedLabels] | None
    health: tuple[Predictions, EncodedLabels]
    fold_family: tuple[Predictions, ...] = ()
    unseen: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    family_fitted: bool = False
    unlearned: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    health_groups: np.ndarray | None = None  # the group each health product was split with
    calibration_groups: np.ndarray | None = None  # ... and each calibration product
    family_groups: np.ndarray | None = None  # ... and each family product

    def calibrate(
        self,
        taxonomy: Taxonomy,
        rule: CalibrationConfig,
        inputs: InputBaseline | None,
        say: Say = lambda _m: None,
    ) -> Calibration:
        """Thresholds under ``rule`` from the calibration set (the family shaping them), with the run
        health profile of the health set and the training products' ``inputs``; ``say`` names each
        attribute whose thresholds rose onto the served model's scale, and why.

        The served model's writes on the family products prove the cross-fitted thresholds only in
        the value scope: in the attribute scope those products' labels shaped the thresholds (the
        family and the per-value guard), so a check on them would be in-sample; there the
        thresholds go to the fold models' share, which uses no labels."""
        calibration = calibrate(
            *self.calibration, taxonomy, rule, family=self.family, groups=self.calibration_groups
        )
        if self.fold_family and self.family is not None:
            proven = calibration
            provable = rule.scope == "value" and not self.family_fitted
            calibration = on_served_scale(
                calibration,
                self.family,
                self.fold_family,
                taxonomy,
                provable=provable,
                groups=self.family_groups,
            )
            for name, a in calibration.attributes.items():
                before = proven.attributes[name]
                if a.values != before.values:
                    say(f"{name}: {self._why_raised(a, before)}: thresholds put on the served model's "
                        "scale (raised, never lowered; kept out where no grid point fits)")  # fmt: skip
        calibration = _without(_without(calibration, self.unseen, UNSEEN), self.unlearned, UNLEARNED)
        return with_health(calibration, *self.health, taxonomy, inputs, self.health_groups)

    def _why_raised(self, a: AttributeCalibration, proven: AttributeCalibration) -> str:
        ratio = "" if a.served_ratio is None else f", {a.served_ratio:.2f}x what the fold models wrote"
        if self.family_fitted:
            why = "the served model fitted part of itself on the validation split: its writes prove nothing"
        elif a.pooled is not None:
            why = (
                "the validation split's labels shaped the thresholds: the served model's writes there "
                "prove none"
            )
        elif a.served_precision is None or a.served_lower_bound is None:
            why = "at the proven thresholds the served model wrote no labelled value on the validation split"
        else:
            short = [v.value for v, p in zip(a.values, proven.values, strict=True) if v != p]
            why = (
                f"at the proven thresholds the served model's validation writes of {', '.join(short)} did "
                f"not prove the target on their own (of every value: {a.served_precision:.3f} right, lower "
                f"bound {a.served_lower_bound:.3f})"
            )
        return why + ratio


def _without(calibration: Calibration, out: Mapping[str, Sequence[str]], reason: str) -> Calibration:
    """``calibration`` with ``out``'s values kept out (``reason``). The attribute scope proved what
    all its values write together: where the rest alone no longer prove the target on the same
    calibration evidence (:meth:`Calibration.kept_bound`), the attribute is not written."""
    carried = [  # the attributes whose kept-out values wrote on the evidence: only they lose proof
        name
        for name, a in calibration.attributes.items()
        if any(v.value in out.get(name, ()) and v.threshold is not None and v.n_written for v in a.values)
    ]
    calibration = calibration.keep_out(out, reason)
    for name in carried:
        written = [v.value for v in calibration.attributes[name].values if v.threshold is not None]
        proof = calibration.kept_bound(name, written)
        if written and proof is not None and proof < calibration.target_precision:
            why = f"without the values {reason}, the rest prove a lower bound of {proof:.3f} only"
            calibration = calibration.keep_out({name: written}, why)
    return calibration


@dataclass
class TrainedModel:
    """Everything a trained version consists of (``registry`` packages it)."""

    model: AnyModel
    tokenizer: Any
    taxonomy: Taxonomy
    config: AppConfig
    calibration: Calibration
    history: list[EpochMetrics]
    best_epoch: int
    splits: Splits
    test_report: EvaluationReport
    test_predictions: Predictions
    test_labels: EncodedLabels
    heldout: HeldOut
    heldout_fit: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    label_issues: pd.DataFrame | None = None
    product_ids: list[str | None] = field(default_factory=list)

    @property
    def calibration_set(self) -> tuple[Predictions, EncodedLabels]:
        return self.heldout.calibration

    def bundle(self) -> ModelBundle:
        """The trained model as a loaded bundle (what serving holds), without writing it."""
        return ModelBundle(
            self.model,
            self.tokenizer,
            self.taxonomy,
            self.calibration,
            self.config.model,
            json_safe(self.test_report.to_dict()),
        )

    def recalibrate(self, rule: CalibrationConfig) -> tuple[Calibration, dict[str, Any]]:
        """Thresholds under another calibration ``rule`` (e.g. the other scope) from the stored
        held-out scores, and the test report they give; the model is not touched."""
        inputs = None if self.calibration.health is None else self.calibration.health.inputs
        calibration = self.heldout.calibrate(self.taxonomy, rule, inputs)
        return calibration, evaluate(self.test_predictions, self.test_labels, self.taxonomy, calibration)


def seeded_model(
    member: ModelConfig, taxonomy: Taxonomy, tokenizer: Any, seed: int, device: torch.device | str = "cpu"
) -> MultimodalModel:
    """One model before training, the same for the same seed (in every process and on every rank)."""
    torch.manual_seed(seed)
    model = build_model(member, taxonomy, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return cast(MultimodalModel, model).to(device)


@dataclass(frozen=True)
class Fitted:
    """A model as a training path hands it over, before calibration.

    ``labels`` are every product's (``splits`` index them); ``scoring`` gives a held-out split's
    batches by name; ``out_of_fold``: the cross-fit's scores of the training split, which
    calibrate in place of a calibration split; ``fold_val``: each fold model's scores of the
    validation split (they put the thresholds on the served model's scale; the report's fold
    gap); ``health_on_test``: the run health profile is counted on the test split (else on the
    validation split, or the calibration set without one: the test products are a table of their
    own); ``encodes``: scoring a held-out split runs the encoders (not over cached encoder outputs);
    ``groups``: the group each product was split with (None: one by one); ``unlearned``: per
    attribute, the values a cross-fitted network's fold model could not learn (the stack names its
    own in its fit), kept out of the calibration.
    """

    model: AnyModel
    tokenizer: Any
    fits: list[FitResult]
    splits: Splits
    labels: EncodedLabels
    scoring: Callable[[SplitName], Iterable[Any]]
    device: torch.device
    product_ids: list[str | None]
    out_of_fold: tuple[Predictions, EncodedLabels] | None = None
    fold_val: tuple[Predictions, ...] = ()
    label_issues: pd.DataFrame | None = None
    health_on_test: bool = True
    encodes: bool = True
    groups: np.ndarray | None = None
    unlearned: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def conclude(
    fitted: Fitted, taxonomy: Taxonomy, cfg: AppConfig, inputs: InputBaseline, started: float, say: Say
) -> TrainedModel:
    """The fitted model scored on its held-out splits, calibrated (with the training products'
    ``inputs`` for the run health profile) and evaluated on the test split."""
    heldout, test_preds, test_labels = _held_out(fitted, taxonomy)
    if heldout.unseen:
        named = ", ".join(f"{a}={v}" for a, values in heldout.unseen.items() for v in values)
        say(f"{UNSEEN}, so never written: {named} (add labelled products to write them)")
    calibration = heldout.calibrate(taxonomy, cfg.calibration, inputs, say)
    for name in calibration.attributes:
        say(f"calibration: {calibration.describe(name)}")
    report = _report(fitted, taxonomy, calibration, (test_preds, test_labels), heldout, say)
    seconds = time.perf_counter() - started
    say(f"trained in {seconds:.0f}s; test: " + _summary(report, taxonomy))
    fits = fitted.fits
    return TrainedModel(
        model=fitted.model,
        tokenizer=fitted.tokenizer,
        taxonomy=taxonomy,
        config=cfg,
        calibration=calibration,
        history=fits[0].history,
        best_epoch=fits[0].best_epoch,
        splits=fitted.splits,
        test_report=report,
        test_predictions=test_preds,
        test_labels=test_labels,
        heldout=heldout,
        heldout_fit=_heldout_fit(fits),
        seconds=seconds,
        label_issues=fitted.label_issues,
        product_ids=fitted.product_ids,
    )


def _heldout_fit(fits: list[FitResult]) -> dict[str, Any]:
    """What the fusion fitted on held-out data: the model's, or each ensemble member's."""
    if len(fits) == 1:
        return fits[0].heldout
    return {f"member {i + 1}": f.heldout for i, f in enumerate(fits)}


def _held_out(fitted: Fitted, taxonomy: Taxonomy) -> tuple[HeldOut, Predictions, EncodedLabels]:
    """The model's scores of the held-out splits: the calibration set (the cross-fit's out-of-fold
    scores, or the calibration split), the validation split, the test split; and the values no
    training product carries."""

    def scored(name: SplitName) -> tuple[Predictions, EncodedLabels]:
        idx = getattr(fitted.splits, name)
        return predict(fitted.model, fitted.scoring(name), fitted.device), fitted.labels.subset(idx)  # type: ignore[arg-type]

    calibration = fitted.out_of_fold or scored("calibration")
    family = scored("validation") if fitted.splits.validation.size else None
    test = scored("test")
    # the health products and their rows, in order (the out-of-fold scores are the training split's)
    splits = fitted.splits
    if fitted.health_on_test:
        health, rows = test, splits.test
    elif family:
        health, rows = family, splits.validation
    else:
        health, rows = calibration, splits.train if fitted.out_of_fold else splits.calibration

    def groups_of(held: tuple[Predictions, EncodedLabels], rows: np.ndarray) -> np.ndarray | None:
        sizes = {len(p) for p in held[0].probs.values()}
        return fitted.groups[rows] if fitted.groups is not None and sizes == {rows.size} else None

    groups = groups_of(health, rows)
    calibration_groups = groups_of(calibration, splits.train if fitted.out_of_fold else splits.calibration)
    family_groups = groups_of(family, splits.validation) if family else None
    unseen = unseen_values(fitted.labels.subset(fitted.splits.train), taxonomy)
    members = fitted.model.member_models if isinstance(fitted.model, EnsembleModel) else [fitted.model]
    family_fitted = any(m.fusion.fits_on_heldout for m in members)
    unlearned = {**fitted.fits[0].heldout.get("unlearned", {}), **fitted.unlearned}
    heldout = HeldOut(
        calibration,
        family,
        health,
        fitted.fold_val,
        unseen,
        family_fitted,
        unlearned,
        groups,
        calibration_groups,
        family_groups,
    )
    return heldout, *test


def _report(
    fitted: Fitted,
    taxonomy: Taxonomy,
    calibration: Calibration,
    test: tuple[Predictions, EncodedLabels],
    heldout: HeldOut,
    say: Say,
) -> EvaluationReport:
    """The test report: per attribute, with the cross-fit's fold gap, an ensemble's members alone
    and the mean modality weights where there are any."""
    test_preds, test_labels = test
    report = EvaluationReport(evaluate(test_preds, test_labels, taxonomy, calibration))
    if fitted.fold_val and heldout.family is not None:
        folds = mean_scores(fitted.fold_val)
        report.crossfit = fold_gap(folds, heldout.family[0], heldout.family[1], taxonomy, say)
    if isinstance(fitted.model, EnsembleModel):  # each member alone on the same test split
        report.members = {
            f"{i + 1}:{m.cfg.fusion}": {
                a: r["r_at_p95"]
                for a, r in evaluate(
                    predict(m, fitted.scoring("test"), fitted.device),  # type: ignore[arg-type]
                    test_labels,
                    taxonomy,
                ).items()
            }
            for i, m in enumerate(fitted.model.member_models)
        }
    if test_preds.modality_weights:
        report.modality_weights = {
            a: {"text_mean": float(w[:, 0].mean()), "image_mean": float(w[:, 1].mean())}
            for a, w in test_preds.modality_weights.items()
        }
    return report


def _summary(report: EvaluationReport, taxonomy: Taxonomy) -> str:
    return " ".join(
        f"{a.name}: R@P95 {report[a.name]['r_at_p95']:.3f} "
        f"prec {report[a.name]['realized_precision']:.3f} cov {report[a.name]['coverage']:.3f} "
        f"eff {report[a.name]['coverage_efficiency']:.2f}"
        for a in taxonomy
    )
