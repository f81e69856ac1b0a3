"""The enrichment run: read -> validate -> score -> decide -> stage -> MERGE -> report.

One call of :func:`run_enrichment` is one run with one run id:

1. **read** the products (partition filter; incremental: only ``updated_at`` past the watermark of
   the last succeeded run over the same scope, unless ``full``);
2. **validate** every row against the contract's rules (Spark expressions), beside the scoring
   stage, which starts at once on the rows that pass the per-row rules: the duplicate pass, then
   the counts per rule; the circuit breaker cancels the scoring stage and aborts before any write
   when too many rows fail. The Great Expectations suite (it reports, the row rules decide) runs
   beside the scoring stage as well and is joined before anything is written. The side jobs go to
   their own scheduler pools (FAIR scheduling on a local master), so they take a core between two
   scoring tasks instead of waiting for the last one;
3. **score** the rows with ``mapInArrow`` (model loaded once per Python worker) and **decide** in
   the same pass (thresholds, taxonomy, merchant-filled attributes);
4. **stage** the decisions as Parquet under ``<catalog.root>/_staging/<run id>``; the stale copies
   of a duplicated id (known by then) are dropped from them, as they are quarantined;
5. **write**: one MERGE commit into the attributes table (idempotent per run id), then the
   quarantine rows; a process killed before the MERGE leaves the table as it was;
6. **report**: a run-report row and an MLflow run in the enrichment experiment.

The caller passes the SparkSession, the MLflow client and the resolved model (DESIGN: only jobs/
and the CLI create those).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from catalog_enrichment.calibration import Calibration
from catalog_enrichment.catalog.attributes import MergeResult, merge_run
from catalog_enrichment.catalog.products import parse_partition, read_products
from catalog_enrichment.catalog.reports import append_quarantine, last_watermark, report_for, upsert_report
from catalog_enrichment.config import AppConfig
from catalog_enrichment.contracts import Taxonomy, load_contract
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.inference.decide import DecisionPolicy
from catalog_enrichment.inference.spark import ScoringCounters, ScoringSpec, score_dataframe, ship_bundle
from catalog_enrichment.validation.rules import (
    REASONS,
    CircuitBreakerTripped,
    ValidationCounts,
    add_duplicates,
    build_rules,
    check_breaker,
    check_rows,
    count_reasons,
    fails_row_rules,
    find_duplicates,
    latest_copies,
    quarantine_rows,
    stale_copies,
)
from catalog_enrichment.validation.suite import run_suite

__all__ = ["EnrichOutcome", "ModelRef", "backfill_partitions", "new_run_id", "rollback", "run_enrichment"]

Say = Callable[[str], None]
# Test hook: CATALOG_ENRICH_FAULT=<point> kills this process with SIGKILL at that point (crash tests).
FAULT_ENV = "CATALOG_ENRICH_FAULT"


def _fault_point(name: str) -> None:
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def new_run_id() -> str:
    return f"enrich-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class ModelRef:
    """The model a run uses: registered name and version, and its bundle folder on the driver."""

    name: str
    version: str
    bundle_dir: Path


@dataclass
class EnrichOutcome:
    """The run report plus what only the caller needs (scoring counters, the MERGE result)."""

    report: dict[str, Any]
    already_done: bool = False
    merge: MergeResult | None = None
    model_loads: dict[int, int] = field(default_factory=dict)
    arrow_batches: int = 0


def _progress_thread(
    spark: Any,
    counters: ScoringCounters,
    counting: Future[ValidationCounts],
    say: Say,
    interval: float,
) -> Callable[[], None]:
    """Print scoring progress every ``interval`` seconds until the returned stop() is called.

    Products are counted when a task finishes (accumulators), tasks as they complete (status tracker);
    the number of rows read once the counts beside the scoring stage are in.
    """
    stop = threading.Event()
    started = time.perf_counter()
    tracker = spark.sparkContext.statusTracker()

    def loop() -> None:
        while not stop.wait(interval):
            done = int(counters.products.value)
            tasks = [tracker.getStageInfo(s) for s in tracker.getActiveStageIds()]
            finished = sum(t.numCompletedTasks for t in tasks if t)
            running = sum(t.numActiveTasks for t in tasks if t)
            n = sum(t.numTasks for t in tasks if t)
            rate = done / max(time.perf_counter() - started, 1e-9)
            known = counting.done() and counting.exception() is None
            of = counting.result().rows_read if known else None
            say(
                f"  scoring: tasks {finished}/{n} done, {running} running; {done:,}"
                + (f"/{of:,}" if of is not None else "")
                + f" products in finished tasks ({rate:,.0f}/s)"
            )

    thread = threading.Thread(target=loop, name="enrich-progress", daemon=True)
    thread.start()

    def finish() -> None:
        stop.set()
        thread.join()

    return finish


def check_model_fits(bundle_dir: Path, taxonomy: Taxonomy) -> DecisionPolicy:
    """The model's heads against the configured taxonomy, before anything is read or written."""
    model_taxonomy = Taxonomy.from_dict(
        json.loads((bundle_dir / "taxonomy.json").read_text()), source=str(bundle_dir)
    )
    calibration = Calibration.from_dict(json.loads((bundle_dir / "calibration.json").read_text()))
    return DecisionPolicy(model_taxonomy, calibration, taxonomy)


