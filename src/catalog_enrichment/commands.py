"""The CLI's commands: each reads its arguments, builds what a job process builds (``runtime``)
and calls the library. The parser is in :mod:`catalog_enrichment.cli`."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from catalog_enrichment import runtime
from catalog_enrichment.config import AppConfig, load_config, merge_layers, parse_overrides
from catalog_enrichment.errors import CatalogEnrichError

# Exit codes: 0 ok, 1 failed, 2 user mistake (bad config, missing file, ...), 3 the circuit breaker
# stopped an enrichment run before any write (schedulers alert on it differently).
EXIT_ABORTED = 3
EXIT_BUSY = 75  # EX_TEMPFAIL: another run holds the catalog; try again later (as the cron wrapper)
T = TypeVar("T")


def overrides_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    synthetic = {
        "products": getattr(args, "products", None),
        "seed": getattr(args, "seed", None),
        "bad_rate": getattr(args, "bad_rate", None),
        "label_noise": getattr(args, "label_noise", None),
        "image_size": getattr(args, "image_size", None),
        "format": getattr(args, "format", None),
        "image_files": getattr(args, "image_files", None),
        "long_tail": getattr(args, "long_tail", None),
    }
    taxonomy = getattr(args, "taxonomy", None)
    if taxonomy is None and getattr(args, "long_tail", None):
        from catalog_enrichment.contracts import schemas_dir
        from catalog_enrichment.data.synthetic import LONG_TAIL_TAXONOMY

        taxonomy = str(schemas_dir() / LONG_TAIL_TAXONOMY)
    is_train = getattr(args, "command", "") == "train"
    catalog = {"root": getattr(args, "catalog", None)}
    if getattr(args, "command", "") in ("enrich", "backfill", "labels"):
        catalog["products"] = getattr(args, "products", None)
        synthetic["products"] = None
    return {
        "catalog": catalog,
        "synthetic": synthetic,
        "taxonomy_path": taxonomy,
        "mlflow": {"registered_model": getattr(args, "registered_model", None)},
        "model": {"fusion": getattr(args, "fusion", None)},
        "training": {"epochs": getattr(args, "epochs", None) if is_train else None},
        "promotion": {
            "eval_data": getattr(args, "eval_data", None),
            "eval_version": getattr(args, "eval_version", None),
        },
    }


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


def load_products(args: argparse.Namespace, cfg: AppConfig) -> int:
    """copy a products table into the PostgreSQL catalog (a test or staging database)

    Upsert the rows of a Delta or Parquet products table into catalog.postgres.products_table
    (created with the contract's columns when missing): the loaded rows of a product id replace that
    id's rows, so loading the same table again changes nothing. Needs catalog.kind postgres.
    """
    from catalog_enrichment.catalog import open_catalog
    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.catalog.postgres import PostgresCatalog
    from catalog_enrichment.contracts import load_contract

    catalog = open_catalog(cfg.catalog)
    if not isinstance(catalog, PostgresCatalog):
        raise CatalogEnrichError("load-products writes into PostgreSQL: add --set catalog.kind=postgres")
    source = Path(args.path)
    if not source.exists():
        raise CatalogEnrichError(f"no products table at {source}")
    contract = load_contract("products")
    table = read_table(source, schema=contract.arrow_schema(enforce_nullability=False))
    missing = contract.missing_columns(table.column_names)
    if missing:
        raise CatalogEnrichError(f"{source} lacks contract column(s) {missing} (see schemas/products.yaml)")
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
    report = write_labels(
        catalog=open_catalog(cfg.catalog),
        evaluation=Path(_eval_data(cfg)),
        out=out,
        taxonomy=load_taxonomy(cfg.taxonomy_path),
    )
    print(report.summary())
    print(f"written to {out}; next: catalog-enrich train --data {out}")
    return 0


def _eval_data(cfg: AppConfig) -> Path:
    return Path(cfg.promotion.eval_data or Path(cfg.catalog.root) / "eval")


def train(args: argparse.Namespace, cfg: AppConfig) -> int:
    """train, calibrate, evaluate and register a challenger version

    Train on a labelled products table (Delta or Parquet), calibrate thresholds, evaluate, log to
    MLflow and register a version with alias 'challenger'.
    """
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.training.job import run_training_job

    data = Path(args.data or cfg.catalog.table("labelled"))
    if not data.exists():
        raise CatalogEnrichError(f"training data not found: {data} (build it with `catalog-enrich labels`)")
    outcome = run_training_job(
        cfg,
        load_taxonomy(cfg.taxonomy_path),
        data=data,
        client=runtime.mlflow_client(cfg),
        device=runtime.device(cfg),
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
    model.text.pretrained_path; labels are not read.
    """
    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.training.pretrain import pretrain_text

    data = Path(args.data or cfg.catalog.table("products"))
    if not data.exists():
        raise CatalogEnrichError(f"products not found: {data} (a Delta or Parquet products table)")
    result = pretrain_text(
        read_table(data),
        cfg,
        method=args.method,
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        temperature=args.temperature,
        alpha=args.alpha,
        image_roots=[data],
        device=runtime.device(cfg),
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
    from catalog_enrichment.data.images import ImagePolicy
    from catalog_enrichment.promotion import format_comparison, promote

    eval_data = _eval_data(cfg)
    if not eval_data.exists():
        raise CatalogEnrichError(
            f"evaluation data not found: {eval_data} (set promotion.eval_data or --eval-data)"
        )
    summary = promote(
        runtime.mlflow_client(cfg),
        registered_model=cfg.mlflow.registered_model,
        eval_data=eval_data,
        eval_version=cfg.promotion.eval_version,
        configured_target=cfg.calibration.target_precision,
        max_coverage_loss=cfg.promotion.max_coverage_loss,
        confidence=cfg.calibration.confidence,
        min_written=cfg.promotion.min_written,
        log_path=cfg.promotion.log or str(Path(cfg.catalog.root) / "promotion_log"),
        dry_run=args.dry_run,
        image_policy=ImagePolicy.from_config(cfg.images, [eval_data]),
    )
    print(format_comparison(summary))
    return 0


def enrich(args: argparse.Namespace, cfg: AppConfig) -> int:
    """score products with the champion model and write values that clear their thresholds

    The nightly job: read products (incremental by default), validate and quarantine, score inside
    Spark, write calibrated values into the attributes table in one MERGE, report.
    """
    from catalog_enrichment.catalog.reports import format_report
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.enrich import run_enrichment

    taxonomy = load_taxonomy(cfg.taxonomy_path)
    spark, client, model = runtime.job_context(cfg, args.model_uri)
    outcome = run_enrichment(
        spark,
        cfg,
        taxonomy,
        model=model,
        partition=args.partition,
        full=args.full,
        run_id=args.run_id,
        client=client,
    )
    print(format_report(outcome.report))
    return 0


def backfill(args: argparse.Namespace, cfg: AppConfig) -> int:
    """re-score a range of ingest_date partitions, one committed run per partition

    One full enrichment run per partition in [--from, --to]; partitions already done by the same
    model version are skipped unless --force, so an interrupted backfill resumes.
    """
    import datetime as dt

    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.enrich import backfill_partitions

    try:
        date_from, date_to = dt.date.fromisoformat(args.date_from), dt.date.fromisoformat(args.date_to)
    except ValueError as exc:
        raise CatalogEnrichError(f"--from/--to must be dates (YYYY-MM-DD): {exc}") from None
    spark, client, model = runtime.job_context(cfg, args.model_uri)
    results = backfill_partitions(
        spark,
        cfg,
        load_taxonomy(cfg.taxonomy_path),
        model=model,
        date_from=date_from,
        date_to=date_to,
        force=args.force,
        client=client,
    )
    done = sum(1 for _, o in results if o is not None)
    print(f"backfill finished: {done} partition(s) enriched, {len(results) - done} skipped")
    return 0


def rollback(args: argparse.Namespace, cfg: AppConfig) -> int:
    """undo what one run or one model version wrote (restores the values it replaced)

    Remove the values a run (or every run of a model version) wrote and restore the values they
    replaced (kept by each run at its commit); every run of a model version in one commit.
    Pairs changed by later runs are left alone.
    """
    from catalog_enrichment.catalog import open_catalog, runs

    runs.rollback(open_catalog(cfg.catalog), run_id=args.run_id, model_version=args.model_version)
    return 0


def embeddings(args: argparse.Namespace, cfg: AppConfig) -> int:
    """list the embedding store's vectors per encoder fingerprint; --vacuum removes unused ones

    Print the stored vectors per encoder fingerprint and the versions of mlflow.registered_model
    (those holding an alias) that use each. With --vacuum, delete the vectors of every fingerprint
    no such version uses, with the catalog's lock held (a model version re-scoring afterwards
    encodes its products again).
    """
    from catalog_enrichment import registry
    from catalog_enrichment.catalog import open_catalog

    catalog = open_catalog(cfg.catalog)
    name = cfg.mlflow.registered_model
    live = registry.live_encoders(runtime.mlflow_client(cfg), name)
    counts = catalog.embedding_counts()
    print(f"embedding store of {catalog.describe()}: {sum(counts.values()):,} vectors")
    for encoder in sorted({*counts, *live}):
        users = f"{name} v{', v'.join(live[encoder])}" if encoder in live else "no live version"
        print(f"  {encoder}  {counts.get(encoder, 0):>12,}  {users}")
    if args.vacuum:
        with catalog.lock("embeddings vacuum", lambda m: print(m, flush=True)):
            removed = catalog.vacuum_embeddings(live)
        print(f"removed {removed:,} vectors no live version uses")
    return 0


def report(args: argparse.Namespace, cfg: AppConfig) -> int:
    """print a run report (the latest run by default), or the realized-precision audit

    Print what a run read, quarantined, scored and wrote, its timings and throughput. With --audit:
    the realized precision of what a model version wrote, from people's verdicts on its latest
    reviewed sample, per attribute and category, weighted back to the written values, with Wilson
    intervals; logged to MLflow with a chart. --check exits 1 when an attribute is below target, so
    `report --audit --model-version V --check || rollback --model-version V` undoes a failing version.
    With --health: the run's health checks from the catalog's run_health table (per attribute score
    drift, coverage, value mix and estimated precision; the inputs) and what they blocked; --check
    then also exits 1 when one failed.
    """
    from catalog_enrichment.catalog import open_catalog
    from catalog_enrichment.catalog.reports import format_report, report_for

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
        blocked = run.summary().get("health_blocked") or []
        text = format_health(run.run_id, checks, blocked)
        print(json.dumps(checks, indent=2, default=str) if args.json else text)
    else:
        print(json.dumps(run.to_row(), indent=2, default=str) if args.json else format_report(run))
    if args.check and run.status != "succeeded":
        return EXIT_ABORTED if run.status == "aborted" else 1
    return 1 if args.check and failed else 0


def _audit(args: argparse.Namespace, cfg: AppConfig, catalog: Any) -> int:
    from catalog_enrichment.review import audit_catalog, record_audit
    from catalog_enrichment.review.audit import format_audit

    if args.run_id:
        raise CatalogEnrichError(
            "--audit audits a model version (--model-version) or a sample (--sample), not a run"
        )
    client = runtime.mlflow_client(cfg)
    audit = audit_catalog(cfg, catalog, client, model_version=args.model_version, sample_id=args.sample)
    record_audit(cfg, audit, client=client, chart_dir=Path(cfg.catalog.root) / "audits")
    print(json.dumps(audit.to_dict(), indent=2, default=str) if args.json else format_audit(audit))
    return 1 if args.check and audit.failed else 0


def review_sample(args: argparse.Namespace, cfg: AppConfig) -> int:
    """draw a stratified sample of written values for people to judge

    Sample the values one run (--run-id) or one model version (--model-version) wrote, balanced over
    attribute values and categories (iterative stratification, as paper 004's human evaluation);
    record it in the catalog and write it for annotators: a CSV or Parquet file with the product's
    text, an image per row and empty verdict/reviewer/reviewed_at columns, and a review page (FILE
    with .html) that saves a verdict file. The same catalog, size and seed draw the same sample.
    """
    from catalog_enrichment.catalog import open_catalog
    from catalog_enrichment.review import sample_for_review

    files = sample_for_review(
        cfg,
        open_catalog(cfg.catalog),
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


def bench_generate(args: argparse.Namespace, cfg: AppConfig) -> int:
    """synthetic-marketplace generation speed on one core

    Time the generator (in-process, single-threaded).
    """
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.data.synthetic import products_batches

    synthetic = cfg.synthetic.model_copy(
        update={"products": args.products, "image_size": args.image_size, "bad_rate": 0.04}
    )
    taxonomy = load_taxonomy(cfg.taxonomy_path)
    started = time.perf_counter()
    cpu_started = time.process_time()
    rows = sum(batch.num_rows for batch, _ in products_batches(synthetic, taxonomy))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    result = {
        "products": rows,
        "image_size": args.image_size,
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "products_per_second": round(rows / wall, 1),
        "products_per_cpu_second": round(rows / cpu, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def bench_quality(args: argparse.Namespace, cfg: AppConfig) -> int:
    """train every fusion method; R@P95, precision, coverage

    Generate a marketplace, train each fusion method with the same budget, calibrate, evaluate on
    the test split; write JSON + markdown.
    """
    import torch

    from catalog_enrichment.bench.quality import format_quality_markdown, run_quality_benchmark
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.models.fusion import list_fusions

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list_fusions()
    unknown = sorted(set(methods) - set(list_fusions()))
    if unknown:
        raise CatalogEnrichError(f"unknown fusion(s) {unknown}; available: {', '.join(list_fusions())}")

    def adapted(base: AppConfig) -> AppConfig:
        return base.model_copy(
            update={
                "synthetic": base.synthetic.model_copy(update={"products": args.products, "seed": args.seed}),
                "training": base.training.model_copy(update={"epochs": args.epochs or base.training.epochs}),
            }
        )

    cfg = adapted(cfg)
    device = "cuda" if cfg.inference.device != "cpu" and torch.cuda.is_available() else "cpu"
    if cfg.synthetic.label_noise > 0 or args.ensemble:
        return _paper_study(args, cfg, device)
    if bool(args.data) != bool(args.test_data):
        raise CatalogEnrichError("--data and --test-data go together: a table to train on, one to test on")
    data = None
    if args.data:
        data = (Path(args.data), Path(args.test_data))
        missing = [str(p) for p in data if not p.exists()]
        if missing:
            raise CatalogEnrichError(f"no such table: {', '.join(missing)}")
    result = run_quality_benchmark(
        cfg,
        load_taxonomy(cfg.taxonomy_path),
        workdir=Path(args.workdir),
        methods=methods,
        kl_lambda=args.kl_lambda,
        contenders=_contenders(args, adapted) if args.config else None,
        data=data,
        device=device,
    )
    return _write_result(result, Path(args.out), format_quality_markdown(result))


def _paper_study(args: argparse.Namespace, cfg: AppConfig, device: str) -> int:
    from catalog_enrichment.bench.papers import format_study_markdown, run_ensemble_study, run_noise_study
    from catalog_enrichment.contracts import load_taxonomy

    taxonomy = load_taxonomy(cfg.taxonomy_path)
    if args.ensemble:
        ensemble = cfg.model.ensemble.model_copy(update={"members": args.ensemble})
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"ensemble": ensemble})})
        result = run_ensemble_study(cfg, taxonomy, workdir=Path(args.workdir), device=device)
    else:
        result = run_noise_study(cfg, taxonomy, workdir=Path(args.workdir), device=device)
    return _write_result(result, Path(args.out), format_study_markdown(result))


def _write_result(result: dict[str, Any], out: Path, markdown: str) -> int:
    from catalog_enrichment.bench.quality import write_result

    md = write_result(result, out, markdown)
    print(markdown)
    print(f"wrote {out} and {md}")
    return 0


def bench_drift(args: argparse.Namespace, cfg: AppConfig) -> int:
    """do the run health checks catch drifted nights and stay quiet on clean ones?

    Train on a generated marketplace without one product type, then run the job and the health
    check on --batches clean batches and as many per drift kind (colour-shifted photos, a CDN
    placeholder, the unseen product type, German titles, titles stripped to ids; --share of each
    drifted batch from the broken feed), every check in block mode. Reports false alarms,
    detections and whether any value of a blocked attribute was written. With --data and
    --test-data (and --taxonomy): a real catalog's training and test tables instead, without the
    --new-type products in training.
    """
    from catalog_enrichment.bench.chaos import TINY_MODEL
    from catalog_enrichment.bench.drift import KINDS, NEW_TYPE, format_drift, run_drift_bench
    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.config import merge_layers
    from catalog_enrichment.contracts import load_taxonomy

    if bool(args.data) != bool(args.test_data):
        raise CatalogEnrichError("--data and --test-data go together")
    data = (read_table(args.data), read_table(args.test_data)) if args.data else None
    # a real catalog's words are not the generator's: no German titles there unless asked for
    default_kinds = [k for k in KINDS if data is None or k != "other_language"]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else default_kinds

    if not args.configured_model:
        layers = {"model": TINY_MODEL, "training": {"epochs": 6, "batch_size": 32, "crossfit_folds": 0}}
        cfg = cfg.model_validate(merge_layers(cfg.model_dump(), layers))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result = run_drift_bench(
        runtime.spark_session(cfg), cfg, load_taxonomy(cfg.taxonomy_path), workdir,
        batches=args.batches, batch_size=args.batch_size, share=args.share, kinds=kinds,
        train_products=args.train_products, data=data, new_type=args.new_type or NEW_TYPE, seed=args.seed,
    )  # fmt: skip
    return _write_result(result, Path(args.out), format_drift(result))


def bench_audit(args: argparse.Namespace, cfg: AppConfig) -> int:
    """do the audit's intervals hold the true precision of what was written?

    On a demo folder (its catalog and the incoming marketplace's ground truth): draw --seeds review
    samples per balance, judge them from the truth, audit them (nothing is recorded), and count how
    often each attribute's interval contains the true precision of everything the version wrote.
    """
    from catalog_enrichment.bench.audit import format_audit_markdown, run_audit_benchmark
    from catalog_enrichment.catalog.embedded import LakehouseCatalog
    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.contracts import load_taxonomy

    work = Path(args.workdir)
    if not (work / "incoming" / "truth").exists() or not (work / "lakehouse" / "attributes").exists():
        raise CatalogEnrichError(f"{work} is not a demo folder (run `catalog-enrich demo --workdir {work}`)")
    balances = _numbers(args.balances, "--balances", float)
    catalog_cfg = cfg.catalog.model_copy(
        update={"root": str(work / "lakehouse"), "products": str(work / "incoming" / "products")}
    )
    result = run_audit_benchmark(
        LakehouseCatalog(catalog_cfg),
        read_table(work / "incoming" / "truth"),
        load_taxonomy(cfg.taxonomy_path),
        size=args.size,
        seeds=args.seeds,
        balances=balances,
        confidence=cfg.review.confidence,
        target=cfg.calibration.target_precision,
    )
    return _write_result(result, Path(args.out), format_audit_markdown(result))


def bench_pretrain_text(args: argparse.Namespace, cfg: AppConfig) -> int:
    """text-only from plain, SimCSE- and ConVIRT-adapted encoders

    Generate a marketplace, adapt the text encoder on all its products with SimCSE and with ConVIRT,
    then fine-tune text-only models on a share of the labels from the plain and the two adapted
    encoders; R@P95 on the same test split (003's low-label regime).
    """
    import torch

    from catalog_enrichment.bench.papers import format_study_markdown, run_pretrain_study
    from catalog_enrichment.contracts import load_taxonomy

    cfg = cfg.model_copy(
        update={
            "synthetic": cfg.synthetic.model_copy(update={"products": args.products, "seed": args.seed}),
            "training": cfg.training.model_copy(update={"epochs": args.epochs or cfg.training.epochs}),
        }
    )
    device = "cuda" if cfg.inference.device != "cpu" and torch.cuda.is_available() else "cpu"
    result = run_pretrain_study(
        cfg,
        load_taxonomy(cfg.taxonomy_path),
        workdir=Path(args.workdir),
        label_fraction=args.label_fraction,
        pretrain_epochs=args.pretrain_epochs,
        device=device,
    )
    return _write_result(result, Path(args.out), format_study_markdown(result))


def _contenders(
    args: argparse.Namespace, adapted: Callable[[AppConfig], AppConfig]
) -> list[tuple[str, AppConfig]]:
    """``bench quality --config A --config B [--modes m1,m2]``: (label, config) per run."""
    layers = merge_layers(parse_overrides(args.overrides), overrides_from_flags(args))
    modes = [m.strip() for m in args.modes.split(",")] if args.modes else []
    runs: list[tuple[str, AppConfig]] = []
    for path in args.config:
        name, file = ("default", None) if path == "default" else (Path(path).stem, path)
        base = load_config(file, overrides=layers, environ={})
        pretrained = base.model.text.pretrained_path or base.model.image.pretrained_path
        for mode in modes if modes and pretrained else [base.training.encoders]:
            run_cfg = load_config(
                file, overrides=merge_layers(layers, {"training": {"encoders": mode}}), environ={}
            )
            runs.append((f"{name}/{mode}", adapted(run_cfg)))
    return runs


def bench_throughput(args: argparse.Namespace, cfg: AppConfig) -> int:
    """the job's speed against its model's raw speed and the plain MLflow path

    Measure on the same model: the raw forward loop, the per-batch predictor, and the whole
    enrichment job as a process of its own (with --peer: against mlflow.pyfunc.spark_udf,
    alternating; with --rescore-uri: then a new head re-scoring from the embedding store); mode
    encoders: each encoder alone in each runtime (torch, onnx); write JSON.
    """
    from catalog_enrichment.bench.throughput import run_throughput_benchmark
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.versions import ModelVersion

    device = runtime.device(cfg)
    known = ("raw", "predictor", "raw_tasks", "encoders", "job")
    default = ",".join(m for m in known if m != "encoders" and (device == "cpu" or m != "raw_tasks"))
    modes = [m.strip() for m in (args.modes or default).split(",") if m.strip()]
    unknown = sorted(set(modes) - set(known))
    if unknown or not modes:
        raise CatalogEnrichError(f"--modes: unknown {unknown}; choose from {', '.join(known)}")
    sizes = _numbers(args.sizes, "--products", int)
    if args.bundle:
        bundle = Path(args.bundle)
        if not (bundle / "weights.pt").is_file():
            raise CatalogEnrichError(f"{bundle} is not a model bundle (no weights.pt)")
        if "job" in modes or args.peer:
            raise CatalogEnrichError("job and --peer run a registered model: give --model-uri, not --bundle")
        model = ModelVersion("", bundle.name, bundle_dir=bundle.resolve())
    else:
        model = runtime.model_version(cfg, args.model_uri, runtime.mlflow_client(cfg))
    rescore = None
    if args.rescore_uri:
        if "job" not in modes or args.bundle:
            raise CatalogEnrichError("--rescore-uri re-scores after a job run: give --model-uri and mode job")
        rescore = runtime.model_version(cfg, args.rescore_uri, runtime.mlflow_client(cfg))
    config_args = [*(["--config", str(Path(args.config).resolve())] if args.config else [])]
    config_args += [arg for override in args.overrides for arg in ("--set", override)]
    result = run_throughput_benchmark(
        cfg,
        load_taxonomy(cfg.taxonomy_path),
        model=model,
        sizes=sizes,
        workdir=Path(args.workdir),
        modes=[*modes, *(["rescore"] if rescore else []), *(["peer"] if args.peer else [])],
        rescore=rescore,
        repeats=args.repeats,
        device=device,
        threads=args.threads,
        block=args.block,
        config_args=config_args,
    )
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{key}: {value:.3f}")
    print(f"wrote {args.out}")
    return 0


def _numbers(text: str, flag: str, kind: Callable[[str], T]) -> list[T]:
    """``1,2,3`` -> ``[1, 2, 3]``; a one-line error naming ``flag`` otherwise."""
    try:
        return [kind(n) for n in text.split(",")]
    except ValueError:
        raise CatalogEnrichError(f"{flag}: comma-separated numbers expected, got {text!r}") from None


def bench_write(args: argparse.Namespace, cfg: AppConfig) -> int:
    """how fast one run's values land in each catalog (PostgreSQL COPY + merge, Delta MERGE)

    Stage the values of N products as a run stages them, then time the catalog's write of a first
    run (inserts) and of a second run replacing them, on fresh catalogs, medians over repeats.
    PostgreSQL: the server of CATALOG_ENRICH_PG_DSN / PGHOST, else a throw-away local one.
    """
    import contextlib
    import os
    import tempfile

    from catalog_enrichment.bench.catalog_write import format_write_bench, run_write_bench
    from catalog_enrichment.catalog.pgserver import LocalPostgres
    from catalog_enrichment.catalog.postgres import PG_DSN_ENV

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - {"postgres", "lakehouse"}:
        raise CatalogEnrichError(f"--kinds takes postgres and/or lakehouse, got {args.kinds!r}")
    cfg = cfg.model_copy(update={"catalog": cfg.catalog.model_copy(update={"kind": "postgres"})})
    with contextlib.ExitStack() as stack:
        if "postgres" in kinds and not (os.environ.get(PG_DSN_ENV) or os.environ.get("PGHOST")):
            server = stack.enter_context(LocalPostgres())
            os.environ[PG_DSN_ENV] = server.dsn()
            stack.callback(os.environ.pop, PG_DSN_ENV, None)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-write-catalogs-")))

        def config(kind: str) -> Any:
            def make(repeat: int) -> Any:
                update: dict[str, Any] = {"kind": kind, "root": str(tmp / f"{kind}-{repeat}")}
                if kind == "postgres":
                    update["postgres"] = cfg.catalog.postgres.model_copy(
                        update={"db_schema": f"bench_{repeat}"}
                    )
                return cfg.catalog.model_copy(update=update)

            return make

        spark = runtime.spark_session(cfg)
        result = run_write_bench(
            spark, {k: config(k) for k in kinds}, products=args.products, repeats=args.repeats
        )
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(format_write_bench(result))
    print(f"wrote {args.out}")
    return 0


def bench_scale(args: argparse.Namespace, cfg: AppConfig) -> int:
    """what one nightly increment costs as the catalog grows (both catalogs)

    Grow the attribute table to each --rows size (rows of other products, ids between the
    increment's), then enrich the same increment as a whole catalog-enrich process on each;
    report wall time, driver peak RSS and stage seconds, medians over repeats. PostgreSQL: the
    server of CATALOG_ENRICH_PG_DSN / PGHOST, else a throw-away local one.
    """
    import contextlib
    import os

    from catalog_enrichment.bench.scale import format_scale, run_scale_bench
    from catalog_enrichment.catalog.pgserver import LocalPostgres
    from catalog_enrichment.catalog.postgres import PG_DSN_ENV

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    sizes = _numbers(args.rows, "--rows", int)
    with contextlib.ExitStack() as stack:
        dsn = os.environ.get(PG_DSN_ENV)
        if "postgres" in kinds and not (dsn or os.environ.get("PGHOST")):
            dsn = stack.enter_context(LocalPostgres()).dsn()
        result = run_scale_bench(
            sizes=sizes, increment=args.increment, kinds=kinds, repeats=args.repeats,
            workdir=Path(args.workdir), dsn=dsn,
        )  # fmt: skip
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(format_scale(result) + "\n")
    print(format_scale(result))
    print(f"wrote {out}")
    return 0


def bench_chaos(args: argparse.Namespace, cfg: AppConfig) -> int:
    """kill and disturb the job mid-run and check what the catalog holds

    Train a tiny model on a small marketplace, then run catalog-enrich processes and disturb them:
    a Python worker and the driver (before, during and after the MERGE) killed with SIGKILL, two
    runs at once, the MLflow server down, a model artifact missing or corrupt. Prints each
    scenario with what was expected and observed, rows lost, wrong rows and half-committed runs;
    exits 1 when a scenario fails.
    """
    from catalog_enrichment.bench.chaos import format_table, prepare, run_chaos, write_result

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()] if args.scenarios else None
    try:
        observations = run_chaos(prepare(Path(args.workdir)), scenarios=scenarios)
    except ValueError as exc:
        raise CatalogEnrichError(str(exc)) from None
    write_result(observations, Path(args.out))
    print(format_table(observations))
    print(f"wrote {args.out}")
    return 0 if all(o.passed for o in observations) else 1
