"""The enrichment run, one straight line:

    lock -> read -> validate -> breaker -> score + decide -> stage -> commit -> report

on a :class:`~catalog_enrichment.catalog.base.Catalog` (the embedded lakehouse or PostgreSQL,
``catalog.kind``):

0. **lock** the catalog (one run at a time) and remove what a killed run staged;
1. **read** the products (partition filter; incremental, unless ``full``: ``updated_at`` past the
   watermark of the last succeeded run over the same scope less ``catalog.lookback_seconds``,
   without the rows that run already read; a watermark is never later than its run's start);
2. **validate**: every rule counted and the duplicated ids found in one Spark job that reads no
   image, then the Great Expectations suite (it reports; the row rules decide); the circuit
   breaker aborts before anything is scored or written when too many rows fail;
3. **score + decide** the valid rows with ``mapInArrow`` (the model loaded once per Python worker):
   thresholds, taxonomy, merchant-filled attributes, values people rejected for this model version
   (``review import``) never written again; an image that cannot be read (outside the
   allowed roots, too large) or does not decode is found here; the decisions are staged as
   Parquet under ``<catalog.root>/_staging/<run id>``;
4. **write**: the catalog commits the values with the run's **quarantine** rows (idempotent per run
   id; a process killed before the commit leaves the tables as they were): one Delta MERGE, or
   COPY into a staging table and one PostgreSQL transaction;
5. **report**: a run-report row and an MLflow run in the enrichment experiment.

The caller passes the SparkSession, the MLflow client and the model version (DESIGN: only jobs/
and the CLI create those).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from catalog_enrichment.catalog import Catalog, open_catalog
from catalog_enrichment.catalog.base import MergeResult, RunWrite, fault_point
from catalog_enrichment.catalog.products import parse_partition
from catalog_enrichment.catalog.reports import RETRY, SEEN, RunReport, check_run_id, last_run
from catalog_enrichment.catalog.reviews import rejected_values
from catalog_enrichment.catalog.runs import backfill_plan
from catalog_enrichment.config import AppConfig
from catalog_enrichment.contracts import IMAGE_READABLE, Taxonomy, load_contract
from catalog_enrichment.data.images import ImagePolicy
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.health import Check, HealthTally, assess, blocked_attributes, plot_scores
from catalog_enrichment.inference.bundle import BundleFolder
from catalog_enrichment.inference.decide import DecisionPolicy
from catalog_enrichment.inference.predictor import PredictorOptions
from catalog_enrichment.inference.spark import (
    DECISION_COLUMNS,
    ScoringCounters,
    ScoringSpec,
    score_dataframe,
    ship_bundle,
)
from catalog_enrichment.redaction import redact_text
from catalog_enrichment.types import Say
from catalog_enrichment.validation.rules import (
    REASONS,
    CircuitBreakerTripped,
    Rule,
    ValidationCounts,
    build_rules,
    check_breaker,
    check_rows,
    count_rows,
    latest_copies,
    quarantine_rows,
)
from catalog_enrichment.validation.suite import run_suite
from catalog_enrichment.versions import ModelVersion

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "EnrichOutcome",
    "backfill_partitions",
    "check_model_fits",
    "flatten_scores",
    "new_run_id",
    "run_enrichment",
]


def _print(message: str) -> None:
    print(message, flush=True)


def new_run_id() -> str:
    return f"enrich-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


@dataclass
class EnrichOutcome:
    """The run report plus what only the caller needs (scoring counters, the MERGE result)."""

    report: RunReport
    already_done: bool = False
    merge: MergeResult | None = None
    model_loads: dict[int, int] = field(default_factory=dict)
    arrow_batches: int = 0
    health: RunHealth | None = None


@dataclass(frozen=True)
class Validated:
    """The rows with their failed rules (``_reasons``), the counts, the GX suite's summary."""

    checked: DataFrame
    counts: ValidationCounts
    expectations: dict[str, Any]