def _beside(
    spark: Any, pool: str | None, fn: Callable[..., Any], *args: Any, group: str | None = None
) -> Future[Any]:
    """``fn(*args)`` in a background thread whose Spark jobs go to the scheduler pool ``pool``.

    Spark takes jobs from several threads at once. Under ``spark.scheduler.mode=FAIR`` (the local
    default) a job in its own pool gets the next free core ahead of the scoring stage's queued
    tasks, so the short validation jobs run during scoring instead of waiting for its last task;
    under FIFO they queue behind it, as before. With ``group`` the thread's jobs form a job group,
    which :func:`_cancel` stops. Both are the thread's own Spark properties, not the caller's.
    """

    def run() -> Any:
        sc = spark.sparkContext
        if pool is not None:
            sc.setLocalProperty("spark.scheduler.pool", pool)
        if group is not None:
            sc.setJobGroup(group, f"catalog-enrichment ({group})")
        return fn(*args)

    executor = ThreadPoolExecutor(1, thread_name_prefix=pool or "scoring")
    try:
        return executor.submit(run)
    finally:
        executor.shutdown(wait=False)


def _settle(*futures: Future[Any] | None) -> None:
    """Wait for side threads (their errors do not matter here), so no Spark job of a run outlives it."""
    for future in futures:
        if future is not None:
            with contextlib.suppress(Exception):
                future.result()


def _stage_scores(scores: Any, path: Path) -> None:
    """Write the lazily scored DataFrame to ``path`` as Parquet (the scoring stage runs here)."""
    scores.write.mode("overwrite").parquet(str(path))


def _cancel(
    spark: Any, group: str, scoring: Future[Any], patience: float = 60.0, settle: float = 1.0
) -> None:
    """Stop the scoring stage and wait until it has stopped (it fails; that is expected).

    A query runs as several Spark jobs (adaptive execution submits each stage as one, from threads
    of its own), and a job submitted after a cancel is not cancelled by it: cancel until the writing
    thread returns, then go on cancelling any job of the group that still shows up, until for
    ``settle`` seconds no job of it is active and none of its tasks runs (a cancelled job fails at
    once while its tasks wind down: a Python worker finishes its batch). After that nothing of
    this stage writes into the staging folder any more; ``patience`` bounds the wait.
    """
    sc = spark.sparkContext
    while not scoring.done():
        sc.cancelJobGroup(group)
        with contextlib.suppress(Exception):
            scoring.result(timeout=0.25)
    tracker = sc.statusTracker()
    events = sc._jsc.sc().listenerBus()

    def busy() -> bool:
        # The tracker learns of jobs and tasks from listener events, delivered a moment later:
        # drain them first, so a job or task started just now is seen.
        with contextlib.suppress(Exception):
            events.waitUntilEmpty(5000)
        ids = tracker.getJobIdsForGroup(group)
        if set(ids) & set(tracker.getActiveJobsIds()):
            sc.cancelJobGroup(group)
            return True
        jobs = [tracker.getJobInfo(j) for j in ids]
        stages = [tracker.getStageInfo(s) for job in jobs if job for s in job.stageIds]
        return any(stage.numActiveTasks for stage in stages if stage)

    deadline = time.monotonic() + patience
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < settle:
        if busy():
            quiet_since = time.monotonic()
        time.sleep(0.1)


