"""Spark glue: score a DataFrame of valid products with ``mapInArrow``, one model load per worker.

The driver ships the model bundle folder as a zip with ``SparkContext.addArchive`` (executors
unpack it once and need no MLflow access; the downloaded versions beside it that no run has shipped
for :data:`UNUSED_FOR` are removed then) and passes a small, picklable :class:`ScoringSpec`. Each
Python worker loads the bundle the first time it sees the spec and keeps the
:class:`BatchPredictor` in a module-level cache; Spark reuses Python workers across tasks
(``spark.python.worker.reuse``, on by default), so a worker loads the model once, not once per
batch or per task. Arrow batches go straight to the predictor (no pandas conversion); it re-cuts
them to the model's batch size and overlaps image decoding with the forward pass; the decision is
applied in the worker, so only written values travel back.

Accumulators count model loads per worker process, Arrow batches, the products whose vector the
embedding store gave or took, and the run health tallies (:class:`ScoringCounters`), for the run
report, the progress line and the test that proves one load per worker.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.accumulators import Accumulator, AccumulatorParam

from catalog_enrichment.data.images import image_source
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.faults import armed, kill_this_process
from catalog_enrichment.inference.options import PredictorOptions

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from catalog_enrichment.health import HealthTally
    from catalog_enrichment.inference.decide import DecisionPolicy, FlatDecisions
    from catalog_enrichment.inference.predictor import BatchPredictor, Scores

__all__ = [
    "DECISION_COLUMNS",
    "ENCODED_SCHEMA",
    "OUTPUT_SCHEMA",
    "ScoringCounters",
    "ScoringSpec",
    "encode_dataframe",
    "encoded_batch",
    "mark_shared_images",
    "prune_downloads",
    "score_dataframe",
    "shared_image_digests",
    "ship_bundle",
    "spark_output_schema",
    "stage_vectors",
]

# What a scoring task returns per valid product.
OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string()),
        pa.field("image_error", pa.string()),
        pa.field("scored", pa.list_(pa.string())),
        # the attributes a merchant's value settles for the product: the catalog drops model values there
        pa.field("settled", pa.list_(pa.string())),
        pa.field(
            "values",
            pa.list_(
                pa.struct(
                    [
                        pa.field("attribute", pa.string()),
                        pa.field("value", pa.string()),
                        pa.field("confidence", pa.float64()),
                        pa.field("threshold", pa.float64()),
                    ]
                )
            ),
        ),
        # the embedding store's side output: what the encoders read (digest) and, for a product
        # encoded by this task, its packed vector (null when it came from the store)
        pa.field("content", pa.string()),
        pa.field("embedding", pa.binary()),
        # the digest of the image bytes read: the same on many products is a placeholder
        pa.field("image_digest", pa.string()),
        # where the photo was read from (data.images.image_source; null: inline bytes, no URI, or
        # the stored vector fused)
        pa.field("image_source", pa.string()),
    ]
)
# the columns the driver reads back of the staged scores (the vectors go to the store, not to it)
DECISION_COLUMNS = (
    "product_id",
    "image_error",
    "scored",
    "settled",
    "values",
    "image_digest",
    "image_source",
)
SCORING_INPUT = (
    "product_id",
    "title",
    "description",
    "image",
    "image_uri",
    "merchant_attributes",
    "category",  # a lexical model's n-grams read it, and the run health checks
    "stored_content",
    "stored_embedding",
)

# What an encoding task reads (the encoders' inputs and the stored vector, no decision inputs).
ENCODING_INPUT = tuple(c for c in SCORING_INPUT if c not in ("merchant_attributes", "category"))


@dataclass(frozen=True)
class ScoringSpec:
    """Everything a worker needs, picklable: where the bundle is and how to run it."""

    bundle_name: str  # SparkFiles name of the shipped bundle archive (unpacked folder) ...
    bundle_path: str | None  # ... or a path every worker can read (tests, single machine)
    allowed_taxonomy: dict[str, Any]
    device: str = "auto"
    torch_threads: int | None = None
    predictor: PredictorOptions = field(default_factory=PredictorOptions)
    # product id -> the "attribute=value"s people rejected for this model version: never written
    rejected: dict[str, list[str]] = field(default_factory=dict)
    # products read again because their photo could not be used by an earlier run: they have a photo
    # by that choice, so the run health's image check does not count them
    retried: frozenset[str] = frozenset()

    def model_key(self) -> tuple[Any, ...]:
        """What a worker's loaded model depends on: the bundle, how it runs and the taxonomy it may
        write - not which values people rejected (that changes per run, the model does not)."""
        taxonomy = json.dumps(self.allowed_taxonomy, sort_keys=True)
        return (self.bundle_name, self.bundle_path, taxonomy, self.predictor)


class _HealthTallies(AccumulatorParam["HealthTally"]):
    """AccumulatorParam merging :class:`~catalog_enrichment.health.HealthTally` counts."""

    def zero(self, value: HealthTally | None) -> HealthTally:
        from catalog_enrichment.health import HealthTally

        return HealthTally()

    def addInPlace(self, a: HealthTally, b: HealthTally) -> HealthTally:
        return a.merge(b)


class _PidCounts(AccumulatorParam[dict[int, int]]):
    """AccumulatorParam merging ``{pid: loads}`` dicts."""

    def zero(self, value: dict[int, int]) -> dict[int, int]:
        return {}

    def addInPlace(self, a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
        for k, v in b.items():
            a[k] = a.get(k, 0) + v
        return a


@dataclass
class ScoringCounters:
    """Driver-side accumulators: model loads per worker pid, Arrow batches scored, and products
    whose vector came from the embedding store (``reused``) or was encoded for it (``encoded``)."""

    loads: Accumulator[dict[int, int]]
    batches: Accumulator[int]
    reused: Accumulator[int]
    encoded: Accumulator[int]
    health: Accumulator[HealthTally]  # every scored product's

    @classmethod
    def create(cls, spark: SparkSession) -> ScoringCounters:
        sc = spark.sparkContext
        return cls(
            sc.accumulator({}, _PidCounts()),
            sc.accumulator(0),
            sc.accumulator(0),
            sc.accumulator(0),
            sc.accumulator(_HealthTallies().zero(None), _HealthTallies()),
        )


# Per Python worker process: (device, ScoringSpec.model_key()) -> (predictor, policy).
_WORKER_CACHE: dict[tuple[Any, ...], tuple[BatchPredictor, DecisionPolicy | None]] = {}


def ship_bundle(spark: SparkSession, bundle_dir: Path) -> str:
    """Zip the bundle folder beside it (once) and add it as a Spark archive; returns its name.

    Spark ships archives to every executor and unpacks them there (``addFile`` cannot ship a
    folder outside local mode); the name is unique per model version (``<name>-v<version>-<run>``).
    Other downloaded versions beside it are pruned (:func:`prune_downloads`).
    """
    archive = zipped_bundle(bundle_dir)
    name = archive.name
    if name not in _SHIPPED.get(id(spark.sparkContext), set()):
        spark.sparkContext.addArchive(str(archive))
        _SHIPPED.setdefault(id(spark.sparkContext), set()).add(name)
    prune_downloads(bundle_dir)
    return name


_SHIPPED: dict[int, set[str]] = {}
# the folder names registry.download_bundle gives the versions it downloads (<name>-v<version>-<run>)
_DOWNLOADED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*-v\d+-[0-9a-f]{12}")
UNUSED_FOR = 7 * 24 * 3600  # seconds: a downloaded version no run shipped for this long is removed


def prune_downloads(bundle_dir: Path, *, now: float | None = None) -> list[Path]:
    """Mark the downloaded version ``bundle_dir`` (and its zip) used ``now`` and remove the other
    versions downloaded beside it, folders and zips, that no run has shipped for :data:`UNUSED_FOR`;
    returns what was removed. A run marks its version when it ships it, before it scores, so a run on
    an older version (a backfill) keeps its files unless it ran that long. A folder not named as
    ``registry.download_bundle`` names its downloads (a bundle given by path) prunes nothing."""
    if not _DOWNLOADED.fullmatch(bundle_dir.name):
        return []
    now = time.time() if now is None else now
    for used in (bundle_dir, bundle_dir.parent / f"{bundle_dir.name}.zip"):
        with contextlib.suppress(OSError):  # no zip (never shipped), or not ours to mark
            os.utime(used, (now, now))
    removed = []
    for path in bundle_dir.parent.iterdir():
        version = path.name.removesuffix(".zip")
        if version == bundle_dir.name or not _DOWNLOADED.fullmatch(version):
            continue
        try:
            if now - path.stat().st_mtime < UNUSED_FOR:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:  # another run removed it first
            continue
        removed.append(path)
    return removed


def zipped_bundle(bundle_dir: Path) -> Path:
    """The bundle folder zipped beside it (``<folder>.zip``), made once. Each maker zips under a
    name of its own and renames the whole zip into place: two runs on one machine zipping the same
    bundle at once both find it whole, and neither ships half of one. A zip that fails part-way (a
    full disk) is removed, not left beside the bundle for each retry to add another."""
    import uuid

    archive = bundle_dir.parent / f"{bundle_dir.name}.zip"
    if not archive.is_file():
        tmp = bundle_dir.parent / f".{bundle_dir.name}.{uuid.uuid4().hex}.tmp.zip"
        try:
            shutil.make_archive(str(tmp.with_suffix("")), "zip", root_dir=bundle_dir)
            tmp.replace(archive)
        finally:
            tmp.unlink(missing_ok=True)
    return archive


def _worker_device(spec: ScoringSpec) -> str:
    """The device of this worker: ``spec.device`` resolved, on CUDA the GPU Spark gave the task."""
    from catalog_enrichment.inference import resolve_device

    if resolve_device(spec.device) == "cpu":
        return "cpu"
    from pyspark import TaskContext

    ctx = TaskContext.get()
    gpus = ctx.resources().get("gpu") if ctx is not None else None
    return f"cuda:{gpus.addresses[0]}" if gpus is not None and gpus.addresses else "cuda"


def _worker_state(
    spec: ScoringSpec, loads: Accumulator[dict[int, int]], *, decide: bool = True
) -> tuple[BatchPredictor, DecisionPolicy | None]:
    """This worker's ``(predictor, decision policy)`` for ``spec``, loaded once per worker process
    (``decide`` False: no policy, for a bundle of encoders that was never calibrated)."""
    import torch

    import catalog_enrichment  # noqa: F401  (torchvision fix before timm loads)
    from catalog_enrichment.contracts import Taxonomy
    from catalog_enrichment.inference.bundle import load_bundle
    from catalog_enrichment.inference.decide import DecisionPolicy
    from catalog_enrichment.inference.predictor import BatchPredictor

    device = _worker_device(spec)
    if device == "cpu":
        from pyspark import TaskContext

        ctx = TaskContext.get()
        threads = spec.torch_threads or (ctx.cpus() if ctx is not None else None) or 1
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    key = (device, decide, *spec.model_key())
    state = _WORKER_CACHE.get(key)
    if state is None:
        if _WORKER_CACHE:  # a new model version: the old one is freed first
            _WORKER_CACHE.clear()
            gc.collect()
        if spec.bundle_path is not None:
            path = spec.bundle_path
        else:
            from pyspark import SparkFiles

            path = SparkFiles.get(spec.bundle_name)
        bundle = load_bundle(path, device=device)
        predictor = BatchPredictor(bundle, spec.predictor, device=device)
        allowed = Taxonomy.from_dict(spec.allowed_taxonomy, source="config")
        policy = DecisionPolicy(bundle.taxonomy, bundle.calibration, allowed) if decide else None
        state = (predictor, policy)
        _WORKER_CACHE[key] = state  # one model per worker: a new version replaces the old one
        loads.add({os.getpid(): 1})
    return state


def score_batches(
    predictor: BatchPredictor,
    policy: DecisionPolicy,
    batches: Iterable[pa.RecordBatch],
    rejected: Mapping[str, Sequence[str]] | None = None,
    tally: HealthTally | None = None,
    retried: Collection[str] = frozenset(),
) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Score a stream of Arrow batches of valid products; per batch the decisions (``OUTPUT_SCHEMA``)
    and how many of its products were fused from stored vectors (``tally``: a
    :class:`~catalog_enrichment.health.HealthTally` the run health counts are added to; ``retried``:
    :attr:`ScoringSpec.retried`).

    This is a Spark task's whole loop: one preparation pipeline runs ahead across the batches.
    """
    for batch, scores in predictor.score_stream(b for b in batches if b.num_rows):
        yield decide_batch(policy, batch, scores, rejected, tally, retried), scores.reused


