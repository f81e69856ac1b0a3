"""The PostgreSQL catalog's connection: where the server is (from the environment only), the
migrated schema, quoted names, the run lock and the staging folder."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog_enrichment.catalog.base import (
    Say,
    empty_folder,
)
from catalog_enrichment.catalog.lock import CatalogBusy
from catalog_enrichment.config import CatalogConfig
from catalog_enrichment.contracts import merchant_key
from catalog_enrichment.errors import CatalogEnrichError

if TYPE_CHECKING:
    pass

from catalog_enrichment.catalog.postgres.migrate import migrate

__all__ = [
    "PG_DSN_ENV",
    "RUN_STAGE",
    "STAGE_HEX",
    "STORE_STAGE",
    "TLS_PARAMETERS",
    "PgBase",
    "held_by",
    "store_stage_key",
]

PG_DSN_ENV = "CATALOG_ENRICH_PG_DSN"

# The staging tables' name prefixes: a run's (``stage_<hash of the run id>``, every one dropped by the
# next run's clear_staging, which holds the run lock) and a store write's (it takes no run lock and
# may be copying beside a run: clear_staging drops one only when no session holds its lock)
RUN_STAGE = "stage_"
STORE_STAGE = "embeddings_stage_"
STAGE_HEX = 24  # hex digits of the hash after the prefix: no other table of the schema is dropped
# the connection's TLS parameters, which the processes that connect without the DSN (the Spark
# tasks' COPY, the JDBC read: libpq and pgjdbc name them alike) take from the job's own connection
TLS_PARAMETERS = ("sslmode", "sslrootcert", "sslcert", "sslkey")


def store_stage_key(name: str) -> str:
    """The advisory lock a store write's session holds while its staging table ``name`` is in use."""
    return f"catalog_enrichment.store_stage:{name}"


def held_by(
    merchant: Iterable[str], attributes: Iterable[str], linked: Mapping[str, Sequence[str]]
) -> list[tuple[str, str]]:
    """(merchant's name, attribute) for each of ``attributes`` that a merchant's value under that name
    holds: its own and those ``linked`` to it, every name compared as its
    :func:`~catalog_enrichment.contracts.merchant_key` (here, not in SQL: PostgreSQL has no
    casefold, and its NFKC needs a UTF-8 database)."""
    links: dict[str, set[str]] = {}
    for attribute, others in linked.items():
        links.setdefault(merchant_key(attribute), set()).update(merchant_key(o) for o in others)
    keyed = [(a, merchant_key(a)) for a in set(attributes)]
    return sorted(
        (name, a)
        for name in set(merchant)
        for a, key in keyed
        if key == merchant_key(name) or key in links.get(merchant_key(name), ())
    )


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


