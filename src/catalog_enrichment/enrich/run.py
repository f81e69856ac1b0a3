"""One enrichment run on one screen (:func:`run_enrichment`), the record its report is built from,
and backfills (one run per partition)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog_enrichment.calibration import version_target
from catalog_enrichment.catalog import Catalog, open_catalog
from catalog_enrichment.catalog.base import MergeResult
from catalog_enrichment.catalog.products import Partition, parse_partition
from catalog_enrichment.catalog.reports import (
    BLOCKED,
    CAUGHT_UP,
    EXPECTATIONS,
    FULL,
    FUTURE,
    PLACEHOLDERS,
    PRODUCTS,
    RESUMED,
    RETRIES_DROPPED,
    RETRY,
    SEEN,
    SOURCES_OUT,
    TIMELESS,
    RunReport,
    blocked_why,
    check_run_id,
    expectations_line,
    last_run,
    of_scope,
    placeholders_found,
)
from catalog_enrichment.catalog.reviews import rejected_values
from catalog_enrichment.catalog.runs import ROLLED_BACK, backfill_plan
from catalog_enrichment.config import AppConfig, MLflowConfig
from catalog_enrichment.contracts import IMAGE_SHARED, Contract, Taxonomy, load_contract, mlflow_name
from catalog_enrichment.data.images import ImagePolicy
from catalog_enrichment.enrich.checks import RunHealth, check_run
from catalog_enrichment.enrich.stages import (
    ALL,
    MAX_SEEN,
    Decisions,
    Read,
    Scored,
    Validated,
    check_driver_room,
    collect_decisions,
    describe_window,
    from_partitions,
    future_next,
    image_outages,
    near_watermark,
    new_rows,
    photos_quarantined,
    read,
    retry_next,
    run_write,
    score,
    scoring_spec,
    settled_unscored,
    store_embeddings,
    validate,
)
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.faults import fault_point
from catalog_enrichment.inference.bundle import BundleFolder
from catalog_enrichment.inference.decide import DecisionPolicy
from catalog_enrichment.redaction import redact_text
from catalog_enrichment.types import Say
from catalog_enrichment.validation.checkpoint import (
    BatchValidation,
    ExpectationsFailed,
    gx_project,
    validate_batch,
)
from catalog_enrichment.validation.rules import (
    CircuitBreakerTripped,
    build_rules,
    check_breaker,
    shared_image_rules,
)
from catalog_enrichment.validation.suite import build_suite
from catalog_enrichment.versions import ModelVersion

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "BackfillRange",
    "EnrichOutcome",
    "RunScope",
    "backfill_partitions",
    "check_model_fits",
    "new_run_id",
    "run_enrichment",
]


def _print(message: str) -> None:
    print(message, flush=True)


# a backfill's pause between two partitions: longer than a lock waiter's poll (catalog/lock.py)
LOCK_HANDOVER_SECONDS = 1.5


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


def check_model_fits(
    bundle_dir: Path, taxonomy: Taxonomy, target: float | None = None, version: str = "the model"
) -> DecisionPolicy:
    """The model's heads against the configured taxonomy, and its calibration against the configured
    precision ``target`` (a version calibrated for another one is refused: its thresholds keep
    another promise), before anything is read or written; and that this version, with this
    machine's image decoder, can load it.

    Raises:
        UnservableBundle: it cannot (:meth:`BundleFolder.read_model_config`,
            :meth:`BundleFolder.check_decoder`).
    """
    folder = BundleFolder(bundle_dir)
    folder.read_model_config()
    folder.check_decoder()  # the driver's decoder; each executor checks its own as it loads
    policy = DecisionPolicy(folder.read_taxonomy(), folder.read_calibration(), taxonomy)
    if target is not None:
        version_target(target, policy.target_precision, version)
    return policy


@dataclass(frozen=True)
class _Job:
    """What every stage of one run reads."""

    spark: SparkSession
    cfg: AppConfig
    catalog: Catalog
    taxonomy: Taxonomy
    model: ModelVersion
    policy: DecisionPolicy
    staging: Path
    say: Say


@dataclass
class _Record:
    """What a run has done so far - its stages' results - and the one place its report is built
    from them (:meth:`report`), whether it succeeded, aborted or failed."""

    run_id: str
    model: ModelVersion
    partition: str | None
    started_at: dt.datetime
    products: str  # the products table read (Catalog.products_name)
    full: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    got: Read | None = None
    validated: Validated | None = None
    seen_next: list[tuple[str, int]] | None = None
    future_next: list[tuple[str, int]] | None = None
    timeless_next: list[Any] | str | None = None
    caught_up_next: list[list[str]] | None = None  # CAUGHT_UP, where the run keeps the last one's
    rejected: int = 0
    placeholders: dict[str, int] = field(default_factory=dict)  # images validation found shared
    scored: Scored | None = None
    health: RunHealth | None = None
    decisions: Decisions | None = None
    retry_next: list[tuple[str, int]] | None = None
    retries_dropped: int = 0  # products to retry past the list's MAX_SEEN
    image_outages: dict[str, int] = field(default_factory=dict)  # source -> its products that failed
    merge: MergeResult | None = None
    written: tuple[dict[str, int], dict[str, float]] | None = None
    embeddings: dict[str, Any] = field(default_factory=dict)
    expectations: BatchValidation | None = None
    status: str = "failed"
    error: str | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time one stage."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 3)

    @property
    def blocked(self) -> list[str]:
        return [] if self.health is None else list(self.health.blocked)

    def watermark(self) -> dt.datetime | None:
        """The highest ``updated_at`` this run covered: its rows' (never past its start) or, when it
        read nothing newer or an earlier attempt of its id had committed, the last run's."""
        since = None if self.got is None else self.got.since
        ours = None if self.validated is None else self.validated.watermark
        if self.merge is not None and self.merge.already_committed:  # nothing of ours was written
            return since
        return max((w for w in (since, ours) if w is not None), default=None)

    def report(self, finished_at: dt.datetime | None = None, seconds: float | None = None) -> RunReport:
        """The run report (contract ``schemas/run_report.yaml``) of what was done."""
        report = RunReport(
            run_id=self.run_id, status=self.status, model_name=self.model.name,
            model_version=self.model.version, partition=self.partition, started_at=self.started_at,
            finished_at=finished_at, stage_seconds=dict(self.seconds),
        )  # fmt: skip
        if self.validated is not None:
            report.rows_read, report.watermark = self.validated.counts.rows_read, self.watermark()
        if self.decisions is not None:
            d = self.decisions
            report.rows_valid, report.rows_quarantined = d.rows_valid, d.quarantine.num_rows
            report.rows_scored = d.rows_scored
        if self.written is not None:
            report.written_per_attribute, report.coverage_per_attribute = self.written
        if report.rows_scored and seconds:
            report.products_per_second = report.rows_scored / seconds
        summary = self._summary()
        report.validation_summary = json.dumps(summary, default=str) if summary else None
        return report

    def _summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {FULL: self.full, PRODUCTS: self.products}
        if self.expectations is not None:
            summary[EXPECTATIONS] = self.expectations.to_dict()
        if self.validated is not None:
            summary["row_rules"] = self.validated.counts.per_rule
            if self.validated.repeated:
                summary["repeated_rows"] = self.validated.repeated
            summary[SEEN] = self.seen_next
            summary[FUTURE] = self.future_next
            summary[TIMELESS] = self.timeless_next
            if self.caught_up_next is not None:
                summary[CAUGHT_UP] = self.caught_up_next
            got = self.got
            if got is not None and got.since is not None and self.watermark() == got.since:
                summary[RESUMED] = got.last_run  # its position is that run's (reports.last_run)
        if self.rejected:
            summary["rejected_by_review"] = self.rejected
        if self.got is not None and self.got.superseded:
            summary["superseded"] = self.got.superseded
        if self.scored is not None and self.scored.encoder is not None:
            summary.update(embeddings_reused=self.scored.reused, embeddings_encoded=self.scored.encoded)
        found = {**self.placeholders, **(self.scored.shared if self.scored is not None else {})}
        if found:
            summary[PLACEHOLDERS] = found
        if self.health is not None:
            summary.update(self.health.summary())
        if self.decisions is not None:
            summary["row_rules"] = self.decisions.counts.per_rule
        if self.retry_next is not None:
            summary[RETRY] = self.retry_next
        if self.retries_dropped:
            summary[RETRIES_DROPPED] = self.retries_dropped
        if self.image_outages:
            summary[SOURCES_OUT] = self.image_outages
        summary.update(self.embeddings)
        if self.error is not None:
            summary["error"] = self.error
        return summary


