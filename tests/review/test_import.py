"""``review import``: each kind of bad verdict file is a clear error that imports nothing; a good
one is imported once, however often it is imported; a changed verdict replaces the reviewer's last.
Both catalog backends keep the review tables."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from catalog_enrichment.catalog import open_catalog
from catalog_enrichment.catalog.reviews import (
    FILE_COLUMNS,
    ReviewFileError,
    import_verdicts,
    latest_verdicts,
    rejected_values,
)
from catalog_enrichment.review.sample import draw_sample
from tests.review.conftest import WrittenCatalog

NOW = dt.datetime(2026, 11, 3, 12, tzinfo=dt.UTC)


def _verdicts(
    sample: pa.Table, verdicts: list[str], reviewer: str = "ana", when: str = "2026-11-03T10:00:00Z"
):
    n = sample.num_rows
    return pa.table(
        {
            **{c: sample[c] for c in ("sample_id", "product_id", "attribute", "value")},
            "verdict": pa.array(verdicts, pa.string()),
            "reviewer": pa.array([reviewer] * n, pa.string()),
            "reviewed_at": pa.array([when] * n, pa.string()),
        }
    )


def _write(table: pa.Table, path: Path) -> Path:
    (pq.write_table if path.suffix == ".parquet" else pcsv.write_csv)(table, path)
    return path


def _good(drawn: Any, k: int = 10) -> pa.Table:
    rows = drawn.rows.slice(0, k)
    return _verdicts(rows, ["yes", "no", "unsure", "", "YES", "yes", "no", "yes", "yes", ""][:k])


def test_a_verdict_file_is_imported_once_and_a_changed_verdict_replaces_the_old(
    written: WrittenCatalog, tmp_path: Path
) -> None:
    catalog = written.catalog
    drawn = draw_sample(catalog, model_version="3", size=40, seed=0)
    path = _write(_good(drawn), tmp_path / "verdicts.csv")
    first = import_verdicts(catalog, path, now=NOW)
    assert (first.rows_read, first.verdicts, first.not_reviewed, first.inserted) == (10, 8, 2, 8)
    stored = catalog.keyed_rows("reviews")
    assert stored.num_rows == 8 and set(stored["verdict"].to_pylist()) == {"yes", "no", "unsure"}
    assert set(stored["reviewer"].to_pylist()) == {"ana"} and set(stored["source_file"].to_pylist()) == {
        "verdicts.csv"
    }
    assert set(stored["model_version"].to_pylist()) == {"3"}
    version = catalog.keyed_tables["reviews"]
    from deltalake import DeltaTable

    commits = DeltaTable(str(version)).version()
    again = import_verdicts(catalog, path, now=NOW + dt.timedelta(days=1))
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 8)
    assert DeltaTable(str(version)).version() == commits  # nothing written at all
    assert catalog.keyed_rows("reviews") == stored

    # ana changes her mind on the first value (later), bea judges it too
    changed = _verdicts(drawn.rows.slice(0, 1), ["no"], when="2026-11-04T09:00:00+01:00")
    other = _verdicts(drawn.rows.slice(0, 1), ["yes"], reviewer="bea", when="2026-11-04T07:00:00Z")
    path2 = _write(pa.concat_tables([changed, other]), tmp_path / "verdicts2.parquet")
    result = import_verdicts(catalog, path2, now=NOW + dt.timedelta(days=1))
    assert (result.inserted, result.updated) == (1, 1)
    latest = latest_verdicts(catalog.keyed_rows("reviews"))
    first_key = tuple(drawn.rows.slice(0, 1).to_pylist()[0][k] for k in ("product_id", "attribute", "value"))
    mine = [r for r in latest.to_pylist() if (r["product_id"], r["attribute"], r["value"]) == first_key]
    assert len(mine) == 1 and mine[0]["reviewer"] == "ana" and mine[0]["verdict"] == "no"  # 08:00Z > 07:00Z
    assert first_key in rejected_values(catalog.keyed_rows("reviews"), "3")
    assert not rejected_values(catalog.keyed_rows("reviews"), "4")
    # an earlier file of ana's imported after the later one does not undo her later "no"
    earlier = _verdicts(drawn.rows.slice(0, 1), ["yes"], when="2026-11-04T07:30:00Z")
    late = import_verdicts(
        catalog, _write(earlier, tmp_path / "verdicts (1).csv"), now=NOW + dt.timedelta(days=1)
    )
    assert (late.inserted, late.updated, late.unchanged, late.older) == (0, 0, 0, 1)
    assert "1 older than the same reviewer's stored one (kept)" in late.summary()
    assert first_key in rejected_values(catalog.keyed_rows("reviews"), "3")


def test_a_version_s_rejection_stands_whatever_another_version_s_sample_says_later() -> None:
    from catalog_enrichment.catalog.base import keyed_schema

    def verdict(version: str, said: str, hour: int) -> dict[str, Any]:
        return {
            "sample_id": f"review-v{version}", "product_id": "p1", "attribute": "color", "value": "red",
            "verdict": said, "reviewer": "ana", "reviewed_at": NOW + dt.timedelta(hours=hour),
            "model_version": version,
        }  # fmt: skip

    schema = keyed_schema("reviews")
    rows = [verdict("7", "no", 1), verdict("8", "yes", 2)]
    reviews = pa.Table.from_pylist([{f: r.get(f) for f in schema.names} for r in rows], schema=schema)
    assert rejected_values(reviews, "7") == {("p1", "color", "red")}
    assert rejected_values(reviews, "8") == set()
    # v7 of another registered model writing the same catalog: its sample's "no" is not this one's
    drawn = keyed_schema("review_samples")
    sample = {"sample_id": "review-v7", "model_name": "shop/home", "model_version": "7"}
    samples = pa.Table.from_pylist([{f: sample.get(f) for f in drawn.names}], schema=drawn)
    assert rejected_values(reviews, "7", model_name="shop/home", samples=samples) == {("p1", "color", "red")}
    assert rejected_values(reviews, "7", model_name="shop/tiny", samples=samples) == set()
    assert rejected_values(reviews, "7", model_name="shop/tiny", samples=drawn.empty_table()) == {
        ("p1", "color", "red")
    }  # a verdict whose sample is not known counts


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sample_id": "review-nope"}, "unknown sample_id 'review-nope'"),
        ({"value": "ultraviolet"}, "drew no such product/attribute/value"),
        ({"product_id": "p-unknown"}, "drew no such product/attribute/value"),
        ({"verdict": "maybe"}, "verdict 'maybe' is not one of yes/no/unsure"),
        ({"reviewer": ""}, "a verdict without a reviewer"),
        ({"reviewed_at": "yesterday"}, "reviewed_at 'yesterday' is not an ISO 8601 time"),
        # a future time would win over every later verdict forever (NOW is 2026-11-03 12:00 UTC)
        ({"reviewed_at": "2026-11-03T12:10:00Z"}, "reviewed_at '2026-11-03T12:10:00Z' is in the future"),
    ],
)
def test_a_malformed_file_imports_nothing(
    written: WrittenCatalog, tmp_path: Path, change: dict[str, str], message: str
) -> None:
    catalog = written.catalog
    drawn = draw_sample(catalog, model_version="3", size=20, seed=0)
    table = _good(drawn).to_pylist()
    table[5].update(change)  # one bad row among good ones
    path = _write(pa.Table.from_pylist(table), tmp_path / "verdicts.csv")
    with pytest.raises(ReviewFileError, match="nothing imported") as error:
        import_verdicts(catalog, path, now=NOW)
    assert message in str(error.value) and "row 6" in str(error.value)
    assert catalog.keyed_rows("reviews").num_rows == 0


def test_a_verdict_a_few_minutes_ahead_of_the_import_is_clock_skew_not_the_future(
    written: WrittenCatalog, tmp_path: Path
) -> None:
    drawn = draw_sample(written.catalog, model_version="3", size=20, seed=0)
    ahead = _verdicts(drawn.rows.slice(0, 2), ["yes", "no"], when="2026-11-03T12:04:00Z")
    assert import_verdicts(written.catalog, _write(ahead, tmp_path / "v.csv"), now=NOW).inserted == 2


def test_unreadable_files_and_contradictions_are_clear_errors(
    written: WrittenCatalog, tmp_path: Path
) -> None:
    catalog = written.catalog
    with pytest.raises(ReviewFileError, match="holds no review sample"):
        import_verdicts(catalog, _write(pa.table({c: ["x"] for c in FILE_COLUMNS}), tmp_path / "a.csv"))
    drawn = draw_sample(catalog, model_version="3", size=20, seed=0)
    with pytest.raises(ReviewFileError, match="no verdict file"):
        import_verdicts(catalog, tmp_path / "missing.csv")
    (tmp_path / "v.xlsx").write_text("x")
    with pytest.raises(ReviewFileError, match=r"\.csv or \.parquet"):
        import_verdicts(catalog, tmp_path / "v.xlsx")
    (tmp_path / "v.parquet").write_text("not parquet")
    with pytest.raises(ReviewFileError, match="cannot be read as parquet"):
        import_verdicts(catalog, tmp_path / "v.parquet")
    with pytest.raises(ReviewFileError, match=r"lacks column\(s\) \['verdict'"):
        import_verdicts(catalog, _write(_good(drawn).drop_columns(["verdict"]), tmp_path / "b.csv"))
    twice = pa.concat_tables([_good(drawn, 1), _verdicts(drawn.rows.slice(0, 1), ["no"])])
    with pytest.raises(ReviewFileError, match="gave 'yes' and 'no' to the same value"):
        import_verdicts(catalog, _write(twice, tmp_path / "c.csv"))
    assert catalog.keyed_rows("reviews").num_rows == 0


@pytest.mark.postgres
def test_the_postgres_catalog_keeps_samples_and_verdicts_the_same_way(
    written: WrittenCatalog, pg_catalog_config: Any, tmp_path: Path
) -> None:
    drawn = draw_sample(written.catalog, model_version="3", size=30, seed=0)
    pg = open_catalog(pg_catalog_config)
    with pg.connect():  # migrations applied
        pass
    pg.upsert_rows("review_samples", drawn.rows)
    assert pg.keyed_rows("review_samples").sort_by("product_id") == drawn.rows.sort_by("product_id")
    path = _write(_good(drawn), tmp_path / "verdicts.csv")
    assert import_verdicts(pg, path, now=NOW).inserted == 8
    assert import_verdicts(pg, path, now=NOW).unchanged == 8
    changed = _verdicts(drawn.rows.slice(0, 1), ["no"], when="2026-11-05T00:00:00Z")
    assert (
        import_verdicts(pg, _write(changed, tmp_path / "v2.csv"), now=NOW + dt.timedelta(days=2)).updated == 1
    )
    stored = pg.keyed_rows("reviews")
    assert stored.num_rows == 8 and stored.filter(pa.compute.equal(stored["verdict"], "no")).num_rows == 3


def test_a_large_sample_file_whose_texts_break_lines_reads_whole(tmp_path: Path) -> None:
    """The sample's own CSV quotes descriptions with line breaks; past the CSV reader's 1 MB block a
    reader that splits rows at every line break fails (3,000 rows of 500 bytes)."""
    from catalog_enrichment.catalog.reviews import read_verdict_file

    n = 3000
    table = pa.table(
        {
            "sample_id": ["s1"] * n,
            "product_id": [f"p{i}" for i in range(n)],
            "attribute": ["color"] * n,
            "value": ["red"] * n,
            "description": ["A soft jumper.\nMachine wash at 30 °C.\r\n" + "x" * 440] * n,
            "verdict": ["yes"] * n,
            "reviewer": ["ana"] * n,
            "reviewed_at": [""] * n,
        }
    )
    read = read_verdict_file(_write(table, tmp_path / "big.csv"))
    assert read.num_rows == n and read["product_id"].to_pylist() == table["product_id"].to_pylist()


def test_a_file_without_times_imported_again_after_it_was_saved_again_changes_nothing(
    written: WrittenCatalog, tmp_path: Path
) -> None:
    """Ana's verdicts carry no reviewed_at (the file's time is theirs); Bea later says otherwise with
    a time. Ana's file, saved again (a newer modification time), imported again: nothing changes, so
    her old verdict does not become the latest; a verdict she changed in it is a change."""
    import os

    catalog = written.catalog
    drawn = draw_sample(catalog, model_version="3", size=40, seed=0)
    path = _write(_verdicts(drawn.rows.slice(0, 2), ["no", "no"], when=""), tmp_path / "ana.csv")
    os.utime(path, (NOW.timestamp() - 7200, NOW.timestamp() - 7200))
    assert import_verdicts(catalog, path, now=NOW).inserted == 2
    bea = _verdicts(drawn.rows.slice(0, 1), ["yes"], reviewer="bea", when="2026-11-03T11:00:00Z")
    assert import_verdicts(catalog, _write(bea, tmp_path / "bea.csv"), now=NOW).inserted == 1
    os.utime(path, (NOW.timestamp() - 60, NOW.timestamp() - 60))  # saved again, 11:59
    again = import_verdicts(catalog, path, now=NOW)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 2)
    latest = latest_verdicts(catalog.keyed_rows("reviews")).to_pylist()
    first = drawn.rows.slice(0, 1).to_pylist()[0]["product_id"]
    assert [r["verdict"] for r in latest if r["product_id"] == first] == ["yes"]
    path = _write(_verdicts(drawn.rows.slice(0, 2), ["no", "yes"], when=""), tmp_path / "ana.csv")
    os.utime(path, (NOW.timestamp() - 30, NOW.timestamp() - 30))
    assert import_verdicts(catalog, path, now=NOW).updated == 1


def test_ids_and_values_import_exactly_as_drawn() -> None:
    """A product id with a trailing space (validation lets it through) is the id the sample drew:
    its verdict imports under it, and the same id without the space names no drawn value."""
    from catalog_enrichment.catalog.base import keyed_schema
    from catalog_enrichment.catalog.reviews import verdict_rows

    schema = keyed_schema("review_samples")
    drawn = {
        "sample_id": "s",
        "product_id": "SKU-1 ",
        "attribute": "color",
        "value": "red",
        "model_version": "3",
    }
    samples = pa.Table.from_pylist([{f: drawn.get(f) for f in schema.names}], schema=schema)

    def file(product_id: str) -> pa.Table:
        row = {**{k: drawn[k] for k in ("sample_id", "attribute", "value")}, "product_id": product_id}
        return pa.Table.from_pylist([{**row, "verdict": "no", "reviewer": "ana", "reviewed_at": ""}])

    rows, _ = verdict_rows(file("SKU-1 "), samples, source_file="f.csv", file_time=NOW, now=NOW)
    assert rows["product_id"].to_pylist() == ["SKU-1 "] and rows["verdict"].to_pylist() == ["no"]
    with pytest.raises(
        ReviewFileError, match=r"drew no such product/attribute/value \('SKU-1', 'color', 'red'\)"
    ):
        verdict_rows(file("SKU-1"), samples, source_file="f.csv", file_time=NOW, now=NOW)
