"""The attribute table's write rules on real Delta tables (no Spark): MERGE per run, rollback."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pytest

from catalog_enrichment.catalog.attributes import (
    attributes_schema,
    find_run_commit,
    merge_run,
    rollback_run,
    runs_of_model_version,
)
from catalog_enrichment.catalog.lakehouse import read_table, table_version, write_table
from catalog_enrichment.errors import CatalogEnrichError

pytestmark = pytest.mark.timeout(120)
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def _merchant(rows: list[tuple[str, str, str]]) -> pa.Table:
    n = len(rows)
    return pa.table(
        {
            "product_id": [r[0] for r in rows],
            "attribute": [r[1] for r in rows],
            "value": [r[2] for r in rows],
            "confidence": [None] * n,
            "threshold": [None] * n,
            "source": ["merchant"] * n,
            "model_name": [None] * n,
            "model_version": [None] * n,
            "run_id": [None] * n,
            "written_at": [T0] * n,
        },
        schema=attributes_schema(),
    )


def _values(rows: list[tuple[str, str, str, float]]) -> pa.Table:
    return pa.table(
        {
            "product_id": [r[0] for r in rows],
            "attribute": [r[1] for r in rows],
            "value": [r[2] for r in rows],
            "confidence": [r[3] for r in rows],
            "threshold": [0.5] * len(rows),
        }
    )


def _pairs(rows: list[tuple[str, str]]) -> pa.Table:
    return pa.table({"product_id": [r[0] for r in rows], "attribute": [r[1] for r in rows]})


def _state(path: Path) -> set[tuple[str, str, str, str, str | None]]:
    t = read_table(path).to_pylist()
    return {(r["product_id"], r["attribute"], r["value"], r["source"], r["run_id"]) for r in t}


def _merge(path: Path, run: str, values: pa.Table, pairs: pa.Table, version: str = "1"):  # type: ignore[no-untyped-def]
    return merge_run(
        path,
        values,
        pairs,
        run_id=run,
        model_name="m",
        model_version=version,
        written_at=T0 + dt.timedelta(days=1),
    )


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "attributes"
    write_table(path, _merchant([("p1", "color", "red"), ("p2", "material", "wool")]))
    return path


def test_merge_replaces_model_values_per_scored_pair_and_never_touches_merchant_rows(table: Path) -> None:
    all_pairs = _pairs([("p1", "color"), ("p1", "material"), ("p2", "color"), ("p2", "material")])
    r1 = _merge(
        table,
        "r1",
        _values(
            [
                ("p1", "color", "blue", 0.9),
                ("p1", "material", "cotton", 0.8),
                ("p2", "color", "red", 0.9),
                ("p2", "color", "white", 0.7),
                ("p2", "material", "silk", 0.99),
            ]
        ),
        all_pairs,
    )
    # p1/color and p2/material are the merchant's: no model value, merchant rows as they were
    assert r1.merchant_pairs_skipped == 2 and r1.inserted == 3
    assert _state(table) == {
        ("p1", "color", "red", "merchant", None),
        ("p2", "material", "wool", "merchant", None),
        ("p1", "material", "cotton", "model", "r1"),
        ("p2", "color", "red", "model", "r1"),
        ("p2", "color", "white", "model", "r1"),
    }
    # r2 scores only p2/color: white goes, red stays (new provenance); p1/material is not touched
    r2 = _merge(table, "r2", _values([("p2", "color", "red", 0.95)]), _pairs([("p2", "color")]), version="2")
    assert (r2.updated, r2.deleted, r2.inserted) == (1, 1, 0)
    assert _state(table) == {
        ("p1", "color", "red", "merchant", None),
        ("p2", "material", "wool", "merchant", None),
        ("p1", "material", "cotton", "model", "r1"),
        ("p2", "color", "red", "model", "r2"),
    }
    # the same run id again: no new commit
    version = table_version(table)
    again = _merge(table, "r2", _values([("p2", "color", "blue", 0.95)]), _pairs([("p2", "color")]))
    assert again.already_committed and table_version(table) == version
    assert find_run_commit(table, "r2") == version
    assert [r for _, r in runs_of_model_version(table, "1")] == ["r1"]


def test_rollback_restores_exactly_and_leaves_pairs_changed_later_alone(table: Path) -> None:
    pairs = _pairs([("p1", "material"), ("p2", "color")])
    _merge(table, "r1", _values([("p1", "material", "cotton", 0.8), ("p2", "color", "red", 0.9)]), pairs)
    after_r1 = _state(table)
    _merge(table, "r2", _values([("p1", "material", "linen", 0.9)]), pairs)  # p2/color emptied
    after_r2 = _state(table)
    _merge(table, "r3", _values([("p1", "material", "silk", 0.9)]), _pairs([("p1", "material")]))
    # rolling back r2: p2/color comes back; p1/material was changed again by r3 -> left alone
    result = rollback_run(table, "r2")
    assert result.superseded == [("p1", "material")] and result.pairs_restored == 1
    assert ("p2", "color", "red", "model", "r1") in _state(table)
    assert ("p1", "material", "silk", "model", "r3") in _state(table)
    with pytest.raises(CatalogEnrichError, match="already rolled back"):
        rollback_run(table, "r2")
    with pytest.raises(CatalogEnrichError, match="no commit"):
        rollback_run(table, "never-ran")
    # rolling back r3 then restores r2's value for p1/material
    rollback_run(table, "r3")
    assert _state(table) == (after_r2 | {("p2", "color", "red", "model", "r1")})
    assert after_r1 != after_r2
