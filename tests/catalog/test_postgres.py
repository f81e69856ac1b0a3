"""The PostgreSQL catalog's own concerns on a real throw-away server: the connection (from the
environment only; the password in no message), versioned migrations under a role that may not
create schemas, the products table's checks, staging tables, the rollback's merchant blankness,
the run lock's holder, and the throw-away server's own lifetime."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from catalog_enrichment.catalog import open_catalog
from catalog_enrichment.catalog.postgres import PG_DSN_ENV, PostgresCatalog, migrate
from catalog_enrichment.catalog.postgres.migrate import MIGRATIONS
from catalog_enrichment.config import CatalogConfig
from catalog_enrichment.errors import CatalogEnrichError, ConfigError

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


def test_the_connection_comes_from_the_environment_and_errors_never_show_the_password(
    pg_server: Any, pg_catalog_config: CatalogConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = open_catalog(pg_catalog_config)  # CATALOG_ENRICH_PG_DSN, set by the fixture
    assert catalog.read_reports() == []
    assert catalog.describe() == f"postgres 127.0.0.1:{pg_server.port}/catalog as catalog"
    assert pg_server.password not in catalog.describe()
    # libpq's own variables when the DSN is not set
    monkeypatch.delenv(PG_DSN_ENV)
    for key, value in {"PGHOST": "127.0.0.1", "PGPORT": str(pg_server.port), "PGDATABASE": "catalog",
                       "PGUSER": "catalog", "PGPASSWORD": pg_server.password}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    assert open_catalog(pg_catalog_config).read_reports() == []
    # a wrong password and a server that is not there: one line, no password
    wrong = pg_server.dsn().replace(pg_server.password, "not-the-password")
    with pytest.raises(CatalogEnrichError, match="password authentication failed") as failed:
        PostgresCatalog(pg_catalog_config, dsn=wrong).read_reports()
    assert "not-the-password" not in str(failed.value) and "\n" not in str(failed.value)
    gone = pg_server.dsn().replace(f"port={pg_server.port}", "port=1")
    with pytest.raises(
        CatalogEnrichError, match=r"cannot connect to postgres 127\.0\.0\.1:1/catalog as catalog"
    ):
        PostgresCatalog(pg_catalog_config, dsn=gone).read_reports()
    with pytest.raises(CatalogEnrichError, match="cannot connect") as garbled:
        PostgresCatalog(
            pg_catalog_config, dsn="host=127.0.0.1 port=1 password=secret nonsense"
        ).read_reports()
    assert "secret" not in str(garbled.value)
    with pytest.raises(ConfigError, match=r"catalog\.postgres\.products_table"):
        open_catalog(pg_catalog_config.model_copy(update={"products": "/some/path"}))


def test_migrations_are_applied_once_in_order(pg_catalog_config: CatalogConfig, tmp_path: Path) -> None:
    catalog = PostgresCatalog(pg_catalog_config)
    with catalog.connect() as conn:  # the first connection migrated the schema
        applied = conn.execute(
            f'SELECT version, name FROM "{catalog.schema}".schema_migrations ORDER BY version'
        ).fetchall()
        assert applied == [
            (1, "0001_catalog"),
            (2, "0002_reviews"),
            (3, "0003_embeddings"),
            (4, "0004_run_health"),
        ]
        assert migrate(conn, catalog.schema) == []  # nothing left to apply
        folder = tmp_path / "migrations"
        shutil.copytree(MIGRATIONS, folder)
        (folder / "0005_note.sql").write_text("ALTER TABLE {schema}.run_reports ADD COLUMN note text;\n")
        assert migrate(conn, catalog.schema, folder) == ["0005_note"]
        assert migrate(conn, catalog.schema, folder) == []
        columns = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND "
            "table_name = 'run_reports' AND column_name = 'note'",
            [catalog.schema],
        ).fetchall()
        assert columns == [("note",)]
        # a migration that fails leaves nothing of itself
        (folder / "0006_broken.sql").write_text("CREATE TABLE {schema}.half (a int);\nNOT SQL;\n")
        with pytest.raises(Exception, match="syntax error"):
            migrate(conn, catalog.schema, folder)
        half = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename = 'half'", [catalog.schema]
        ).fetchone()
        assert half == (0,)


def test_load_products_copies_a_lakehouse_table_into_the_database(
    pg_catalog_config: CatalogConfig, marketplace: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from catalog_enrichment.catalog.lakehouse import read_table
    from catalog_enrichment.catalog.products import list_partitions
    from catalog_enrichment.cli import main

    flags = [
        "--set",
        "catalog.kind=postgres",
        "--set",
        f"catalog.postgres.db_schema={pg_catalog_config.postgres.db_schema}",
    ]
    assert main(["load-products", str(marketplace.products), *flags]) == 0
    assert "loaded 2,400 products" in capsys.readouterr().out
    catalog = open_catalog(pg_catalog_config)
    assert catalog.list_partitions("ingest_date") == list_partitions(marketplace.products, "ingest_date")
    from psycopg import sql

    original = read_table(marketplace.products)
    with catalog.connect() as conn:  # every row, those without an id too
        count = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*catalog.products))
        assert conn.execute(count).fetchone()[0] == original.num_rows
    original = original.filter(pc.is_valid(original["product_id"]))
    loaded = catalog.products_of(original["product_id"].to_pylist())

    def rows(table: Any) -> list[tuple[Any, ...]]:  # a map's entries in any order (jsonb sorts keys)
        columns = (
            "product_id",
            "updated_at",
            "title",
            "description",
            "image",
            "merchant_attributes",
            "ingest_date",
        )
        out = []
        for r in table.select(list(columns)).to_pylist():
            merchant = r["merchant_attributes"]
            r["merchant_attributes"] = None if merchant is None else sorted(merchant)
            out.append(tuple(str(r[c]) for c in columns))
        return sorted(out)

    assert rows(loaded) == rows(original)
    # a few columns only (review sample reads categories and text this way)
    some = catalog.products_of(loaded["product_id"].to_pylist(), ["product_id", "category", "updated_at"])
    assert some.column_names == ["product_id", "category", "updated_at"]
    assert some.sort_by("product_id") == loaded.select(some.column_names).sort_by("product_id")
    ids = ["P00000003", "P00000007", "no-such-product"]  # the rows of a few products only
    few = catalog.products_of(ids, ["product_id", "title"])
    expected = loaded.filter(pc.is_in(loaded["product_id"], pa.array(ids))).select(["product_id", "title"])
    assert few.num_rows >= 2 and few.sort_by("product_id") == expected.sort_by("product_id")
    assert main(["load-products", str(marketplace.products)]) == 2  # the lakehouse catalog
    assert "add --set catalog.kind=postgres" in capsys.readouterr().err
    assert main(["load-products", "/nowhere", *flags]) == 2
    assert "no products table at /nowhere" in capsys.readouterr().err


def test_load_products_upserts_so_a_reload_changes_nothing(  # type: ignore[no-untyped-def]
    pg_catalog_config, incoming, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Appending again once doubled every product (the next run then quarantined them all as
    duplicated); the products of a load replace that id's rows, null ids and in-table duplicates
    (the incoming data's bad rows) included."""
    from catalog_enrichment.catalog.lakehouse import read_table, write_table
    from catalog_enrichment.cli import main

    source = read_table(incoming.products).slice(0, 400)
    write_table(tmp_path / "products", source)
    flags = ["--set", f"catalog.root={pg_catalog_config.root}", "--set", "catalog.kind=postgres"]
    flags += ["--set", f"catalog.postgres.db_schema={pg_catalog_config.postgres.db_schema}"]
    catalog = PostgresCatalog(pg_catalog_config)

    def rows() -> list[tuple[Any, ...]]:
        with catalog.connect() as conn:
            return sorted(
                conn.execute(
                    f"SELECT product_id, title, updated_at FROM {'.'.join(catalog.products)}"
                ).fetchall(),
                key=repr,
            )

    assert main(["load-products", str(tmp_path / "products"), *flags]) == 0
    first = rows()
    assert len(first) == 400 and "replacing 0 rows" in capsys.readouterr().out
    assert main(["load-products", str(tmp_path / "products"), *flags]) == 0
    assert rows() == first and "replacing 400 rows" in capsys.readouterr().out
    # a changed product, one whose id has one row (delta-rs lists a table's files in no fixed
    # order, so which rows are the first 400 varies): its row replaced, the others as they were
    ids = source.column("product_id").to_pylist()
    once = next(i for i, pid in enumerate(ids) if pid is not None and ids.count(pid) == 1)
    changed = source.slice(once, 1).set_column(
        source.schema.get_field_index("title"), "title", pa.array(["a new title"])
    )
    assert catalog.load_products(changed) == (1, 1)
    after = rows()
    assert len(after) == 400 and ("a new title" in {r[1] for r in after})


