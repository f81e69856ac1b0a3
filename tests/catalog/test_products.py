"""Reading the products table into Spark (``catalog/products.py``)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from catalog_enrichment.catalog import products
from catalog_enrichment.catalog.products import Partition, read_products
from catalog_enrichment.contracts import load_contract

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

PRODUCTS = load_contract("products")
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def _day(day: dt.date, ids: list[str]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"product_id": p, "title": f"title {p}", "updated_at": T0, "ingest_date": day} for p in ids],
        schema=PRODUCTS.arrow_schema(),
    )


def test_a_partition_s_read_gathers_the_deletion_vectors_of_its_own_files_only(
    spark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A products table upserted by MERGE holds millions of deleted rows between two OPTIMIZEs: a
    one-partition read brings to the driver the deleted rows of its own files, not the table's."""
    from tests.delta_protocol import delete_with_deletion_vector

    a, b = dt.date(2026, 11, 1), dt.date(2026, 11, 2)
    table = tmp_path / "products"
    write_deltalake(str(table), _day(a, ["a0", "a1", "a2", "a3"]), partition_by=["ingest_date"])
    delete_with_deletion_vector(table, [1, 3])  # a1, a3: the only data file is partition a's
    write_deltalake(str(table), _day(b, ["b0", "b1"]), partition_by=["ingest_date"], mode="append")
    gathered: list[dict[str, Any]] = []
    deleted_rows = products._deleted_rows

    def recorded(*args: Any) -> Any:
        gathered.append(deleted_rows(*args))
        return gathered[-1]

    monkeypatch.setattr(products, "_deleted_rows", recorded)

    def ids(partition: Partition | None) -> list[str]:
        read = read_products(spark, table, PRODUCTS, partition=partition)
        return sorted(r["product_id"] for r in read.collect())

    assert ids(Partition("ingest_date", str(b))) == ["b0", "b1"]
    assert gathered == [{}]  # partition a's deleted rows stayed where they are
    assert ids(Partition("ingest_date", str(a))) == ["a0", "a2"]
    assert ids(None) == ["a0", "a2", "b0", "b1"]
    assert [sorted(r.to_pylist()) for g in gathered[1:] for r in g.values()] == [[1, 3], [1, 3]]


def test_a_read_takes_its_files_and_their_deletion_vectors_from_one_version(
    spark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit landing while the footers are read (here: an overwrite) is the next read's: the
    files listed before it keep the deletion vectors of their own version, whose deleted rows stay
    deleted (taken from the newer version, which no longer holds the files, they came back)."""
    from tests.delta_protocol import delete_with_deletion_vector

    day = dt.date(2026, 11, 1)
    table = tmp_path / "products"
    write_deltalake(str(table), _day(day, ["a0", "a1", "a2", "a3"]), partition_by=["ingest_date"])
    delete_with_deletion_vector(table, [1, 3])  # a1, a3
    read_footer = products._read_footer

    def committed_meanwhile(file: str) -> Any:
        if not committed:
            committed.append(True)
            write_deltalake(str(table), _day(day, ["z0"]), partition_by=["ingest_date"], mode="overwrite")
        return read_footer(file)

    committed: list[bool] = []
    monkeypatch.setattr(products, "_read_footer", committed_meanwhile)
    read = read_products(spark, table, PRODUCTS)
    assert committed and sorted(r["product_id"] for r in read.collect()) == ["a0", "a2"]
    monkeypatch.undo()
    assert [r["product_id"] for r in read_products(spark, table, PRODUCTS).collect()] == ["z0"]


def test_a_read_on_from_a_thousand_partitions_runs_takes_each_partition_s_own_window(
    spark: Any, tmp_path: Path
) -> None:
    """The first nightly after a backfill of a thousand days: each day's rows changed after its own
    run's time, every row of a day no run read - one condition a partition would overflow the
    driver's stack long before a thousand."""
    days = [dt.date(2024, 1, 1) + dt.timedelta(days=i) for i in range(1001)]
    at, hour = [T0 + dt.timedelta(days=i) for i in range(len(days))], dt.timedelta(hours=1)
    rows = [
        {"product_id": f"p{i}-{k}", "title": "t", "updated_at": at[i] + k * hour, "ingest_date": d}
        for i, d in enumerate(days)
        for k in (0, 2)
    ]
    table = tmp_path / "products"
    rows_table = pa.Table.from_pylist(rows, schema=PRODUCTS.arrow_schema())
    write_deltalake(str(table), rows_table, partition_by=["ingest_date"])
    # every day but the last caught up to an hour after its first row: its second row is new
    caught_up = {Partition("ingest_date", str(d)): at[i] + hour for i, d in enumerate(days[:-1])}
    since = at[-1] + 3 * hour  # the highest run's watermark: past every row
    read = read_products(spark, table, PRODUCTS, since=since, caught_up=caught_up)
    got = sorted(r["product_id"] for r in read.collect())
    assert got == sorted([f"p{i}-2" for i in range(1000)] + ["p1000-0", "p1000-2"])
