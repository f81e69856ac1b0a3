"""A run's write into the PostgreSQL catalog: each Spark partition COPYs its values into a
per-run staging table, then one transaction records the run, keeps what it replaces, merges and
adds the quarantine rows; and the embedding store's writes."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from catalog_enrichment.catalog.base import (
    MergeResult,
    RunWrite,
)
from catalog_enrichment.catalog.embeddings import check_fingerprint, embeddings_schema
from catalog_enrichment.contracts import load_contract
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.faults import fault_point

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

from catalog_enrichment.catalog.postgres.connection import (
    RUN_STAGE,
    STAGE_HEX,
    STORE_STAGE,
    PgBase,
    store_stage_key,
)

__all__ = ["Writes", "copy_batches", "copy_embeddings"]

_STAGE_COLUMNS = ("product_id", "attribute", "value", "confidence", "threshold")


def _stage_name(key: str, prefix: str = RUN_STAGE) -> str:
    # run ids may be 200 characters of . : = + -; PostgreSQL names stop at 63 bytes
    return prefix + hashlib.sha256(key.encode()).hexdigest()[:STAGE_HEX]


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


class Writes(PgBase):
    """A run's write and the store's (see the module docstring)."""

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
        staged = self._stage(run, stage, spark)
        fault_point("after_stage")
        with self.connect() as conn:
            try:
                with conn.transaction():
                    # the run lock first: lost, another run may have dropped the stage
                    self._serialize(conn)
                    self._check_staged(conn, f"run {run.run_id}", stage, staged)
                    result = self._merge(conn, run, stage)
                    fault_point("during_merge")
            finally:
                with conn.transaction():
                    conn.execute(self._sql("DROP TABLE IF EXISTS {s}", s=stage))
        fault_point("after_merge")
        fault_point("after_quarantine")
        return result

    def _check_staged(self, conn: Any, what: str, stage: str, staged: int) -> None:
        """The stage holds every row copied into it (a server restart or failover between the COPY
        and the merge empties an unlogged table: merged, the run would write nothing and count as done)."""
        have = int(conn.execute(self._sql("SELECT count(*) FROM {s}", s=stage)).fetchone()[0])
        if have < staged:
            raise CatalogEnrichError(
                f"the staged rows of {what} are gone ({have:,} of {staged:,} left; a server restart or "
                "failover empties the staging table): nothing was written; run it again"
            )

    def _stage(self, run: RunWrite, stage: str, spark: SparkSession | None) -> int:
        (conninfo, password), table = self.conninfo(), (self.schema, stage)
        if spark is None or run.scores is None:
            rows = pa.concat_tables(
                [run.values.select(list(_STAGE_COLUMNS)).cast(_stage_schema()), _pair_rows(run.pairs)]
            )
            return copy_batches(conninfo, table, rows.to_batches(max_chunksize=50_000), password=password)
        from pyspark.sql import functions as F

        # the pairs of products quarantined before scoring that a merchant's value settles (not in
        # the scores), from the driver
        unscored = 0
        if run.unscored is not None and run.unscored.num_rows:
            batches = _pair_rows(run.unscored).to_batches(max_chunksize=50_000)
            unscored = copy_batches(conninfo, table, batches, password=password)

        # values and scored pairs of the products whose image was read, the pairs a merchant's value
        # settles of every product (as stages.flatten_scores)
        scores = spark.read.parquet(run.scores)
        good = scores.where(F.col("image_error").isNull())
        values = good.select("product_id", F.explode("values").alias("v")).select(
            "product_id", "v.attribute", "v.value", "v.confidence", "v.threshold"
        )
        settled = scores.select("product_id", F.explode("settled").alias("attribute"))
        pairs = (
            good.select("product_id", F.explode("scored").alias("attribute")).unionByName(settled)
        ).select(
            "product_id",
            "attribute",
            F.lit(None).cast("string").alias("value"),
            F.lit(None).cast("double").alias("confidence"),
            F.lit(None).cast("double").alias("threshold"),
        )
        # the closure holds no password: the executor's libpq reads it from its environment
        return unscored + _copied(values.unionByName(pairs).mapInArrow(_copier(conninfo, table), "rows long"))

    def _merge(self, conn: Any, run: RunWrite, stage: str) -> MergeResult:
        """Within the write's transaction: record the run in the run log, then replace the model values
        of its pairs (a pair the merchant holds keeps no model value and gets none), keeping what it
        replaces for its rollback (:meth:`write` has serialized the transaction); the values written
        and the products given one counted per attribute."""
        seq_row = conn.execute(
            self._sql(
                "INSERT INTO {runs} (run_id, operation, model_name, model_version) VALUES (%s, 'enrich', "
                "%s, %s) ON CONFLICT (run_id, operation) DO NOTHING RETURNING seq",
                runs="runs",
            ),
            [run.run_id, run.model_name, run.model_version],
        ).fetchone()
        if seq_row is None:  # committed by a process that got here first
            return MergeResult(self._committed(conn, run.run_id), already_committed=True)
        seq = int(seq_row[0])
        skipped = self._scored_pairs(conn, stage, run.linked)
        written = conn.execute(
            "SELECT attribute, count(*), count(DISTINCT product_id) FROM new_values GROUP BY attribute"
        ).fetchall()
        self._keep_replaced(conn, seq)
        inserted, updated, deleted = self._replace_values(conn, run)
        deleted += self._retract(conn, run, seq)
        self._insert_quarantine(conn, run.quarantine)
        # nothing changed: no version, but the run log keeps the run id (a re-run stays a no-op)
        version = None if inserted + updated + deleted == 0 else seq
        return MergeResult(
            version,
            inserted=inserted,
            updated=updated,
            deleted=deleted,
            merchant_pairs_skipped=skipped,
            written={str(a): int(n) for a, n, _ in written},
            products={str(a): int(n) for a, _, n in written},
        )

    def _scored_pairs(self, conn: Any, stage: str, linked: Mapping[str, Sequence[str]]) -> int:
        """The temp tables ``touched`` (every pair of the run: their model values go unless among
        the new ones), ``scored`` (those no merchant row holds: of the attribute or of one ``linked``
        to it, the names compared as :func:`~catalog_enrichment.contracts.merchant_key`,
        :meth:`_holders`) and ``new_values`` (their new values, one row each); the run's pairs left
        to the merchant."""
        conn.execute(
            self._sql(
                "CREATE TEMP TABLE touched ON COMMIT DROP AS SELECT DISTINCT product_id, attribute FROM {s}",
                s=stage,
            )
        )
        conn.execute("ALTER TABLE touched ADD PRIMARY KEY (product_id, attribute)")
        merchant = self._sql(
            "SELECT DISTINCT attribute FROM {a} WHERE source = 'merchant' AND product_id IN "
            "(SELECT product_id FROM touched)",
            a="attributes",
        )
        self._holders(conn, merchant, "SELECT DISTINCT attribute FROM touched", linked)
        conn.execute(
            self._sql(
                "CREATE TEMP TABLE scored ON COMMIT DROP AS SELECT t.product_id, t.attribute FROM touched t "
                "WHERE NOT EXISTS (SELECT 1 FROM {a} a JOIN holders h ON h.merchant = a.attribute WHERE "
                "a.product_id = t.product_id AND h.attribute = t.attribute AND a.source = 'merchant')",
                a="attributes",
            )
        )
        conn.execute("ALTER TABLE scored ADD PRIMARY KEY (product_id, attribute)")
        all_pairs = conn.execute("SELECT count(*) FROM touched").fetchone()[0]
        kept = conn.execute("SELECT count(*) FROM scored").fetchone()[0]
        conn.execute(
            self._sql(
                "CREATE TEMP TABLE new_values ON COMMIT DROP AS SELECT DISTINCT ON (s.product_id, "
                "s.attribute, s.value) s.product_id, s.attribute, s.value, s.confidence, s.threshold "
                "FROM {s} s JOIN scored p ON p.product_id = s.product_id AND p.attribute = s.attribute "
                "WHERE s.value IS NOT NULL ORDER BY s.product_id, s.attribute, s.value, s.confidence DESC",
                s=stage,
            )
        )
        return int(all_pairs - kept)

    def _keep_replaced(self, conn: Any, seq: int) -> None:
        """What the run replaces or removes, as it was, and every pair it touches (its rollback
        puts them back)."""
        conn.execute(
            self._sql(
                "INSERT INTO {r} SELECT %s, a.product_id, a.attribute, a.value, a.confidence, a.threshold, "
                "a.model_name, a.model_version, a.run_id, a.written_at FROM {a} a JOIN touched p ON "
                "p.product_id = a.product_id AND p.attribute = a.attribute WHERE a.source = 'model'",
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

    def _replace_values(self, conn: Any, run: RunWrite) -> tuple[int, int, int]:
        """The run's pairs' model values that are not among the new ones deleted, the new ones
        upserted (only over model rows); (inserted, updated, deleted)."""
        deleted = conn.execute(
            self._sql(
                "DELETE FROM {a} a USING touched p WHERE p.product_id = a.product_id AND p.attribute = "
                "a.attribute AND a.source = 'model' AND NOT EXISTS (SELECT 1 FROM new_values n WHERE "
                "n.product_id = a.product_id AND n.attribute = a.attribute AND n.value = a.value)",
                a="attributes",
            )
        ).rowcount
        inserted, updated = conn.execute(
            self._sql(
                "WITH up AS (INSERT INTO {a} (product_id, attribute, value, confidence, threshold, source, "
                "model_name, model_version, run_id, written_at) SELECT product_id, attribute, value, "
                "confidence, threshold, 'model', %s, %s, %s, %s FROM new_values ON CONFLICT (product_id, "
                "attribute, value) DO UPDATE SET confidence = EXCLUDED.confidence, threshold = "
                "EXCLUDED.threshold, model_name = EXCLUDED.model_name, model_version = "
                "EXCLUDED.model_version, run_id = EXCLUDED.run_id, written_at = EXCLUDED.written_at "
                "WHERE {a}.source = 'model' RETURNING (xmax = 0) AS fresh) "
                "SELECT count(*) FILTER (WHERE fresh), count(*) FILTER (WHERE NOT fresh) FROM up",
                a="attributes",
            ),
            [run.model_name, run.model_version, run.run_id, run.written_at],
        ).fetchone()
        return int(inserted), int(updated), int(deleted)

    def _retract(self, conn: Any, run: RunWrite, seq: int) -> int:
        """Within the run's transaction: remove the values people rejected for its model's version
        from the pairs it did not touch (its pairs already dropped them), keeping those pairs'
        model values as they were for its rollback. Rows removed."""
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
            "AND a.source = 'model' AND a.model_name = %s AND a.model_version = %s"
        )
        conn.execute(
            self._sql(
                "CREATE TEMP TABLE retract_pairs ON COMMIT DROP AS SELECT DISTINCT a.product_id, a.attribute "
                "FROM {a} a JOIN retract r ON " + match + " WHERE NOT EXISTS (SELECT 1 FROM touched p WHERE "
                "p.product_id = a.product_id AND p.attribute = a.attribute)",
                a="attributes",
            ),
            [run.model_name, run.model_version],
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
                [run.model_name, run.model_version],
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

    def write_embeddings(self, rows: str, spark: SparkSession | None = None) -> int:
        """Store the vectors staged as Parquet at ``rows`` (the contract's columns, one row per
        product and encoder): each Spark partition COPYs into a staging table of this write's own (a
        training's store write needs no lock, so it may run beside a run's or a fill's; this process
        streams them when ``spark`` is None), one transaction upserts them, once per key (a copy task
        Spark ran again after its COPY committed staged its rows twice). The rows upserted."""
        conninfo, password = self.conninfo()
        # not a run's stage_ name: a run's clear_staging drops those, and this write may run beside
        # one. The holder's session lock marks the table in use until this write drops it (in the
        # finally); a killed write's table is dropped by the next run's clear_staging.
        stage = _stage_name(f"embeddings:{uuid.uuid4()}", STORE_STAGE)
        with self.connect() as holder:
            holder.execute("SELECT pg_advisory_lock(hashtext(%s))", [store_stage_key(stage)])
            holder.execute(self._sql("CREATE UNLOGGED TABLE {s} (LIKE {e})", s=stage, e="embeddings"))
            try:
                if spark is not None:
                    copier = _copier(conninfo, (self.schema, stage), copy_embeddings)
                    n = _copied(spark.read.parquet(rows).mapInArrow(copier, "rows long"))
                else:
                    import pyarrow.dataset as ds
                    from psycopg.conninfo import make_conninfo

                    batches = ds.dataset(rows, format="parquet").to_batches()
                    staging = (self.schema, stage)
                    n = copy_embeddings(make_conninfo(conninfo, password=password), staging, batches)
                with self.connect() as conn, conn.transaction():  # not the holder's: it may be gone
                    self._check_staged(conn, "the embedding store's write", stage, n)
                    n = conn.execute(
                        self._sql(
                            "INSERT INTO {e} SELECT DISTINCT ON (encoder, product_id) * FROM {s} "
                            "ORDER BY encoder, product_id, written_at DESC ON CONFLICT (encoder, product_id) "
                            "DO UPDATE SET content = EXCLUDED.content, embedding = EXCLUDED.embedding, "
                            "run_id = EXCLUDED.run_id, written_at = EXCLUDED.written_at",
                            e="embeddings",
                            s=stage,
                        )
                    ).rowcount
            finally:
                with self.connect() as conn, conn.transaction():
                    conn.execute(self._sql("DROP TABLE IF EXISTS {s}", s=stage))
        return n

    def check_embeddings_storable(self) -> None:
        """The server upserts a write a Spark partition at a time: any store size fits."""

    def vacuum_embeddings(self, keep: Iterable[str]) -> int:
        """Delete the vectors of every encoder not in ``keep``; the rows removed."""
        kept = [check_fingerprint(e) for e in keep]
        with self.connect() as conn, conn.transaction():
            cursor = conn.execute(
                self._sql("DELETE FROM {e} WHERE NOT (encoder = ANY(%s))", e="embeddings"), [kept]
            )
            return int(cursor.rowcount)

    def forget_embeddings(self, run_ids: Collection[str]) -> int:
        """Delete the vectors these runs stored; the rows removed."""
        with self.connect() as conn, conn.transaction():
            cursor = conn.execute(
                self._sql("DELETE FROM {e} WHERE run_id = ANY(%s)", e="embeddings"), [sorted(run_ids)]
            )
            return int(cursor.rowcount)

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


def _pair_rows(pairs: pa.Table) -> pa.Table:
    """Staging rows of (product, attribute) ``pairs``: no value, their model values replaced by none."""
    none = pa.nulls(pairs.num_rows)
    return pa.table(
        {
            "product_id": pairs["product_id"],
            "attribute": pairs["attribute"],
            "value": none,
            "confidence": none,
            "threshold": none,
        }
    ).cast(_stage_schema())


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