@dataclass(frozen=True)
class RunScope:
    """What one run reads, under which id: ``products`` (a products table in place of the catalog's
    own; None: the catalog's), ``partition`` (``key=value`` of that table; None: every partition),
    ``full`` (every product, not only those changed since the last successful run) and ``run_id``
    (None: a new one; the id of a run that already succeeded makes the run a no-op)."""

    products: str | Path | None = None
    partition: str | None = None
    full: bool = False
    run_id: str | None = None


def run_enrichment(
    spark: SparkSession,
    cfg: AppConfig,
    taxonomy: Taxonomy,
    *,
    model: ModelVersion,
    scope: RunScope = RunScope(),
    client: MlflowClient | None = None,
    progress: Say = _print,
    catalog: Catalog | None = None,
    refuse_rolled_back: bool = False,
) -> EnrichOutcome:
    """One enrichment run (see the package docstring) of ``scope`` on ``catalog`` (default: the
    configured one, ``scope.products`` overriding its products table). Returns the outcome; raises on
    abort/failure after recording the run report (status ``aborted`` / ``failed``). A version
    resolved through an alias (or any, with ``refuse_rolled_back``: a backfill's) is asked for again
    once the catalog's lock is held, where a rollback tags it: one rolled back while this run waited
    writes nothing."""
    run_id = check_run_id(scope.run_id or new_run_id())
    partition, full = scope.partition, scope.full
    catalog = catalog or open_catalog(cfg.catalog, products=scope.products)
    with catalog.lock(f"run {run_id}", progress):
        reports = catalog.read_reports()
        previous = _previous(reports, run_id)
        if previous is not None:
            progress(f"run {run_id} already succeeded; nothing to do")
            return EnrichOutcome(previous, already_done=True)
        if refuse_rolled_back or model.alias is not None:
            _still_served(client, model, run_id)
        policy = check_model_fits(
            model.bundle, taxonomy, cfg.calibration.target_precision, f"{model.name} v{model.version}"
        )
        for note in policy.notes:
            progress(note)
        contract = load_contract("products")
        part = parse_partition(partition, contract)
        started, products = dt.datetime.now(dt.UTC), catalog.products_name()
        record = _Record(run_id, model, str(part) if part else None, started, products, full)
        job = _Job(spark, cfg, catalog, taxonomy, model, policy, catalog.staging_dir(run_id), progress)
        return _run(job, record, reports, contract, part, full, client)


