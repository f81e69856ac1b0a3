"""Reading the products table into Spark: contract check, partition filter, incremental window.

Delta tables are read through their current snapshot's file list (``DeltaTable.file_uris``, pruned
by the partition filter) with Spark's Parquet reader, so no Delta jars are needed; plain Parquet
folders (hive-partitioned) are read directly. The contract's Spark schema is imposed, so a column
of the wrong type fails loudly and partition columns get their contract type.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds

from catalog_enrichment.catalog.lakehouse import table_format
from catalog_enrichment.contracts import Contract
from catalog_enrichment.errors import ContractError

__all__ = ["Partition", "list_partitions", "parse_partition", "read_products", "table_columns"]


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
        try:
            dt.date.fromisoformat(value)
        except ValueError:
            raise ContractError(f"--partition {column}: {value!r} is not a date (YYYY-MM-DD)") from None
    return Partition(column, value)


def table_columns(path: str | Path) -> list[str]:
    """Column names of a Delta or Parquet table (partition columns included)."""
    if table_format(path) == "delta":
        from deltalake import DeltaTable

        return [f.name for f in DeltaTable(str(path)).schema().fields]
    return list(ds.dataset(str(path), format="parquet", partitioning="hive").schema.names)


def list_partitions(path: str | Path, column: str) -> list[str]:
    """The distinct values of a partition column, sorted."""
    if table_format(path) == "delta":
        from deltalake import DeltaTable

        return sorted({p[column] for p in DeltaTable(str(path)).partitions() if p.get(column) is not None})
    root = Path(path)
    return sorted({d.name.split("=", 1)[1] for d in root.glob(f"{column}=*") if d.is_dir()})


def read_products(
    spark: Any,
    path: str | Path,
    contract: Contract,
    *,
    partition: Partition | None = None,
    since: dt.datetime | None = None,
) -> Any:
    """The products as a Spark DataFrame with the contract's columns.

    Raises:
        ContractError: no table at ``path``, or a contract column is missing.
    """
    from pyspark.sql import functions as F

    fmt = table_format(path)
    missing = contract.missing_columns(table_columns(path))
    if missing:
        raise ContractError(
            f"products table {path} lacks contract column(s) {missing} (see schemas/products.yaml)"
        )
    schema = contract.spark_schema(enforce_nullability=False)
    root = str(Path(path).resolve())
    if fmt == "delta":
        from deltalake import DeltaTable

        filters = [(partition.column, "=", partition.value)] if partition else None
        files = DeltaTable(root).file_uris(file_pruning_predicate=filters)
        if not files:
            df = spark.createDataFrame([], schema)
        else:
            df = spark.read.schema(schema).option("basePath", root).parquet(*files)
    else:
        df = spark.read.schema(schema).parquet(root)
    if partition is not None:
        df = df.where(
            F.col(partition.column) == F.lit(partition.value).cast(schema[partition.column].dataType)
        )
    if since is not None:
        df = df.where(F.col("updated_at") > F.lit(since))
    return df.select(*contract.names)
