"""The backfill plan: which partitions a backfill runs, under which run ids (resumable, forced)."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

import pytest

from catalog_enrichment.catalog.reports import BLOCKED, FULL, PRODUCTS, RunReport
from catalog_enrichment.catalog.runs import backfill_plan
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.versions import ModelVersion

pytestmark = pytest.mark.timeout(60)

T = dt.datetime(2026, 11, 5, tzinfo=dt.UTC)
MODEL = ModelVersion("shop/tiny", "3")
DAYS = ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04"]


@dataclass
class _Partitions:
    """The two things a backfill plan reads of a catalog: its partitions and its run reports."""

    partitions: list[str]
    reports: list[RunReport] = field(default_factory=list)

    def list_partitions(self, column: str) -> list[str]:
        assert column == "ingest_date"
        return self.partitions

    def read_reports(self) -> list[RunReport]:
        return self.reports

    def describe(self) -> str:
        return "a test catalog"

    def products_name(self) -> str:
        return "/lake/products"


def _report(
    day: str, status: str, version: str = "3", run_id: str | None = None, name: str = "shop/tiny"
) -> RunReport:
    run_id = run_id or f"backfill-{day}-shop_tiny-c6cdfd-v{version}"
    return RunReport(
        run_id=run_id,
        status=status,
        model_name=name,
        model_version=version,
        partition=f"ingest_date={day}",
        started_at=T,
    )


def _plan(catalog: _Partitions, **kwargs: object) -> list[tuple[str, str | None]]:
    """(partition, run id) of the plan's runs, every one of them full."""
    plan = backfill_plan(catalog, MODEL, dt.date(2026, 11, 2), dt.date(2026, 11, 3), **kwargs)  # type: ignore[arg-type]
    assert all(p.full for p in plan)
    return [(p.partition, p.run_id) for p in plan]


def test_each_partition_in_the_range_gets_a_run_id_of_its_day_and_model_version() -> None:
    assert _plan(_Partitions(DAYS)) == [
        ("ingest_date=2026-11-02", "backfill-2026-11-02-shop_tiny-c6cdfd-v3"),
        ("ingest_date=2026-11-03", "backfill-2026-11-03-shop_tiny-c6cdfd-v3"),
    ]


def test_a_partition_this_version_finished_is_skipped_and_an_interrupted_one_keeps_its_run_id() -> None:
    reports = [
        _report("2026-11-02", "succeeded"),
        _report("2026-11-03", "failed"),
        _report("2026-11-03", "succeeded", "2"),
    ]
    assert _plan(_Partitions(DAYS, reports)) == [
        ("ingest_date=2026-11-02", None),  # done by v3: nothing to do
        ("ingest_date=2026-11-03", "backfill-2026-11-03-shop_tiny-c6cdfd-v3"),  # finished, not written twice
    ]


def test_a_partition_another_registered_model_finished_at_the_same_version_is_not_done() -> None:
    """Two registered models write one catalog (say, one per product family), each with its own
    version 3: one's finished partition is not the other's."""
    reports = [
        _report("2026-11-02", "succeeded", name="shop/home", run_id="backfill-2026-11-02-shop_home-fc89c8-v3")
    ]
    assert _plan(_Partitions(DAYS, reports)) == [
        ("ingest_date=2026-11-02", "backfill-2026-11-02-shop_tiny-c6cdfd-v3"),
        ("ingest_date=2026-11-03", "backfill-2026-11-03-shop_tiny-c6cdfd-v3"),
    ]
    # a model whose name a run id holds as it is: "shop_tiny" never plans "shop/tiny"'s id (nor the
    # reverse), which would find that model's run done and do nothing
    reports = [
        _report("2026-11-02", "succeeded", name="shop_tiny", run_id="backfill-2026-11-02-shop_tiny-v3")
    ]
    assert _plan(_Partitions(DAYS, reports))[0] == (
        "ingest_date=2026-11-02",
        "backfill-2026-11-02-shop_tiny-c6cdfd-v3",
    )


def test_a_done_partition_whose_last_run_left_products_to_retry_gets_an_incremental_run() -> None:
    """A backfill during an image host's outage quarantined the products whose photo could not be
    read, to be read again by the next run over the partition: until one has, the partition is not
    done - it gets an incremental run (those products, and what changed since), under a fresh id."""
    from catalog_enrichment.catalog.reports import RETRY

    done = _report("2026-11-02", "succeeded")
    done.watermark = T
    left = _report("2026-11-03", "succeeded")
    left.watermark = T
    left.add_to_summary(**{RETRY: [["p7", 1]]})
    plan = backfill_plan(_Partitions(DAYS, [done, left]), MODEL, dt.date(2026, 11, 2), dt.date(2026, 11, 3))  # type: ignore[arg-type]
    assert plan[0] == ("ingest_date=2026-11-02", None, True)
    assert plan[1].partition == "ingest_date=2026-11-03" and not plan[1].full
    assert plan[1].run_id is not None and plan[1].run_id.startswith(
        "backfill-2026-11-03-shop_tiny-c6cdfd-v3-"
    )
    # its run read them again (nothing left to retry): done
    again = _report("2026-11-03", "succeeded", run_id=plan[1].run_id)
    again.watermark, again.started_at = T, T + dt.timedelta(hours=1)
    again.add_to_summary(**{FULL: False, RETRY: []})
    assert _plan(_Partitions(DAYS, [done, left, again]))[1] == ("ingest_date=2026-11-03", None)
    # had its health checks kept colour out, the products it read again would not have their colour:
    # not done - the partition is run again, whole, under a fresh id
    again.add_to_summary(**{BLOCKED: {"color": "input image PSI 2.1"}})
    rerun = _plan(_Partitions(DAYS, [done, left, again]))[1]
    assert rerun[0] == "ingest_date=2026-11-03" and rerun[1] not in (None, plan[1].run_id)
    assert rerun[1].startswith("backfill-2026-11-03-shop_tiny-c6cdfd-v3-")  # type: ignore[union-attr]