def _run(
    job: _Job,
    record: _Record,
    reports: list[RunReport],
    contract: Contract,
    part: Partition | None,
    full: bool,
    client: MlflowClient | None,
) -> EnrichOutcome:
    """The stages, then the report: recorded whether the run succeeded, aborted or failed."""
    clock = time.perf_counter()
    job.catalog.clear_staging()
    try:
        last = None if full else _resume_from(job, reports, record.partition, record.products)
        found = placeholders_found(reports, job.cfg.validation.max_products_per_image)
        _stages(job, record, last, contract, part, found)
        record.status = "succeeded"
        return _finish(job, record, client, clock)
    except BaseException as exc:
        aborted = isinstance(exc, CircuitBreakerTripped)
        record.status = "aborted" if aborted else "failed"
        record.error = redact_text(str(exc) if aborted else f"{type(exc).__name__}: {exc}")[:2000]
        try:
            _finish(job, record, client, clock)
        except Exception as inner:  # the original error matters more
            job.say(f"  (could not record the {record.status} run: {redact_text(str(inner))})")
        raise
    finally:
        shutil.rmtree(job.staging, ignore_errors=True)


def _stages(
    job: _Job,
    run: _Record,
    last: RunReport | None,
    contract: Contract,
    part: Partition | None,
    placeholders: set[str],
) -> None:
    """read -> validate -> breaker -> score + decide -> health -> breaker -> write -> store; the
    images of ``placeholders`` (found by earlier runs: ``sha256:`` keys of bytes, ``uri:`` of
    shared URLs) fail their products however few."""
    cfg, say, catalog = job.cfg, job.say, job.catalog
    expect = cfg.validation.great_expectations
    with run.stage("read"):
        lookback = dt.timedelta(seconds=cfg.catalog.lookback_seconds)
        # with the checkpoint on, a missing contract column is its expectation's failure, named there
        run.got = got = read(
            job.spark, catalog, contract, part, last, lookback, job.staging,
            earliest=cfg.validation.earliest_time, require_columns=not expect,
            latest=run.started_at + dt.timedelta(seconds=cfg.validation.max_clock_skew_seconds),
        )  # fmt: skip
        run.timeless_next = got.timeless
        say(f"read products from {catalog.describe()} ({part or 'all partitions'}, {describe_window(got)}), "
            f"model {job.model.name} v{job.model.version}")  # fmt: skip
        if got.timeless == ALL:
            say("  more products have a row without a usable updated_at (null or before "
                "validation.earliest_updated_at) than a run report lists: incremental runs leave "
                "them to --full")  # fmt: skip
        if got.superseded:
            say(f"  {got.superseded:,} rows left unread: a newer copy of their product is in another "
                "partition or was read by the last run")  # fmt: skip
    # the GX checkpoint runs beside the row rules (both mostly wait on Spark's per-job latency) and
    # is awaited before anything is scored; alone first when a contract column is missing
    with ThreadPoolExecutor(1, thread_name_prefix="expectations") as pool:
        checkpoint = pool.submit(expect_batch, job, run, contract, got.df) if expect else None
        if checkpoint is not None and contract.missing_columns(got.df.columns):
            _expected(job, run, checkpoint)
        with run.stage("validate"):
            rules = build_rules(contract, cfg.validation, run.started_at, got.df.columns)
            # a model that reads no image has no placeholder to fear: its products are scored
            reads = BundleFolder(job.model.bundle).reads_images()
            limit = cfg.validation.max_products_per_image if reads else 0
            shared, run.placeholders = shared_image_rules(got.df, limit, placeholders)
            for rule in shared:
                say(f"  {rule.name}: {rule.description}; quarantined, read again by the next run")
            rules += shared
            run.validated = validated = validate(got.df, rules, run.started_at, say)
            run.seen_next = near_watermark(got, run.watermark())
            run.future_next = future_next(got, validated)
        if checkpoint is not None:
            _expected(job, run, checkpoint)
    breaker = cfg.validation.max_invalid_fraction, cfg.validation.min_invalid_rows
    check_breaker(validated.counts, *breaker)
    check_driver_room(validated.counts.rows_read - validated.counts.rows_invalid)
    reviews = catalog.keyed_rows("reviews")
    samples = catalog.keyed_rows("review_samples") if reviews.num_rows else None  # whose verdicts
    rejected = rejected_values(reviews, job.model.version, model_name=job.model.name, samples=samples)
    run.rejected = len(rejected)
    if rejected:
        say(f"  {len(rejected):,} values people rejected for v{job.model.version}: never written, removed")
    retracted = rejected | job.policy.inside_rejected(rejected)  # and the shades of a rejected family
    if validated.counts.rows_read == 0:
        say("  nothing to enrich: no new or changed products")
        if rejected:  # still take out what people rejected
            with run.stage("write"):
                run.merge = catalog.write(run_write(run.run_id, job.model, run.started_at, retracted))
        return
    with run.stage("score"):
        images = ImagePolicy.from_config(cfg.images, catalog.image_roots())
        spec = scoring_spec(
            job.spark, job.model, job.taxonomy, cfg.inference, images, rejected, got.retry, placeholders
        )
        reads_store = cfg.inference.embedding_store and not scores_on_gpus(job.spark, cfg.inference.device)
        encoder = BundleFolder(job.model.bundle).encoder_fingerprint() if reads_store else None
        store = None if encoder is None else (catalog, encoder)
        run.scored = scored = score(
            job.spark,
            validated.checked,
            spec,
            job.staging,
            store=store,
            max_products_per_image=cfg.validation.max_products_per_image,
            placeholders=placeholders,
        )
        if scored.store_error is not None:
            say(f"  the embedding store could not be read, every product encoded: {scored.store_error}")
        if scored.shared:
            most = sorted(scored.shared.items(), key=lambda kv: (-kv[1], kv[0]))
            named = ", ".join(f"{d[:16]}… on {n:,}" for d, n in most[:3])
            say(f"  {IMAGE_SHARED}: {sum(scored.shared.values()):,} products' photos, as read, are "
                f"placeholders, one image on more than {cfg.validation.max_products_per_image} products "
                f"or found by an earlier run ({named}); quarantined, read again by the next run")  # fmt: skip
    with run.stage("decide"):
        unscored = settled_unscored(validated, job.policy)
        run.decisions = decisions = collect_decisions(scored.table, validated, run.run_id, unscored)
    quarantined = photos_quarantined(decisions.quarantine, scored.table, got.retry, scored.shared_counted)
    scored.health.photos_quarantined(quarantined)
    reads = BundleFolder(job.model.bundle).reads_images()
    run.health = check_run(job.policy, scored.health, cfg.validation.health, say, reads_images=reads)
    check_breaker(new_rows(decisions, got.retry), *breaker)
    run.image_outages, waiting = image_outages(scored.table, cfg.validation.image_outage_products, got.retry)
    for source, n in sorted(run.image_outages.items()):
        say(f"  image source {source} out: none of its photos could be used, {n:,} products' could not "
            "be read or were placeholders; read again by the next run (within the list's limit), no "
            "retry spent")  # fmt: skip
    run.retry_next, run.retries_dropped = retry_next(
        decisions.quarantine, got.retry, cfg.validation.image_retries, waiting
    )
    if run.retries_dropped:
        say(f"  {run.retries_dropped:,} products quarantined for their photo are past the {MAX_SEEN:,} "
            "a run lists to read again: they wait until they change (once their photos are back, "
            "catalog-enrich backfill --force scores them, or enrich --full where the driver has "
            "room)")  # fmt: skip
    fault_point("before_merge")
    with run.stage("write"):
        write = run_write(
            run.run_id, job.model, run.started_at, retracted, decisions, job.staging, run.blocked,
            job.taxonomy,
        )  # fmt: skip
        run.merge = catalog.write(write, job.spark)
    if run.merge.already_committed:
        # an earlier attempt of this run id committed, then failed: what this attempt read since
        # (a product changed in between) was not written, so the next run reads from where both began
        run.seen_next, run.retry_next = got.seen, list(got.retry.items())
        run.future_next = got.future  # (what the earlier attempt quarantined is not known: read again)
        run.retries_dropped = 0
        run.image_outages = {}
        # (read on from a backfill's partitions: their windows, and the (partition, product) pairs
        # of their timeless rows, stay the position)
        run.timeless_next, run.caught_up_next = got.timeless_done, got.caught_up
        # nor is what that attempt quarantined to retry, or kept out, known: a full run's record
        # says partial, so a backfill runs its partition again rather than count it done
        run.full = False
        say(f"  {run.run_id} was committed by an earlier attempt: nothing written; the next run reads "
            "its products again")  # fmt: skip
    else:
        # what the commit wrote: no value a merchant row of the catalog holds (decided all the same)
        names, rows = [a.name for a in job.policy.taxonomy], decisions.rows_scored
        run.written = (
            {a: run.merge.written.get(a, 0) for a in names},
            {a: run.merge.products.get(a, 0) / rows if rows else 0.0 for a in names},
        )
        version = run.merge.version
        changed = "no value changed" if version is None else f"version {version}"
        say(f"  wrote {sum(run.written[0].values()):,} values ({changed}); "
            f"quarantined {decisions.quarantine.num_rows:,} rows")  # fmt: skip
    if scored.encoder is not None and run.blocked:
        # tonight's inputs may be what was wrong (placeholder photos under the products' own URLs
        # keep their digest): the run that reads these products again encodes them afresh
        say("  embeddings: none stored, the health checks kept values out")
        run.embeddings = {"embeddings_stored": 0}
    elif scored.encoder is not None:
        with run.stage("store"):
            run.embeddings = store_embeddings(job.spark, catalog, scored, job.staging, run.run_id, say)


