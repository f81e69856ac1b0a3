"""Every kind of bad input the job can meet, and what happens to it.

One products table holds valid products and one row per bad case, each with the quarantine reasons
it must get (an empty list: it is valid and scored); one enrichment run over it must put every row
exactly where it says. Tables that cannot be read as the contract says fail the run before any
write, with one line naming the column and the next step; what everyday exports write (all-null
columns typed ``null``, nanosecond timestamps, extra columns, an evolved Delta schema) is read.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from catalog_enrichment.catalog.attributes import ensure_attributes_table
from catalog_enrichment.catalog.lakehouse import read_table, table_version, write_table
from catalog_enrichment.catalog.products import Partition, read_products
from catalog_enrichment.catalog.reports import FUTURE, RESUMED
from catalog_enrichment.config import ValidationConfig
from catalog_enrichment.contracts import load_contract
from catalog_enrichment.enrich import RunScope, run_enrichment
from catalog_enrichment.errors import ContractError
from catalog_enrichment.validation.rules import NOT_TEXT_REGEX, build_rules, check_rows
from catalog_enrichment.versions import ModelVersion
from tests.conftest import tiny_config
from tests.delta_protocol import delete_with_deletion_vector

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(600)]

PRODUCTS = load_contract("products")
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


def _png(image: Image.Image, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def _cases(good: dict[str, Any], folder: Path, now: dt.datetime) -> list[tuple[dict[str, Any], list[str]]]:
    """(row, expected reasons) per case; rows start as a copy of a valid product, their category
    names the case (the quarantine keeps the raw row, whatever its id)."""
    jpeg = good["image"]
    rgb = Image.open(io.BytesIO(jpeg)).convert("RGB")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "ok.jpg").write_bytes(jpeg)
    (folder.parent / "outside.jpg").write_bytes(jpeg)
    (folder / "images" / "out-link.jpg").symlink_to(folder.parent / "outside.jpg")
    frames = [Image.new("P", (32, 32), i) for i in range(3)]
    utf8_bad = b"caf\xe9 \xff\xfe"  # Latin-1 bytes in a string column
    t = good["updated_at"]
    cases: list[tuple[dict[str, Any], list[str]]] = [
        # ids
        ({"product_id": None}, ["product_id_not_null"]),
        ({"product_id": ""}, ["product_id_not_blank"]),
        ({"product_id": "   "}, ["product_id_not_blank"]),
        ({"product_id": "\t"}, ["product_id_not_blank", "product_id_no_control_chars"]),
        ({"product_id": "x" * 300}, ["product_id_max_length"]),
        ({"product_id": "id\x00nul"}, ["product_id_no_control_chars"]),
        ({"product_id": utf8_bad}, ["product_id_valid_utf8"]),
        ({"product_id": "tie", "updated_at": t}, ["product_id_unique"]),
        ({"product_id": "tie", "updated_at": t}, ["product_id_unique"]),
        ({"product_id": "dup", "updated_at": t - dt.timedelta(days=1)}, ["product_id_unique"]),
        ({"product_id": "dup", "updated_at": t}, []),  # the newest copy is kept
        ({"product_id": "ünïcødé-ид-商品"}, []),
        ({"product_id": "A/1"}, []),  # two ids a sanitised file name would confuse: two products
        ({"product_id": "A:1"}, []),
        ({"product_id": '=HYPERLINK("http://e.example","x")'}, []),  # a formula to a spreadsheet
        # text
        ({"title": None}, ["title_not_null"]),
        ({"title": ""}, ["title_not_empty"]),
        ({"title": " \n\t "}, ["title_not_empty"]),
        ({"title": "nan"}, ["title_is_text"]),
        ({"title": "None"}, ["title_is_text"]),
        ({"title": "12.5"}, ["title_is_text"]),
        ({"title": "Shirt\x00"}, ["title_no_control_chars"]),
        ({"title": "Shirt\x1b[31m"}, ["title_no_control_chars"]),
        ({"title": "T" * 1_000_000}, ["title_max_length"]),
        ({"title": utf8_bad}, ["title_valid_utf8"]),
        ({"description": "D" * 1_000_000}, ["description_max_length"]),
        ({"description": utf8_bad}, ["description_valid_utf8"]),
        ({"image_uri": utf8_bad, "image": None}, ["image_uri_valid_utf8"]),
        ({"category": utf8_bad}, ["category_valid_utf8"]),  # read by every scoring task
        ({"title": "Shirt 👕 قميص שמלה e\u0301"}, []),  # emoji, RTL, combining marks: text
        ({"title": "=cmd|' /C calc'!A0"}, []),  # text here; neutralised in the review CSV
        ({"title": "<!--<script>document.body.innerHTML=''</script>"}, []),  # text; data on the page
        ({"description": "   "}, []),
        ({"description": "tabs\tand\nbreaks\x07"}, []),  # descriptions are not checked for them
        ({"description": None}, []),
        # timestamps
        ({"updated_at": None}, ["updated_at_not_null"]),
        ({"updated_at": dt.datetime(9999, 1, 1, tzinfo=dt.UTC)}, ["updated_at_not_in_future"]),
        # nanoseconds written as microseconds: the year 56,791, past any Python datetime
        ({"updated_at": 1_730_000_000_000_000_000}, ["updated_at_not_in_future"]),
        ({"updated_at": now + dt.timedelta(hours=2)}, ["updated_at_not_in_future"]),
        ({"updated_at": now + dt.timedelta(minutes=10)}, []),  # within the clock skew
        ({"updated_at": dt.datetime(1970, 1, 1, tzinfo=dt.UTC)}, ["updated_at_not_too_old"]),
        ({"updated_at": dt.datetime(1, 1, 1, tzinfo=dt.UTC)}, ["updated_at_not_too_old"]),
        # images
        ({"image": jpeg[: len(jpeg) // 2]}, ["image_decodable"]),
        ({"image": b""}, ["image_decodable"]),
        ({"image": b"<svg xmlns='http://www.w3.org/2000/svg'/>"}, ["image_decodable"]),
        ({"image": b"GIF89a but not really"}, ["image_decodable"]),
        ({"image": _png(Image.new("1", (8000, 8000)))}, ["image_within_limits"]),  # a bomb
        ({"image": jpeg + b"\0" * 300_000}, ["image_within_limits"]),  # over max_bytes
        ({"image": _png(rgb, format="BMP")}, ["image_decodable"]),  # not in images.formats
        ({"image": _png(rgb, format="TIFF")}, ["image_decodable"]),
        ({"image": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"}, ["image_decodable"]),
        ({"image": _png(rgb.convert("CMYK"), format="JPEG")}, []),
        ({"image": _png(Image.fromarray(np.full((32, 32), 40000, np.uint16)))}, []),  # 16-bit
        ({"image": _png(rgb.convert("P"))}, []),
        ({"image": _png(rgb.convert("RGBA"))}, []),
        ({"image": _png(frames[0], format="GIF", save_all=True, append_images=frames[1:])}, []),
        ({"image": None, "image_uri": None}, []),  # no image: scored from text
        ({"image": None, "image_uri": str(folder / "images" / "ok.jpg")}, []),
        ({"image": None, "image_uri": f"file://{folder / 'images' / 'ok.jpg'}"}, []),
        ({"image": None, "image_uri": str(folder / "images" / "gone.jpg")}, ["image_readable"]),
        ({"image": None, "image_uri": "/etc/passwd"}, ["image_uri_allowed"]),
        ({"image": None, "image_uri": "/proc/self/environ"}, ["image_uri_allowed"]),
        ({"image": None, "image_uri": "/dev/zero"}, ["image_uri_allowed"]),
        ({"image": None, "image_uri": str(folder / "images" / "out-link.jpg")}, ["image_uri_allowed"]),
        ({"image": None, "image_uri": f"{folder}/images/../../outside.jpg"}, ["image_uri_allowed"]),
        ({"image": None, "image_uri": "https://169.254.169.254/latest/meta-data"}, ["image_uri_allowed"]),
        ({"image": None, "image_uri": "https://cdn:s3cr3t@images.example/a.jpg"}, ["image_uri_allowed"]),
        ({"image": None, "image_uri": "s3://marketplace-private/a.jpg"}, ["image_uri_allowed"]),
        ({"image": None, "image_uri": "images/ok.jpg"}, ["image_uri_allowed"]),
        # several at once: every reason is recorded
        (
            {"product_id": "", "title": "nan", "updated_at": None},
            ["product_id_not_blank", "title_is_text", "updated_at_not_null"],
        ),
    ]  # fmt: skip
    rows = []
    for i, (change, reasons) in enumerate(cases):
        row = {**good, "product_id": f"case-{i:03d}", "category": f"case-{i:03d}", **change}
        if isinstance(row["category"], bytes):  # the case's name first, then the bad bytes
            row["category"] = f"case-{i:03d}".encode() + row["category"]
        rows.append((row, reasons))
    return rows


def _case(category: str | bytes) -> str:
    """The case a row's category names (its first 8 characters: ``case-NNN``)."""
    return (category.decode(errors="replace") if isinstance(category, bytes) else category)[:8]