_OWNER = """
import sys, time
from catalog_enrichment.catalog.pgserver import LocalPostgres
server = LocalPostgres().start()
print(server.folder, server.port, flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # a process killed: not the fast tier
def test_a_throw_away_server_stops_when_its_owner_is_killed() -> None:
    # A test run or demo stopped part-way (SIGKILL: no finaliser runs) leaves no server behind:
    # the watchdog stops it and removes its folder within a few seconds.
    owner = subprocess.Popen([sys.executable, "-c", _OWNER], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        folder, port = owner.stdout.readline().split()
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
            pass  # it is up
    finally:
        owner.kill()
        owner.wait()
    deadline = time.monotonic() + 30
    while Path(folder).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(folder).exists()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", int(port)), timeout=5):
        pass


def _vectors(folder: Path, rows: list[tuple[str, str, int]]) -> str:
    """Staged store rows (encoder, product id, minute written) as the Parquet ``write_embeddings`` reads."""
    import pyarrow.parquet as pq

    from catalog_enrichment.catalog.embeddings import embeddings_schema

    folder.mkdir()
    table = pa.table(
        {
            "encoder": [e for e, _, _ in rows],
            "product_id": [p for _, p, _ in rows],
            "content": [f"c{m}" for _, _, m in rows],
            "embedding": [bytes([m]) * 8 for _, _, m in rows],
            "run_id": ["r"] * len(rows),
            "written_at": [dt.datetime(2026, 11, 1, 0, m, tzinfo=dt.UTC) for _, _, m in rows],
        }
    ).cast(embeddings_schema())
    pq.write_table(table, folder / "part-0.parquet")
    return str(folder)


def test_store_writes_side_by_side_each_land_and_a_key_staged_twice_is_written_once(
    pg_catalog_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training's store write takes no lock: one that runs while a run's write is copying must not
    take the run's staging table (both land), and a key staged twice (a copy task Spark ran again)
    is upserted once, the newest copy."""
    from catalog_enrichment.catalog.postgres import write

    catalog = PostgresCatalog(pg_catalog_config)
    encoder = "ab" * 16
    run = _vectors(tmp_path / "run", [(encoder, "p1", 1), (encoder, "p1", 2), (encoder, "p2", 1)])
    training = _vectors(tmp_path / "training", [(encoder, "p3", 1)])
    copy = write.copy_embeddings
    started: list[str] = []
    beside: list[int] = []

    def copy_then_the_other_write(conninfo, table, batches):  # type: ignore[no-untyped-def]
        n = copy(conninfo, table, batches)
        if not started:  # the run's rows are staged: the training's write starts and ends now
            started.append(table[1])
            beside.append(catalog.write_embeddings(training))
        return n

    monkeypatch.setattr(write, "copy_embeddings", copy_then_the_other_write)
    assert catalog.write_embeddings(run) == 2 and beside == [1]
    with catalog.connect() as conn:
        stored = conn.execute(
            f"SELECT product_id, content FROM {catalog.schema}.embeddings ORDER BY product_id"
        ).fetchall()
    assert stored == [("p1", "c2"), ("p2", "c1"), ("p3", "c1")]


