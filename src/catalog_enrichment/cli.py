"""``catalog-enrich <command>`` — the command-line entry point.

Every command takes ``--config FILE`` and repeatable ``--set section.key=value`` overrides;
precedence is flag > ``--set`` > ``CATALOG_ENRICH_*`` env var > YAML > defaults (see config.py).
User mistakes (missing file, bad config, unknown attribute) print one line and exit with 2; an
enrichment run stopped by the circuit breaker exits with 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from catalog_enrichment import __version__
from catalog_enrichment.config import AppConfig, load_config, merge_layers, parse_overrides
from catalog_enrichment.errors import CatalogEnrichError

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace, AppConfig], int]
# Exit codes: 0 ok, 1 failed, 2 user mistake (bad config, missing file, ...), 3 the circuit breaker
# stopped an enrichment run before any write (schedulers alert on it differently).
EXIT_ABORTED = 3


def _common(parser: argparse.ArgumentParser, *, contenders: bool = False) -> None:
    if contenders:
        parser.add_argument(
            "--config",
            metavar="FILE",
            action="append",
            help="config of one contender (repeatable; 'default' = the embedded defaults): each trains "
            "the model it describes on the same marketplace, instead of every fusion method",
        )
    else:
        parser.add_argument(
            "--config", metavar="FILE", help="YAML config file (default: $CATALOG_ENRICH_CONFIG)"
        )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set inference.batch_size=64 (repeatable)",
    )
    parser.add_argument("--taxonomy", metavar="FILE", help="taxonomy YAML (default: the packaged one)")


def _generator_flags(parser: argparse.ArgumentParser, *, products_default: str) -> None:
    parser.add_argument("--products", type=int, metavar="N", help=f"number of products ({products_default})")
    parser.add_argument("--seed", type=int, metavar="S", help="random seed (default 0)")
    parser.add_argument("--bad-rate", type=float, metavar="R", help="share of injected bad rows (default 0)")
    parser.add_argument("--label-noise", type=float, metavar="R", help="share of flipped labels (default 0)")
    parser.add_argument("--image-size", type=int, metavar="PX", help="image side in pixels (default 96)")
    parser.add_argument("--format", choices=["delta", "parquet"], help="table format (default delta)")
    parser.add_argument(
        "--image-files",
        action="store_true",
        default=None,
        help="write images as files referenced by image_uri instead of inline bytes",
    )


def _enrich_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--products", metavar="PATH", help="products table (default: catalog.products)")
    parser.add_argument(
        "--catalog", metavar="DIR", help="lakehouse root holding the output tables (catalog.root)"
    )
    parser.add_argument(
        "--model-uri",
        metavar="URI",
        help="model to use (default: models:/<mlflow.registered_model>@champion)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="catalog-enrich",
        description="Fill missing product attributes from text and images, writing only values "
        "calibrated to the target precision.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser(
        "generate",
        help="write a synthetic labelled marketplace (products + truth)",
        description="Write a synthetic marketplace with real images and a known answer.",
    )
    gen.add_argument("--out", metavar="DIR", help="output folder (default: catalog.root, the lakehouse)")
    _generator_flags(gen, products_default="default 5000")
    gen.add_argument("--quiet", action="store_true", help="do not print the summary")
    _long_tail_flag(gen)
    _common(gen)
    gen.set_defaults(handler=_cmd_generate)

    summ = sub.add_parser(
        "summarize",
        help="print the summary of a generated marketplace",
        description="Print row counts, value frequencies, modality shares and bad rows.",
    )
    summ.add_argument("path", metavar="DIR", help="folder written by 'generate'")
    summ.add_argument("--json", action="store_true", help="print JSON instead of text")
    _common(summ)
    summ.set_defaults(handler=_cmd_summarize)

    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline on embedded defaults in a work folder",
        description="Generate a marketplace in WORKDIR and run the pipeline on it.",
    )
    demo.add_argument("--workdir", metavar="DIR", default="demo", help="work folder (default ./demo)")
    demo.add_argument("--products", type=int, metavar="N", default=3000, help="products (default 3000)")
    demo.add_argument("--seed", type=int, metavar="S", default=0, help="random seed (default 0)")
    _common(demo)
    demo.set_defaults(handler=_cmd_demo)

    lab = sub.add_parser(
        "labels",
        help="build the labelled products table from the catalog (merchant values as labels)",
        description="Join the products table with the attribute table's merchant values, drop values "
        "outside the taxonomy (counted), leave out the frozen evaluation set's products, and overwrite "
        "the labelled table in one Delta commit that records the source tables' versions.",
    )
    lab.add_argument("--out", metavar="PATH", help="labelled table to write (catalog.labelled)")
    lab.add_argument("--products", metavar="PATH", help="products table (default: catalog.products)")
    lab.add_argument("--catalog", metavar="DIR", help="lakehouse root (catalog.root)")
    lab.add_argument("--eval-data", metavar="PATH", help="frozen evaluation table (promotion.eval_data)")
    _common(lab)
    lab.set_defaults(handler=_cmd_labels)

    train = sub.add_parser(
        "train",
        help="train, calibrate, evaluate and register a challenger version",
        description="Train on a labelled products table (Delta or Parquet), calibrate "
        "thresholds, evaluate, log to MLflow and register a version with alias 'challenger'.",
    )
    train.add_argument(
        "--data",
        metavar="PATH",
        help="labelled products table (default: catalog.labelled, what `labels` writes)",
    )
    train.add_argument(
        "--registered-model", metavar="NAME", help="registered model name (mlflow.registered_model)"
    )
    train.add_argument("--fusion", metavar="NAME", help="fusion method (model.fusion)")
    train.add_argument("--epochs", type=int, metavar="E", help="training epochs (training.epochs)")
    _common(train)
    train.set_defaults(handler=_cmd_train)

    prom = sub.add_parser(
        "promote",
        help="gate: move 'champion' to the challenger if it is better",
        description="Score challenger and champion on a frozen evaluation set and move the "
        "'champion' alias only if the challenger keeps the precision target everywhere and "
        "does not lose coverage.",
    )
    prom.add_argument(
        "--registered-model", metavar="NAME", help="registered model name (mlflow.registered_model)"
    )
    prom.add_argument("--eval-data", metavar="PATH", help="frozen evaluation table (promotion.eval_data)")
    prom.add_argument(
        "--eval-version", type=int, metavar="V", help="pinned Delta version (promotion.eval_version)"
    )
    prom.add_argument("--dry-run", action="store_true", help="print the comparison, change nothing")
    _common(prom)
    prom.set_defaults(handler=_cmd_promote)

    enrich = sub.add_parser(
        "enrich",
        help="score products with the champion model and write values that clear their thresholds",
        description="The nightly job: read products (incremental by default), validate and quarantine, "
        "score inside Spark, write calibrated values into the attributes table in one MERGE, report.",
    )
    _enrich_flags(enrich)
    enrich.add_argument(
        "--run-id", metavar="ID", help="run id (default: a new one); re-running an id changes nothing"
    )
    enrich.add_argument(
        "--partition", metavar="COL=VALUE", help="only this partition, e.g. ingest_date=2026-11-01"
    )
    enrich.add_argument(
        "--full",
        action="store_true",
        help="score every selected product, not only those changed since the last run",
    )
    _common(enrich)
    enrich.set_defaults(handler=_cmd_enrich)

    back = sub.add_parser(
        "backfill",
        help="re-score a range of ingest_date partitions, one committed run per partition",
        description="One full enrichment run per partition in [--from, --to]; partitions already done by "
        "the same model version are skipped unless --force, so an interrupted backfill resumes.",
    )
    _enrich_flags(back)
    back.add_argument(
        "--from", dest="date_from", required=True, metavar="DATE", help="first partition (YYYY-MM-DD)"
    )
    back.add_argument(
        "--to", dest="date_to", required=True, metavar="DATE", help="last partition (YYYY-MM-DD)"
    )
    back.add_argument(
        "--force", action="store_true", help="redo partitions already done by this model version"
    )
    _common(back)
    back.set_defaults(handler=_cmd_backfill)

    roll = sub.add_parser(
        "rollback",
        help="undo what one run or one model version wrote (restores the values it replaced)",
        description="Remove the values a run (or every run of a model version) wrote and restore the "
        "values they replaced, from the Delta history. Pairs changed by later runs are left alone.",
    )
    which = roll.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", metavar="ID", help="the run to undo")
    which.add_argument("--model-version", metavar="V", help="undo every run of this model version")
    roll.add_argument("--catalog", metavar="DIR", help="lakehouse root (catalog.root)")
    _common(roll)
    roll.set_defaults(handler=_cmd_rollback)

    rep = sub.add_parser(
        "report",
        help="print a run report (the latest run by default)",
        description="Print what a run read, quarantined, scored and wrote, its timings and throughput.",
    )
    rep.add_argument("--run-id", metavar="ID", help="the run (default: the latest)")
    rep.add_argument("--catalog", metavar="DIR", help="lakehouse root (catalog.root)")
    rep.add_argument("--json", action="store_true", help="print JSON")
    rep.add_argument(
        "--check",
        action="store_true",
        help="exit 0 only if the run succeeded (3: aborted by the circuit breaker, 1: otherwise)",
    )
    _common(rep)
    rep.set_defaults(handler=_cmd_report)

    cfg = sub.add_parser(
        "config",
        help="print the effective configuration",
        description="Print the merged configuration (defaults < YAML < env < flags).",
    )
    _common(cfg)
    cfg.set_defaults(handler=_cmd_config)

    bench = sub.add_parser(
        "bench",
        help="benchmarks (not tests): generator speed, later quality and throughput",
        description="Measure and write JSON; speed targets live here, not in tests.",
    )
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    bgen = bench_sub.add_parser(
        "generate",
        help="synthetic-marketplace generation speed on one core",
        description="Time the generator (in-process, single-threaded).",
    )
    bgen.add_argument("--products", type=int, metavar="N", default=5000, help="products (default 5000)")
    bgen.add_argument("--image-size", type=int, metavar="PX", default=96, help="image size (default 96)")
    bgen.add_argument("--out", metavar="FILE", help="write the JSON result here too")
    _common(bgen)
    bgen.set_defaults(handler=_cmd_bench_generate)
    bq = bench_sub.add_parser(
        "quality",
        help="train every fusion method; R@P95, precision, coverage",
        description="Generate a marketplace, train each fusion method with the same "
        "budget, calibrate, evaluate on the test split; write JSON + markdown.",
    )
    bq.add_argument("--products", type=int, metavar="N", default=5000, help="products (default 5000)")
    bq.add_argument("--seed", type=int, metavar="S", default=0, help="random seed (default 0)")
    _long_tail_flag(bq)
    bq.add_argument(
        "--out", metavar="FILE", default="bench-quality.json", help="JSON output (markdown beside it)"
    )
    bq.add_argument("--methods", metavar="LIST", help="comma-separated fusion names (default: all)")
    bq.add_argument("--epochs", type=int, metavar="E", help="epochs per method (default: training.epochs)")
    bq.add_argument(
        "--kl-lambda", type=float, default=1.0, metavar="L", help="lambda > 0 for modality attention"
    )
    bq.add_argument(
        "--workdir", metavar="DIR", default="bench-quality", help="where the marketplace is written"
    )
    bq.add_argument(
        "--modes",
        metavar="LIST",
        help="with --config: training.encoders modes to run each contender with pretrained encoders in "
        "(e.g. frozen,finetune; default: its config's); a contender without them runs once",
    )
    _common(bq, contenders=True)
    bq.set_defaults(handler=_cmd_bench_quality)
    bt = bench_sub.add_parser(
        "throughput",
        help="the job's speed against the raw speed of its model (raw, predictor, job)",
        description="Measure, on the same model, device and threads: the raw forward loop over "
        "pre-decoded tensors, the per-batch predictor (no Spark) and the whole enrichment job; "
        "write JSON with products/s, predictor_ratio, job_ratio, stage timings and peak RSS.",
    )
    bt.add_argument("--products", type=int, metavar="N", default=16000, help="products (default 16000)")
    which = bt.add_mutually_exclusive_group()
    which.add_argument("--model-uri", metavar="URI", help="registered model (default: the champion)")
    which.add_argument("--bundle", metavar="DIR", help="a model bundle folder instead of the registry")
    bt.add_argument(
        "--modes",
        metavar="LIST",
        help="subset of raw,predictor,raw_tasks,job (default: all four on a CPU, raw_tasks aside on a GPU)",
    )
    bt.add_argument("--repeats", type=int, metavar="R", default=3, help="runs per mode; medians reported (3)")
    bt.add_argument("--sweep", action="store_true", help="also run the job at 4k, 16k and 64k products")
    bt.add_argument(
        "--block",
        type=int,
        metavar="N",
        default=2048,
        help="raw and predictor alternate in blocks of N products (default 2048)",
    )
    bt.add_argument(
        "--threads", type=int, metavar="T", help="torch threads for raw/predictor (default: cores)"
    )
    bt.add_argument("--out", metavar="FILE", default="bench-throughput.json", help="JSON output")
    bt.add_argument("--workdir", metavar="DIR", default="bench-throughput", help="generated tables go here")
    _common(bt)
    bt.set_defaults(handler=_cmd_bench_throughput)
    return parser


def _long_tail_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--long-tail",
        action="store_true",
        default=None,
        help="the long-tailed synthetic marketplace: 40 product types, 30 colors, Zipf frequencies "
        "(schemas/taxonomy-longtail.yaml)",
    )


def _overrides_from_flags(args: argparse.Namespace) -> dict[str, Any]:
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


def _cmd_generate(args: argparse.Namespace, cfg: AppConfig) -> int:
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


def _cmd_summarize(args: argparse.Namespace, cfg: AppConfig) -> int:
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.data.summary import format_summary, summarize_marketplace

    root = Path(args.path)
    if not (root / "products").exists() or not (root / "truth").exists():
        raise CatalogEnrichError(f"{root} does not hold a generated marketplace (products/ and truth/)")
    summary = summarize_marketplace(root, taxonomy=load_taxonomy(cfg.taxonomy_path))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _cmd_demo(args: argparse.Namespace, cfg: AppConfig) -> int:
    """generate -> train -> promote -> enrich -> report on embedded defaults inside ``--workdir``."""
    from catalog_enrichment import registry
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.data.summary import format_summary, summarize_marketplace
    from catalog_enrichment.data.synthetic import generate_marketplace
    from catalog_enrichment.promotion import format_comparison, promote
    from catalog_enrichment.training.job import run_training_job

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = cfg.model_copy(
        update={
            "mlflow": cfg.mlflow.model_copy(
                update={
                    "tracking_uri": f"sqlite:///{workdir}/mlflow.db",
                    "artifact_location": str(workdir / "mlartifacts"),
                }
            ),
            "catalog": cfg.catalog.model_copy(
                update={
                    "root": str(workdir / "lakehouse"),
                    "products": str(workdir / "incoming" / "products"),
                }
            ),
        }
    )
    taxonomy = load_taxonomy(cfg.taxonomy_path)
    steps = 5
    n = args.products
    started = time.perf_counter()

    print(
        f"[demo 1/{steps}] generate: labelled history ({n:,}), frozen evaluation set ({n // 3:,}) and "
        f"incoming products ({n:,}, 2% bad rows) under {workdir}",
        flush=True,
    )
    base = cfg.synthetic.model_copy(update={"products": n, "seed": args.seed})
    generate_marketplace(workdir / "labelled", base, taxonomy=taxonomy)
    generate_marketplace(
        workdir / "eval",
        base.model_copy(update={"products": max(n // 3, 300), "seed": args.seed + 1}),
        taxonomy=taxonomy,
    )
    generate_marketplace(
        workdir / "incoming",
        base.model_copy(update={"seed": args.seed + 2, "bad_rate": 0.02}),
        taxonomy=taxonomy,
    )
    print(format_summary(summarize_marketplace(workdir / "incoming", taxonomy=taxonomy)), "\n", flush=True)

    print(f"[demo 2/{steps}] train: {cfg.model.fusion} on {workdir / 'labelled' / 'products'}", flush=True)
    client = registry.configure_mlflow(cfg.mlflow.tracking_uri)
    outcome = run_training_job(
        cfg,
        taxonomy,
        data=workdir / "labelled" / "products",
        client=client,
        device=_device(cfg),
        progress=lambda m: print("  " + m, flush=True),
    )
    print(
        f"\n[demo 3/{steps}] promote: challenger v{outcome.registered.version} vs champion on the frozen "
        "evaluation set",
        flush=True,
    )
    summary = promote(
        client,
        registered_model=cfg.mlflow.registered_model,
        eval_data=workdir / "eval" / "products",
        eval_version=None,
        target=cfg.calibration.target_precision,
        max_coverage_loss=cfg.promotion.max_coverage_loss,
        confidence=cfg.calibration.confidence,
        min_written=cfg.promotion.min_written,
        log_path=Path(cfg.catalog.root) / "promotion_log",
        progress=lambda m: print("  " + m, flush=True),
    )
    print(format_comparison(summary))
    if registry.resolve_alias(client, cfg.mlflow.registered_model, registry.CHAMPION) is None:
        print(
            f"\ndemo stopped after the gate: challenger v{outcome.registered.version} was rejected (reasons "
            "above) and there is no champion to enrich with. Try more products (--products) or epochs "
            "(--set training.epochs=N).",
            file=sys.stderr,
        )
        return 1

    import datetime as dt

    from catalog_enrichment.catalog.attributes import ensure_attributes_table, merchant_rows
    from catalog_enrichment.catalog.lakehouse import read_table, write_table
    from catalog_enrichment.catalog.reports import format_report
    from catalog_enrichment.data.truth import format_precision, sample_against_truth, written_precision
    from catalog_enrichment.enrich import run_enrichment

    attributes = Path(cfg.catalog.table("attributes"))
    if not (attributes / "_delta_log").is_dir():
        # The marketplace's catalog before the job: the values merchants provided.
        incoming = read_table(
            workdir / "incoming" / "products", columns=["product_id", "merchant_attributes"]
        )
        write_table(attributes, merchant_rows(incoming, dt.datetime.now(dt.UTC)), mode="error")
    ensure_attributes_table(attributes)
    print(
        f"\n[demo 4/{steps}] enrich: score {workdir / 'incoming' / 'products'} with the champion in Spark",
        flush=True,
    )
    model = _model_ref(cfg, None, client)
    enriched = run_enrichment(
        _spark(cfg),
        cfg,
        taxonomy,
        model=model,
        full=True,
        client=client,
        progress=lambda m: print("  " + m, flush=True),
    )
    print(f"\n[demo 5/{steps}] report\n")
    print(format_report(enriched.report))
    table = read_table(attributes)
    truth = read_table(workdir / "incoming" / "truth")
    print("\nWritten values against the ground truth (model rows only):")
    print(format_precision(written_precision(table, truth, taxonomy)))
    print("\nA sample of written values:")
    print(sample_against_truth(table, truth, taxonomy))
    print(
        f"\ndemo finished in {time.perf_counter() - started:.0f}s. Next: catalog-enrich report --catalog "
        f"{cfg.catalog.root}; mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri}"
    )
    return 0


def _device(cfg: AppConfig) -> str:
    import torch

    if cfg.inference.device == "cuda" and not torch.cuda.is_available():
        raise CatalogEnrichError("inference.device is 'cuda' but torch sees no CUDA device")
    if cfg.inference.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.inference.device


def _client(cfg: AppConfig) -> object:
    from catalog_enrichment import registry

    return registry.configure_mlflow(cfg.mlflow.tracking_uri, cfg.mlflow.registry_uri)


def _cmd_labels(args: argparse.Namespace, cfg: AppConfig) -> int:
    from catalog_enrichment.catalog.labels import write_labels
    from catalog_enrichment.contracts import load_taxonomy

    out = Path(args.out or cfg.catalog.table("labelled"))
    report = write_labels(
        products=Path(cfg.catalog.table("products")),
        attributes=Path(cfg.catalog.table("attributes")),
        evaluation=Path(_eval_data(cfg)),
        out=out,
        taxonomy=load_taxonomy(cfg.taxonomy_path),
    )
    print(report.summary())
    print(f"written to {out}; next: catalog-enrich train --data {out}")
    return 0


def _eval_data(cfg: AppConfig) -> Path:
    return Path(cfg.promotion.eval_data or Path(cfg.catalog.root) / "eval")


def _cmd_train(args: argparse.Namespace, cfg: AppConfig) -> int:
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.training.job import run_training_job

    data = Path(args.data or cfg.catalog.table("labelled"))
    if not data.exists():
        raise CatalogEnrichError(f"training data not found: {data} (build it with `catalog-enrich labels`)")
    outcome = run_training_job(
        cfg, load_taxonomy(cfg.taxonomy_path), data=data, client=_client(cfg), device=_device(cfg)
    )
    reg = outcome.registered
    print(
        f"version {reg.version} of {reg.name} is now 'challenger' ({reg.model_uri}); "
        "next: catalog-enrich promote"
    )
    return 0


def _cmd_promote(args: argparse.Namespace, cfg: AppConfig) -> int:
    from catalog_enrichment.promotion import format_comparison, promote

    eval_data = _eval_data(cfg)
    if not eval_data.exists():
        raise CatalogEnrichError(
            f"evaluation data not found: {eval_data} (set promotion.eval_data or --eval-data)"
        )
    summary = promote(
        _client(cfg),
        registered_model=cfg.mlflow.registered_model,
        eval_data=eval_data,
        eval_version=cfg.promotion.eval_version,
        target=cfg.calibration.target_precision,
        max_coverage_loss=cfg.promotion.max_coverage_loss,
        confidence=cfg.calibration.confidence,
        min_written=cfg.promotion.min_written,
        log_path=cfg.promotion.log or str(Path(cfg.catalog.root) / "promotion_log"),
        dry_run=args.dry_run,
    )
    print(format_comparison(summary))
    return 0


def _spark(cfg: AppConfig) -> Any:
    """The job's SparkSession. Under spark-submit the submitted master and conf win."""
    import os

    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(cfg.spark.app_name)
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ  # the driver was started by spark-submit
    if not submitted:
        if cfg.spark.master.startswith("local"):
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
            builder = builder.config(map=local_spark_defaults(cfg.spark.master))  # cfg.spark.conf wins
        builder = builder.master(cfg.spark.master)
    builder = (
        builder.config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.spark.arrow_max_records_per_batch))
        .config("spark.python.worker.reuse", "true")
        .config("spark.ui.showConsoleProgress", "false")  # the job prints its own progress
    )
    for key, value in cfg.spark.conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def local_spark_defaults(master: str) -> dict[str, Any]:
    """The settings a Spark session on one machine (a ``local`` master) starts with.

    * no UI;
    * 2 x cores shuffle partitions: the default 200, sized for clusters, cost more than the few small
      aggregations of a run on one machine;
    * FAIR scheduling: the run's short validation jobs (the duplicate pass and the counts, the GX
      suite) go to their own pools and take a core between two scoring tasks instead of queueing
      behind the whole scoring stage; the pools of ``fairscheduler.xml`` give the validation pool
      the first free slot, so the circuit breaker's verdict comes early in the scoring stage;
    * the status store updated on every task event (``spark.ui.liveUpdate.period=0``; by default a
      task start within 100 ms of the last update of its stage is not recorded until a later event):
      a cancelled run waits until the status tracker shows none of its tasks running, and a task
      that started just before the cancel must be among them;
    * the driver JVM - which is the executor in local mode - compiles with the C1 JIT only
      (``-XX:TieredStopAtLevel=1``). Spark generates and compiles new classes for every query, and
      the C2 compiler threads spent 5-8.5 core-seconds per 16k-product run on them: the biggest
      JVM cost of a run, on the cores the Python workers score on. With C1 only they spend 0.2-0.5
      and the executor's own tasks run no slower (2.2-2.3 core-seconds either way; docs/benchmarks.md).
    """
    return {
        "spark.ui.enabled": "false",
        "spark.sql.shuffle.partitions": str(2 * _local_cores(master)),
        "spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1",
        "spark.scheduler.mode": "FAIR",
        "spark.scheduler.allocation.file": str(Path(__file__).with_name("fairscheduler.xml")),
        "spark.ui.liveUpdate.period": "0",
    }


