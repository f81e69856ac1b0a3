"""The PostgreSQL catalog's own tables: the versioned SQL files of ``migrations/``, each applied
once, in order, in one transaction, under an advisory lock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["MIGRATIONS", "migrate"]

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def migrate(conn: Any, schema: str, folder: Path = MIGRATIONS) -> list[str]:
    """Apply the migrations of ``folder`` that ``schema`` has not had yet, in order; the names
    applied."""
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