def test_forced_and_rolled_back_partitions_get_a_fresh_run_id() -> None:
    reports = [_report("2026-11-02", "succeeded"), _report("2026-11-03", "rolled_back")]
    forced = _plan(_Partitions(DAYS, reports), force=True)
    assert [p for p, _ in forced] == ["ingest_date=2026-11-02", "ingest_date=2026-11-03"]
    for _, run_id in forced:
        assert run_id is not None and run_id.startswith("backfill-2026-11-0") and len(run_id) > 40
    again = _plan(_Partitions(DAYS, reports))
    assert again[0] == ("ingest_date=2026-11-02", None)
    assert again[1][1] is not None and again[1][1].startswith("backfill-2026-11-03-shop_tiny-c6cdfd-v3-")


def test_a_partition_whose_health_checks_kept_values_out_is_run_again_under_a_fresh_run_id() -> None:
    """A backfill run that the run health kept from writing colour succeeded but did not do the
    partition: the next backfill runs it again (its run id is taken); once a run of it kept nothing
    out, it is done."""
    blocked = _report("2026-11-02", "succeeded")
    blocked.add_to_summary(**{BLOCKED: {"color": "input image PSI 2.1"}})
    again = _plan(_Partitions(DAYS, [blocked, _report("2026-11-03", "succeeded")]))
    assert again[1] == ("ingest_date=2026-11-03", None)
    assert again[0][1] is not None and again[0][1].startswith("backfill-2026-11-02-shop_tiny-c6cdfd-v3-")
    clean = _report("2026-11-02", "succeeded", run_id=again[0][1])
    assert _plan(_Partitions(DAYS, [blocked, clean]))[0] == ("ingest_date=2026-11-02", None)


def test_an_incremental_run_of_a_partition_does_not_make_it_done() -> None:
    """`enrich --partition` without --full scored what changed since another version's run: it did
    not do the partition; a full run did."""
    partial = _report("2026-11-02", "succeeded", run_id="by-hand")
    partial.add_to_summary(**{FULL: False})
    plan = _plan(_Partitions(DAYS, [partial]))
    assert plan[0][0] == "ingest_date=2026-11-02" and plan[0][1] is not None
    assert plan[0][1].startswith("backfill-2026-11-02-shop_tiny-c6cdfd-v3-")
    whole = _report("2026-11-02", "succeeded")
    whole.add_to_summary(**{FULL: True})
    assert _plan(_Partitions(DAYS, [partial, whole]))[0] == ("ingest_date=2026-11-02", None)


def test_a_partition_of_rows_without_a_date_is_not_a_day_of_the_range() -> None:
    """Rows with a null ingest_date sit in __HIVE_DEFAULT_PARTITION__ (the run quarantines them)."""
    days = [*DAYS, "__HIVE_DEFAULT_PARTITION__"]
    assert [p for p, _ in _plan(_Partitions(days))] == ["ingest_date=2026-11-02", "ingest_date=2026-11-03"]


def test_an_empty_or_backwards_range_is_a_clear_error() -> None:
    with pytest.raises(
        CatalogEnrichError,
        match="no ingest_date partitions between 2026-11-02 and 2026-11-03 in a test catalog",
    ):
        _plan(_Partitions(["2026-10-01"]))
    with pytest.raises(CatalogEnrichError, match="--from 2026-11-03 is after --to 2026-11-02"):
        backfill_plan(_Partitions(DAYS), MODEL, dt.date(2026, 11, 3), dt.date(2026, 11, 2))  # type: ignore[arg-type]


def test_a_run_over_another_products_table_does_not_make_a_partition_done() -> None:
    """`--products` read another table into the same catalog: its partition is not this table's,
    nor is its run id (a run under it would find that run done and do nothing); a report from
    before runs recorded their table counts for any."""
    other = _report("2026-11-02", "succeeded")
    other.add_to_summary(**{PRODUCTS: "/exports/vendor_feed"})
    suffix = hashlib.sha256(b"/lake/products").hexdigest()[:8]
    assert _plan(_Partitions(DAYS, [other])) == [
        ("ingest_date=2026-11-02", f"backfill-2026-11-02-shop_tiny-c6cdfd-v3-{suffix}"),
        ("ingest_date=2026-11-03", "backfill-2026-11-03-shop_tiny-c6cdfd-v3"),
    ]
    own = _report("2026-11-03", "succeeded")
    own.add_to_summary(**{PRODUCTS: "/lake/products"})
    before = _report("2026-11-02", "succeeded", run_id="before")
    assert _plan(_Partitions(DAYS, [other, own, before])) == [
        ("ingest_date=2026-11-02", None),
        ("ingest_date=2026-11-03", None),
    ]