def _expected(job: _Job, run: _Record, checkpoint: Future[BatchValidation]) -> None:
    """The checkpoint's outcome into the run (its seconds as the ``expectations`` stage's); a failed
    critical expectation stops the run."""
    if run.expectations is not None:
        return
    run.expectations = checked = checkpoint.result()
    run.seconds["expectations"] = checked.seconds
    job.say("  " + expectations_line(checked.to_dict()))
    if checked.critical:
        raise ExpectationsFailed("great expectations stopped the run: " + "; ".join(checked.critical))


def expect_batch(job: _Job, run: _Record, contract: Contract, df: DataFrame) -> BatchValidation:
    """The run's batch through the GX checkpoint: the suite ``catalog-enrich expectations`` exports
    for this model (validation/suite.py)."""
    cfg = job.cfg
    rules = build_rules(contract, cfg.validation, run.started_at, df.columns)
    inputs = None if job.policy.health is None else job.policy.health.inputs
    reads = BundleFolder(job.model.bundle).reads_images()
    suite = build_suite(rules, cfg.validation, contract, inputs, reads_images=reads)
    project = gx_project(cfg.validation.gx_project, cfg.catalog.root)
    return validate_batch(df, suite, project=project, run_id=run.run_id)


def _resume_from(
    job: _Job, reports: list[RunReport], partition: str | None, products: str
) -> RunReport | None:
    """The run over ``partition`` of the ``products`` table this incremental run reads on from: the
    last one, or the one before the latest runs whose health checks kept values out
    (``validation.health.retries`` of them at most), so their products are scored again. A run
    over the whole table with none such before it (nor a ``--full`` one the checks kept values out
    of) reads on from the runs over single partitions, a backfill's (:func:`from_partitions`)."""
    retries = job.cfg.validation.health.retries
    latest = last_run(reports, partition, products=products)
    last = last_run(reports, partition, products=products, blocked_retries=retries)
    whole = [r for r in reports if r.status == "succeeded" and of_scope(r, None, products)]
    if partition is None and last is None and not any(r.summary().get(FULL) for r in whole):
        last = from_partitions(reports, products, retries)
        if last is not None:
            done = [scope for scope, _ in last.summary()[CAUGHT_UP]]
            job.say(
                f"  no run over the whole table yet: reading on from the runs of {len(done):,} "
                f"partitions ({done[0]} to {done[-1]}), what changed in each since its run, and "
                "every row of the others"
            )
    if latest is not None and last is not latest:
        blocked = ", ".join(blocked_why(latest.summary().get(BLOCKED)))
        since = "the start" if last is None else f"run {last.run_id}"
        job.say(f"  run {latest.run_id} kept {blocked} out: reading on from {since}, its products again")
    if retries and last is not None and last.summary().get(BLOCKED):
        job.say(
            f"  run {last.run_id} kept values out and {retries} blocked runs followed it "
            "(validation.health.retries): its products are not read again; once the cause is fixed, "
            "score them with catalog-enrich enrich --full or a backfill"
        )
    return last


