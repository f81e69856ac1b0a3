"""The catalog an enrichment run talks to: one small interface, two backends.

:class:`Catalog` is everything a run, a backfill and a rollback need from the catalog: the lock,
the products, the run reports (and so the watermark), one write per run (stage, then one commit of
the values with the run's quarantine rows), rollback, the keyed tables (the two human-review tables
and the run health checks) and the embedding store (:mod:`catalog_enrichment.catalog.embeddings`).
``catalog.kind`` picks the backend (:func:`catalog_enrichment.catalog.open_catalog`):

* ``lakehouse`` (:class:`~catalog_enrichment.catalog.embedded.LakehouseCatalog`): Delta tables under
  ``catalog.root``; one Delta MERGE per run; rollback from what each run changed, kept beside it.
* ``postgres`` (:class:`~catalog_enrichment.catalog.postgres.PostgresCatalog`): products read over
  JDBC; each Spark partition COPYs its values into a per-run staging table, one transaction merges
  them; rollback from the values each run replaced, kept beside the table.

Both keep the same rules: a run is all-or-nothing visible; re-running a committed run id changes
nothing; a merchant value is never overwritten or contradicted; every model value carries its
provenance (model, version, run id); a run or a model version rolls back exactly.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import pyarrow as pa

from catalog_enrichment.catalog.reports import RunReport
from catalog_enrichment.contracts import Contract, load_contract
from catalog_enrichment.faults import armed
from catalog_enrichment.types import Say

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "KEYED_TABLES",
    "Catalog",
    "KeyedTable",
    "MergeResult",
    "RollbackResult",
    "RunWrite",
    "empty_folder",
    "fault_during",
    "keyed_key",
    "keyed_schema",
]


# The small tables a catalog keeps keyed by their contract's primary key (upserted, read whole):
# people's review samples and verdicts, and every run's health checks.
KeyedTable = Literal["review_samples", "reviews", "run_health"]
KEYED_TABLES: tuple[KeyedTable, ...] = ("review_samples", "reviews", "run_health")


def keyed_schema(name: KeyedTable) -> pa.Schema:
    return load_contract(name).arrow_schema()


def keyed_key(name: KeyedTable) -> list[str]:
    return list(load_contract(name).primary_key)


@dataclass
class MergeResult:
    """What a run's write did; ``version`` is the committed table version (Delta) or the run's
    position in the run log (PostgreSQL); None: no row changed (the run id is committed all the
    same: a retry of it writes nothing)."""

    version: int | None
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    merchant_pairs_skipped: int = 0  # the run's pairs a merchant row holds
    already_committed: bool = False
    written: dict[str, int] = field(default_factory=dict)  # the run's values written, per attribute
    products: dict[str, int] = field(default_factory=dict)  # the products given one, per attribute


@dataclass
class RollbackResult:
    """What a rollback restored; ``superseded`` pairs were changed by a later run and left alone."""

    run_id: str
    version: int | None
    pairs_restored: int = 0
    rows_removed: int = 0
    rows_restored: int = 0
    superseded: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class RunWrite:
    """What one run writes.

    ``values``: (product_id, attribute, value, confidence, threshold) that cleared the thresholds;
    ``pairs``: (product_id, attribute) of every pair the run scored or a merchant's value settles
    (its previous model values are replaced by the new set, possibly empty; a pair the merchant
    holds, in the catalog or in the products table, keeps none and gets none); ``quarantine``: the
    run's quarantine rows; ``scores``: the staged scores (Parquet) the values came from, which a
    backend may stage from inside Spark instead of from ``values``; ``retract``: (product_id,
    attribute, value) that people rejected for this model version (``review import``), removed in
    the same commit wherever this version of this registered model wrote them, whether the run
    scored their pair or not (its rollback puts them back); ``linked``: attribute -> the others a
    merchant row of it holds too (:meth:`~catalog_enrichment.contracts.Taxonomy.held_together`: a
    merchant's colour family keeps the model's colour out); ``unscored``: the pairs of ``pairs`` a
    merchant's value settles on products quarantined before scoring, which ``scores`` lacks.
    """

    run_id: str
    model_name: str
    model_version: str
    written_at: dt.datetime
    values: pa.Table
    pairs: pa.Table
    quarantine: pa.Table
    scores: str | None = None
    retract: pa.Table | None = None
    linked: Mapping[str, Sequence[str]] = field(default_factory=dict)
    unscored: pa.Table | None = None


class Catalog(Protocol):
    """Products in, attribute values, quarantine rows and run reports out (see the module doc)."""

    kind: str
    # whether every Spark action on read_products' DataFrame sees the same rows (a Delta snapshot's
    # files); where not (a JDBC query runs again per action), a run stages the rows it read once
    reads_snapshot: bool

    def describe(self) -> str:
        """Where this catalog is, for messages (never a password)."""
        ...

    def products_name(self) -> str:
        """The products table a run reads (a path, or ``schema.table``): each keeps its own
        watermark in the run reports."""
        ...

    def lock(self, owner: str, say: Say) -> AbstractContextManager[None]:
        """Hold the catalog for one run (or rollback) at a time; waits ``catalog.lock_wait_seconds``.

        Raises:
            CatalogBusy: another run still held it when the wait ran out.
        """
        ...

    def clear_staging(self) -> None:
        """Remove what a killed run staged (called with the lock held)."""
        ...

    def staging_dir(self, run_id: str) -> Path:
        """Folder where the run stages its scores (removed when the run ends)."""
        ...

    def read_products(
        self,
        spark: SparkSession,
        contract: Contract,
        *,
        partition: Any = None,
        since: dt.datetime | None = None,
        retry: Sequence[str] = (),
        earliest: dt.datetime | None = None,
        caught_up: Mapping[Any, dt.datetime] | None = None,
        require_columns: bool = True,
    ) -> DataFrame:
        """The products as a Spark DataFrame of the contract's columns (partition filter; with
        ``since``, only rows with ``updated_at`` after it, ``product_id`` in ``retry``, or none
        or one before ``earliest``: :func:`~catalog_enrichment.catalog.products.changed_since`, and
        with ``caught_up`` each of its partitions' rows changed after its own time and every row of
        the others:
        :func:`~catalog_enrichment.catalog.products.in_window`), plus a
        :data:`~catalog_enrichment.contracts.UNREADABLE` column for each contract column whose
        source values may not fit its type. ``require_columns=False``: a contract column the table
        lacks is left out of the DataFrame (the caller checks the columns: the GX checkpoint).

        Raises:
            ContractError: a contract column missing (``require_columns``), or of a type it cannot
                be read as.
        """
        ...

    def image_roots(self) -> list[Path]:
        """Folders whose files an ``image_uri`` may name besides ``images.roots``."""
        ...

    def list_partitions(self, column: str) -> list[str]:
        """The distinct values of a partition column of the products, sorted."""
        ...

    def read_reports(self) -> list[RunReport]:
        """Every run report, oldest first."""
        ...

    def upsert_report(self, report: RunReport) -> None: ...

    def set_report_status(self, run_id: str, status: str) -> None: ...

    def write(self, run: RunWrite, spark: SparkSession | None = None) -> MergeResult:
        """Stage and commit one run: its values replace the model values of its pairs
        (:class:`RunWrite`), in one commit with its quarantine rows; a run id already committed
        changes nothing."""
        ...

    def rollback_runs(
        self, run_ids: Sequence[str], linked: Mapping[str, Sequence[str]] | None = None
    ) -> list[RollbackResult]:
        """Undo runs' commits, newest first, in one commit (all or none of them). A pair a
        merchant's value holds now gets no model value back; ``linked`` (attribute -> the others
        whose merchant value holds it too: :meth:`~catalog_enrichment.contracts.Taxonomy.held_together`)
        extends that to an attribute and its groupings, as a run decides.

        Raises:
            CatalogEnrichError: a run never committed, or was already rolled back.
        """
        ...

    def runs_of_model_version(self, model_name: str, model_version: str) -> list[str]:
        """Run ids of the not-rolled-back runs of a registered model's version, newest first (two
        models' runs in one catalog have their own version numbers)."""
        ...

    def attribute_rows(self, where: Mapping[str, str] | None = None) -> pa.Table:
        """The attribute table (the attributes contract's columns); ``where``: only the rows whose
        columns hold these values, selected where the table is read (not after reading it whole)."""
        ...

    def source_of(self, table: Literal["products", "attributes"]) -> dict[str, Any]:
        """Where the products or attribute table is read from (and its version, where it has one),
        for what reads it to record (training labels).

        Raises:
            CatalogEnrichError: there is no such table.
        """
        ...

    def read_attribute_values(self, spark: SparkSession, sources: Sequence[str]) -> DataFrame:
        """``product_id``, ``attribute`` and ``value`` of the attribute table's rows whose ``source``
        is one of ``sources``, as a Spark DataFrame (read by the executors, never on the driver)."""
        ...

    def products_of(self, product_ids: Iterable[str], columns: Sequence[str] | None = None) -> pa.Table:
        """The products table's rows (every copy) of ``product_ids`` in Arrow, ``columns`` only when
        given (the contract's types).

        Raises:
            CatalogEnrichError: there is no products table.
        """
        ...

    def quarantine_rows(self) -> pa.Table:
        """The whole quarantine table (the quarantine contract's columns)."""
        ...

    def keyed_rows(self, name: KeyedTable) -> pa.Table:
        """The whole ``review_samples``, ``reviews`` or ``run_health`` table (its contract's
        columns; empty when there is none yet)."""
        ...

    def upsert_rows(self, name: KeyedTable, rows: pa.Table) -> None:
        """Insert ``rows`` into a keyed table, replacing rows with the same key, in one commit."""
        ...

    def stored_embeddings(
        self, spark: SparkSession, encoder: str, products: DataFrame | None = None
    ) -> DataFrame | None:
        """The embedding store's rows of one encoder fingerprint as a Spark DataFrame, one per
        product: ``product_id``, ``stored_content``, ``stored_embedding`` (None: none stored);
        those of ``products`` (a DataFrame with ``product_id``) only, where given."""
        ...

    def embeddings_of(self, encoder: str, product_ids: Iterable[str]) -> pa.Table:
        """``product_id``, ``content``, ``embedding`` stored for one encoder fingerprint and the
        given products, on the driver (training's frozen encoders)."""
        ...

    def write_embeddings(self, rows: str, spark: SparkSession | None = None) -> int:
        """Upsert the vectors staged as Parquet at ``rows`` (the embeddings contract's columns, one
        row per encoder and product) into the store, in one commit; the rows written."""
        ...

    def check_embeddings_storable(self) -> None:
        """Nothing, where :meth:`write_embeddings` could store a night's vectors; checked before a
        long encoding whose only product is those vectors (``embeddings --fill``).

        Raises:
            CatalogEnrichError: not even the smallest write fits, and why.
        """

    def vacuum_embeddings(self, keep: Iterable[str]) -> int:
        """Delete the stored vectors of every encoder fingerprint not in ``keep``; the rows removed."""
        ...

    def forget_embeddings(self, run_ids: Collection[str]) -> int:
        """Delete the vectors these runs stored (a rollback's: their inputs may be what was wrong,
        and the run that reads their products again must read them afresh); the rows removed."""
        ...

    def embedding_counts(self) -> dict[str, int]:
        """Stored vectors per encoder fingerprint."""
        ...


def empty_folder(folder: Path) -> None:
    """Remove everything in ``folder`` (a run's staging, left by a killed run)."""
    if folder.is_dir():
        for leftover in folder.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)


_WATCHER = """
import os, signal, sys, time
table, parent = sys.argv[1], int(sys.argv[2])
def seen():
    return {os.path.join(d, f) for d, _, fs in os.walk(table) for f in fs}
before = seen()
print("ready", flush=True)
while os.getppid() == parent:  # gone with its parent
    if not seen() <= before:
        os.kill(parent, signal.SIGKILL)
        break
    time.sleep(0.0005)
"""


def fault_during(name: str, table: Path) -> None:
    """Fault hook (``catalog_enrichment.faults``): SIGKILL this process as soon as a new file appears
    under ``table``: a commit under way, its data being written (watched from another process,
    which no lock in this one holds up)."""
    if armed(name) is None:
        return
    table.mkdir(parents=True, exist_ok=True)
    watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(table), str(os.getpid())], stdout=subprocess.PIPE, text=True
    )
    assert watcher.stdout is not None and watcher.stdout.readline().strip() == "ready"
