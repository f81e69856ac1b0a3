"""The embedded lakehouse: Delta tables written with ``deltalake`` (delta-rs), or plain Parquet.

No JVM is needed here; Spark reads the same tables through :func:`data_files` (a Delta table's
current snapshot) or natively where Delta Lake is installed on the cluster.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from catalog_enrichment.errors import CatalogEnrichError, ContractError

__all__ = [
    "TableFormat",
    "count_rows",
    "data_files",
    "dataset",
    "deleted_file",
    "deletion_vectors",
    "file_path",
    "is_delta",
    "pinned_version",
    "read_products_of",
    "read_table",
    "read_where",
    "scan",
    "schema_of",
    "table_format",
    "table_version",
    "write_table",
]

TableFormat = Literal["delta", "parquet"]


def is_delta(path: str | Path) -> bool:
    """Whether ``path`` holds a Delta table (its ``_delta_log``)."""
    return (Path(path) / "_delta_log").is_dir()


def table_format(path: str | Path) -> TableFormat:
    """``delta`` when ``path`` holds a ``_delta_log``, ``parquet`` for Parquet file(s)."""
    p = Path(path)
    if is_delta(p):
        return "delta"
    if (p.is_file() and p.suffix == ".parquet") or (p.is_dir() and any(p.rglob("*.parquet"))):
        return "parquet"
    raise ContractError(f"no Delta or Parquet table at {p}")


def write_table(
    path: str | Path,
    data: pa.Table | pa.RecordBatchReader,
    *,
    fmt: TableFormat = "delta",
    partition_by: Sequence[str] = (),
    mode: Literal["overwrite", "append", "error"] = "error",
) -> None:
    """Write ``data`` as a Delta table (one atomic commit) or a hive-partitioned Parquet folder.

    Parquet file names are deterministic (``part-{i}.parquet`` per partition), so the same data
    gives byte-identical files.
    """
    target = Path(path)
    if fmt == "delta":
        from deltalake import write_deltalake

        write_deltalake(str(target), data, partition_by=list(partition_by) or None, mode=mode)
        return
    if target.exists():
        if mode == "error":
            raise ContractError(f"table already exists: {target}")
        if mode == "overwrite":
            shutil.rmtree(target)
    schema = data.schema
    # Deterministic output: one thread, input order kept, so the same rows give the same bytes.
    part_schema = pa.schema([schema.field(name) for name in partition_by]) if partition_by else None
    ds.write_dataset(
        data,
        str(target),
        format="parquet",
        partitioning=ds.partitioning(part_schema, flavor="hive") if part_schema is not None else None,
        basename_template="part-{i}.parquet",
        use_threads=False,
        preserve_order=True,
        existing_data_behavior="overwrite_or_ignore",
    )


def read_table(
    path: str | Path,
    *,
    columns: Sequence[str] | None = None,
    version: int | None = None,
    schema: pa.Schema | None = None,
) -> pa.Table:
    """Read a whole Delta (optionally at ``version``) or Parquet table into Arrow.

    ``schema`` types hive partition columns of a Parquet folder (otherwise they are inferred).
    """
    read = list(columns) if columns else None
    return dataset(path, version=version, schema=schema, columns=read).to_table(columns=read)


def read_where(path: str | Path, where: pc.Expression, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of the Delta table at ``path`` that ``where`` keeps (``columns`` only, where given):
    pyarrow's dataset reads only the files and row groups it must; a table with deletion vectors
    (an outside writer's DELETE), which that dataset cannot honour, is streamed a file at a time
    and each batch filtered, so memory holds the rows kept, never the table."""
    from deltalake import DeltaTable

    table = DeltaTable(str(path))
    if not _has_deletion_vectors(table):
        return table.to_pyarrow_dataset().to_table(columns=list(columns) if columns else None, filter=where)
    schema, batches = _deletion_batches(table)  # typed as the table
    names = list(columns) if columns else schema.names
    kept = [pa.Table.from_batches([b]).filter(where).select(names) for b in batches]
    return pa.concat_tables([schema.empty_table().select(names), *kept])