@dataclass(frozen=True)
class Scored:
    """The staged decisions of the valid rows, and the scoring stage's counters (with the embedding
    store: the model's encoder fingerprint, products fused from stored vectors and encoded)."""

    table: pa.Table
    model_loads: dict[int, int]
    arrow_batches: int
    encoder: str | None = None
    reused: int = 0
    encoded: int = 0
    health: HealthTally = field(default_factory=HealthTally)  # the run health counts (health.py)


@dataclass(frozen=True)
class RunHealth:
    """The run's health checks, the attributes they keep out of the commit, and what they compared."""

    checks: list[Check]
    blocked: list[str]
    modes: dict[str, str]
    policy: DecisionPolicy
    tally: HealthTally


@dataclass(frozen=True)
class Decisions:
    """What the run writes: values, scored pairs, quarantine rows; counts with the image rules."""

    values: pa.Table
    pairs: pa.Table
    quarantine: pa.Table
    counts: ValidationCounts
    rows_scored: int


def check_model_fits(bundle_dir: Path, taxonomy: Taxonomy) -> DecisionPolicy:
    """The model's heads against the configured taxonomy, before anything is read or written."""
    folder = BundleFolder(bundle_dir)
    return DecisionPolicy(folder.read_taxonomy(), folder.read_calibration(), taxonomy)


def run_enrichment(
    spark: SparkSession,
    cfg: AppConfig,
    taxonomy: Taxonomy,
    *,
    model: ModelVersion,
    products: str | Path | None = None,
    partition: str | None = None,
    full: bool = False,
    run_id: str | None = None,
    client: Any = None,
    progress: Say = _print,
    catalog: Catalog | None = None,
) -> EnrichOutcome:
    """One enrichment run (see the module docstring) on ``catalog`` (default: the configured one,
    ``products`` overriding its products table). Returns the outcome; raises on abort/failure after
    recording the run report (status ``aborted`` / ``failed``)."""
    run_id = check_run_id(run_id or new_run_id())
    catalog = catalog or open_catalog(cfg.catalog, products=products)
    with catalog.lock(f"run {run_id}", progress):
        return _locked_run(
            spark, cfg, catalog, taxonomy, model=model, partition=partition, full=full, run_id=run_id,
            client=client, progress=progress,
        )  # fmt: skip


