"""The attribute table's write rules, the same suite on both backends (no Spark): the embedded
lakehouse (real Delta tables) and PostgreSQL (a real throw-away server): one commit per run,
merchant rows untouched, idempotent per run id, exact rollback."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from catalog_enrichment.catalog import Catalog, open_catalog
from catalog_enrichment.catalog.attributes import META_RUN_ID, attributes_schema, find_run_commit
from catalog_enrichment.catalog.base import MergeResult, RunWrite
from catalog_enrichment.catalog.lakehouse import table_version, write_table
from catalog_enrichment.catalog.reports import RunReport
from catalog_enrichment.config import CatalogConfig
from catalog_enrichment.contracts import load_contract
from catalog_enrichment.errors import CatalogEnrichError

pytestmark = pytest.mark.timeout(120)
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
MERCHANT = [("p1", "color", "red"), ("p2", "material", "wool")]


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


def _state(catalog: Catalog) -> set[tuple[str, str, str, str, str | None]]:
    t = catalog.attribute_rows().to_pylist()
    return {(r["product_id"], r["attribute"], r["value"], r["source"], r["run_id"]) for r in t}


def _merge(
    catalog: Catalog, run: str, values: pa.Table, pairs: pa.Table, version: str = "1", model: str = "m"
) -> MergeResult:
    quarantine = load_contract("quarantine").arrow_schema().empty_table()
    written_at = T0 + dt.timedelta(days=1)
    return catalog.write(RunWrite(run, model, version, written_at, values, pairs, quarantine))


def seed_merchant(catalog: Catalog, rows: pa.Table) -> None:
    """The merchant's values, as the marketplace's catalog holds them before any run."""
    if catalog.kind == "postgres":
        catalog.add_merchant_values(rows)  # type: ignore[attr-defined]
    else:
        write_table(catalog.attributes, rows)  # type: ignore[attr-defined]


@pytest.fixture(params=["lakehouse", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalog(request: pytest.FixtureRequest, tmp_path: Path) -> Catalog:
    """An empty catalog of each kind, seeded with the merchant's values ``MERCHANT``."""
    if request.param == "postgres":
        cfg = request.getfixturevalue("pg_catalog_config")
    else:
        cfg = CatalogConfig(root=str(tmp_path / "lake"), lock_wait_seconds=30)
    catalog = open_catalog(cfg)
    seed_merchant(catalog, _merchant(MERCHANT))
    return catalog