def scores_on_gpus(spark: SparkSession, device: str) -> bool:
    """Whether the scoring tasks run on GPUs (``inference.device`` cuda; auto where Spark gives each
    task a GPU, or in local mode where this machine has one), which neither read nor fill the
    embedding store: the run then joins no stored vector to its products."""
    from catalog_enrichment.inference import resolve_device

    if device != "auto":
        return device == "cuda"
    if (spark.sparkContext.master or "").startswith("local"):  # the tasks run on this machine
        return resolve_device(device) == "cuda"
    return float(spark.conf.get("spark.task.resource.gpu.amount", None) or "0") > 0


def _previous(reports: list[RunReport], run_id: str) -> RunReport | None:
    """The report of a run with this id that already succeeded (a re-run does nothing)."""
    previous = next((r for r in reports if r.run_id == run_id), None)
    if previous is not None and previous.status == ROLLED_BACK:
        raise CatalogEnrichError(f"run {run_id} was rolled back; start a new run with another run id")
    return previous if previous is not None and previous.status == "succeeded" else None


def _finish(job: _Job, run: _Record, client: MlflowClient | None, clock: float) -> EnrichOutcome:
    """Record the report: the run-report table and the health rows, then an MLflow run when a
    client is given."""
    elapsed = time.perf_counter() - clock
    report = run.report(dt.datetime.now(dt.UTC), elapsed)
    job.catalog.upsert_report(report)
    if run.health is not None:
        rows = run.health.rows(
            run.run_id, run.model.name, run.model.version, report.finished_at or run.started_at
        )
        job.catalog.upsert_rows("run_health", rows)
    scored = run.scored
    outcome = EnrichOutcome(
        report, merge=run.merge, health=run.health,
        model_loads={} if scored is None else scored.model_loads,
        arrow_batches=0 if scored is None else scored.arrow_batches,
    )  # fmt: skip
    if client is not None:
        try:
            _log_mlflow(client, job.cfg.mlflow, outcome)
        except Exception as exc:  # the report table has the run: MLflow's copy cannot undo a commit
            job.say(
                f"  could not log the run to MLflow (its report is in the catalog): {redact_text(str(exc))}"
            )
    job.say(f"[{report.run_id}] {report.status} in {elapsed:.1f}s")
    return outcome


