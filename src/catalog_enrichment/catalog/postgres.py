"""The PostgreSQL catalog (``catalog.kind: postgres``): the operational catalog of a marketplace.

* **Connection** only from the environment: ``CATALOG_ENRICH_PG_DSN`` (libpq keywords or a URI),
  else libpq's ``PG*`` variables; never the command line, the config file or a log line (messages
  name host, port, database and user, never the password). Every value travels as a query
  parameter; identifiers come from the config, checked against ``[a-z_][a-z0-9_]*``, and are quoted.
* **Schema**: the job creates and migrates its own tables (attributes, quarantine, run reports, the
  run log) in ``catalog.postgres.db_schema`` from the versioned SQL files in ``migrations/``, each
  applied once, in order, in one transaction, under an advisory lock.
* **Read**: Spark's JDBC source, split into ``read_partitions`` ranges of ``partition_column``
  (bounds read for each run), ``fetch_size`` rows per round trip; the partition filter and the
  incremental window are pushed into the query.
* **Write**: each Spark partition COPYs its values (and the pairs it scored) into a per-run staging
  table (the tasks get a connection string without the password: libpq on the executor reads it from
  ``PGPASSWORD`` / ``PGPASSFILE``, which the job sets from the DSN with
  ``spark.executorEnv.PGPASSWORD``, :mod:`catalog_enrichment.runtime`); then one transaction records
  the run in the run log, keeps the model values it replaces (what a rollback restores), deletes and
  upserts (``INSERT ... ON CONFLICT ... DO UPDATE`` only where the row is the model's), adds the
  quarantine rows and commits; the staging table is dropped. A killed process before the commit
  leaves the tables as they were; a committed run id is never merged again.
* **Lock**: a session advisory lock held by one connection for the whole run; the server releases
  it when the connection ends, so a killed run never leaves the catalog locked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.catalog.base import (
    KeyedTable,
    MergeResult,
    RollbackResult,
    RunWrite,
    Say,
    empty_folder,
    fault_point,
    keyed_key,
    keyed_schema,
)
from catalog_enrichment.catalog.embeddings import check_fingerprint, embeddings_schema, keep_one_per_product
from catalog_enrichment.catalog.lock import CatalogBusy
from catalog_enrichment.catalog.products import Partition, changed_since
from catalog_enrichment.catalog.reports import MAPS, RunReport
from catalog_enrichment.config import CatalogConfig
from catalog_enrichment.contracts import UNREADABLE, Contract, load_contract
from catalog_enrichment.errors import CatalogEnrichError, ContractError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["PG_DSN_ENV", "PostgresCatalog", "migrate"]

PG_DSN_ENV = "CATALOG_ENRICH_PG_DSN"
MIGRATIONS = Path(__file__).with_name("migrations")
_STAGE_COLUMNS = ("product_id", "attribute", "value", "confidence", "threshold")
# Per contract type: the PostgreSQL type a products table is created with (tests, the demo), and
# the column types it is read from
_PG_TYPES = {
    "string": ("text", {"text", "character varying", "character"}),
    "binary": ("bytea", {"bytea"}),
    "timestamp": ("timestamptz", {"timestamp with time zone", "timestamp without time zone"}),
    "date": ("date", {"date"}),
    "map<string, list<string>>": ("jsonb", {"jsonb", "json"}),
}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def migrate(conn: Any, schema: str) -> list[str]:
    """Apply the migrations ``schema`` has not had yet, in order; the names applied."""
    from psycopg import sql

    applied: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('catalog_enrichment.migrate'))")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        table = sql.Identifier(schema, "schema_migrations")
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (version integer PRIMARY KEY, name text NOT NULL, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(table)
        )
        done = {v for (v,) in conn.execute(sql.SQL("SELECT version FROM {}").format(table))}
        for file in sorted(MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")):
            version = int(file.name[:4])
            if version in done:
                continue
            conn.execute(sql.SQL(file.read_text()).format(schema=sql.Identifier(schema)))
            conn.execute(
                sql.SQL("INSERT INTO {} (version, name) VALUES (%s, %s)").format(table), [version, file.stem]
            )
            applied.append(file.stem)
    return applied


def _stage_name(run_id: str) -> str:
    # run ids may be 200 characters of . : = + -; PostgreSQL names stop at 63 bytes
    return "stage_" + hashlib.sha256(run_id.encode()).hexdigest()[:24]


def copy_batches(
    conninfo: str, table: tuple[str, str], batches: Iterable[pa.RecordBatch], *, password: str | None = None
) -> int:
    """COPY Arrow batches of the staging columns into ``table`` (schema, name) as CSV; rows copied.
    Without ``password`` libpq finds it in this process's environment (``PGPASSWORD``, ``PGPASSFILE``)."""
    import psycopg
    import pyarrow.csv as pacsv
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    options = pacsv.WriteOptions(include_header=False, quoting_style="needed")
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
        sql.Identifier(*table), sql.SQL(", ").join(map(sql.Identifier, _STAGE_COLUMNS))
    )
    rows = 0
    with (
        psycopg.connect(
            make_conninfo(conninfo, password=password), application_name="catalog-enrichment stage"
        ) as conn,
        conn.cursor().copy(statement) as copy,
    ):
        for batch in batches:
            if batch.num_rows == 0:
                continue
            buffer = io.BytesIO()  # strings quoted, nulls empty: NULL to COPY's csv format
            pacsv.write_csv(batch.select(list(_STAGE_COLUMNS)), buffer, options)
            copy.write(buffer.getbuffer())
            rows += batch.num_rows
    return rows