def test_merge_replaces_model_values_per_scored_pair_and_never_touches_merchant_rows(
    catalog: Catalog,
) -> None:
    all_pairs = _pairs([("p1", "color"), ("p1", "material"), ("p2", "color"), ("p2", "material")])
    r1 = _merge(
        catalog,
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
    assert _state(catalog) == {
        ("p1", "color", "red", "merchant", None),
        ("p2", "material", "wool", "merchant", None),
        ("p1", "material", "cotton", "model", "r1"),
        ("p2", "color", "red", "model", "r1"),
        ("p2", "color", "white", "model", "r1"),
    }
    # r2 scores only p2/color: white goes, red stays (new provenance); p1/material is not touched
    r2 = _merge(
        catalog, "r2", _values([("p2", "color", "red", 0.95)]), _pairs([("p2", "color")]), version="2"
    )
    assert (r2.updated, r2.deleted, r2.inserted) == (1, 1, 0)
    assert _state(catalog) == {
        ("p1", "color", "red", "merchant", None),
        ("p2", "material", "wool", "merchant", None),
        ("p1", "material", "cotton", "model", "r1"),
        ("p2", "color", "red", "model", "r2"),
    }
    # the same run id again: no new commit, nothing changes
    before = _state(catalog)
    again = _merge(catalog, "r2", _values([("p2", "color", "blue", 0.95)]), _pairs([("p2", "color")]))
    assert again.already_committed and again.version == r2.version and _state(catalog) == before
    assert catalog.runs_of_model_version("m", "1") == ["r1"]
    if catalog.kind == "lakehouse":
        path = catalog.attributes  # type: ignore[attr-defined]
        assert find_run_commit(path, "r2") == table_version(path) == r2.version
    # a version whose run changed nothing still has that run, on either catalog: a rollback of the
    # version finds it (and so keeps every alias off the version), though nothing comes back
    _merge(catalog, "quiet", _values([]), _pairs([]), version="3")
    catalog.upsert_report(
        RunReport(run_id="quiet", status="succeeded", model_name="m", model_version="3", started_at=T0)
    )
    assert catalog.runs_of_model_version("m", "3") == ["quiet"]
    assert catalog.runs_of_model_version("other", "3") == []
    (undone,) = catalog.rollback_runs(["quiet"])
    assert undone.pairs_restored == 0 and not undone.superseded


def test_a_model_value_whose_pair_the_merchant_fills_later_goes_with_the_next_run_over_it(
    catalog: Catalog,
) -> None:
    """After the model wrote colours for p3 and p4, the merchant gives p3's in the catalog (a merchant
    row) and p4's only in the products table (the run passes the pair, which it did not score): the
    next run over them removes both model values, and its rollback puts neither back beside the
    merchant's (p5's entry of blanks is no merchant value: its model value comes back)."""
    pairs = _pairs([("p3", "color"), ("p4", "color"), ("p5", "color")])
    first = [("p3", "color", "blue", 0.9), ("p4", "color", "red", 0.9), ("p5", "color", "red", 0.9)]
    _merge(catalog, "r1", _values(first), pairs)
    late = _merchant([("p3", "color", "green")])
    if catalog.kind == "postgres":
        catalog.add_merchant_values(late)  # type: ignore[attr-defined]
    else:
        write_table(catalog.attributes, late, mode="append")  # type: ignore[attr-defined]
    products = [("p4", [("color", ["black"])]), ("p5", [("color", [None, " \t"])])]
    table = pa.Table.from_pylist(
        [{"product_id": p, "title": "t", "merchant_attributes": m, "updated_at": T0, "ingest_date": T0.date()}
         for p, m in products],
        schema=load_contract("products").arrow_schema(),
    )  # fmt: skip
    if catalog.kind == "postgres":
        catalog.load_products(table)  # type: ignore[attr-defined]
    else:
        write_table(catalog.products, table)  # type: ignore[attr-defined]
    r2 = _merge(catalog, "r2", _values([("p3", "material", "cotton", 0.9)]), _pairs([("p3", "material")]))
    r3 = _merge(catalog, "r3", _values([]), pairs)  # p3 to p5 read again
    assert r2.deleted == 0 and (r3.deleted, r3.merchant_pairs_skipped) == (3, 1)
    colours = lambda: {r[:4] for r in _state(catalog) if r[1] == "color" and r[0] != "p1"}  # noqa: E731
    assert colours() == {("p3", "color", "green", "merchant")}
    result = catalog.rollback_runs(["r3"])[0]
    assert colours() == {("p3", "color", "green", "merchant"), ("p5", "color", "red", "model")}
    assert (result.pairs_restored, result.rows_restored) == (3, 1)


def test_rolling_back_a_version_whose_runs_another_version_s_rolled_back_run_interleaves(
    catalog: Catalog,
) -> None:
    """v0 wrote W on a pair, v1 X, v2 Y (and a pair of its own), v1 Z. v2's rollback leaves the
    shared pair to v1's later run and restores its own; rolling v1 back then restores what stood
    before v1's first run, W, on either catalog - the pair v1's first run left was changed since
    only by runs rolled back."""
    pair = _pairs([("q1", "color")])
    _merge(catalog, "a0", _values([("q1", "color", "white", 0.9)]), pair, version="0")
    _merge(catalog, "a1", _values([("q1", "color", "black", 0.9)]), pair)
    both = _pairs([("q1", "color"), ("q2", "color")])
    _merge(
        catalog, "b", _values([("q1", "color", "grey", 0.9), ("q2", "color", "red", 0.9)]), both, version="2"
    )
    _merge(catalog, "a2", _values([("q1", "color", "navy", 0.9)]), pair)
    (b,) = catalog.rollback_runs(["b"])
    assert b.superseded == [("q1", "color")] and b.pairs_restored == 1
    model = lambda: {(*r[:3], r[4]) for r in _state(catalog) if r[3] == "model"}  # noqa: E731
    assert model() == {("q1", "color", "navy", "a2")}
    undone = catalog.rollback_runs(["a2", "a1"])
    assert [(r.run_id, r.pairs_restored, r.superseded) for r in undone] == [("a2", 1, []), ("a1", 1, [])]
    assert model() == {("q1", "color", "white", "a0")}


def test_a_rollback_puts_no_model_shade_back_under_the_merchant_s_colour_family(catalog: Catalog) -> None:
    """r1 wrote a shade and its family for p3, p6 and p7; then the merchant gave p3's family in the
    catalog and p6's in the products table, and r2 (which reads both levels as settled, as a run
    decides) removed the model's values. Rolling r2 back with the taxonomy's links restores p7's
    values only: a model shade under a merchant's family would contradict it."""
    from catalog_enrichment.contracts import load_taxonomy

    linked = load_taxonomy(Path(__file__).parents[2] / "schemas" / "taxonomy.yaml").held_together()
    assert linked["color"] == ["color_family"] and linked["color_family"] == ["color"]
    products = ["p3", "p6", "p7"]
    pairs = _pairs([(p, a) for p in products for a in ("color", "color_family")])
    first = [(p, a, v, 0.9) for p in products for a, v in (("color", "red"), ("color_family", "warm"))]
    _merge(catalog, "r1", _values(first), pairs)
    late = _merchant([("p3", "color_family", "cool")])
    table = pa.Table.from_pylist(
        [{"product_id": "p6", "title": "t", "merchant_attributes": [("color_family", ["cool"])],
          "updated_at": T0, "ingest_date": T0.date()}],
        schema=load_contract("products").arrow_schema(),
    )  # fmt: skip
    if catalog.kind == "postgres":
        catalog.add_merchant_values(late)  # type: ignore[attr-defined]
        catalog.load_products(table)  # type: ignore[attr-defined]
    else:
        write_table(catalog.attributes, late, mode="append")  # type: ignore[attr-defined]
        write_table(catalog.products, table)  # type: ignore[attr-defined]
    settled = _pairs([(p, a) for p in ("p3", "p6") for a in ("color", "color_family")])
    _merge(catalog, "r2", _values([]), settled)
    _merge(catalog, "r3", _values([]), _pairs([("p7", "color"), ("p7", "color_family")]))
    model = lambda: {r[:3] for r in _state(catalog) if r[3] == "model"}  # noqa: E731
    (undone,) = catalog.rollback_runs(["r2"], linked)
    # r2's pairs stand as it restores them (the merchant's values hold them): no row changes, and
    # still the rollback is committed - r2 is no live run any more, and rolled back once only
    assert (undone.pairs_restored, undone.rows_removed, undone.rows_restored) == (4, 0, 0)
    with pytest.raises(CatalogEnrichError, match="run 'r2' was already rolled back"):
        catalog.rollback_runs(["r2"], linked)
    catalog.rollback_runs(["r3"])
    assert model() == {("p7", "color", "red"), ("p7", "color_family", "warm")}


def test_merchant_rows_hold_the_merchant_s_values_only() -> None:
    """Seeding the catalog from the products' merchant_attributes: null and blank entries are no value."""
    from catalog_enrichment.catalog.attributes import merchant_rows

    table = pa.Table.from_pylist(
        [
            {
                "product_id": "p1",
                "merchant_attributes": [("color", [None, "", " ", "red"]), ("material", [None])],
            }
        ],
        schema=pa.schema(
            [
                ("product_id", pa.string()),
                ("merchant_attributes", pa.map_(pa.string(), pa.list_(pa.string()))),
            ]
        ),
    )
    rows = merchant_rows(table, T0).to_pylist()
    assert [(r["attribute"], r["value"], r["source"]) for r in rows] == [("color", "red", "merchant")]


def test_rollback_restores_exactly_and_leaves_pairs_changed_later_alone(catalog: Catalog) -> None:
    pairs = _pairs([("p1", "material"), ("p2", "color")])
    _merge(catalog, "r1", _values([("p1", "material", "cotton", 0.8), ("p2", "color", "red", 0.9)]), pairs)
    after_r1 = _state(catalog)
    _merge(catalog, "r2", _values([("p1", "material", "linen", 0.9)]), pairs)  # p2/color emptied
    after_r2 = _state(catalog)
    _merge(catalog, "r3", _values([("p1", "material", "silk", 0.9)]), _pairs([("p1", "material")]))
    # rolling back r2: p2/color comes back; p1/material was changed again by r3 -> left alone
    result = catalog.rollback_runs(["r2"])[0]
    assert result.superseded == [("p1", "material")] and result.pairs_restored == 1
    assert ("p2", "color", "red", "model", "r1") in _state(catalog)
    assert ("p1", "material", "silk", "model", "r3") in _state(catalog)
    with pytest.raises(CatalogEnrichError, match="already rolled back"):
        catalog.rollback_runs(["r2"])[0]
    with pytest.raises(CatalogEnrichError, match="no commit"):
        catalog.rollback_runs(["never-ran"])[0]
    # rolling back r3 then restores what it replaced for p1/material but r2's value, which r2's
    # rollback took out: nothing
    catalog.rollback_runs(["r3"])[0]
    assert _state(catalog) == (after_r2 - {("p1", "material", "linen", "model", "r2")}) | {
        ("p2", "color", "red", "model", "r1")
    }
    assert after_r1 != after_r2


def test_a_pair_later_runs_wrote_and_emptied_again_is_left_alone(catalog: Catalog) -> None:
    """r took x's red out; s wrote blue and t took it out again, so the pair is empty as r left it,
    but r no longer decides it: r's rollback leaves it alone. Once t and s are rolled back, it puts
    red back."""
    pair = _pairs([("p3", "color")])
    _merge(catalog, "x", _values([("p3", "color", "red", 0.9)]), pair, version="0")
    _merge(catalog, "r", _values([]), pair)
    _merge(catalog, "s", _values([("p3", "color", "blue", 0.9)]), pair, version="2")
    _merge(catalog, "t", _values([]), pair, version="2")
    result = catalog.rollback_runs(["r"])[0]
    assert (result.pairs_restored, result.superseded) == (0, [("p3", "color")])
    assert not [row for row in _state(catalog) if row[0] == "p3"]
    catalog.rollback_runs(["t"])
    assert ("p3", "color", "blue", "model", "s") in _state(catalog)
    catalog.rollback_runs(["s"])
    assert catalog.rollback_runs(["r"])[0].pairs_restored == 1
    assert [row for row in _state(catalog) if row[0] == "p3"] == [("p3", "color", "red", "model", "x")]


def test_a_model_version_s_rollback_undoes_that_model_s_runs_not_another_model_s_of_the_same_number(
    catalog: Catalog,
) -> None:
    """Two registered models write into one catalog, each its version 1: rolling back m v1 removes
    m's value and leaves the other model's - whether a run's model is read from its report (r2) or,
    without one, from the rows it wrote (r1, r3)."""
    from catalog_enrichment.catalog.reports import RunReport
    from catalog_enrichment.catalog.runs import rollback

    _merge(catalog, "r1", _values([("p1", "material", "cotton", 0.8)]), _pairs([("p1", "material")]))
    _merge(catalog, "r2", _values([("p3", "color", "blue", 0.9)]), _pairs([("p3", "color")]), model="other")
    _merge(catalog, "r3", _values([("p4", "color", "green", 0.9)]), _pairs([("p4", "color")]), model="other")
    catalog.upsert_report(RunReport(run_id="r2", status="succeeded", started_at=T0, model_name="other"))
    assert catalog.runs_of_model_version("m", "1") == ["r1"]
    assert catalog.runs_of_model_version("other", "1") == ["r3", "r2"]
    rollback(catalog, model_version="1", model_name="m", progress=lambda _m: None)
    assert {r[4] for r in _state(catalog) if r[3] == "model"} == {"r2", "r3"}
    assert catalog.runs_of_model_version("other", "1") == ["r3", "r2"]


def test_a_run_whose_pairs_later_runs_all_changed_again_is_not_marked_rolled_back(catalog: Catalog) -> None:
    """Nothing of r1 is left to undo (r2 changed its one pair again): r1's report stays succeeded, and
    the rollback says why; r2's rollback restores r1's value and marks r2."""
    from catalog_enrichment.catalog.reports import RunReport
    from catalog_enrichment.catalog.runs import rollback

    pairs = _pairs([("p1", "material")])
    _merge(catalog, "r1", _values([("p1", "material", "cotton", 0.8)]), pairs)
    _merge(catalog, "r2", _values([("p1", "material", "linen", 0.9)]), pairs)
    for rid in ("r1", "r2"):
        catalog.upsert_report(RunReport(run_id=rid, status="succeeded", started_at=T0))
    said: list[str] = []
    assert rollback(catalog, run_id="r1", progress=said.append)[0].pairs_restored == 0
    why = "each of the 1 pairs it changed was changed again by a later run"
    assert f"nothing rolled back of r1: {why}" in said
    assert {r.run_id: r.status for r in catalog.read_reports()} == {"r1": "succeeded", "r2": "succeeded"}
    rollback(catalog, run_id="r2", progress=said.append)
    assert {r.run_id: r.status for r in catalog.read_reports()} == {"r1": "succeeded", "r2": "rolled_back"}
    assert ("p1", "material", "cotton", "model", "r1") in _state(catalog)
    # a rollback that fails (a run the catalog has no commit of) leaves the reports as they were
    catalog.upsert_report(RunReport(run_id="r3", status="succeeded", started_at=T0))
    with pytest.raises(CatalogEnrichError, match="r3"):
        rollback(catalog, run_id="r3", progress=said.append)
    assert next(r.status for r in catalog.read_reports() if r.run_id == "r3") == "succeeded"


def test_a_run_that_changes_nothing_is_committed_and_its_rollback_says_so(catalog: Catalog) -> None:
    """A run whose only pair the merchant holds changes no row and makes no version: its id is
    committed all the same (a second attempt finds it merged), and its rollback restores nothing
    and marks its report (its position is what there is to undo)."""
    from catalog_enrichment.catalog.reports import RunReport
    from catalog_enrichment.catalog.runs import rollback

    before = _state(catalog)
    quiet = _merge(catalog, "r1", _values([("p1", "color", "blue", 0.9)]), _pairs([("p1", "color")]))
    assert (quiet.version, quiet.already_committed, quiet.merchant_pairs_skipped) == (None, False, 1)
    again = _merge(catalog, "r1", _values([("p1", "color", "blue", 0.9)]), _pairs([("p1", "color")]))
    assert again.already_committed
    catalog.upsert_report(RunReport(run_id="r1", status="succeeded", started_at=T0))
    said: list[str] = []
    assert rollback(catalog, run_id="r1", progress=said.append)[0].pairs_restored == 0
    assert (
        said[-1] == "r1 changed no value: its report is marked rolled back, so its position no longer counts"
    )
    assert [(r.run_id, r.status) for r in catalog.read_reports()] == [("r1", "rolled_back")]
    assert _state(catalog) == before


def test_a_model_version_s_rollback_marks_its_run_that_changed_nothing(catalog: Catalog) -> None:
    """v1's first run wrote a value; its second, the last run, wrote none (every product below the
    thresholds). Rolling back v1 marks both: the next run reads on from the run before them, so
    the first run's product, its value taken out, is read again (the quiet run stood as the last
    run, and it was not)."""
    from catalog_enrichment.catalog.reports import RunReport, last_run
    from catalog_enrichment.catalog.runs import rollback

    for rid, day in (("v0-run", 0), ("x", 1), ("q", 2)):
        at = T0 + dt.timedelta(days=day)
        version = "0" if rid == "v0-run" else "1"
        catalog.upsert_report(RunReport(
            run_id=rid, status="succeeded", started_at=at, watermark=at, model_name="m", model_version=version
        ))  # fmt: skip
    _merge(catalog, "v0-run", _values([("p3", "color", "red", 0.9)]), _pairs([("p3", "color")]), version="0")
    _merge(catalog, "x", _values([("p3", "color", "blue", 0.9)]), _pairs([("p3", "color")]))
    _merge(catalog, "q", _values([]), _pairs([]))
    assert catalog.runs_of_model_version("m", "1") == ["q", "x"]
    said: list[str] = []
    rollback(catalog, model_version="1", model_name="m", progress=said.append)
    assert {r.run_id: r.status for r in catalog.read_reports()} == {
        "v0-run": "succeeded", "x": "rolled_back", "q": "rolled_back"
    }  # fmt: skip
    assert ("p3", "color", "red", "model", "v0-run") in _state(catalog)
    last = last_run(catalog.read_reports(), None)
    assert last is not None and last.run_id == "v0-run"


def test_a_retry_that_changes_nothing_does_not_keep_a_killed_attempt_s_changes(catalog: Catalog) -> None:
    """An attempt of q recorded taking x's red out, then was killed before its commit; another run
    took red out meanwhile, so the retry of q changes nothing. Its rollback must not put back a
    value q never took out."""
    pair = _pairs([("p3", "color")])
    _merge(catalog, "x", _values([("p3", "color", "red", 0.9)]), pair, version="0")
    if catalog.kind == "lakehouse":  # what the killed attempt left: its change rows, no commit
        from catalog_enrichment.catalog import attributes

        before = catalog.attribute_rows({"product_id": "p3"})
        empty = attributes.attributes_schema().empty_table()
        attributes._record_changes(catalog.changes, "q", "1", before, empty)  # type: ignore[attr-defined]
    _merge(catalog, "y", _values([]), pair)
    assert _merge(catalog, "q", _values([]), pair).version is None
    assert catalog.rollback_runs(["q"])[0].pairs_restored == 0
    assert not [row for row in _state(catalog) if row[0] == "p3"]


def _quarantine(run: str, ids: list[str]) -> pa.Table:
    schema = load_contract("quarantine").arrow_schema()
    n = len(ids)
    return pa.table(
        {"product_id": ids, "run_id": [run] * n, "reasons": [["title_not_empty"]] * n,
         "raw": ['{"title": ""}'] * n, "quarantined_at": [T0] * n},
        schema=schema,
    )  # fmt: skip


def test_a_run_removes_the_values_people_rejected_for_its_version_and_its_rollback_puts_them_back(
    catalog: Catalog,
) -> None:
    _merge(catalog, "r0", _values([("p5", "color", "white", 0.9)]), _pairs([("p5", "color")]), version="0")
    # another registered model's version 1 writing into the same catalog
    _merge(catalog, "o1", _values([("p6", "color", "black", 0.9)]), _pairs([("p6", "color")]), model="other")
    values = _values(
        [("p3", "color", "blue", 0.9), ("p3", "color", "green", 0.8), ("p4", "color", "red", 0.9)]
    )
    _merge(catalog, "r1", values, _pairs([("p3", "color"), ("p4", "color")]))
    after_r1 = _state(catalog)
    retract = pa.table(
        {
            "product_id": ["p3", "p4", "p5", "p1", "p9", "p6"],
            "attribute": ["color", "color", "color", "color", "color", "color"],
            # p3/blue: an unscored pair (its green stays); p4/red: the scored pair drops it anyway;
            # p5/white: another version's value; p1/red: the merchant's; p9: not in the catalog;
            # p6/black: another registered model's version 1
            "value": ["blue", "red", "white", "red", "x", "black"],
        }
    )
    quarantine = load_contract("quarantine").arrow_schema().empty_table()
    run = RunWrite(
        "r2", "m", "1", T0 + dt.timedelta(days=2), _values([]), _pairs([("p4", "color")]), quarantine
    )
    result = catalog.write(dataclasses.replace(run, retract=retract))
    assert result.deleted == 2 and result.version is not None
    assert _state(catalog) == after_r1 - {
        ("p3", "color", "blue", "model", "r1"),
        ("p4", "color", "red", "model", "r1"),
    }
    assert catalog.write(dataclasses.replace(run, retract=retract)).already_committed  # once
    catalog.rollback_runs(["r2"])[0]
    assert _state(catalog) == after_r1
    # a run that scored nothing still removes them (the enrichment run with no changed product)
    empty = RunWrite(
        "r3", "m", "1", T0 + dt.timedelta(days=3), _values([]), _pairs([]), quarantine, retract=retract
    )
    assert catalog.write(empty).deleted == 2
    assert ("p3", "color", "green", "model", "r1") in _state(catalog)


def test_quarantine_rows_are_written_once_with_their_run(catalog: Catalog) -> None:
    values, pairs = _values([("p3", "color", "red", 0.9)]), _pairs([("p3", "color")])
    write = RunWrite("q1", "m", "1", T0, values, pairs, _quarantine("q1", ["bad-1", "bad-2"]))
    catalog.write(write)
    catalog.write(write)  # a re-run of the committed run id
    rows = catalog.quarantine_rows().to_pylist()
    assert sorted((r["product_id"], r["run_id"], r["reasons"]) for r in rows) == [
        ("bad-1", "q1", ["title_not_empty"]),
        ("bad-2", "q1", ["title_not_empty"]),
    ]


def test_the_quarantine_rows_are_those_of_the_attempt_that_wrote_the_run(catalog: Catalog) -> None:
    """A first attempt of q2 had nothing to write (no value, nothing to remove) and quarantined
    bad-1, then died; the retry read newly changed products. That first attempt committed the run
    (its id, and its quarantine rows), so on either backend the retry writes nothing and the next
    run reads its products again."""
    nothing = RunWrite("q2", "m", "1", T0, _values([]), _pairs([]), _quarantine("q2", ["bad-1"]))
    catalog.write(nothing)
    values, pairs = _values([("p3", "color", "red", 0.9)]), _pairs([("p3", "color")])
    retry = catalog.write(RunWrite("q2", "m", "1", T0, values, pairs, _quarantine("q2", ["bad-2", "bad-3"])))
    assert retry.already_committed
    assert [r["product_id"] for r in catalog.quarantine_rows().to_pylist()] == ["bad-1"]
    assert ("p3", "color", "red", "model", "q2") not in _state(catalog)


def _two_runs_at_once(catalog: Catalog, *, locked: bool) -> list[BaseException]:
    """Runs a and b write the same 200 pairs from two threads; the errors they raised."""
    pairs = _pairs([(f"q{i}", "color") for i in range(200)])
    runs = {
        "a": _values([(f"q{i}", "color", "red", 0.9) for i in range(200)]),
        "b": _values([(f"q{i}", "color", v, 0.8) for i in range(200) for v in ("blue", "green")]),
    }
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            with catalog.lock(f"run {name}", say=lambda _m: None) if locked else contextlib.nullcontext():
                _merge(catalog, name, runs[name], pairs)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    model = [r for r in _state(catalog) if r[3] == "model"]
    last = {r[4] for r in model}
    assert len(last) == 1  # every pair holds the values of one run, the last to commit
    assert len(model) == runs[last.pop()].num_rows  # all of them: none lost, none from the other
    return errors


def test_two_runs_at_once_take_turns_and_leave_one_value_set_per_pair(catalog: Catalog) -> None:
    """Each run holds the catalog's lock for its write, as a real run does: whichever goes second
    replaces the first's values, so no pair ends with values of both and no row is lost."""
    errors = _two_runs_at_once(catalog, locked=True)
    assert not errors


def test_two_writers_that_bypass_the_run_lock_never_mix_their_values(catalog: Catalog) -> None:
    """Writers outside the run lock: PostgreSQL runs the two merge transactions one after the other
    (each sees the other's commit); Delta's optimistic commit may refuse the second, in one line,
    with nothing of it written."""
    errors = _two_runs_at_once(catalog, locked=False)
    if catalog.kind == "postgres":
        assert not errors
    else:
        assert all(isinstance(e, CatalogEnrichError) and "another writer committed" in str(e) for e in errors)


def test_a_lakehouse_write_whose_rows_were_read_before_another_commit_fails_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the threads above hit now and then, made certain: run b reads the pairs' rows,
    run a commits before b's MERGE; b's MERGE, computed from rows that no longer hold, is refused
    in one line with nothing of it written (it once committed on the newer snapshot and left the
    pairs with the values of both runs)."""
    from catalog_enrichment.catalog import attributes

    catalog = open_catalog(CatalogConfig(root=str(tmp_path / "lake"), lock_wait_seconds=30))
    seed_merchant(catalog, _merchant(MERCHANT))
    pairs = _pairs([(f"q{i}", "color") for i in range(5)])
    red = _values([(f"q{i}", "color", "red", 0.9) for i in range(5)])
    blue = _values([(f"q{i}", "color", "blue", 0.8) for i in range(5)])
    read = attributes._rows_for

    def read_then_another_commits(path: str | Path, ids: pa.Array, version: int) -> pa.Table:
        rows = read(path, ids, version)
        monkeypatch.setattr(attributes, "_rows_for", read)
        _merge(catalog, "a", red, pairs)
        return rows

    monkeypatch.setattr(attributes, "_rows_for", read_then_another_commits)
    with pytest.raises(CatalogEnrichError, match="another writer committed"):
        _merge(catalog, "b", blue, pairs)
    assert {r for r in _state(catalog) if r[3] == "model"} == {
        (f"q{i}", "color", "red", "model", "a") for i in range(5)
    }
    assert find_run_commit(catalog.attributes, "b") is None  # type: ignore[attr-defined]


_WRITER = """
import datetime as dt, sys
from catalog_enrichment.config import CatalogConfig
from catalog_enrichment.catalog import open_catalog
from tests.catalog.test_attributes import T0, _merge, _pairs, _values
catalog = open_catalog(CatalogConfig.model_validate_json(sys.argv[1]))
rows = [(f"k{i}", "color", "red", 0.9) for i in range(500)]
print(_merge(catalog, "killed", _values(rows), _pairs([r[:2] for r in rows])), flush=True)
"""


@pytest.mark.slow  # processes killed: not the fast tier
@pytest.mark.parametrize("fault", ["after_stage", "during_merge"])
def test_a_write_killed_before_its_commit_changes_nothing_and_runs_again(
    catalog: Catalog, fault: str
) -> None:
    """SIGKILL after the values are staged (PostgreSQL: COPY done, merge not begun) or while the
    commit is under way (Delta: files being written, as it was or fully committed; PostgreSQL:
    inside the transaction, as it was): the next run clears the staging; the same run id then
    commits once."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import repo_root

    before = _state(catalog)
    cfg = catalog.cfg.model_dump_json()  # type: ignore[attr-defined]
    env = {**os.environ, "CATALOG_ENRICH_FAULT": fault}
    done = subprocess.run(
        [sys.executable, "-c", _WRITER, cfg],
        cwd=repo_root(),
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    after = _state(catalog)
    if catalog.kind == "lakehouse" and fault == "during_merge":
        # Delta: the kill lands while the files are written or just after the commit: the table is
        # as it was or fully committed, never half; PostgreSQL's transaction never commits
        assert after == before or (before < after and len(after - before) == 500)
    else:
        assert after == before
    assert catalog.quarantine_rows().num_rows == 0
    with catalog.lock("next run", say=lambda _m: None):
        catalog.clear_staging()
    if catalog.kind == "postgres":
        with catalog.connect() as conn:  # type: ignore[attr-defined]
            left = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename LIKE 'stage%%'",
                [catalog.schema],  # type: ignore[attr-defined]
            ).fetchone()[0]
        assert left == 0
    again = subprocess.run(
        [sys.executable, "-c", _WRITER, cfg], cwd=repo_root(), capture_output=True, text=True, timeout=90
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(_state(catalog) - before) == 500
    assert _merge(catalog, "killed", _values([]), _pairs([])).already_committed


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_a_stage_emptied_before_the_merge_writes_nothing_and_the_run_id_commits_later(
    pg_catalog_config: CatalogConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server restart or failover between the COPY and the merge empties PostgreSQL's unlogged
    stage: the write fails and records nothing (merged, the run would count as done with nothing
    written); the same run id then commits."""
    from catalog_enrichment.catalog.postgres.write import Writes

    catalog = open_catalog(pg_catalog_config)
    seed_merchant(catalog, _merchant(MERCHANT))
    before = _state(catalog)
    stage = Writes._stage

    def emptied(self, run, name, spark):  # type: ignore[no-untyped-def]
        staged = stage(self, run, name, spark)
        with self.connect() as conn, conn.transaction():
            conn.execute(self._sql("TRUNCATE {s}", s=name))
        return staged

    values, pairs = _values([("p1", "material", "cotton", 0.8)]), _pairs([("p1", "material")])
    with monkeypatch.context() as patch:
        patch.setattr(Writes, "_stage", emptied)
        with pytest.raises(CatalogEnrichError, match=r"staged rows of run r1 are gone \(0 of 2 left"):
            _merge(catalog, "r1", values, pairs)
    assert _state(catalog) == before
    assert not _merge(catalog, "r1", values, pairs).already_committed
    assert _state(catalog) == before | {("p1", "material", "cotton", "model", "r1")}


_HOLDER = """
import sys, time
from catalog_enrichment.config import CatalogConfig
from catalog_enrichment.catalog import open_catalog
catalog = open_catalog(CatalogConfig.model_validate_json(sys.argv[1]))
with catalog.lock("run holder-1", say=print):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow  # a process killed: not the fast tier
def test_the_lock_names_its_holder_and_dies_with_it(catalog: Catalog) -> None:
    """A run waiting for the catalog gives up after catalog.lock_wait_seconds naming the holder;
    the holder killed with SIGKILL (a crashed run) releases the lock at once."""
    import subprocess
    import sys

    from catalog_enrichment.catalog.lock import CatalogBusy
    from tests.conftest import repo_root

    cfg = catalog.cfg  # type: ignore[attr-defined]
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, cfg.model_dump_json()],
        cwd=repo_root(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        impatient = open_catalog(cfg.model_copy(update={"lock_wait_seconds": 0.5}))
        with pytest.raises(CatalogBusy, match="run holder-1"), impatient.lock("second", say=lambda _m: None):
            pass
        holder.kill()
        holder.wait(10)
        with impatient.lock("second", say=lambda _m: None):
            pass
    finally:
        holder.kill()
        holder.wait(10)


def _age_out(catalog: Catalog) -> None:
    """What log retention (30 days) and ``vacuum`` (7 days) do to the lakehouse's tables, done now:
    the log before a fresh checkpoint and every data file out of the snapshot are gone, so no
    history and no time travel are left. PostgreSQL keeps neither, so there is nothing to age."""
    from deltalake import DeltaTable

    if catalog.kind != "lakehouse":
        return
    for path in (catalog.attributes, catalog.changes):  # type: ignore[attr-defined]
        DeltaTable(str(path)).alter.set_table_properties({"delta.logRetentionDuration": "interval 0 seconds"})
        table = DeltaTable(str(path))
        table.create_checkpoint()
        table.cleanup_metadata()
        table.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    history = DeltaTable(str(catalog.attributes)).history()  # type: ignore[attr-defined]
    assert not any(entry.get(META_RUN_ID) for entry in history)  # no run's commit is left in it


def test_a_run_id_stays_merged_and_a_run_rolls_back_exactly_after_log_cleanup_and_vacuum(
    catalog: Catalog,
) -> None:
    pairs = _pairs([("p1", "material"), ("p2", "color")])
    _merge(catalog, "r1", _values([("p1", "material", "cotton", 0.8), ("p2", "color", "red", 0.9)]), pairs)
    after_r1 = _state(catalog)
    r2 = _merge(catalog, "r2", _values([("p1", "material", "linen", 0.9)]), pairs, version="2")
    after_r2 = _state(catalog)
    _age_out(catalog)
    again = _merge(catalog, "r1", _values([("p2", "color", "blue", 0.9)]), _pairs([("p2", "color")]))
    assert again.already_committed and _state(catalog) == after_r2
    assert catalog.runs_of_model_version("m", "2") == ["r2"] and catalog.runs_of_model_version("m", "1") == [
        "r1"
    ]
    (result,) = catalog.rollback_runs(["r2"])
    assert (result.pairs_restored, result.superseded) == (2, []) and result.version != r2.version
    assert _state(catalog) == after_r1
    assert catalog.runs_of_model_version("m", "2") == []
    _age_out(catalog)
    with pytest.raises(CatalogEnrichError, match="already rolled back"):
        catalog.rollback_runs(["r2"])


_ROLLBACK = """
import sys
from catalog_enrichment.config import CatalogConfig
from catalog_enrichment.catalog import open_catalog
from catalog_enrichment.catalog.runs import rollback
catalog = open_catalog(CatalogConfig.model_validate_json(sys.argv[1]))
print(rollback(catalog, model_version="1", model_name="m", progress=print), flush=True)
"""


@pytest.mark.slow  # a process killed: not the fast tier
def test_a_model_version_rollback_is_one_commit_that_a_kill_leaves_before_or_after(catalog: Catalog) -> None:
    """Two runs of version 1 over a run of version 0: the rollback of version 1, killed while it
    commits (Delta: its files being written; PostgreSQL: after the first run, in the transaction),
    leaves the catalog as it was or fully rolled back, never one run rolled back and one not."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import repo_root

    _merge(catalog, "r0", _values([("p1", "material", "cotton", 0.8), ("p2", "color", "red", 0.9)]),
           _pairs([("p1", "material"), ("p2", "color")]), version="0")  # fmt: skip
    after_r0 = _state(catalog)
    _merge(catalog, "r1", _values([("p1", "material", "linen", 0.9)]), _pairs([("p1", "material")]))
    _merge(catalog, "r2", _values([("p2", "color", "blue", 0.9), ("p3", "color", "green", 0.9)]),
           _pairs([("p2", "color"), ("p3", "color")]))  # fmt: skip
    before = _state(catalog)
    cfg = catalog.cfg.model_dump_json()  # type: ignore[attr-defined]
    env = {**os.environ, "CATALOG_ENRICH_FAULT": "during_rollback"}
    killed = subprocess.run(
        [sys.executable, "-c", _ROLLBACK, cfg], cwd=repo_root(), env=env, capture_output=True, text=True,
        timeout=90,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _state(catalog) in (before, after_r0)
    if _state(catalog) == before:
        done = subprocess.run(
            [sys.executable, "-c", _ROLLBACK, cfg],
            cwd=repo_root(),
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    assert _state(catalog) == after_r0
    assert catalog.runs_of_model_version("m", "1") == [] and catalog.runs_of_model_version("m", "0") == ["r0"]


@pytest.mark.slow  # a process killed: not the fast tier
def test_a_rollback_killed_after_its_commit_leaves_its_reports_marked(catalog: Catalog) -> None:
    """Killed once its commit is in, before it printed a word: the reports already say rolled back,
    so the next run reads those products again (no later rollback could mark them: the catalog
    finds their runs rolled back)."""
    import os
    import signal
    import subprocess
    import sys

    from catalog_enrichment.catalog.reports import RunReport
    from tests.conftest import repo_root

    pair = _pairs([("p1", "material")])
    _merge(catalog, "r0", _values([("p1", "material", "cotton", 0.8)]), pair, version="0")
    after_r0 = _state(catalog)
    _merge(catalog, "r1", _values([("p1", "material", "linen", 0.9)]), pair)
    for rid in ("r0", "r1"):
        catalog.upsert_report(RunReport(run_id=rid, status="succeeded", started_at=T0))
    cfg = catalog.cfg.model_dump_json()  # type: ignore[attr-defined]
    killed = subprocess.run(
        [sys.executable, "-c", _ROLLBACK, cfg], cwd=repo_root(), capture_output=True, text=True, timeout=90,
        env={**os.environ, "CATALOG_ENRICH_FAULT": "after_rollback"},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _state(catalog) == after_r0
    assert {r.run_id: r.status for r in catalog.read_reports()} == {"r0": "succeeded", "r1": "rolled_back"}


def test_attribute_rows_selected_where_they_are_read(catalog: Catalog) -> None:
    """What a review sample reads: one run's (or version's) model values, not the whole table."""
    pairs = _pairs([("p3", "color"), ("p4", "color")])
    _merge(catalog, "r1", _values([("p3", "color", "blue", 0.9)]), pairs, version="1")
    _merge(catalog, "r2", _values([("p4", "color", "red", 0.9)]), pairs, version="2")
    assert {r[:4] for r in _state(catalog)} >= {("p1", "color", "red", "merchant")}
    only = catalog.attribute_rows({"source": "model", "run_id": "r2"})
    assert only.schema == catalog.attribute_rows().schema
    assert [(r["product_id"], r["value"]) for r in only.to_pylist()] == [("p4", "red")]
    assert catalog.attribute_rows({"source": "model", "model_version": "3"}).num_rows == 0


def _lakehouse(tmp_path: Path) -> Catalog:
    """An empty lakehouse catalog seeded with the merchant's values ``MERCHANT``."""
    catalog = open_catalog(CatalogConfig(root=str(tmp_path / "lake"), lock_wait_seconds=30))
    seed_merchant(catalog, _merchant(MERCHANT))
    return catalog


def test_a_merchant_row_of_a_colour_family_keeps_the_model_s_colour_out(tmp_path: Path) -> None:
    """p3's merchant gave its colour family in the catalog only (not in the products table the run
    decides from): the run's colour for p3 is not written beside it, and the model's earlier one
    goes; p5, with no merchant value, gets the run's values."""
    from catalog_enrichment.catalog.attributes import merge_run
    from catalog_enrichment.contracts import load_taxonomy

    linked = load_taxonomy(Path(__file__).parents[2] / "schemas" / "taxonomy.yaml").held_together()
    catalog = _lakehouse(tmp_path)
    _merge(catalog, "r1", _values([("p3", "color", "red", 0.9)]), _pairs([("p3", "color")]))
    write_table(catalog.attributes, _merchant([("p3", "color_family", "cool")]), mode="append")  # type: ignore[attr-defined]
    pairs = _pairs([(p, a) for p in ("p3", "p5") for a in ("color", "color_family")])
    values = _values(
        [(p, a, v, 0.9) for p in ("p3", "p5") for a, v in (("color", "red"), ("color_family", "warm"))]
    )
    quarantine = load_contract("quarantine").arrow_schema().empty_table()
    run = RunWrite("r2", "m", "1", T0 + dt.timedelta(days=2), values, pairs, quarantine)
    result = merge_run(catalog.attributes, run, changes=catalog.changes, linked=linked)  # type: ignore[attr-defined]
    assert result.merchant_pairs_skipped == 2
    assert {r[:4] for r in _state(catalog) if r[0] in ("p3", "p5")} == {
        ("p3", "color_family", "cool", "merchant"),
        ("p5", "color", "red", "model"),
        ("p5", "color_family", "warm", "model"),
    }


def test_a_merchant_row_named_in_another_case_keeps_the_model_s_value_out(tmp_path: Path) -> None:
    """A merchant row someone wrote as " Color_Family" holds colour_family (and, linked, colour) as
    the taxonomy's own spelling would."""
    from catalog_enrichment.catalog.attributes import merge_run
    from catalog_enrichment.contracts import load_taxonomy

    linked = load_taxonomy(Path(__file__).parents[2] / "schemas" / "taxonomy.yaml").held_together()
    catalog = _lakehouse(tmp_path)
    write_table(catalog.attributes, _merchant([("p3", " Color_Family", "cool")]), mode="append")  # type: ignore[attr-defined]
    pairs = _pairs([("p3", a) for a in ("color", "color_family")])
    values = _values([("p3", "color", "red", 0.9), ("p3", "color_family", "warm", 0.9)])
    quarantine = load_contract("quarantine").arrow_schema().empty_table()
    run = RunWrite("r2", "m", "1", T0 + dt.timedelta(days=2), values, pairs, quarantine)
    result = merge_run(catalog.attributes, run, changes=catalog.changes, linked=linked)  # type: ignore[attr-defined]
    assert result.merchant_pairs_skipped == 2 and result.written == {}
    assert {r[:4] for r in _state(catalog) if r[0] == "p3"} == {("p3", " Color_Family", "cool", "merchant")}


def test_merchant_rows_name_the_taxonomy_s_attribute_however_the_merchant_wrote_it() -> None:
    from catalog_enrichment.catalog.attributes import merchant_rows

    # two spellings of colour holding one value: one row (a second would be a duplicate key)
    merchant = [("Color ", ["red"]), ("ＭＡＴＥＲＩＡＬ", ["wool"]), ("fit", ["slim"]), ("color", ["red"])]
    table = pa.Table.from_pylist(
        [{"product_id": "p1", "merchant_attributes": merchant}],
        schema=pa.schema(
            [
                ("product_id", pa.string()),
                ("merchant_attributes", pa.map_(pa.string(), pa.list_(pa.string()))),
            ]
        ),
    )
    rows = merchant_rows(table, T0, ["color", "material"]).to_pylist()
    assert [(r["attribute"], r["value"]) for r in rows] == [
        ("color", "red"),
        ("material", "wool"),
        ("fit", "slim"),
    ]


def test_a_rollback_puts_no_model_value_back_beside_a_merchant_key_written_another_way(
    tmp_path: Path,
) -> None:
    """r1 wrote p4's colour; the products table's latest p4 then gives "Color " (the merchant's own
    spelling) and r2 removed the model's colour: rolling r2 back leaves it out."""
    catalog = _lakehouse(tmp_path)
    _merge(catalog, "r1", _values([("p4", "color", "red", 0.9)]), _pairs([("p4", "color")]))
    table = pa.Table.from_pylist(
        [{"product_id": "p4", "title": "t", "merchant_attributes": [("Color ", ["black"])], "updated_at": T0,
          "ingest_date": T0.date()}],
        schema=load_contract("products").arrow_schema(),
    )  # fmt: skip
    write_table(catalog.products, table)  # type: ignore[attr-defined]
    _merge(catalog, "r2", _values([]), _pairs([("p4", "color")]))
    result = catalog.rollback_runs(["r2"])[0]
    assert result.pairs_restored == 1 and result.rows_restored == 0
    assert not [r for r in _state(catalog) if r[0] == "p4"]