def _locked_run(
    spark: SparkSession,
    cfg: AppConfig,
    catalog: Catalog,
    taxonomy: Taxonomy,
    *,
    model: ModelVersion,
    partition: str | None,
    full: bool,
    run_id: str,
    client: Any,
    progress: Say,
) -> EnrichOutcome:
    """:func:`run_enrichment` with the catalog's lock held."""
    reports = catalog.read_reports()
    previous = _previous(reports, run_id)
    if previous is not None:
        progress(f"run {run_id} already succeeded; nothing to do")
        return EnrichOutcome(previous, already_done=True)
    policy = check_model_fits(model.bundle, taxonomy)
    contract = load_contract("products")
    part = parse_partition(partition, contract)
    report = RunReport(
        run_id=run_id,
        model_name=model.name,
        model_version=model.version,
        partition=str(part) if part else None,
        started_at=dt.datetime.now(dt.UTC),
    )
    outcome, clock = EnrichOutcome(report), time.perf_counter()
    catalog.clear_staging()
    staging = catalog.staging_dir(run_id)
    try:
        with _stage(report, "read"):
            last = None if full else last_run(reports, report.partition)
            since = None if last is None else last.watermark
            kept = [] if last is None else last.summary().get(SEEN, [])
            seen = None if kept is None else [(str(p), int(at)) for p, at in kept]
            retry = {} if last is None else {str(p): int(n) for p, n in last.summary().get(RETRY, [])}
            lookback = dt.timedelta(seconds=cfg.catalog.lookback_seconds)
            df = catalog.read_products(
                spark, contract, partition=part, since=since and since - lookback, retry=sorted(retry)
            )
            df = _unseen(spark, df, [(p, at) for p, at in seen or [] if p not in retry])
            if not catalog.reads_snapshot:  # every stage reads the same rows: staged once
                df.write.mode("overwrite").parquet(str(staging / "source"))
                df = spark.read.parquet(str(staging / "source"))
            window = f"changed since {since - lookback:%Y-%m-%d %H:%M:%S}" if since else "full"
            if retry:
                window += f", {len(retry):,} products whose image could not be read tried again"
            progress(
                f"read products from {catalog.describe()} ({part or 'all partitions'}, {window}), "
                f"model {model.name} v{model.version}"
            )
        with _stage(report, "validate"):
            rules = build_rules(contract, cfg.validation, report.started_at, df.columns)
            validated = validate(df, rules, cfg, report, progress)
            report.watermark = max((w for w in (since, report.watermark) if w is not None), default=None)
            report.add_to_summary(**{SEEN: _near_watermark(df, seen, report.watermark, lookback)})
        check_breaker(validated.counts, cfg.validation.max_invalid_fraction)
        rejected = rejected_values(catalog.keyed_rows("reviews"), model.version)
        if rejected:
            progress(
                f"  {len(rejected):,} values people rejected for v{model.version}: never written, removed"
            )
            report.add_to_summary(rejected_by_review=len(rejected))
        if validated.counts.rows_read == 0:
            progress("  nothing to enrich: no new or changed products")
            if rejected:  # still take out what people rejected
                with _stage(report, "write"):
                    outcome.merge = catalog.write(_run_write(report, rejected))
            report.status = "succeeded"
            return _finish(outcome, catalog, cfg, client, clock, progress)
        with _stage(report, "score"):
            images = ImagePolicy.from_config(cfg.images, catalog.image_roots())
            scored = score(
                spark, validated.checked, model, taxonomy, cfg, images, staging, rejected, catalog, run_id
            )
        outcome.model_loads, outcome.arrow_batches = scored.model_loads, scored.arrow_batches
        if scored.encoder is not None:
            report.add_to_summary(embeddings_reused=scored.reused, embeddings_encoded=scored.encoded)
        outcome.health = _health(report, policy, scored, cfg, progress)
        with _stage(report, "decide"):
            decisions = decide(scored.table, validated, run_id)
        blocked = [] if outcome.health is None else outcome.health.blocked
        report.add_to_summary(row_rules=decisions.counts.per_rule)
        check_breaker(_new_rows(decisions, retry), cfg.validation.max_invalid_fraction)
        _account(report, decisions)
        again = _retry_next(decisions.quarantine, retry, cfg.validation.image_retries)
        report.add_to_summary(**{RETRY: again})
        fault_point("before_merge")
        with _stage(report, "write"):
            outcome.merge = catalog.write(_run_write(report, rejected, decisions, staging, blocked), spark)
        _written(report, decisions, policy, blocked)
        progress(
            f"  wrote {decisions.values.num_rows:,} values (version {outcome.merge.version}); "
            f"quarantined {decisions.quarantine.num_rows:,} rows"
        )
        if scored.encoder is not None:
            with _stage(report, "store"):
                _store_embeddings(spark, catalog, scored, staging, report, progress)
        report.status = "succeeded"
        return _finish(outcome, catalog, cfg, client, clock, progress)
    except BaseException as exc:
        aborted = isinstance(exc, CircuitBreakerTripped)
        report.status = "aborted" if aborted else "failed"
        error = str(exc) if aborted else f"{type(exc).__name__}: {exc}"
        report.add_to_summary(error=redact_text(error)[:2000])
        try:
            _finish(outcome, catalog, cfg, client, clock, progress)
        except Exception as inner:  # the original error matters more
            progress(f"  (could not record the {report.status} run: {redact_text(str(inner))})")
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _image_unread(quarantine: pa.Table) -> list[str]:
    """Ids of the products quarantined only because their image could not be read (transient)."""
    ids, reasons_of = quarantine["product_id"].to_pylist(), quarantine["reasons"].to_pylist()
    unread = zip(ids, reasons_of, strict=True)
    return [p for p, reasons in unread if p is not None and reasons == [IMAGE_READABLE]]