def _copier(
    conninfo: str,
    table: tuple[str, str],
    copy: Callable[[str, tuple[str, str], Iterable[pa.RecordBatch]], int] = copy_batches,
) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A ``mapInArrow`` function: ``copy`` each Spark partition's batches into ``table``; rows copied."""

    def copy_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        yield pa.record_batch({"rows": pa.array([copy(conninfo, table, batches)], pa.int64())})

    return copy_partition


class PostgresCatalog:
    """The catalog in a PostgreSQL database (see the module docstring)."""

    kind = "postgres"
    reads_snapshot = False  # each Spark action runs the JDBC query again

    def __init__(self, cfg: CatalogConfig, *, products: str | None = None, dsn: str | None = None) -> None:
        import re

        from catalog_enrichment.config import PG_IDENTIFIER

        self.cfg = cfg
        self.pg = cfg.postgres
        self.schema = self.pg.db_schema
        table = str(products or self.pg.products_table)
        parts = table.split(".")
        if len(parts) > 2 or not all(re.fullmatch(PG_IDENTIFIER, p) for p in parts):
            raise CatalogEnrichError(f"products table {table!r} is not a [schema.]table name")
        self.products = (parts[0], parts[1]) if len(parts) == 2 else (self.schema, parts[0])
        self._dsn = os.environ.get(PG_DSN_ENV, "") if dsn is None else dsn
        self._migrated = False

    # -- connections --------------------------------------------------------------------------

    def describe(self) -> str:
        """``postgres host:port/database as user`` from the DSN and libpq's variables (no password)."""
        from psycopg.conninfo import conninfo_to_dict

        try:
            given = conninfo_to_dict(self._dsn)
        except Exception:
            return f"postgres (the {PG_DSN_ENV} connection string does not parse)"

        def part(key: str, env: str, default: str) -> str:
            return str(given.get(key) or os.environ.get(env) or default)

        return (
            f"postgres {part('host', 'PGHOST', 'localhost')}:{part('port', 'PGPORT', '5432')}/"
            f"{part('dbname', 'PGDATABASE', '(default)')} as {part('user', 'PGUSER', '(default)')}"
        )

    def connect(self) -> Any:
        """An autocommit connection (``conn.transaction()`` blocks are the transactions); the job's
        tables are migrated first, once per process.

        Raises:
            CatalogEnrichError: the server cannot be reached or refuses the login (one line).
        """
        import psycopg

        try:
            conn = psycopg.connect(
                self._dsn, autocommit=True, connect_timeout=10, application_name="catalog-enrichment"
            )
        except (psycopg.Error, ValueError) as exc:
            raise CatalogEnrichError(f"cannot connect to {self.describe()}: {_one_line(exc)}") from None
        if not self._migrated:
            try:
                migrate(conn, self.schema)
            except psycopg.Error as exc:
                conn.close()
                raise CatalogEnrichError(
                    f"cannot create or migrate the schema {self.schema} in {self.describe()}: "
                    f"{_one_line(exc)}"
                ) from None
            self._migrated = True
        return conn  # closed by ``with``

    def _name(self, table: str) -> Any:
        from psycopg import sql

        return sql.Identifier(self.schema, table)

    def _sql(self, text: str, **tables: str) -> Any:
        """``text`` with ``{name}`` placeholders filled with the schema-qualified tables."""
        from psycopg import sql

        return sql.SQL(text).format(**{k: self._name(v) for k, v in tables.items()})

    def conninfo(self) -> tuple[str, str | None]:
        """The effective connection string without the password, for processes that have not the
        DSN (the Spark tasks that COPY), and the password apart (for this process only)."""
        from psycopg.conninfo import make_conninfo

        with self.connect() as conn:
            info = conn.info
            extra = {k: v for k, v in info.get_parameters().items() if k in ("sslmode", "sslrootcert")}
            return (
                make_conninfo(host=info.host, port=info.port, dbname=info.dbname, user=info.user, **extra),
                info.password or None,
            )

    # -- lock and staging -------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, owner: str, say: Say) -> Iterator[None]:
        wait = self.cfg.lock_wait_seconds
        conn = self.connect()
        try:
            key = f"catalog_enrichment:{self.schema}"
            prefix = f"catalog-enrichment lock {self.schema}: "  # the holder's application_name
            deadline, waiting = time.monotonic() + wait, False
            while not conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [key]).fetchone()[0]:
                holder = self._holder(conn, prefix)
                if time.monotonic() >= deadline:
                    raise CatalogBusy(
                        f"another run holds the catalog {self.describe()} schema {self.schema} ({holder}); "
                        "this one wrote nothing. Run it again when that run has finished, or let it wait "
                        f"longer (catalog.lock_wait_seconds, now {wait:g})"
                    )
                if not waiting:
                    say(f"  waiting up to {wait:g}s for the catalog lock, held by {holder}")
                    waiting = True
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            conn.execute("SELECT set_config('application_name', %s, false)", [(prefix + owner)[:63]])
            yield
        finally:
            conn.close()  # ending the session releases the lock

    @staticmethod
    def _holder(conn: Any, prefix: str) -> str:
        row = conn.execute(
            "SELECT application_name, pid, client_addr::text, backend_start FROM pg_stat_activity "
            "WHERE starts_with(application_name, %s) AND pid <> pg_backend_pid() LIMIT 1",
            [prefix],
        ).fetchone()
        if row is None:
            return "unknown holder"
        name, pid, addr, since = row
        return (
            f"{name.removeprefix(prefix)}, server pid {pid} from {addr or 'local'} "
            f"since {since.astimezone(dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
        )

    def staging_dir(self, run_id: str) -> Path:
        return Path(self.cfg.root) / "_staging" / run_id

    def clear_staging(self) -> None:
        """Drop the staging tables and remove the staged scores of killed runs (lock held)."""
        from psycopg import sql

        empty_folder(Path(self.cfg.root) / "_staging")
        with self.connect() as conn, conn.transaction():
            names = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename LIKE 'stage\\_%%'",
                [self.schema],
            ).fetchall()
            for (name,) in names:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self._name(name)))

    # -- products ---------------------------------------------------------------------------

    def _columns(self, conn: Any) -> dict[str, str]:
        rows = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = %s",
            list(self.products),
        ).fetchall()
        return {name: kind for name, kind in rows}

    def _check_products(self, conn: Any, contract: Contract) -> dict[str, str]:
        """The products table's columns and their types, checked against the contract."""
        where = f"{'.'.join(self.products)} in {self.describe()}"
        columns = self._columns(conn)
        if not columns:
            raise ContractError(f"no products table {where}")
        missing = contract.missing_columns(list(columns))
        if missing:
            raise ContractError(
                f"products table {where} lacks contract column(s) {missing} (see schemas/products.yaml)"
            )
        for spec in contract.fields:
            accepted = _PG_TYPES[spec.type][1]
            if columns[spec.name] not in accepted:
                raise ContractError(
                    f"products column {spec.name!r} is {columns[spec.name]} in {where}, but the contract "
                    f"says {spec.type} (schemas/products.yaml): make it {' or '.join(sorted(accepted))}"
                )
        return columns

    def read_products(
        self,
        spark: SparkSession,
        contract: Contract,
        *,
        partition: Partition | None = None,
        since: dt.datetime | None = None,
        retry: Sequence[str] = (),
    ) -> DataFrame:
        from psycopg import sql
        from pyspark.sql import functions as F

        conditions: list[Any] = []
        params: list[Any] = []
        if partition is not None:
            conditions.append(sql.SQL("{} = %s").format(sql.Identifier(partition.column)))
            params.append(partition.value)
        if since is not None:
            conditions.append(sql.SQL("(updated_at > %s OR product_id = ANY(%s))"))
            params.extend([since, list(retry)])
        where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
        column = self.pg.partition_column
        with self.connect() as conn:
            if column not in self._check_products(conn, contract):
                raise ContractError(
                    f"catalog.postgres.partition_column {column!r} is not a column of the products table"
                )
            low, high = conn.execute(
                sql.SQL("SELECT min({c}), max({c}) FROM {t}").format(
                    c=sql.Identifier(column), t=sql.Identifier(*self.products)
                )
                + where,
                params,
            ).fetchone()
            options = self._jdbc_options(conn, ".".join(f'"{p}"' for p in self.products))
        if low is not None and self.pg.read_partitions > 1 and low != high:
            options.update(
                partitionColumn=column,
                lowerBound=_bound(low),
                upperBound=_bound(high),
                numPartitions=str(self.pg.read_partitions),
            )
        schema = contract.spark_schema(enforce_nullability=False)
        df = spark.read.format("jdbc").options(**options).load()
        columns, unreadable = [], []
        for f in schema.fields:
            if f.name == "merchant_attributes":  # jsonb -> the contract's map; what does not fit is kept
                text = F.col(f.name)
                parsed = F.from_json(text, f.dataType)  # type: ignore[arg-type]
                columns.append(parsed.alias(f.name))
                unreadable.append(
                    F.when(text.isNotNull() & parsed.isNull(), text).alias(UNREADABLE.format(f.name))
                )
            else:
                columns.append(F.col(f.name).cast(f.dataType).alias(f.name))
        df = df.select(*columns, *unreadable)
        if partition is not None:
            df = df.where(
                F.col(partition.column) == F.lit(partition.value).cast(schema[partition.column].dataType)
            )
        if since is not None:
            df = df.where(changed_since(since, retry))
        return df

    def _jdbc_options(self, conn: Any, dbtable: str) -> dict[str, str]:
        """Spark JDBC reader options for ``dbtable`` (a table or a parenthesised query) over ``conn``'s
        server and login."""
        info = conn.info
        if info.host.startswith("/"):
            raise CatalogEnrichError(
                f"{self.describe()}: Spark's JDBC reader needs a TCP host, not the socket folder {info.host}"
            )
        options = {
            "url": f"jdbc:postgresql://{info.host}:{info.port}/{info.dbname}",
            "driver": "org.postgresql.Driver",
            "user": info.user,
            "password": info.password or "",
            "dbtable": dbtable,
            "fetchsize": str(self.pg.fetch_size),
            # Spark writes timestamp literals in its session time zone (UTC, runtime.py)
            "sessionInitStatement": "SET TIME ZONE 'UTC'",
            "applicationName": "catalog-enrichment read",
        }
        ssl = info.get_parameters().get("sslmode")
        if ssl:
            options["sslmode"] = ssl
        return options

    def image_roots(self) -> list[Path]:
        return []

    def list_partitions(self, column: str) -> list[str]:
        from psycopg import sql

        with self.connect() as conn:
            self._check_products(conn, load_contract("products"))
            rows = conn.execute(
                sql.SQL("SELECT DISTINCT {c}::text FROM {t} WHERE {c} IS NOT NULL ORDER BY 1").format(
                    c=sql.Identifier(column), t=sql.Identifier(*self.products)
                )
            ).fetchall()
        return [value for (value,) in rows]

    def load_products(self, products: pa.Table) -> tuple[int, int]:
        """Create the products table when there is none (the contract's columns) and upsert
        ``products`` into it by product id (the demo, the tests): in one transaction, the rows of
        every product id it holds (a null id included) replace that id's rows, so loading the same
        table again changes nothing. Returns (rows loaded, rows they replaced)."""
        from psycopg import sql
        from psycopg.types.json import Jsonb

        contract = load_contract("products")
        table = sql.Identifier(*self.products)
        columns = [f.name for f in contract.fields]
        with self.connect() as conn, conn.transaction():
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.products[0])))
            ddl = sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(f.name), sql.SQL(_PG_TYPES[f.type][0]))
                for f in contract.fields
            )
            conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(table, ddl))
            conn.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (updated_at)").format(
                    sql.Identifier(f"{self.products[1]}_updated_at"), table
                )
            )
            conn.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (product_id)").format(
                    sql.Identifier(f"{self.products[1]}_product_id"), table
                )
            )
            conn.execute(sql.SQL("CREATE TEMP TABLE loading (LIKE {}) ON COMMIT DROP").format(table))
            names = sql.SQL(", ").join(map(sql.Identifier, columns))
            with conn.cursor().copy(sql.SQL("COPY loading ({}) FROM STDIN").format(names)) as copy:
                for row in products.select(columns).to_pylist():
                    merchant = row["merchant_attributes"]
                    row["merchant_attributes"] = None if merchant is None else Jsonb(dict(merchant))
                    copy.write_row([row[c] for c in columns])
            replaced = conn.execute(
                sql.SQL(
                    "DELETE FROM {t} p WHERE p.product_id IN (SELECT product_id FROM loading) "
                    "OR (p.product_id IS NULL AND EXISTS (SELECT 1 FROM loading WHERE product_id IS NULL))"
                ).format(t=table)
            ).rowcount
            conn.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM loading").format(table, names, names))
        return products.num_rows, replaced

    # -- run reports ------------------------------------------------------------------------

    def read_reports(self) -> list[RunReport]:
        with self.connect() as conn:
            cursor = conn.execute(self._sql("SELECT * FROM {t}", t="run_reports"))
            names = [d.name for d in cursor.description]
            reports = [RunReport.from_row(dict(zip(names, row, strict=True))) for row in cursor]
        return sorted(reports, key=lambda r: r.started_at)

    def upsert_report(self, report: RunReport) -> None:
        from psycopg import sql
        from psycopg.types.json import Jsonb

        row = report.to_row()
        row.update({k: Jsonb(row[k]) for k in MAPS})
        names = list(row)
        statement = sql.SQL(
            "INSERT INTO {t} ({cols}) VALUES ({vals}) ON CONFLICT (run_id) DO UPDATE SET {sets}"
        ).format(
            t=self._name("run_reports"),
            cols=sql.SQL(", ").join(map(sql.Identifier, names)),
            vals=sql.SQL(", ").join(sql.Placeholder() * len(names)),
            sets=sql.SQL(", ").join(
                sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(n)) for n in names[1:]
            ),
        )
        with self.connect() as conn, conn.transaction():
            conn.execute(statement, [row[n] for n in names])

    def set_report_status(self, run_id: str, status: str) -> None:
        with self.connect() as conn, conn.transaction():
            conn.execute(
                self._sql("UPDATE {t} SET status = %s WHERE run_id = %s", t="run_reports"), [status, run_id]
            )

    # -- the write --------------------------------------------------------------------------

    def _committed(self, conn: Any, run_id: str) -> int | None:
        row = conn.execute(
            self._sql("SELECT seq FROM {t} WHERE run_id = %s AND operation = 'enrich'", t="runs"), [run_id]
        ).fetchone()
        return None if row is None else int(row[0])

    def write(self, run: RunWrite, spark: SparkSession | None = None) -> MergeResult:
        """Stage (COPY, from every Spark partition when ``spark`` and ``run.scores`` are given), then
        merge in one transaction with the quarantine rows; see the module docstring."""
        stage = _stage_name(run.run_id)
        with self.connect() as conn:
            committed = self._committed(conn, run.run_id)
            if committed is not None:
                return MergeResult(committed, already_committed=True)
            with conn.transaction():
                conn.execute(self._sql("DROP TABLE IF EXISTS {s}", s=stage))
                conn.execute(
                    self._sql(
                        "CREATE UNLOGGED TABLE {s} (product_id text NOT NULL, attribute text NOT NULL, "
                        "value text, "
                        "confidence double precision, threshold double precision)",
                        s=stage,
                    )
                )
        self._stage(run, stage, spark)
        fault_point("after_stage")
        with self.connect() as conn:
            try:
                with conn.transaction():
                    result = self._merge(conn, run, stage)
                    fault_point("during_merge")
            finally:
                with conn.transaction():
                    conn.execute(self._sql("DROP TABLE IF EXISTS {s}", s=stage))
        fault_point("after_merge")
        fault_point("after_quarantine")
        return result

    def _stage(self, run: RunWrite, stage: str, spark: SparkSession | None) -> int:
        (conninfo, password), table = self.conninfo(), (self.schema, stage)
        if spark is None or run.scores is None:
            pairs = run.pairs.select(["product_id", "attribute"])
            none = pa.nulls(pairs.num_rows)
            rows = pa.concat_tables(
                [
                    run.values.select(list(_STAGE_COLUMNS)).cast(_stage_schema()),
                    pa.table(
                        {
                            **{c: pairs[c] for c in pairs.column_names},
                            "value": none,
                            "confidence": none,
                            "threshold": none,
                        }
                    ).cast(_stage_schema()),
                ]
            )
            return copy_batches(conninfo, table, rows.to_batches(max_chunksize=50_000), password=password)
        from pyspark.sql import functions as F

        scores = spark.read.parquet(run.scores).where(F.col("image_error").isNull())
        values = scores.select("product_id", F.explode("values").alias("v")).select(
            "product_id", "v.attribute", "v.value", "v.confidence", "v.threshold"
        )
        pairs = scores.select("product_id", F.explode("scored").alias("attribute")).select(
            "product_id",
            "attribute",
            F.lit(None).cast("string").alias("value"),
            F.lit(None).cast("double").alias("confidence"),
            F.lit(None).cast("double").alias("threshold"),
        )
        # the closure holds no password: the executor's libpq reads it from its environment
        return _copied(values.unionByName(pairs).mapInArrow(_copier(conninfo, table), "rows long"))

    def _serialize(self, conn: Any) -> None:
        """Within a transaction: wait for any other write or rollback of this catalog to commit
        (each statement after it sees theirs), even from a process that does not hold the run lock."""
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))", [f"catalog_enrichment.write:{self.schema}"]
        )

    def _merge(self, conn: Any, run: RunWrite, stage: str) -> MergeResult:
        self._serialize(conn)
        seq_row = conn.execute(
            self._sql(
                "INSERT INTO {runs} (run_id, operation, model_name, model_version) VALUES (%s, 'enrich', "
                "%s, %s) "
                "ON CONFLICT (run_id, operation) DO NOTHING RETURNING seq",
                runs="runs",
            ),
            [run.run_id, run.model_name, run.model_version],
        ).fetchone()
        if seq_row is None:  # committed by a process that got here first
            return MergeResult(self._committed(conn, run.run_id), already_committed=True)
        seq = int(seq_row[0])
        # the scored pairs without a merchant value, and the new values of those pairs
        conn.execute(
            self._sql(
                "CREATE TEMP TABLE scored ON COMMIT DROP AS SELECT DISTINCT s.product_id, s.attribute FROM "
                "{s} s "
                "WHERE NOT EXISTS (SELECT 1 FROM {a} a WHERE a.product_id = s.product_id AND "
                "a.attribute = s.attribute AND a.source = 'merchant')",
                s=stage,
                a="attributes",
            )
        )
        conn.execute("ALTER TABLE scored ADD PRIMARY KEY (product_id, attribute)")
        all_pairs = conn.execute(
            self._sql("SELECT count(*) FROM (SELECT DISTINCT product_id, attribute FROM {s}) p", s=stage)
        ).fetchone()[0]
        kept = conn.execute("SELECT count(*) FROM scored").fetchone()[0]
        conn.execute(
            self._sql(
                "CREATE TEMP TABLE new_values ON COMMIT DROP AS SELECT DISTINCT ON (s.product_id, "
                "s.attribute, s.value) "
                "s.product_id, s.attribute, s.value, s.confidence, s.threshold FROM {s} s "
                "JOIN scored p ON p.product_id = s.product_id AND p.attribute = s.attribute "
                "WHERE s.value IS NOT NULL ORDER BY s.product_id, s.attribute, s.value, s.confidence DESC",
                s=stage,
            )
        )
        model_rows = (
            "FROM {a} a JOIN scored p ON p.product_id = a.product_id AND p.attribute = a.attribute "
            "WHERE a.source = 'model'"
        )
        # what this run replaces or removes, as it was (its rollback puts it back)
        conn.execute(
            self._sql(
                "INSERT INTO {r} SELECT %s, a.product_id, a.attribute, a.value, a.confidence, a.threshold, "
                "a.model_name, a.model_version, a.run_id, a.written_at " + model_rows,
                r="replaced",
                a="attributes",
            ),
            [seq],
        )
        conn.execute(
            self._sql(
                "INSERT INTO {rp} SELECT %s, product_id, attribute FROM (SELECT product_id, attribute FROM "
                "{r} WHERE seq = %s UNION SELECT product_id, attribute FROM new_values) touched",
                r="replaced",
                rp="run_pairs",
            ),
            [seq, seq],
        )
        deleted = conn.execute(
            self._sql(
                "DELETE FROM {a} a USING scored p WHERE p.product_id = a.product_id AND p.attribute = "
                "a.attribute "
                "AND a.source = 'model' AND NOT EXISTS (SELECT 1 FROM new_values n WHERE n.product_id = "
                "a.product_id AND n.attribute = a.attribute AND n.value = a.value)",
                a="attributes",
            )
        ).rowcount
        inserted, updated = conn.execute(
            self._sql(
                "WITH up AS (INSERT INTO {a} (product_id, attribute, value, confidence, threshold, source, "
                "model_name, model_version, run_id, written_at) SELECT product_id, attribute, value, "
                "confidence, "
                "threshold, 'model', %s, %s, %s, %s FROM new_values ON CONFLICT (product_id, attribute, "
                "value) "
                "DO UPDATE SET confidence = EXCLUDED.confidence, threshold = EXCLUDED.threshold, "
                "model_name = EXCLUDED.model_name, model_version = EXCLUDED.model_version, run_id = "
                "EXCLUDED.run_id, "
                "written_at = EXCLUDED.written_at WHERE {a}.source = 'model' RETURNING (xmax = 0) AS fresh) "
                "SELECT count(*) FILTER (WHERE fresh), count(*) FILTER (WHERE NOT fresh) FROM up",
                a="attributes",
            ),
            [run.model_name, run.model_version, run.run_id, run.written_at],
        ).fetchone()
        deleted += self._retract(conn, run, seq)
        self._insert_quarantine(conn, run.quarantine)
        # nothing changed: no version, but the run log keeps the run id (a re-run stays a no-op)
        version = None if inserted + updated + deleted == 0 else seq
        return MergeResult(
            version,
            inserted=int(inserted),
            updated=int(updated),
            deleted=int(deleted),
            merchant_pairs_skipped=int(all_pairs - kept),
        )

    def _retract(self, conn: Any, run: RunWrite, seq: int) -> int:
        """Within the run's transaction: remove the values people rejected for its version from the
        pairs it did not score (the scored pairs already dropped them), keeping those pairs' model
        values as they were for its rollback. Rows removed."""
        if run.retract is None or run.retract.num_rows == 0:
            return 0
        conn.execute(
            "CREATE TEMP TABLE retract (product_id text NOT NULL, attribute text NOT NULL, "
            "value text NOT NULL) ON COMMIT DROP"
        )
        with conn.cursor().copy("COPY retract (product_id, attribute, value) FROM STDIN") as copy:
            for r in run.retract.select(["product_id", "attribute", "value"]).to_pylist():
                copy.write_row([r["product_id"], r["attribute"], r["value"]])
        match = (
            "r.product_id = a.product_id AND r.attribute = a.attribute AND r.value = a.value "
            "AND a.source = 'model' AND a.model_version = %s"
        )
        conn.execute(
            self._sql(
                "CREATE TEMP TABLE retract_pairs ON COMMIT DROP AS SELECT DISTINCT a.product_id, a.attribute "
                "FROM {a} a JOIN retract r ON " + match + " WHERE NOT EXISTS (SELECT 1 FROM scored p WHERE "
                "p.product_id = a.product_id AND p.attribute = a.attribute)",
                a="attributes",
            ),
            [run.model_version],
        )
        conn.execute(
            self._sql(
                "INSERT INTO {r} SELECT %s, a.product_id, a.attribute, a.value, a.confidence, a.threshold, "
                "a.model_name, a.model_version, a.run_id, a.written_at FROM {a} a JOIN retract_pairs p ON "
                "p.product_id = a.product_id AND p.attribute = a.attribute WHERE a.source = 'model'",
                r="replaced",
                a="attributes",
            ),
            [seq],
        )
        conn.execute(
            self._sql("INSERT INTO {rp} SELECT %s, product_id, attribute FROM retract_pairs", rp="run_pairs"),
            [seq],
        )
        return int(
            conn.execute(
                self._sql(
                    "DELETE FROM {a} a USING retract r, retract_pairs p WHERE " + match + " AND "
                    "p.product_id = a.product_id AND p.attribute = a.attribute",
                    a="attributes",
                ),
                [run.model_version],
            ).rowcount
        )

    def _insert_quarantine(self, conn: Any, rows: pa.Table) -> None:
        from psycopg import sql

        if rows.num_rows == 0:
            return
        names = load_contract("quarantine").names
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            self._name("quarantine"), sql.SQL(", ").join(map(sql.Identifier, names))
        )
        with conn.cursor().copy(statement) as copy:
            for row in rows.select(names).to_pylist():
                copy.write_row([row[n] for n in names])

    # -- rollback and reads -----------------------------------------------------------------

    def rollback_runs(self, run_ids: Sequence[str]) -> list[RollbackResult]:
        """Roll the runs back, in the order given, in one transaction (see :meth:`_rollback`)."""
        with self.connect() as conn, conn.transaction():
            self._serialize(conn)
            results = []
            for run_id in run_ids:
                results.append(self._rollback(conn, run_id))
                fault_point("during_rollback")  # test hook: killed with runs still to go
            return results

    def _rollback(self, conn: Any, run_id: str) -> RollbackResult:
        """Restore, for every pair the run changed and no later live run changed again, the values
        the run replaced (kept at its commit); pairs changed since are left alone and reported."""
        row = conn.execute(
            self._sql(
                "SELECT seq, rolled_back_at FROM {t} WHERE run_id = %s AND operation = 'enrich' FOR UPDATE",
                t="runs",
            ),
            [run_id],
        ).fetchone()
        if row is None:
            raise CatalogEnrichError(
                f"run {run_id!r} has no commit in {self.describe()}: nothing to roll back"
            )
        seq, rolled_back = row
        if rolled_back is not None:
            raise CatalogEnrichError(f"run {run_id!r} was already rolled back")
        later = (
            "EXISTS (SELECT 1 FROM {rp} l JOIN {runs} r ON r.seq = l.seq WHERE l.product_id = "
            "p.product_id "
            "AND l.attribute = p.attribute AND l.seq > %s AND r.operation = 'enrich' AND "
            "r.rolled_back_at IS NULL)"
        )
        superseded = conn.execute(
            self._sql(
                "SELECT product_id, attribute FROM {rp} p WHERE p.seq = %s AND " + later + " ORDER BY 1, 2",
                rp="run_pairs",
                runs="runs",
            ),
            [seq, seq],
        ).fetchall()
        conn.execute("DROP TABLE IF EXISTS restore")  # the previous run's, in the same transaction
        conn.execute(
            self._sql(
                "CREATE TEMP TABLE restore ON COMMIT DROP AS SELECT product_id, attribute FROM {rp} p "
                "WHERE p.seq = %s AND NOT " + later,
                rp="run_pairs",
                runs="runs",
            ),
            [seq, seq],
        )
        pairs = conn.execute("SELECT count(*) FROM restore").fetchone()[0]
        removed = conn.execute(
            self._sql(
                "DELETE FROM {a} a USING restore p WHERE p.product_id = a.product_id AND "
                "p.attribute = a.attribute AND a.source = 'model'",
                a="attributes",
            )
        ).rowcount
        restored = conn.execute(
            self._sql(
                "INSERT INTO {a} (product_id, attribute, value, confidence, threshold, source, "
                "model_name, "
                "model_version, run_id, written_at) SELECT r.product_id, r.attribute, r.value, "
                "r.confidence, "
                "r.threshold, 'model', r.model_name, r.model_version, r.run_id, r.written_at FROM {r} r "
                "JOIN "
                "restore p ON p.product_id = r.product_id AND p.attribute = r.attribute WHERE r.seq = %s "
                "ON CONFLICT (product_id, attribute, value) DO NOTHING",
                a="attributes",
                r="replaced",
            ),
            [seq],
        ).rowcount
        if not pairs:  # nothing restored: no commit, as with the lakehouse
            return RollbackResult(run_id, None, superseded=[(p, a) for p, a in superseded])
        conn.execute(self._sql("UPDATE {t} SET rolled_back_at = now() WHERE seq = %s", t="runs"), [seq])
        done = conn.execute(
            self._sql("INSERT INTO {t} (run_id, operation) VALUES (%s, 'rollback') RETURNING seq", t="runs"),
            [run_id],
        ).fetchone()[0]
        return RollbackResult(
            run_id,
            int(done),
            pairs_restored=int(pairs),
            rows_removed=int(removed),
            rows_restored=int(restored),
            superseded=[(p, a) for p, a in superseded],
        )

    def runs_of_model_version(self, model_version: str) -> list[str]:
        with self.connect() as conn:
            rows = conn.execute(
                self._sql(
                    "SELECT run_id FROM {t} WHERE operation = 'enrich' AND model_version = %s AND "
                    "rolled_back_at IS NULL ORDER BY seq DESC",
                    t="runs",
                ),
                [str(model_version)],
            ).fetchall()
        return [r for (r,) in rows]

    def _table(self, name: str, contract: str) -> pa.Table:
        from psycopg import sql

        schema = load_contract(contract).arrow_schema()
        with self.connect() as conn:
            cursor = conn.execute(
                sql.SQL("SELECT {} FROM {}").format(
                    sql.SQL(", ").join(map(sql.Identifier, schema.names)), self._name(name)
                )
            )
            rows = cursor.fetchall()
        return pa.Table.from_pylist([dict(zip(schema.names, r, strict=True)) for r in rows], schema=schema)

    def snapshot(
        self,
        table: Literal["products", "attributes"],
        columns: Sequence[str] | None = None,
        product_ids: Iterable[str] | None = None,
    ) -> tuple[pa.Table, dict[str, Any]]:
        from psycopg import sql

        ids = None if product_ids is None else sorted(set(product_ids))
        if table == "attributes":
            rows = self.attribute_rows()
            if ids is not None:
                rows = rows.filter(pc.is_in(rows["product_id"], pa.array(ids, pa.string())))
            where = {"table": f"{self.schema}.attributes", "database": self.describe()}
            return (rows.select(list(columns)) if columns else rows), where
        contract = load_contract("products")
        schema = contract.arrow_schema(enforce_nullability=False)
        if columns:
            schema = pa.schema([schema.field(c) for c in columns])
        with self.connect() as conn:
            self._check_products(conn, contract)
            query = sql.SQL("SELECT {} FROM {}").format(
                sql.SQL(", ").join(map(sql.Identifier, schema.names)), sql.Identifier(*self.products)
            )
            if ids is not None:
                query = sql.SQL("{} WHERE product_id = ANY(%s)").format(query)
            cursor = conn.execute(query, None if ids is None else [ids])
            rows = [dict(zip(schema.names, r, strict=True)) for r in cursor]
        for row in rows:  # jsonb {"color": ["red"]} -> the contract's map
            if "merchant_attributes" in row:
                merchant = row["merchant_attributes"]
                row["merchant_attributes"] = None if merchant is None else list(merchant.items())
        where = {"table": ".".join(self.products), "database": self.describe()}
        return pa.Table.from_pylist(rows, schema=schema), where

    def attribute_rows(self) -> pa.Table:
        return self._table("attributes", "attributes")

    def quarantine_rows(self) -> pa.Table:
        return self._table("quarantine", "quarantine")

    def keyed_rows(self, name: KeyedTable) -> pa.Table:
        return self._table(name, name)

    def upsert_rows(self, name: KeyedTable, rows: pa.Table) -> None:
        """Insert ``rows``, replacing those with the same key, in one transaction."""
        from psycopg import sql

        names = keyed_schema(name).names
        key = keyed_key(name)
        statement = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}").format(
            self._name(name),
            sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.SQL(", ").join(sql.Placeholder() * len(names)),
            sql.SQL(", ").join(map(sql.Identifier, key)),
            sql.SQL(", ").join(
                sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c))
                for c in names
                if c not in key
            ),
        )
        with self.connect() as conn, conn.transaction(), conn.cursor() as cursor:
            cursor.executemany(statement, [[r[n] for n in names] for r in rows.select(names).to_pylist()])

    # -- the embedding store -------------------------------------------------------------------

    def stored_embeddings(self, spark: SparkSession, encoder: str) -> DataFrame | None:
        """The store's vectors of ``encoder`` as a Spark DataFrame (``product_id`` and
        :data:`~catalog_enrichment.catalog.embeddings.STORED_COLUMNS`), read over JDBC in
        ``catalog.postgres.read_partitions`` slices of the product ids' hash; None when there are none."""
        table = ".".join(f'"{p}"' for p in (self.schema, "embeddings"))
        query = (
            f"(SELECT product_id, content, embedding FROM {table} "
            f"WHERE encoder = '{check_fingerprint(encoder)}') AS stored"
        )
        with self.connect() as conn:
            if not conn.execute(
                self._sql("SELECT 1 FROM {e} WHERE encoder = %s LIMIT 1", e="embeddings"), [encoder]
            ).fetchone():
                return None
            options = self._jdbc_options(conn, query)
        n = max(1, self.pg.read_partitions)
        predicates = [f"mod(abs(hashtext(product_id)::bigint), {n}) = {i}" for i in range(n)]
        url = options.pop("url")
        rows = spark.read.jdbc(url, options.pop("dbtable"), predicates=predicates, properties=options)
        return keep_one_per_product(rows)

    def embeddings_of(self, encoder: str, product_ids: Iterable[str]) -> pa.Table:
        """``product_id``, ``content``, ``embedding`` stored for ``encoder`` and these products."""
        schema = pa.schema([embeddings_schema().field(c) for c in ("product_id", "content", "embedding")])
        with self.connect() as conn:
            rows = conn.execute(
                self._sql(
                    "SELECT product_id, content, embedding FROM {e} "
                    "WHERE encoder = %s AND product_id = ANY(%s)",
                    e="embeddings",
                ),
                [check_fingerprint(encoder), sorted(set(product_ids))],
            ).fetchall()
        columns: list[Any] = list(zip(*rows, strict=True)) if rows else [(), (), ()]
        return pa.table([pa.array(c, f.type) for c, f in zip(columns, schema, strict=True)], schema=schema)

    def write_embeddings(self, rows: str, spark: SparkSession | None = None) -> int:
        """Store the vectors staged as Parquet at ``rows`` (the contract's columns, one row per
        product and encoder): each Spark partition COPYs into a staging table (this process streams
        them when ``spark`` is None), one transaction upserts them."""
        conninfo, password = self.conninfo()
        stage = "stage_embeddings"
        with self.connect() as conn, conn.transaction():
            conn.execute(self._sql("DROP TABLE IF EXISTS {s}", s=stage))
            conn.execute(self._sql("CREATE UNLOGGED TABLE {s} (LIKE {e})", s=stage, e="embeddings"))
        try:
            if spark is not None:
                copier = _copier(conninfo, (self.schema, stage), copy_embeddings)
                n = _copied(spark.read.parquet(rows).mapInArrow(copier, "rows long"))
            else:
                import pyarrow.dataset as ds
                from psycopg.conninfo import make_conninfo

                batches = ds.dataset(rows, format="parquet").to_batches()
                n = copy_embeddings(make_conninfo(conninfo, password=password), (self.schema, stage), batches)
            with self.connect() as conn, conn.transaction():
                conn.execute(
                    self._sql(
                        "INSERT INTO {e} SELECT * FROM {s} ON CONFLICT (encoder, product_id) DO UPDATE "
                        "SET content = EXCLUDED.content, embedding = EXCLUDED.embedding, "
                        "run_id = EXCLUDED.run_id, written_at = EXCLUDED.written_at",
                        e="embeddings",
                        s=stage,
                    )
                )
        finally:
            with self.connect() as conn, conn.transaction():
                conn.execute(self._sql("DROP TABLE IF EXISTS {s}", s=stage))
        return n

    def vacuum_embeddings(self, keep: Iterable[str]) -> int:
        """Delete the vectors of every encoder not in ``keep``; the rows removed."""
        kept = [check_fingerprint(e) for e in keep]
        with self.connect() as conn, conn.transaction():
            cursor = conn.execute(
                self._sql("DELETE FROM {e} WHERE NOT (encoder = ANY(%s))", e="embeddings"), [kept]
            )
            return int(cursor.rowcount)

    def embedding_counts(self) -> dict[str, int]:
        """Stored vectors per encoder fingerprint."""
        with self.connect() as conn:
            rows = conn.execute(
                self._sql("SELECT encoder, count(*) FROM {e} GROUP BY encoder", e="embeddings")
            )
            return {str(e): int(n) for e, n in rows}

    def add_merchant_values(self, rows: pa.Table) -> int:
        """Insert merchant-source attribute rows (seeding a catalog; the demo, the tests); a key
        already present is left as it is. Rows inserted."""
        from psycopg import sql

        names = load_contract("attributes").names
        statement = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(
            self._name("attributes"),
            sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.SQL(", ").join(sql.Placeholder() * len(names)),
        )
        with self.connect() as conn, conn.transaction(), conn.cursor() as cursor:
            cursor.executemany(statement, [[r[n] for n in names] for r in rows.select(names).to_pylist()])
            return int(cursor.rowcount)