def score_batch(predictor: BatchPredictor, policy: DecisionPolicy, batch: pa.RecordBatch) -> pa.RecordBatch:
    """Score one Arrow batch of valid products and return the decisions (``OUTPUT_SCHEMA``)."""
    return decide_batch(policy, batch, predictor.score_arrow(batch))


def _rejected_matrix(
    policy: DecisionPolicy, batch: pa.RecordBatch, rejected: Mapping[str, Sequence[str]] | None
) -> np.ndarray | None:
    """``(n, len(policy.all_values))`` bool: the batch's values people rejected (None: none)."""
    if not rejected:
        return None
    ids = batch.column("product_id").to_pylist()
    hits = [(i, policy.column_of(pair)) for i, pid in enumerate(ids) for pair in rejected.get(pid, ())]
    hits = [(i, c) for i, c in hits if c is not None]
    if not hits:
        return None
    blocked = np.zeros((batch.num_rows, len(policy.all_values)), bool)
    rows, cols = zip(*hits, strict=True)
    blocked[list(rows), list(cols)] = True
    return blocked


def tally_health(
    policy: DecisionPolicy,
    batch: pa.RecordBatch,
    scores: Scores,
    flat: FlatDecisions,
    tally: HealthTally,
    retried: Collection[str] = frozenset(),
) -> None:
    """Add one scored batch to the run health counts: per attribute with a baseline, the scores of
    the products scored for it and what was written; the inputs of every product in the batch (the
    photo's presence not of the ``retried`` ones: :attr:`ScoringSpec.retried`)."""
    profile = policy.health
    if profile is None:
        return
    product = np.repeat(np.arange(len(flat.offsets) - 1), np.diff(flat.offsets))
    for a, attr in enumerate(policy.taxonomy):
        base = profile.attributes.get(attr.name)
        if base is None:
            continue
        mine = flat.attribute == a
        rows = np.asarray(scores.probs[attr.name])[flat.scored[:, a]]
        tally.add_attribute(attr.name, base, rows, len(np.unique(product[mine])), flat.confidence[mine])
    if profile.inputs is not None:
        from catalog_enrichment.health import ProductInputs

        inputs = ProductInputs.of(
            batch, scores.image_error, scores.tone, empty_uri_is_photo=profile.inputs.empty_uri_is_photo
        )
        ids = batch.column("product_id").to_pylist() if retried else []
        tally.add_inputs(profile.inputs, inputs, photos=[p not in retried for p in ids] if retried else None)