def test_a_role_that_owns_its_schema_but_may_not_create_schemas_runs(
    pg_server: Any, pg_catalog_config: CatalogConfig
) -> None:
    """A DBA created the job's schema for its role, which may not create schemas in the database:
    ``CREATE SCHEMA IF NOT EXISTS`` checks that right before it looks, and failed every command."""
    import psycopg

    schema = pg_catalog_config.postgres.db_schema
    role, password = f"enrich_{schema}", "enrich-password"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:  # the server's superuser
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        admin.execute(f"CREATE SCHEMA {schema} AUTHORIZATION {role}")
        admin.execute(f'REVOKE CREATE ON DATABASE "{pg_server.database}" FROM PUBLIC')
    dsn = f"host=127.0.0.1 port={pg_server.port} dbname={pg_server.database} user={role} password={password}"
    catalog = PostgresCatalog(pg_catalog_config, dsn=dsn)
    assert catalog.read_reports() == []  # connected and migrated
    values = pa.table({"product_id": ["p1"], "attribute": ["color"], "value": ["red"], "confidence": [0.9],
                       "threshold": [0.5]})  # fmt: skip
    assert catalog.write(_run("r1", values, [("p1", "color")])).inserted == 1
    catalog.clear_staging()
    assert catalog.attribute_rows()["value"].to_pylist() == ["red"]
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("CREATE SCHEMA another_one")  # the role indeed may not create schemas