def _spread(valid: Any, spark: Any, cfg: AppConfig) -> Any:
    """The rows to score in ``score_partitions_per_core`` x cores even partitions.

    The products table's file splits are uneven (one file per date partition and write): three
    splits on two cores leave one core idle for a third of the scoring stage. Scoring dominates the
    job, so a shuffle of the valid rows (images included) costs far less than it saves. Hashing the
    (unique) product id spreads them evenly and, unlike a round-robin, needs no sort to be repeatable
    when a task is retried.
    """
    per_core = cfg.spark.score_partitions_per_core
    if per_core <= 0:
        return valid
    return valid.repartition(per_core * spark.sparkContext.defaultParallelism, "product_id")


def run_enrichment(
    spark: Any,
    cfg: AppConfig,
    taxonomy: Taxonomy,
    *,
    model: ModelRef,
    products: str | Path | None = None,
    partition: str | None = None,
    full: bool = False,
    run_id: str | None = None,
    client: Any = None,
    progress: Say | None = None,
    progress_interval: float = 10.0,
) -> EnrichOutcome:
    """One enrichment run (see the module docstring). Returns the outcome; raises on abort/failure
    after recording the run report (status ``aborted`` / ``failed``)."""
    say = progress or (lambda m: print(m, flush=True))
    run_id = run_id or new_run_id()
    products_path = Path(products or cfg.catalog.table("products"))
    attributes_path = Path(cfg.catalog.table("attributes"))
    reports_path = Path(cfg.catalog.table("run_reports"))
    quarantine_path = Path(cfg.catalog.table("quarantine"))
    contract = load_contract("products")
    part = parse_partition(partition, contract)
    scope = str(part) if part else None

    try:
        previous = report_for(reports_path, run_id)
    except CatalogEnrichError:
        previous = None
    if previous is not None and previous["status"] == "succeeded":
        say(f"run {run_id} already succeeded; nothing to do")
        return EnrichOutcome(previous, already_done=True)
    if previous is not None and previous["status"] == "rolled_back":
        raise CatalogEnrichError(f"run {run_id} was rolled back; start a new run with another run id")
    policy = check_model_fits(model.bundle_dir, taxonomy)

    started_at = dt.datetime.now(dt.UTC)
    clock = time.perf_counter()
    stages: dict[str, float] = {}
    report: dict[str, Any] = {
        "run_id": run_id,
        "status": "failed",
        "model_name": model.name,
        "model_version": model.version,
        "partition": scope,
        "started_at": started_at,
        "rows_read": 0,
        "rows_valid": 0,
        "rows_quarantined": 0,
        "rows_scored": 0,
        "written_per_attribute": {},
        "coverage_per_attribute": {},
        "stage_seconds": stages,
    }
    summary: dict[str, Any] = {}
    expectations: Future[dict[str, Any]] | None = None
    scoring: Future[None] | None = None
    finding: Future[pa.Table] | None = None
    group = ""

    def stage(name: str, t0: float) -> float:
        stages[name] = round(time.perf_counter() - t0, 3)
        return time.perf_counter()

    outcome = EnrichOutcome(report)
    try:
        # 1. read
        t = time.perf_counter()
        since = None if full else last_watermark(reports_path, scope)
        df = read_products(spark, products_path, contract, partition=part, since=since)
        say(
            f"[{run_id}] read {products_path} ({scope or 'all partitions'}, "
            + (f"changed since {since:%Y-%m-%d %H:%M:%S}" if since else "full")
            + f"), model {model.name} v{model.version}"
        )
        rules = build_rules(contract, cfg.validation)
        t = stage("read", t)

        # 3. score + decide, 4. stage
        staging = Path(cfg.catalog.root) / "_staging" / run_id
        archive = ship_bundle(spark, model.bundle_dir)
        spec = ScoringSpec(
            bundle_name=archive,
            bundle_path=None,
            allowed_taxonomy=taxonomy.to_dict(),
            device=cfg.inference.device,
            torch_threads=cfg.inference.torch_threads,
            predictor=cfg.inference.predictor_options(),
        )
        counters = ScoringCounters.create(spark)
        from pyspark.sql import functions as F

        # The scoring stage starts at once, on the rows that pass the per-row rules; 2. validate runs
        # beside it: the duplicate pass, the counts per rule and the circuit breaker (a tripped breaker
        # cancels the scoring stage, and nothing is written). Stale copies of a duplicated id are
        # scored with the rest and dropped from the staged scores.
        valid = _spread(df.where(~fails_row_rules(rules)), spark, cfg)
        scores = score_dataframe(valid, spec, counters)
        group = f"catalog-enrichment-{run_id}"
        scoring = _beside(spark, None, _stage_scores, scores, staging / "scores", group=group)
        scoring_started = time.perf_counter()

        def abandon_scoring() -> None:  # the run ends before anything is written
            _cancel(spark, group, scoring)
            shutil.rmtree(staging, ignore_errors=True)

        counting = _beside(spark, "validation", count_reasons, df, rules)
        finding = _beside(spark, "validation", find_duplicates, df, rules)
        # The GX suite only reports (the row rules decide): it runs beside the scoring stage too,
        # and is joined before anything is written.
        if cfg.validation.run_expectations:
            expectations = _beside(spark, "expectations", run_suite, df, rules, group=f"{group}-gx")
        stop = _progress_thread(spark, counters, counting, say, progress_interval)
        try:
            counts = counting.result()  # the per-row rules; the duplicates come next
            report["rows_read"] = counts.rows_read
            if counts.watermark is not None:
                report["watermark"] = counts.watermark
            if counts.rows_read == 0:
                abandon_scoring()
                if expectations is not None:
                    _cancel(spark, f"{group}-gx", expectations)
                _settle(finding)
                say("  nothing to enrich: no new or changed products")
                report.update(status="succeeded", watermark=since)
                return _finish(outcome, reports_path, client, cfg, started_at, clock, say)
            try:
                # without the duplicates the invalid rows are a lower bound: a trip is already certain
                check_breaker(counts, cfg.validation.max_invalid_fraction)
                counts = add_duplicates(counts, finding.result(), rules)
                report["validation_summary"] = json.dumps({"row_rules": counts.per_rule})
                invalid = f"{counts.rows_invalid:,} invalid ({counts.top_rules()})"
                say(f"  validated {counts.rows_read:,} rows: {invalid}")
                check_breaker(counts, cfg.validation.max_invalid_fraction)
            except CircuitBreakerTripped:
                abandon_scoring()
                _settle(finding)
                try:  # the aborted run's report still carries the suite's results
                    summary = expectations.result() if expectations else {}
                except Exception as gx_error:  # ... or why there are none; the abort is what matters
                    summary = {"expectations_error": f"{type(gx_error).__name__}: {gx_error}"[:2000]}
                if not counts.complete and finding.exception() is None:
                    # tripped on the per-row rules alone: say the exact figures, duplicates included
                    exact = add_duplicates(counts, finding.result(), rules)
                    check_breaker(exact, cfg.validation.max_invalid_fraction)
                raise
            t = stage("validate", t)
            scoring.result()
        finally:
            stop()
        outcome.model_loads = dict(counters.loads.value)
        outcome.arrow_batches = int(counters.batches.value)
        scored = ds.dataset(str(staging / "scores"), format="parquet").to_table()
        latest = latest_copies(finding.result())
        scored = scored.filter(pc.invert(stale_copies(scored, latest)))  # quarantined: product_id_unique
        stage("score", scoring_started)
        t = time.perf_counter()
        if expectations is not None:
            summary = expectations.result()
            stages["validate"] = round(stages["validate"] + time.perf_counter() - t, 3)  # what was left
            t = time.perf_counter()

        image_errors = scored.filter(pc.is_valid(scored["image_error"]))
        image_reasons = dict(
            zip(image_errors["product_id"].to_pylist(), image_errors["image_error"].to_pylist(), strict=True)
        )
        total = ValidationCounts(
            counts.rows_read,
            counts.rows_invalid + len(image_reasons),
            {**counts.per_rule, **Counter(image_reasons.values())},
            counts.watermark,
        )
        report["validation_summary"] = json.dumps({**summary, "row_rules": total.per_rule})
        check_breaker(total, cfg.validation.max_invalid_fraction)
        good = scored.filter(pc.is_null(scored["image_error"]))
        values, pairs = _decisions(good)
        quarantine_schema = load_contract("quarantine").arrow_schema()
        if total.rows_invalid == 0:  # the counts say there is nothing to collect: no Spark job for it
            quarantine = quarantine_schema.empty_table()
        else:
            checked = check_rows(df, rules, latest=latest)
            bad_rows = checked.where(F.size(REASONS) > 0)
            if image_reasons:
                bad_rows = bad_rows.unionByName(
                    checked.where(F.col("product_id").isin(list(image_reasons)) & (F.size(REASONS) == 0))
                )
            quarantine = quarantine_rows(
                bad_rows, run_id, dt.datetime.now(dt.UTC), quarantine_schema, image_reasons
            )
        report.update(
            rows_valid=total.rows_read - total.rows_invalid,
            rows_quarantined=quarantine.num_rows,
            rows_scored=good.num_rows,
        )
        if report["rows_valid"] + report["rows_quarantined"] != report["rows_read"]:
            raise CatalogEnrichError(
                f"row accounting broke: read {report['rows_read']} != valid {report['rows_valid']} + "
                f"quarantined {report['rows_quarantined']}; nothing was written"
            )
        t = stage("decide", t)
        _fault_point("after_staging")

        # 5. write
        merge = merge_run(
            attributes_path,
            values,
            pairs,
            run_id=run_id,
            model_name=model.name,
            model_version=model.version,
            written_at=started_at,
        )
        outcome.merge = merge
        _fault_point("after_merge")
        append_quarantine(quarantine_path, quarantine)
        written = Counter(values["attribute"].to_pylist())
        # products with at least one value, per attribute (distinct (product, attribute) pairs)
        pairs_written = values.group_by(["product_id", "attribute"]).aggregate([])
        with_value = Counter(pairs_written["attribute"].to_pylist())
        report["written_per_attribute"] = {a.name: int(written.get(a.name, 0)) for a in policy.taxonomy}
        report["coverage_per_attribute"] = {
            a.name: with_value.get(a.name, 0) / good.num_rows if good.num_rows else 0.0
            for a in policy.taxonomy
        }
        stage("write", t)
        say(
            f"  wrote {values.num_rows:,} values (table version {merge.version}); "
            f"quarantined {quarantine.num_rows:,} rows"
        )
        report["status"] = "succeeded"
        shutil.rmtree(staging, ignore_errors=True)
        return _finish(outcome, reports_path, client, cfg, started_at, clock, say)
    except CircuitBreakerTripped as exc:
        report["status"] = "aborted"
        report["validation_summary"] = json.dumps({**summary, "error": str(exc)})
        _finish(outcome, reports_path, client, cfg, started_at, clock, say)
        raise
    except BaseException as exc:
        if scoring is not None and not scoring.done():  # leave no scoring job of this run behind
            _cancel(spark, group, scoring)
        _settle(finding, expectations)  # leave no Spark job of this run behind
        if report["status"] != "succeeded":
            report["status"] = "failed"
            info = json.loads(report.get("validation_summary") or "{}")
            report["validation_summary"] = json.dumps(
                {**info, "error": f"{type(exc).__name__}: {exc}"[:2000]}
            )
            try:
                _finish(outcome, reports_path, client, cfg, started_at, clock, say)
            except Exception as inner:  # the original error matters more
                say(f"  (could not record the failed run: {inner})")
        raise