def _log_mlflow(client: MlflowClient, mlflow_cfg: MLflowConfig, outcome: EnrichOutcome) -> None:
    """The run in MLflow's enrichment experiment: its counts, timings and health as metrics, the
    report as JSON, the health plots."""
    from catalog_enrichment import registry

    report = outcome.report
    metrics: dict[str, float] = {
        "rows_read": report.rows_read,
        "rows_valid": report.rows_valid,
        "rows_quarantined": report.rows_quarantined,
        "rows_scored": report.rows_scored,
        "products_per_second": report.products_per_second or 0.0,
        "model_loads": sum(outcome.model_loads.values()),
        "python_workers": len(outcome.model_loads),
        "arrow_batches": outcome.arrow_batches,
        **{f"written_{mlflow_name(a)}": n for a, n in report.written_per_attribute.items()},
        **{f"coverage_{mlflow_name(a)}": c for a, c in report.coverage_per_attribute.items()},
        **{f"seconds_{s}": v for s, v in report.stage_seconds.items()},
        **({} if outcome.health is None else outcome.health.metrics()),
    }
    with tempfile.TemporaryDirectory() as plots:
        registry.log_enrichment_run(
            client,
            experiment=mlflow_cfg.enrichment_experiment,
            artifact_location=mlflow_cfg.artifact_location,
            report=report.to_row(),
            params={"model": f"{report.model_name}/{report.model_version}", "partition": report.partition},
            metrics=metrics,
            tags={**({} if outcome.health is None else outcome.health.tags()), **_expectations_tags(report)},
            files=[] if outcome.health is None else outcome.health.plots(Path(plots)),
        )


