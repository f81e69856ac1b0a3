"""The in-memory reading of the training pipeline (:mod:`.pipeline`, ``training.streaming`` off).

The survey holds the labelled products in memory: it leaves out products whose image cannot be used
(serving quarantines those) and splits the rest, stratified and grouped (variants and near-duplicates
never straddle two splits). The fit embeds every product once with frozen encoders
(``training.encoders``; the embedding store), optionally prunes suspected label errors
(``training.noise_pruning``, 001), trains the model - or each ensemble member - with AdamW and a
linear warm-up + cosine schedule (early stopping on validation R@P95 or average precision; pretrained
encoder weights at their own, lower learning rate), fits what a fusion picks on held-out data
(late: alpha; decision: the cross-validated decision nets) and hands over the out-of-fold scores of
fold models over the training split (``training.crossfit_folds``; the default below 10,000
products), which calibrate in place of a held-out calibration split; the ``stack`` fusion is
fitted in closed form over the cached features and cross-fitted the same way. Rows are put in a
canonical order first, so the same data, seed and config train the same weights in any process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.utils.data import DataLoader
from transformers import set_seed

from catalog_enrichment.catalog.groups import table_groups, variant_ids
from catalog_enrichment.catalog.reports import placeholders_found
from catalog_enrichment.config import AppConfig, ModelConfig, ValidationConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import (
    Collator,
    EncodedLabels,
    ProductDataset,
    ProductRecords,
    canonical_order,
    check_unique_ids,
    encode_labels,
)
from catalog_enrichment.data.images import ImagePolicy, check_images
from catalog_enrichment.data.preprocess import ImagePreprocessing
from catalog_enrichment.embeddings.frozen import (
    EmbeddedDataset,
    Embeddings,
    default_cache_dir,
    embed_products,
)
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.health import InputBaseline, input_baseline
from catalog_enrichment.models import runtime
from catalog_enrichment.models.encoders import ImageEncoder
from catalog_enrichment.models.fusion import fusion_class
from catalog_enrichment.models.lexical import ngram_counts
from catalog_enrichment.models.model import (
    AnyModel,
    EnsembleModel,
    MultimodalModel,
    needs_image,
)
from catalog_enrichment.training.evaluation import Predictions, predict
from catalog_enrichment.training.fit import (
    FitResult,
    Validation,
    crossfit,
    fit_model,
    make_loader,
    prune_noisy_labels,
)
from catalog_enrichment.training.splits import (
    FoldPlan,
    Splits,
    calibration_fraction,
    crossfit_folds,
    split_labels,
)
from catalog_enrichment.training.stack import STACK_FOLDS, UNLEARNED, stacked, unlearned_values
from catalog_enrichment.training.stream import Source
from catalog_enrichment.training.trained import Fitted, seeded_model
from catalog_enrichment.types import Say
from catalog_enrichment.validation.rules import text_failures

if TYPE_CHECKING:
    from catalog_enrichment.catalog.base import Catalog

__all__ = ["InMemory"]


def _usable_images(
    table: pa.Table, policy: ImagePolicy, validation: ValidationConfig, say: Say, known: Iterable[str] = ()
) -> tuple[pa.Table, InputBaseline, list[str | None]]:
    """The rows whose image is usable or absent (the others left out, counted in the log: a
    placeholder's too, whose image bytes are on more than ``validation.max_products_per_image``
    products or among ``known``, the placeholders earlier runs found), the run health checks' input
    baseline over the rows the enrichment job would score: not those its row rules quarantine for
    their title or description, which no night's checks count (a catalog's number-only titles are
    not tonight's titles), and the digest of each row's image bytes (None: none read)."""
    inputs, errors, digests = check_images(table, policy, validation.max_products_per_image, known)
    # variants share title and description: only those make the design effect; the splits' wider
    # groups (a shared title or description) hold templates that are not variants
    groups = variant_ids(inputs.titles, list(inputs.descriptions))
    scored = [not broken for broken in text_failures(inputs.titles, inputs.descriptions, validation)]
    baseline = input_baseline(inputs.subset(scored), groups)
    bad = Counter(e for e in errors if e is not None)
    if not bad:
        return table, baseline, digests
    say(f"left out {bad.total():,} products whose image cannot be used: {dict(sorted(bad.items()))}")
    usable = [e is None for e in errors]
    return table.filter(pa.array(usable)), baseline, [d for d, ok in zip(digests, usable, strict=True) if ok]


@dataclass(frozen=True)
class _Surveyed:
    """The usable products in memory (a separate test table's last), their labels, duplicate groups
    and splits, the cross-fit folds and the input health baseline."""

    table: pa.Table
    records: ProductRecords
    labels: EncodedLabels
    groups: np.ndarray
    splits: Splits
    folds: int
    inputs: InputBaseline
    external_test: bool  # the test split is a table of its own (bench quality), not a split of this one

    @property
    def texts(self) -> Iterator[str]:
        records = self.records
        return (f"{records.title[i]} {records.description[i] or ''}" for i in self.splits.train)

    @property
    def own_labels(self) -> EncodedLabels:
        """The labels of this table's products (a separate test table's left out)."""
        own = self.table.num_rows - (self.splits.test.size if self.external_test else 0)
        return self.labels.subset(np.arange(own))


@dataclass(frozen=True)
class InMemory:
    """The in-memory reading (see the module docstring)."""

    source: Source
    taxonomy: Taxonomy
    cfg: AppConfig
    image_roots: Sequence[str | Path]
    device: torch.device
    test_table: pa.Table | None = None
    # frozen encoders read and fill its embedding store (None: a private cache)
    store: Catalog | None = None

    def check(self) -> None:
        """Nothing to refuse: every training setting works in memory."""

    def survey(self, say: Say) -> _Surveyed:
        if self.source.rows == 0:
            raise CatalogEnrichError("the labelled table is empty")
        policy = ImagePolicy.from_config(self.cfg.images, self.image_roots)
        known = _placeholders(self.store, self.cfg.validation.max_products_per_image)
        table, labels, groups, splits, folds, inputs, digests = _split(
            self.source.read(), self.test_table, self.taxonomy, self.cfg, policy, say, known
        )
        records = dataclasses.replace(ProductRecords.from_arrow(table, policy), image_digest=digests)
        return _Surveyed(table, records, labels, groups, splits, folds, inputs, self.test_table is not None)

    def fit(self, surveyed: _Surveyed, tokenizer: Any, say: Say) -> Fitted:
        cfg, splits = self.cfg, surveyed.splits
        data = _Data(
            cfg,
            self.taxonomy,
            self.device,
            surveyed.records,
            surveyed.labels,
            surveyed.groups,
            splits,
            surveyed.folds,
            tokenizer,
        )
        self._features(data, surveyed.table, say)
        issues = None
        oof: tuple[Predictions, EncodedLabels] | None
        fold_val: tuple[Predictions, ...] = ()
        unlearned: dict[str, tuple[str, ...]] = {}  # the stack's are its fit's
        if fusion_class(cfg.model.fusion).needs_lexical:  # the stack: fitted in closed form, cross-fitted
            model, oof, fits = _fit_stack(data, say)
        else:
            fitter = _Fitter(
                data, data.labels, data.labels.subset(splits.validation), data.scoring(splits.validation), say
            )
            issues, oof, fold_val, unlearned = _out_of_fold(data, fitter, say)
            set_seed(cfg.training.seed)
            model, fits = fitter(splits.train, cfg.training.seed, "")
        return Fitted(
            model,
            tokenizer,
            fits,
            splits,
            data.labels,
            lambda name: data.scoring(getattr(splits, name)),
            data.device,
            data.records.product_id,
            out_of_fold=oof,
            fold_val=fold_val,
            unlearned=unlearned,
            label_issues=issues,
            # with a test table of its own, the health profile is counted on held-out products of
            # this one the model never trained, fit or stopped on (the stack's out-of-fold scores
            # without a validation split: the served construction's)
            health_on_test=not surveyed.external_test,
            encodes=data.embeddings is None,
            groups=surveyed.groups,
        )

    def _features(self, data: _Data, table: pa.Table, say: Say) -> None:
        """With frozen encoders, every product embedded once (the store's vectors where it has
        them); otherwise the image encoder's own preprocessing."""
        tcfg, mcfg = self.cfg.training, self.cfg.model
        if tcfg.encoders != "frozen":
            if needs_image(mcfg):  # with weights: timm's pretrained config
                data.preprocessing = ImageEncoder(mcfg.image).preprocessing
            return
        records = data.records
        embedder = data.fresh_model(tcfg.seed, mcfg.member_configs()[0])
        lexical, nfkc = None, embedder.fusion.nfkc
        if embedder.fusion.needs_lexical:  # the merchant's category label is one of its texts
            categories = table["category"].to_pylist() if "category" in table.column_names else None
            lexical = ngram_counts(records.title, records.description, categories, nfkc=nfkc)
        # with onnx, every score selected and calibrated on comes from the graphs
        onnx = mcfg.encoder_runtime == "onnx"
        with runtime.served_by_graphs(embedder, say) if onnx else contextlib.nullcontext():
            embeddings = embed_products(
                embedder,
                records,
                data.collator,
                batch_size=tcfg.batch_size * 2,
                device=data.device,
                cache_dir=Path(tcfg.embedding_cache) if tcfg.embedding_cache else default_cache_dir(),
                say=say,
                store=self.store,
            )
        data.embeddings = dataclasses.replace(embeddings, lexical=lexical, lexical_nfkc=nfkc)