def pinned_version(path: str | Path, version: int | None, setting: str) -> int | None:
    """The Delta version to read ``path`` at: ``version`` (checked: it exists), else the latest;
    None for a Parquet table, which has no versions (``version`` given for one is an error).

    Raises:
        CatalogEnrichError: ``version`` is not one of the table's (``setting`` names where it came from).
    """
    latest = table_version(path)
    if version is None:
        return latest
    if latest is None:
        raise CatalogEnrichError(
            f"{setting} is {version}, but {path} is not a Delta table: it has no versions"
        )
    if not 0 <= version <= latest:
        raise CatalogEnrichError(f"{setting} is {version}, but {path} has versions 0 to {latest}")
    return version


def dataset(
    path: str | Path,
    *,
    version: int | None = None,
    schema: pa.Schema | None = None,
    columns: Sequence[str] | None = None,
) -> ds.Dataset:
    """A Delta (optionally at ``version``) or Parquet table as a ``pyarrow.dataset`` (nothing read
    yet); ``schema`` types a Parquet folder's hive partition columns. A Delta table with deletion
    vectors, which ``pyarrow.dataset`` cannot honour, is read here, whole (``columns`` only, where
    given): for its schema call :func:`schema_of`, to stream it :func:`scan`."""
    target = Path(path)
    if table_format(target) == "delta":
        from deltalake import DeltaTable

        table = DeltaTable(str(target), version=version)
        if _has_deletion_vectors(table):
            names, batches = _deletion_batches(table, columns)
            return ds.dataset(pa.Table.from_batches(list(batches), schema=names))
        return table.to_pyarrow_dataset()
    if target.is_file():
        return ds.dataset(str(target), format="parquet")
    return ds.dataset(
        _parquet_files(target),
        format="parquet",
        schema=schema,
        partitioning="hive",
        partition_base_dir=str(target),
    )


def schema_of(path: str | Path, *, version: int | None = None) -> pa.Schema:
    """The table's Arrow schema, no row read (a Delta table with deletion vectors included)."""
    table = _with_deletion_vectors(path, version)
    return dataset(path, version=version).schema if table is None else _deletion_batches(table)[0]


def count_rows(path: str | Path, *, version: int | None = None) -> int:
    """The table's rows (a Delta table's deleted rows left out: its first column streamed)."""
    if _with_deletion_vectors(path, version) is None:
        return int(dataset(path, version=version).count_rows())
    first = schema_of(path, version=version).names[:1]
    return sum(batch.num_rows for batch in scan(path, first, version=version))


def _has_deletion_vectors(table: Any) -> bool:
    return "deletionVectors" in set(table.protocol().reader_features or ())


def _with_deletion_vectors(path: str | Path, version: int | None) -> Any | None:
    """The Delta table at ``path`` where it has deletion vectors, else None."""
    if table_format(path) != "delta":
        return None
    from deltalake import DeltaTable

    table = DeltaTable(str(path), version=version)
    return table if _has_deletion_vectors(table) else None