def _run(run_id: str, values: pa.Table, pairs: list[tuple[str, str]]) -> Any:
    """A run's write of ``values`` over ``pairs``, no quarantine rows."""
    from catalog_enrichment.catalog.base import RunWrite
    from catalog_enrichment.contracts import load_contract

    return RunWrite(
        run_id, "m", "1", dt.datetime(2026, 11, 2, tzinfo=dt.UTC), values,
        pa.table({"product_id": [p for p, _ in pairs], "attribute": [a for _, a in pairs]}),
        load_contract("quarantine").arrow_schema().empty_table(),
    )  # fmt: skip


def _products_table(catalog: PostgresCatalog, product_id_type: str = "text") -> None:
    """The contract's products table, empty, with ``product_id`` of that type and no index."""
    from catalog_enrichment.catalog.postgres.connection import _PG_TYPES
    from catalog_enrichment.contracts import load_contract

    columns = ", ".join(
        f"{f.name} {product_id_type if f.name == 'product_id' else _PG_TYPES[f.type][0]}"
        for f in load_contract("products").fields
    )
    with catalog.connect() as conn:
        conn.execute(f"CREATE TABLE {'.'.join(catalog.products)} ({columns})")


def test_a_blank_padded_product_id_column_is_refused_in_one_line(pg_catalog_config: CatalogConfig) -> None:
    """character(n) ids come back padded over JDBC and never equal the text ids of the job's tables."""
    from catalog_enrichment.errors import ContractError

    catalog = PostgresCatalog(pg_catalog_config)
    _products_table(catalog, "char(12)")
    with pytest.raises(
        ContractError, match=r"'product_id' is character\(n\).*make it text or varchar"
    ) as refused:
        catalog.products_of(["p1"])
    assert "\n" not in str(refused.value)