@dataclass
class _Data:
    """The labelled products as training reads them (split, tokenized or embedded)."""

    cfg: AppConfig
    taxonomy: Taxonomy
    device: torch.device
    records: ProductRecords
    labels: EncodedLabels
    groups: np.ndarray
    splits: Splits
    folds: int
    tokenizer: Any
    embeddings: Embeddings | None = None
    preprocessing: ImagePreprocessing = field(default_factory=ImagePreprocessing)

    @property
    def collator(self) -> Collator:
        return Collator(self.tokenizer, self.cfg.model.text.max_length)

    def fresh_model(self, seed: int, member: ModelConfig) -> MultimodalModel:
        return seeded_model(member, self.taxonomy, self.tokenizer, seed, self.device)

    def subset(
        self, idx: np.ndarray, labels: EncodedLabels | None = None
    ) -> ProductDataset | EmbeddedDataset:
        labels = self.labels if labels is None else labels
        if self.embeddings is not None:
            return EmbeddedDataset(self.embeddings, idx, labels)
        return ProductDataset(self.records, idx, preprocessing=self.preprocessing, labels=labels)

    def scoring(self, idx: np.ndarray) -> DataLoader:
        return make_loader(
            self.subset(idx), self.collator, self.cfg.training.batch_size * 2, shuffle=False, seed=0
        )


