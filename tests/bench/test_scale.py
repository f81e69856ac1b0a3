"""bench scale's grown attribute table: the rows it promises, the increment's spread through it,
other ids no file or index range can separate from the increment's; and its mistakes as one line."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from catalog_enrichment.bench.scale import attribute_batches, run_scale_bench
from catalog_enrichment.catalog.attributes import attributes_schema
from catalog_enrichment.errors import CatalogEnrichError

pytestmark = pytest.mark.timeout(60)


def test_the_grown_rows_are_other_products_between_the_increments_ids() -> None:
    increment = [f"P{i:08d}" for i in range(100)]
    table = pa.Table.from_batches(list(attribute_batches(1_200, increment)), attributes_schema())
    assert table.num_rows == 1_200 and table.schema == attributes_schema()
    ids = table["product_id"].to_pylist()
    assert len(set(ids)) == 200  # six rows a product
    # the increment's products (every other product here) have earlier rows, spread through
    positions = [i for i, p in enumerate(ids) if p in set(increment)]
    assert len(positions) == 600 and positions[0] == 0 and positions[-1] == 198 * 6 + 5
    # and every increment id has other products right after it: sorted, the two kinds interleave
    merged = sorted(set(ids))
    assert all(merged[merged.index(p) + 1].startswith(p + ".") for p in increment)
    keys = set(zip(ids, table["attribute"].to_pylist(), table["value"].to_pylist(), strict=True))
    assert len(keys) == 1_200  # (product, attribute, value) is the table's key
    merchant = [s == "merchant" for s in table["source"].to_pylist()]
    assert sum(merchant) == 600
    runs = table["run_id"].to_pylist()
    assert all((r is None) == m for r, m in zip(runs, merchant, strict=True))


def test_unknown_kinds_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(CatalogEnrichError, match="--kinds takes lakehouse and/or postgres"):
        run_scale_bench(sizes=[10], increment=10, kinds=["oracle"], repeats=1, workdir=tmp_path)
    with pytest.raises(CatalogEnrichError, match="need a server"):
        run_scale_bench(sizes=[10], increment=10, kinds=["postgres"], repeats=1, workdir=tmp_path)
