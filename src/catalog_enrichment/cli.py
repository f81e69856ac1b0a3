"""``catalog-enrich <command>`` — the command-line entry point.

Every command takes ``--config FILE`` and repeatable ``--set section.key=value`` overrides;
precedence is flag > ``--set`` > ``CATALOG_ENRICH_*`` env var > YAML > defaults (see config.py).
User mistakes (missing file, bad config, unknown attribute) print one line and exit with 2.
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


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (default: $CATALOG_ENRICH_CONFIG)")
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

    train = sub.add_parser(
        "train",
        help="train, calibrate, evaluate and register a challenger version",
        description="Train on a labelled products table (Delta or Parquet), calibrate "
        "thresholds, evaluate, log to MLflow and register a version with alias 'challenger'.",
    )
    train.add_argument(
        "--data", metavar="PATH", help="labelled products table (default: catalog products table)"
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
    _common(bq)
    bq.set_defaults(handler=_cmd_bench_quality)
    return parser


def _overrides_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    synthetic = {
        "products": getattr(args, "products", None),
        "seed": getattr(args, "seed", None),
        "bad_rate": getattr(args, "bad_rate", None),
        "label_noise": getattr(args, "label_noise", None),
        "image_size": getattr(args, "image_size", None),
        "format": getattr(args, "format", None),
        "image_files": getattr(args, "image_files", None),
    }
    is_train = getattr(args, "command", "") == "train"
    return {
        "synthetic": synthetic,
        "taxonomy_path": getattr(args, "taxonomy", None),
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
    """generate -> train -> promote on embedded defaults inside ``--workdir`` (enrich arrives next)."""
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
    steps = 3
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
        log_path=Path(cfg.catalog.root) / "promotion_log",
        progress=lambda m: print("  " + m, flush=True),
    )
    print(format_comparison(summary))
    print(
        f"\ndemo finished in {time.perf_counter() - started:.0f}s. MLflow: mlflow ui --backend-store-uri "
        f"{cfg.mlflow.tracking_uri}; the Spark enrichment step (score incoming products, write attributes) "
        "is the next stage of the project."
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


def _cmd_train(args: argparse.Namespace, cfg: AppConfig) -> int:
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.training.job import run_training_job

    data = Path(args.data or cfg.catalog.table("products"))
    if not data.exists():
        raise CatalogEnrichError(f"training data not found: {data}")
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

    eval_data = Path(cfg.promotion.eval_data or Path(cfg.catalog.root) / "eval")
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
        log_path=cfg.promotion.log or str(Path(cfg.catalog.root) / "promotion_log"),
        dry_run=args.dry_run,
    )
    print(format_comparison(summary))
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
    cfg = cfg.model_copy(
        update={
            "synthetic": cfg.synthetic.model_copy(update={"products": args.products, "seed": args.seed}),
            "training": cfg.training.model_copy(update={"epochs": args.epochs or cfg.training.epochs}),
        }
    )
    device = "cuda" if cfg.inference.device != "cpu" and torch.cuda.is_available() else "cpu"
    result = run_quality_benchmark(
        cfg,
        load_taxonomy(cfg.taxonomy_path),
        workdir=Path(args.workdir),
        methods=methods,
        kl_lambda=args.kl_lambda,
        device=device,
    )
    md = write_quality_result(result, Path(args.out))
    print(md.read_text())
    print(f"wrote {args.out} and {md}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
        flags = _overrides_from_flags(args)
        cfg = load_config(args.config, overrides=merge_layers(overrides, flags))
        handler: Handler = args.handler
        return handler(args, cfg)
    except CatalogEnrichError as exc:
        print(f"catalog-enrich: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"catalog-enrich: error: file not found: {exc.filename or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("catalog-enrich: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
