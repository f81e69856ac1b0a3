"""Rolling runs back in the PostgreSQL catalog: for every pair a run changed and no later live
run changed again, the values it replaced (kept at its commit) come back, in one transaction -
unless a merchant's value holds the pair now, which keeps no model value."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from catalog_enrichment.catalog.base import RollbackResult
from catalog_enrichment.errors import CatalogEnrichError

if TYPE_CHECKING:
    pass

from catalog_enrichment.catalog.postgres.connection import PgBase
from catalog_enrichment.faults import fault_point

__all__ = ["Rollbacks"]

# a later run that is live changed the pair again (SQL over the run's pairs ``p`` and seq parameter)
_LATER = (
    "EXISTS (SELECT 1 FROM {rp} l JOIN {runs} r ON r.seq = l.seq WHERE l.product_id = p.product_id "
    "AND l.attribute = p.attribute AND l.seq > %s AND r.operation = 'enrich' AND r.rolled_back_at IS NULL)"
)

# a merchant's text that is not blank: it has a character outside Unicode's White_Space as Python's
# str.isspace and Arrow's utf8_trim_whitespace know it (contracts.blank_value, the run's decision);
# not \S, which under a C or glibc locale calls U+00A0, U+2007 or U+3000 a value
_NOT_BLANK = r"[^\t-\r\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


class Rollbacks(PgBase):
    """Rollback of committed runs (see the module docstring)."""

    def rollback_runs(
        self, run_ids: Sequence[str], linked: Mapping[str, Sequence[str]] | None = None
    ) -> list[RollbackResult]:
        """Roll the runs back, in the order given, in one transaction (see :meth:`_rollback`)."""
        with self.connect() as conn, conn.transaction():
            self._serialize(conn)
            results = []
            for run_id in run_ids:
                results.append(self._rollback(conn, run_id, linked or {}))
                fault_point("during_rollback")  # test hook: killed with runs still to go
            return results

    def _rollback(self, conn: Any, run_id: str, linked: Mapping[str, Sequence[str]]) -> RollbackResult:
        """Restore, for every pair the run changed and no later live run changed again, the values
        the run replaced (kept at its commit); pairs changed since are left alone and reported."""
        seq = self._live_commit(conn, run_id)
        superseded = self._superseded(conn, seq)
        conn.execute("DROP TABLE IF EXISTS pg_temp.restore")  # the previous run's, in the same transaction
        conn.execute(
            self._sql(
                "CREATE TEMP TABLE restore ON COMMIT DROP AS SELECT product_id, attribute FROM {rp} p "
                "WHERE p.seq = %s AND NOT " + _LATER,
                rp="run_pairs",
                runs="runs",
            ),
            [seq, seq],
        )
        pairs = conn.execute("SELECT count(*) FROM restore").fetchone()[0]
        if not pairs:  # nothing restored: no commit, as with the lakehouse
            return RollbackResult(run_id, None, superseded=superseded)
        removed, restored = self._restore(conn, seq, linked)
        conn.execute(self._sql("UPDATE {t} SET rolled_back_at = now() WHERE seq = %s", t="runs"), [seq])
        done = conn.execute(
            self._sql("INSERT INTO {t} (run_id, operation) VALUES (%s, 'rollback') RETURNING seq", t="runs"),
            [run_id],
        ).fetchone()[0]
        return RollbackResult(
            run_id,
            int(done),
            pairs_restored=int(pairs),
            rows_removed=removed,
            rows_restored=restored,
            superseded=superseded,
        )

    def _live_commit(self, conn: Any, run_id: str) -> int:
        """The run log position of ``run_id``'s commit, locked for this transaction.

        Raises:
            CatalogEnrichError: the run never committed here, or was rolled back already.
        """
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
        if row[1] is not None:
            raise CatalogEnrichError(f"run {run_id!r} was already rolled back")
        return int(row[0])

    def _superseded(self, conn: Any, seq: int) -> list[tuple[str, str]]:
        """The pairs run ``seq`` touched that a later live run changed again."""
        rows = conn.execute(
            self._sql(
                "SELECT product_id, attribute FROM {rp} p WHERE p.seq = %s AND " + _LATER + " ORDER BY 1, 2",
                rp="run_pairs",
                runs="runs",
            ),
            [seq, seq],
        ).fetchall()
        return [(p, a) for p, a in rows]

    def _restore(self, conn: Any, seq: int, linked: Mapping[str, Sequence[str]]) -> tuple[int, int]:
        """The model values of the ``restore`` pairs replaced by those run ``seq`` found - but not
        those of a run rolled back before (taken out, they stay out) - except on a pair a
        merchant's value holds now (an attribute row of theirs, or the products table's
        ``merchant_attributes`` in the product's latest row, of the attribute or one ``linked`` to
        it, the names compared as :func:`~catalog_enrichment.contracts.merchant_key`:
        :meth:`_holders`), which keeps no model value; (rows removed, rows restored)."""
        from psycopg import sql

        merchant = self._sql(
            "SELECT attribute FROM {a} WHERE source = 'merchant' AND product_id IN "
            "(SELECT product_id FROM restore)",
            a="attributes",
        )
        held = sql.SQL(
            "EXISTS (SELECT 1 FROM {a} m JOIN holders h ON h.merchant = m.attribute WHERE "
            "m.product_id = r.product_id AND h.attribute = r.attribute AND m.source = 'merchant')"
        ).format(a=self._name("attributes"))
        kind = self._merchant_column_type(conn)
        if kind is not None:
            # a json column may hold the escape \u0000, which jsonb refuses: it would fail the
            # whole rollback (the run's reading of the value does not depend on it)
            cast = "{m}::jsonb"
            if kind == "json":
                cast = r"regexp_replace({m}::text, '(?<!\\)\\u0000', '', 'g')::jsonb"
            as_object = sql.SQL(
                f"CASE WHEN jsonb_typeof({cast}) = 'object' THEN {cast} ELSE '{{{{}}}}'::jsonb END"
            )
            merchant = sql.SQL(
                "{rows} UNION SELECT jsonb_object_keys({keys}) FROM {products} pr WHERE pr.product_id IN "
                "(SELECT product_id FROM restore)"
            ).format(
                rows=merchant,
                keys=as_object.format(m=sql.SQL("pr.merchant_attributes")),
                products=sql.Identifier(*self.products),
            )
            # the latest copy, a copy without a time the oldest (as the lakehouse reads it)
            held = sql.SQL(
                "({held} OR EXISTS (SELECT 1 FROM (SELECT pr.merchant_attributes AS m "
                "FROM {products} pr WHERE pr.product_id = r.product_id "
                "ORDER BY pr.updated_at DESC NULLS LAST LIMIT 1) latest "
                "CROSS JOIN LATERAL jsonb_each({entries}) e(merchant, given) JOIN holders h ON "
                "h.merchant = e.merchant CROSS JOIN LATERAL jsonb_array_elements_text("
                "CASE WHEN jsonb_typeof(e.given) = 'array' THEN e.given ELSE '[]'::jsonb END) v "
                "WHERE h.attribute = r.attribute AND v ~ {given}))"
            ).format(
                held=held,
                products=sql.Identifier(*self.products),
                entries=as_object.format(m=sql.SQL("latest.m")),
                given=sql.Literal(_NOT_BLANK),
            )
        self._holders(conn, merchant, "SELECT DISTINCT attribute FROM restore", linked)
        removed = conn.execute(
            self._sql(
                "DELETE FROM {a} a USING restore p WHERE p.product_id = a.product_id AND "
                "p.attribute = a.attribute AND a.source = 'model'",
                a="attributes",
            )
        ).rowcount
        restored = conn.execute(
            sql.SQL(
                "INSERT INTO {a} (product_id, attribute, value, confidence, threshold, source, model_name, "
                "model_version, run_id, written_at) SELECT r.product_id, r.attribute, r.value, r.confidence, "
                "r.threshold, 'model', r.model_name, r.model_version, r.run_id, r.written_at FROM {r} r JOIN "
                "restore p ON p.product_id = r.product_id AND p.attribute = r.attribute WHERE r.seq = %s "
                "AND NOT {held} AND NOT EXISTS (SELECT 1 FROM {runs} x WHERE x.run_id = r.run_id AND "
                "x.operation = 'enrich' AND x.rolled_back_at IS NOT NULL) "
                "ON CONFLICT (product_id, attribute, value) DO NOTHING"
            ).format(
                a=self._name("attributes"), r=self._name("replaced"), held=held, runs=self._name("runs")
            ),
            [seq],
        ).rowcount
        return int(removed), int(restored)

    def _merchant_column_type(self, conn: Any) -> str | None:
        """The type of the products table's ``merchant_attributes`` column (``json`` or ``jsonb``),
        None where it has none."""
        found = conn.execute(
            "SELECT data_type FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
            "AND column_name = 'merchant_attributes'",
            list(self.products),
        ).fetchone()
        return None if found is None else str(found[0])

    def runs_of_model_version(self, model_name: str, model_version: str) -> list[str]:
        with self.connect() as conn:
            rows = conn.execute(
                self._sql(
                    "SELECT run_id FROM {t} WHERE operation = 'enrich' AND model_name = %s AND "
                    "model_version = %s AND rolled_back_at IS NULL ORDER BY seq DESC",
                    t="runs",
                ),
                [model_name, str(model_version)],
            ).fetchall()
        return [r for (r,) in rows]
