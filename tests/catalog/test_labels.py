"""``labels``: the catalog's merchant values become the labelled table, and nothing else does."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from catalog_enrichment.catalog.attributes import attributes_schema
from catalog_enrichment.catalog.embedded import LakehouseCatalog
from catalog_enrichment.catalog.labels import (
    LABEL_SOURCES,
    METADATA_KEY,
    LabelReport,
    build_labels,
    write_labels,
)
from catalog_enrichment.catalog.lakehouse import read_table, table_version, write_table
from catalog_enrichment.cli import main
from catalog_enrichment.config import CatalogConfig
from catalog_enrichment.contracts import Taxonomy
from catalog_enrichment.data.dataset import encode_labels
from catalog_enrichment.errors import CatalogEnrichError, ContractError

T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def _products() -> pa.Table:
    return pa.table(
        {
            "product_id": ["p1", "p2", "p2", "p3", "p4", "p5", None, "p6"],
            "title": ["red shirt", "old title", "blue dress", "jeans", "scarf", "lamp", "orphan", ""],
            "description": ["a", "b", "c", "d", "e", "f", "g", "h"],
            "updated_at": pa.array(
                [T0, T0, T0 + dt.timedelta(days=1), T0, T0, T0, T0, T0], pa.timestamp("us", "UTC")
            ),
        }
    )


def _attributes(rows: list[tuple[str, str, str, str]]) -> pa.Table:
    n = len(rows)
    data = {
        "product_id": [r[0] for r in rows],
        "attribute": [r[1] for r in rows],
        "value": [r[2] for r in rows],
        "confidence": [None] * n,
        "threshold": [None] * n,
        "source": [r[3] for r in rows],
        "model_name": [None] * n,
        "model_version": [None] * n,
        "run_id": [None] * n,
        "written_at": [T0] * n,
    }
    return pa.table(data, schema=attributes_schema())


def _build(
    spark: Any, tmp_path: Path, products: pa.Table, attributes: pa.Table, taxonomy: Taxonomy, **given: Any
) -> tuple[pa.Table, LabelReport]:
    """:func:`build_labels` over Arrow tables read as Spark DataFrames (the label sources' rows)."""
    merchant = attributes.filter(pc.is_in(attributes["source"], pa.array(LABEL_SOURCES)))
    batches, report = build_labels(
        spark,
        spark.createDataFrame(products),
        spark.createDataFrame(merchant.select(["product_id", "attribute", "value"])),
        taxonomy,
        tmp_path / "staging",
        **given,
    )
    return batches.read_all(), report


def _evaluation() -> pa.Table:
    """The frozen evaluation set: p4."""
    return _products().filter(pa.array([False, False, False, False, True, False, False, False]))


ROWS = [
    ("p1", "color", "red", "merchant"),
    ("p1", "color", "white", "merchant"),  # multilabel: both kept, in taxonomy order
    ("p1", "product_type", "shirt", "merchant"),
    ("p2", "product_type", "dress", "merchant"),
    ("p2", "color", "blue", "model"),  # the model's own value is never a label
    ("p3", "color", "ultraviolet", "merchant"),  # outside the taxonomy: dropped, counted
    ("p3", "fit", "slim", "merchant"),  # an attribute the taxonomy lacks: dropped, counted
    ("p3", "product_type", "jeans", "merchant"),
    ("p3", "product_type", "shorts", "merchant"),  # two values of a single-valued attribute: conflict
    ("p4", "material", "wool", "merchant"),  # p4 is in the evaluation set
    ("p5", "color", "blue", "model"),  # p5 has model values only: no label, not written
    ("p6", "color", "red", "merchant"),  # p6 has an empty title: not written
    ("p9", "product_type", "jeans", "merchant"),  # p9 is no product: neither labelled nor counted
    ("p9", "product_type", "shorts", "merchant"),
]


def test_merchant_values_become_labels_and_everything_else_is_dropped_and_counted(
    spark: Any, tmp_path: Path, taxonomy: Taxonomy
) -> None:
    table, report = _build(
        spark, tmp_path, _products(), _attributes(ROWS), taxonomy, evaluation=_evaluation()
    )
    rows = {r["product_id"]: r for r in table.to_pylist()}
    assert set(rows) == {"p1", "p2"}  # p3's only labels were dropped or conflicting
    assert rows["p1"]["color"] == [v for v in taxonomy["color"].values if v in ("red", "white")]
    assert rows["p1"]["product_type"] == "shirt" and rows["p1"]["material"] is None
    assert rows["p2"]["title"] == "blue dress" and rows["p2"]["color"] is None  # latest copy; no model value
    assert report.products_read == 8 and report.products_without_id_or_title == 2 and report.stale_copies == 1
    assert report.excluded_evaluation_products == 1 and report.products_without_labels == 2
    assert report.dropped_values == {"color=ultraviolet": 1} and report.dropped_attributes == {"fit": 1}
    assert report.dropped_total == {"attributes": 1, "values": 1}
    assert report.conflicting == {"product_type": 1}
    assert report.labels_per_attribute == {"color": 1, "material": 0, "product_type": 2, "pattern": 0}
    encode_labels(table, taxonomy)  # the table is what training reads (contract labelled_products)


def test_a_merchant_s_attribute_or_value_in_another_case_width_or_spacing_is_the_taxonomy_s(
    spark: Any, tmp_path: Path, taxonomy: Taxonomy
) -> None:
    """The merchant's "Color " = "RED", a full-width "ｗｈｉｔｅ" and " Product_Type" = "Shirt " are the
    taxonomy's colour red and white and product type shirt; a value outside it stays dropped."""
    rows = [
        ("p1", "Color ", "RED", "merchant"),
        ("p1", "color", "ｗｈｉｔｅ", "merchant"),
        ("p1", " Product_Type", "Shirt ", "merchant"),
        ("p3", "COLOR", "ultraviolet", "merchant"),
    ]
    table, report = _build(spark, tmp_path, _products(), _attributes(rows), taxonomy)
    labelled = {r["product_id"]: r for r in table.to_pylist()}
    assert set(labelled) == {"p1"}
    assert labelled["p1"]["color"] == [v for v in taxonomy["color"].values if v in ("red", "white")]
    assert labelled["p1"]["product_type"] == "shirt"
    assert report.dropped_attributes == {} and report.dropped_values == {"COLOR=ultraviolet": 1}


def test_a_product_whose_latest_copy_lost_its_title_is_left_out_not_labelled_on_an_older_copy(
    spark: Any,
    tmp_path: Path,
    taxonomy: Taxonomy,
) -> None:
    """p2's latest copy has no title: the job quarantines that copy, and the older one's title is
    content p2 no longer has - no label is trained on it."""
    products = _products()
    titles = products["title"].to_pylist()
    titles[2] = None  # p2's latest copy ("blue dress")
    products = products.set_column(products.schema.get_field_index("title"), "title", pa.array(titles))
    # verdicts on p2 and on p9 (no product) label nothing, and are counted as no label used
    reviews = _reviews([("p2", "pattern", "striped", "yes", "2"), ("p9", "pattern", "striped", "no", "2")])
    table, report = _build(spark, tmp_path, products, _attributes(ROWS), taxonomy, reviews=reviews)
    assert "p2" not in table["product_id"].to_pylist()
    assert report.stale_copies == 1 and report.products_without_id_or_title == 3
    assert report.confirmed_per_attribute == {} and report.rejected_per_attribute == {}


def test_a_product_whose_latest_copy_is_not_utf8_text_is_left_out(
    spark: Any, tmp_path: Path, taxonomy: Taxonomy
) -> None:
    """p2's latest copy has a description of Latin-1 bytes: the job quarantines that copy
    (``description_valid_utf8``), and training could not read it - no label is trained on it."""
    products = _products()
    texts = [None if t is None else t.encode() for t in products["description"].to_pylist()]
    texts[2] = "blue dress, café".encode("latin-1")  # p2's latest copy
    column = pa.array(texts, pa.binary()).view(pa.string())  # as an export writes them, unchecked
    products = products.set_column(products.schema.get_field_index("description"), "description", column)
    table, report = _build(spark, tmp_path, products, _attributes(ROWS), taxonomy)
    assert "p2" not in table["product_id"].to_pylist()
    table.validate(full=True)  # every text it wrote is UTF-8
    assert report.stale_copies == 1 and report.products_without_id_or_title == 3


def test_of_two_copies_of_the_same_time_the_titled_one_is_the_latest(
    spark: Any, tmp_path: Path, taxonomy: Taxonomy
) -> None:
    """p2's two latest copies share their time, one without a title: the titled copy is labelled,
    and the untitled one counts as a stale copy (every pass over the rows picks the same)."""
    products = pa.concat_tables([_products(), _products().slice(2, 1)])
    titles = products["title"].to_pylist()
    titles[2] = ""
    products = products.set_column(products.schema.get_field_index("title"), "title", pa.array(titles))
    table, report = _build(spark, tmp_path, products, _attributes(ROWS), taxonomy)
    assert {r["product_id"]: r["title"] for r in table.to_pylist()}["p2"] == "blue dress"
    assert report.stale_copies == 2 and report.products_without_id_or_title == 2
    assert report.products_without_labels == 2 and report.products_written == 3


def test_variants_of_evaluation_products_are_left_out_too(
    spark: Any, tmp_path: Path, taxonomy: Taxonomy
) -> None:
    """p1's twin in the evaluation set (another id, the same title): training on p1 would score its
    answer at promotion. So is a product sharing a description with it; p2 shares nothing."""
    evaluation = pa.table(
        {"product_id": ["e1", "e2"], "title": ["Red Shirt", "lamp shade"], "description": ["x", "c"]}
    )
    table, report = _build(spark, tmp_path, _products(), _attributes(ROWS), taxonomy, evaluation=evaluation)
    assert {r["product_id"] for r in table.to_pylist()} == {"p4"}  # p1 (title) and p2 ("c") left out
    assert report.excluded_evaluation_products == 2
    table, _ = _build(
        spark, tmp_path, _products(), _attributes(ROWS), taxonomy, evaluation=evaluation.slice(0, 1)
    )
    assert {r["product_id"] for r in table.to_pylist()} == {"p2", "p4"}


def test_labels_are_written_with_their_sources_and_train_reads_them(
    spark: Any, tmp_path: Path, taxonomy: Taxonomy
) -> None:
    write_table(tmp_path / "products", _products())
    write_table(tmp_path / "attributes", _attributes(ROWS))
    write_table(tmp_path / "eval", _evaluation())
    report = write_labels(
        spark,
        catalog=LakehouseCatalog(CatalogConfig(root=str(tmp_path))),
        evaluation=tmp_path / "eval",
        out=tmp_path / "labelled",
        taxonomy=taxonomy,
    )
    assert report.excluded_evaluation_products == 1
    assert report.sources["products"]["version"] == 0 and report.sources["evaluation"]["version"] == 0
    from deltalake import DeltaTable

    meta = json.loads(DeltaTable(str(tmp_path / "labelled")).history(1)[0][METADATA_KEY])
    assert meta["sources"]["attributes"]["path"] == str((tmp_path / "attributes").resolve())
    assert read_table(tmp_path / "labelled").num_rows == 2
    # run again: a new version of the same table, not an error
    write_labels(
        spark, catalog=LakehouseCatalog(CatalogConfig(root=str(tmp_path))), evaluation=None,
        out=tmp_path / "labelled", taxonomy=taxonomy,
    )  # fmt: skip
    assert table_version(tmp_path / "labelled") == 1 and read_table(tmp_path / "labelled").num_rows == 3
    # the gate judges on a pinned version of the evaluation set: its products stay out, whatever
    # the set's latest version holds
    write_table(tmp_path / "eval", _evaluation().slice(0, 0), mode="overwrite")
    pinned = write_labels(
        spark, catalog=LakehouseCatalog(CatalogConfig(root=str(tmp_path))), evaluation=tmp_path / "eval",
        out=tmp_path / "labelled", taxonomy=taxonomy, evaluation_version=0,
    )  # fmt: skip
    assert pinned.excluded_evaluation_products == 1 and pinned.sources["evaluation"]["version"] == 0
    # a version the set does not have, or a version of a Parquet set (it has none): one-line errors
    with pytest.raises(CatalogEnrichError, match=r"promotion.eval_version is 9, but .* has versions 0 to 1"):
        write_labels(
            spark, catalog=LakehouseCatalog(CatalogConfig(root=str(tmp_path))), evaluation=tmp_path / "eval",
            out=tmp_path / "labelled", taxonomy=taxonomy, evaluation_version=9,
        )  # fmt: skip
    pq.write_table(_evaluation(), tmp_path / "eval.parquet")
    with pytest.raises(CatalogEnrichError, match="is not a Delta table: it has no versions"):
        write_labels(
            spark, catalog=LakehouseCatalog(CatalogConfig(root=str(tmp_path))),
            evaluation=tmp_path / "eval.parquet", out=tmp_path / "labelled", taxonomy=taxonomy,
            evaluation_version=0,
        )  # fmt: skip


def test_a_products_table_with_deletion_vectors_is_read_without_its_deleted_rows(
    spark: Any, tmp_path: Path, taxonomy: Taxonomy
) -> None:
    """Current Delta writers mark deleted rows in deletion vectors, which pyarrow's dataset cannot
    honour: the labels are built from the rows left (p1 deleted: no label of its)."""
    from tests.delta_protocol import delete_with_deletion_vector

    write_table(tmp_path / "products", _products())
    delete_with_deletion_vector(tmp_path / "products", [0])
    write_table(tmp_path / "attributes", _attributes(ROWS))
    write_labels(
        spark, catalog=LakehouseCatalog(CatalogConfig(root=str(tmp_path))), evaluation=None,
        out=tmp_path / "labelled", taxonomy=taxonomy,
    )  # fmt: skip
    assert sorted(read_table(tmp_path / "labelled")["product_id"].to_pylist()) == ["p2", "p4"]
    assert read_table(tmp_path / "products").num_rows == 7


def test_bad_catalogs_are_clear_errors(
    spark: Any, tmp_path: Path, taxonomy: Taxonomy, capsys: pytest.CaptureFixture[str]
) -> None:
    write_table(tmp_path / "products", _products())
    write_table(tmp_path / "attributes", _attributes(ROWS).drop_columns(["source"]))
    with pytest.raises(ContractError, match=r"the attributes table .* lacks columns \['source'\]"):
        write_labels(
            spark, catalog=LakehouseCatalog(CatalogConfig(root=str(tmp_path))), evaluation=None,
            out=tmp_path / "labelled", taxonomy=taxonomy,
        )  # fmt: skip
    with pytest.raises(ContractError, match=r"the products table lacks columns \['title'\]"):
        _build(spark, tmp_path, _products().drop_columns(["title"]), _attributes(ROWS), taxonomy)
    shutil.rmtree(tmp_path / "attributes")
    write_table(tmp_path / "attributes", _attributes([r for r in ROWS if r[3] == "model"]))
    with pytest.raises(CatalogEnrichError, match="no labelled product"):
        write_labels(
            spark, catalog=LakehouseCatalog(CatalogConfig(root=str(tmp_path))), evaluation=None,
            out=tmp_path / "labelled", taxonomy=taxonomy,
        )  # fmt: skip
    assert not (tmp_path / "labelled").exists()
    code = main(["labels", "--catalog", str(tmp_path / "nowhere")])
    assert code == 2 and "the products table was not found" in capsys.readouterr().err
    # an evaluation set named and not found is an error: its products would be trained on
    write_table(tmp_path / "attributes", _attributes(ROWS), mode="overwrite")
    code = main(["labels", "--catalog", str(tmp_path), "--eval-data", str(tmp_path / "no-eval")])
    assert (
        code == 2 and f"the evaluation table was not found: {tmp_path / 'no-eval'}" in capsys.readouterr().err
    )
    assert not (tmp_path / "labelled").exists()
    # none at the default place: said, and nothing is left out
    assert main(["labels", "--catalog", str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert f"no evaluation set at {tmp_path / 'eval'}: no product is left out" in said
    assert read_table(tmp_path / "labelled").num_rows == 3


def _reviews(rows: list[tuple[str, str, str, str, str]]) -> pa.Table:
    """(product, attribute, value, verdict, reviewed_at day) -> a reviews table."""
    from catalog_enrichment.catalog.base import keyed_schema

    return pa.Table.from_pylist(
        [
            {
                "sample_id": "s1",
                "product_id": p,
                "attribute": a,
                "value": v,
                "model_version": "1",
                "verdict": verdict,
                "reviewer": "ana",
                "reviewed_at": T0 + dt.timedelta(days=int(day)),
                "source_file": "f.csv",
                "imported_at": T0,
            }
            for p, a, v, verdict, day in rows
        ],
        schema=keyed_schema("reviews"),
    )


def test_peoples_verdicts_become_partial_labels_where_no_merchant_labelled(
    spark: Any, tmp_path: Path, taxonomy: Taxonomy
) -> None:
    reviews = _reviews(
        [
            ("p5", "color", "blue", "yes", "1"),  # p5 had model values only: now labelled by a person
            ("p5", "color", "red", "no", "1"),
            ("p5", "pattern", "striped", "unsure", "1"),  # unsure: not a label
            ("p1", "color", "black", "no", "1"),  # p1's colour is the merchant's: the merchant wins
            ("p2", "material", "wool", "no", "1"),
            ("p2", "material", "wool", "yes", "2"),  # a later verdict replaces the earlier
            ("p2", "color", "ultraviolet", "yes", "1"),  # outside the taxonomy: dropped
            ("p2", "pattern", "striped", "yes", "0"),  # judged before p2 changed (day 1): not used
            ("p4", "color", "red", "yes", "1"),  # the evaluation set stays out
        ]
    )
    table, report = _build(
        spark, tmp_path, _products(), _attributes(ROWS), taxonomy, evaluation=_evaluation(), reviews=reviews
    )
    rows = {r["product_id"]: r for r in table.to_pylist()}
    assert set(rows) == {"p1", "p2", "p5"}
    assert rows["p5"]["color"] is None  # partial: the other colours stay unknown
    assert dict(rows["p5"]["confirmed"]) == {"color": ["blue"]} and dict(rows["p5"]["rejected"]) == {
        "color": ["red"]
    }
    assert rows["p1"]["confirmed"] is None and rows["p1"]["rejected"] is None
    assert dict(rows["p2"]["confirmed"]) == {"material": ["wool"]} and rows["p2"]["rejected"] is None
    assert report.confirmed_per_attribute == {"color": 1, "material": 1}
    assert report.rejected_per_attribute == {"color": 1}
    assert report.unused_verdicts == {
        "unsure": 1,
        "where a merchant labelled the attribute": 1,
        "outside the taxonomy": 1,
        "judged before the product changed": 1,
    }
    assert "verdicts that are no label: " in report.summary() and "1 unsure" in report.summary()

    labels = encode_labels(table, taxonomy)
    i = table["product_id"].to_pylist().index("p5")
    color = taxonomy["color"]
    assert not labels.known["color"][i]  # never calibrated or evaluated on
    assert labels.partial["color"][i, color.index("blue")] == 1
    assert labels.partial["color"][i, color.index("red")] == -1
    assert (labels.partial["color"][i] != 0).sum() == 2
    assert labels.partial_only().tolist() == [pid == "p5" for pid in table["product_id"].to_pylist()]


def test_a_later_verdict_on_older_content_does_not_hide_one_on_the_current_content(
    spark: Any,
    tmp_path: Path,
    taxonomy: Taxonomy,
) -> None:
    """p2 changed on day 1. Sample s2, drawn after that, got a "no" on day 2; sample s1, drawn on day
    0, got a "yes" on day 3 - the latest verdict, but on the old title: the "no" is the label."""
    reviews = _reviews([("p2", "pattern", "striped", "no", "2"), ("p2", "pattern", "striped", "yes", "3")])
    reviews = reviews.set_column(
        reviews.schema.get_field_index("sample_id"), "sample_id", pa.array(["s2", "s1"])
    )
    drawn = {"s1": T0, "s2": T0 + dt.timedelta(days=1, hours=1)}
    table, report = _build(
        spark, tmp_path, _products(), _attributes(ROWS), taxonomy, reviews=reviews, drawn=drawn
    )
    assert dict({r["product_id"]: r["rejected"] for r in table.to_pylist()}["p2"]) == {"pattern": ["striped"]}
    assert report.unused_verdicts == {}


def test_a_verdict_on_a_sample_drawn_before_the_product_changed_is_no_label(
    spark: Any, tmp_path: Path, taxonomy: Taxonomy
) -> None:
    """The reviewer judges the content copied into the sample when it was drawn: p2 changed on day 1,
    its sample was drawn on day 0 and reviewed on day 2 - the verdict is on the old title."""
    reviews = _reviews([("p2", "pattern", "striped", "yes", "2")])
    drawn_before = {"s1": T0}
    table, report = _build(
        spark, tmp_path, _products(), _attributes(ROWS), taxonomy, reviews=reviews, drawn=drawn_before
    )
    assert report.unused_verdicts == {"judged before the product changed": 1}
    assert {r["product_id"]: r["confirmed"] for r in table.to_pylist()}["p2"] is None
    drawn_after = {"s1": T0 + dt.timedelta(days=1, hours=1)}
    table, report = _build(
        spark, tmp_path, _products(), _attributes(ROWS), taxonomy, reviews=reviews, drawn=drawn_after
    )
    assert report.unused_verdicts == {}
    assert dict({r["product_id"]: r["confirmed"] for r in table.to_pylist()}["p2"]) == {
        "pattern": ["striped"]
    }


def test_a_colour_family_people_rejected_rejects_its_shades(
    spark: Any, tmp_path: Path, taxonomy: Taxonomy
) -> None:
    """ "No" on the family cool is "no" on blue, purple and green, but for a shade judged itself (p5's
    green, "yes"); "yes" on a family does not say which shade, and labels nothing."""
    reviews = _reviews(
        [
            ("p5", "color_family", "cool", "no", "1"),
            ("p5", "color", "green", "yes", "1"),
            ("p2", "color_family", "warm", "yes", "1"),
        ]
    )
    table, report = _build(spark, tmp_path, _products(), _attributes(ROWS), taxonomy, reviews=reviews)
    rows = {r["product_id"]: r for r in table.to_pylist()}
    assert dict(rows["p5"]["rejected"]) == {"color": ["blue", "purple"]}
    assert dict(rows["p5"]["confirmed"]) == {"color": ["green"]}
    assert rows["p2"]["confirmed"] is None and rows["p2"]["rejected"] is None
    assert report.rejected_per_attribute == {"color": 2} and report.confirmed_per_attribute == {"color": 1}
    assert report.unused_verdicts == {"a value group confirmed (which member is unknown)": 1}


def test_variants_chained_through_shared_texts_are_left_out_and_a_template_links_nothing(
    spark: Any, tmp_path: Path, taxonomy: Taxonomy
) -> None:
    """v1 shares its title with the evaluation product, v2 a description with v1, v3 a title with
    v2: one article's variants, all left out. 70 products titled "T-shirt" share a template, not
    an article: the evaluation's "t-shirt" leaves out only the one with its description too."""
    chain = [
        ("v1", "Alpha Tee", "Soft cotton"),
        ("v2", "alpha tee!", "soft  COTTON"),
        ("v3", "ALPHA TEE!", "linen"),
    ]
    template = [(f"t{i}", "T-shirt", f"print {i}") for i in range(70)]
    rows = [*chain, *template, ("other", "lamp", "soft cotton lamp")]
    products = pa.table(
        {
            "product_id": [r[0] for r in rows],
            "title": [r[1] for r in rows],
            "description": [r[2] for r in rows],
            "updated_at": pa.array([T0] * len(rows), pa.timestamp("us", "UTC")),
        }
    )
    attributes = _attributes([(r[0], "product_type", "shirt", "merchant") for r in rows])
    evaluation = pa.table(
        {"product_id": ["e1", "e2"], "title": ["alpha tee", "t-shirt"], "description": ["x", "PRINT 7"]}
    )
    table, report = _build(spark, tmp_path, products, attributes, taxonomy, evaluation=evaluation)
    left_out = {r[0] for r in rows} - set(table["product_id"].to_pylist())
    assert left_out == {"v1", "v2", "v3", "t7"}
    assert report.excluded_evaluation_products == 4 and report.products_written == len(rows) - 4


def test_the_products_and_attribute_tables_are_never_read_whole_on_the_driver(
    spark: Any, tmp_path: Path, taxonomy: Taxonomy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A marketplace's products (images included) do not fit the driver: the labels read them in
    Spark. Every Arrow read of the two tables on the driver fails here, and the labels are built."""
    from catalog_enrichment.catalog import lakehouse

    write_table(tmp_path / "products", _products())
    write_table(tmp_path / "attributes", _attributes(ROWS))
    tables = {str((tmp_path / name).resolve()) for name in ("products", "attributes")}

    def refused(read: Any) -> Any:
        def read_on_driver(path: Any, *args: Any, **kwargs: Any) -> Any:
            assert str(Path(path).resolve()) not in tables, f"{path} read on the driver"
            return read(path, *args, **kwargs)

        return read_on_driver

    for name in ("read_table", "dataset", "scan", "read_products_of"):
        monkeypatch.setattr(lakehouse, name, refused(getattr(lakehouse, name)))
    report = write_labels(
        spark, catalog=LakehouseCatalog(CatalogConfig(root=str(tmp_path))), evaluation=None,
        out=tmp_path / "labelled", taxonomy=taxonomy,
    )  # fmt: skip
    assert report.products_written == 3 and report.stale_copies == 1
    monkeypatch.undo()
    assert sorted(read_table(tmp_path / "labelled")["product_id"].to_pylist()) == ["p1", "p2", "p4"]
