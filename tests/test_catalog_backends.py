"""One enrichment suite on both catalogs: the same products and model through the embedded
lakehouse and a real PostgreSQL server must give the same attribute rows, quarantine and counts,
with the same guarantees (idempotent re-run, incremental watermark, merchant rows untouched,
rollback exact, backfill partitions)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from catalog_enrichment.catalog import Catalog, open_catalog
from catalog_enrichment.catalog.attributes import merchant_rows
from catalog_enrichment.catalog.lakehouse import read_table, write_table
from catalog_enrichment.catalog.runs import rollback
from catalog_enrichment.config import AppConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.enrich import EnrichOutcome, RunScope, run_enrichment
from catalog_enrichment.versions import ModelVersion
from tests.catalog.test_attributes import seed_merchant
from tests.conftest import ONE_CORE, tiny_config

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(900)]
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def _rows(catalog: Catalog) -> list[tuple[Any, ...]]:
    """The attribute rows without the confidence (see :func:`_confidences`)."""
    return sorted(
        (r["product_id"], r["attribute"], r["value"], r["source"], r["run_id"], r["model_version"])
        for r in catalog.attribute_rows().to_pylist()
    )


def _confidences(catalog: Catalog) -> list[float]:
    """The model rows' confidences in row order: equal to float32 precision, not bit for bit (the
    JDBC ranges and the Parquet files cut the products into different batches, and a float32
    forward pass over a different batch may differ in the last bit)."""
    rows = [r for r in catalog.attribute_rows().to_pylist() if r["source"] == "model"]
    return [
        r["confidence"] for r in sorted(rows, key=lambda r: (r["product_id"], r["attribute"], r["value"]))
    ]


def _quarantined(catalog: Catalog) -> list[tuple[Any, ...]]:
    return sorted((r["product_id"] or "", tuple(r["reasons"])) for r in catalog.quarantine_rows().to_pylist())


def _unique(rows: pa.Table) -> pa.Table:
    """One row per (product, attribute, value): a stale duplicate product repeats its merchant values."""
    seen: dict[tuple[str, str, str], int] = {}
    for i, key in enumerate(
        zip(*(rows[k].to_pylist() for k in ("product_id", "attribute", "value")), strict=True)
    ):
        seen.setdefault(key, i)
    return rows.take(sorted(seen.values()))


class Backend:
    """A catalog of one kind holding the incoming products and the merchants' values."""

    def __init__(self, kind: str, cfg: AppConfig, products: Path | None) -> None:
        self.kind, self.cfg = kind, cfg
        self.catalog = open_catalog(cfg.catalog, products=products)

    def run(
        self, spark: Any, taxonomy: Taxonomy, bundle: Path, *, model: ModelVersion | None = None, **scope: Any
    ) -> EnrichOutcome:
        """A run of ``scope`` (:class:`RunScope`'s fields) on this catalog; the model: v1 of ``bundle``."""
        model = model or ModelVersion("tiny", "1", bundle_dir=bundle)
        return run_enrichment(
            spark, self.cfg, taxonomy, model=model, scope=RunScope(**scope), progress=lambda _m: None,
            catalog=self.catalog,
        )  # fmt: skip


@pytest.fixture(scope="module")
def backends(request, tmp_path_factory, incoming):  # type: ignore[no-untyped-def]
    """Both catalogs with the same products and merchant values (one server schema for the module)."""
    server = request.getfixturevalue("pg_server")
    products = read_table(incoming.products)
    merchant = _unique(merchant_rows(products.select(["product_id", "merchant_attributes"]), T0))
    inference = {"batch_size": 64, "device": "cpu", "decode_threads": 2}
    lake = tmp_path_factory.mktemp("lake")
    lakehouse = Backend(
        "lakehouse", tiny_config(catalog={"root": str(lake)}, inference=inference), incoming.products
    )
    seed_merchant(lakehouse.catalog, merchant)
    postgres_cfg = tiny_config(
        catalog={"kind": "postgres", "root": str(tmp_path_factory.mktemp("pg-staging")),
                 "postgres": {"db_schema": "parity", "read_partitions": 3}},
        inference=inference,
    )  # fmt: skip
    from catalog_enrichment.catalog.postgres import PostgresCatalog

    postgres = Backend("postgres", postgres_cfg, None)
    postgres.catalog = PostgresCatalog(postgres_cfg.catalog, dsn=server.dsn())
    postgres.catalog.load_products(products)
    seed_merchant(postgres.catalog, merchant)
    return {"lakehouse": lakehouse, "postgres": postgres}


@pytest.fixture(scope="module")
def first_runs(spark, backends, taxonomy, scoring_bundle):  # type: ignore[no-untyped-def]
    return {
        k: b.run(spark, taxonomy, scoring_bundle, full=True, run_id="parity-1") for k, b in backends.items()
    }