def _deletion_batches(
    table: Any, columns: Sequence[str] | None = None
) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """A Delta table with deletion vectors (the default of current Delta writers), which
    ``pyarrow.dataset`` cannot honour: its schema (``columns`` only, where given) and its rows,
    lazily - data files read one at a time (ordered by the product ids they hold, then path), a
    batch at a time, those columns only, each file's deleted rows dropped and its partition values
    added, typed as the table's schema: memory holds a batch and the files' deletion masks, never
    the table, and every pass reads the rows in the same order (a streamed training's passes read
    them alike). A table with column mapping (its files' column names are not the table's) is read
    through delta-rs' query engine instead, whole."""
    import pyarrow.parquet as pq

    schema = pa.schema(table.schema().to_arrow())
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    if "columnMapping" in set(table.protocol().reader_features or ()):
        from deltalake import QueryBuilder

        def whole() -> Iterator[pa.RecordBatch]:
            rows = QueryBuilder().register("t", table).execute("SELECT * FROM t").read_all()
            yield from pa.table(rows).select(schema.names).cast(schema).to_batches()

        return schema, whole()
    root = Path(unquote(table.table_uri.removeprefix("file://")))
    partitions = table.metadata().partition_columns

    def batches() -> Iterator[pa.RecordBatch]:
        keep = {deleted_file(uri): mask.values for uri, mask in deletion_vectors(table)}
        adds = sorted(
            (
                str(a.get("min.product_id") or ""),
                str(a.get("max.product_id") or ""),
                str(root / unquote(a["path"])),
                {c: a.get(f"partition.{c}") for c in partitions},
            )
            for a in pa.table(table.get_add_actions(flatten=True)).to_pylist()
        )
        for _, _, path, values in adds:
            mask, offset = keep.get(path), 0
            parquet = pq.ParquetFile(path)
            present = [f.name for f in schema if f.name in parquet.schema_arrow.names]
            read = present or parquet.schema_arrow.names[:1]  # a column at least: the rows' count
            for batch in parquet.iter_batches(batch_size=DELETION_SCAN_ROWS, columns=read):
                n, columns = batch.num_rows, dict(zip(batch.schema.names, batch.columns, strict=True))
                rows = pa.table(
                    [
                        columns[f.name].cast(f.type)
                        if f.name in columns
                        else pa.array([values.get(f.name)] * n, f.type)
                        for f in schema
                    ],
                    schema=schema,
                )
                if mask is not None:  # a vector shorter than the file keeps the rows past its end
                    kept = mask.slice(offset, n)
                    rows = rows.filter(
                        pa.concat_arrays([kept, pa.array([True] * (n - len(kept)), pa.bool_())])
                    )
                offset += n
                yield from rows.to_batches()

    return schema, batches()


def deletion_vectors(table: Any) -> Iterator[tuple[str, Any]]:
    """(file URI, its selection vector: True keeps the row) of each data file with a deletion vector."""
    for batch in pa.table(table.deletion_vectors()).to_batches():
        yield from zip(batch.column(0).to_pylist(), batch.column(1), strict=True)


def deleted_file(uri: str) -> str:
    """The local path of a data file as delta-rs' ``deletion_vectors`` names it: the whole URI
    percent-encoded once more than the file's own name on disk (a partition folder ``k=a%20b``
    comes as ``k=a%2520b``), so it is decoded whole - root and file alike."""
    return unquote(uri.removeprefix("file://"))


def _parquet_files(folder: Path) -> list[str]:
    """A Parquet table folder's data files: its ``.parquet`` files outside hidden folders (others, such
    as images or a generator's notes beside the data, are not the table's)."""
    return [
        str(p)
        for p in sorted(folder.rglob("*.parquet"))
        if not any(part.startswith(("_", ".")) for part in p.relative_to(folder).parts)
    ]


# rows per batch of a table with deletion vectors, read file by file
DELETION_SCAN_ROWS = 16_384

# A scan whose memory is bounded by a few small batches, not by a row group read whole in advance
LOW_MEMORY_SCAN: dict[str, object] = {
    "batch_size": 16_384,
    "batch_readahead": 1,
    "fragment_readahead": 1,
    "fragment_scan_options": ds.ParquetFragmentScanOptions(pre_buffer=False, use_buffered_stream=True),
}