def _write_products(path: Path, rows: list[dict[str, Any]]) -> None:
    """One Parquet file with the contract's Arrow types; string columns may hold bytes that are not
    UTF-8 (written unchecked, as a broken exporter would)."""
    schema = PRODUCTS.arrow_schema(enforce_nullability=False)
    columns = []
    for field in schema:
        values = [r.get(field.name) for r in rows]
        if pa.types.is_string(field.type):
            raw = [v.encode() if isinstance(v, str) else v for v in values]
            columns.append(pa.array(raw, pa.binary()).view(pa.string()))
        else:
            columns.append(pa.array(values, field.type))
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_arrays(columns, schema=schema), path / "part-0.parquet")


def _run(spark, cfg, taxonomy, bundle: Path, products: Path, run_id: str):  # type: ignore[no-untyped-def]
    """One enrichment run of the tiny model over ``products``, quietly."""
    model = ModelVersion("tiny", "1", bundle_dir=bundle)
    return run_enrichment(
        spark,
        cfg,
        taxonomy,
        model=model,
        scope=RunScope(products=products, run_id=run_id),
        progress=lambda m: None,
    )


def _valid_products(incoming) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """The generated products that are not bad in any way (ids of injected bad rows left out), by
    id: the order a Delta table's files are read in is not the same in every run."""
    truth = read_table(incoming.truth)
    bad = {
        p for p, k in zip(truth["product_id"].to_pylist(), truth["bad_kind"].to_pylist(), strict=True) if k
    }
    rows = read_table(incoming.products).to_pylist()
    return sorted(
        (r for r in rows if r["product_id"] and r["product_id"] not in bad), key=lambda r: r["product_id"]
    )