def test_both_catalogs_write_the_same_rows_for_the_same_input_and_model(backends, first_runs) -> None:  # type: ignore[no-untyped-def]
    lake, pg = backends["lakehouse"].catalog, backends["postgres"].catalog
    rows = _rows(lake)
    assert sum(1 for r in rows if r[3] == "model") > 1000
    assert _rows(pg) == rows
    assert _confidences(pg) == pytest.approx(_confidences(lake), abs=1e-5)
    assert _quarantined(pg) == _quarantined(lake) and len(_quarantined(lake)) > 50
    a, b = first_runs["lakehouse"].report, first_runs["postgres"].report
    for field in ("rows_read", "rows_valid", "rows_quarantined", "rows_scored", "written_per_attribute"):
        assert getattr(a, field) == getattr(b, field), field
    assert first_runs["postgres"].merge.inserted == sum(1 for r in rows if r[3] == "model")
    reports = pg.read_reports()
    assert [(r.run_id, r.status, r.watermark) for r in reports] == [("parity-1", "succeeded", b.watermark)]


def test_merchant_rows_are_untouched(backends, first_runs, incoming) -> None:  # type: ignore[no-untyped-def]
    products = read_table(incoming.products, columns=["product_id", "merchant_attributes"])
    merchant = _unique(merchant_rows(products, T0))
    expected = sorted(zip(merchant["product_id"].to_pylist(), merchant["attribute"].to_pylist(),
                          merchant["value"].to_pylist(), strict=True))  # fmt: skip
    pg = [r for r in _rows(backends["postgres"].catalog) if r[3] == "merchant"]
    assert sorted(r[:3] for r in pg) == expected
    model_pairs = {r[:2] for r in _rows(backends["postgres"].catalog) if r[3] == "model"}
    assert not model_pairs & {r[:2] for r in pg}  # no model value beside a merchant's


def test_a_rerun_is_a_no_op_and_an_incremental_run_reads_nothing_new(
    spark, backends, first_runs, taxonomy, scoring_bundle
) -> None:  # type: ignore[no-untyped-def]
    for kind, backend in backends.items():
        before = _rows(backend.catalog)
        again = backend.run(spark, taxonomy, scoring_bundle, full=True, run_id="parity-1")
        assert again.already_done, kind
        nightly = backend.run(spark, taxonomy, scoring_bundle, run_id="parity-2")
        assert nightly.report.rows_read == 0 and nightly.report.status == "succeeded", kind
        assert _rows(backend.catalog) == before, kind


def _plant_model_value(catalog: Catalog, product: str, attribute: str) -> tuple[Any, ...]:
    """A model value written (by run "parity-0") before the merchant filled the pair."""
    filled = pa.array([[(attribute, ["x"])]], pa.map_(pa.string(), pa.list_(pa.string())))
    row = merchant_rows(pa.table({"product_id": [product], "merchant_attributes": filled}), T0)
    model = {"source": "model", "model_name": "tiny", "model_version": "1", "run_id": "parity-0"}
    row = pa.Table.from_pylist(
        [row.to_pylist()[0] | model | {"confidence": 0.99, "threshold": 0.9}], row.schema
    )
    if catalog.kind == "postgres":
        catalog.add_merchant_values(row)  # type: ignore[attr-defined]  (inserts the rows as they are)
    else:
        write_table(catalog.attributes, row, mode="append")  # type: ignore[attr-defined]
    return (product, attribute, "x", "model", "parity-0", "1")