def _expectations_tags(report: RunReport) -> dict[str, str]:
    """MLflow tags of the run's GX checkpoint: ``catalog_enrich.great_expectations`` -> its line."""
    checked = report.summary().get(EXPECTATIONS)
    return {} if checked is None else {"catalog_enrich.great_expectations": expectations_line(checked)[:5000]}


@dataclass(frozen=True)
class BackfillRange:
    """The ``ingest_date`` partitions a backfill runs, ``first`` to ``last`` inclusive; ``force``:
    also those the same model version already did."""

    first: dt.date
    last: dt.date
    force: bool = False


def backfill_partitions(
    spark: SparkSession,
    cfg: AppConfig,
    taxonomy: Taxonomy,
    *,
    model: ModelVersion,
    days: BackfillRange,
    client: MlflowClient | None = None,
    progress: Say = _print,
    catalog: Catalog | None = None,
) -> list[tuple[str, EnrichOutcome | None]]:
    """One committed full run per ``ingest_date`` partition of ``days``, in date order, on
    ``catalog`` (default: the configured one); a partition already done by the same model version
    is skipped (None) unless ``days.force``, or run incrementally where its last run left products
    to retry (:func:`catalog_enrichment.catalog.runs.backfill_plan`)."""
    catalog = catalog or open_catalog(cfg.catalog)
    plan = backfill_plan(catalog, model, days.first, days.last, force=days.force)
    results: list[tuple[str, EnrichOutcome | None]] = []
    for i, (partition, run_id, full) in enumerate(plan, start=1):
        if run_id is None:
            done = f"done by v{model.version}, skipped (--force redoes it)"
            progress(f"[backfill {i}/{len(plan)}] {partition}: {done}")
            results.append((partition, None))
            continue
        _not_rolled_back(client, model, partition)
        if any(o is not None for _, o in results):
            # the lock was just released: a run waiting for it (the nightly, a rollback) polls it
            # twice a second, and would otherwise find the next partition's run holding it again
            time.sleep(LOCK_HANDOVER_SECONDS)
        again = "" if full else " (the products its last run left to retry, and what changed since)"
        progress(f"[backfill {i}/{len(plan)}] {partition}: run {run_id}{again}")
        outcome = run_enrichment(
            spark,
            cfg,
            taxonomy,
            model=model,
            scope=RunScope(partition=partition, full=full, run_id=run_id),
            client=client,
            progress=progress,
            catalog=catalog,
            refuse_rolled_back=True,
        )
        results.append((partition, outcome))
    return results


