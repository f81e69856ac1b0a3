"""The PostgreSQL catalog's own tables: the versioned SQL files of ``migrations/``, each applied
once, in order, in one transaction, under an advisory lock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["MIGRATIONS", "ensure_schema", "migrate"]

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def ensure_schema(conn: Any, schema: str) -> None:
    """Create ``schema`` unless it is there. Looked up first: PostgreSQL checks the database's CREATE
    privilege before ``IF NOT EXISTS``, so a role that owns a schema a DBA created for it, without
    the right to create schemas, could not run ``CREATE SCHEMA IF NOT EXISTS`` at all."""
    from psycopg import sql

    if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", [schema]).fetchone() is None:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))


def migrate(conn: Any, schema: str, folder: Path = MIGRATIONS) -> list[str]:
    """Apply the migrations of ``folder`` that ``schema`` has not had yet, in order; the names
    applied."""
    from psycopg import sql

    applied: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('catalog_enrichment.migrate'))")
        ensure_schema(conn, schema)
        table = sql.Identifier(schema, "schema_migrations")
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (version integer PRIMARY KEY, name text NOT NULL, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(table)
        )
        done = {v for (v,) in conn.execute(sql.SQL("SELECT version FROM {}").format(table))}
        for file in sorted(folder.glob("[0-9][0-9][0-9][0-9]_*.sql")):
            version = int(file.name[:4])
            if version in done:
                continue
            conn.execute(sql.SQL(file.read_text()).format(schema=sql.Identifier(schema)))
            conn.execute(
                sql.SQL("INSERT INTO {} (version, name) VALUES (%s, %s)").format(table), [version, file.stem]
            )
            applied.append(file.stem)
    return applied
