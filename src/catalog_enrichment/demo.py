"""``catalog-enrich demo``: the whole loop on embedded defaults, in one work folder.

generate a labelled history, a frozen evaluation set and incoming products -> train -> promote ->
enrich -> report, with the written values checked against the generator's ground truth -> review:
a stratified sample of the written values judged from the ground truth, imported and audited ->
re-score: the same products again, fused from the embedding store the first run filled.
"""

from __future__ import annotations

import datetime as dt
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.compute as pc

from catalog_enrichment import runtime
from catalog_enrichment.config import AppConfig, CatalogConfig, SyntheticConfig

if TYPE_CHECKING:
    from catalog_enrichment.catalog.base import Catalog
    from catalog_enrichment.contracts import Taxonomy
    from catalog_enrichment.enrich import EnrichOutcome
    from catalog_enrichment.versions import ModelVersion

__all__ = ["demo_config", "run_demo"]


def run_demo(
    cfg: AppConfig, workdir: Path, *, products: int = 3000, seed: int = 0, catalog_kind: str | None = None
) -> int:
    """generate -> train -> promote -> enrich -> report inside ``workdir``; the process exit code.

    ``catalog_kind`` postgres: the incoming products are loaded into PostgreSQL and the job reads
    them and writes the attributes there - on the server of ``CATALOG_ENRICH_PG_DSN`` / ``PGHOST``
    when one is set, else on a throw-away local server started for the demo (initdb + pg_ctl) and
    stopped at its end."""
    kind = catalog_kind or cfg.catalog.kind
    if kind == "postgres":
        import os

        from catalog_enrichment.catalog.pgserver import LocalPostgres
        from catalog_enrichment.catalog.postgres import PG_DSN_ENV

        cfg = cfg.model_copy(update={"catalog": cfg.catalog.model_copy(update={"kind": "postgres"})})
        if os.environ.get(PG_DSN_ENV) or os.environ.get("PGHOST"):
            return _run_demo(cfg, workdir, products, seed)
        with LocalPostgres() as server:
            print(f"[demo] a throw-away PostgreSQL server on 127.0.0.1:{server.port} (stopped at the end)")
            os.environ[PG_DSN_ENV] = server.dsn()
            try:
                return _run_demo(cfg, workdir, products, seed)
            finally:
                del os.environ[PG_DSN_ENV]
    return _run_demo(cfg, workdir, products, seed)


def demo_config(cfg: AppConfig, workdir: Path) -> AppConfig:
    """``cfg`` with MLflow and the catalog inside ``workdir`` (PostgreSQL: the catalog's tables in
    the database, the incoming products loaded into its products table)."""
    catalog: dict[str, str | None] = {"root": str(workdir / "lakehouse")}
    if cfg.catalog.kind == "lakehouse":
        catalog["products"] = str(workdir / "incoming" / "products")
    return cfg.model_copy(
        update={
            "mlflow": cfg.mlflow.model_copy(
                update={
                    "tracking_uri": f"sqlite:///{workdir}/mlflow.db",
                    "artifact_location": str(workdir / "mlartifacts"),
                }
            ),
            "catalog": cfg.catalog.model_copy(update=catalog),
        }
    )


STEPS = 7


def _say(message: str) -> None:
    print(message, flush=True)


def _step(n: int, text: str) -> None:
    _say(f"\n[demo {n}/{STEPS}] {text}")


