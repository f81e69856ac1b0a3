"""The training pipeline: a labelled table -> a trained, calibrated, evaluated :class:`TrainedModel`.

    check -> survey -> tokenizer -> features and fit -> held-out scores -> calibrate -> evaluate

:func:`train` runs these steps once, whatever the table: a :class:`~.stream.Source` (a Delta or
Parquet table read in record batches) or a table already in memory (a source of its own). How the
products are read is the one thing ``training.streaming`` chooses:

* **in memory** (:class:`~.memory.InMemory`, the default): the usable products held whole,
  stratified grouped splits, frozen encoders' outputs cached once (the embedding store), then
  noise pruning, cross-fitting and the final fit - or the ``stack`` fitted in closed form over the
  cached features - and ensembles;
* **streamed** (:class:`~.distributed.Streamed`): one survey pass, hash splits, each epoch read
  again through a shuffle buffer, in this process or on ``training.distributed.processes`` ranks -
  or, for the ``stack``, one embedding pass and the closed-form fit over the vectors.

Each reading refuses by name what it cannot do before any data is read, surveys the table
(which products are usable, their labels and splits, the run health input baseline and the texts a
trained tokenizer learns from) and fits; the tokenizer, the single-valued attributes a model scores
as one distribution, the held-out scoring, calibration and the test report (:func:`.trained.conclude`)
are the pipeline's, the same for both. Rows are put in a canonical order (in memory) or read in table
order (streamed), so the same data, seed, config and torch thread count train the same weights in any
process. The caller picks the device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import torch
from transformers import set_seed

from catalog_enrichment.config import AppConfig
from catalog_enrichment.contracts import Taxonomy, check_attribute_names
from catalog_enrichment.data.dataset import EncodedLabels, build_tokenizer
from catalog_enrichment.health import InputBaseline
from catalog_enrichment.models import runtime
from catalog_enrichment.models.fusion import StackFusion
from catalog_enrichment.models.model import AnyModel, deterministic_algorithms
from catalog_enrichment.training.distributed import Streamed
from catalog_enrichment.training.fit import check_encoders_mode
from catalog_enrichment.training.memory import InMemory
from catalog_enrichment.training.stream import Source, arrow_source
from catalog_enrichment.training.trained import Fitted, TrainedModel, conclude
from catalog_enrichment.types import Say

if TYPE_CHECKING:
    from catalog_enrichment.catalog.base import Catalog

__all__ = ["Reading", "Surveyed", "train"]


class Surveyed(Protocol):
    """What a reading's survey hands the pipeline (besides what its own fit reads)."""

    @property
    def texts(self) -> Iterable[str]:
        """The training split's ``"title description"``: what a trained tokenizer learns from."""
        ...

    @property
    def inputs(self) -> InputBaseline:
        """The run health checks' input baseline over every product read."""
        ...

    @property
    def own_labels(self) -> EncodedLabels:
        """The labels of the table's usable products (not a separate test table's)."""
        ...


class Reading(Protocol):
    """How :func:`train` reads a labelled table (in memory or streamed)."""

    def check(self) -> None:
        """What this reading cannot do, refused by name before any data is read."""

    def survey(self, say: Say) -> Surveyed:
        """The usable products, their labels and splits, the input baseline, the tokenizer's texts."""
        ...

    def fit(self, surveyed: Any, tokenizer: Any, say: Say) -> Fitted:
        """The model fitted on the training split (features first: cached encoder outputs with
        frozen encoders), with what calibration reads besides the held-out splits."""
        ...


def train(
    table: pa.Table | Source,
    taxonomy: Taxonomy,
    cfg: AppConfig,
    *,
    test_table: pa.Table | None = None,
    device: torch.device | str = "cpu",
    progress: Say | None = None,
    store: Catalog | None = None,
) -> TrainedModel:
    """Survey, fit, score the held-out splits, calibrate and evaluate (see the module docstring).
    Distributed training needs an active SparkSession (``TorchDistributor`` runs the ranks through it).

    Args:
        table: labelled products (contract ``labelled_products``: text, image and label columns),
            in memory or a :class:`~.stream.Source` (the training job's: the table's own files).
        taxonomy: attributes and allowed values; every attribute needs a label column.
        cfg: the app config (model, training, images and calibration sections are used).
        test_table: labelled products to test on instead of a test split of ``table`` (e.g. a
            catalog's own held-out products; in memory only); ``None`` = ``training.test_fraction``.
        device: where to train; the caller decides (CPU in tests).
        progress: called with one line per epoch and stage.
        store: a catalog whose embedding store frozen encoders read and fill (in memory;
            ``embeddings.frozen.embed_products``); None: the private cache.

    Raises:
        ConfigError: a setting the reading does not support, named before any data is read.
        ContractError / TaxonomyError: missing label column, label values outside the taxonomy, an
            attribute named like an input column.
        CatalogEnrichError: too few rows for the splits.
    """
    started = time.perf_counter()
    say = progress or (lambda _msg: None)
    check_encoders_mode(cfg.model, cfg.training)
    check_attribute_names(taxonomy)  # a label named like an input column would be read as both
    reading = _reading(table, taxonomy, cfg, test_table, torch.device(device), store)
    reading.check()
    with deterministic_algorithms(True):
        set_seed(cfg.training.seed)
        surveyed = reading.survey(say)
        tokenizer = build_tokenizer(cfg.model.text, surveyed.texts)
        fitted = reading.fit(surveyed, tokenizer, say)
        # the attributes the model scores as one distribution: the taxonomy it is saved with says which
        taxonomy = taxonomy.with_single_valued(_single_valued(fitted.model))
        # with onnx, held-out scoring that runs the encoders (not cached vectors) runs the graphs that serve
        onnx = cfg.model.encoder_runtime == "onnx" and fitted.encodes
        with runtime.served_by_graphs(fitted.model, say) if onnx else contextlib.nullcontext():
            return conclude(fitted, taxonomy, cfg, surveyed.inputs, started, say)


def _reading(
    table: pa.Table | Source,
    taxonomy: Taxonomy,
    cfg: AppConfig,
    test_table: pa.Table | None,
    device: torch.device,
    store: Catalog | None,
) -> Reading:
    """The reading ``training.streaming`` chooses, over the table as a source: an ``image_uri`` may
    name a file under ``images.roots`` or the table's own folder (merchant URIs are read under the
    catalog's policy, like serving's)."""
    source = table if isinstance(table, Source) else arrow_source(table)
    roots = [source.folder] if source.folder else []
    if cfg.training.streaming.enabled:
        return Streamed(source, taxonomy, cfg, roots, device, test_table is not None)
    return InMemory(source, taxonomy, cfg, roots, device, test_table, store)


def _single_valued(model: AnyModel) -> list[str]:
    """The multi-label attributes a stack scores as one distribution (``StackFusion.single``)."""
    fusion = getattr(model, "fusion", None)
    if not isinstance(fusion, StackFusion):
        return []
    return [name for name, single in zip(fusion.names, fusion.single.tolist(), strict=True) if single]