def test_a_partition_run_and_rollback_by_run_and_by_model_version(
    spark, backends, first_runs, taxonomy, scoring_bundle, incoming
) -> None:  # type: ignore[no-untyped-def]
    after_first: dict[str, list[tuple[Any, ...]]] = {}
    products = read_table(incoming.products, columns=["product_id", "ingest_date"])
    day_of = dict(zip(products["product_id"].to_pylist(), products["ingest_date"].to_pylist(), strict=True))
    for kind, backend in backends.items():
        catalog = backend.catalog
        days = catalog.list_partitions("ingest_date")
        assert len(days) == 4, kind
        # a model value on a pair of the partition whose merchant row came later (a product the
        # first run scored): the partition's run removes it, and its rollback does not put it back
        # beside the merchant's
        scored = {r[0] for r in _rows(catalog) if r[3] == "model"}
        held = sorted(
            r[:2]
            for r in _rows(catalog)
            if r[3] == "merchant" and r[0] in scored and str(day_of[r[0]]) == days[0]
        )
        stale = _plant_model_value(catalog, *held[0])
        after_first[kind] = _rows(catalog)
        v2 = ModelVersion("tiny", "2", bundle_dir=scoring_bundle)
        scoped = backend.run(
            spark,
            taxonomy,
            scoring_bundle,
            model=v2,
            full=True,
            partition=f"ingest_date={days[0]}",
            run_id="p-v2",
        )
        assert 0 < scoped.report.rows_read < first_runs[kind].report.rows_read
        changed = _rows(catalog)
        assert {r[4] for r in changed if r[3] == "model"} == {"parity-1", "p-v2"} and stale not in changed
        rollback(catalog, run_id="p-v2", progress=lambda _m: None)
        assert _rows(catalog) == [r for r in after_first[kind] if r != stale] and stale in after_first[kind]
        assert {r.run_id: r.status for r in catalog.read_reports()}["p-v2"] == "rolled_back"
        rollback(
            catalog, model_version="1", model_name="tiny", progress=lambda _m: None
        )  # of its runs: parity-1
        assert [r for r in _rows(catalog) if r[3] == "model"] == [], kind
    assert after_first["lakehouse"] == after_first["postgres"]
    assert _rows(backends["lakehouse"].catalog) == _rows(backends["postgres"].catalog)


def test_postgres_products_that_break_the_contract_fail_in_one_line(spark, pg_catalog_config) -> None:  # type: ignore[no-untyped-def]
    from catalog_enrichment.catalog.postgres import PostgresCatalog
    from catalog_enrichment.contracts import load_contract
    from catalog_enrichment.errors import ContractError

    catalog = PostgresCatalog(pg_catalog_config)
    contract = load_contract("products")
    with pytest.raises(ContractError, match="no products table"):
        catalog.read_products(spark, contract)
    with pytest.raises(ContractError, match="no products table"):  # labels: before Spark reads a row
        catalog.source_of("products")
    with catalog.connect() as conn:
        conn.execute(f'CREATE TABLE "{catalog.schema}".products (product_id text, title integer)')
    with pytest.raises(ContractError, match=r"lacks contract column\(s\) \['description'"):
        catalog.read_products(spark, contract)
    with catalog.connect() as conn:
        conn.execute(f'DROP TABLE "{catalog.schema}".products')
    catalog.load_products(read_table_empty())
    with catalog.connect() as conn:
        conn.execute(f'ALTER TABLE "{catalog.schema}".products ALTER COLUMN title TYPE integer USING NULL')
    with pytest.raises(ContractError, match=r"products column 'title' is integer .* make it"):
        catalog.read_products(spark, contract)


def test_a_postgres_updated_at_of_infinity_is_read_as_the_far_future_the_rules_quarantine(
    spark, pg_catalog_config, incoming
) -> None:  # type: ignore[no-untyped-def]
    """'infinity' has no Python datetime: the JDBC ranges' bounds leave it out (a driver-side query
    used to fail every run on it), and Spark reads it as the year 9999, which
    updated_at_not_in_future quarantines."""
    from catalog_enrichment.catalog.postgres import PostgresCatalog
    from catalog_enrichment.contracts import load_contract

    catalog = PostgresCatalog(
        pg_catalog_config.model_copy(
            update={"postgres": pg_catalog_config.postgres.model_copy(update={"read_partitions": 4})}
        )
    )
    table = read_table(incoming.products).slice(0, 40)
    catalog.load_products(table)
    first = table["product_id"][0].as_py()
    with catalog.connect() as conn:
        conn.execute(
            f"UPDATE \"{catalog.schema}\".products SET updated_at = 'infinity' WHERE product_id = %s", [first]
        )
    rows = (
        catalog.read_products(spark, load_contract("products")).select("product_id", "updated_at").collect()
    )
    assert len(rows) == 40
    assert {r["product_id"] for r in rows if r["updated_at"].year == 9999} == {first}