@pytest.fixture(scope="module")
def corpus(spark, tmp_path_factory, incoming, taxonomy, scoring_bundle):  # type: ignore[no-untyped-def]
    """The run over 150 valid products and every bad case (the report, the tables, the cases)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    products = root / "products"
    valid = _valid_products(incoming)
    good = valid[:150]
    # the cases are built from a product with a photo (some valid products have none)
    cases = _cases(next(r for r in valid[200:] if r["image"]), products, dt.datetime.now(dt.UTC))
    _write_products(products, good + [row for row, _ in cases])
    cfg = tiny_config(
        catalog={"root": str(root / "lake")},
        inference={"batch_size": 64, "device": "cpu"},
        # every case is one product's row, its photo included (not a placeholder); a batch of bad
        # rows is no night to judge the model's health by (tests/test_health_job.py does)
        validation={
            "max_invalid_fraction": 0.5,
            "max_products_per_image": 0,
            "health": dict.fromkeys(("score_drift", "coverage", "value_mix", "inputs"), "warn"),
        },
        images={"max_bytes": 200_000},
    )
    ensure_attributes_table(cfg.catalog.table("attributes"))
    outcome = _run(spark, cfg, taxonomy, scoring_bundle, products, "bad-inputs")
    return cfg, outcome, good, cases, products


def test_every_bad_row_is_quarantined_with_exactly_its_reasons(corpus) -> None:  # type: ignore[no-untyped-def]
    cfg, outcome, good, cases, _ = corpus
    report = outcome.report
    quarantine = read_table(cfg.catalog.table("quarantine"))
    got = {
        _case(json.loads(raw)["category"]): sorted(reasons)
        for raw, reasons in zip(quarantine["raw"].to_pylist(), quarantine["reasons"].to_pylist(), strict=True)
    }
    want = {_case(row["category"]): sorted(reasons) for row, reasons in cases if reasons}
    assert report.status == "succeeded"
    assert report.rows_read == len(good) + len(cases)
    assert report.rows_quarantined == len(want) == quarantine.num_rows
    assert report.rows_valid + report.rows_quarantined == report.rows_read
    assert got == want


def test_valid_rows_are_scored_and_no_blank_id_is_ever_written(corpus) -> None:  # type: ignore[no-untyped-def]
    cfg, outcome, good, cases, _ = corpus
    report = outcome.report
    n_valid = len(good) + sum(1 for _, r in cases if not r)
    assert report.rows_valid == n_valid and report.rows_scored == n_valid
    written = read_table(cfg.catalog.table("attributes"))
    ids = set(written["product_id"].to_pylist())
    assert all(i is not None and i.strip() and i.isprintable() for i in ids)
    bad_ids = {row["product_id"] for row, r in cases if r} - {row["product_id"] for row, r in cases if not r}
    assert not ids & {i for i in bad_ids if isinstance(i, str)}  # ("dup": its older copy is the bad one)
    assert written.num_rows > 0


def test_the_watermark_never_passes_the_runs_start(spark, corpus, taxonomy, scoring_bundle) -> None:  # type: ignore[no-untyped-def]
    cfg, outcome, _, cases, products = corpus
    report = outcome.report
    # rows at 9999-01-01 and past year 9999, two hours and 10 minutes ahead (within the skew) were read
    assert report.watermark == report.started_at
    future = [r for r, reasons in cases if reasons == ["updated_at_not_in_future"]]
    listed = report.summary()[FUTURE]
    assert sorted(p for p, _ in listed) == sorted(r["product_id"] for r in future) and len(future) == 3
    # the next incremental run reads what is stamped after that start, but the rows quarantined as
    # in the future that still are: judged once, not counted by the circuit breaker each night
    again = _run(spark, cfg, taxonomy, scoring_bundle, products, "bad-inputs-next")
    ahead = [r for r, _ in cases if r["updated_at"] is not None and r not in future]
    ahead = [r for r in ahead if isinstance(r["updated_at"], int) or r["updated_at"] > report.started_at]
    # and, once more, the product whose image could not be read (transient, tried again)
    unread = [r for r, reasons in cases if reasons == ["image_readable"]]
    assert len(ahead) == 1 and len(unread) == 1
    assert again.report.rows_read == len(ahead) + len(unread)
    assert again.report.watermark == again.report.started_at
    assert again.report.summary()[FUTURE] == listed  # still ahead: left to the run after


def _pandas_export(path: Path, good: list[dict[str, Any]]) -> None:
    """What ``DataFrame.to_parquet`` writes for products without descriptions or merchant values:
    Arrow ``null`` columns and nanosecond timestamps."""
    frame = pd.DataFrame(
        {
            "product_id": [r["product_id"] for r in good],
            "title": [r["title"] for r in good],
            "description": [None] * len(good),
            "image": [r["image"] for r in good],
            "image_uri": [None] * len(good),
            "category": [r["category"] for r in good],
            "merchant_attributes": [None] * len(good),
            "updated_at": pd.to_datetime([r["updated_at"] for r in good], utc=True),
            "ingest_date": [r["ingest_date"] for r in good],
            "exported_by": ["pandas"] * len(good),  # an extra column: kept out
        }
    )
    path.mkdir(parents=True)
    frame.to_parquet(path / "export.parquet")


def test_an_everyday_pandas_export_is_read_as_the_contract_says(
    spark, tmp_path, incoming, taxonomy, scoring_bundle
) -> None:  # type: ignore[no-untyped-def]
    good = _valid_products(incoming)[:30]
    _pandas_export(tmp_path / "export", good)
    schema = pq.read_schema(tmp_path / "export" / "export.parquet")
    assert pa.types.is_null(schema.field("description").type)
    assert pa.types.is_null(schema.field("merchant_attributes").type)
    assert schema.field("updated_at").type.unit == "ns"
    df = read_products(spark, tmp_path / "export", PRODUCTS)
    assert df.columns == list(PRODUCTS.names)  # the extra column is not read
    rows = df.collect()
    assert {r["product_id"] for r in rows} == {r["product_id"] for r in good}
    assert all(r["description"] is None and r["merchant_attributes"] is None for r in rows)
    by_id = {r["product_id"]: r["updated_at"] for r in good}
    assert all(r["updated_at"].replace(tzinfo=dt.UTC) == by_id[r["product_id"]] for r in rows)
    cfg = tiny_config(catalog={"root": str(tmp_path / "lake")}, inference={"device": "cpu"})
    outcome = _run(spark, cfg, taxonomy, scoring_bundle, tmp_path / "export", "export")
    assert outcome.report.status == "succeeded" and outcome.report.rows_scored == 30


def test_a_parquet_export_spark_wrote_with_its_defaults_is_read(spark, tmp_path, incoming) -> None:  # type: ignore[no-untyped-def]
    """Spark writes timestamps as INT96 by default (spark.sql.parquet.outputTimestampType), which
    Arrow reports as nanoseconds: read as the timestamps they are, not as nanosecond integers."""
    good = _valid_products(incoming)[:20]
    table = pa.Table.from_pylist(good, read_table(incoming.products).schema)
    spark.createDataFrame(table).write.parquet(str(tmp_path / "export"))
    files = sorted((tmp_path / "export").glob("*.parquet"))
    leaves = pq.ParquetFile(files[0]).schema
    assert {leaves.column(i).path: leaves.column(i).physical_type for i in range(len(leaves))}[
        "updated_at"
    ] == "INT96"
    rows = read_products(spark, tmp_path / "export", PRODUCTS).collect()
    by_id = {r["product_id"]: r["updated_at"] for r in good}
    assert sorted(r["product_id"] for r in rows) == sorted(by_id)
    assert all(r["updated_at"].replace(tzinfo=dt.UTC) == by_id[r["product_id"]] for r in rows)


def test_a_pandas_export_with_a_categorical_column_is_read(spark, tmp_path, incoming) -> None:  # type: ignore[no-untyped-def]
    """A pandas Categorical is a dictionary type in the Arrow schema the Parquet file keeps; the
    file holds the strings, which Spark reads as the contract's string."""
    table = pa.Table.from_pylist(_valid_products(incoming)[:20], read_table(incoming.products).schema)
    column = table.schema.get_field_index("category")
    categorical = table.set_column(column, "category", pc.dictionary_encode(table["category"]))
    write_table(tmp_path / "export", categorical, fmt="parquet")
    assert pa.types.is_dictionary(
        pq.read_schema(next((tmp_path / "export").rglob("*.parquet"))).field("category").type
    )
    rows = read_products(spark, tmp_path / "export", PRODUCTS).collect()
    by_id = dict(zip(table["product_id"].to_pylist(), table["category"].to_pylist(), strict=True))
    assert {r["product_id"]: r["category"] for r in rows} == by_id