def scan(
    path: str | Path,
    columns: Sequence[str] | None = None,
    *,
    version: int | None = None,
    batch_rows: int = 16_384,
) -> Iterator[pa.RecordBatch]:
    """The table's rows in record batches of at most ``batch_rows``, holding a few batches in memory,
    never the table. One thread reads the files in an order fixed by what they hold (the smallest
    and largest product id of their first row group): the same rows written twice, under other file
    names or in another log order, read in the same order (a Delta table with deletion vectors:
    streamed file by file, :func:`_deletion_batches`)."""
    table = _with_deletion_vectors(path, version)
    if table is not None:
        for batch in _deletion_batches(table, columns)[1]:
            for start in range(0, batch.num_rows, batch_rows):
                yield batch.slice(start, batch_rows)
        return
    source = _in_content_order(dataset(path, version=version))
    scan_options = {**LOW_MEMORY_SCAN, "batch_size": batch_rows}
    for batch in source.to_batches(
        columns=list(columns or source.schema.names), use_threads=False, **scan_options
    ):
        if batch.num_rows:
            yield batch


def _in_content_order(source: ds.Dataset) -> ds.Dataset:
    """``source`` with its files sorted by their first row group's product id range (then path)."""
    if not isinstance(source, ds.FileSystemDataset):
        return source

    def key(fragment: ds.ParquetFileFragment) -> tuple[str, str, str]:
        fragment.ensure_complete_metadata()  # the footer only
        groups = fragment.row_groups
        ids = (groups[0].statistics or {}).get("product_id") if groups else None
        low, high = (str(ids["min"]), str(ids["max"])) if ids else ("", "")
        return low, high, fragment.path

    fragments = sorted(source.get_fragments(), key=key)
    return ds.FileSystemDataset(fragments, source.schema, source.format, source.filesystem)


def read_products_of(
    path: str | Path,
    product_ids: Iterable[str],
    columns: Sequence[str] | None = None,
    *,
    version: int | None = None,
    where: Mapping[str, str] | None = None,
) -> pa.Table:
    """The rows of a Delta (optionally at ``version``) or Parquet table whose ``product_id`` is one
    of ``product_ids`` (and whose columns hold the values of ``where``; ``columns`` only, when
    given), filtered batch by batch: a few rows of a large table never hold the whole table, or a
    whole row group, in memory."""
    schema = schema_of(path, version=version)
    wanted = pa.array(sorted(set(product_ids)), pa.string())
    columns = list(columns or schema.names)
    read = list(dict.fromkeys([*columns, *(where or {})]))
    kept = []
    for batch in scan(path, read, version=version):
        keep = pc.is_in(batch.column("product_id").cast(pa.string()), value_set=wanted)
        for name, value in (where or {}).items():
            keep = pc.and_(keep, pc.equal(batch.column(name), value))
        kept.append(batch.filter(keep).select(columns))
    return pa.Table.from_batches(kept, schema=pa.schema([schema.field(c) for c in columns]))


def table_version(path: str | Path) -> int | None:
    """Current Delta version, ``None`` for Parquet."""
    if table_format(path) != "delta":
        return None
    from deltalake import DeltaTable

    return int(DeltaTable(str(path)).version())


def file_path(uri: str, table_uri: str) -> str:
    """A data file of the Delta table at ``table_uri`` (``DeltaTable.table_uri``) as delta-rs names
    it, as a path to open. delta-rs gives the table's location percent-encoded (a folder named with a
    space: ``%20``), then the file's own path as it is on disk (a partition value's escapes are part
    of its folder's name): only the location is decoded."""
    root = table_uri.removeprefix("file://").rstrip("/") + "/"
    uri = uri.removeprefix("file://")
    return unquote(root) + uri[len(root) :] if uri.startswith(root) else uri


def data_files(path: str | Path) -> list[str]:
    """The data files of the table's current snapshot (Delta: from the log; Parquet: on disk)."""
    target = Path(path)
    if table_format(target) == "delta":
        from deltalake import DeltaTable

        table = DeltaTable(str(target))
        return sorted(file_path(u, table.table_uri) for u in table.file_uris())
    if target.is_file():
        return [str(target)]
    return _parquet_files(target)
