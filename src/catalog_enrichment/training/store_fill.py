"""The frozen encoders' vectors of a table's products into the catalog's embedding store, as a Spark
job over the executors (``catalog-enrich embeddings --fill``).

With ``training.encoders: frozen`` the encoders never change while a model trains, so what they
make of a product can be computed ahead by the cluster and read back: by the training, whose frozen
encoders read the store first and encode on the driver only what is missing, and by the enrichment
job of every model version with the same encoders. The job builds the encoders exactly as training
does (the configured pretrained weights and tokenizer, the training seed, the encoder runtime), so
its vectors carry the fingerprint training looks up; it ships them to the executors as a bundle of
their own (heads never calibrated, nothing decided), where the scoring tasks' preparation and
encoders run. A product whose stored vector has the same content digest is not encoded again; one
whose image does not decode is counted and left out (training and the enrichment job decide what
happens to it), and so is one whose image bytes are on more than ``validation.max_products_per_image``
products of the table, or are bytes an enrichment run found to be a placeholder: a CDN's outage image
behind the products' own URLs, whose vector every later run would otherwise fuse in place of the
photo. The catalog's lock is held for the whole job, as a backfill does.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from catalog_enrichment.calibration import Calibration
from catalog_enrichment.catalog.base import Catalog
from catalog_enrichment.catalog.products import read_products
from catalog_enrichment.catalog.reports import placeholders_found
from catalog_enrichment.config import AppConfig
from catalog_enrichment.contracts import IMAGE_SHARED, Taxonomy, load_contract
from catalog_enrichment.data.dataset import build_tokenizer
from catalog_enrichment.data.images import ImagePolicy
from catalog_enrichment.embeddings import vectors as embedding
from catalog_enrichment.errors import ConfigError
from catalog_enrichment.inference.bundle import ModelBundle, save_bundle
from catalog_enrichment.inference.options import PredictorOptions
from catalog_enrichment.inference.spark import (
    ScoringCounters,
    ScoringSpec,
    encode_dataframe,
    mark_shared_images,
    shared_image_digests,
    ship_bundle,
    stage_vectors,
)
from catalog_enrichment.training.fit import check_encoders_mode
from catalog_enrichment.training.trained import seeded_model
from catalog_enrichment.types import Say

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["FillOutcome", "fill_embedding_store"]


@dataclass(frozen=True)
class FillOutcome:
    """What one fill did: the encoders' fingerprint, products read, vectors found in the store,
    encoded on the executors and stored, products whose image did not decode or whose scores were
    not finite, placeholders' products left out, and the wall time."""

    encoder: str
    products: int
    reused: int
    encoded: int
    stored: int
    image_errors: int
    placeholders: int
    seconds: float


def _encoder_bundle(cfg: AppConfig, taxonomy: Taxonomy, folder: Path) -> tuple[Path, str]:
    """The frozen encoders training would build, saved as a bundle under ``folder``; its fingerprint.

    Raises:
        ConfigError: not frozen, or encoders whose outputs the store cannot hold.
    """
    if cfg.training.encoders != "frozen":
        raise ConfigError(
            "the embedding store is filled ahead for training.encoders: frozen "
            f"(not {cfg.training.encoders}): the encoders of any other mode change while the model trains"
        )
    check_encoders_mode(cfg.model, cfg.training)
    mcfg = cfg.model
    if not mcfg.text.pretrained_path:
        raise ConfigError(
            "the embedding store is filled ahead only for a pretrained tokenizer "
            "(model.text.pretrained_path): a trained one depends on the training split's texts"
        )
    member = mcfg.member_configs()[0]
    tokenizer = build_tokenizer(mcfg.text, ())
    embedder = seeded_model(member, taxonomy, tokenizer, cfg.training.seed)
    if not embedding.storable(embedder):
        raise ConfigError(
            f"model.fusion {member.fusion} reads token sequences or per-field encodings; the embedding store "
            "holds pooled vectors (use a fusion over pooled vectors, e.g. concat)"
        )
    calibration = Calibration(
        cfg.calibration.target_precision, cfg.calibration.confidence, cfg.calibration.bound,
        cfg.calibration.min_support,
    )  # fmt: skip
    encoder = embedding.encoder_fingerprint(embedder, tokenizer, mcfg.text.max_length)
    bundle = ModelBundle(embedder, tokenizer, taxonomy, calibration, member, {})
    return save_bundle(folder / f"encoders-{encoder}", bundle), encoder


def fill_embedding_store(
    spark: SparkSession,
    cfg: AppConfig,
    taxonomy: Taxonomy,
    data: str | Path,
    catalog: Catalog,
    *,
    say: Say = print,
) -> FillOutcome:
    """Encode the products of ``data`` (a products or labelled table, Delta or Parquet) that the
    store lacks for the configured frozen encoders, on the executors, and store their vectors."""
    from pyspark.sql import functions as F

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="encoders-") as tmp:
        bundle_dir, encoder = _encoder_bundle(cfg, taxonomy, Path(tmp))
        run_id = f"fill-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{encoder[:8]}"
        with catalog.lock(f"embeddings fill {run_id}", say):
            catalog.check_embeddings_storable()  # not hours of encoding for vectors no write can keep
            staging = catalog.staging_dir(run_id)
            try:
                # spread over every executor core: a table of a few large files reads as few partitions
                products = (
                    read_products(spark, data, load_contract("products"))
                    .where(F.col("product_id").isNotNull())
                    .repartition(spark.sparkContext.defaultParallelism, "product_id")
                )
                stored = catalog.stored_embeddings(spark, encoder)
                if stored is not None:
                    products = products.join(stored, "product_id", "left")
                options = {**cfg.inference.predictor_options(), "embedding_store": True}
                limit = cfg.validation.max_products_per_image
                known = placeholders_found(catalog.read_reports(), limit)
                spec = ScoringSpec(
                    bundle_name=ship_bundle(spark, bundle_dir),
                    bundle_path=None,
                    allowed_taxonomy=taxonomy.to_dict(),
                    device=cfg.inference.device,
                    torch_threads=cfg.inference.torch_threads,
                    predictor=PredictorOptions(
                        **options,
                        image_policy=ImagePolicy.from_config(cfg.images, [data]),
                        placeholders=frozenset(known),
                    ),
                )
                counters = ScoringCounters.create(spark)
                encode_dataframe(products, spec, counters).write.parquet(str(staging / "encoded"))
                encoded = spark.read.parquet(str(staging / "encoded"))
                shared = shared_image_digests(encoded, limit, known)
                if shared:
                    mark_shared_images(spark, staging / "encoded", shared)
                    encoded = spark.read.parquet(str(staging / "encoded"))
                failed = (
                    encoded.where(F.col("image_error").isNotNull())
                    .groupBy((F.col("image_error") == IMAGE_SHARED).alias("shared"))
                    .count()
                    .collect()
                )
                errors = {bool(r["shared"]): int(r["count"]) for r in failed}
                stored_rows = 0
                if counters.encoded.value:
                    stage_vectors(encoded, encoder, run_id, staging / "embeddings")
                    stored_rows = catalog.write_embeddings(str(staging / "embeddings"), spark)
                return FillOutcome(
                    encoder,
                    encoded.count(),
                    int(counters.reused.value),
                    int(counters.encoded.value),
                    stored_rows,
                    errors.get(False, 0),
                    errors.get(True, 0),
                    round(time.perf_counter() - started, 1),
                )
            finally:
                shutil.rmtree(staging, ignore_errors=True)