def _split(
    table: pa.Table,
    test_table: pa.Table | None,
    taxonomy: Taxonomy,
    cfg: AppConfig,
    policy: ImagePolicy,
    say: Say,
    known: Iterable[str] = (),
) -> tuple[pa.Table, EncodedLabels, np.ndarray, Splits, int, InputBaseline, list[str | None]]:
    """The usable products (a separate test table's last; ``known``: placeholder digests earlier
    runs found), their labels and duplicate groups, the splits, the cross-fit folds, the input
    health baseline and the products' image digests."""
    tcfg = cfg.training
    table, inputs, digests = _usable_images(canonical_order(table), policy, cfg.validation, say, known)
    n_own = table.num_rows
    if n_own == 0:
        raise CatalogEnrichError("the labelled table is empty")
    if test_table is not None:  # its rows go last: the test split, never trained or calibrated on
        test_table, _, test_digests = _usable_images(
            canonical_order(test_table), policy, cfg.validation, say, known
        )
        table = pa.concat_tables([table, test_table.select(table.column_names)], promote_options="default")
        digests = digests + test_digests
    check_unique_ids(
        table["product_id"], "the labelled table" if test_table is None else "the training and test tables"
    )
    labels = encode_labels(table, taxonomy)
    own = np.arange(n_own)
    groups = table_groups(table)
    stack = fusion_class(cfg.model.fusion).needs_lexical
    folds = (tcfg.crossfit_folds or STACK_FOLDS) if stack else crossfit_folds(n_own, tcfg.crossfit_folds)
    try:
        splits = split_labels(
            labels.subset(own),
            # the stack stops nothing early and chooses out of fold: it trains on every product
            validation=0.0 if stack else tcfg.validation_fraction,
            calibration=0.0 if folds else calibration_fraction(n_own, tcfg.calibration_fraction),
            test=0.0 if test_table is not None else tcfg.test_fraction,
            seed=tcfg.seed,
            groups=groups[own],
            held_groups=groups[n_own:],  # a separate test table's products
        )
    except ValueError as exc:
        raise CatalogEnrichError(f"cannot split {n_own} labelled products: {exc}") from None
    if test_table is not None:
        splits = dataclasses.replace(splits, test=np.arange(n_own, table.num_rows))
    if tcfg.train_fraction < 1:  # fewer labels to learn from; the held-out splits stay whole
        keep = np.random.default_rng(tcfg.seed).permutation(splits.train.size)
        splits = dataclasses.replace(
            splits, train=np.sort(splits.train[keep[: round(tcfg.train_fraction * keep.size)]])
        )
    say(f"splits: {splits.sizes()}")
    return table, labels, groups, splits, folds, inputs, digests