def _new_rows(decisions: Decisions, retry: dict[str, int]) -> ValidationCounts:
    """The counts without the retried products whose image still could not be read: an image
    host still down is not a new batch of bad rows (and a quiet night's only rows may be those)."""
    again = sum(pid in retry for pid in _image_unread(decisions.quarantine))
    counts = decisions.counts
    return ValidationCounts(
        counts.rows_read - again, counts.rows_invalid - again, counts.per_rule, counts.watermark
    )


def _retry_next(quarantine: pa.Table, retry: dict[str, int], cap: int) -> list[tuple[str, int]]:
    """(product id, attempts) of the products quarantined only because their image could not be
    read, which the next run reads again while their attempts stay within ``cap``."""
    attempts = [(pid, retry.get(pid, 0) + 1) for pid in _image_unread(quarantine)]
    return sorted((pid, n) for pid, n in attempts if n <= cap)


_UNIX_MICROS = "_updated_at_us"
MAX_SEEN = 100_000


def _unseen(spark: SparkSession, df: DataFrame, seen: list[tuple[str, int]]) -> DataFrame:
    """``df`` without the (product id, ``updated_at``) rows the last run already read."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    if not seen:
        return df
    schema = StructType([StructField("product_id", StringType()), StructField(_UNIX_MICROS, LongType())])
    done = F.broadcast(spark.createDataFrame(seen, schema))
    with_us = df.withColumn(_UNIX_MICROS, F.unix_micros("updated_at"))  # exact, no time-zone trip
    return with_us.join(done, ["product_id", _UNIX_MICROS], "left_anti").select(*df.columns)


def _near_watermark(
    df: DataFrame, seen: list[tuple[str, int]] | None, watermark: dt.datetime | None, lookback: dt.timedelta
) -> list[tuple[str, int]] | None:
    """(product id, ``updated_at`` in µs) of the rows read - by this run or the last - that the next
    run's look-back reads again; ``None`` when more than :data:`MAX_SEEN` (the next run reads them).
    When the last run kept none (``seen`` is None), this run read the whole look-back itself."""
    from pyspark.sql import functions as F

    if watermark is None or not lookback:
        return []
    mark = int(watermark.timestamp() * 1_000_000)  # rows after it (stamped in the future) are read again
    edge = int((watermark - lookback).timestamp() * 1_000_000)
    rows = (
        df.where(F.col("product_id").isNotNull() & F.unix_micros("updated_at").between(edge + 1, mark))
        .select("product_id", F.unix_micros("updated_at").alias(_UNIX_MICROS))
        .distinct()
        .limit(MAX_SEEN + 1)
        .collect()
    )
    near = sorted({*(p for p in seen or [] if p[1] > edge), *((r[0], int(r[1])) for r in rows)})
    return near if len(near) <= MAX_SEEN else None


def _previous(reports: list[RunReport], run_id: str) -> RunReport | None:
    """The report of a run with this id that already succeeded (a re-run does nothing)."""
    previous = next((r for r in reports if r.run_id == run_id), None)
    if previous is not None and previous.status == "rolled_back":
        raise CatalogEnrichError(f"run {run_id} was rolled back; start a new run with another run id")
    return previous if previous is not None and previous.status == "succeeded" else None


@contextlib.contextmanager
def _stage(report: RunReport, name: str) -> Iterator[None]:
    """Time one stage into ``report.stage_seconds``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        report.stage_seconds[name] = round(time.perf_counter() - started, 3)