class PgBase:
    """A catalog's schema on a PostgreSQL server: connections to it and the names in it."""

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
        self._index_checked = False  # the products table's product_id index (warned about once)
        # the session holding this process's run lock: (server pid, backend start) while held
        self._lock_session: tuple[int, dt.datetime] | None = None

    def products_name(self) -> str:
        return ".".join(self.products)

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
        # dates as text (partitions, reports) in the one form they are parsed from, whatever the
        # server's or the role's DateStyle
        conn.execute("SET DateStyle = ISO")
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
            extra = {k: v for k, v in info.get_parameters().items() if k in TLS_PARAMETERS}
            return (
                make_conninfo(host=info.host, port=info.port, dbname=info.dbname, user=info.user, **extra),
                info.password or None,
            )

    def _run_lock_key(self) -> str:
        """The session advisory lock (``hashtext`` of it) a run holds for its whole run."""
        return f"catalog_enrichment:{self.schema}"

    @contextlib.contextmanager
    def lock(self, owner: str, say: Say) -> Iterator[None]:
        wait = self.cfg.lock_wait_seconds
        conn = self.connect()
        try:
            key = self._run_lock_key()
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
            if conn.info.server_version >= 140000:
                # the session sits idle for the whole run: a server's idle_session_timeout would end
                # it, and with it the lock, and every run would be refused its commit
                conn.execute("SET idle_session_timeout = 0")
            self._lock_session = conn.execute(
                "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ).fetchone()
            yield
        finally:
            self._lock_session = None  # before the close: another thread may take the lock then
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
        """Drop the staging tables and remove the staged scores of killed runs (lock held); a store
        write's staging table only when its writer is gone (no session holds its lock)."""
        from psycopg import sql

        empty_folder(Path(self.cfg.root) / "_staging")
        with self.connect() as conn, conn.transaction():
            # the names the job gives them and nothing else: a merchant's table named stage_products
            # may sit in the same schema
            names = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename ~ %s",
                [self.schema, f"^({RUN_STAGE}|{STORE_STAGE})[0-9a-f]{{{STAGE_HEX}}}$"],
            ).fetchall()
            unused = "SELECT pg_try_advisory_xact_lock(hashtext(%s))"  # no store write's session holds it
            for (name,) in names:
                if (
                    name.startswith(STORE_STAGE)
                    and not conn.execute(unused, [store_stage_key(name)]).fetchone()[0]
                ):
                    continue  # a store write is copying into it
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(self._name(name)))

    def _serialize(self, conn: Any) -> None:
        """Within a transaction: wait for any other write or rollback of this catalog to commit
        (each statement after it sees theirs), even from a process that does not hold the run lock;
        then, where this process holds the run lock, make sure it still does.

        The run lock's session sits idle for most of a run: a ``pg_terminate_backend``, an
        ``idle_session_timeout``, a failover or a dropped connection ends it and frees the lock for
        another run, whose cleanup drops this run's staging table. Checked after the write lock,
        which that run's commit needs too, the check holds until this transaction commits.

        Raises:
            CatalogEnrichError: the run lock's session is gone (nothing was committed).
        """
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(%s))", [f"catalog_enrichment.write:{self.schema}"]
        )
        if self._lock_session is None:
            return  # no run lock in this process (a test's or a tool's write)
        pid, started = self._lock_session
        # pg_advisory_lock(bigint) shows as classid (high 32 bits), objid (low 32 bits), objsubid 1;
        # the backend start tells the session from a later one given the same pid
        held = conn.execute(
            "SELECT 1 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid, "
            "(SELECT hashtext(%s)::bigint AS k) h WHERE l.locktype = 'advisory' AND l.granted "
            "AND l.pid = %s AND a.backend_start = %s AND l.objsubid = 1 "
            "AND l.classid = ((h.k >> 32) & 4294967295)::oid AND l.objid = (h.k & 4294967295)::oid",
            [self._run_lock_key(), pid, started],
        ).fetchone()
        if held is None:
            raise CatalogEnrichError(
                f"lost the catalog lock of {self.describe()} schema {self.schema}: its session (server pid "
                f"{pid}) ended (terminated, timed out, a failover or a dropped connection), so another run "
                "may have taken it; nothing was committed; run again"
            )

    def _holders(
        self, conn: Any, merchant: Any, attributes: Any, linked: Mapping[str, Sequence[str]]
    ) -> None:
        """The temp table ``holders`` (merchant, attribute): :func:`held_by` of the names the
        queries ``merchant`` and ``attributes`` select (one column each), for this transaction."""
        given, scored = ([n for (n,) in conn.execute(q).fetchall()] for q in (merchant, attributes))
        conn.execute("DROP TABLE IF EXISTS pg_temp.holders")  # an earlier rollback's, in the same transaction
        conn.execute(
            "CREATE TEMP TABLE holders (merchant text NOT NULL, attribute text NOT NULL) ON COMMIT DROP"
        )
        with conn.cursor().copy("COPY holders (merchant, attribute) FROM STDIN") as copy:
            for row in held_by(given, scored, linked):
                copy.write_row(row)

    def _committed(self, conn: Any, run_id: str) -> int | None:
        row = conn.execute(
            self._sql("SELECT seq FROM {t} WHERE run_id = %s AND operation = 'enrich'", t="runs"), [run_id]
        ).fetchone()
        return None if row is None else int(row[0])
