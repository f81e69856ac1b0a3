"""Reading the products table into Spark: contract check, partition filter, incremental window.

Delta tables are read through their current snapshot's file list (``DeltaTable.file_uris``, pruned
by the partition filter; schema, files and deletion vectors all of that one version) with Spark's
Parquet reader, so no Delta jars are needed; plain Parquet folders (hive-partitioned) through
theirs. The contract's Spark schema is imposed (partition columns get their contract type) after
each file's own schema has been checked against it.

The table's protocol is honoured, not bypassed: rows a deletion vector removed stay removed (the
deletion vectors of the files the read keeps, read by delta-rs, are joined away on Spark's
``_metadata.row_index``); a reader feature this read cannot honour (column mapping: the files hold
physical column names) is refused in one line that names it and the fix.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from catalog_enrichment.catalog.lakehouse import deleted_file, deletion_vectors, file_path, table_format
from catalog_enrichment.contracts import Contract
from catalog_enrichment.errors import ContractError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "Partition",
    "changed_since",
    "in_partitions",
    "list_partitions",
    "parse_partition",
    "read_products",
    "table_columns",
    "timeless",
]


@dataclass(frozen=True)
class Partition:
    """A partition filter ``column=value`` (value kept as written, e.g. ``2026-11-01``)."""

    column: str
    value: str

    def __str__(self) -> str:
        return f"{self.column}={self.value}"


def parse_partition(text: str | None, contract: Contract) -> Partition | None:
    """``"ingest_date=2026-11-01"`` -> :class:`Partition`; checks the column partitions the table."""
    if not text:
        return None
    column, sep, value = text.partition("=")
    column, value = column.strip(), value.strip()
    if not sep or not column or not value:
        raise ContractError(f"--partition must look like COLUMN=VALUE, got {text!r}")
    if column not in contract.partition_by:
        raise ContractError(
            f"--partition column {column!r} is not a partition column of {contract.name} "
            f"(partitioned by {list(contract.partition_by)})"
        )
    if contract.field(column).type == "date":
        try:  # ISO's other forms (20261101, 2026-W44-7) name no partition folder and no Spark date
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
                raise ValueError(value)
            dt.date.fromisoformat(value)
        except ValueError:
            raise ContractError(f"--partition {column}: {value!r} is not a date (YYYY-MM-DD)") from None
    return Partition(column, value)


# Delta reader features this read honours; log-level ones are delta-rs's to read.
_HONOURED = frozenset({"deletionVectors", "timestampNtz", "v2Checkpoint", "vacuumProtocolCheck"})
_FIX = {
    "columnMapping": "the data files hold physical column names; export the products to a table "
    "without column mapping (CREATE TABLE … AS SELECT with delta.columnMapping.mode 'none')",
}


def _check_protocol(table: Any, root: Path) -> None:
    """Refuse, in one line, a Delta table whose reader features this read cannot honour."""
    protocol = table.protocol()
    mode = table.metadata().configuration.get("delta.columnMapping.mode", "none")
    features = set(protocol.reader_features or ())
    if mode != "none":
        features.add("columnMapping")
    refused = sorted(features - _HONOURED)
    if refused:
        fixes = "; ".join(f"{f}: {_FIX.get(f, 'export the products to a table without it')}" for f in refused)
        raise ContractError(
            f"products table {root} uses Delta reader feature(s) {refused}, which this job's read "
            f"cannot honour ({fixes})"
        )


def _deleted_rows(root: Path, files: Collection[str], version: int | None = None) -> dict[str, pa.Array]:
    """Data file (local path) of ``files``, the ones the read keeps -> the row indexes (int64) its
    deletion vector removes (in the table's ``version``, default the latest: that of ``files``). The
    other files' vectors are left out: a table upserted by MERGE holds millions of deleted rows
    between two OPTIMIZEs, and a one-partition read needs its partition's only."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    table = DeltaTable(str(root), version=version)
    if "deletionVectors" not in set(table.protocol().reader_features or ()):
        return {}
    kept, deleted = set(files), {}
    for uri, keep in deletion_vectors(table):
        if (path := deleted_file(uri)) in kept:
            deleted[path] = pc.indices_nonzero(pc.invert(keep.values)).cast(pa.int64())
    return deleted


def _snapshot(root: Path) -> Any | None:
    """The Delta table at ``root``, loaded once for a whole read: its schema, file list and deletion
    vectors are then one version's (a commit landing meanwhile is the next read's); None for a
    Parquet table."""
    if table_format(root) != "delta":
        return None
    from deltalake import DeltaTable

    return DeltaTable(str(root))


def table_columns(path: str | Path) -> list[str]:
    """The columns of the table at ``path`` as :func:`read_products` checks them against the
    contract, no row read: a Delta table's schema's; a Parquet table's in any of its data files or
    partition folders (a column only some files hold is the table's)."""
    root = Path(path).resolve()
    snapshot = _snapshot(root)
    if snapshot is not None:
        return [f.name for f in snapshot.schema().fields]
    return _footers(root, None, None)[0]


def _footers(
    root: Path, partition: Partition | None, snapshot: Any | None
) -> tuple[list[str], dict[str, pa.Schema]]:
    """The table's columns (partition columns included) and the Arrow schema of every data file the
    read selects, each footer read once. A Delta table's (``snapshot``: the version read) columns
    are its schema's; a Parquet folder's are those of all its data files (files that are not
    Parquet data, e.g. images beside them, are ignored)."""
    if snapshot is not None:
        _check_protocol(snapshot, root)
        columns = [f.name for f in snapshot.schema().fields]
        return columns, {f: _read_footer(f) for f in _data_files(root, partition, snapshot)}
    every = {f: _read_footer(f) for f in _data_files(root, None)}
    names: dict[str, None] = {}
    for file, footer in every.items():
        relative = Path(file).relative_to(root).parts[:-1] if root.is_dir() else ()
        names.update(dict.fromkeys(footer.names))
        names.update(dict.fromkeys(p.split("=", 1)[0] for p in relative if "=" in p))
    selected = _data_files(root, partition) if partition else list(every)
    return list(names), {f: every[f] for f in selected}


def _read_footer(file: str) -> pa.Schema:
    """The file's Arrow schema (:func:`_footer`), read once per version of the file in a process: a
    backfill's runs each read every partition's footers (a partition run's other partitions)."""
    try:
        stat = os.stat(file)
    except OSError:
        return _footer(file)
    return _footer_of(file, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _footer_of(file: str, size: int, mtime_ns: int) -> pa.Schema:
    """:func:`_footer` of ``file`` as it is at ``size`` and ``mtime_ns`` (the cache's key: a file
    written again is read again)."""
    return _footer(file)


def _footer(file: str) -> pa.Schema:
    """The file's Arrow schema, its INT96 timestamps (Spark's default Parquet timestamp, which Arrow
    reports as nanoseconds) as the microsecond timestamps Spark reads them as."""
    try:
        with pq.ParquetFile(file) as parquet:
            schema, leaves = parquet.schema_arrow, parquet.schema
    except (OSError, pa.ArrowInvalid) as exc:
        raise ContractError(f"products file {file} is not readable Parquet: {exc}") from None
    for name in {
        leaves.column(i).path for i in range(len(leaves)) if leaves.column(i).physical_type == "INT96"
    }:
        if name in schema.names:  # a top-level column
            i = schema.get_field_index(name)
            schema = schema.set(i, schema.field(i).with_type(pa.timestamp("us", schema.field(i).type.tz)))
    return schema


def list_partitions(path: str | Path, column: str) -> list[str]:
    """The distinct values of a partition column, sorted."""
    if table_format(path) == "delta":
        from deltalake import DeltaTable

        return sorted({p[column] for p in DeltaTable(str(path)).partitions() if p.get(column) is not None})
    root = Path(path)
    return sorted({d.name.split("=", 1)[1] for d in root.glob(f"{column}=*") if d.is_dir()})


def read_products(
    spark: SparkSession,
    path: str | Path,
    contract: Contract,
    *,
    partition: Partition | None = None,
    since: dt.datetime | None = None,
    retry: Sequence[str] = (),
    earliest: dt.datetime | None = None,
    caught_up: Mapping[Partition, dt.datetime] | None = None,
    require_columns: bool = True,
) -> DataFrame:
    """The products as a Spark DataFrame with the contract's columns, and only those (with
    ``since``: the rows changed after it, those of the products in ``retry`` and the
    :func:`timeless` ones, and with ``caught_up`` each of its partitions' rows changed after its own
    time and every row of the others:
    :func:`in_window`; ``require_columns=False``: without the contract columns the table lacks).

    Every data file's own schema is checked first (its footer, no data), so a column Spark could
    not read as the contract's type fails here with one line naming the column and the file. What
    everyday exports write is read as the contract says: a column of Arrow type ``null`` (pandas'
    all-null object column) as typed nulls, nanosecond timestamps (pandas' default) as microseconds;
    a column a file lacks (an older file of an evolved table) is null there.

    Raises:
        ContractError: no table at ``path``, a contract column missing from the table
            (``require_columns``), or a column of a type the contract's cannot be read from.
    """
    root = Path(path).resolve()
    snapshot = _snapshot(root)
    columns, files = _footers(root, partition, snapshot)
    missing = contract.missing_columns(columns)
    if missing and require_columns:
        raise ContractError(
            f"products table {path} lacks contract column(s) {missing} (see schemas/products.yaml)"
        )
    schema = contract.spark_schema(enforce_nullability=False)
    deleted = _deleted_rows(root, files, snapshot.version()) if files and snapshot is not None else {}
    if not files:
        df = spark.createDataFrame([], schema)
    else:
        parts = [
            _read_files(spark, root, group, layout, contract, bool(deleted))
            for layout, group in _group_by_layout(files, contract).items()
        ]
        df = reduce(lambda a, b: a.unionByName(b), parts)
        if deleted:
            df = _without_deleted(spark, df, deleted)
    kept = [name for name in contract.names if name not in missing]
    return in_window(df, schema, partition, since, retry, earliest, caught_up).select(*kept)


def _read_files(
    spark: SparkSession,
    root: Path,
    files: list[str],
    layout: tuple[frozenset[str], frozenset[str]],
    contract: Contract,
    positions: bool,
) -> DataFrame:
    """Data files of one layout (columns of Arrow type null, nanosecond timestamps) read as the
    contract's columns (with their file and row position, for deletion vectors, when ``positions``)."""
    from pyspark.sql import functions as F

    nulls, nanos = layout
    schema = contract.spark_schema(enforce_nullability=False)
    if nanos:  # read as INT64 nanoseconds, then cut to Spark's microseconds
        spark.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
    reader = spark.read.schema(_read_schema(schema, drop=nulls, as_long=nanos))
    df = reader.option("basePath", str(root)).parquet(*files) if root.is_dir() else reader.parquet(*files)
    for name in nulls:
        df = df.withColumn(name, F.lit(None).cast(schema[name].dataType))
    for name in nanos:
        df = df.withColumn(name, F.timestamp_micros(F.floor(F.col(name) / 1000)))
    where = [F.col("_metadata.file_path").alias(_FILE), F.col("_metadata.row_index").alias(_ROW)]
    return df.select(*contract.names, *(where if positions else []))


def in_window(
    df: DataFrame,
    schema: Any,
    partition: Partition | None,
    since: dt.datetime | None,
    retry: Sequence[str],
    earliest: dt.datetime | None = None,
    caught_up: Mapping[Partition, dt.datetime] | None = None,
) -> DataFrame:
    """``df``'s rows of ``partition`` (None: every partition) changed after ``since``, of a product
    to ``retry`` or :func:`timeless` (None: every row), whatever catalog read them. With
    ``caught_up`` (partition -> the time after which its rows are new to the run: a run over the
    whole table that reads on from a backfill's partition runs), a partition's rows changed after
    its own time, and every row of the other partitions and of none."""
    from pyspark.sql import functions as F

    if partition is not None:
        df = df.where(F.col(partition.column) == _typed(partition, schema))
    if since is None:
        return df
    if not caught_up:
        return df.where(changed_since(since, retry, earliest))
    # one flat condition the source can take (Parquet statistics, the JDBC query), then each caught-up
    # partition's own start through a broadcast join: a condition per partition would nest one level
    # deeper each, past the driver's stack at a few hundred partitions
    column, cut = next(iter(caught_up)).column, "_caught_up_after"
    wide = changed_since(min(caught_up.values()), retry, earliest) | ~in_partitions(caught_up, schema)
    starts = df.sparkSession.createDataFrame(
        [(p.value, start) for p, start in caught_up.items()], f"_partition string, {cut} timestamp"
    )
    joined = df.where(wide).join(
        F.broadcast(starts), F.col(column).cast("string") == F.col("_partition"), "left"
    )
    new = F.col(cut).isNull() | (F.col("updated_at") > F.col(cut)) | changed_since(since, retry, earliest)
    return joined.where(new).select(*df.columns)


def in_partitions(partitions: Collection[Partition], schema: Any) -> Any:
    """A row of one of ``partitions`` (of one partition column; ``schema``: the DataFrame's), never
    null (a Spark condition)."""
    from pyspark.sql import functions as F

    column = F.col(next(iter(partitions)).column)
    return column.isNotNull() & column.isin([_typed(p, schema) for p in partitions])


def _typed(partition: Partition, schema: Any) -> Any:
    from pyspark.sql import functions as F

    return F.lit(partition.value).cast(schema[partition.column].dataType)


def timeless(earliest: dt.datetime | None) -> Any:
    """The rows no watermark places: ``updated_at`` null or before ``earliest`` (a zero or epoch
    default), which validation quarantines (a Spark condition)."""
    from pyspark.sql import functions as F

    at = F.col("updated_at")
    return at.isNull() if earliest is None else at.isNull() | (at < F.lit(earliest))


def changed_since(since: dt.datetime, retry: Sequence[str], earliest: dt.datetime | None = None) -> Any:
    """``updated_at`` after ``since``, a product of ``retry``, or a :func:`timeless` row - which an
    incremental run reads too, so one that arrives between two runs gets its quarantine row (a
    Spark condition)."""
    from pyspark.sql import functions as F

    changed = (F.col("updated_at") > F.lit(since)) | timeless(earliest)
    return changed | F.col("product_id").isin(list(retry)) if retry else changed


_FILE, _ROW = "__file", "__row_index"


def read_delta_files(spark: SparkSession, root: Path) -> DataFrame | None:
    """The rows of the Delta table at ``root``'s latest snapshot, read by Spark as Parquet files
    (their own schema) without those its deletion vectors remove (another writer's: Delta-Spark and
    Databricks write them); None where it has no file."""
    from deltalake import DeltaTable
    from pyspark.sql import functions as F

    table = DeltaTable(str(root))
    files = sorted(file_path(u, table.table_uri) for u in table.file_uris())
    if not files:
        return None
    df = spark.read.parquet(*files)
    deleted = _deleted_rows(root, files, table.version())
    if not deleted:
        return df
    where = [F.col("_metadata.file_path").alias(_FILE), F.col("_metadata.row_index").alias(_ROW)]
    return _without_deleted(spark, df.select("*", *where), deleted).drop(_FILE, _ROW)


def _without_deleted(spark: SparkSession, df: DataFrame, deleted: dict[str, pa.Array]) -> DataFrame:
    """``df`` without the rows the deletion vectors remove (a join on file and row index); the
    (file, row index) pairs go to Spark as Arrow columns, no Python object per row."""
    from pyspark.sql import functions as F

    gone = spark.createDataFrame(
        pa.table(
            {
                _FILE: pa.concat_arrays(
                    [pa.repeat(str(Path(file).resolve()), len(rows)) for file, rows in deleted.items()]
                ),
                _ROW: pa.concat_arrays(list(deleted.values())),
            }
        )
    )
    # Spark names the file file:/ or file:///, a space percent-encoded but an accent not: compared
    # decoded (a "+" is one, not a space)
    local = F.regexp_replace(F.regexp_replace(F.col(_FILE), "^file:/+", "/"), "[+]", "%2B")
    return df.withColumn(_FILE, F.url_decode(local)).join(F.broadcast(gone), [_FILE, _ROW], "left_anti")


def _read_schema(schema: Any, *, drop: frozenset[str], as_long: frozenset[str]) -> Any:
    """``schema`` without the ``drop`` fields and with the ``as_long`` ones as LongType."""
    from pyspark.sql.types import LongType, StructField, StructType

    return StructType(
        [
            StructField(f.name, LongType(), True) if f.name in as_long else f
            for f in schema.fields
            if f.name not in drop
        ]
    )


def _data_files(root: Path, partition: Partition | None, snapshot: Any | None = None) -> list[str]:
    """The table's data files (a Delta table's: its ``snapshot``'s), pruned by the partition filter."""
    if snapshot is not None:
        filters = [(partition.column, "=", partition.value)] if partition else None
        return [file_path(u, snapshot.table_uri) for u in snapshot.file_uris(file_pruning_predicate=filters)]
    if root.is_file():
        return [str(root)]
    files = []
    for file in sorted(root.rglob("*.parquet")):
        parts = file.relative_to(root).parts
        if any(p.startswith(("_", ".")) for p in parts):  # Spark's and Arrow's hidden files
            continue
        prefix = f"{partition.column}=" if partition else None
        if prefix and any(p.startswith(prefix) and p != str(partition) for p in parts[:-1]):
            continue
        files.append(str(file))
    return files


def _group_by_layout(
    files: dict[str, pa.Schema], contract: Contract
) -> dict[tuple[frozenset[str], frozenset[str]], list[str]]:
    """The files by (columns of Arrow type null, nanosecond timestamp columns); checks every other
    contract column the file holds can be read as the contract's type."""
    expected = contract.arrow_schema(enforce_nullability=False)
    groups: dict[tuple[frozenset[str], frozenset[str]], list[str]] = {}
    for file, found in files.items():
        nulls, nanos = set(), set()
        for name in expected.names:
            if name not in found.names:
                continue
            have, want = found.field(name).type, expected.field(name).type
            if pa.types.is_null(have):
                nulls.add(name)
            elif pa.types.is_timestamp(have) and pa.types.is_timestamp(want) and have.unit == "ns":
                nanos.add(name)
            elif not _readable_as(have, want):
                raise ContractError(
                    f"products column {name!r} is {have} in {file}, but the contract says {want} "
                    f"(schemas/products.yaml): write it as {want} in the export"
                )
        groups.setdefault((frozenset(nulls), frozenset(nanos)), []).append(file)
    return groups


def _readable_as(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether Spark reads a Parquet column written as ``have`` as the contract's ``want``."""
    t = pa.types
    if t.is_dictionary(have):  # a pandas Categorical: Parquet holds its values
        have = have.value_type
    if t.is_string(want):
        return t.is_string(have) or t.is_large_string(have) or t.is_string_view(have)
    if t.is_binary(want):
        return t.is_binary(have) or t.is_large_binary(have) or t.is_binary_view(have)
    if t.is_timestamp(want):
        return t.is_timestamp(have)
    if t.is_date(want):
        return t.is_date(have)
    if t.is_map(want):
        return (
            t.is_map(have)
            and _readable_as(have.key_type, want.key_type)
            and _readable_as(have.item_type, want.item_type)
        )
    if t.is_list(want):
        return (t.is_list(have) or t.is_large_list(have)) and _readable_as(have.value_type, want.value_type)
    return bool(have == want)
