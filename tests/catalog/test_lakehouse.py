"""The embedded lakehouse reads back exactly what it wrote, in Delta and in Parquet."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from catalog_enrichment.catalog.lakehouse import (
    data_files,
    read_table,
    read_where,
    scan,
    table_format,
    table_version,
    write_table,
)
from catalog_enrichment.errors import ContractError

_SCHEMA = pa.schema([("id", pa.string()), ("n", pa.int64()), ("day", pa.date32())])


def _table(n: int) -> pa.Table:
    days = [dt.date(2026, 11, 1 + i % 3) for i in range(n)]
    return pa.table({"id": [f"p{i}" for i in range(n)], "n": list(range(n)), "day": days}, schema=_SCHEMA)


@pytest.mark.parametrize("fmt", ["delta", "parquet"])
def test_round_trip_partitioned(tmp_path: Path, fmt: str) -> None:
    write_table(tmp_path / "t", _table(30), fmt=fmt, partition_by=["day"])  # type: ignore[arg-type]
    assert table_format(tmp_path / "t") == fmt
    back = read_table(tmp_path / "t", schema=_SCHEMA).select(["id", "n", "day"]).sort_by("n")
    assert back.equals(_table(30))
    assert len({Path(f).parent.name for f in data_files(tmp_path / "t")}) == 3  # one folder per day


def test_a_parquet_folder_s_other_files_are_not_the_table_s(tmp_path: Path) -> None:
    """Images and a generator's notes beside a Parquet table's files are not read as data (pyarrow
    failed on them, and every command reading the table with it)."""
    write_table(tmp_path / "t", _table(30), fmt="parquet", partition_by=["day"])
    (tmp_path / "t" / "images").mkdir()
    (tmp_path / "t" / "images" / "a.jpg").write_bytes(b"\xff\xd8 not parquet")
    (tmp_path / "t" / "generation.json").write_text("{}")
    back = read_table(tmp_path / "t", schema=_SCHEMA).select(["id", "n", "day"]).sort_by("n")
    assert back.equals(_table(30)) and len(data_files(tmp_path / "t")) == 3
    assert sum(b.num_rows for b in scan(tmp_path / "t")) == 30


def test_delta_versions_and_modes(tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_table(path, _table(5))
    write_table(path, _table(5), mode="append")
    assert table_version(path) == 1
    assert read_table(path).num_rows == 10
    assert read_table(path, version=0).num_rows == 5
    with pytest.raises(Exception, match=r"(?i)exists"):
        write_table(path, _table(5), mode="error")


def test_parquet_refuses_to_overwrite_by_default(tmp_path: Path) -> None:
    write_table(tmp_path / "t", _table(4), fmt="parquet")
    with pytest.raises(ContractError, match="already exists"):
        write_table(tmp_path / "t", _table(4), fmt="parquet")
    write_table(tmp_path / "t", _table(2), fmt="parquet", mode="overwrite")
    assert read_table(tmp_path / "t").num_rows == 2
    assert table_version(tmp_path / "t") is None


def test_missing_table_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match="no Delta or Parquet table"):
        read_table(tmp_path / "nothing")


@pytest.mark.parametrize("fmt", ["delta", "parquet"])
def test_a_scan_streams_small_batches_in_the_same_order_every_time(tmp_path: Path, fmt: str) -> None:
    write_table(tmp_path / "t", _table(500), fmt=fmt, partition_by=["day"])  # type: ignore[arg-type]
    first = list(scan(tmp_path / "t", ["id"], batch_rows=64))
    assert all(b.num_rows <= 64 for b in first) and len(first) >= 500 // 64
    assert [b.schema.names for b in first[:1]] == [["id"]]
    ids = [i for b in first for i in b.column("id").to_pylist()]
    assert sorted(ids) == sorted(f"p{i}" for i in range(500))
    assert [i for b in scan(tmp_path / "t", ["id"], batch_rows=64) for i in b.column("id").to_pylist()] == ids


def test_a_scan_reads_the_delta_version_it_is_given(tmp_path: Path) -> None:
    write_table(tmp_path / "t", _table(10))
    write_table(tmp_path / "t", _table(25), mode="overwrite")
    assert sum(b.num_rows for b in scan(tmp_path / "t", version=0)) == 10
    assert sum(b.num_rows for b in scan(tmp_path / "t")) == 25


def test_a_scan_reads_the_files_in_the_order_of_the_products_they_hold(tmp_path: Path) -> None:
    """Files committed later ids first still read from the smallest product id, whatever their
    names and log order: the same rows written twice read alike (a streamed training's order)."""

    def rows(low: int, high: int, day: int) -> pa.Table:
        ids = [f"P{i:04d}" for i in range(low, high)]
        return pa.table({"product_id": ids, "day": [dt.date(2026, 11, day)] * len(ids)})

    path = tmp_path / "t"
    write_table(path, rows(200, 300, 3), partition_by=["day"])
    write_table(path, rows(0, 100, 9), partition_by=["day"], mode="append")
    write_table(path, rows(100, 200, 1), partition_by=["day"], mode="append")
    ids = [i for b in scan(path, ["product_id"], batch_rows=64) for i in b.column("product_id").to_pylist()]
    assert ids == [f"P{i:04d}" for i in range(300)]


def test_a_table_s_data_files_are_paths_to_open_whatever_its_folder_and_partitions_are_named(
    tmp_path: Path,
) -> None:
    """delta-rs names the files by the table's location percent-encoded, then their own path as it
    is on disk, where a partition value's escapes are part of the folder's name."""
    from catalog_enrichment.catalog.lakehouse import data_files

    path = tmp_path / "Catalog Data é" / "t"
    write_table(path, pa.table({"k": ["x y:z", "plain"], "v": [1, 2]}), partition_by=["k"])
    files = data_files(path)
    assert len(files) == 2 and all(Path(f).is_file() for f in files)
    assert any("k=x%20y%3Az" in f for f in files)  # the folder's own name, kept


def test_the_rows_a_filter_keeps_leave_out_those_an_outside_delete_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job table (quarantine, run reports, attribute changes) that an outside writer's DELETE
    gave deletion vectors is still read by a filter: the rows it keeps but the deleted ones, the
    columns asked for (the partition column among them), typed as the table; none kept is an empty
    table of those columns. Without deletion vectors the same filter reads the same rows."""
    from catalog_enrichment.catalog import lakehouse
    from tests.delta_protocol import delete_with_deletion_vector

    runs = pa.array(["r1", "r2", "r1", "r2", "r1"])
    write_table(
        tmp_path / "t",
        pa.table({"run_id": runs, "n": list(range(5)), "shop": ["s"] * 5}),
        partition_by=["shop"],
    )
    r1 = pc.field("run_id") == "r1"
    assert read_where(tmp_path / "t", r1, ["n", "shop"]).to_pydict() == {"n": [0, 2, 4], "shop": ["s"] * 3}
    delete_with_deletion_vector(tmp_path / "t", [2])
    monkeypatch.setattr(lakehouse, "DELETION_SCAN_ROWS", 2)  # the deleted row's batch filtered alone
    kept = read_where(tmp_path / "t", r1, ["n", "shop"])
    assert kept.to_pydict() == {"n": [0, 4], "shop": ["s", "s"]}
    assert kept.schema == pa.schema([("n", pa.int64()), ("shop", pa.string())])
    none = read_where(tmp_path / "t", pc.field("run_id") == "r9", ["run_id"])
    assert none.num_rows == 0 and none.schema.names == ["run_id"]
    assert read_where(tmp_path / "t", r1).column_names == ["run_id", "n", "shop"]


def test_a_delta_table_with_deletion_vectors_is_streamed_without_its_deleted_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyarrow's dataset refuses a table with deletion vectors (the default of current Delta
    writers); its files are read batch by batch (two rows here, so the deleted row's mask is cut
    across batches), the requested columns only, the deleted rows left out, the partition values
    added, every pass alike - under a partition folder whose name the writer escaped (a space and
    a colon), which delta-rs' deletion vectors name escaped once more."""
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    from catalog_enrichment.catalog import lakehouse, products
    from tests.delta_protocol import delete_with_deletion_vector

    ids = ["p3", "p1", "p4", "p0", "p2"]
    shop = pa.array(["home & garden: 1"] * 5)
    write_table(
        tmp_path / "t",
        pa.table({"product_id": ids, "n": list(range(5)), "shop": shop}),
        partition_by=["shop"],
    )
    delete_with_deletion_vector(tmp_path / "t", [2, 4])  # p4, p2
    # Spark's read of the products drops the same rows: its deletion vectors name the files read
    files = lakehouse.data_files(tmp_path / "t")
    assert set(products._deleted_rows(tmp_path / "t", files)) == set(files)
    monkeypatch.setattr(lakehouse, "DELETION_SCAN_ROWS", 2)
    expected = {"product_id": ["p3", "p1", "p0"], "n": [0, 1, 3], "shop": ["home & garden: 1"] * 3}
    assert read_table(tmp_path / "t").to_pydict() == expected
    read: list[list[str]] = []
    decoded: list[int] = []
    batches = pq.ParquetFile.iter_batches

    def recorded(self: pq.ParquetFile, *args: object, columns: list[str], **kwargs: object) -> object:
        read.append(columns)
        for batch in batches(self, *args, columns=columns, **kwargs):
            decoded.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recorded)
    assert read_table(tmp_path / "t", columns=["n"]).to_pydict() == {"n": [0, 1, 3]}
    assert read == [["n"]]  # the other columns are never decoded
    decoded.clear()
    stream = scan(tmp_path / "t", ["n"])
    assert next(stream).column("n").to_pylist() == [0, 1] and decoded == [2]  # one batch read, not the table
    assert lakehouse.schema_of(tmp_path / "t").names == ["product_id", "n", "shop"] and decoded == [2]
    assert lakehouse.count_rows(tmp_path / "t") == 3
    monkeypatch.undo()
    monkeypatch.setattr(lakehouse, "DELETION_SCAN_ROWS", 2)
    passes = [[r for b in scan(tmp_path / "t") for r in b.column("product_id").to_pylist()] for _ in range(2)]
    assert passes == [expected["product_id"]] * 2
    assert read_table(tmp_path / "t").schema == pa.schema(DeltaTable(str(tmp_path / "t")).schema().to_arrow())

    def whole(*args: object, **kwargs: object) -> None:
        raise AssertionError("the table was read whole through the query engine")

    monkeypatch.setattr("deltalake.QueryBuilder", whole)
    assert read_table(tmp_path / "t", columns=["n"])["n"].to_pylist() == [0, 1, 3]


