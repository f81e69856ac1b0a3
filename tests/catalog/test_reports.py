"""The run report: one dataclass with the contract's fields, stored and read back whole."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from catalog_enrichment.catalog.reports import (
    BLOCKED,
    FULL,
    PLACEHOLDERS,
    PRODUCTS,
    RESUMED,
    RunReport,
    check_run_id,
    format_report,
    last_run,
    last_watermark,
    placeholders_found,
    read_reports,
    report_for,
    set_report_status,
    upsert_report,
)
from catalog_enrichment.contracts import load_contract
from catalog_enrichment.enrich.run import _resume_from
from catalog_enrichment.errors import CatalogEnrichError

pytestmark = pytest.mark.timeout(60)

T = dt.datetime(2026, 11, 2, 2, 15, tzinfo=dt.UTC)


def test_the_report_has_exactly_the_contract_fields_in_order() -> None:
    assert [f.name for f in dataclasses.fields(RunReport)] == load_contract("run_report").names


def test_a_report_round_trips_and_an_upsert_replaces_the_row(tmp_path: Path) -> None:
    report = RunReport(run_id="r1", model_name="m", model_version="3", partition="ingest_date=2026-11-01",
                       started_at=T, rows_read=10, rows_valid=9, rows_quarantined=1, rows_scored=9,
                       written_per_attribute={"color": 4}, coverage_per_attribute={"color": 0.44},
                       stage_seconds={"read": 0.5}, watermark=T)  # fmt: skip
    report.add_to_summary(row_rules={"title_not_empty": 1})
    report.add_to_summary(error="boom")  # entries accumulate
    upsert_report(tmp_path, report)
    back = report_for(read_reports(tmp_path), "r1")
    assert back == report and back.summary() == {"row_rules": {"title_not_empty": 1}, "error": "boom"}
    assert back.status == "failed"  # what a run that never said otherwise records
    report.status, report.finished_at = "succeeded", T + dt.timedelta(minutes=3)
    upsert_report(tmp_path, report)
    assert read_reports(tmp_path) == [report]  # one row per run id
    assert last_watermark(read_reports(tmp_path), "ingest_date=2026-11-01") == T
    assert last_watermark(read_reports(tmp_path), None) is None  # another scope has no watermark yet
    set_report_status(tmp_path, "r1", "rolled_back")
    assert (
        report_for(read_reports(tmp_path)).status == "rolled_back"
        and last_watermark(read_reports(tmp_path), "ingest_date=2026-11-01") is None
    )
    text = format_report(report_for(read_reports(tmp_path)))
    assert "run r1: rolled_back" in text and "color 4 (44% of scored)" in text and "error        boom" in text
    assert json.loads(json.dumps(report.to_row(), default=str))["rows_read"] == 10


def test_reports_an_outside_delete_removed_are_gone_and_the_rest_are_read(tmp_path: Path) -> None:
    """An outside writer deleted one run's report with a deletion vector (a cleanup under Delta's
    current defaults): the next run reads the others, not that one, and records its own."""
    import pyarrow as pa

    from catalog_enrichment.catalog.lakehouse import write_table
    from catalog_enrichment.catalog.reports import MAPS
    from tests.delta_protocol import delete_with_deletion_vector

    old, kept = (RunReport(run_id=r, model_name="m", model_version="1", started_at=T + dt.timedelta(hours=h))
                 for r, h in (("r1", 0), ("r2", 1)))  # fmt: skip
    rows = [{**r.to_row(), **{k: list(r.to_row()[k].items()) for k in MAPS}} for r in (old, kept)]
    write_table(tmp_path, pa.Table.from_pylist(rows, schema=load_contract("run_report").arrow_schema()))
    delete_with_deletion_vector(tmp_path, [0])
    assert read_reports(tmp_path) == [kept]
    later = RunReport(run_id="r3", model_name="m", model_version="1", started_at=T + dt.timedelta(hours=2))
    upsert_report(tmp_path, later)
    assert read_reports(tmp_path) == [kept, later]


def test_the_runs_after_a_blocked_night_read_its_products_again_up_to_the_retries() -> None:
    def run(run_id: str, hours: int, blocked: dict[str, str] | None = None) -> RunReport:
        r = RunReport(
            run_id=run_id, status="succeeded", started_at=T, watermark=T + dt.timedelta(hours=hours)
        )
        if blocked is not None:
            r.add_to_summary(**{BLOCKED: blocked})
        return r

    clean, cdn = run("clean", 1, {}), run("cdn", 2, {"color": "input image tone failed"})
    assert last_run([clean, cdn], None) is cdn  # without retries: read on from the broken night
    assert last_run([clean, cdn], None, blocked_retries=3) is clean  # its products read again
    assert last_run([cdn], None, blocked_retries=3) is None  # the first run blocked: read everything
    # a --full run blocked (a new attribute's first scoring, say): its products are every product,
    # so the next run reads everything again, not only what changed since the run before it
    whole = run("full", 2, {"color": "input image tone failed"})
    whole.add_to_summary(**{FULL: True})
    assert last_run([clean, whole], None) is whole
    assert last_run([clean, whole], None, blocked_retries=3) is None
    assert last_run([clean, whole, run("next", 3, {"color": "x"})], None, blocked_retries=1) is whole
    nights = [clean, *(run(f"b{i}", 2 + i, {"color": "x"}) for i in range(4))]
    # four blocked nights in a row: the next run reads on from the fourth last, not from the start
    assert last_run(nights, None, blocked_retries=3).run_id == "b0"  # type: ignore[union-attr]
    # the job says whose products it stops reading again, and only then
    said: list[str] = []
    health = SimpleNamespace(retries=3)
    job = SimpleNamespace(cfg=SimpleNamespace(validation=SimpleNamespace(health=health)), say=said.append)
    assert _resume_from(job, nights, None, "/lake/products").run_id == "b0"  # type: ignore[arg-type, union-attr]
    assert "run b0 kept values out and 3 blocked runs followed it" in said[-1]
    said.clear()
    assert _resume_from(job, nights[:4], None, "/lake/products") is clean and len(said) == 1  # type: ignore[arg-type]
    assert said[0].startswith("  run b2 kept color out: reading on from run clean")
    assert last_run([clean, run("old", 3, ["color"])], None, blocked_retries=1) is clean  # the list format
    blocked = run("cdn", 2, {"color": "input image tone failed"})
    blocked.add_to_summary(health=[], health_failures=["image tone PSI 3.0"])
    assert "blocked      color: input image tone failed" in format_report(blocked)
    assert "photos" not in format_report(blocked)
    blocked.add_to_summary(
        image_sources_out={"https://cdn.example.com": 1200},
        placeholder_images={"sha256:ab": 40},
        retry_images=[["p1", 0], ["p2", 1]],
    )
    want = "  photos       https://cdn.example.com out (1,200 products); 1 placeholder image(s); 2 products "
    want += "read again"
    assert want in format_report(blocked)
    blocked.add_to_summary(retry_images_left_out=250_000)
    assert "read again by the next run; 250,000 past that list's limit, waiting until they change" in (
        format_report(blocked)
    )


def test_a_quiet_night_after_a_run_rolled_back_since_does_not_keep_its_position() -> None:
    """r1 scored broken inputs; r2 and r3 read nothing new, so each took the watermark it read on
    from; r1 is rolled back: neither quiet night counts, and the next run reads on from r0, so r1's
    products are read again. r4, which read past r1's watermark, keeps its own position."""

    def run(run_id: str, hours: int, resumed: str | None = None, status: str = "succeeded") -> RunReport:
        r = RunReport(run_id=run_id, status=status, started_at=T + dt.timedelta(days=hours),
                      watermark=T + dt.timedelta(hours=hours))  # fmt: skip
        if resumed is not None:
            r.add_to_summary(**{RESUMED: resumed})
        return r

    r0, r1 = run("r0", 0), run("r1", 1)
    quiet = [run("r2", 1, "r1"), run("r3", 1, "r2")]
    assert last_run([r0, r1, *quiet], None).run_id == "r3"  # type: ignore[union-attr]
    r1.status = "rolled_back"
    assert last_run([r0, r1, *quiet], None) is r0
    assert last_run([r0, r1, *quiet, run("r4", 2, None)], None).run_id == "r4"  # type: ignore[union-attr]
    assert last_run([r0, run("r5", 0, "r0")], None).run_id == "r5"  # type: ignore[union-attr]
    # a quiet run that read on from a backfill's partition runs took its position from all of them
    days = [run("d1", 1), run("d2", 2)]
    for r, day in zip(days, (1, 2), strict=True):
        r.partition = f"ingest_date=2026-11-0{day}"
    q1, q2 = run("q1", 2, None), run("q2", 2, "q1")
    q1.add_to_summary(**{RESUMED: ["d1", "d2"]})
    assert last_run([*days, q1, q2], None) is q2
    days[0].status = "rolled_back"  # not the one whose watermark it took
    assert last_run([*days, q1, q2], None) is None