def _run_demo(cfg: AppConfig, workdir: Path, products: int, seed: int) -> int:
    from catalog_enrichment import registry
    from catalog_enrichment.catalog import open_catalog
    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.contracts import load_taxonomy

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(cfg, workdir)
    taxonomy = load_taxonomy(cfg.taxonomy_path)
    started = time.perf_counter()
    _generate(cfg.synthetic, workdir, products, seed, taxonomy)
    client = runtime.mlflow_client(cfg.mlflow)
    version = _train_and_promote(cfg, workdir, taxonomy, client)
    if registry.resolve_alias(client, cfg.mlflow.registered_model, registry.CHAMPION) is None:
        print(
            f"\ndemo stopped after the gate: challenger v{version} was rejected (reasons above) and there "
            "is no champion to enrich with. Try more products (--products) or epochs "
            "(--set training.epochs=N).",
            file=sys.stderr,
        )
        return 1
    catalog = open_catalog(cfg.catalog)
    _seed_catalog(cfg.catalog, catalog, workdir / "incoming" / "products", taxonomy.outputs.names)
    model = runtime.model_version(cfg, None, client)
    if str(model.version) != version:
        _say(
            f"\n  the gate kept champion v{model.version}, an earlier demo's in {workdir}: what follows is "
            f"its, not challenger v{version}'s (another --workdir, or an empty one, demos this config alone)"
        )
    truth = read_table(workdir / "incoming" / "truth")
    first = _enrich(cfg, catalog, model, taxonomy, client, truth)
    _step(6, f"review: sample {cfg.review.sample_size} written values, judge them from the ground truth "
          "(as people would), import the verdicts, audit")  # fmt: skip
    _review(cfg, catalog, model.version, truth, taxonomy, workdir / "review", client, seed)
    _step(7, "re-score: every incoming product again, as after a promotion of a new head over the same "
          "encoders (the embedding store holds what the first run encoded)")  # fmt: skip
    again = _enrich_all(cfg, catalog, model, taxonomy, client)
    seconds = first.report.stage_seconds["score"], again.report.stage_seconds["score"]
    _say(f"  scoring took {seconds[1]:.1f}s, the first run's {seconds[0]:.1f}s")
    report = (
        f"catalog-enrich report [--audit] --catalog {cfg.catalog.root} --set "
        f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"
        if cfg.catalog.kind == "lakehouse"
        else "catalog-enrich report [--audit] --set catalog.kind=postgres --set "
        f"mlflow.tracking_uri={cfg.mlflow.tracking_uri} (with CATALOG_ENRICH_PG_DSN set: a throw-away server "
        "is gone with the demo)"
    )
    print(
        f"\ndemo finished in {time.perf_counter() - started:.0f}s. Next: {report}; review in a browser: "
        f"{workdir / 'review' / 'sample.html'}; mlflow ui --backend-store-uri {cfg.mlflow.tracking_uri}"
    )
    return 0


