"""What the PostgreSQL catalog reads (products over JDBC, snapshots, run reports, the keyed
tables, the embedding store) and its small writes (products loaded for the demo and tests, run
reports, keyed rows)."""

from __future__ import annotations

import datetime as dt
import decimal
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from catalog_enrichment.catalog.base import (
    KeyedTable,
    keyed_key,
    keyed_schema,
)
from catalog_enrichment.catalog.embeddings import check_fingerprint, embeddings_schema, keep_one_per_product
from catalog_enrichment.catalog.products import Partition, in_window
from catalog_enrichment.catalog.reports import MAPS, RunReport
from catalog_enrichment.contracts import UNREADABLE, Contract, load_contract
from catalog_enrichment.errors import CatalogEnrichError, ContractError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

from catalog_enrichment.catalog.postgres.connection import _PG_TYPES, TLS_PARAMETERS, PgBase
from catalog_enrichment.catalog.postgres.migrate import ensure_schema

__all__ = ["Reads"]

# product ids a JDBC partition of a run's embedding lookup asks for (a query of ~0.1 MB at 20-byte
# ids), and the most products a run looks up by key: more (a full run, a large backfill) read the
# store's rows in hash slices, cut to the run's products by a semi-join, instead of holding every
# id on the driver
_IDS_PER_READ = 5000
_KEYED_LOOKUP_MAX = 100_000


