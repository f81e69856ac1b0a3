"""``catalog-enrich bench scale``: what one nightly increment costs as the catalog grows.

The same increment (N new products, images and all) is enriched by the whole job, as a process of
its own (``catalog-enrich enrich``, a fresh interpreter and JVM, the tiny model of ``bench chaos``
registered as champion), into catalogs whose attribute table was first grown to each size given
(as the job writes it: row groups of 65,536 rows): the increment's products' earlier values spread
through the table, and other products whose ids lie between the increment's (so no file or index
range holds the increment alone); half merchant values, half earlier model values. Each repeat is a new run id
over the same increment (the first inserts its values, the next replace them); sizes alternate
within a repeat, so a drifting machine lands on every size. Reported per catalog kind and size:
wall time, the driver's peak RSS, and the run report's stage seconds (medians over repeats).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.bench.chaos import prepare
from catalog_enrichment.bench.throughput import measure_process, products_reader
from catalog_enrichment.catalog import open_catalog
from catalog_enrichment.catalog.attributes import attributes_schema, writer_properties
from catalog_enrichment.config import CatalogConfig, PostgresConfig
from catalog_enrichment.contracts import load_taxonomy
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.types import Say

__all__ = ["KINDS", "attribute_batches", "format_scale", "run_scale_bench"]

KINDS = ("lakehouse", "postgres")
_ATTRIBUTES = (("color", 40), ("material", 20), ("product_type", 30))
_BATCH = 200_000


def attribute_batches(rows: int, increment_ids: Sequence[str], *, seed: int = 0) -> Iterator[pa.RecordBatch]:
    """``rows`` attribute rows (two values per attribute, six rows a product), half merchant, half
    model: the increment's products' earlier rows, spread evenly through the stream (so through
    every file written from it), and other products' with ids interleaved with the increment's
    (``<increment id>.<k>``); as batches, so memory follows one batch."""
    import numpy as np

    schema = attributes_schema()
    rng = np.random.default_rng(seed)
    ids = sorted(increment_ids)
    at = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    per_product = 2 * len(_ATTRIBUTES)
    stride = max(1, rows // per_product // len(ids))  # every stride-th product is an increment product
    for start in range(0, rows, _BATCH):
        n = min(_BATCH, rows - start)
        index = np.arange(start, start + n)
        product = index // per_product
        attribute = (index % per_product) // 2
        merchant = product % 2 == 0
        names = np.array([a for a, _ in _ATTRIBUTES])[attribute]
        sizes = np.array([k for _, k in _ATTRIBUTES])[attribute]
        first = (index // 2 * 2654435761) % sizes  # one draw per (product, attribute)
        value = (first + index % 2) % sizes  # its two values differ
        mask = pa.array(merchant)  # merchant rows carry no model columns

        def model_only(values: Any, mask: pa.Array = mask) -> pa.Array:
            return pc.if_else(mask, pa.scalar(None, pa.array(values).type), pa.array(values))

        yield pa.RecordBatch.from_pydict(
            {
                "product_id": [_product_id(ids, int(p), stride) for p in product],
                "attribute": names,
                "value": [f"{a}-{v}" for a, v in zip(names, value, strict=True)],
                "confidence": model_only(rng.uniform(0.6, 1.0, n)),
                "threshold": model_only(np.full(n, 0.5)),
                "source": pc.if_else(mask, "merchant", "model"),
                "model_name": model_only(["earlier"] * n),
                "model_version": model_only(["0"] * n),
                "run_id": model_only(["earlier-run"] * n),
                "written_at": pa.array([at] * n, schema.field("written_at").type),
            },
            schema=schema,
        )


def _product_id(ids: Sequence[str], p: int, stride: int) -> str:
    """Product ``p`` of the stream: every ``stride``-th one an increment product while they last,
    the others numbered on their own, ``<increment id>.<k>`` round the increment's ids."""
    if p % stride == 0 and p // stride < len(ids):
        return ids[p // stride]
    other = p - min(p // stride + 1, len(ids))
    return f"{ids[other % len(ids)]}.{other // len(ids)}"


def _grow(kind: str, cfg: CatalogConfig, rows: int, increment: pa.Table) -> None:
    """A catalog of ``kind`` whose attribute table holds ``rows`` rows of other products (and, for
    PostgreSQL, whose products table holds the increment)."""
    batches = attribute_batches(rows, increment["product_id"].to_pylist())
    if kind == "lakehouse":
        from deltalake import write_deltalake

        reader = pa.RecordBatchReader.from_batches(attributes_schema(), batches)
        write_deltalake(cfg.table("attributes"), reader, mode="error", writer_properties=writer_properties())
        return
    from psycopg import sql

    catalog = open_catalog(cfg)
    catalog.load_products(increment)  # type: ignore[attr-defined]
    names = attributes_schema().names
    with catalog.connect() as conn, conn.transaction():  # type: ignore[attr-defined]
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            catalog._name("attributes"),  # type: ignore[attr-defined]
            sql.SQL(", ").join(map(sql.Identifier, names)),
        )
        with conn.cursor().copy(statement) as copy:
            for batch in batches:
                for row in zip(*(batch.column(n).to_pylist() for n in names), strict=True):
                    copy.write_row(row)
        conn.execute(sql.SQL("ANALYZE {}").format(catalog._name("attributes")))  # type: ignore[attr-defined]


def _command(kind: str, cfg: CatalogConfig, products: Path, run_id: str, uri: str, model: str) -> list[str]:
    flags = [
        "--catalog", cfg.root, "--run-id", run_id, "--full",
        "--set", f"mlflow.tracking_uri={uri}", "--set", f"mlflow.registered_model={model}",
        "--set", "inference.device=cpu"
    ]  # fmt: skip
    if kind == "lakehouse":
        flags += ["--products", str(products)]
    else:
        schema = cfg.postgres.db_schema
        flags += ["--set", "catalog.kind=postgres", "--set", f"catalog.postgres.db_schema={schema}"]
    return [sys.executable, "-m", "catalog_enrichment.cli", "enrich", *flags]


def run_scale_bench(
    *,
    sizes: Sequence[int],
    increment: int,
    kinds: Sequence[str],
    repeats: int,
    workdir: Path,
    dsn: str | None = None,
    say: Say = print,
) -> dict[str, Any]:
    """Grow one catalog per (kind, size), then time ``repeats`` runs of the increment on each."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise CatalogEnrichError(f"--kinds takes {' and/or '.join(KINDS)}, got {list(kinds)}")
    if "postgres" in kinds and not dsn:
        raise CatalogEnrichError("the postgres catalogs need a server: CATALOG_ENRICH_PG_DSN")
    workdir = workdir.resolve()
    setup = prepare(workdir / "model", say=say)
    products = _increment(workdir, increment, say)
    catalogs = _grown(workdir, kinds, sizes, products, dsn, say)
    env = {**os.environ, **({"CATALOG_ENRICH_PG_DSN": dsn} if dsn else {})}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {k: {str(n): [] for n in sizes} for k in kinds}
    for repeat in range(repeats):
        order = list(sizes) if repeat % 2 == 0 else list(sizes)[::-1]
        for kind in kinds:
            for rows in order:
                cfg, run_id = catalogs[kind, rows], f"scale-{repeat}"
                command = _command(kind, cfg, products, run_id, setup.tracking_uri, setup.model_name)
                measured = measure_process(command, env, workdir)
                with _pg_env(dsn):
                    report = next(r for r in open_catalog(cfg).read_reports() if r.run_id == run_id)
                measured["stage_seconds"] = dict(report.stage_seconds)
                measured["values_written"] = sum(report.written_per_attribute.values())
                runs[kind][str(rows)].append(measured)
                say(
                    f"  {kind:9s} {rows:>10,} rows  repeat {repeat + 1}/{repeats}: "
                    f"{measured['seconds']:6.1f}s, driver {measured['driver_peak_rss_mb']:6.0f} MB, "
                    f"write {report.stage_seconds.get('write', 0):.2f}s"
                )
    result: dict[str, Any] = {"increment": increment, "sizes": list(sizes), "repeats": repeats}
    return {
        **result,
        "kinds": {kind: {size: _medians(m) for size, m in by_size.items()} for kind, by_size in runs.items()},
    }


def _increment(workdir: Path, increment: int, say: Say) -> Path:
    """The increment every run enriches, generated once."""
    products = workdir / f"increment-{increment}"
    if not products.exists():
        from deltalake import write_deltalake

        say(f"scale: an increment of {increment:,} products")
        reader = products_reader(increment, load_taxonomy(), image_size=32, seed=11)
        write_deltalake(str(products), reader, partition_by=["ingest_date"])
    return products


def _grown(
    workdir: Path, kinds: Sequence[str], sizes: Sequence[int], products: Path, dsn: str | None, say: Say
) -> dict[tuple[str, int], CatalogConfig]:
    """One catalog per (kind, size), its attribute table grown to that many rows."""
    from catalog_enrichment.catalog.lakehouse import read_table

    table = read_table(products)
    catalogs: dict[tuple[str, int], CatalogConfig] = {}
    for kind in kinds:
        for rows in sizes:
            root = workdir / "catalogs" / f"{kind}-{rows}"
            cfg = CatalogConfig(kind=kind, root=str(root), postgres=PostgresConfig(db_schema=f"scale_{rows}"))
            say(f"scale: growing the {kind} attribute table to {rows:,} rows")
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            with _pg_env(dsn):
                _grow(kind, cfg, rows, table)
            catalogs[kind, rows] = cfg
    return catalogs


def _medians(measured: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "median_seconds": round(statistics.median(r["seconds"] for r in measured), 2),
        "median_driver_peak_rss_mb": round(statistics.median(r["driver_peak_rss_mb"] for r in measured)),
        "median_stage_seconds": {
            stage: round(statistics.median(r["stage_seconds"].get(stage, 0.0) for r in measured), 2)
            for stage in measured[0]["stage_seconds"]
        },
        "runs": measured,
    }


@contextlib.contextmanager
def _pg_env(dsn: str | None) -> Iterator[None]:
    """``CATALOG_ENRICH_PG_DSN`` set to ``dsn`` while the block runs (PostgreSQL catalogs)."""
    from catalog_enrichment.catalog.postgres import PG_DSN_ENV

    old = os.environ.get(PG_DSN_ENV)
    if dsn:
        os.environ[PG_DSN_ENV] = dsn
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PG_DSN_ENV, None)
        else:
            os.environ[PG_DSN_ENV] = old


def format_scale(result: dict[str, Any]) -> str:
    """The table for docs/benchmarks.md (markdown)."""
    sizes = result["sizes"]
    lines = [
        f"one increment of {result['increment']:,} products, medians of {result['repeats']} runs",
        "",
        "| catalog | attribute rows | wall s | driver peak RSS MB | read s | score s | write s |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, by_size in result["kinds"].items():
        for size in sizes:
            r = by_size[str(size)]
            stages = r["median_stage_seconds"]
            lines.append(
                f"| {kind} | {size:,} | {r['median_seconds']:.1f} | {r['median_driver_peak_rss_mb']:,} | "
                f"{stages.get('read', 0):.2f} | {stages.get('score', 0):.2f} | {stages.get('write', 0):.2f} |"
            )
        first, last = by_size[str(sizes[0])], by_size[str(sizes[-1])]
        ratio = last["median_seconds"] / first["median_seconds"]
        grown = last["median_driver_peak_rss_mb"] - first["median_driver_peak_rss_mb"]
        lines.append(f"| {kind} | {sizes[-1]:,} vs {sizes[0]:,} | ×{ratio:.2f} | {grown:+,} | | | |")
    return "\n".join(lines)