def test_a_postgres_incremental_read_takes_the_rows_no_watermark_places(
    spark, pg_catalog_config, incoming
) -> None:  # type: ignore[no-untyped-def]
    """A row stamped before validation.earliest_updated_at (a zero default), or one of a partition
    no run has read yet, is read with the changed rows, whatever the JDBC ranges their bounds give
    (it lies outside them)."""
    import datetime as dt

    from catalog_enrichment.catalog.postgres import PostgresCatalog
    from catalog_enrichment.catalog.products import Partition
    from catalog_enrichment.contracts import load_contract

    catalog = PostgresCatalog(
        pg_catalog_config.model_copy(
            update={"postgres": pg_catalog_config.postgres.model_copy(update={"read_partitions": 4})}
        )
    )
    table = read_table(incoming.products).slice(0, 40)
    catalog.load_products(table)
    since = max(table["updated_at"].to_pylist())
    old, *changed = table["product_id"].to_pylist()[:3]
    products = f'"{catalog.schema}".products'
    with catalog.connect() as conn:
        conn.execute(f"UPDATE {products} SET updated_at = '1970-01-01' WHERE product_id = %s", [old])
        for i, pid in enumerate(changed, start=1):
            at = since + dt.timedelta(days=i)
            conn.execute(f"UPDATE {products} SET updated_at = %s, ingest_date = %s WHERE product_id = %s",
                         [at, at.date(), pid])  # fmt: skip
    earliest = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    rows = catalog.read_products(spark, load_contract("products"), since=since, earliest=earliest).collect()
    assert {r["product_id"] for r in rows} == {old, *changed}  # (a product's stale copy is read too)
    # the first run over the whole table after a backfill: every row of a partition no run read
    whole = table["product_id"].to_pylist()[3:8]
    with catalog.connect() as conn:
        conn.execute(f"UPDATE {products} SET ingest_date = '2026-10-01' WHERE product_id = ANY(%s)", [whole])
        days = [d for (d,) in conn.execute(f"SELECT DISTINCT ingest_date::text FROM {products}")]
    caught_up = {Partition("ingest_date", d): since for d in days if d != "2026-10-01"}
    rows = catalog.read_products(
        spark, load_contract("products"), since=since, earliest=earliest, caught_up=caught_up
    ).collect()
    assert {r["product_id"] for r in rows} == {old, *changed, *whole}


def test_a_postgres_incremental_read_is_the_same_on_a_jvm_not_in_utc(
    spark, pg_catalog_config, incoming
) -> None:  # type: ignore[no-untyped-def]
    """The JVM's default zone Tokyo (9 h east of UTC; a driver on a host set to it): the window
    Spark pushes into the SQL is the same instant (it was written as Tokyo's wall time, which the
    UTC session read 9 h late: no row changed since was read), and a naive ``timestamp without time
    zone`` updated_at, which the JDBC driver would read as Tokyo's times, is refused in one line."""
    from catalog_enrichment.catalog.postgres import PostgresCatalog
    from catalog_enrichment.contracts import load_contract
    from catalog_enrichment.errors import ContractError

    catalog = PostgresCatalog(pg_catalog_config)
    table = read_table(incoming.products).slice(0, 20)
    catalog.load_products(table)
    since = max(table["updated_at"].to_pylist())
    changed = table["product_id"].to_pylist()[:2]
    products = f'"{catalog.schema}".products'
    with catalog.connect() as conn:
        conn.execute(f"UPDATE {products} SET updated_at = %s WHERE product_id = ANY(%s)",
                     [since + dt.timedelta(hours=1), changed])  # fmt: skip
    zones = spark._jvm.java.util.TimeZone
    before = zones.getDefault()
    zones.setDefault(zones.getTimeZone("Asia/Tokyo"))
    try:
        rows = catalog.read_products(spark, load_contract("products"), since=since).collect()
        assert sorted(r["product_id"] for r in rows) == sorted(changed)
        with catalog.connect() as conn:
            conn.execute(f"ALTER TABLE {products} ALTER COLUMN updated_at TYPE timestamp")
        with pytest.raises(
            ContractError, match=r"timestamp without time zone .* not in UTC: such a time comes back -9 h off"
        ):
            catalog.read_products(spark, load_contract("products"), since=since)
    finally:
        zones.setDefault(before)
    assert len(catalog.read_products(spark, load_contract("products"), since=since).collect()) == 2