def _decisions(scored: pa.Table) -> tuple[pa.Table, pa.Table]:
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


def _finish(
    outcome: EnrichOutcome,
    reports_path: Path,
    client: Any,
    cfg: AppConfig,
    started_at: dt.datetime,
    clock: float,
    say: Say,
) -> EnrichOutcome:
    report = outcome.report
    elapsed = time.perf_counter() - clock
    report["finished_at"] = dt.datetime.now(dt.UTC)
    report["products_per_second"] = report["rows_scored"] / elapsed if report["rows_scored"] else None
    upsert_report(reports_path, report)
    if client is not None:
        from catalog_enrichment import registry

        metrics: dict[str, float] = {
            k: float(report[k]) for k in ("rows_read", "rows_valid", "rows_quarantined", "rows_scored")
        }
        metrics.update({f"written_{a}": float(n) for a, n in report["written_per_attribute"].items()})
        metrics.update({f"coverage_{a}": float(c) for a, c in report["coverage_per_attribute"].items()})
        metrics.update({f"seconds_{s}": float(v) for s, v in report["stage_seconds"].items()})
        metrics["products_per_second"] = float(report["products_per_second"] or 0.0)
        metrics["model_loads"] = float(sum(outcome.model_loads.values()))
        metrics["python_workers"] = float(len(outcome.model_loads))
        metrics["arrow_batches"] = float(outcome.arrow_batches)
        registry.log_enrichment_run(
            client,
            experiment=cfg.mlflow.enrichment_experiment,
            artifact_location=cfg.mlflow.artifact_location,
            report=report,
            params={
                "model": f"{report['model_name']}/{report['model_version']}",
                "partition": report["partition"],
            },
            metrics=metrics,
        )
    say(f"[{report['run_id']}] {report['status']} in {elapsed:.1f}s")
    return outcome