@pytest.mark.parametrize("value", ["20261101", "2026-W44-7", "2026-11-1", "2026-13-01"])
def test_a_partition_date_in_another_iso_form_is_refused_in_one_line(value: str) -> None:
    """Python reads 20261101 and 2026-W44-7 as dates, but no partition folder or Spark date is
    written so: a run over one would read nothing or fail in Spark."""
    from catalog_enrichment.catalog.products import parse_partition
    from catalog_enrichment.contracts import load_contract

    contract = load_contract("products")
    assert parse_partition("ingest_date=2026-11-01", contract) is not None
    with pytest.raises(ContractError, match=r"is not a date \(YYYY-MM-DD\)"):
        parse_partition(f"ingest_date={value}", contract)


def test_a_parquet_footer_is_read_once_per_version_of_its_file(tmp_path: Path) -> None:
    import os

    import pyarrow.parquet as pq

    from catalog_enrichment.catalog import products

    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"a": [1]}), path)
    assert products._read_footer(str(path)).names == ["a"]
    hits = products._footer_of.cache_info().hits
    assert (
        products._read_footer(str(path)).names == ["a"] and products._footer_of.cache_info().hits == hits + 1
    )
    pq.write_table(pa.table({"b": ["x", "y"]}), path)  # written again: another size
    os.utime(path, ns=(1, 1))
    assert products._read_footer(str(path)).names == ["b"]


def test_the_rows_of_a_few_products_are_read_batch_by_batch_with_their_own_filter(tmp_path: Path) -> None:
    """The store keeps one row per (encoder, product): the rows of one encoder and a few products
    are selected batch by batch, those of the other encoders never kept."""
    from catalog_enrichment.catalog import lakehouse

    table = pa.table(
        {
            "encoder": ["a", "b", "a", "b", "a"],
            "product_id": ["p1", "p1", "p2", "p2", "p3"],
            "embedding": [b"1", b"2", b"3", b"4", b"5"],
        }
    )
    write_table(tmp_path / "store", table)
    rows = lakehouse.read_products_of(
        tmp_path / "store", ["p1", "p3", "p9"], ["product_id", "embedding"], where={"encoder": "a"}
    )
    assert rows.column_names == ["product_id", "embedding"]
    assert sorted(rows.to_pylist(), key=lambda r: r["product_id"]) == [
        {"product_id": "p1", "embedding": b"1"},
        {"product_id": "p3", "embedding": b"5"},
    ]