def validate(df: DataFrame, rules: list[Rule], cfg: AppConfig, report: RunReport, say: Say) -> Validated:
    """Count every rule and find the duplicates (one pass), mark each row, run the GX suite.

    The report gets the rows read, the watermark and the validation summary (also when the circuit
    breaker trips next: the aborted run's report carries them).
    """
    counts, duplicates = count_rows(df, rules)
    report.rows_read = counts.rows_read
    # never past the run's start: a row stamped in the future (quarantined beyond the allowed clock
    # skew) must not make every later incremental run skip the products changed in between
    report.watermark = None if counts.watermark is None else min(counts.watermark, report.started_at)
    expectations: dict[str, Any] = {}
    if cfg.validation.run_expectations and counts.rows_read:
        try:
            expectations = run_suite(df, rules)
        except Exception as exc:  # the suite reports; the row rules decide
            expectations = {"expectations_error": f"{type(exc).__name__}: {exc}"[:2000]}
    report.add_to_summary(**expectations, row_rules=counts.per_rule)
    say(f"  validated {counts.rows_read:,} rows: {counts.rows_invalid:,} invalid ({counts.top_rules()})")
    return Validated(check_rows(df, rules, latest=latest_copies(duplicates)), counts, expectations)


def score(
    spark: SparkSession,
    checked: DataFrame,
    model: ModelVersion,
    taxonomy: Taxonomy,
    cfg: AppConfig,
    images: ImagePolicy,
    staging: Path,
    rejected: Iterable[tuple[str, str, str]] = (),
    catalog: Catalog | None = None,
    run_id: str = "",
) -> Scored:
    """Score and decide the valid rows on the executors (images read under ``images``; the
    (product, attribute, value)s in ``rejected`` never written); stage the decisions; read them back.

    With the embedding store (``inference.embedding_store`` and a model that can use it), the valid
    rows are joined to the catalog's stored vectors of the model's encoders first, and the vectors
    the tasks computed are staged under ``staging / "embeddings"`` for :func:`_store_embeddings`.
    """
    from pyspark.sql import functions as F

    encoder = BundleFolder(model.bundle).encoder_fingerprint() if cfg.inference.embedding_store else None
    spec = ScoringSpec(
        bundle_name=ship_bundle(spark, model.bundle),
        bundle_path=None,
        allowed_taxonomy=taxonomy.to_dict(),
        device=cfg.inference.device,
        torch_threads=cfg.inference.torch_threads,
        predictor=PredictorOptions(**cfg.inference.predictor_options(), image_policy=images),
        rejected=_by_product(rejected),
    )
    counters = ScoringCounters.create(spark)
    valid = checked.where(F.size(REASONS) == 0)
    stored = None if encoder is None or catalog is None else catalog.stored_embeddings(spark, encoder)
    if stored is not None:
        valid = valid.join(stored, "product_id", "left")
    score_dataframe(valid, spec, counters).write.mode("overwrite").parquet(str(staging / "scores"))
    table = ds.dataset(str(staging / "scores"), format="parquet").to_table(columns=list(DECISION_COLUMNS))
    if encoder is not None and counters.encoded.value:
        fresh = spark.read.parquet(str(staging / "scores")).where(F.col("embedding").isNotNull())
        fresh.select(
            F.lit(encoder).alias("encoder"),
            "product_id",
            "content",
            "embedding",
            F.lit(run_id).alias("run_id"),
            F.current_timestamp().alias("written_at"),
        ).dropDuplicates(["product_id"]).write.mode("overwrite").parquet(str(staging / "embeddings"))
    return Scored(
        table,
        dict(counters.loads.value),
        int(counters.batches.value),
        encoder,
        int(counters.reused.value),
        int(counters.encoded.value),
        counters.health.value,
    )