def _placeholders(store: Catalog | None, limit: int) -> set[str]:
    """The placeholder image digests the catalog's runs found (none without a catalog: a
    training that stores no vector has only its own table's shared images to go by). Its products
    are left out as the enrichment job quarantines them; a catalog whose reports cannot be read
    leaves that to the stored vectors' image digests, which a run checks before it fuses one."""
    if store is None or not limit:
        return set()
    try:
        return placeholders_found(store.read_reports(), limit)
    except Exception as exc:  # a cache's catalog: training goes on without it
        logging.getLogger(__name__).warning("could not read the catalog's run reports: %s", exc)
        return set()


@dataclass
class _Fitter:
    """Trains fresh models on given rows (early stopping and held-out fit on validation): one, or
    every ensemble member (member i with ``seed + i``) combined. ``train_labels`` and
    ``selection_labels`` are what the models learn from and are selected on (pruned, once noise
    pruning has run)."""

    data: _Data
    train_labels: EncodedLabels
    selection_labels: EncodedLabels
    val_loader: DataLoader
    say: Say

    def __call__(self, train_idx: np.ndarray, seed: int, tag: str) -> tuple[AnyModel, list[FitResult]]:
        data, cfg = self.data, self.data.cfg
        members, fits = [], []
        configs = cfg.model.member_configs()
        for i, member in enumerate(configs):
            name = f"{tag}member {i + 1}/{len(configs)} ({member.fusion}): " if len(configs) > 1 else tag
            fresh = data.fresh_model(seed + i, member)
            dataset = data.subset(train_idx, self.train_labels)
            loader = make_loader(dataset, data.collator, cfg.training.batch_size, shuffle=True, seed=seed + i)
            labels, device = self.selection_labels, data.device
            validation = Validation(self.val_loader, labels, data.taxonomy)
            fit = fit_model(fresh, loader, validation, cfg.training, device, self.say, name)
            fits.append(fit)
            members.append(fresh)
        return (members[0] if len(members) == 1 else EnsembleModel(cfg.model, members)), fits


def _fit_stack(data: _Data, say: Say) -> tuple[AnyModel, tuple[Predictions, EncodedLabels], list[FitResult]]:
    """The stack fusion fitted over the cached encoder outputs (``training.stack``): the model that
    serves, its out-of-fold scores over the training split, and what it chose."""
    cfg = data.cfg
    assert data.embeddings is not None
    model = data.fresh_model(cfg.training.seed, cfg.model)
    plan = FoldPlan(data.splits.train, data.labels, data.groups, data.folds, cfg.training.seed)
    oof, fits = stacked(model, data.embeddings, plan, data.taxonomy, say)
    return model, oof, fits


def _out_of_fold(
    data: _Data, fitter: _Fitter, say: Say
) -> tuple[
    pd.DataFrame | None,
    tuple[Predictions, EncodedLabels] | None,
    tuple[Predictions, ...],
    dict[str, tuple[str, ...]],
]:
    """The K-fold runs before the final model: noise pruning (its fitter's labels pruned; the table
    of the training labels left out) and cross-fitting (the out-of-fold calibration set, each fold
    model's scores of the validation split, and the values a fold model could not learn:
    :func:`~catalog_enrichment.training.stack.unlearned_values`)."""
    tcfg, splits = data.cfg.training, data.splits

    def score(model: AnyModel, idx: np.ndarray) -> Predictions:
        return predict(model, data.scoring(idx), data.device)

    issues = None
    if tcfg.noise_pruning.enabled:
        pcfg = tcfg.noise_pruning
        plan = FoldPlan(splits.train, data.labels, data.groups, pcfg.folds, tcfg.seed + 1000)
        fitter.train_labels, fitter.selection_labels, issues = prune_noisy_labels(
            splits, plan, data.taxonomy, pcfg.fraction, fitter, score, say, data.records.product_id
        )
    if not data.folds:
        return issues, None, (), {}
    plan = FoldPlan(splits.train, data.labels, data.groups, data.folds, tcfg.seed)
    scores, labels, fold_val = crossfit(plan, fitter, score, say, also=splits.validation)
    unlearned = unlearned_values(fitter.train_labels, splits.train, data.taxonomy, plan.folds())
    for name, values in unlearned.items():
        say(f"cross-fit: {name}: {', '.join(values)}: {UNLEARNED}")
    return issues, (scores, labels), fold_val, unlearned