def test_a_row_without_a_time_committed_while_a_postgres_read_stages_is_listed(
    spark, pg_catalog_config, incoming, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL is read twice, for the timeless list and to stage the rows every stage reads: a
    row without a time committed in between is staged (the run quarantines it), so it is listed
    too (it was not: the next run read it and counted it again)."""
    import json

    from catalog_enrichment.catalog.postgres import PostgresCatalog
    from catalog_enrichment.catalog.reports import TIMELESS, RunReport
    from catalog_enrichment.contracts import load_contract
    from catalog_enrichment.enrich import stages

    catalog = PostgresCatalog(pg_catalog_config)
    table = read_table(incoming.products).slice(0, 20)
    catalog.load_products(table)
    first, late = table["product_id"].to_pylist()[:2]
    products = f'"{catalog.schema}".products'
    with catalog.connect() as conn:
        conn.execute(f"UPDATE {products} SET updated_at = NULL WHERE product_id = %s", [first])
    watermark = max(t for t in table["updated_at"].to_pylist() if t is not None)
    last = RunReport(
        run_id="night-0", status="succeeded", started_at=watermark, watermark=watermark,
        validation_summary=json.dumps({TIMELESS: []}),
    )  # fmt: skip
    listing = stages._timeless

    def commit_in_between(*args: Any, **kwargs: Any) -> Any:
        got = listing(*args, **kwargs)
        with catalog.connect() as conn:
            conn.execute(f"UPDATE {products} SET updated_at = NULL WHERE product_id = %s", [late])
        return got

    monkeypatch.setattr(stages, "_timeless", commit_in_between)
    got = stages.read(spark, catalog, load_contract("products"), None, last, dt.timedelta(0), tmp_path / "s")
    assert sorted(r["product_id"] for r in got.df.collect()) == sorted([first, late])
    assert got.timeless == sorted([first, late])


def test_the_first_postgres_read_after_a_backfill_spreads_a_partition_read_whole_over_the_ranges(
    spark, pg_catalog_config, incoming
) -> None:  # type: ignore[no-untyped-def]
    """40 products changed one a day; the first 30 in a partition no run has read (read whole), the
    last 10 in a partition caught up to day 35. The JDBC ranges' bounds cover the rows read whole
    (days 0-39), so the four ranges hold about ten rows each, not 30 in the first (bounds from the
    caught-up partition's window alone, days 36-39, left everything older to the first range)."""
    import datetime as dt

    from pyspark.sql import functions as F

    from catalog_enrichment.catalog.postgres import PostgresCatalog
    from catalog_enrichment.catalog.products import Partition
    from catalog_enrichment.contracts import load_contract

    catalog = PostgresCatalog(
        pg_catalog_config.model_copy(
            update={"postgres": pg_catalog_config.postgres.model_copy(update={"read_partitions": 4})}
        )
    )
    table = read_table(incoming.products).slice(0, 40)
    catalog.load_products(table)
    ids = table["product_id"].to_pylist()
    start = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
    products = f'"{catalog.schema}".products'
    with catalog.connect() as conn:
        for i, pid in enumerate(ids):
            day = "2026-09-30" if i < 30 else "2026-10-30"
            conn.execute(f"UPDATE {products} SET updated_at = %s, ingest_date = %s WHERE product_id = %s",
                         [start + dt.timedelta(days=i), day, pid])  # fmt: skip
    caught_at = start + dt.timedelta(days=35, hours=12)
    rows = catalog.read_products(
        spark,
        load_contract("products"),
        since=caught_at,
        caught_up={Partition("ingest_date", "2026-10-30"): caught_at},
    )
    per_range = [r["n"] for r in rows.groupBy(F.spark_partition_id()).agg(F.count("*").alias("n")).collect()]
    assert sum(per_range) == 34  # days 0-29 whole, 36-39 changed since
    assert len(per_range) == 4 and max(per_range) <= 12


@pytest.mark.parametrize("kind", ["numeric(12, 2)", "double precision"])
def test_a_postgres_read_splits_on_a_column_of_fractional_numbers(
    spark, pg_catalog_config, incoming, kind
) -> None:  # type: ignore[no-untyped-def]
    """``catalog.postgres.partition_column`` may be any numeric column: Spark reads the ranges'
    bounds as whole numbers, so they are rounded outwards; NaN and NULL rows are read all the same."""
    from catalog_enrichment.catalog.postgres import PostgresCatalog
    from catalog_enrichment.contracts import load_contract

    postgres = pg_catalog_config.postgres.model_copy(update={"read_partitions": 4, "partition_column": "seq"})
    catalog = PostgresCatalog(pg_catalog_config.model_copy(update={"postgres": postgres}))
    table = read_table(incoming.products).slice(0, 40)
    catalog.load_products(table)
    products = f'"{catalog.schema}".products'
    with catalog.connect() as conn:
        conn.execute(f"ALTER TABLE {products} ADD COLUMN seq {kind}")
        conn.execute(f"UPDATE {products} SET seq = (hashtext(product_id) % 1000) / 7.0")
        ids = table["product_id"].to_pylist()
        conn.execute(f"UPDATE {products} SET seq = 'NaN' WHERE product_id = %s", [ids[0]])
        conn.execute(f"UPDATE {products} SET seq = NULL WHERE product_id = %s", [ids[1]])
    rows = catalog.read_products(spark, load_contract("products")).select("product_id").collect()
    assert sorted(r["product_id"] for r in rows) == sorted(ids)


def read_table_empty() -> pa.Table:
    from catalog_enrichment.contracts import load_contract

    return load_contract("products").arrow_schema(enforce_nullability=False).empty_table()


def test_training_labels_are_the_same_from_either_catalog(backends, taxonomy, spark, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``catalog-enrich labels`` reads the products and the merchant values from either catalog."""
    from catalog_enrichment.catalog.labels import write_labels

    tables = {}
    for kind, backend in backends.items():
        report = write_labels(
            spark, catalog=backend.catalog, evaluation=None, out=tmp_path / kind, taxonomy=taxonomy
        )
        assert report.products_written > 100, kind
        tables[kind] = read_table(tmp_path / kind).sort_by("product_id")
    lake, pg = tables["lakehouse"], tables["postgres"]
    assert pg.column_names == lake.column_names
    for column in [a.name for a in taxonomy] + ["product_id", "title", "updated_at", "ingest_date"]:
        assert pg[column].to_pylist() == lake[column].to_pylist(), column


def test_real_job_processes_killed_around_the_postgres_commit(  # type: ignore[no-untyped-def]
    backends, scoring_bundle, incoming, pg_server, tmp_path, monkeypatch
) -> None:
    """``catalog-enrich enrich`` against PostgreSQL, a real process SIGKILLed after its COPY
    (before the merge) and inside the merge transaction: the tables are as they were; the same run
    id then commits once; a further re-run does nothing; ``report`` and ``rollback`` work on the
    database (these four in this process); the password appears in no output."""
    import os
    import signal
    import subprocess
    import sys

    from catalog_enrichment.catalog.postgres import PG_DSN_ENV, PostgresCatalog
    from tests.conftest import cli_in_process, tiny_registry

    _, _, _, flags = tiny_registry(tmp_path, scoring_bundle, incoming)
    flags = [f for f in flags if f not in ("--products", str(incoming.products))]
    schema = "killed"
    cfg = backends["postgres"].cfg.catalog.model_copy(
        update={
            "postgres": backends["postgres"].cfg.catalog.postgres.model_copy(update={"db_schema": schema})
        }
    )
    catalog = PostgresCatalog(cfg, dsn=pg_server.dsn())
    products = read_table(incoming.products)  # what the PostgreSQL catalog was loaded with
    catalog.load_products(products)
    seed_merchant(catalog, _unique(merchant_rows(products.select(["product_id", "merchant_attributes"]), T0)))
    before = _rows(catalog)
    day = catalog.list_partitions("ingest_date")[0]
    flags += [
        "--catalog", str(tmp_path / "staging"), "--set", "catalog.kind=postgres",
        "--set", f"catalog.postgres.db_schema={schema}",
    ]  # fmt: skip
    outputs: list[str] = []

    def killed(fault: str) -> subprocess.CompletedProcess[str]:
        """A real job process, SIGKILLed at ``fault``."""
        done = subprocess.run(
            [sys.executable, "-c", "from catalog_enrichment.cli import run; run()", "enrich",
             "--partition", f"ingest_date={day}", "--run-id", "k1", "--set", ONE_CORE, *flags],
            env={**os.environ, PG_DSN_ENV: pg_server.dsn(), "CATALOG_ENRICH_FAULT": fault},
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        outputs.append(done.stdout + done.stderr)
        return done

    def cli(*args: str) -> tuple[int, str, str]:
        """The commands after the kills, in this process (its Spark session)."""
        code, out, err = cli_in_process([*args, *flags])
        outputs.append(out + err)
        return code, out, err

    for fault in ("after_stage", "during_merge"):
        proc = killed(fault)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert _rows(catalog) == before and catalog.quarantine_rows().num_rows == 0, fault
    monkeypatch.setenv(PG_DSN_ENV, pg_server.dsn())
    code, out, err = cli("enrich", "--partition", f"ingest_date={day}", "--run-id", "k1")
    assert code == 0 and "run k1: succeeded" in out, err[-2000:]
    written = _rows(catalog)
    assert {r[4] for r in written if r[3] == "model"} == {"k1"} and len(written) > len(before)
    report = {r.run_id: r for r in catalog.read_reports()}["k1"]
    assert catalog.quarantine_rows().num_rows == report.rows_quarantined > 0
    with catalog.connect() as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename LIKE 'stage%%'", [schema]
        ).fetchone()
    assert left == (0,)
    code, out, _ = cli("enrich", "--partition", f"ingest_date={day}", "--run-id", "k1")
    assert code == 0 and "already succeeded" in out and _rows(catalog) == written
    code, out, _ = cli("report", "--run-id", "k1")
    assert code == 0 and "run k1: succeeded" in out
    code, _, err = cli("rollback", "--run-id", "k1")
    assert code == 0 and _rows(catalog) == before, err[-2000:]
    assert not any(pg_server.password in text for text in outputs)


def test_merchant_values_postgres_cannot_read_as_the_contract_says_are_quarantined_whole(  # type: ignore[no-untyped-def]
    spark, pg_catalog_config
) -> None:
    """jsonb holds any JSON; what is not {attribute: [values]} is quarantined as
    merchant_attributes_readable with the original text in the raw row, never dropped silently."""
    import json

    from catalog_enrichment.catalog.postgres import PostgresCatalog
    from catalog_enrichment.config import ValidationConfig
    from catalog_enrichment.contracts import load_contract
    from catalog_enrichment.validation.rules import build_rules, check_rows, quarantine_rows

    contract = load_contract("products")
    schema = contract.arrow_schema(enforce_nullability=False)
    good = {"product_id": "good", "title": "Red cotton shirt", "updated_at": T0, "ingest_date": T0.date()}
    catalog = PostgresCatalog(pg_catalog_config)
    catalog.load_products(
        pa.Table.from_pylist([good | {"merchant_attributes": [("color", ["red"])]}], schema=schema)
    )
    shapes = {"string": '{"color": "red"}', "list": "[1, 2]", "scalar": '"red"', "nested": '{"a": {"b": 1}}'}
    with catalog.connect() as conn:
        for name, text in shapes.items():
            conn.execute(
                f'INSERT INTO "{catalog.schema}".products (product_id, title, merchant_attributes, '
                "updated_at, ingest_date) VALUES (%s, 'A title', %s::jsonb, %s, %s)",
                [name, text, T0, T0.date()],
            )
    df = catalog.read_products(spark, contract)
    rules = build_rules(contract, ValidationConfig(), T0 + dt.timedelta(days=1), df.columns)
    checked = check_rows(df, rules)
    reasons = {r["product_id"]: r["_reasons"] for r in checked.select("product_id", "_reasons").collect()}
    assert reasons == {"good": [], **{name: ["merchant_attributes_readable"] for name in shapes}}
    bad = checked.where("size(_reasons) > 0")
    rows = quarantine_rows(bad, "r", T0, load_contract("quarantine").arrow_schema()).to_pylist()
    kept = {r["product_id"]: json.loads(r["raw"])["_merchant_attributes_unreadable"] for r in rows}
    assert {k: json.loads(v) for k, v in kept.items()} == {k: json.loads(v) for k, v in shapes.items()}


@pytest.fixture(params=["lakehouse", "postgres"])
def fresh(request, tmp_path) -> Catalog:  # type: ignore[no-untyped-def]
    """An empty catalog of each kind (no Spark, no run: its writes are made by hand)."""
    if request.param == "postgres":
        return open_catalog(request.getfixturevalue("pg_catalog_config"))
    from catalog_enrichment.config import CatalogConfig

    return open_catalog(CatalogConfig(root=str(tmp_path / "lake"), lock_wait_seconds=30))


def _attribute_rows(rows: list[tuple[str, str, str, str]]) -> pa.Table:
    """Attribute rows (product, attribute, value, source), a model's written by run r0."""
    from catalog_enrichment.catalog.attributes import attributes_schema

    model = {"model_name": "tiny", "model_version": "1", "run_id": "r0", "confidence": 0.9, "threshold": 0.5}
    return pa.Table.from_pylist(
        [{"product_id": p, "attribute": a, "value": v, "source": s, "written_at": T0}
         | (model if s == "model" else {}) for p, a, v, s in rows],
        schema=attributes_schema(),
    )  # fmt: skip


def _write(catalog: Catalog, run: Any, spark: Any = None) -> Any:
    """``run`` (a RunWrite) written; the catalog's rows as (product, attribute, value, source)."""
    merge = catalog.write(run, spark)
    rows = catalog.attribute_rows().to_pylist()
    return merge, sorted((r["product_id"], r["attribute"], r["value"], r["source"]) for r in rows)


def _hand_run(values: list[tuple[str, str, str]], pairs: list[tuple[str, str]], **more: Any) -> Any:
    from catalog_enrichment.catalog.base import RunWrite
    from catalog_enrichment.contracts import load_contract

    return RunWrite(
        "r1", "tiny", "2", T0 + dt.timedelta(days=1),
        pa.table({"product_id": [v[0] for v in values], "attribute": [v[1] for v in values],
                  "value": [v[2] for v in values], "confidence": [0.9] * len(values),
                  "threshold": [0.5] * len(values)}),
        pa.table({"product_id": [p for p, _ in pairs], "attribute": [a for _, a in pairs]}),
        load_contract("quarantine").arrow_schema().empty_table(), **more,
    )  # fmt: skip


def test_a_merchant_row_of_a_colour_family_keeps_the_model_s_colour_out_on_both_catalogs(
    fresh: Catalog, taxonomy: Taxonomy
) -> None:
    """The run's linked attributes (the taxonomy's held_together, as run_write fills them): p1's
    merchant gave its colour family, so neither the model's family nor its colour is written for p1."""
    from catalog_enrichment.enrich.stages import run_write

    linked = run_write("r1", ModelVersion("tiny", "2"), T0, [], taxonomy=taxonomy).linked
    assert linked == taxonomy.held_together() and "color" in linked["color_family"]
    seed_merchant(fresh, _attribute_rows([("p1", "color_family", "cool", "merchant")]))
    run = _hand_run(
        [("p1", "color", "crimson"), ("p1", "color_family", "warm"), ("p2", "color", "crimson")],
        [("p1", "color"), ("p1", "color_family"), ("p2", "color")],
        linked=linked,
    )
    merge, rows = _write(fresh, run)
    assert rows == [("p1", "color_family", "cool", "merchant"), ("p2", "color", "crimson", "model")]
    assert merge.merchant_pairs_skipped == 2 and merge.written == {"color": 1}


def test_the_values_and_products_written_are_counted_without_those_a_merchant_row_keeps_out(
    fresh: Catalog,
) -> None:
    seed_merchant(
        fresh, _attribute_rows([("p1", "color", "red", "merchant"), ("p2", "color", "blue", "model")])
    )
    run = _hand_run(
        [
            ("p1", "color", "blue"),
            ("p2", "color", "blue"),
            ("p2", "material", "wool"),
            ("p3", "color", "red"),
            ("p3", "color", "white"),
        ],
        [("p1", "color"), ("p2", "color"), ("p2", "material"), ("p3", "color")],
    )
    merge, rows = _write(fresh, run)
    assert sum(1 for r in rows if r[3] == "model") == 4
    assert merge.written == {"color": 3, "material": 1}  # p2's blue rewritten, p3's two; not p1's
    assert merge.products == {"color": 2, "material": 1}  # what the run report's coverage counts


def test_a_product_quarantined_for_its_image_loses_the_model_values_its_merchant_settles(
    spark: Any, fresh: Catalog, tmp_path: Path
) -> None:
    """PostgreSQL stages from the scores in Spark: the pairs a merchant's value settles are read
    from every scored row, as the lakehouse's (stages.flatten_scores), a product whose image was
    not read too; its values and scored pairs are not. Those of a product quarantined before
    scoring as a placeholder (p3: not in the scores) come from the driver, on either catalog."""
    import dataclasses

    import pyarrow.parquet as pq

    from catalog_enrichment.contracts import IMAGE_READABLE
    from catalog_enrichment.enrich.stages import run_write
    from tests.test_enrich import _decisions, _staged

    seed_merchant(
        fresh,
        _attribute_rows([("p2", "color", "blue", "model"), ("p2", "material", "silk", "model"),
                         ("p3", "color", "red", "model"), ("p3", "material", "wool", "model")]),
    )  # fmt: skip
    staged = _staged(
        [
            ("p1", None, ["material"], ["color"], [("material", "wool")]),
            ("p2", IMAGE_READABLE, ["material"], ["color"], [("material", "cotton")]),
        ]
    )
    (tmp_path / "staging" / "scores").mkdir(parents=True)
    pq.write_table(staged, tmp_path / "staging" / "scores" / "part-0.parquet")
    unscored = pa.table({"product_id": ["p3"], "attribute": ["color"], "settled": [True]})
    decisions = _decisions(staged)
    decisions = dataclasses.replace(
        decisions, pairs=pa.concat_tables([decisions.pairs, unscored]), unscored=unscored
    )
    run = run_write("r1", ModelVersion("tiny", "2"), T0, [], decisions, tmp_path / "staging")
    assert run.scores is not None
    _, rows = _write(fresh, run, spark)
    assert rows == [
        ("p1", "material", "wool", "model"), ("p2", "material", "silk", "model"),
        ("p3", "material", "wool", "model"),
    ]  # fmt: skip


def test_the_demo_seeds_a_merchant_s_attribute_names_as_the_taxonomy_s(
    fresh: Catalog, taxonomy: Taxonomy, tmp_path: Path
) -> None:
    """A merchant's " Color" is written as the taxonomy's color (contracts.merchant_key), where the
    run and the rollback look for it."""
    from catalog_enrichment.contracts import load_contract
    from catalog_enrichment.demo import _seed_catalog

    products = pa.Table.from_pylist(
        [{"product_id": "p1", "title": "t", "merchant_attributes": [(" Color", ["red"])], "updated_at": T0,
          "ingest_date": T0.date()}],
        schema=load_contract("products").arrow_schema(),
    )  # fmt: skip
    write_table(tmp_path / "incoming", products)
    cfg = fresh.cfg  # type: ignore[attr-defined]  (either kind keeps its config)
    _seed_catalog(cfg, fresh, tmp_path / "incoming", taxonomy.outputs.names)
    assert fresh.attribute_rows()["attribute"].to_pylist() == ["color"]