def _health(
    report: RunReport, policy: DecisionPolicy, scored: Scored, cfg: AppConfig, say: Say
) -> RunHealth | None:
    """The run health checks (health.py) into the run report - ``health`` (every check),
    ``health_failures`` (their messages), ``health_blocked`` (the attributes a failed check in block
    mode keeps out of the commit) - and returned (None: a model trained before the checks)."""
    if policy.health is None:
        return None
    h = cfg.validation.health
    checks = assess(
        policy.health,
        scored.health,
        target=policy.target_precision,
        false_alarm=h.false_alarm,
        min_products=h.min_products,
        min_psi=h.min_psi,
        min_share_change=h.min_share_change,
    )
    modes = h.modes()
    blocked = blocked_attributes(checks, modes, policy.taxonomy.names)
    failures = [str(c.message) for c in checks if c.status == "failed"]
    report.add_to_summary(
        health=[c.to_dict() for c in checks], health_failures=failures, health_blocked=blocked
    )
    say(f"  run health: {len(failures)} failed check(s)" + "".join(f"\n    {f}" for f in failures))
    if blocked:
        say(f"  run health: blocked, no value written: {', '.join(blocked)}")
    return RunHealth(checks, blocked, modes, policy, scored.health)


def _health_rows(report: RunReport, health: RunHealth) -> pa.Table:
    """The run's ``run_health`` rows (contract ``schemas/run_health.yaml``)."""
    from catalog_enrichment.catalog.base import keyed_schema
    from catalog_enrichment.health import INPUT

    rows = []
    for c in health.checks:
        mode = health.modes["inputs" if c.scope == INPUT else c.check]
        rows.append({
            **c.to_dict(),
            "run_id": report.run_id,
            "mode": mode,
            "blocked": c.status == "failed" and mode == "block",
            "model_name": str(report.model_name),
            "model_version": str(report.model_version),
            "checked_at": report.finished_at or report.started_at,
        })  # fmt: skip
    schema = keyed_schema("run_health")
    return pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)


def _store_embeddings(
    spark: SparkSession, catalog: Catalog, scored: Scored, staging: Path, report: RunReport, say: Say
) -> None:
    """After the commit: the vectors this run computed into the store. The store is a cache, so a
    failure here is reported and costs the next run the encoding; the committed run stands."""
    try:
        stored = catalog.write_embeddings(str(staging / "embeddings"), spark) if scored.encoded else 0
    except Exception as exc:
        error = redact_text(f"{type(exc).__name__}: {exc}")[:500]
        report.add_to_summary(embeddings_store_error=error)
        say(f"  could not store this run's embeddings (the next run encodes them again): {error}")
        return
    report.add_to_summary(embeddings_stored=stored)
    say(
        f"  embeddings: {scored.reused:,} products fused from the store, {scored.encoded:,} encoded, "
        f"{stored:,} stored"
    )