def test_each_products_table_of_a_catalog_keeps_its_own_watermark() -> None:
    """A run that read another table into the same catalog (``--products``) neither moves the
    catalog's table's watermark nor takes it; a report from before runs recorded their table
    counts for any."""

    def run(run_id: str, hour: int, products: str | None) -> RunReport:
        r = RunReport(run_id=run_id, status="succeeded", started_at=T, watermark=T.replace(hour=hour))
        if products is not None:
            r.add_to_summary(**{PRODUCTS: products})
        return r

    before, own, feed = (
        run("before", 1, None),
        run("own", 2, "/lake/products"),
        run("feed", 14, "/exports/feed"),
    )
    reports = [before, own, feed]
    assert last_run(reports, None, products="/lake/products") is own
    assert last_run(reports, None, products="/exports/feed") is feed
    assert last_run([before, feed], None, products="/lake/products") is before
    assert last_run(reports, None) is feed  # no table named: any


def test_a_placeholder_once_found_is_known_while_the_limit_stays_under_its_count() -> None:
    def run(run_id: str, status: str, found: dict[str, int] | None) -> RunReport:
        r = RunReport(run_id=run_id, status=status, started_at=T)
        if found is not None:
            r.add_to_summary(**{PLACEHOLDERS: found})
        return r

    # an outage's tile on 30 products, a stock photo on 25, the tile again on 5 a later night; a
    # failed or rolled-back run's evidence counts as well (the bytes stay what they were)
    reports = [
        run("outage", "failed", {"tile": 30, "stock": 25}),
        run("later", "rolled_back", {"tile": 5}),
        run("clean", "succeeded", None),
    ]
    assert placeholders_found(reports, 20) == {"tile", "stock"}
    assert placeholders_found(reports, 25) == {"tile"}  # the stock photo's products let through
    assert placeholders_found(reports, 30) == set() == placeholders_found(reports, 0)  # 0: rule off
    assert placeholders_found([], 20) == set()