def _generate(synthetic: SyntheticConfig, workdir: Path, n: int, seed: int, taxonomy: Any) -> None:
    """Step 1: the labelled history, the frozen evaluation set and the incoming products."""
    from catalog_enrichment.data.summary import format_summary, summarize_marketplace
    from catalog_enrichment.data.synthetic import generate_marketplace

    _say(
        f"[demo 1/{STEPS}] generate: labelled history ({n:,}), frozen evaluation set ({n // 3:,}) and "
        f"incoming products ({n:,}, 2% bad rows) under {workdir}"
    )
    base = synthetic.model_copy(update={"products": n, "seed": seed})
    generate_marketplace(workdir / "labelled", base, taxonomy=taxonomy)
    evaluation = base.model_copy(update={"products": max(n // 3, 300), "seed": seed + 1})
    generate_marketplace(workdir / "eval", evaluation, taxonomy=taxonomy)
    incoming = base.model_copy(update={"seed": seed + 2, "bad_rate": 0.02})
    generate_marketplace(workdir / "incoming", incoming, taxonomy=taxonomy)
    _say(format_summary(summarize_marketplace(workdir / "incoming", taxonomy=taxonomy)) + "\n ")


def _train_and_promote(cfg: AppConfig, workdir: Path, taxonomy: Any, client: Any) -> str:
    """Steps 2 and 3: train a challenger on the labelled history, then the promotion gate on the
    frozen evaluation set; the challenger's version."""
    from catalog_enrichment.data.images import ImagePolicy
    from catalog_enrichment.promotion import EvaluationSet, GateRule, format_comparison, promote
    from catalog_enrichment.training.job import run_training_job

    _say(f"[demo 2/{STEPS}] train: {cfg.model.fusion} on {workdir / 'labelled' / 'products'}")
    indented = lambda m: _say("  " + m)  # noqa: E731
    outcome = run_training_job(
        cfg, taxonomy, data=workdir / "labelled" / "products", client=client,
        device=runtime.device(cfg.inference), progress=indented,
    )  # fmt: skip
    version = outcome.registered.version
    _step(3, f"promote: challenger v{version} vs champion on the frozen evaluation set")
    eval_data = workdir / "eval" / "products"
    summary = promote(
        client,
        cfg.mlflow.registered_model,
        EvaluationSet(
            eval_data, image_policy=ImagePolicy.from_config(cfg.images, [eval_data]), taxonomy=taxonomy
        ),
        GateRule.from_config(cfg.promotion, cfg.calibration),
        log_path=Path(cfg.catalog.root) / "promotion_log",
        progress=indented,
    )
    print(format_comparison(summary))
    return str(version)


def _enrich_all(
    cfg: AppConfig, catalog: Catalog, model: ModelVersion, taxonomy: Taxonomy, client: Any
) -> EnrichOutcome:
    """A full run of the champion over the incoming products."""
    from catalog_enrichment.enrich import RunScope, run_enrichment

    spark = runtime.spark_session(cfg)
    return run_enrichment(
        spark,
        cfg,
        taxonomy,
        model=model,
        scope=RunScope(full=True),
        client=client,
        progress=lambda m: _say("  " + m),
        catalog=catalog,
    )


def _enrich(
    cfg: AppConfig, catalog: Catalog, model: ModelVersion, taxonomy: Taxonomy, client: Any, truth: Any
) -> Any:
    """Steps 4 and 5: the first enrichment run, its report, what it wrote against the ground truth."""
    from catalog_enrichment.catalog.reports import format_report
    from catalog_enrichment.data.truth import format_precision, sample_against_truth, written_precision

    _step(4, f"enrich: score the incoming products in {catalog.describe()} with the champion in Spark")
    enriched = _enrich_all(cfg, catalog, model, taxonomy, client)
    _say(f"\n[demo 5/{STEPS}] report\n")
    print(format_report(enriched.report))
    table = catalog.attribute_rows()
    print("\nWritten values against the ground truth (model rows only):")
    print(format_precision(written_precision(table, truth, taxonomy)))
    print("\nA sample of written values:")
    print(sample_against_truth(table, truth, taxonomy))
    return enriched


def _review(
    cfg: AppConfig,
    catalog: Catalog,
    version: str,
    truth: Any,
    taxonomy: Any,
    folder: Path,
    client: Any,
    seed: int,
) -> None:
    """``review sample`` -> verdicts from the truth -> ``review import`` -> ``report --audit``, and
    the true precision of everything the version wrote beside each interval."""
    from pyarrow import csv

    from catalog_enrichment.catalog.reviews import import_verdicts
    from catalog_enrichment.data.truth import judge_from_truth, written_precision
    from catalog_enrichment.review import audit_catalog, record_audit, sample_for_review
    from catalog_enrichment.review.audit import format_audit

    files = sample_for_review(
        cfg, catalog, run_id=None, model_version=version, size=None, seed=seed, out=folder / "sample.csv"
    )
    print(f"  sample {files.sample.sample_id}: {files.file} (review page: {files.page})", flush=True)
    sample = csv.read_csv(files.file, convert_options=csv.ConvertOptions(strings_can_be_null=False))
    judged = judge_from_truth(
        sample,
        truth,
        taxonomy,
        reviewer="demo (ground truth)",
        reviewed_at=dt.datetime.now(dt.UTC).isoformat(),
    )
    verdicts = folder / "verdicts.csv"
    csv.write_csv(judged, verdicts)
    print(f"  {import_verdicts(catalog, verdicts).summary()}")
    audit = audit_catalog(cfg, catalog, client, model_version=version, sample_id=files.sample.sample_id)
    record_audit(cfg.mlflow, audit, client=client, chart_dir=folder)
    print(format_audit(audit))
    rows = catalog.attribute_rows()
    mine = rows.filter(pc.equal(rows["model_version"], version))
    true = written_precision(mine, truth, taxonomy)
    print("\nThe audit's intervals against the true precision of everything the version wrote:")
    for attr, e in audit.attributes.items():
        p = true[attr]["precision"]
        inside = e.lower is not None and p is not None and e.lower <= p <= e.upper
        print(
            f"  {attr:<14} true {p:.3f}  audit [{e.lower:.3f}, {e.upper:.3f}]  "
            + ("inside" if inside else "OUTSIDE")
        )


def _seed_catalog(catalog_cfg: CatalogConfig, catalog: Catalog, incoming: Path, names: Sequence[str]) -> None:
    """The marketplace's catalog before the job: the incoming products (PostgreSQL: loaded into its
    products table) and the values merchants provided, under the taxonomy's ``names``
    (:func:`~catalog_enrichment.catalog.attributes.merchant_rows`), unless an earlier demo put them
    there."""
    from catalog_enrichment.catalog.attributes import ensure_attributes_table, merchant_rows
    from catalog_enrichment.catalog.lakehouse import is_delta, read_table, write_table

    now = dt.datetime.now(dt.UTC)
    if catalog.kind == "lakehouse":
        attributes = Path(catalog_cfg.table("attributes"))
        if not is_delta(attributes):
            products = read_table(incoming, columns=["product_id", "merchant_attributes"])
            merchant = merchant_rows(products, now, names)
            write_table(attributes, merchant, mode="error")
        ensure_attributes_table(attributes)
        return
    if catalog.attribute_rows().num_rows:
        print(f"  {catalog.describe()} already holds the demo's catalog; not loaded again", flush=True)
        return
    from catalog_enrichment.catalog.postgres import PostgresCatalog

    assert isinstance(catalog, PostgresCatalog)  # the only other kind
    products = read_table(incoming)
    loaded, _ = catalog.load_products(products)
    merchant = catalog.add_merchant_values(merchant_rows(products, now, names))
    print(
        f"  loaded {loaded:,} products and {merchant:,} merchant values into {catalog.describe()}", flush=True
    )