def backfill_partitions(
    spark: Any,
    cfg: AppConfig,
    taxonomy: Taxonomy,
    *,
    model: ModelRef,
    date_from: dt.date,
    date_to: dt.date,
    products: str | Path | None = None,
    force: bool = False,
    client: Any = None,
    progress: Say | None = None,
) -> list[tuple[str, EnrichOutcome | None]]:
    """One committed full run per ``ingest_date`` partition in ``[date_from, date_to]``.

    Resumable: a partition already done by the same model version (a succeeded run report) is
    skipped unless ``force``; run ids are deterministic per (partition, model version), so a
    partition interrupted half-way is finished, not written twice. Returns (partition, outcome or
    None when skipped) in date order.
    """
    from catalog_enrichment.catalog.products import list_partitions

    say = progress or (lambda m: print(m, flush=True))
    if date_from > date_to:
        raise CatalogEnrichError(f"--from {date_from} is after --to {date_to}")
    products_path = Path(products or cfg.catalog.table("products"))
    column = load_contract("products").partition_by[0]
    dates = [
        d for d in list_partitions(products_path, column) if date_from <= dt.date.fromisoformat(d) <= date_to
    ]
    if not dates:
        raise CatalogEnrichError(
            f"no {column} partitions between {date_from} and {date_to} in {products_path}"
        )
    reports_path = Path(cfg.catalog.table("run_reports"))
    from catalog_enrichment.catalog.reports import read_reports

    all_reports = read_reports(reports_path)  # each run below only adds its own partition's report
    results: list[tuple[str, EnrichOutcome | None]] = []
    for i, day in enumerate(dates, start=1):
        scope = f"{column}={day}"
        reports = [r for r in all_reports if r["partition"] == scope]
        done = any(r["status"] == "succeeded" and r["model_version"] == model.version for r in reports)
        if done and not force:
            say(
                f"[backfill {i}/{len(dates)}] {scope}: already done by v{model.version}, skipped "
                "(--force redoes it)"
            )
            results.append((scope, None))
            continue
        run_id = f"backfill-{day}-{model.name}-v{model.version}"
        if force or any(r["run_id"] == run_id and r["status"] == "rolled_back" for r in reports):
            run_id += f"-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}"
        say(f"[backfill {i}/{len(dates)}] {scope}: run {run_id}")
        outcome = run_enrichment(
            spark,
            cfg,
            taxonomy,
            model=model,
            products=products_path,
            partition=scope,
            full=True,
            run_id=run_id,
            client=client,
            progress=say,
        )
        results.append((scope, outcome))
    return results