def test_no_reports_yet_is_a_clear_error(tmp_path: Path) -> None:
    assert read_reports(tmp_path / "none") == []
    with pytest.raises(CatalogEnrichError, match="no enrichment runs recorded"):
        report_for(read_reports(tmp_path / "none"))
    upsert_report(tmp_path / "t", RunReport(run_id="a", started_at=T))
    with pytest.raises(CatalogEnrichError, match="no run 'b'"):
        report_for(read_reports(tmp_path / "t"), "b")


@pytest.mark.parametrize(
    "bad", ["", "x'; DROP TABLE t; --", "a b", "../../etc", "-starts-with-dash", "r" * 201, "ok\n", "é"]
)
def test_a_run_id_that_could_name_a_path_or_break_a_predicate_is_refused(bad: str) -> None:
    with pytest.raises(CatalogEnrichError, match="is not valid"):
        check_run_id(bad)


def test_report_updates_carry_values_as_data_not_sql(tmp_path: Path) -> None:
    for rid in ("r1", "r2"):
        upsert_report(tmp_path, RunReport(run_id=rid, model_name="m", model_version="1", started_at=T))
    assert check_run_id("backfill-2026-11-01-tiny-v3:x=1+2") == "backfill-2026-11-01-tiny-v3:x=1+2"
    set_report_status(tmp_path, "r1", "it's' OR '1'='1")  # stored literally, touches one row
    assert {r.run_id: r.status for r in read_reports(tmp_path)} == {"r1": "it's' OR '1'='1", "r2": "failed"}


