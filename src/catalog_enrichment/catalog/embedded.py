"""The embedded lakehouse catalog (``catalog.kind: lakehouse``): Delta tables under ``catalog.root``.

Products are read with Spark's Parquet reader from a Delta table's current snapshot (or a Parquet
folder); a run's values go into the attributes table in one Delta MERGE tagged with the run id
(:mod:`catalog_enrichment.catalog.attributes`), then its quarantine rows are appended once; the
lock is a ``flock`` on ``<root>/_lock`` (:mod:`catalog_enrichment.catalog.lock`). What each run
changed is kept in the attribute-changes table, which rollback restores from.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import operator
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.catalog import attributes, lakehouse, products, reports
from catalog_enrichment.catalog.base import (
    KEYED_TABLES,
    KeyedTable,
    MergeResult,
    RollbackResult,
    RunWrite,
    Say,
    empty_folder,
    fault_during,
    keyed_key,
    keyed_schema,
)
from catalog_enrichment.catalog.embeddings import check_fingerprint, embeddings_schema, keep_one_per_product
from catalog_enrichment.catalog.lock import catalog_lock
from catalog_enrichment.catalog.products import read_delta_files
from catalog_enrichment.config import CatalogConfig
from catalog_enrichment.contracts import Contract, load_contract
from catalog_enrichment.errors import CatalogEnrichError, ContractError
from catalog_enrichment.faults import fault_point

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = ["LakehouseCatalog"]


class LakehouseCatalog:
    """Delta tables under ``cfg.root`` (each table's location overridable in ``cfg``)."""

    kind = "lakehouse"
    reads_snapshot = True

    def __init__(self, cfg: CatalogConfig, *, products: str | Path | None = None) -> None:
        self.cfg = cfg
        self.root = Path(cfg.root)
        self.products = Path(products or cfg.table("products"))
        self.attributes = Path(cfg.table("attributes"))
        self.changes = Path(cfg.table("attribute_changes"))
        self.quarantine = Path(cfg.table("quarantine"))
        self.reports = Path(cfg.table("run_reports"))
        self.keyed_tables = {name: Path(cfg.table(name)) for name in KEYED_TABLES}
        self.embeddings = Path(cfg.table("embeddings"))

    def describe(self) -> str:
        return f"lakehouse {self.root}"

    def products_name(self) -> str:
        return str(self.products.resolve())

    def lock(self, owner: str, say: Say) -> AbstractContextManager[None]:
        return catalog_lock(self.root, owner=owner, wait_seconds=self.cfg.lock_wait_seconds, say=say)

    def staging_dir(self, run_id: str) -> Path:
        return self.root / "_staging" / run_id

    def clear_staging(self) -> None:
        empty_folder(self.root / "_staging")

    def read_products(
        self,
        spark: SparkSession,
        contract: Contract,
        *,
        partition: products.Partition | None = None,
        since: dt.datetime | None = None,
        retry: Sequence[str] = (),
        earliest: dt.datetime | None = None,
        caught_up: Mapping[products.Partition, dt.datetime] | None = None,
        require_columns: bool = True,
    ) -> DataFrame:
        return products.read_products(
            spark, self.products, contract, partition=partition, since=since, retry=retry,
            earliest=earliest, caught_up=caught_up, require_columns=require_columns,
        )  # fmt: skip

    def image_roots(self) -> list[Path]:
        return [self.products.resolve()]

    def list_partitions(self, column: str) -> list[str]:
        return products.list_partitions(self.products, column)

    def read_reports(self) -> list[reports.RunReport]:
        return reports.read_reports(self.reports)

    def upsert_report(self, report: reports.RunReport) -> None:
        reports.upsert_report(self.reports, report)

    def set_report_status(self, run_id: str, status: str) -> None:
        if lakehouse.is_delta(self.reports):
            reports.set_report_status(self.reports, run_id, status)

    def write(self, run: RunWrite, spark: SparkSession | None = None) -> MergeResult:
        """One MERGE commit (a killed process leaves the table as it was), then the quarantine rows:
        those of the attempt that committed the run (a re-run finds its commit and writes none of its
        own beside them; one whose earlier attempt committed nothing replaces what that left)."""
        fault_point("after_stage")
        fault_during("during_merge", self.attributes)
        merge = attributes.merge_run(self.attributes, run, changes=self.changes, linked=run.linked)
        fault_point("after_merge")
        reports.write_quarantine(
            self.quarantine, run.run_id, run.quarantine, replace=not merge.already_committed
        )
        fault_point("after_quarantine")
        return merge

    def _check_attributes(self) -> None:
        if not lakehouse.is_delta(self.attributes):
            raise CatalogEnrichError(f"no attribute table at {self.attributes}: nothing to roll back")

    def rollback_runs(
        self, run_ids: Sequence[str], linked: Mapping[str, Sequence[str]] | None = None
    ) -> list[RollbackResult]:
        self._check_attributes()
        fault_during("during_rollback", self.attributes)
        return attributes.rollback_runs(
            self.attributes, self.changes, run_ids, products=self.products, linked=linked
        )

    def runs_of_model_version(self, model_name: str, model_version: str) -> list[str]:
        self._check_attributes()
        reports = self.read_reports()
        reported = {r.run_id: r.model_name for r in reports if r.model_name}
        quiet = [
            r.run_id
            for r in reports
            if (r.model_name, r.model_version, r.status) == (model_name, str(model_version), "succeeded")
        ]
        runs = attributes.runs_of_model_version(
            self.attributes, self.changes, model_name, model_version, reported, quiet
        )
        return [run for _, run in runs]

    def attribute_rows(self, where: Mapping[str, str] | None = None) -> pa.Table:
        import pyarrow.dataset as ds

        if not lakehouse.is_delta(self.attributes):
            return attributes.attributes_schema().empty_table()
        conditions = [ds.field(c) == v for c, v in (where or {}).items()]
        selected = functools.reduce(operator.and_, conditions) if conditions else None
        return (
            lakehouse.dataset(self.attributes).to_table(filter=selected).cast(attributes.attributes_schema())
        )

    def source_of(self, table: Literal["products", "attributes"]) -> dict[str, Any]:
        path = self.products if table == "products" else self.attributes
        if not path.exists():
            raise CatalogEnrichError(f"the {table} table was not found: {path}")
        return {"path": str(path.resolve()), "version": lakehouse.table_version(path)}

    def read_attribute_values(self, spark: SparkSession, sources: Sequence[str]) -> DataFrame:
        from pyspark.sql import functions as F

        rows = products.read_products(
            spark, self.attributes, load_contract("attributes"), require_columns=False
        )
        missing = [c for c in ("product_id", "attribute", "value", "source") if c not in rows.columns]
        if missing:
            raise ContractError(f"the attributes table {self.attributes} lacks columns {missing}")
        return rows.where(F.col("source").isin(list(sources))).select("product_id", "attribute", "value")

    def products_of(self, product_ids: Iterable[str], columns: Sequence[str] | None = None) -> pa.Table:
        self.source_of("products")
        return lakehouse.read_products_of(self.products, product_ids, columns)

    def quarantine_rows(self) -> pa.Table:
        schema = load_contract("quarantine").arrow_schema()
        if not lakehouse.is_delta(self.quarantine):
            return schema.empty_table()
        return lakehouse.read_table(self.quarantine).select(schema.names).cast(schema)

    def keyed_rows(self, name: KeyedTable) -> pa.Table:
        path = self.keyed_tables[name]
        if not lakehouse.is_delta(path):
            return keyed_schema(name).empty_table()
        return lakehouse.read_table(path).select(keyed_schema(name).names).cast(keyed_schema(name))

    def upsert_rows(self, name: KeyedTable, rows: pa.Table) -> None:
        """Insert ``rows``, replacing those with the same key, in one Delta commit."""
        from deltalake import DeltaTable, write_deltalake

        path, schema = self.keyed_tables[name], keyed_schema(name)
        rows = rows.select(schema.names).cast(schema)
        if not lakehouse.is_delta(path):
            path.mkdir(parents=True, exist_ok=True)
            write_deltalake(str(path), rows, mode="error")
            return
        on = " AND ".join(f"t.{k} = s.{k}" for k in keyed_key(name))
        (
            DeltaTable(str(path))
            .merge(rows, predicate=on, source_alias="s", target_alias="t")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute()
        )

    # -- the embedding store -------------------------------------------------------------------

    def stored_embeddings(
        self, spark: SparkSession, encoder: str, products: DataFrame | None = None
    ) -> DataFrame | None:
        """The store's vectors of ``encoder`` as a Spark DataFrame (``product_id`` and
        :data:`~catalog_enrichment.catalog.embeddings.STORED_COLUMNS`), None when there are none."""
        from pyspark.sql import functions as F

        if not lakehouse.is_delta(self.embeddings):
            return None
        rows = read_delta_files(spark, self.embeddings.resolve())
        if rows is None:
            return None
        return keep_one_per_product(rows.where(F.col("encoder") == check_fingerprint(encoder)), products)

    def embeddings_of(self, encoder: str, product_ids: Iterable[str]) -> pa.Table:
        """``product_id``, ``content``, ``embedding`` stored for ``encoder`` and these products
        (scanned batch by batch: memory follows the products asked for)."""
        schema = pa.schema([embeddings_schema().field(c) for c in ("product_id", "content", "embedding")])
        if not lakehouse.is_delta(self.embeddings):
            return schema.empty_table()
        where = {"encoder": check_fingerprint(encoder)}
        return lakehouse.read_products_of(self.embeddings, product_ids, schema.names, where=where)

    def write_embeddings(self, rows: str, spark: SparkSession | None = None) -> int:
        """Store the vectors staged as Parquet at ``rows`` (the contract's columns, one row per
        product and encoder), replacing older ones of the same key. Appended into a new store a
        commit per part of about :data:`STORE_PART_BYTES` (delta-rs holds several times what one
        write carries). Merged into one that exists in as few commits as this process's memory
        allows, most nights one (:func:`_merge_part_bytes`): a merge reads the whole store and
        rewrites every file holding a replaced vector, so each commit costs a pass over the store.
        A store too large to merge into on this machine is refused before anything is written.
        The files a merge replaced are deleted once past the table's retention
        (``delta.deletedFileRetentionDuration``, Delta's default 7 days: no reader still needs
        them): otherwise the store would grow by its size every few nights.

        Raises:
            CatalogEnrichError: the store is too large to merge into on this machine.
        """
        import pyarrow.dataset as ds
        from deltalake import DeltaTable, write_deltalake

        source = ds.dataset(rows, format="parquet")
        n = source.count_rows()
        if n == 0:
            return 0
        staged = sum(Path(f).stat().st_size for f in source.files)  # vectors do not compress
        if not lakehouse.is_delta(self.embeddings):  # every key is new: the staged rows are one per key
            self.embeddings.mkdir(parents=True, exist_ok=True)
            for part in _store_parts(source, n, staged, STORE_PART_BYTES):
                write_deltalake(str(self.embeddings), part, mode="append")
            return n
        for part in _store_parts(source, n, staged, _merge_part_bytes(self.embeddings, staged)):
            (
                DeltaTable(str(self.embeddings))
                .merge(
                    part,
                    predicate="t.encoder = s.encoder AND t.product_id = s.product_id",
                    source_alias="s",
                    target_alias="t",
                    streamed_exec=True,
                )
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute()
            )
        try:
            DeltaTable(str(self.embeddings)).vacuum(dry_run=False)
        except Exception as exc:  # the vectors are committed: their files are deleted next time
            logging.getLogger(__name__).warning("could not delete the store's replaced files: %s", exc)
        return n

    def check_embeddings_storable(self) -> None:
        """A merge into an existing store holds about three times it (:func:`_merge_part_bytes`):
        refused where even a night of one byte would not fit. A new store is appended a part at a
        time and always fits."""
        if lakehouse.is_delta(self.embeddings):
            _merge_part_bytes(self.embeddings, staged=1)

    def vacuum_embeddings(self, keep: Iterable[str]) -> int:
        """Delete the vectors of every encoder not in ``keep``; the rows removed. The files they were
        in are vacuumed at once (no time travel to them: the store is a cache)."""
        from deltalake import DeltaTable

        if not lakehouse.is_delta(self.embeddings):
            return 0
        kept = sorted(check_fingerprint(e) for e in keep)
        table = DeltaTable(str(self.embeddings))
        predicate = f"encoder NOT IN ({', '.join(repr(e) for e in kept)})" if kept else "true"
        metrics = table.delete(predicate)
        table.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
        return int(metrics.get("num_deleted_rows", 0))

    def forget_embeddings(self, run_ids: Collection[str]) -> int:
        """Delete the vectors these runs stored; the rows removed."""
        from deltalake import DeltaTable

        if not run_ids or not lakehouse.is_delta(self.embeddings):
            return 0
        listed = ", ".join(f"'{reports.check_run_id(r)}'" for r in sorted(run_ids))
        metrics = DeltaTable(str(self.embeddings)).delete(f"run_id IN ({listed})")
        return int(metrics.get("num_deleted_rows", 0))

    def embedding_counts(self) -> dict[str, int]:
        """Stored vectors per encoder fingerprint (the encoder column counted a batch at a time)."""
        if not lakehouse.is_delta(self.embeddings):
            return {}
        counts: Counter[str] = Counter()
        for batch in lakehouse.scan(self.embeddings, ["encoder"]):
            for v in batch.column("encoder").value_counts().to_pylist():
                counts[str(v["values"])] += int(v["counts"])
        return dict(counts)


# What one append into the lakehouse embedding store carries: delta-rs holds several times a write's
# bytes while it writes them (docs/benchmarks.md, "The embedding store's writes")
STORE_PART_BYTES = 64 * 2**20


def _store_parts(source: Any, rows: int, size: int, part_bytes: int) -> Iterator[pa.Table]:
    """The store rows of ``source`` (a Parquet dataset of ``rows`` rows in ``size`` bytes) as
    tables of about ``part_bytes`` each."""
    schema = embeddings_schema()
    per_part = max(1, part_bytes * rows // max(size, 1))
    batches: list[pa.RecordBatch] = []
    held = 0
    # the system allocator: delta-rs frees the parts' buffers from its own threads, which the default
    # pool (mimalloc) keeps rather than returns, so the process would grow by every part written
    scan = {
        **lakehouse.LOW_MEMORY_SCAN,
        "batch_size": min(per_part, 16_384),
        "memory_pool": pa.system_memory_pool(),
    }
    for batch in source.to_batches(**scan):
        batches.append(batch.select(schema.names).cast(schema))
        held += batch.num_rows
        if held >= per_part:
            yield pa.Table.from_batches(batches, schema)
            batches, held = [], 0
    if batches:
        yield pa.Table.from_batches(batches, schema)


def _merge_part_bytes(store: Path, staged: int) -> int:
    """What each merge of ``staged`` bytes into ``store`` may carry: delta-rs's MERGE holds about
    three times the whole store and five times what it carries (measured in docs/benchmarks.md,
    "The embedding store's writes"), and each one reads and rewrites the store, so a part is as
    large as half the memory left beside the store allows - the whole night where it fits - and
    never smaller than :data:`STORE_PART_BYTES`.

    Raises:
        CatalogEnrichError: not even a part of :data:`STORE_PART_BYTES` fits: what it would take,
            what there is, and what to do instead.
    """
    from deltalake import DeltaTable

    sizes = pa.table(DeltaTable(str(store)).get_add_actions(flatten=True))["size_bytes"]
    stored = int(pc.sum(sizes).as_py() or 0)
    free = available_memory()
    smallest = min(STORE_PART_BYTES, staged)
    need = 3 * stored + 5 * smallest
    if need > free:
        raise CatalogEnrichError(
            f"the embedding store {store} holds {_size(stored)} of vectors: merging into it takes "
            f"about {_size(need)} of this process's memory, {_size(free)} is free; these "
            "vectors are not stored (their products are encoded again when next scored). A catalog "
            "this large keeps its store on PostgreSQL (catalog.kind: postgres), or runs with "
            "inference.embedding_store: false"
        )
    return max(smallest, (free - 3 * stored) // 10)


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def available_memory(listing: Path = Path("/proc/self/cgroup")) -> int:
    """Bytes this process may still allocate: the machine's available memory, or less where a
    memory cgroup this process is in (``listing`` names them; its own or a parent: a container's or
    a YARN container's limit) leaves less. A cgroup's reclaimable page cache (its inactive files)
    counts as free, as the kernel frees it before it refuses memory."""
    import psutil

    free = int(psutil.virtual_memory().available)
    for folder, limit, used, cache in _memory_cgroups(listing):
        try:
            cap, now = (folder / limit).read_text().strip(), (folder / used).read_text().strip()
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
            reclaimable = int(stat.get(cache, 0))
        except (OSError, ValueError):
            continue
        if cap.isdigit() and now.isdigit():
            free = min(free, max(int(cap) - int(now) + reclaimable, 0))
    return free


# cgroup v2 and v1: where the memory controller is mounted, its limit, its usage (page cache
# included) and, in memory.stat, the page cache the kernel reclaims first
_CGROUP_MEMORY = {
    2: (Path("/sys/fs/cgroup"), "memory.max", "memory.current", "inactive_file"),
    1: (
        Path("/sys/fs/cgroup/memory"),
        "memory.limit_in_bytes",
        "memory.usage_in_bytes",
        "total_inactive_file",
    ),
}


def _memory_cgroups(listing: Path) -> Iterator[tuple[Path, str, str, str]]:
    """The memory cgroups ``listing`` (a ``/proc/<pid>/cgroup``) puts its process in, its own
    first, then each parent up to the mount: a folder, its limit file, its usage file and its
    reclaimable page cache's key in ``memory.stat``."""
    try:
        lines = listing.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        version = 2 if controllers == "" else 1 if "memory" in controllers.split(",") else None
        if version is None:
            continue
        mount, limit, used, cache = _CGROUP_MEMORY[version]
        folder = mount / path.strip("/")
        if not folder.is_dir():  # a cgroup namespace: the mount is this process's own cgroup
            folder = mount
        for level in (folder, *folder.parents):
            yield level, limit, used, cache
            if level == mount:
                break