def rollback(
    cfg: AppConfig,
    *,
    run_id: str | None = None,
    model_version: str | None = None,
    progress: Say | None = None,
) -> list[Any]:
    """Undo one run, or every run of a model version (newest first); marks their reports."""
    from catalog_enrichment.catalog.attributes import rollback_run, runs_of_model_version
    from catalog_enrichment.catalog.reports import set_report_status

    say = progress or (lambda m: print(m, flush=True))
    if (run_id is None) == (model_version is None):
        raise CatalogEnrichError("rollback needs exactly one of --run-id or --model-version")
    attributes_path = Path(cfg.catalog.table("attributes"))
    reports_path = Path(cfg.catalog.table("run_reports"))
    if not (attributes_path / "_delta_log").is_dir():
        raise CatalogEnrichError(f"no attribute table at {attributes_path}: nothing to roll back")
    runs = [run_id] if run_id else [r for _, r in runs_of_model_version(attributes_path, str(model_version))]
    if not runs:
        raise CatalogEnrichError(
            f"model version {model_version} has no runs to roll back in {attributes_path}"
        )
    results = []
    for rid in runs:
        result = rollback_run(attributes_path, str(rid))
        results.append(result)
        say(
            f"rolled back {rid}: {result.pairs_restored:,} (product, attribute) pairs restored, "
            f"{result.rows_removed:,} values removed, {result.rows_restored:,} previous values back"
            + (
                f"; {len(result.superseded):,} pairs changed by later runs were left alone"
                if result.superseded
                else ""
            )
            + (f" (table version {result.version})" if result.version is not None else "")
        )
        if (reports_path / "_delta_log").is_dir():
            set_report_status(reports_path, str(rid), "rolled_back")
    return results