def test_a_run_over_the_whole_table_reads_on_from_the_last_runs_of_the_partitions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no run over the whole table, a backfill's partition runs are its position: each
    partition caught up to its last run's watermark, their lists joined, the highest watermark the
    next position. A partition
    whose last runs kept values out, or whose run could not list its timeless rows, or whose lists
    would take the joined ones past what a run lists, or a run of another products table, is not
    caught up (its rows are read whole)."""
    from catalog_enrichment.catalog.reports import CAUGHT_UP, FUTURE, RETRY, SEEN, TIMELESS
    from catalog_enrichment.enrich.stages import ALL, PARTITION_RUNS, from_partitions

    def run(run_id: str, day: int, hour: int, table: str = "/lake/p", **summary: object) -> RunReport:
        r = RunReport(run_id=run_id, status="succeeded", partition=f"ingest_date=2026-11-0{day}",
                      started_at=T + dt.timedelta(hours=hour), watermark=T.replace(hour=hour))  # fmt: skip
        r.add_to_summary(**{PRODUCTS: table, TIMELESS: [], **summary})
        return r

    reports = [
        run("d1-old", 1, 1),
        run("d1", 1, 5, **{SEEN: [["a", 1]], RETRY: [["x", 1]], TIMELESS: ["t1"], FUTURE: [["g", 9]]}),
        run("d2", 2, 3, **{SEEN: [["b", 2]], RETRY: [["x", 2], ["y", 1]], FUTURE: [["f", 9], ["g", 9]]}),
        run("d3", 3, 0, **{BLOCKED: {"color": "image tone"}}),
        run("d4", 4, 0, **{TIMELESS: ALL}),
        run("d5", 5, 0, table="/exports/feed"),
    ]
    resumed = from_partitions(reports, "/lake/p", blocked_retries=1)
    assert resumed is not None and (resumed.run_id, resumed.watermark) == ("d1", T.replace(hour=5))
    assert resumed.summary() == {
        SEEN: [["a", 1], ["b", 2]],
        FUTURE: [["f", 9], ["g", 9]],
        RETRY: [["x", 2], ["y", 1]],
        TIMELESS: [["ingest_date=2026-11-01", "t1"]],  # its run read that one's row of a timeless product
        CAUGHT_UP: [
            ["ingest_date=2026-11-01", T.replace(hour=5).isoformat()],
            ["ingest_date=2026-11-02", T.replace(hour=3).isoformat()],
        ],
        PARTITION_RUNS: ["d1", "d2"],
    }
    # a blocked partition run not passed over is a position like any (the nightly's own rule)
    caught_up = from_partitions(reports, "/lake/p", 0).summary()[CAUGHT_UP]  # type: ignore[union-attr]
    assert "ingest_date=2026-11-03" in [scope for scope, _ in caught_up]
    reports[2].add_to_summary(**{SEEN: None})  # too many rows near its watermark to list: read again
    assert from_partitions(reports, "/lake/p", 1).summary()[SEEN] is None  # type: ignore[union-attr]
    reports[2].add_to_summary(**{FUTURE: None})  # nor its rows stamped in the future: read again
    assert from_partitions(reports, "/lake/p", 1).summary()[FUTURE] is None  # type: ignore[union-attr]
    assert from_partitions(reports, "/exports/other", 1) is None
    assert from_partitions([r for r in reports if r.run_id in {"d3", "d4"}], "/lake/p", 1) is None
    # one product to retry and one timeless row at most: d2's second product would pass that, so
    # its partition is read whole and the rest still read on from their runs
    monkeypatch.setattr("catalog_enrichment.enrich.stages.MAX_SEEN", 1)
    reports[2].add_to_summary(**{SEEN: [["b", 2]]})
    resumed = from_partitions(reports, "/lake/p", blocked_retries=1)
    assert resumed is not None and resumed.summary() == {
        SEEN: [["a", 1]],
        FUTURE: [["g", 9]],
        RETRY: [["x", 1]],
        TIMELESS: [["ingest_date=2026-11-01", "t1"]],
        CAUGHT_UP: [["ingest_date=2026-11-01", T.replace(hour=5).isoformat()]],
        PARTITION_RUNS: ["d1"],
    }
    monkeypatch.setattr("catalog_enrichment.enrich.stages.MAX_SEEN", 0)
    assert from_partitions(reports, "/lake/p", 1) is None  # every partition read whole