def decide_batch(
    policy: DecisionPolicy,
    batch: pa.RecordBatch,
    scores: Scores,
    rejected: Mapping[str, Sequence[str]] | None = None,
    tally: HealthTally | None = None,
    retried: Collection[str] = frozenset(),
) -> pa.RecordBatch:
    """The decisions for one scored Arrow batch (``OUTPUT_SCHEMA``), built from arrays, not per row;
    ``rejected`` (product id -> ``attribute=value``): values never written; ``tally``: the run
    health counts, added to (``retried``: :attr:`ScoringSpec.retried`)."""
    scores = scores.finite()
    names = batch.schema.names
    attributes = policy.taxonomy.names
    filled = (
        policy.filled(batch.column("merchant_attributes"))
        if "merchant_attributes" in names
        else np.zeros((batch.num_rows, len(attributes)), bool)
    )
    skip = np.array([e is not None for e in scores.image_error], bool)
    flat = policy.decide_flat(scores.probs, filled, skip, _rejected_matrix(policy, batch, rejected))
    if tally is not None:
        tally_health(policy, batch, scores, flat, tally, retried)
    attribute_names = pa.array(attributes, pa.string())
    values_type = OUTPUT_SCHEMA.field("values").type
    written = pa.StructArray.from_arrays(
        [
            attribute_names.take(flat.attribute),
            pa.array(policy.all_values, pa.string()).take(flat.value),
            pa.array(flat.confidence, pa.float64()),
            pa.array(flat.threshold, pa.float64()),
        ],
        fields=list(values_type.value_type),
    )
    return pa.RecordBatch.from_arrays(
        [
            batch.column("product_id"),
            pa.array(scores.image_error, pa.string()),
            _attribute_lists(flat.scored, attribute_names),
            _attribute_lists(flat.settled, attribute_names),
            pa.ListArray.from_arrays(flat.offsets.astype(np.int32), written, type=values_type),
            _or_nulls(scores.content, batch.num_rows, pa.string()),
            _or_nulls(scores.embedding, batch.num_rows, pa.binary()),
            _or_nulls(scores.image_digest, batch.num_rows, pa.string()),
            _image_sources(batch, scores.fused),
        ],
        schema=OUTPUT_SCHEMA,
    )