def test_a_column_of_another_type_fails_before_any_write_naming_it(
    spark, tmp_path, incoming, taxonomy, scoring_bundle
) -> None:  # type: ignore[no-untyped-def]
    table = read_table(incoming.products).slice(0, 20)
    broken = table.set_column(table.schema.get_field_index("title"), "title", pa.array(range(20), pa.int64()))
    write_table(tmp_path / "typed", broken, fmt="parquet")
    cfg = tiny_config(catalog={"root": str(tmp_path / "lake")}, inference={"device": "cpu"})
    with pytest.raises(
        ContractError, match=r"products column 'title' is int64 in .*the contract says string"
    ):
        _run(spark, cfg, taxonomy, scoring_bundle, tmp_path / "typed", "typed")
    assert not Path(cfg.catalog.table("attributes")).exists()
    assert not Path(cfg.catalog.table("quarantine")).exists()


def test_an_evolved_delta_table_and_empty_tables_and_partitions_are_read(spark, tmp_path, incoming) -> None:  # type: ignore[no-untyped-def]
    tmp_path = tmp_path / "Catalog Data é"  # delta-rs names its files percent-encoded
    table = pa.Table.from_pylist(_valid_products(incoming)[:30], read_table(incoming.products).schema)
    # version 0 without the nullable category column; version 1 adds it and an extra column
    old = table.drop_columns(["category"])
    write_deltalake(str(tmp_path / "evolved"), old.slice(0, 10), partition_by=["ingest_date"])
    new = table.slice(10, 20).append_column("season", pa.array(["winter"] * 20))
    write_deltalake(
        str(tmp_path / "evolved"), new, partition_by=["ingest_date"], mode="append", schema_mode="merge"
    )
    rows = read_products(spark, tmp_path / "evolved", PRODUCTS).collect()
    assert len(rows) == 30
    # the older files lack it
    categories = {r["product_id"]: r["category"] for r in rows}
    assert all(categories[p] is None for p in old.slice(0, 10)["product_id"].to_pylist())
    assert [categories[p] for p in new["product_id"].to_pylist()] == new["category"].to_pylist()
    # an empty Delta table, an empty Parquet file, a partition with no files
    write_deltalake(str(tmp_path / "empty"), table.slice(0, 0), partition_by=["ingest_date"])
    assert read_products(spark, tmp_path / "empty", PRODUCTS).count() == 0
    (tmp_path / "empty-file").mkdir()
    pq.write_table(table.slice(0, 0), tmp_path / "empty-file" / "part-0.parquet")
    assert read_products(spark, tmp_path / "empty-file", PRODUCTS).count() == 0
    none = Partition("ingest_date", "2031-01-01")
    assert read_products(spark, tmp_path / "evolved", PRODUCTS, partition=none).count() == 0
    assert table_version(tmp_path / "evolved") == 1


