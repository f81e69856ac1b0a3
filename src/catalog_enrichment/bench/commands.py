"""The ``catalog-enrich bench`` commands: each reads its arguments (parsed by
:mod:`catalog_enrichment.bench.cli`), builds what a job process builds (``runtime``) and runs one
benchmark of this package."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from catalog_enrichment import runtime
from catalog_enrichment.config import AppConfig, load_config, merge_layers
from catalog_enrichment.errors import CatalogEnrichError

__all__ = [
    "bench_audit",
    "bench_chaos",
    "bench_drift",
    "bench_generate",
    "bench_pretrain_text",
    "bench_quality",
    "bench_scale",
    "bench_throughput",
    "bench_write",
]


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
    from catalog_enrichment.bench.quality import (
        format_quality_markdown,
        method_runs,
        run_quality_benchmark,
        write_result,
    )
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.models.fusion import list_fusions, trained_fusions

    methods = args.methods or trained_fusions()
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
    device = runtime.device(cfg.inference)
    if cfg.synthetic.label_noise > 0 or args.ensemble:
        flags = {
            "--config": args.config,
            "--data": args.data,
            "--test-data": args.test_data,
            "--methods": args.methods,
            "--modes": args.modes,
        }
        given = [flag for flag, value in flags.items() if value]
        if given:
            study = "--ensemble" if args.ensemble else "--label-noise"
            raise CatalogEnrichError(
                f"{study} runs its own study on a generated marketplace: {', '.join(given)} do not apply"
            )
        return _paper_study(args, cfg, device)
    if bool(args.data) != bool(args.test_data):
        raise CatalogEnrichError("--data and --test-data go together: a table to train on, one to test on")
    data = None
    if args.data:
        data = (Path(args.data), Path(args.test_data))
        missing = [str(p) for p in data if not p.exists()]
        if missing:
            raise CatalogEnrichError(f"no such table: {', '.join(missing)}")
    out = Path(args.out)

    def save(contenders: dict[str, Any]) -> None:
        write_result(contenders, out, format_quality_markdown(contenders))
        print(f"wrote the contenders' results to {out} (the baseline's follow)", flush=True)

    result = run_quality_benchmark(
        cfg,
        load_taxonomy(cfg.taxonomy_path),
        workdir=Path(args.workdir),
        contenders=_contenders(args, adapted) if args.config else method_runs(cfg, methods, args.kl_lambda),
        data=data,
        device=device,
        save=save,
    )
    return _write_result(result, out, format_quality_markdown(result))


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
    placeholder, photos gone missing, the unseen product type, German titles, titles stripped to
    ids; --share of each drifted batch from the broken feed), with the configuration's health
    modes. Reports false alarms, detections, values of blocked attributes written, placeholders
    quarantined, values the drift made wrong that were written, and what the next run fills once
    the feed is fixed. With --data and --test-data (and --taxonomy): a real catalog's training and
    test tables instead, without the --new-type products in training.
    """
    from catalog_enrichment.bench.drift import KINDS, NEW_TYPE, DriftPlan, format_drift, run_drift_bench
    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.config import TINY_MODEL
    from catalog_enrichment.contracts import load_taxonomy

    if bool(args.data) != bool(args.test_data):
        raise CatalogEnrichError("--data and --test-data go together")
    data = (read_table(args.data), read_table(args.test_data)) if args.data else None
    # a real catalog's words are not the generator's: no German titles there unless asked for
    default_kinds = [k for k in KINDS if data is None or k != "other_language"]
    kinds = args.kinds or default_kinds
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise CatalogEnrichError(f"--kinds: unknown {unknown}; choose from {', '.join(KINDS)}")
    taxonomy = load_taxonomy(cfg.taxonomy_path)
    new_type = args.new_type or NEW_TYPE
    if data is None:  # the generator draws the taxonomy's product types
        types = set(taxonomy["product_type"].values)
    else:
        types = {
            t for table in data if "product_type" in table.column_names
            for t in table["product_type"].unique().to_pylist()
        }  # fmt: skip
    if new_type not in types:
        where = f"{args.data} or {args.test_data}" if data else "the taxonomy"
        raise CatalogEnrichError(f"--new-type {new_type!r} is not a product_type of {where}")

    if not args.configured_model:
        layers = {"model": TINY_MODEL, "training": {"epochs": 6, "batch_size": 32, "crossfit_folds": 0}}
        cfg = cfg.model_validate(merge_layers(cfg.model_dump(), layers))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    plan = DriftPlan(
        args.batches, args.batch_size, args.share, kinds, args.train_products, new_type, args.seed,
    )  # fmt: skip
    result = run_drift_bench(runtime.spark_session(cfg), cfg, taxonomy, workdir, plan, data=data)
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
    catalog_cfg = cfg.catalog.model_copy(
        update={"root": str(work / "lakehouse"), "products": str(work / "incoming" / "products")}
    )
    result = run_audit_benchmark(
        LakehouseCatalog(catalog_cfg),
        read_table(work / "incoming" / "truth"),
        load_taxonomy(cfg.taxonomy_path),
        size=args.size,
        seeds=args.seeds,
        balances=args.balances,
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
    from catalog_enrichment.bench.papers import format_study_markdown, run_pretrain_study
    from catalog_enrichment.contracts import load_taxonomy

    cfg = cfg.model_copy(
        update={
            "synthetic": cfg.synthetic.model_copy(update={"products": args.products, "seed": args.seed}),
            "training": cfg.training.model_copy(update={"epochs": args.epochs or cfg.training.epochs}),
        }
    )
    device = runtime.device(cfg.inference)
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
    layers, modes = args.layers, args.modes or []
    runs: list[tuple[str, AppConfig]] = []
    named: dict[str, str] = {}  # a contender's label -> its --config
    for path in args.config:
        name, file = ("default", None) if path == "default" else (Path(path).stem, path)
        if name in named:
            raise CatalogEnrichError(
                f"--config {named[name]} and {path} would both be reported as {name!r}: rename one"
            )
        named[name] = path
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
    from catalog_enrichment.bench.throughput import ThroughputPlan, run_throughput_benchmark
    from catalog_enrichment.contracts import load_taxonomy
    from catalog_enrichment.versions import ModelVersion

    device = runtime.device(cfg.inference)
    known = ("raw", "predictor", "raw_tasks", "encoders", "job")
    default = [m for m in known if m != "encoders" and (device == "cpu" or m != "raw_tasks")]
    modes = args.modes or [m for m in default if not (args.bundle and m == "job")]  # a bundle: no job
    unknown = sorted(set(modes) - set(known))
    if unknown or not modes:
        raise CatalogEnrichError(f"--modes: unknown {unknown}; choose from {', '.join(known)}")
    if args.bundle:
        from catalog_enrichment.inference.bundle import BundleFolder

        bundle = Path(args.bundle)
        if not BundleFolder(bundle).exists():
            raise CatalogEnrichError(f"{bundle} is not a model bundle (no weights)")
        if "job" in modes or args.peer:
            raise CatalogEnrichError("job and --peer run a registered model: give --model-uri, not --bundle")
        model = ModelVersion("", bundle.name, bundle_dir=bundle.resolve())
    else:
        model = runtime.model_version(cfg, args.model_uri, runtime.mlflow_client(cfg.mlflow))
    rescore = None
    if args.rescore_uri:
        if "job" not in modes or args.bundle:
            raise CatalogEnrichError("--rescore-uri re-scores after a job run: give --model-uri and mode job")
        rescore = runtime.model_version(cfg, args.rescore_uri, runtime.mlflow_client(cfg.mlflow))
    config_args = [*(["--config", str(Path(args.config).resolve())] if args.config else [])]
    config_args += [arg for override in args.overrides for arg in ("--set", override)]
    plan = ThroughputPlan(
        model,
        args.sizes,
        modes=[*modes, *(["rescore"] if rescore else []), *(["peer"] if args.peer else [])],
        rescore=rescore,
        repeats=args.repeats,
        device=device,
        threads=args.threads,
        block=args.block,
        config_args=config_args,
    )
    result = run_throughput_benchmark(cfg, load_taxonomy(cfg.taxonomy_path), plan, workdir=Path(args.workdir))
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    for key, value in result.items():
        if isinstance(value, float):
            print(f"{key}: {value:.3f}")
    print(f"wrote {args.out}")
    return 0


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

    kinds = args.kinds
    if not kinds or set(kinds) - {"postgres", "lakehouse"}:
        raise CatalogEnrichError(f"--kinds takes postgres and/or lakehouse, got {','.join(kinds)!r}")
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


def bench_train_scale(args: argparse.Namespace, cfg: AppConfig) -> int:
    """what training costs as the labelled table grows, in one process and in several

    Generate labelled marketplaces of each --sizes (tiny model, 32 px images), train each with
    training.streaming as a catalog-enrich train process per --processes count (TorchDistributor
    above 1, on this machine); report wall time, driver and rank peak RSS and test R@P95. --orders K
    trains the first size K-1 more times in other shuffle orders: the noise margin for comparing
    process counts.
    """
    from catalog_enrichment.bench.train_scale import format_train_scale, run_train_scale

    result = run_train_scale(
        Path(args.workdir),
        sizes=args.sizes,
        processes=args.processes,
        epochs=args.epochs,
        batch_size=args.batch_size,
        orders=args.orders,
    )
    return _write_result(result, Path(args.out), format_train_scale(result))


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

    with contextlib.ExitStack() as stack:
        dsn = os.environ.get(PG_DSN_ENV)
        if "postgres" in args.kinds and not (dsn or os.environ.get("PGHOST")):
            dsn = stack.enter_context(LocalPostgres()).dsn()
        result = run_scale_bench(
            sizes=args.rows, increment=args.increment, kinds=args.kinds, repeats=args.repeats,
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

    scenarios = args.scenarios
    try:
        observations = run_chaos(prepare(Path(args.workdir)), scenarios=scenarios)
    except ValueError as exc:
        raise CatalogEnrichError(str(exc)) from None
    write_result(observations, Path(args.out))
    print(format_table(observations))
    print(f"wrote {args.out}")
    return 0 if all(o.passed for o in observations) else 1