def test_a_products_table_without_a_product_id_index_is_warned_about_once(
    pg_catalog_config: CatalogConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """A rollback's merchant check looks up each restored product's latest row by product id."""
    import logging

    catalog = PostgresCatalog(pg_catalog_config)
    _products_table(catalog)
    caplog.set_level(logging.WARNING, logger="catalog_enrichment")
    catalog.products_of(["p1"])
    catalog.products_of(["p1"])
    warned = [
        r.getMessage() for r in caplog.records if "no index that leads with product_id" in r.getMessage()
    ]
    assert len(warned) == 1 and f"{'.'.join(catalog.products)} (product_id, updated_at)" in warned[0]
    caplog.clear()
    with catalog.connect() as conn:  # an index that does not lead with it is no help
        conn.execute(f"CREATE INDEX ON {'.'.join(catalog.products)} (updated_at, product_id)")
    PostgresCatalog(pg_catalog_config).products_of(["p1"])
    assert any("no index that leads with product_id" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with catalog.connect() as conn:
        conn.execute(f"CREATE INDEX ON {'.'.join(catalog.products)} (product_id, updated_at)")
    PostgresCatalog(pg_catalog_config).products_of(["p1"])
    assert not any("product_id" in r.getMessage() for r in caplog.records)


def test_a_run_s_clear_staging_leaves_a_store_write_s_staging_table_while_it_is_in_use(
    pg_catalog_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training's store write takes no run lock: a run that starts while it copies clears its own
    staging tables, not the store write's (which lands); a killed store write's table goes then."""
    from catalog_enrichment.catalog.postgres import write

    catalog = PostgresCatalog(pg_catalog_config)
    encoder = "ab" * 16
    staged = _vectors(tmp_path / "store", [(encoder, "p1", 1), (encoder, "p2", 1)])
    copy = write.copy_embeddings

    def copy_then_a_run_starts(conninfo, table, batches):  # type: ignore[no-untyped-def]
        n = copy(conninfo, table, batches)
        catalog.clear_staging()
        return n

    left = {
        "killed run": write._stage_name("r0"),
        "killed store write": write._stage_name("w0", write.STORE_STAGE),
    }
    with catalog.connect() as conn:
        for name in left.values():
            conn.execute(f"CREATE UNLOGGED TABLE {catalog.schema}.{name} (a int)")
    monkeypatch.setattr(write, "copy_embeddings", copy_then_a_run_starts)
    assert catalog.write_embeddings(staged) == 2
    with catalog.connect() as conn:
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s", [catalog.schema]
        ).fetchall()
    assert not {name for (name,) in tables} & set(left.values())


def test_the_rollback_s_merchant_blankness_is_the_run_s(pg_catalog_config: CatalogConfig) -> None:
    """A merchant entry of Unicode white space (U+00A0, U+3000, ...) is no value for the run and the
    lakehouse's rollback (contracts.merchant_value_given): the SQL test must say the same."""
    from catalog_enrichment.catalog.postgres.rollback import _NOT_BLANK
    from catalog_enrichment.contracts import load_contract, merchant_value_given

    catalog = PostgresCatalog(pg_catalog_config)
    with catalog.connect() as conn:  # every code point (no surrogates) is blank exactly when Python's is
        blank = conn.execute(
            "SELECT c FROM generate_series(1, 1114111) c WHERE c NOT BETWEEN 55296 AND 57343 "
            "AND NOT chr(c) ~ %s ORDER BY c",
            [_NOT_BLANK],
        ).fetchall()
    assert [c for (c,) in blank] == [c for c in range(1, 0x110000) if chr(c).isspace()]
    merchant = {"p1": ["\u00a0"], "p2": ["\u3000\u2007 "], "p3": ["\u3000red"]}
    assert [merchant_value_given(v) for v in merchant.values()] == [False, False, True]
    T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    catalog.load_products(
        pa.Table.from_pylist(
            [{"product_id": p, "title": "t", "merchant_attributes": [("color", v)], "updated_at": T0,
              "ingest_date": T0.date()} for p, v in merchant.items()],
            schema=load_contract("products").arrow_schema(),
        )
    )  # fmt: skip
    pairs = [(p, "color") for p in merchant]

    def colours(value: str) -> pa.Table:
        return pa.table({"product_id": list(merchant), "attribute": ["color"] * 3, "value": [value] * 3,
                         "confidence": [0.9] * 3, "threshold": [0.5] * 3})  # fmt: skip

    catalog.write(_run("r1", colours("red"), pairs))
    catalog.write(_run("r2", colours("blue"), pairs))
    catalog.rollback_runs(["r2"])
    rows = catalog.attribute_rows().to_pylist()
    assert sorted((r["product_id"], r["value"]) for r in rows) == [("p1", "red"), ("p2", "red")]


def test_a_run_that_lost_its_lock_commits_nothing(pg_catalog_config: CatalogConfig) -> None:
    """The run lock is a session lock on a connection idle for most of the run: ended (terminated,
    timed out, a failover), the lock is free for another run. The write and the rollback check it
    in their transaction and commit nothing without it."""
    catalog = PostgresCatalog(pg_catalog_config)
    values = pa.table({"product_id": ["p1"], "attribute": ["color"], "value": ["red"], "confidence": [0.9],
                       "threshold": [0.5]})  # fmt: skip
    with catalog.lock("r1", say=lambda _m: None):  # held: the write commits
        assert catalog.write(_run("r1", values, [("p1", "color")])).inserted == 1

    def lock_session_ended(owner: str) -> None:
        with catalog.connect() as conn:
            ended = conn.execute(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE application_name = %s",
                [f"catalog-enrichment lock {catalog.schema}: {owner}"],
            ).fetchall()
        assert ended == [(True,)]

    def state() -> list[Any]:
        with catalog.connect() as conn:
            runs = conn.execute(f"SELECT run_id, operation, rolled_back_at FROM {catalog.schema}.runs")
            return [catalog.attribute_rows().to_pylist(), runs.fetchall()]

    before = state()
    blue = pc.replace_substring(values["value"], "red", "blue")
    lost = r"lost the catalog lock.*nothing was committed; run again"
    with catalog.lock("r2", say=lambda _m: None):
        lock_session_ended("r2")
        with (
            PostgresCatalog(pg_catalog_config).lock("another run", say=lambda _m: None),  # it is free
            pytest.raises(CatalogEnrichError, match=lost),
        ):
            catalog.write(_run("r2", values.set_column(2, "value", blue), [("p1", "color")]))
    with catalog.lock("rollback", say=lambda _m: None):
        lock_session_ended("rollback")
        with pytest.raises(CatalogEnrichError, match=lost):
            catalog.rollback_runs(["r1"])
    assert state() == before


def test_merchant_names_match_the_taxonomy_s_as_merchant_key_in_the_write_and_the_rollback(
    pg_catalog_config: CatalogConfig,
) -> None:
    """A merchant's " Color" row in the attribute table, " COLOR" in the products table and
    "Color_Family" (linked to color) hold the taxonomy's color as the run's decision and the
    lakehouse do (contracts.merchant_key): the write gives them no model value, nor does the
    rollback give one back. Their temporary tables leave a user's tables of the same names alone."""
    import dataclasses

    from catalog_enrichment.catalog.attributes import attributes_schema
    from catalog_enrichment.contracts import load_contract, load_taxonomy

    catalog = PostgresCatalog(pg_catalog_config)
    T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    ids = ["p1", "p2", "p3", "p4"]
    catalog.load_products(
        pa.Table.from_pylist(
            [{"product_id": p, "title": "t", "updated_at": T0, "ingest_date": T0.date()} for p in ids],
            schema=load_contract("products").arrow_schema(),
        )
    )
    linked = load_taxonomy().held_together()
    with catalog.connect() as conn:  # a user's own tables, named as the write's and rollback's temporary ones
        conn.execute("CREATE TABLE public.holders (x int); CREATE TABLE public.restore (x int)")

    def colours(value: str, products: list[str]) -> pa.Table:
        n = len(products)
        return pa.table({"product_id": products, "attribute": ["color"] * n, "value": [value] * n,
                         "confidence": [0.9] * n, "threshold": [0.5] * n})  # fmt: skip

    def merchant(product: str, attribute: str) -> None:
        row = {"product_id": product, "attribute": attribute, "value": "x", "source": "merchant",
               "written_at": T0}  # fmt: skip
        catalog.add_merchant_values(pa.Table.from_pylist([row], schema=attributes_schema()))

    def write(run_id: str, value: str) -> Any:
        run = _run(run_id, colours(value, ids), [(p, "color") for p in ids])
        return catalog.write(dataclasses.replace(run, linked=linked))

    def model_rows() -> list[tuple[str, str]]:
        rows = catalog.attribute_rows().to_pylist()
        return sorted((r["product_id"], r["value"]) for r in rows if r["source"] == "model")

    merchant("p1", " Color")
    assert write("r1", "red").written == {"color": 3}
    assert model_rows() == [("p2", "red"), ("p3", "red"), ("p4", "red")]
    write("r2", "blue")
    # after r2: p2's merchant gives " COLOR " in the products table, p3's a colour family row
    with catalog.connect() as conn:
        conn.execute(
            f"UPDATE {'.'.join(catalog.products)} SET merchant_attributes = %s::jsonb WHERE product_id = %s",
            ['{" COLOR ": ["navy"]}', "p2"],
        )
    merchant("p3", "Color_Family")
    catalog.rollback_runs(["r2"], linked)
    assert model_rows() == [("p4", "red")]
    with catalog.connect() as conn:
        kept = conn.execute("SELECT to_regclass('public.holders'), to_regclass('public.restore')").fetchone()
    assert kept is not None and all(kept)


def test_a_merchant_s_table_named_like_a_stage_outlives_the_cleanup(pg_catalog_config: CatalogConfig) -> None:
    """Every run's cleanup drops the staging tables of killed runs: only the names the job gives
    them, never a table of the schema whose name merely starts the same way."""
    from catalog_enrichment.catalog.postgres import write

    postgres = pg_catalog_config.postgres.model_copy(update={"products_table": "stage_products"})
    mine = pg_catalog_config.model_copy(update={"postgres": postgres})
    catalog = PostgresCatalog(mine)
    _products_table(catalog)
    left = [write._stage_name("r0"), write._stage_name("w0", write.STORE_STAGE)]
    theirs = ["embeddings_stage_old", "stage_" + "a" * 24 + "_copy"]
    with catalog.connect() as conn:
        for name in left + theirs:
            conn.execute(f"CREATE TABLE {catalog.schema}.{name} (a int)")
    catalog.clear_staging()
    with catalog.connect() as conn:
        tables = {
            name
            for (name,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", [catalog.schema]
            ).fetchall()
        }
    assert not set(left) & tables
    assert {"stage_products", *theirs} <= tables


def test_the_server_s_date_style_and_idle_timeout_do_not_reach_the_job(
    pg_server: Any, pg_catalog_config: CatalogConfig
) -> None:
    """A database set to another DateStyle still lists its partitions and reads its reports; one
    that ends idle sessions does not end the run lock's session, which idles the whole run."""
    catalog = PostgresCatalog(pg_catalog_config)
    _products_table(catalog)
    with catalog.connect() as conn:
        conn.execute(
            f"INSERT INTO {catalog.products_name()} (product_id, ingest_date) VALUES ('p1', '2026-01-05')"
        )
        conn.execute(f"ALTER DATABASE {pg_server.database} SET DateStyle = 'SQL, DMY'")
        conn.execute(f"ALTER DATABASE {pg_server.database} SET idle_session_timeout = '1s'")
    try:
        later = PostgresCatalog(pg_catalog_config)  # new sessions take the database's settings
        assert later.list_partitions("ingest_date") == ["2026-01-05"]
        assert later.read_reports() == []
        values = pa.table({"product_id": ["p1"], "attribute": ["color"], "value": ["red"],
                           "confidence": [0.9], "threshold": [0.5]})  # fmt: skip
        with later.lock("run r1", print):
            time.sleep(2)  # the run scores while its lock's session idles
            assert later.write(_run("r1", values, [("p1", "color")])).inserted == 1
    finally:
        with catalog.connect() as conn:
            conn.execute(f"ALTER DATABASE {pg_server.database} RESET DateStyle")
            conn.execute(f"ALTER DATABASE {pg_server.database} RESET idle_session_timeout")


def test_a_json_merchant_column_holding_a_nul_escape_does_not_fail_the_rollback(
    pg_catalog_config: CatalogConfig,
) -> None:
    """``json`` keeps the escape ``\\u0000``, which the cast to ``jsonb`` the rollback's merchant
    check makes refuses: one such row failed the whole rollback. Its value still holds the pair."""
    from catalog_enrichment.catalog.postgres.connection import _PG_TYPES
    from catalog_enrichment.contracts import load_contract

    catalog = PostgresCatalog(pg_catalog_config)
    columns = ", ".join(
        f"{f.name} {'json' if f.name == 'merchant_attributes' else _PG_TYPES[f.type][0]}"
        for f in load_contract("products").fields
    )
    with catalog.connect() as conn:
        conn.execute(f"CREATE TABLE {catalog.products_name()} ({columns})")
        conn.execute(
            f"INSERT INTO {catalog.products_name()} (product_id, merchant_attributes, updated_at) VALUES "
            """('p1', '{"color": ["r\\u0000ed"]}', now()), ('p2', '{"material": ["wool"]}', now())"""
        )
    pairs = [("p1", "color"), ("p2", "color")]
    for run_id, value in (("r1", "red"), ("r2", "blue")):
        values = pa.table({"product_id": ["p1", "p2"], "attribute": ["color"] * 2, "value": [value] * 2,
                           "confidence": [0.9] * 2, "threshold": [0.5] * 2})  # fmt: skip
        catalog.write(_run(run_id, values, pairs))
    catalog.rollback_runs(["r2"])
    rows = {(r["product_id"], r["attribute"]): r["value"] for r in catalog.attribute_rows().to_pylist()}
    assert rows == {("p2", "color"): "red"}  # p1's colour is the merchant's: no model value back


def test_the_jdbc_read_and_the_tasks_copy_connect_as_the_job_does(
    pg_server: Any, pg_catalog_config: CatalogConfig, tmp_path: Path
) -> None:
    """A server reached over TLS with the job's own CA (and client certificate) is reached so by
    the processes that have not the DSN: the Spark tasks' COPY and the JDBC read."""
    from psycopg.conninfo import conninfo_to_dict

    ca, cert, key = (tmp_path / name for name in ("ca.pem", "client.pem", "client.pk8"))
    dsn = f"{pg_server.dsn()} sslmode=allow sslrootcert={ca} sslcert={cert} sslkey={key}"
    catalog = PostgresCatalog(pg_catalog_config, dsn=dsn)  # the test server has no TLS: allowed
    tls = {"sslmode": "allow", "sslrootcert": str(ca), "sslcert": str(cert), "sslkey": str(key)}
    conninfo, _ = catalog.conninfo()
    assert tls.items() <= conninfo_to_dict(conninfo).items()
    with catalog.connect() as conn:
        options = catalog._jdbc_options(conn, "t")
    assert tls.items() <= options.items()
    assert options["url"] == f"jdbc:postgresql://127.0.0.1:{pg_server.port}/{pg_server.database}"