def test_an_image_that_could_not_be_read_is_tried_again_by_the_next_runs_then_left(
    spark, tmp_path, incoming, taxonomy, scoring_bundle
) -> None:  # type: ignore[no-untyped-def]
    """Two products whose image file is not there (a network share down, a 503): both are
    quarantined; the next incremental run reads them again though they did not change. One image
    is back by then and its product is scored; the other is tried ``image_retries`` times in all.
    An older copy of it (edited since) is read with it by its id each time, but judged once: the
    first run's duplicate, after it a superseded row, not new bad data."""
    products, images = tmp_path / "products", tmp_path / "products" / "images"
    rows = _valid_products(incoming)[:20]
    back, gone = rows[0]["product_id"], rows[1]["product_id"]
    older = {**rows[1], "updated_at": rows[1]["updated_at"] - dt.timedelta(days=3)}
    rows[0] = {**rows[0], "image": None, "image_uri": str(images / "back.png")}
    rows[1] = {**rows[1], "image": None, "image_uri": str(images / "gone.png")}
    _write_products(products, [*rows, older])
    cfg = tiny_config(
        catalog={"root": str(tmp_path / "lake")},
        inference={"device": "cpu"},
        validation={"max_invalid_fraction": 0.5, "image_retries": 2},
    )

    def quarantined(run_id: str) -> set[str]:
        table = read_table(cfg.catalog.table("quarantine"))
        return {r["product_id"] for r in table.to_pylist() if r["run_id"] == run_id}

    first = _run(spark, cfg, taxonomy, scoring_bundle, products, "retry-1")
    assert first.report.rows_read == 21 and quarantined("retry-1") == {back, gone}
    assert first.report.summary()["row_rules"]["product_id_unique"] == 1
    images.mkdir()
    (images / "back.png").write_bytes(_png(Image.new("RGB", (32, 32), (200, 30, 30))))
    second = _run(spark, cfg, taxonomy, scoring_bundle, products, "retry-2")
    assert second.report.rows_read == 2 and second.report.rows_scored == 1  # nothing else changed
    assert quarantined("retry-2") == {gone} and second.report.summary()["superseded"] == 1
    assert second.report.summary()["row_rules"].get("product_id_unique", 0) == 0
    attributes = read_table(cfg.catalog.table("attributes"))
    assert back in set(attributes.filter(pc.equal(attributes["run_id"], "retry-2"))["product_id"].to_pylist())
    third = _run(spark, cfg, taxonomy, scoring_bundle, products, "retry-3")  # the second retry, the last
    assert third.report.rows_read == 1 and quarantined("retry-3") == {gone}
    fourth = _run(spark, cfg, taxonomy, scoring_bundle, products, "retry-4").report
    # nothing read past the watermark: its position is retry-3's (not where that is rolled back)
    assert fourth.rows_read == 0 and fourth.summary()[RESUMED] == "retry-3"


