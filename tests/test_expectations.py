"""Great Expectations on the nightly path (validation/checkpoint.py): every run validates its batch
with a GX checkpoint before anything is scored, stores the result and Data Docs with the run, stops
on a failed critical expectation and reports a failed warning-level one. Real Spark, real GX (a
file-backed project under the catalog root), the tiny scoring bundle."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from catalog_enrichment.catalog.lakehouse import read_table, write_table
from catalog_enrichment.catalog.reports import SEEN, read_reports, report_for
from catalog_enrichment.enrich import RunScope, run_enrichment
from catalog_enrichment.errors import ContractError
from catalog_enrichment.validation.checkpoint import ExpectationsFailed
from catalog_enrichment.versions import ModelVersion
from tests.conftest import tiny_config, tiny_registry

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(600)]


def _run(spark, root: Path, taxonomy, products: Path, bundle: Path, run_id: str, **validation: Any):  # type: ignore[no-untyped-def]
    cfg = tiny_config(
        catalog={"root": str(root)},
        inference={"batch_size": 64, "device": "cpu"},
        validation={"great_expectations": True, **validation},
    )
    model = ModelVersion("tiny", "1", bundle_dir=bundle)
    return cfg, lambda: run_enrichment(
        spark,
        cfg,
        taxonomy,
        model=model,
        scope=RunScope(products=products, run_id=run_id, full=True),
        progress=lambda _m: None,
    )


def _changed(incoming, tmp: Path, name: str, change) -> Path:  # type: ignore[no-untyped-def]
    table = change(read_table(incoming.products))
    write_table(tmp / name, table, partition_by=["ingest_date"])
    return tmp / name


def _without_image_share(table: pa.Table, share: float) -> pa.Table:
    n = table.num_rows
    gone = np.random.default_rng(0).random(n) < share
    for column in ("image", "image_uri"):
        values = table[column].to_pylist()
        table = table.set_column(
            table.schema.get_field_index(column),
            column,
            pa.array(
                [None if g else v for g, v in zip(gone, values, strict=True)], table.schema.field(column).type
            ),
        )
    return table


def _stopped(cfg, run_id: str) -> Any:  # type: ignore[no-untyped-def]
    report = report_for(read_reports(cfg.catalog.table("run_reports")), run_id)
    assert report.status == "aborted" and report.rows_scored == 0 and "score" not in report.stage_seconds
    assert not Path(cfg.catalog.table("attributes")).exists()
    return json.loads(report.validation_summary)["great_expectations"]


def test_a_batch_without_title_or_with_40_percent_missing_images_stops_before_scoring(
    spark, tmp_path, taxonomy, incoming, scoring_bundle
) -> None:  # type: ignore[no-untyped-def]
    no_title = _changed(incoming, tmp_path, "no-title", lambda t: t.drop_columns(["title"]))
    cfg, run = _run(spark, tmp_path / "a", taxonomy, no_title, scoring_bundle, "no-title")
    with pytest.raises(
        ExpectationsFailed, match=r"expect_table_columns_to_match_set \(critical\).*missing \['title'\]"
    ):
        run()
    stored = _stopped(cfg, "no-title")
    assert stored["critical"] and Path(stored["docs"]).is_file()
    # the same table with the checkpoint off: the read's contract check, as before
    cfg, run = _run(
        spark, tmp_path / "b", taxonomy, no_title, scoring_bundle, "off", great_expectations=False
    )
    with pytest.raises(ContractError, match=r"lacks contract column\(s\) \['title'\]"):
        run()

    dark = _changed(incoming, tmp_path, "no-images", lambda t: _without_image_share(t, 0.4))
    cfg, run = _run(spark, tmp_path / "c", taxonomy, dark, scoring_bundle, "no-images")
    with pytest.raises(
        ExpectationsFailed, match=r"unexpected_rows_expectation \(critical\).*without an image"
    ):
        run()
    stored = _stopped(cfg, "no-images")
    table = read_table(dark, columns=["image", "image_uri"])
    dark_rows = sum(1 for r in table.to_pylist() if r["image"] is None and r["image_uri"] is None)
    assert dark_rows > 0.4 * table.num_rows
    assert len(stored["critical"]) == 1 and stored["critical"][0].endswith(f"observed {dark_rows:,} rows")


def test_a_warning_level_failure_is_reported_and_the_values_are_written(
    spark, tmp_path, taxonomy, incoming, scoring_bundle
) -> None:  # type: ignore[no-untyped-def]
    def new_categories(t: pa.Table) -> pa.Table:  # half the products in categories training never saw
        names = [c if i % 2 else f"New category {i % 7}" for i, c in enumerate(t["category"].to_pylist())]
        return t.set_column(t.schema.get_field_index("category"), "category", pa.array(names, pa.string()))

    products = _changed(incoming, tmp_path, "new-categories", new_categories)
    # run health's input check sees the new category mix too (its default keeps every value out)
    health = {"inputs": "warn"}
    _, run = _run(spark, tmp_path / "lake", taxonomy, products, scoring_bundle, "warned", health=health)
    outcome = run()
    assert outcome.report.status == "succeeded" and sum(outcome.report.written_per_attribute.values()) > 0
    checked = json.loads(outcome.report.validation_summary)["great_expectations"]
    assert checked["critical"] == []
    assert [w.split(" (")[0] for w in checked["warnings"]] == ["expect_column_values_to_be_in_set category"]


def test_a_passing_batch_is_stored_with_data_docs_and_the_suite_is_what_expectations_exports(
    spark, tmp_path, taxonomy, incoming, scoring_bundle, capsys
) -> None:  # type: ignore[no-untyped-def]
    from catalog_enrichment.cli import main

    _, _, _, flags = tiny_registry(tmp_path, scoring_bundle, incoming)
    lake = tmp_path / "lake"
    assert main(["enrich", *flags, "--catalog", str(lake), "--run-id", "gx-1"]) == 0
    out = capsys.readouterr().out
    assert "great expectations: " in out and "0 failed" in out
    report = report_for(read_reports(lake / "run_reports"), "gx-1")
    checked = json.loads(report.validation_summary)["great_expectations"]
    assert checked["critical"] == checked["warnings"] == [] and checked["evaluated"] >= 20
    assert checked["result_id"].startswith("products/gx-1/")
    results = list((lake / "gx" / "gx" / "uncommitted" / "validations" / "products" / "gx-1").rglob("*.json"))
    assert len(results) == 1 and json.loads(results[0].read_text())["success"] is True
    page = Path(checked["docs"])
    assert page.is_file() and page.is_relative_to(lake / "gx") and "gx-1" in page.read_text()
    # the checkpoint caches nothing: a cached batch (photos included) stayed for the session's life
    assert spark._jsparkSession.sharedState().cacheManager().isEmpty()
    assert main(["report", "--catalog", str(lake)]) == 0
    assert f"expectations {checked['evaluated']} expectations, 0 failed" in capsys.readouterr().out

    exported = tmp_path / "products.json"
    # the champion's bundle is the one the run downloaded into its catalog, not a new ./lakehouse
    export = ["expectations", "--out", str(exported), *flags[2:], "--set", f"catalog.root={lake}"]
    assert main(export) == 0
    used = json.loads((lake / "gx" / "gx" / "expectations" / "products.json").read_text())
    assert _comparable(json.loads(exported.read_text())) == _comparable(used)


def _comparable(suite: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """A suite's expectations without GX's ids and the updated_at bound (the run's start; the
    export's now: in the kwargs and the rule's description)."""
    out = []
    for e in suite["expectations"]:
        kwargs = dict(e["kwargs"])
        if e["type"] == "expect_column_values_to_be_between" and "max_value" in kwargs:
            kwargs.pop("max_value")
        meta = re.sub(r" \(\d{4}-\d\d-\d\d [\d:]+ UTC\)", "", json.dumps(e["meta"], sort_keys=True))
        out.append((e["type"], json.dumps(kwargs, sort_keys=True), e.get("severity"), meta))
    return sorted(out)


@pytest.mark.postgres
def test_the_postgres_catalog_runs_the_same_checkpoint(
    spark, pg_catalog_config, taxonomy, incoming, scoring_bundle
) -> None:  # type: ignore[no-untyped-def]
    from catalog_enrichment.catalog.postgres import PostgresCatalog

    catalog = PostgresCatalog(pg_catalog_config)
    catalog.load_products(read_table(incoming.products))
    cfg = tiny_config(
        catalog=pg_catalog_config.model_dump(),
        inference={"batch_size": 64, "device": "cpu"},
        validation={"great_expectations": True},
    )
    model = ModelVersion("tiny", "1", bundle_dir=scoring_bundle)

    def run(run_id: str) -> Any:
        return run_enrichment(
            spark,
            cfg,
            taxonomy,
            model=model,
            scope=RunScope(run_id=run_id, full=True),
            catalog=catalog,
            progress=lambda _m: None,
        )

    checked = json.loads(run("pg-1").report.validation_summary)["great_expectations"]
    assert checked["critical"] == [] and Path(checked["docs"]).is_relative_to(Path(cfg.catalog.root) / "gx")
    with catalog.connect() as conn:
        conn.execute(f'ALTER TABLE "{catalog.schema}".products DROP COLUMN title')
    with pytest.raises(ExpectationsFailed, match=r"missing \['title'\]"):
        run("pg-2")
    report = report_for(catalog.read_reports(), "pg-2")
    assert report.status == "aborted" and report.rows_scored == 0


@pytest.mark.timeout(30)
def test_an_expectation_that_raised_is_said_with_its_error() -> None:
    """The no-image count's SQL on a feed without ``image_uri`` raises: its line names the error (the
    count it has not was formatted as rows, and that failed the run instead of stopping it)."""
    from types import SimpleNamespace

    from catalog_enrichment.validation.checkpoint import _failed

    config = SimpleNamespace(
        type="unexpected_rows_expectation",
        kwargs={},
        meta={"check": "no image"},
        severity=SimpleNamespace(value="critical"),
    )
    raised = SimpleNamespace(
        expectation_config=config,
        result={"observed_value": None},
        exception_info={"raised_exception": True, "exception_message": "cannot resolve image_uri"},
    )
    assert (
        _failed(raised)
        == "unexpected_rows_expectation (critical): no image; observed error cannot resolve image_uri"
    )
    counted = SimpleNamespace(expectation_config=config, result={"observed_value": 1234}, exception_info={})
    assert _failed(counted).endswith("observed 1,234 rows")


def test_a_nightly_over_a_table_that_lost_updated_at_stops_with_the_checkpoint_s_line(
    spark, tmp_path, taxonomy, incoming, scoring_bundle
) -> None:  # type: ignore[no-untyped-def]
    """The run after a good one reads on from its watermark and leaves out the rows it read near
    it: an exporter that renamed ``updated_at`` since gets the checkpoint's line naming the column,
    not Spark's unresolved column."""
    table = read_table(incoming.products).slice(0, 40)
    recent = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=5)  # in the look-back
    column = table.schema.get_field_index("updated_at")
    table = table.set_column(column, "updated_at", pa.array([recent] * 40, pa.timestamp("us", "UTC")))
    write_table(tmp_path / "products", table, fmt="parquet")
    cfg = tiny_config(
        catalog={"root": str(tmp_path / "lake")},
        inference={"batch_size": 64, "device": "cpu"},
        validation={"great_expectations": True, "health": {"inputs": "warn", "coverage": "warn"}},
    )

    def run(run_id: str) -> Any:
        return run_enrichment(
            spark, cfg, taxonomy, model=ModelVersion("tiny", "1", bundle_dir=scoring_bundle),
            scope=RunScope(products=tmp_path / "products", run_id=run_id), progress=lambda _m: None,
        )  # fmt: skip

    first = run("first")
    assert first.report.status == "succeeded" and first.report.summary()[SEEN]
    renamed = table.rename_columns(["updatedAt" if c == "updated_at" else c for c in table.column_names])
    shutil.rmtree(tmp_path / "products")
    write_table(tmp_path / "products", renamed, fmt="parquet")
    with pytest.raises(ExpectationsFailed, match=r"missing \['updated_at'\]"):
        run("second")