class Reads(PgBase):
    """Reads of the catalog's tables (see the module docstring)."""

    def _columns(self, conn: Any) -> dict[str, str]:
        rows = conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
            "AND table_name = %s",
            list(self.products),
        ).fetchall()
        return {name: kind for name, kind in rows}

    def _check_products(
        self, conn: Any, contract: Contract, *, require_columns: bool = True
    ) -> dict[str, str]:
        """The products table's columns and their types, checked against the contract (each
        contract column there, unless not ``require_columns``)."""
        where = f"{'.'.join(self.products)} in {self.describe()}"
        columns = self._columns(conn)
        if not columns:
            raise ContractError(f"no products table {where}")
        missing = contract.missing_columns(list(columns))
        if missing and require_columns:
            raise ContractError(
                f"products table {where} lacks contract column(s) {missing} (see schemas/products.yaml)"
            )
        if columns.get("product_id") == "character":
            raise ContractError(
                f"products column 'product_id' is character(n) in {where}: its blank-padded ids never "
                "equal the text ids of the job's tables (JDBC reads them padded); make it text or varchar"
            )
        for spec in contract.fields:
            accepted = _PG_TYPES[spec.type][1]
            if spec.name in columns and columns[spec.name] not in accepted:
                raise ContractError(
                    f"products column {spec.name!r} is {columns[spec.name]} in {where}, but the contract "
                    f"says {spec.type} (schemas/products.yaml): make it {' or '.join(sorted(accepted))}"
                )
        if not self._index_checked:
            self._index_checked = True
            if "product_id" in columns and not self._product_id_indexed(conn):
                logging.getLogger(__name__).warning(
                    "products table %s has no index that leads with product_id: a rollback's merchant "
                    "check looks up each restored product's latest row, a scan of the table each "
                    "(CREATE INDEX ON %s (product_id, updated_at); docs/catalog.md)",
                    where,
                    ".".join(self.products),
                )
        return columns

    def _product_id_indexed(self, conn: Any) -> bool:
        """Whether a valid index of the products table (not a partial one) leads with ``product_id``."""
        found = conn.execute(
            "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = i.indkey[0] "
            "WHERE n.nspname = %s AND c.relname = %s AND a.attname = 'product_id' "
            "AND i.indisvalid AND i.indpred IS NULL LIMIT 1",
            list(self.products),
        ).fetchone()
        return found is not None

    def read_products(
        self,
        spark: SparkSession,
        contract: Contract,
        *,
        partition: Partition | None = None,
        since: dt.datetime | None = None,
        retry: Sequence[str] = (),
        earliest: dt.datetime | None = None,
        caught_up: Mapping[Partition, dt.datetime] | None = None,
        require_columns: bool = True,
    ) -> DataFrame:
        from pyspark.sql import functions as F

        options, present = self._partitioned_read(
            contract, partition, since, retry, require_columns, caught_up
        )
        if present.get("updated_at") == "timestamp without time zone":
            self._naive_times_read_as_utc(spark, f"{'.'.join(self.products)} in {self.describe()}")
        schema = contract.spark_schema(enforce_nullability=False)
        df = spark.read.format("jdbc").options(**options).load()
        columns, unreadable = [], []
        for f in schema.fields:
            if f.name not in present:
                continue
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
        return in_window(df, schema, partition, since, retry, earliest, caught_up)

    def _partitioned_read(
        self,
        contract: Contract,
        partition: Partition | None,
        since: dt.datetime | None,
        retry: Sequence[str],
        require_columns: bool,
        caught_up: Mapping[Partition, dt.datetime] | None = None,
    ) -> tuple[dict[str, str], dict[str, str]]:
        """The JDBC reader's options: the products table, split into ``read_partitions`` ranges of
        ``partition_column`` between the bounds the run's rows have (with ``caught_up``, as
        :func:`~catalog_enrichment.catalog.products.in_window`: those changed since the earliest
        caught-up partition's time and every row of the other partitions, which a first run after
        a backfill reads whole); and the table's columns."""
        from psycopg import sql

        conditions: list[Any] = []
        params: list[Any] = []
        if partition is not None:
            conditions.append(sql.SQL("{} = %s").format(sql.Identifier(partition.column)))
            params.append(partition.value)
        # the window's bounds: a products.timeless row outside them still lands in an edge range
        # (Spark's first and last take what lies beyond), and an old one would stretch every range;
        # the rows of a partition not caught up are many (read whole), so the bounds cover them
        if since is not None and caught_up:
            of = sql.Identifier(next(iter(caught_up)).column)
            conditions.append(
                sql.SQL(
                    "(updated_at > %s OR product_id = ANY(%s) OR {c} IS NULL OR NOT {c}::text = ANY(%s))"
                ).format(c=of)
            )
            params.extend([min(caught_up.values()), list(retry), [p.value for p in caught_up]])
        elif since is not None:
            conditions.append(sql.SQL("(updated_at > %s OR product_id = ANY(%s))"))
            params.extend([since, list(retry)])
        where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
        column = self.pg.partition_column
        with self.connect() as conn:
            present = self._check_products(conn, contract, require_columns=require_columns)
            if column not in present:
                raise ContractError(
                    f"catalog.postgres.partition_column {column!r} is not a column of the products table"
                )
            bounds = sql.SQL("SELECT min({c}), max({c}) FROM {t}").format(
                c=sql.Identifier(column), t=sql.Identifier(*self.products)
            )
            finite = where
            kind, c = present[column], sql.Identifier(column)
            if kind.startswith(("timestamp", "date")):  # 'infinity' has no Python value
                finite += sql.SQL(" AND " if conditions else " WHERE ") + sql.SQL("isfinite({})").format(c)
            elif kind in ("numeric", "double precision", "real"):  # nor NaN a bound Spark reads
                finite += sql.SQL(" AND " if conditions else " WHERE ") + sql.SQL(
                    "{c}::float8 > '-Infinity' AND {c}::float8 < 'Infinity'"
                ).format(c=c)
            low, high = conn.execute(bounds + finite, params).fetchone()
            options = self._jdbc_options(conn, ".".join(f'"{p}"' for p in self.products))
        if low is not None and self.pg.read_partitions > 1 and low != high:
            options.update(
                partitionColumn=column,
                lowerBound=_bound(low),
                upperBound=_bound(high, up=True),
                numPartitions=str(self.pg.read_partitions),
            )
        return options, present

    def _jdbc_options(self, conn: Any, dbtable: str) -> dict[str, str]:
        """Spark JDBC reader options for ``dbtable`` (a table or a parenthesised query) over ``conn``'s
        server and login."""
        info = conn.info
        if info.host.startswith("/"):
            raise CatalogEnrichError(
                f"{self.describe()}: Spark's JDBC reader needs a TCP host, not the socket folder {info.host}"
            )
        host = f"[{info.host}]" if ":" in info.host else info.host  # an IPv6 address
        options = {
            "url": f"jdbc:postgresql://{host}:{info.port}/{info.dbname}",
            "driver": "org.postgresql.Driver",
            "user": info.user,
            "password": info.password or "",
            "dbtable": dbtable,
            "fetchsize": str(self.pg.fetch_size),
            # Spark writes timestamp literals in its session time zone (UTC, runtime.py)
            "sessionInitStatement": "SET TIME ZONE 'UTC'",
            "applicationName": "catalog-enrichment read",
        }
        # TLS as the job's own connection has it (the files at the same paths on the executors;
        # pgjdbc reads a client key in PKCS-8 DER or PKCS-12, not libpq's PEM)
        given = info.get_parameters()
        options.update({k: given[k] for k in TLS_PARAMETERS if given.get(k)})
        return options

    def _naive_times_read_as_utc(self, spark: SparkSession, where: str) -> None:
        """Refuse to read a ``timestamp without time zone`` updated_at where the JVMs that read it
        are not in UTC: the JDBC driver takes such a time as its JVM's local time, so every row
        would be read that many hours off (rows in the future quarantined, a watermark ahead of the
        rows that follow). Asked of the executors themselves: a known naive time read through
        JDBC in as many tasks as the products' read, and compared with its UTC instant."""
        from pyspark.sql import functions as F

        n = max(1, self.pg.read_partitions)
        query = (
            f"(SELECT g, TIMESTAMP '{_PROBE:%Y-%m-%d %H:%M:%S}' AS t FROM generate_series(0, {n - 1}) g) AS p"
        )
        with self.connect() as conn:
            options = self._jdbc_options(conn, query)
        url = options.pop("url")
        probe = spark.read.jdbc(url, options.pop("dbtable"), predicates=[f"g = {i}" for i in range(n)],
                                properties=options)  # fmt: skip
        off = F.col("t").cast("long") - int(_PROBE.replace(tzinfo=dt.UTC).timestamp())
        hours = sorted({r[0] / 3600 for r in probe.select(off.alias("off")).distinct().collect()})
        if hours != [0]:
            raise ContractError(
                f"products column 'updated_at' is timestamp without time zone in {where}, and the "
                f"Spark JVMs that read it are not in UTC: such a time comes back "
                f"{', '.join(f'{h:+g} h' for h in hours)} off. Make the column timestamptz (ALTER "
                "TABLE ... ALTER COLUMN updated_at TYPE timestamptz USING updated_at AT TIME ZONE "
                "'UTC'), or run the driver and executors with -Duser.timezone=UTC "
                "(spark.driver.extraJavaOptions, spark.executor.extraJavaOptions)"
            )

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
            ensure_schema(conn, self.products[0])
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

    def _table(self, name: str, contract: str, where: Mapping[str, str] | None = None) -> pa.Table:
        from psycopg import sql

        schema = load_contract(contract).arrow_schema()
        query = sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(map(sql.Identifier, schema.names)), self._name(name)
        )
        if where:
            equal = (sql.SQL("{} = %s").format(sql.Identifier(c)) for c in where)
            query = sql.SQL("{} WHERE {}").format(query, sql.SQL(" AND ").join(equal))
        with self.connect() as conn:
            rows = conn.execute(query, list(where.values()) if where else None).fetchall()
        return pa.Table.from_pylist([dict(zip(schema.names, r, strict=True)) for r in rows], schema=schema)

    def products_of(self, product_ids: Iterable[str], columns: Sequence[str] | None = None) -> pa.Table:
        from psycopg import sql

        contract = load_contract("products")
        schema = contract.arrow_schema(enforce_nullability=False)
        if columns:
            schema = pa.schema([schema.field(c) for c in columns])
        with self.connect() as conn:
            self._check_products(conn, contract)
            query = sql.SQL("SELECT {} FROM {} WHERE product_id = ANY(%s)").format(
                sql.SQL(", ").join(map(sql.Identifier, schema.names)), sql.Identifier(*self.products)
            )
            cursor = conn.execute(query, [sorted({p for p in product_ids if p is not None})])
            rows = [dict(zip(schema.names, r, strict=True)) for r in cursor]
        for row in rows:  # jsonb {"color": ["red"]} -> the contract's map
            if "merchant_attributes" in row:
                merchant = row["merchant_attributes"]
                row["merchant_attributes"] = None if merchant is None else list(merchant.items())
        return pa.Table.from_pylist(rows, schema=schema)

    def source_of(self, table: Literal["products", "attributes"]) -> dict[str, Any]:
        if table == "products":
            with self.connect() as conn:
                self._check_products(conn, load_contract("products"), require_columns=False)
        name = ".".join(self.products) if table == "products" else f"{self.schema}.attributes"
        return {"table": name, "database": self.describe()}

    def read_attribute_values(self, spark: SparkSession, sources: Sequence[str]) -> DataFrame:
        """Over JDBC in ``catalog.postgres.read_partitions`` slices of the product ids' hash."""
        listed = ", ".join("'" + s.replace("'", "''") + "'" for s in sources)
        table = ".".join(f'"{p}"' for p in (self.schema, "attributes"))
        return self._hashed_read(
            spark,
            f"(SELECT product_id, attribute, value FROM {table} WHERE source IN ({listed})) AS labels",
        )

    def _hashed_read(self, spark: SparkSession, query: str) -> DataFrame:
        """``query`` (a parenthesised, aliased SELECT with a ``product_id``) read over JDBC in
        ``catalog.postgres.read_partitions`` slices of the product ids' hash."""
        with self.connect() as conn:
            options = self._jdbc_options(conn, query)
        n = max(1, self.pg.read_partitions)
        predicates = [f"mod(abs(hashtext(product_id)::bigint), {n}) = {i}" for i in range(n)]
        predicates[0] += " OR product_id IS NULL"  # hashtext(NULL) is NULL: in no slice otherwise
        url = options.pop("url")
        return spark.read.jdbc(url, options.pop("dbtable"), predicates=predicates, properties=options)

    def attribute_rows(self, where: Mapping[str, str] | None = None) -> pa.Table:
        return self._table("attributes", "attributes", where)

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

    def stored_embeddings(
        self, spark: SparkSession, encoder: str, products: DataFrame | None = None
    ) -> DataFrame | None:
        """The store's vectors of ``encoder`` as a Spark DataFrame (``product_id`` and
        :data:`~catalog_enrichment.catalog.embeddings.STORED_COLUMNS`); None when there are none.
        Those of ``products`` only, where given: up to :data:`_KEYED_LOOKUP_MAX` of them (a night's
        increment) their ids are gathered on the driver and looked up by the store's key,
        :data:`_IDS_PER_READ` a JDBC partition, so a night reads its own products' vectors, not the
        whole store; otherwise every vector in ``catalog.postgres.read_partitions`` slices of the
        product ids' hash (cut to ``products`` by a semi-join)."""
        from psycopg import sql

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
        # the run's ids gathered by a Spark job, no connection held meanwhile
        wanted = products.select("product_id").distinct() if products is not None else None
        found = [] if wanted is None else wanted.limit(_KEYED_LOOKUP_MAX + 1).collect()
        if wanted is None or len(found) > _KEYED_LOOKUP_MAX:  # a full run, a large backfill
            return keep_one_per_product(self._hashed_read(spark, query), products)
        ids = sorted(r[0] for r in found if r[0] is not None)
        if not ids:
            return None
        with self.connect() as conn:
            options = self._jdbc_options(conn, query)
            predicates = [
                sql.SQL("product_id = ANY({})")
                .format(sql.Literal(ids[i : i + _IDS_PER_READ]))
                .as_string(conn)
                for i in range(0, len(ids), _IDS_PER_READ)
            ]
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

    def embedding_counts(self) -> dict[str, int]:
        """Stored vectors per encoder fingerprint."""
        with self.connect() as conn:
            rows = conn.execute(
                self._sql("SELECT encoder, count(*) FROM {e} GROUP BY encoder", e="embeddings")
            )
            return {str(e): int(n) for e, n in rows}


_PROBE = dt.datetime(2000, 1, 1)  # a naive time read back to tell the JVMs' zone


def _bound(value: Any, up: bool = False) -> str:
    """A JDBC partition bound as Spark parses it: timestamps in UTC (its session time zone), a
    number as a whole one (Spark reads a numeric column's bounds as longs), rounded outwards
    (``up`` for the upper bound)."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, decimal.Decimal | float):
        return str(math.ceil(value) if up else math.floor(value))
    return str(value)