def test_a_row_stamped_in_the_future_is_judged_once_and_its_product_s_other_rows_as_any(
    spark, tmp_path, incoming, taxonomy, scoring_bundle
) -> None:  # type: ignore[no-untyped-def]
    """Two products each with a copy stamped in year 9999: quarantined once and listed, then left
    unread. One's copy is fixed upstream (it leaves the list, its row is read); the other gets a new
    row whose photo is not there yet: that row, not the copy in the future, is its newest when the
    next run tries it again."""
    products, images = tmp_path / "products", tmp_path / "products" / "images"
    rows = _valid_products(incoming)[:20]
    a, b = rows[0]["product_id"], rows[1]["product_id"]
    ahead = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)
    future = [{**rows[0], "updated_at": ahead}, {**rows[1], "updated_at": ahead}]
    _write_products(products, [*rows[2:], *future])
    cfg = tiny_config(catalog={"root": str(tmp_path / "lake")}, inference={"device": "cpu"})
    first = _run(spark, cfg, taxonomy, scoring_bundle, products, "future-1").report
    micros = (ahead - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
    assert first.summary()[FUTURE] == [[a, micros], [b, micros]] and first.rows_read == 20
    later = first.started_at  # changed since, and not after the next run starts
    fixed = {**rows[1], "updated_at": later}
    waiting = {**rows[0], "updated_at": later, "image": None, "image_uri": str(images / "a.png")}
    _write_products(products, [*rows[2:], future[0], fixed, waiting])
    second = _run(spark, cfg, taxonomy, scoring_bundle, products, "future-2").report
    assert second.rows_read == 2 and second.rows_scored == 1  # a's photo is not there yet
    assert second.summary()[FUTURE] == [[a, micros]] and second.summary()["retry_images"] == [[a, 1]]
    images.mkdir()
    (images / "a.png").write_bytes(_png(Image.new("RGB", (32, 32), (200, 30, 30))))
    third = _run(spark, cfg, taxonomy, scoring_bundle, products, "future-3").report
    assert third.rows_read == third.rows_scored == 1 and third.summary()[FUTURE] == [[a, micros]]


class _ImageHost:
    """An http image host on 127.0.0.1 serving ``folder``, or answering every request with 503
    while ``down``."""

    def __init__(self, folder: Path) -> None:
        import functools
        import http.server

        host = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if host.down:
                    self.send_error(503)
                    return
                super().do_GET()

        self.down = False
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@pytest.fixture
def image_host(tmp_path: Path):  # type: ignore[no-untyped-def]
    import threading

    host = _ImageHost(tmp_path / "cdn")
    thread = threading.Thread(target=host.httpd.serve_forever, daemon=True)
    thread.start()
    yield host
    host.httpd.shutdown()
    host.httpd.server_close()
    thread.join(timeout=10)


def test_nights_an_image_host_is_down_spend_none_of_its_products_retries(
    spark, tmp_path, incoming, taxonomy, scoring_bundle, image_host
) -> None:  # type: ignore[no-untyped-def]
    """An http host answers 503 for three nights (``image_retries`` 1, ``image_outage_products`` 2).
    The first night four products of it fail: it gave no photo, so it was out and they keep their
    retry. The second night two new products of it fail beside them: out again, no retry spent. The
    third night only the products read again fail, which is no evidence of an outage (dead links
    would be read for good): each spends its retry, and on the fourth night, the host back, all six
    are read and scored. A local file that is not there fails alone, no outage: its product spends
    its retry on the second night and is left after it."""
    products, cdn = tmp_path / "products", tmp_path / "cdn"
    cdn.mkdir()
    rows = _valid_products(incoming)[:22]
    for i in range(6):
        (cdn / f"{i}.png").write_bytes(_png(Image.new("RGB", (32, 32), (30, 30, 200 - 10 * i))))
        rows[i] = {**rows[i], "image": None, "image_uri": f"{image_host.url}/{i}.png"}
    first_four, new_two = [r["product_id"] for r in rows[:4]], [r["product_id"] for r in rows[4:6]]
    missing = rows[6]["product_id"]
    rows[6] = {**rows[6], "image": None, "image_uri": str(tmp_path / "photos" / "missing.png")}
    later = rows[4:6]
    _write_products(products, rows[:4] + rows[6:])
    cfg = tiny_config(
        catalog={"root": str(tmp_path / "lake")},
        inference={"device": "cpu"},
        images={
            "roots": [str(tmp_path / "photos")],
            "schemes": ["file", "http"],
            "allow_private_addresses": True,
            "retries": 0,
            "host_failures": 0,  # a paused host would stay paused for the next runs in this worker
        },
        validation={"max_invalid_fraction": 0.5, "image_retries": 1, "image_outage_products": 2},
    )

    def night(run_id: str) -> tuple[Any, dict[str, Any]]:
        report = _run(spark, cfg, taxonomy, scoring_bundle, products, run_id).report
        return report, report.summary()

    image_host.down = True
    _, first = night("down-1")
    source = image_host.url  # http://127.0.0.1:<port>
    assert first["image_sources_out"] == {source: 4}
    assert first["retry_images"] == sorted([*([p, 0] for p in first_four), [missing, 1]])
    now = dt.datetime.now(dt.UTC)
    _write_products(products, rows[:4] + [{**r, "updated_at": now} for r in later] + rows[6:])
    report, second = night("down-2")
    assert report.rows_read == 7 and report.rows_scored == 0
    assert second["image_sources_out"] == {source: 6}
    assert second["retry_images"] == sorted([p, 0] for p in first_four + new_two)  # the file's spent
    report, third = night("down-3")
    assert report.rows_read == 6 and "image_sources_out" not in third
    assert third["retry_images"] == sorted([p, 1] for p in first_four + new_two)
    image_host.down = False
    back, summary = night("back")
    assert back.rows_read == back.rows_scored == 6 and back.rows_quarantined == 0
    assert summary["retry_images"] == []


def test_rows_a_deletion_vector_removed_stay_removed(spark, tmp_path, incoming) -> None:  # type: ignore[no-untyped-def]
    tmp_path = tmp_path / "Catalog Data é"
    table = pa.Table.from_pylist(_valid_products(incoming)[:12], read_table(incoming.products).schema)
    write_deltalake(str(tmp_path / "dv"), table)  # one data file
    delete_with_deletion_vector(tmp_path / "dv", [0, 5, 11])
    ids = table["product_id"].to_pylist()
    got = sorted(r["product_id"] for r in read_products(spark, tmp_path / "dv", PRODUCTS).collect())
    assert got == sorted(set(ids) - {ids[0], ids[5], ids[11]})


def test_column_mapping_is_refused_in_one_line_naming_the_feature(spark, tmp_path, incoming) -> None:  # type: ignore[no-untyped-def]
    table = pa.Table.from_pylist(_valid_products(incoming)[:3], read_table(incoming.products).schema)
    write_deltalake(str(tmp_path / "mapped"), table, configuration={"delta.columnMapping.mode": "name"})
    refused = r"reader feature\(s\) \['columnMapping'\].*physical column names"
    with pytest.raises(ContractError, match=refused):
        read_products(spark, tmp_path / "mapped", PRODUCTS)


# The rules on generated rows against a plain-Python statement of the same rules.
# Unicode's White_Space characters: what the rules' \\s means (Java regex in UNICODE_CHARACTER_CLASS mode)
WS = "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
ALPHABET = "aAnNoOeEuUlLtT01.5e+-[]{} \t\n\x0b\xa0\u2003\u3000\x00\x07\x1f\x7f\x85é商👕"
_IDS = st.one_of(
    st.none(), st.text(ALPHABET, max_size=8), st.sampled_from(["", " ", "\t", "a\x00", "x" * 257, "ok", "ok"])
)
_TITLES = st.one_of(
    st.none(),
    st.text(ALPHABET, max_size=12),
    st.sampled_from(["nan", "None", "3.0", "[1]", "  ", "Shirt\x07"]),
)
_TIMES = st.one_of(
    st.none(),
    st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)).map(
        lambda d: d.replace(tzinfo=dt.UTC)
    ),
    st.sampled_from([NOW, NOW + dt.timedelta(minutes=59), NOW + dt.timedelta(minutes=61)]),
)