def _image_sources(batch: pa.RecordBatch, fused: Sequence[bool] | None) -> pa.Array:
    """Each product's :func:`~catalog_enrichment.data.images.image_source`: of the ``image_uri`` its
    photo was read from, null where it has inline bytes (which win over the URI) or its stored
    vector was ``fused`` (no photo read: it tells nothing of the source tonight)."""
    names = batch.schema.names
    if "image_uri" not in names:
        return pa.nulls(batch.num_rows, pa.string())
    skip = batch.column("image").is_valid().to_pylist() if "image" in names else [False] * batch.num_rows
    if fused is not None:
        skip = [a or b for a, b in zip(skip, fused, strict=True)]
    uris = batch.column("image_uri").to_pylist()
    return pa.array([None if s else image_source(u) for s, u in zip(skip, uris, strict=True)], pa.string())


def _attribute_lists(mask: np.ndarray, names: pa.Array) -> pa.ListArray:
    """Per product (row of ``(n, n_attributes)`` ``mask``), the names of its attributes set."""
    _, columns = np.nonzero(mask)  # row-major: by product, then attribute
    offsets = np.zeros(mask.shape[0] + 1, np.int32)
    np.cumsum(mask.sum(axis=1), out=offsets[1:])
    return pa.ListArray.from_arrays(offsets, names.take(columns), type=pa.list_(pa.string()))