def _rolled_back(client: MlflowClient | None, model: ModelVersion) -> str | None:
    """Why ``model`` carries the rolled-back tag (``rollback --model-version``), None where it does
    not or no registry is given."""
    if client is None:
        return None
    from catalog_enrichment import registry

    return registry.version_tags(client, model.name, model.version).get(registry.ROLLED_BACK_TAG) or None


def _not_rolled_back(client: MlflowClient | None, model: ModelVersion, partition: str) -> None:
    """A long backfill asks before each partition: a version rolled back while it ran writes no
    further partition.

    Raises:
        CatalogEnrichError: the version carries the rolled-back tag.
    """
    if why := _rolled_back(client, model):
        raise CatalogEnrichError(
            f"{model.name} v{model.version} was rolled back while this backfill ran ({why}): "
            f"{partition} and the partitions after it were not run"
        )


def _still_served(client: MlflowClient | None, model: ModelVersion, run_id: str) -> None:
    """A run asks again once it holds the catalog's lock, under which a rollback tags the version:
    one rolled back while the run waited writes nothing.

    Raises:
        CatalogEnrichError: the version carries the rolled-back tag.
    """
    if why := _rolled_back(client, model):
        raise CatalogEnrichError(
            f"{model.name} v{model.version} was rolled back ({why}) while run {run_id} waited for the "
            "catalog: nothing was written"
        )