def _oracle(pid: str | None, title: str | None, at: dt.datetime | None, cfg: ValidationConfig) -> set[str]:

    reasons = set()
    if pid is None:
        reasons.add("product_id_not_null")
    else:
        if re.fullmatch(f"{WS}*", pid):
            reasons.add("product_id_not_blank")
        if len(pid) > cfg.max_id_length:
            reasons.add("product_id_max_length")
        if re.search(r"[\x00-\x1f\x7f-\x9f]", pid):
            reasons.add("product_id_no_control_chars")
    if title is None:
        reasons.add("title_not_null")
    else:
        if re.fullmatch(f"{WS}*", title):
            reasons.add("title_not_empty")
        # Java's "." stops at any line terminator, Python's at \n only
        body = NOT_TEXT_REGEX.removeprefix("(?iU)^").removesuffix("$").replace("\\s", WS)
        body = body.replace(".", "[^\n\r\x85\u2028\u2029]").replace("\\[^\n\r\x85\u2028\u2029]", "\\.")
        if re.fullmatch(body, title, re.IGNORECASE):
            reasons.add("title_is_text")
        if re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", title):
            reasons.add("title_no_control_chars")
        if len(title) > cfg.max_title_length:
            reasons.add("title_max_length")
    if at is None:
        reasons.add("updated_at_not_null")
    elif at > NOW + dt.timedelta(seconds=cfg.max_clock_skew_seconds):
        reasons.add("updated_at_not_in_future")
    elif at < dt.datetime.combine(cfg.earliest_updated_at, dt.time(), dt.UTC):
        reasons.add("updated_at_not_too_old")
    return reasons


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_IDS, _TITLES, _TIMES), min_size=1, max_size=6))
def test_generated_rows_get_the_reasons_the_rules_say(spark, rows) -> None:  # type: ignore[no-untyped-def]
    cfg = ValidationConfig()
    schema = PRODUCTS.spark_schema(enforce_nullability=False)
    # distinct ids per example (the duplicates rule is tested on fixed rows above)
    data = [
        (None if p is None else f"{p}", t, None, None, None, None, None, at, dt.date(2026, 1, 1))
        for p, t, at in rows
    ]
    ids = [d[0] for d in data if d[0] is not None]
    if len(ids) != len(set(ids)):
        return
    got = check_rows(spark.createDataFrame(data, schema), build_rules(PRODUCTS, cfg, NOW)).collect()
    assert sorted((r["product_id"] or "", r["title"] or "", sorted(r["_reasons"])) for r in got) == sorted(
        (p or "", t or "", sorted(_oracle(p, t, at, cfg))) for p, t, at in rows
    )