def _or_nulls(values: list[Any] | None, n: int, kind: pa.DataType) -> pa.Array:
    return pa.nulls(n, kind) if values is None else pa.array(values, kind)


def spark_output_schema() -> Any:
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(OUTPUT_SCHEMA)


def _fault_kill_worker_once() -> None:
    """Fault hook ``worker:<marker file>`` (``catalog_enrichment.faults``): the first Python worker to
    create the marker SIGKILLs itself (the crash tests check Spark retries the task)."""
    marker = armed("worker")
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    kill_this_process()


def score_dataframe(valid: DataFrame, spec: ScoringSpec, counters: ScoringCounters) -> DataFrame:
    """The scored DataFrame (lazy): one row per input row, ``OUTPUT_SCHEMA`` columns.

    The enrichment job passes the valid rows (every rule passed, duplicates included).
    """
    loads, batches, reused, encoded = counters.loads, counters.batches, counters.reused, counters.encoded
    health = counters.health

    def score_partition(iterator: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        rows = (b for b in iterator if b.num_rows)
        first = next(rows, None)
        if first is None:
            return  # an empty partition loads no model (a run with nothing new, an empty hash bucket)
        predictor, policy = _worker_state(spec, loads)
        assert policy is not None  # decide=True loads one
        stream = itertools.chain([first], rows)
        from catalog_enrichment.health import HealthTally

        tally = HealthTally()
        for out, n_reused in score_batches(predictor, policy, stream, spec.rejected, tally, spec.retried):
            batches.add(1)
            reused.add(n_reused)
            encoded.add(pc.count(out.column("embedding")).as_py())
            health.add(tally.take())  # this batch's counts; the next batch counts afresh
            yield out
            _fault_kill_worker_once()

    present = [c for c in SCORING_INPUT if c in valid.columns]
    return valid.select(*present).mapInArrow(score_partition, spark_output_schema())


# What an encoding task returns per product (:func:`encode_dataframe`).
ENCODED_SCHEMA = pa.schema(
    [
        pa.field("product_id", pa.string()),
        pa.field("content", pa.string()),
        pa.field("embedding", pa.binary()),  # null: read from the store, or the image did not decode
        pa.field("image_error", pa.string()),
        pa.field("image_digest", pa.string()),
    ]
)


def encode_dataframe(products: DataFrame, spec: ScoringSpec, counters: ScoringCounters) -> DataFrame:
    """The encoders' packed vectors of ``products`` (lazy, ``ENCODED_SCHEMA``): the scoring tasks'
    preparation and encoders, without deciding anything. ``spec`` names a bundle whose model is
    storable and ``spec.predictor.embedding_store`` is on; a row carrying a stored vector of the same
    content (``stored_content``, ``stored_embedding``) is not encoded again."""
    loads, reused, encoded = counters.loads, counters.reused, counters.encoded

    def encode_partition(iterator: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        rows = (b for b in iterator if b.num_rows)
        first = next(rows, None)
        if first is None:
            return
        predictor, _ = _worker_state(spec, loads, decide=False)
        if predictor.width == 0:
            raise CatalogEnrichError(
                f"the embedding store is filled by CPU executors (this one scores on {predictor.device}): "
                "set inference.device: cpu"
            )
        for batch, scores in predictor.score_stream(itertools.chain([first], rows)):
            out = encoded_batch(batch, scores)
            reused.add(scores.reused)
            encoded.add(pc.count(out.column("embedding")).as_py())
            yield out

    from pyspark.sql.pandas.types import from_arrow_schema

    present = [c for c in ENCODING_INPUT if c in products.columns]
    return products.select(*present).mapInArrow(encode_partition, from_arrow_schema(ENCODED_SCHEMA))


def encoded_batch(batch: pa.RecordBatch, scores: Scores) -> pa.RecordBatch:
    """What an encoding task returns for one scored batch (``ENCODED_SCHEMA``): as the scoring path,
    a product the model scored NaN or infinite is a :data:`~catalog_enrichment.contracts.SCORES_FINITE`
    failure without a vector (stored, it would be fused to NaN by every later run)."""
    scores = scores.finite()
    return pa.RecordBatch.from_arrays(
        [
            batch.column("product_id"),
            _or_nulls(scores.content, batch.num_rows, pa.string()),
            _or_nulls(scores.embedding, batch.num_rows, pa.binary()),
            pa.array(scores.image_error, pa.string()),
            _or_nulls(scores.image_digest, batch.num_rows, pa.string()),
        ],
        schema=ENCODED_SCHEMA,
    )


def shared_image_digests(staged: DataFrame, limit: int, known: Iterable[str] = ()) -> list[str]:
    """The image digests of the staged rows of ``staged`` (scores or encodings) on more than
    ``limit`` distinct products whose image was read, and those of ``known`` (placeholders found
    before) that are there: placeholders (none when ``limit`` is 0)."""
    from pyspark.sql import functions as F

    if not limit:
        return []
    again = sorted(set(known))
    rows = (
        staged.where(F.col("image_digest").isNotNull())
        .groupBy("image_digest")
        .agg(F.countDistinct("product_id").alias("_products"))
        .where((F.col("_products") > limit) | F.col("image_digest").isin(again))
        .select("image_digest")
        .collect()
    )
    return sorted(r["image_digest"] for r in rows)


def mark_shared_images(spark: SparkSession, path: Path, digests: Sequence[str]) -> None:
    """Rewrite the staged rows at ``path`` (scores or encodings) whose image is one of ``digests``
    as :data:`~catalog_enrichment.contracts.IMAGE_SHARED` failures, without a vector: a placeholder
    read under those products' own URLs, which the run neither writes for nor stores, and whose
    products later runs read again."""
    import shutil

    from pyspark.sql import functions as F

    from catalog_enrichment.contracts import IMAGE_SHARED

    staged = spark.read.parquet(str(path))
    shared = spark.createDataFrame([(d,) for d in digests], "image_digest string").withColumn(
        "_shared", F.lit(True)
    )
    hit = F.col("_shared").isNotNull() & F.col("image_error").isNull()

    def column(name: str) -> Any:
        if name == "image_error":
            return F.when(hit, F.lit(IMAGE_SHARED)).otherwise(F.col(name)).alias(name)
        if name == "embedding":
            return F.when(hit, F.lit(None)).otherwise(F.col(name)).alias(name)
        return F.col(name)

    marked = staged.join(F.broadcast(shared), "image_digest", "left").select(
        *(column(c) for c in staged.columns)
    )
    target = path.with_name(path.name + "-marked")
    marked.write.mode("overwrite").parquet(str(target))
    shutil.rmtree(path)
    target.rename(path)


def stage_vectors(encoded: DataFrame, encoder: str, run_id: str, path: Path) -> None:
    """The freshly encoded vectors of ``encoded`` (``content``, ``image_digest``, ``embedding``; null:
    none) as the embeddings contract's rows at ``path`` (:func:`~catalog_enrichment.catalog.embeddings.
    stored_content`), one per product, for ``Catalog.write_embeddings``."""
    from pyspark.sql import functions as F

    from catalog_enrichment.catalog.embeddings import stored_content

    encoded.where(F.col("embedding").isNotNull()).select(
        F.lit(encoder).alias("encoder"),
        "product_id",
        stored_content(F.col("content"), F.col("image_digest")).alias("content"),
        "embedding",
        F.lit(run_id).alias("run_id"),
        F.current_timestamp().alias("written_at"),
    ).dropDuplicates(["product_id"]).write.mode("overwrite").parquet(str(path))