def copy_embeddings(conninfo: str, table: tuple[str, str], batches: Iterable[pa.RecordBatch]) -> int:
    """COPY Arrow batches of the embeddings contract's columns into ``table`` (schema, name); rows
    copied. libpq finds the password in this process's environment (``PGPASSWORD``, ``PGPASSFILE``)."""
    import psycopg
    from psycopg import sql

    columns = embeddings_schema().names
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(*table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    rows = 0
    with (
        psycopg.connect(conninfo, application_name="catalog-enrichment embeddings") as conn,
        conn.cursor().copy(statement) as copy,
    ):
        for batch in batches:
            for row in zip(*(batch.column(c).to_pylist() for c in columns), strict=True):
                copy.write_row(row)
            rows += batch.num_rows
    return rows


def _copied(counts: DataFrame) -> int:
    """The rows the COPY tasks of ``counts`` (one ``rows`` count per task) wrote, in one Spark job."""
    from pyspark.sql import functions as F

    total = counts.agg(F.sum("rows")).first()
    return int(total[0] or 0) if total is not None else 0


def _stage_schema() -> pa.Schema:
    return pa.schema(
        [
            ("product_id", pa.string()),
            ("attribute", pa.string()),
            ("value", pa.string()),
            ("confidence", pa.float64()),
            ("threshold", pa.float64()),
        ]
    )


def _bound(value: Any) -> str:
    """A JDBC partition bound as Spark parses it (timestamps in UTC, its session time zone)."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    return str(value)