def _local_cores(master: str) -> int:
    """The cores of a ``local``, ``local[N]``, ``local[*]`` or ``local[N,F]`` master."""
    import os

    if "[" not in master:
        return 1
    inside = master.partition("[")[2].rstrip("]").split(",")[0].strip()
    return (os.cpu_count() or 1) if inside == "*" else max(1, int(inside))


def _model_ref(cfg: AppConfig, model_uri: str | None, client: Any) -> Any:
    from catalog_enrichment import registry
    from catalog_enrichment.enrich import ModelRef

    resolved = registry.resolve_model(client, model_uri or f"models:/{cfg.mlflow.registered_model}@champion")
    bundle = registry.download_bundle(resolved, Path(cfg.catalog.root) / "_models")
    return ModelRef(resolved.name, resolved.version, bundle)


def _cmd_enrich(args: argparse.Namespace, cfg: AppConfig) -> int:
    from catalog_enrichment.catalog.reports import format_report
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.enrich import run_enrichment

    taxonomy = load_taxonomy(cfg.taxonomy_path)
    client = _client(cfg)
    model = _model_ref(cfg, args.model_uri, client)
    spark = _spark(cfg)
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


def _cmd_backfill(args: argparse.Namespace, cfg: AppConfig) -> int:
    import datetime as dt

    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.enrich import backfill_partitions

    try:
        date_from, date_to = dt.date.fromisoformat(args.date_from), dt.date.fromisoformat(args.date_to)
    except ValueError as exc:
        raise CatalogEnrichError(f"--from/--to must be dates (YYYY-MM-DD): {exc}") from None
    client = _client(cfg)
    model = _model_ref(cfg, args.model_uri, client)
    results = backfill_partitions(
        _spark(cfg),
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


def _cmd_rollback(args: argparse.Namespace, cfg: AppConfig) -> int:
    from catalog_enrichment.enrich import rollback

    rollback(cfg, run_id=args.run_id, model_version=args.model_version)
    return 0


def _cmd_report(args: argparse.Namespace, cfg: AppConfig) -> int:
    from catalog_enrichment.catalog.reports import format_report, report_for

    report = report_for(cfg.catalog.table("run_reports"), args.run_id)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    if args.check and report["status"] != "succeeded":
        return EXIT_ABORTED if report["status"] == "aborted" else 1
    return 0


def _cmd_config(args: argparse.Namespace, cfg: AppConfig) -> int:
    import yaml

    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def _cmd_bench_generate(args: argparse.Namespace, cfg: AppConfig) -> int:
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


def _cmd_bench_quality(args: argparse.Namespace, cfg: AppConfig) -> int:
    import torch

    from catalog_enrichment.bench.quality import run_quality_benchmark, write_quality_result
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
    result = run_quality_benchmark(
        cfg,
        load_taxonomy(cfg.taxonomy_path),
        workdir=Path(args.workdir),
        methods=methods,
        kl_lambda=args.kl_lambda,
        contenders=_contenders(args, adapted) if args.config else None,
        device=device,
    )
    md = write_quality_result(result, Path(args.out))
    print(md.read_text())
    print(f"wrote {args.out} and {md}")
    return 0


def _contenders(
    args: argparse.Namespace, adapted: Callable[[AppConfig], AppConfig]
) -> list[tuple[str, AppConfig]]:
    """``bench quality --config A --config B [--modes m1,m2]``: (label, config) per run."""
    layers = merge_layers(parse_overrides(args.overrides), _overrides_from_flags(args))
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


def _cmd_bench_throughput(args: argparse.Namespace, cfg: AppConfig) -> int:
    from catalog_enrichment.bench.throughput import run_throughput_benchmark
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.enrich import ModelRef

    device = _device(cfg)
    known = ("raw", "predictor", "raw_tasks", "job")
    default = ",".join(m for m in known if device == "cpu" or m != "raw_tasks")
    modes = [m.strip() for m in (args.modes or default).split(",") if m.strip()]
    unknown = sorted(set(modes) - set(known))
    if unknown or not modes:
        raise CatalogEnrichError(f"--modes: unknown {unknown}; choose from {', '.join(known)}")
    if args.bundle:
        bundle = Path(args.bundle)
        if not (bundle / "weights.pt").is_file():
            raise CatalogEnrichError(f"{bundle} is not a model bundle (no weights.pt)")
        model = ModelRef("bundle", bundle.name, bundle.resolve())
    else:
        model = _model_ref(cfg, args.model_uri, _client(cfg))
    needs_spark = "job" in modes or args.sweep
    result = run_throughput_benchmark(
        cfg,
        load_taxonomy(cfg.taxonomy_path),
        model=model,
        products=args.products,
        workdir=Path(args.workdir),
        modes=modes,
        repeats=args.repeats,
        device=device,
        threads=args.threads,
        spark=_spark(cfg) if needs_spark else None,
        sweep=(4000, 16000, 64000) if args.sweep else (),
        block=args.block,
    )
    text = json.dumps(result, indent=2, default=str)
    Path(args.out).write_text(text + "\n")
    keys = [k for k in result if k.endswith(("_per_second", "_ratio", "_to_raw_tasks", "_share", "speedup"))]
    for key, label in (
        ("job_ratio_per_run", "job/raw per run (raw just before)"),
        ("job_ratio_to_raw_tasks_per_run", "job/raw_tasks per run (raw_tasks just before)"),
        ("predictor_ratio_per_run", "paired predictor/raw per run"),
    ):
        if key in result:
            print(f"{label}: " + ", ".join(f"{x:.3f}" for x in result[key]))
    print("\n".join(f"{k}: {result[k]:.3f}" for k in keys))
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        flags = _overrides_from_flags(args)
        layers = merge_layers(overrides, flags)
        cfg = load_config(None if isinstance(args.config, list) else args.config, overrides=layers)
        handler: Handler = args.handler
        return handler(args, cfg)
    except CatalogEnrichError as exc:
        from catalog_enrichment.validation.rules import CircuitBreakerTripped

        print(f"catalog-enrich: error: {exc}", file=sys.stderr)
        return EXIT_ABORTED if isinstance(exc, CircuitBreakerTripped) else 2
    except FileNotFoundError as exc:
        print(f"catalog-enrich: error: file not found: {exc.filename or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("catalog-enrich: interrupted", file=sys.stderr)
        return 130


def _exit_now(code: list[int]) -> None:
    """End the process with ``main()``'s exit code once Python's shutdown has run every other
    atexit handler (``code`` is empty when ``main()`` raised: Python's own exit then).

    What is skipped is the interpreter's final teardown, where Arrow's C++ thread pools are
    destroyed with threads still attached to the Delta tables just read: on a busy machine that
    aborts the process ("terminate called without an active exception", SIGABRT; apache/arrow#39862,
    delta-io/delta-rs#2184) after the command has done its work, and the scheduler sees a failure.
    Non-daemon threads have been joined and Spark's, MLflow's and the other atexit handlers have run
    by the time this runs; logging and the standard streams are flushed here.
    """
    if not code:
        return
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code[0])


def run(argv: Sequence[str] | None = None) -> None:
    """The ``catalog-enrich`` console script and the ``jobs/`` entry points: :func:`main`, then a
    clean exit with its code (never returns)."""
    import atexit

    code: list[int] = []  # main()'s exit code, once it returns one
    atexit.register(_exit_now, code)  # before main(): the handlers main() registers run first (LIFO)
    code.append(main(argv))
    sys.exit(code[0])


if __name__ == "__main__":
    run()