def _by_product(rejected: Iterable[tuple[str, str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for pid, attr, value in sorted(rejected):
        out.setdefault(pid, []).append(f"{attr}={value}")
    return out


def decide(scored: pa.Table, validated: Validated, run_id: str) -> Decisions:
    """Values and scored pairs of the rows whose image decoded; the quarantine rows of the others
    and of the rows that broke a rule; the counts with the image rules added."""
    from pyspark.sql import functions as F

    image_errors = scored.filter(pc.is_valid(scored["image_error"]))
    image_reasons = dict(
        zip(image_errors["product_id"].to_pylist(), image_errors["image_error"].to_pylist(), strict=True)
    )
    counts = validated.counts
    total = ValidationCounts(
        counts.rows_read,
        counts.rows_invalid + len(image_reasons),
        {**counts.per_rule, **Counter(image_reasons.values())},
        counts.watermark,
    )
    good = scored.filter(pc.is_null(scored["image_error"]))
    values, pairs = flatten_scores(good)
    schema = load_contract("quarantine").arrow_schema()
    if total.rows_invalid == 0:  # nothing to collect: no Spark job for it
        return Decisions(values, pairs, schema.empty_table(), total, good.num_rows)
    checked = validated.checked
    bad = checked.where((F.size(REASONS) > 0) | F.col("product_id").isin(list(image_reasons)))
    quarantine = quarantine_rows(bad, run_id, dt.datetime.now(dt.UTC), schema, image_reasons)
    return Decisions(values, pairs, quarantine, total, good.num_rows)


def flatten_scores(scored: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Flatten staged decisions into value rows and scored (product, attribute) pairs."""
    ids = scored["product_id"].combine_chunks()
    value_lists = scored["values"].combine_chunks()
    flat = value_lists.flatten()
    scored_lists = scored["scored"].combine_chunks()
    values = pa.table(
        {
            "product_id": ids.take(pc.list_parent_indices(value_lists)),
            **{k: flat.field(k) for k in ("attribute", "value", "confidence", "threshold")},
        }
    )
    pairs = pa.table(
        {
            "product_id": ids.take(pc.list_parent_indices(scored_lists)),
            "attribute": scored_lists.flatten(),
        }
    )
    return values, pairs


def _run_write(
    report: RunReport,
    rejected: Iterable[tuple[str, str, str]],
    decisions: Decisions | None = None,
    staging: Path | None = None,
    blocked: Sequence[str] = (),
) -> RunWrite:
    """What the run commits: its decisions and the removal of the values people rejected for its
    version; without decisions (nothing to score) only that removal. The ``blocked`` attributes
    (run health) are left as the catalog holds them: neither their values nor their scored pairs
    are written (and the backend stages from ``values``, not from the staged scores)."""
    if decisions is None:
        strings = [pa.field(k, pa.string()) for k in ("product_id", "attribute", "value")]
        values = pa.schema(
            [*strings, ("confidence", pa.float64()), ("threshold", pa.float64())]
        ).empty_table()
        pairs = pa.schema(strings[:2]).empty_table()
        quarantine = load_contract("quarantine").arrow_schema().empty_table()
    else:
        values, pairs, quarantine = decisions.values, decisions.pairs, decisions.quarantine
    if blocked:
        out = pa.array(list(blocked), pa.string())
        values = values.filter(pc.invert(pc.is_in(values["attribute"], out)))
        pairs = pairs.filter(pc.invert(pc.is_in(pairs["attribute"], out)))
        staging = None
    return RunWrite(
        run_id=report.run_id,
        model_name=str(report.model_name),
        model_version=str(report.model_version),
        written_at=report.started_at,
        values=values,
        pairs=pairs,
        quarantine=quarantine,
        scores=None if staging is None else str(staging / "scores"),
        retract=_keys(rejected),
    )


def _keys(rejected: Iterable[tuple[str, str, str]]) -> pa.Table:
    rows = sorted(rejected)
    return pa.table(
        {
            k: pa.array([r[i] for r in rows], pa.string())
            for i, k in enumerate(("product_id", "attribute", "value"))
        }
    )


def _account(report: RunReport, decisions: Decisions) -> None:
    """Rows valid, quarantined and scored; every row read is one or the other, or nothing is written."""
    report.rows_valid = decisions.counts.rows_read - decisions.counts.rows_invalid
    report.rows_quarantined = decisions.quarantine.num_rows
    report.rows_scored = decisions.rows_scored
    if report.rows_valid + report.rows_quarantined != report.rows_read:
        raise CatalogEnrichError(
            f"row accounting broke: read {report.rows_read} != valid {report.rows_valid} + "
            f"quarantined {report.rows_quarantined}; nothing was written"
        )


def _written(report: RunReport, decisions: Decisions, policy: DecisionPolicy, blocked: Sequence[str]) -> None:
    """Values written and coverage (products with at least one value) per attribute (none for a
    ``blocked`` one)."""
    written = Counter(a for a in decisions.values["attribute"].to_pylist() if a not in blocked)
    pairs = decisions.values.group_by(["product_id", "attribute"]).aggregate([])
    with_value = Counter(a for a in pairs["attribute"].to_pylist() if a not in blocked)
    scored = decisions.rows_scored
    for a in policy.taxonomy:
        report.written_per_attribute[a.name] = int(written.get(a.name, 0))
        report.coverage_per_attribute[a.name] = with_value.get(a.name, 0) / scored if scored else 0.0


def _finish(
    outcome: EnrichOutcome, catalog: Catalog, cfg: AppConfig, client: Any, clock: float, say: Say
) -> EnrichOutcome:
    """Record the report: the run-report table, then an MLflow run when a client is given."""
    report = outcome.report
    elapsed = time.perf_counter() - clock
    report.finished_at = dt.datetime.now(dt.UTC)
    report.products_per_second = report.rows_scored / elapsed if report.rows_scored else None
    catalog.upsert_report(report)
    if outcome.health is not None:
        catalog.upsert_rows("run_health", _health_rows(report, outcome.health))
    if client is not None:
        from catalog_enrichment import registry

        metrics: dict[str, float] = {
            "rows_read": report.rows_read,
            "rows_valid": report.rows_valid,
            "rows_quarantined": report.rows_quarantined,
            "rows_scored": report.rows_scored,
            "products_per_second": report.products_per_second or 0.0,
            "model_loads": sum(outcome.model_loads.values()),
            "python_workers": len(outcome.model_loads),
            "arrow_batches": outcome.arrow_batches,
        }
        metrics.update({f"written_{a}": n for a, n in report.written_per_attribute.items()})
        metrics.update({f"coverage_{a}": c for a, c in report.coverage_per_attribute.items()})
        metrics.update({f"seconds_{s}": v for s, v in report.stage_seconds.items()})
        with tempfile.TemporaryDirectory() as plots:
            plotted: list[Path] = []
            if outcome.health is not None:
                metrics.update(_health_metrics(outcome.health))
                health = outcome.health
                plotted = plot_scores(health.policy.health, health.tally, Path(plots))  # type: ignore[arg-type]
            registry.log_enrichment_run(
                client,
                experiment=cfg.mlflow.enrichment_experiment,
                artifact_location=cfg.mlflow.artifact_location,
                report=report.to_row(),
                params={
                    "model": f"{report.model_name}/{report.model_version}",
                    "partition": report.partition,
                },
                metrics=metrics,
                files=plotted,
            )
    say(f"[{report.run_id}] {report.status} in {elapsed:.1f}s")
    return outcome


def _health_metrics(health: RunHealth) -> dict[str, float]:
    """MLflow metrics of the health checks: ``health_<check>_<scope>`` (the check's observed
    value: PSI, share or estimated precision), ``health_failures`` and ``health_blocked``."""
    metrics: dict[str, float] = {
        f"health_{c.check}_{c.scope}": c.observed for c in health.checks if c.observed is not None
    }
    metrics["health_failures"] = sum(c.status == "failed" for c in health.checks)
    metrics["health_blocked"] = len(health.blocked)
    return metrics


def backfill_partitions(
    spark: SparkSession,
    cfg: AppConfig,
    taxonomy: Taxonomy,
    *,
    model: ModelVersion,
    date_from: dt.date,
    date_to: dt.date,
    products: str | Path | None = None,
    force: bool = False,
    client: Any = None,
    progress: Say = _print,
) -> list[tuple[str, EnrichOutcome | None]]:
    """One committed full run per ``ingest_date`` partition in ``[date_from, date_to]``, in date
    order; a partition already done by the same model version is skipped (None) unless ``force``
    (:func:`catalog_enrichment.catalog.runs.backfill_plan`)."""
    catalog = open_catalog(cfg.catalog, products=products)
    plan = backfill_plan(catalog, model, date_from, date_to, force=force)
    results: list[tuple[str, EnrichOutcome | None]] = []
    for i, (scope, run_id) in enumerate(plan, start=1):
        if run_id is None:
            progress(
                f"[backfill {i}/{len(plan)}] {scope}: done by v{model.version}, skipped (--force redoes it)"
            )
            results.append((scope, None))
            continue
        progress(f"[backfill {i}/{len(plan)}] {scope}: run {run_id}")
        outcome = run_enrichment(
            spark,
            cfg,
            taxonomy,
            model=model,
            partition=scope,
            full=True,
            run_id=run_id,
            client=client,
            progress=progress,
            catalog=catalog,
        )
        results.append((scope, outcome))
    return results
