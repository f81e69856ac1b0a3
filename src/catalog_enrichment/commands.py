"""The CLI's commands: each reads its arguments, builds what a job process builds (``runtime``)
and calls the library. The parser is in :mod:`catalog_enrichment.cli`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from catalog_enrichment import runtime
from catalog_enrichment.config import AppConfig
from catalog_enrichment.errors import CatalogEnrichError

if TYPE_CHECKING:
    from catalog_enrichment.catalog.base import Catalog

# Exit codes: 0 ok, 1 failed, 2 user mistake (bad config, missing file, ...), 3 the circuit breaker
# stopped an enrichment run before any write (schedulers alert on it differently).
EXIT_ABORTED = 3
# `report --audit --check`: a version's audit found an attribute below target (and nothing else:
# any error exits 1 or 2, so a scheduler rolls back on this code alone)
EXIT_BELOW_TARGET = 4
EXIT_BUSY = 75  # EX_TEMPFAIL: another run holds the catalog; try again later (as the cron wrapper)


def generate(args: argparse.Namespace, cfg: AppConfig) -> int:
    """write a synthetic labelled marketplace (products + truth)

    Write a synthetic marketplace with real images and a known answer.
    """
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.data.summary import format_summary, summarize_marketplace
    from catalog_enrichment.data.synthetic import generate_marketplace

    out = Path(args.out or cfg.catalog.root)
    taxonomy = load_taxonomy(cfg.taxonomy_path)
    print(
        f"Generating {cfg.synthetic.products:,} products into {out} ({cfg.synthetic.format}) ...", flush=True
    )
    result = generate_marketplace(out, cfg.synthetic, taxonomy=taxonomy, progress=not args.quiet)
    print(
        f"Wrote {result.rows:,} rows in {result.seconds:.1f}s ({result.rows / result.seconds:,.0f}/s): "
        f"products -> {result.products}, truth -> {result.truth}"
    )
    if cfg.synthetic.image_files:  # outside the products table's folder, the one the default reads
        images = (out / "images").resolve()
        print(f"images -> {images}: read them with --set images.roots='[\"{images}\"]'")
    if not args.quiet:
        print()
        print(format_summary(summarize_marketplace(out, taxonomy=taxonomy)))
    return 0


def summarize(args: argparse.Namespace, cfg: AppConfig) -> int:
    """print the summary of a generated marketplace

    Print row counts, value frequencies, modality shares and bad rows.
    """
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.data.summary import format_summary, summarize_marketplace

    root = Path(args.path)
    if not (root / "products").exists() or not (root / "truth").exists():
        raise CatalogEnrichError(f"{root} does not hold a generated marketplace (products/ and truth/)")
    summary = summarize_marketplace(root, taxonomy=load_taxonomy(cfg.taxonomy_path))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def expectations(args: argparse.Namespace, cfg: AppConfig) -> int:
    """write the Great Expectations suite the enrichment runs validate with

    Write the suite each run's GX checkpoint uses (validation/suite.py) in GX's JSON form, for a GX
    project to add with context.suites.add(gx.ExpectationSuite(**json.load(f))): the products
    contract's validation rules (schemas/products.yaml and the validation config; the UTF-8 rules
    have no expectation) and the batch expectations. The shares of products without an image, a
    description or a known category are bounded by the model's training products: those of --model
    (default: the champion); without a registered model they are left out. The updated_at bound is
    now plus validation.max_clock_skew_seconds (a run's: its start).
    """
    import datetime as dt

    from catalog_enrichment.contracts import load_contract
    from catalog_enrichment.inference.bundle import BundleFolder
    from catalog_enrichment.validation.rules import build_rules
    from catalog_enrichment.validation.suite import build_suite, write_suite

    contract = load_contract("products")
    rules = build_rules(contract, cfg.validation, dt.datetime.now(dt.UTC))
    inputs, reads_images = None, True
    store = cfg.mlflow.tracking_uri.removeprefix("sqlite:///")
    try:
        if store != cfg.mlflow.tracking_uri and not Path(store).exists():
            raise CatalogEnrichError(f"no MLflow store at {store}")
        model = runtime.model_version(cfg, args.model, runtime.mlflow_client(cfg.mlflow))
        health = BundleFolder(model.bundle).read_calibration().health
        inputs = None if health is None else health.inputs
        reads_images = BundleFolder(model.bundle).reads_images()
    except CatalogEnrichError as exc:
        if args.model is not None:  # the model named: its shares, or an error (not a weaker suite)
            raise
        print(f"no model's training inputs ({exc}): the image, description and category shares are left out")
    suite = build_suite(rules, cfg.validation, contract, inputs, name=args.name, reads_images=reads_images)
    path = write_suite(suite, Path(args.out))
    print(f"wrote {len(suite.expectations)} expectations to {path}")
    return 0


def load_products(args: argparse.Namespace, cfg: AppConfig) -> int:
    """copy a products table into the PostgreSQL catalog (a test or staging database)

    Upsert the rows of a Delta or Parquet products table into catalog.postgres.products_table
    (created with the contract's columns when missing): the loaded rows of a product id replace that
    id's rows, so loading the same table again changes nothing. Needs catalog.kind postgres.
    """
    from catalog_enrichment.catalog import open_catalog
    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.catalog.postgres import PostgresCatalog
    from catalog_enrichment.catalog.products import table_columns
    from catalog_enrichment.contracts import load_contract

    catalog = open_catalog(cfg.catalog)
    if not isinstance(catalog, PostgresCatalog):
        raise CatalogEnrichError("load-products writes into PostgreSQL: add --set catalog.kind=postgres")
    source = Path(args.path)
    if not source.exists():
        raise CatalogEnrichError(f"no products table at {source}")
    contract = load_contract("products")
    # the source's own columns: a Parquet folder read with the contract's schema has them all
    missing = contract.missing_columns(table_columns(source))
    if missing:
        raise CatalogEnrichError(f"{source} lacks contract column(s) {missing} (see schemas/products.yaml)")
    table = read_table(source, schema=contract.arrow_schema(enforce_nullability=False))
    rows, replaced = catalog.load_products(table)
    print(
        f"loaded {rows:,} products into {'.'.join(catalog.products)} ({catalog.describe()}), "
        f"replacing {replaced:,} rows of the same product ids"
    )
    return 0


def demo(args: argparse.Namespace, cfg: AppConfig) -> int:
    """run the whole pipeline on embedded defaults in a work folder

    Generate a marketplace in WORKDIR and run the pipeline on it.
    """
    from catalog_enrichment.demo import run_demo

    return run_demo(
        cfg, Path(args.workdir), products=args.products, seed=args.seed, catalog_kind=args.catalog_kind
    )


def labels(args: argparse.Namespace, cfg: AppConfig) -> int:
    """build the labelled products table from the catalog (merchant values as labels)

    Join the products table with the attribute table's merchant values, drop values outside the
    taxonomy (counted), leave out the frozen evaluation set's products, and overwrite the labelled
    table in one Delta commit that records the source tables' versions.
    """
    from catalog_enrichment.catalog import open_catalog
    from catalog_enrichment.catalog.labels import write_labels
    from catalog_enrichment.contracts import load_taxonomy

    out = Path(args.out or cfg.catalog.table("labelled"))
    evaluation = _eval_data(cfg)
    used = cfg.promotion.eval_data is not None or evaluation.exists()  # a named one must exist
    if not used:
        print(
            f"no evaluation set at {evaluation}: no product is left out of the labels (the promotion "
            "gate judges on one; set promotion.eval_data or --eval-data)"
        )
    catalog = open_catalog(cfg.catalog)
    catalog.source_of("products")  # a missing table fails before Spark starts
    report = write_labels(
        runtime.spark_session(cfg),
        catalog=catalog,
        evaluation=evaluation if used else None,
        out=out,
        taxonomy=load_taxonomy(cfg.taxonomy_path),
        evaluation_version=cfg.promotion.eval_version,
    )
    print(report.summary())
    print(f"written to {out}; next: catalog-enrich train --data {out}")
    return 0


def _eval_data(cfg: AppConfig) -> Path:
    return Path(cfg.promotion.eval_data or Path(cfg.catalog.root) / "eval")


def train(args: argparse.Namespace, cfg: AppConfig) -> int:
    """train, calibrate, evaluate and register a challenger version

    Train on a labelled products table (Delta or Parquet), calibrate thresholds, evaluate, log to
    MLflow and register a version with alias 'challenger'. With training.streaming the table is read
    in record batches; with training.distributed.processes above 1 the ranks run under Spark's
    TorchDistributor (spark.master, or the spark-submit master).
    """
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.training.job import run_training_job

    data = Path(args.data or cfg.catalog.table("labelled"))
    if not data.exists():
        raise CatalogEnrichError(f"training data not found: {data} (build it with `catalog-enrich labels`)")
    client = runtime.mlflow_client(cfg.mlflow)
    if cfg.training.distributed.processes > 1:  # TorchDistributor starts the ranks through Spark
        runtime.spark_session(cfg)
    outcome = run_training_job(
        cfg, load_taxonomy(cfg.taxonomy_path), data=data, client=client, device=runtime.device(cfg.inference)
    )
    reg = outcome.registered
    print(
        f"version {reg.version} of {reg.name} is now 'challenger' ({reg.uri}); next: catalog-enrich promote"
    )
    return 0


def pretrain_text(args: argparse.Namespace, cfg: AppConfig) -> int:
    """adapt the text encoder on unlabelled products (SimCSE or ConVIRT)

    Self-supervised adaptation of model.text's encoder (003): simcse contrasts two dropout views of
    each product's text, convirt its text with its own image. Writes a transformers folder to use as
    model.text.pretrained_path; labels are not read. With training.streaming the table is read in
    record batches through a shuffle buffer, never whole.
    """
    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.training.pretrain import PretrainOptions, pretrain_text
    from catalog_enrichment.training.stream import table_source

    data = Path(args.data or cfg.catalog.table("products"))
    if not data.exists():
        raise CatalogEnrichError(f"products not found: {data} (a Delta or Parquet products table)")
    streaming = cfg.training.streaming
    result = pretrain_text(
        table_source(data, batch_rows=streaming.batch_rows) if streaming.enabled else read_table(data),
        cfg,
        PretrainOptions(
            args.method, args.epochs, args.batch_size, args.learning_rate, args.temperature, args.alpha
        ),
        out=args.out,
        image_roots=[data],
        device=runtime.device(cfg.inference),
        progress=print,
    )
    print(
        f"{result.method}: {result.products:,} products, {result.epochs} epochs, loss "
        f"{result.losses[0]:.4f} -> {result.losses[-1]:.4f}; "
        f"next: --set model.text.pretrained_path={result.path}"
    )
    return 0


def promote(args: argparse.Namespace, cfg: AppConfig) -> int:
    """gate: move 'champion' to the challenger if it is better

    Score challenger and champion on a frozen evaluation set and move the 'champion' alias only if
    the challenger keeps the precision target everywhere and does not lose coverage.
    """
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.data.images import ImagePolicy
    from catalog_enrichment.promotion import EvaluationSet, GateRule, format_comparison, promote

    eval_data = _eval_data(cfg)
    if not eval_data.exists():
        raise CatalogEnrichError(
            f"evaluation data not found: {eval_data} (set promotion.eval_data or --eval-data)"
        )
    summary = promote(
        runtime.mlflow_client(cfg.mlflow),
        cfg.mlflow.registered_model,
        EvaluationSet(
            eval_data,
            cfg.promotion.eval_version,
            ImagePolicy.from_config(cfg.images, [eval_data]),
            load_taxonomy(cfg.taxonomy_path),
        ),
        GateRule.from_config(cfg.promotion, cfg.calibration),
        log_path=cfg.promotion.log or str(Path(cfg.catalog.root) / "promotion_log"),
        dry_run=args.dry_run,
        lock_wait_seconds=cfg.catalog.lock_wait_seconds,
    )
    print(format_comparison(summary))
    return 0


def enrich(args: argparse.Namespace, cfg: AppConfig) -> int:
    """score products with the champion model and write values that clear their thresholds

    The nightly job: read products (incremental by default), validate and quarantine, score inside
    Spark, write calibrated values into the attributes table in one MERGE, report.
    """
    from catalog_enrichment.catalog.reports import check_run_id, format_report
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.enrich import RunScope, run_enrichment

    if args.run_id is not None:  # before Spark starts and the model downloads
        check_run_id(args.run_id)
    taxonomy = load_taxonomy(cfg.taxonomy_path)
    spark, client, model = runtime.job_context(cfg, args.model_uri)
    outcome = run_enrichment(
        spark,
        cfg,
        taxonomy,
        model=model,
        scope=RunScope(partition=args.partition, full=args.full, run_id=args.run_id),
        client=client,
    )
    print(format_report(outcome.report))
    return 0


def backfill(args: argparse.Namespace, cfg: AppConfig) -> int:
    """re-score a range of ingest_date partitions, one committed run per partition

    One full enrichment run per partition in [--from, --to]; partitions already done by the same
    model version are skipped unless --force, so an interrupted backfill resumes. Exits 1 when the
    run health kept values out of a partition (it is not done: run the backfill again once the
    cause is fixed).
    """
    import datetime as dt

    from catalog_enrichment.catalog.reports import BLOCKED
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.enrich import BackfillRange, backfill_partitions

    try:
        date_from, date_to = dt.date.fromisoformat(args.date_from), dt.date.fromisoformat(args.date_to)
    except ValueError as exc:
        raise CatalogEnrichError(f"--from/--to must be dates (YYYY-MM-DD): {exc}") from None
    if date_from > date_to:  # before Spark starts and the model downloads
        raise CatalogEnrichError(f"--from {date_from} is after --to {date_to}")
    spark, client, model = runtime.job_context(cfg, args.model_uri)
    results = backfill_partitions(
        spark,
        cfg,
        load_taxonomy(cfg.taxonomy_path),
        model=model,
        days=BackfillRange(date_from, date_to, force=args.force),
        client=client,
    )
    ran = [(scope, o) for scope, o in results if o is not None]
    kept = [scope for scope, o in ran if o.report.summary().get(BLOCKED)]
    print(
        f"backfill finished: {len(ran) - len(kept)} partition(s) enriched, {len(results) - len(ran)} "
        f"skipped (already done){f', {len(kept)} kept values out' if kept else ''}"
    )
    if kept:
        print(
            f"the run health kept values out of {', '.join(kept)}: run the backfill again once the cause is "
            "fixed (those partitions are not done)"
        )
    return 1 if kept else 0


def rollback(args: argparse.Namespace, cfg: AppConfig) -> int:
    """undo what one run or one model version wrote (restores the values it replaced)

    Remove the values a run (or every run of a version of mlflow.registered_model) wrote and restore
    the values they replaced (kept by each run at its commit); every run of a model version in one
    commit.
    Pairs changed by later runs are left alone. --model-version first tags the version rolled back
    in the MLflow registry, so no alias serves it again (enrich, backfill) and the promotion gate
    neither promotes it nor compares a challenger with it; where the registry cannot be reached,
    nothing is rolled back.
    """
    from catalog_enrichment.catalog import open_catalog, runs
    from catalog_enrichment.contracts import load_taxonomy

    catalog = open_catalog(cfg.catalog)
    version, name = args.model_version, cfg.mlflow.registered_model
    mark = None if version is None else (lambda _runs: _mark_rolled_back(cfg, catalog, name, str(version)))
    linked = load_taxonomy(cfg.taxonomy_path).held_together()
    runs.rollback(
        catalog, run_id=args.run_id, model_version=version, model_name=name, before=mark, linked=linked
    )
    return 0


def _mark_rolled_back(cfg: AppConfig, catalog: Catalog, name: str, version: str) -> None:
    """Tag ``name``'s ``version`` rolled back in the registry."""
    from catalog_enrichment import registry

    note = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, in {catalog.describe()}"
    try:
        registry.mark_rolled_back(runtime.mlflow_client(cfg.mlflow), name, version, note)
    except CatalogEnrichError as exc:
        raise CatalogEnrichError(
            f"{exc}. Nothing was rolled back: an alias naming the version would serve it again. Fix "
            "the registry and run this again, or undo its runs one by one with --run-id"
        ) from None
    print(f"{name} v{version} tagged {registry.ROLLED_BACK_TAG}: no alias serves it again", flush=True)


def embeddings(args: argparse.Namespace, cfg: AppConfig) -> int:
    """list the embedding store's vectors per encoder fingerprint; --vacuum removes unused ones,
    --fill encodes a table's products on the Spark executors

    Print the stored vectors per encoder fingerprint and the versions of mlflow.registered_model
    (those holding an alias) that use each. With --vacuum, delete the vectors of every fingerprint
    no such version uses, with the catalog's lock held (a model version re-scoring afterwards
    encodes its products again). With --fill (training.encoders: frozen), encode the products of
    --data (default: catalog.labelled) whose vectors the store lacks for the configured encoders, as
    a Spark job over the executors, so a training with this config encodes nothing on its driver.
    """
    from catalog_enrichment import registry
    from catalog_enrichment.catalog import open_catalog

    catalog = open_catalog(cfg.catalog)
    if args.fill:
        return _fill_store(args, cfg, catalog)
    name = cfg.mlflow.registered_model
    live = registry.live_encoders(runtime.mlflow_client(cfg.mlflow), name)
    counts = catalog.embedding_counts()
    unregistered = "" if live is not None else f" (model {name!r} is not registered yet)"
    print(f"embedding store of {catalog.describe()}: {sum(counts.values()):,} vectors{unregistered}")
    for encoder in sorted({*counts, *(live or {})}):
        users = f"{name} v{', v'.join(live[encoder])}" if live and encoder in live else "no live version"
        print(f"  {encoder}  {counts.get(encoder, 0):>12,}  {users}")
    if args.vacuum:
        with catalog.lock("embeddings vacuum", lambda m: print(m, flush=True)):
            # read again once the lock is held: a version registered while it waited is live too
            live = registry.live_encoders(runtime.mlflow_client(cfg.mlflow), name)
            if live is None:  # what --fill stored is for the first training: nothing to judge by
                raise CatalogEnrichError(
                    f"model {name!r} is not registered yet: no vector can be told unused "
                    "(vacuum after a training registers a version)"
                )
            removed = catalog.vacuum_embeddings(live)
        print(f"removed {removed:,} vectors no live version uses")
    return 0


def _fill_store(args: argparse.Namespace, cfg: AppConfig, catalog: Catalog) -> int:
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.training.store_fill import fill_embedding_store

    data = Path(args.data or cfg.catalog.table("labelled"))
    if not data.exists():
        raise CatalogEnrichError(f"table not found: {data} (a Delta or Parquet products or labelled table)")
    spark = runtime.spark_session(cfg)
    taxonomy = load_taxonomy(cfg.taxonomy_path)
    done = fill_embedding_store(spark, cfg, taxonomy, data, catalog, say=lambda m: print(m, flush=True))
    print(
        f"embedding store of {catalog.describe()}, encoders {done.encoder}: {done.products:,} products read, "
        f"{done.reused:,} already stored, {done.encoded:,} encoded on the executors, {done.stored:,} stored, "
        f"left out {done.image_errors:,} products whose image did not decode or whose scores were not "
        f"finite and {done.placeholders:,} placeholders "
        f"(one image on more than {cfg.validation.max_products_per_image} products) ({done.seconds:.1f}s)"
    )
    return 0


def report(args: argparse.Namespace, cfg: AppConfig) -> int:
    """print a run report (the latest run by default), or the realized-precision audit

    Print what a run read, quarantined, scored and wrote, its timings and throughput. With --audit:
    the realized precision of what a model version wrote, from people's verdicts on its latest
    reviewed sample, per attribute and category, weighted back to the written values, with Wilson
    intervals; logged to MLflow with a chart. --check exits 4 when an attribute is below target (and
    only then), so `report --audit --model-version V --check; [ $? -ne 4 ] || rollback --model-version V`
    undoes a failing version.
    With --health: the run's health checks from the catalog's run_health table (per attribute score
    drift, coverage, value mix and estimated precision; the inputs) and what they blocked; --check
    then also exits 1 when one failed.
    """
    from catalog_enrichment.catalog import open_catalog
    from catalog_enrichment.catalog.reports import blocked_why, format_report, report_for

    catalog = open_catalog(cfg.catalog)
    if args.audit:
        return _audit(args, cfg, catalog)
    if args.model_version or args.sample:
        raise CatalogEnrichError("--model-version and --sample go with --audit")
    run = report_for(catalog.read_reports(), args.run_id, where=catalog.describe())
    failed = False
    if args.health:
        import pyarrow.compute as pc

        from catalog_enrichment.health import format_health

        table = catalog.keyed_rows("run_health")
        checks = table.filter(pc.equal(table["run_id"], run.run_id)).to_pylist()
        failed = any(c["status"] == "failed" for c in checks)
        text = format_health(run.run_id, checks, blocked_why(run.summary().get("health_blocked")))
        print(json.dumps(checks, indent=2, default=str) if args.json else text)
    else:
        print(json.dumps(run.to_row(), indent=2, default=str) if args.json else format_report(run))
    if args.check and run.status != "succeeded":
        return EXIT_ABORTED if run.status == "aborted" else 1
    return 1 if args.check and failed else 0


def _audit(args: argparse.Namespace, cfg: AppConfig, catalog: Catalog) -> int:
    from catalog_enrichment.review import audit_catalog, record_audit
    from catalog_enrichment.review.audit import format_audit

    if args.run_id:
        raise CatalogEnrichError(
            "--audit audits a model version (--model-version) or a sample (--sample), not a run"
        )
    client = runtime.mlflow_client(cfg.mlflow)
    audit = audit_catalog(cfg, catalog, client, model_version=args.model_version, sample_id=args.sample)
    print(json.dumps(audit.to_dict(), indent=2, default=str) if args.json else format_audit(audit))
    try:
        record_audit(cfg.mlflow, audit, client=client, chart_dir=Path(cfg.catalog.root) / "audits")
    except Exception as exc:  # the verdicts' judgement stands; its record failed
        from catalog_enrichment.redaction import redact_text

        why = redact_text(f"{type(exc).__name__}: {exc}")[:300]
        print(f"catalog-enrich: error: the audit was not recorded: {why}", file=sys.stderr)
        recorded = False
    else:
        recorded = True
    if args.check and audit.failed:
        return EXIT_BELOW_TARGET
    return 0 if recorded else 1


def review_sample(args: argparse.Namespace, cfg: AppConfig) -> int:
    """draw a stratified sample of written values for people to judge

    Sample the values one run (--run-id) or one model version (--model-version) wrote, stratified by
    (attribute, value, category) cell with every cell given a share (see docs/review.md);
    record it in the catalog and write it for annotators: a CSV or Parquet file with the product's
    text, an image per row and empty verdict/reviewer/reviewed_at columns, and a review page (FILE
    with .html) that saves a verdict file. The same catalog, size and seed draw the same sample.
    """
    from catalog_enrichment.catalog import open_catalog
    from catalog_enrichment.review import sample_for_review

    catalog = open_catalog(cfg.catalog)
    if args.run_id:  # a run that wrote nothing (a quiet night) has nothing to review: not an error
        run = next((r for r in catalog.read_reports() if r.run_id == args.run_id), None)
        if run is not None and run.status == "succeeded" and not any(run.written_per_attribute.values()):
            print(f"run {args.run_id} wrote no value: nothing to review")
            return 0
    files = sample_for_review(
        cfg,
        catalog,
        run_id=args.run_id,
        model_version=args.model_version,
        size=args.size,
        seed=args.seed,
        out=Path(args.out) if args.out else None,
    )
    drawn = files.sample
    print(
        f"sample {drawn.sample_id}: {drawn.rows.num_rows:,} of {drawn.population:,} written values "
        f"({files.without_image:,} without an image)\n  file: {files.file}\n  page: {files.page}\n"
        f"next: fill verdict (yes/no/unsure), reviewer and reviewed_at, or save from the page, then "
        f"catalog-enrich review import FILE"
    )
    return 0


def review_import(args: argparse.Namespace, cfg: AppConfig) -> int:
    """import people's verdicts on a review sample

    Check the whole file (every row names a drawn value; verdict yes/no/unsure or empty = not yet;
    a reviewer; reviewed_at ISO 8601, empty = the file's time); any problem imports nothing. New
    and changed verdicts go into the reviews table in one commit; importing a file again changes nothing.
    """
    from catalog_enrichment.catalog import open_catalog
    from catalog_enrichment.catalog.reviews import import_verdicts

    result = import_verdicts(open_catalog(cfg.catalog), Path(args.file))
    print(result.summary())
    print("next: catalog-enrich report --audit")
    return 0


def show_config(args: argparse.Namespace, cfg: AppConfig) -> int:
    """print the effective configuration

    Print the merged configuration (defaults < YAML < env < flags), secrets masked.
    """
    import yaml

    print(yaml.safe_dump(cfg.redacted(), sort_keys=False), end="")
    return 0
