"""Run reports and quarantine: two more Delta tables beside the attributes.

The run-report table holds one row per run id (upserted, so a failed run that is re-run with the
same id ends as one row); incremental runs read their watermark from it. The quarantine table is
partitioned by run id and appended once per run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.catalog.lakehouse import is_delta, read_table, read_where
from catalog_enrichment.contracts import load_contract
from catalog_enrichment.errors import CatalogEnrichError

__all__ = [
    "BLOCKED",
    "CAUGHT_UP",
    "FULL",
    "FUTURE",
    "PLACEHOLDERS",
    "PRODUCTS",
    "RETRIES_DROPPED",
    "RETRY",
    "SEEN",
    "SOURCES_OUT",
    "TIMELESS",
    "RunReport",
    "blocked_why",
    "check_run_id",
    "format_report",
    "last_run",
    "last_watermark",
    "of_scope",
    "placeholders_found",
    "read_reports",
    "report_for",
    "set_report_status",
    "upsert_report",
    "write_quarantine",
]


MAPS = ("written_per_attribute", "coverage_per_attribute", "stage_seconds")


@dataclass(kw_only=True)
class RunReport:
    """One row of the run-report table: the fields of ``schemas/run_report.yaml``, in its order."""

    run_id: str
    status: str = "failed"  # until the run says otherwise
    model_name: str | None = None
    model_version: str | None = None
    partition: str | None = None
    started_at: dt.datetime
    finished_at: dt.datetime | None = None
    rows_read: int = 0
    rows_valid: int = 0
    rows_quarantined: int = 0
    rows_scored: int = 0
    written_per_attribute: dict[str, int] = field(default_factory=dict)
    coverage_per_attribute: dict[str, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    products_per_second: float | None = None
    watermark: dt.datetime | None = None
    validation_summary: str | None = None

    def summary(self) -> dict[str, Any]:
        """``validation_summary`` as a dict (empty when there is none)."""
        return json.loads(self.validation_summary or "{}")

    def add_to_summary(self, **entries: Any) -> None:
        self.validation_summary = json.dumps({**self.summary(), **entries}, default=str)

    def to_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RunReport:
        return cls(**{**row, **{k: dict(row[k] or []) for k in MAPS}})


def read_reports(path: str | Path) -> list[RunReport]:
    """Every run report, oldest first (empty when the table does not exist yet)."""
    if not is_delta(path):
        return []
    rows = read_table(path).to_pylist()
    return sorted((RunReport.from_row(row) for row in rows), key=lambda r: r.started_at)


def report_for(
    reports: Sequence[RunReport], run_id: str | None = None, *, where: str = "the catalog"
) -> RunReport:
    """One run's report among ``reports`` (the latest run when ``run_id`` is None).

    Raises:
        CatalogEnrichError: no such run / no runs yet.
    """
    if run_id is None:
        if not reports:
            raise CatalogEnrichError(f"no enrichment runs recorded in {where} yet")
        return reports[-1]
    for report in reports:
        if report.run_id == run_id:
            return report
    raise CatalogEnrichError(f"no run {run_id!r} in {where}")


def upsert_report(path: str | Path, report: RunReport) -> None:
    """Insert or replace the row of ``report.run_id``."""
    from deltalake import DeltaTable, write_deltalake

    schema = load_contract("run_report").arrow_schema()
    row = report.to_row()
    if list(row) != schema.names:  # a field added to one and not the other
        raise CatalogEnrichError(f"RunReport fields {list(row)} do not match the run_report contract")
    table = pa.Table.from_pylist([{**row, **{k: list(row[k].items()) for k in MAPS}}], schema=schema)
    if not is_delta(path):
        Path(path).mkdir(parents=True, exist_ok=True)
        write_deltalake(str(path), table, mode="error")
        return
    (
        DeltaTable(str(path))
        .merge(table, predicate="t.run_id = s.run_id", source_alias="s", target_alias="t")
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute()
    )


def set_report_status(path: str | Path, run_id: str, status: str) -> None:
    """Set one run's status; the values travel as a one-row source table, never inside the SQL text."""
    from deltalake import DeltaTable

    source = pa.table({"run_id": [run_id], "status": [status]})
    (
        DeltaTable(str(path))
        .merge(source, predicate="t.run_id = s.run_id", source_alias="s", target_alias="t")
        .when_matched_update(updates={"status": "s.status"})
        .execute()
    )


RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:=+-]{0,199}")


def check_run_id(run_id: str) -> str:
    """``run_id`` when it is a valid run id (letters, digits and ``._:=+-``, at most 200 characters;
    it names a staging folder and a quarantine partition), else a one-line error."""
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise CatalogEnrichError(
            f"run id {run_id!r} is not valid: use letters, digits and . _ : = + - "
            "(at most 200 characters, starting with a letter or digit)"
        )
    return run_id


# What a run keeps for the next incremental run over its scope, in its report's summary: the
# (product id, updated_at in µs) it read in the look-back before its watermark, and the products to
# read again because their image could not be read, with the attempts so far
SEEN, RETRY = "read_near_watermark", "retry_images"
# ... and how many more products it quarantined to read again than that list holds (stages.MAX_SEEN):
# they wait until they change
RETRIES_DROPPED = "retry_images_left_out"
# ... and the ids of the products whose rows no watermark places (catalog.products.timeless), which
# it read and quarantined or found quarantined: the next run reads only the others of them
TIMELESS = "timeless_rows"
# ... and the (product id, updated_at in µs) of the rows it quarantined for a time past its start
# and the clock skew (updated_at_not_in_future): the next run leaves those still in its own future
# unread (None: too many to list, the next run reads them again)
FUTURE = "future_rows"
# ... and the attributes its run health kept out of the commit, with why
BLOCKED = "health_blocked"
# ... and whether it read every product of its scope (--full)
FULL = "full"
# ... and, where its position is that of runs over single partitions (enrich.stages.from_partitions),
# those partitions with their runs' watermarks: it read every row of the others
CAUGHT_UP = "caught_up_partitions"
EXPECTATIONS = "great_expectations"  # the run's GX checkpoint (validation/checkpoint.py)
# ... and the image digests it found to be placeholders (``image_shared``), with their products
PLACEHOLDERS = "placeholder_images"
# ... and the image sources that were out (enrich.stages.image_outages), with their products that failed
SOURCES_OUT = "image_sources_out"
# ... and the products table it read (Catalog.products_name): a run over another table of the same
# catalog (--products) neither moves nor takes its watermark
PRODUCTS = "products_table"
# ... and, where it read nothing past the watermark of the run it read on from (so it took that
# watermark as its own), that run's id, or the ids of the runs over single partitions it read on
# from: when one of them is rolled back, its position does not count
RESUMED = "resumed_from"
# the status of a run report whose run was rolled back
ROLLED_BACK = "rolled_back"


def placeholders_found(reports: Iterable[RunReport], limit: int) -> set[str]:
    """The image digests some earlier run found on more than ``limit`` products (today's
    ``validation.max_products_per_image``), whatever became of the run: the same bytes are a
    placeholder again on however few products a later run reads them. A limit raised above a
    digest's count (a stock photo many products really share) lets its products through again."""
    if not limit:
        return set()
    return {str(d) for r in reports for d, n in (r.summary().get(PLACEHOLDERS) or {}).items() if n > limit}


def blocked_why(blocked: Any) -> dict[str, str]:
    """A run report's ``health_blocked`` summary entry as attribute -> why its values were kept out
    (reports written before the reasons were kept list the attributes only)."""
    if isinstance(blocked, dict):
        return {str(a): str(w) for a, w in blocked.items()}
    return {str(a): "a check in block mode failed" for a in blocked or ()}


def last_watermark(reports: Iterable[RunReport], scope: str | None) -> dt.datetime | None:
    """Highest watermark of the succeeded runs over the same scope (partition, or None = all)."""
    latest = last_run(reports, scope)
    return None if latest is None else latest.watermark


def of_scope(report: RunReport, scope: str | None, products: str | None) -> bool:
    """Whether ``report`` is of a run over the same scope (partition, or None = all) of the same
    products table (None: any; a report written before runs recorded theirs: any)."""
    read = report.summary().get(PRODUCTS)
    return report.partition == scope and (products is None or read is None or read == products)


def last_run(
    reports: Iterable[RunReport], scope: str | None, *, products: str | None = None, blocked_retries: int = 0
) -> RunReport | None:
    """The succeeded run over the same scope (partition, or None = all) of the same ``products``
    table (:func:`of_scope`) with the highest watermark, the latest of those - passing over up to
    ``blocked_retries`` latest runs whose health checks kept an attribute's values out, so the next
    run reads their products again (None when every run was passed over, or one that read the
    whole scope, ``enrich --full``: the next run reads everything). A run that took its watermark
    from a run rolled back since (:data:`RESUMED`, at any remove) does not count either: the
    rolled-back run's products are read again."""
    reports = list(reports)
    by_id = {r.run_id: r for r in reports}
    resumed = {r.run_id: r.summary().get(RESUMED) for r in reports}  # each summary parsed once

    def took_rolled_back(report: RunReport) -> bool:
        todo, seen = [report.run_id], set()
        while todo:
            before = resumed.get(todo.pop())
            for run_id in [] if before is None else [before] if isinstance(before, str) else before:
                if str(run_id) in seen or (found := by_id.get(str(run_id))) is None:
                    continue
                if found.status == ROLLED_BACK:
                    return True
                seen.add(found.run_id)
                todo.append(found.run_id)
        return False

    runs = [
        r
        for r in reports
        if r.status == "succeeded"
        and of_scope(r, scope, products)
        and r.watermark
        and not took_rolled_back(r)
    ]
    # of runs with the same watermark (nothing newer read since), the latest: its lists are current
    runs.sort(key=lambda r: (r.watermark, r.started_at))
    for _ in range(blocked_retries):
        if not runs or not runs[-1].summary().get(BLOCKED):
            break
        if runs.pop().summary().get(FULL):  # it read the whole scope (--full): so does the next run
            return None
    return runs[-1] if runs else None


def _holds_run(path: str | Path, run_id: str) -> bool:
    """Whether the quarantine table has rows of ``run_id`` (its partition: no other file is read)."""
    return read_where(path, pc.field("run_id") == run_id, ["run_id"]).num_rows > 0


def write_quarantine(path: str | Path, run_id: str, rows: pa.Table, *, replace: bool) -> int:
    """Write run ``run_id``'s quarantined rows. Where an earlier attempt of the run id left rows:
    ``replace`` puts these in their place (one commit; that attempt committed nothing, so this
    attempt's rows are the run's), otherwise they stand (that attempt committed the run)."""
    from deltalake import write_deltalake

    earlier = is_delta(path) and _holds_run(path, run_id)
    if earlier and not replace:
        return 0
    if earlier:
        where = f"run_id = '{check_run_id(run_id)}'"
        write_deltalake(str(path), rows, mode="overwrite", predicate=where, partition_by=["run_id"])
        return rows.num_rows
    if rows.num_rows:
        write_deltalake(str(path), rows, mode="append", partition_by=["run_id"])
    return rows.num_rows


def expectations_line(checked: Mapping[str, Any]) -> str:
    """One line of a run's Great Expectations checkpoint (``validation/checkpoint.py``'s summary):
    expectations evaluated, each failed one, the stored result and its Data Docs page."""
    critical, warnings = checked.get("critical") or [], checked.get("warnings") or []
    failed = "; ".join([*critical, *warnings])
    docs = f"; data docs {checked['docs']}" if checked.get("docs") else ""
    return (
        f"great expectations: {checked['evaluated']} expectations, {len(critical) + len(warnings)} failed "
        f"({len(critical)} critical, {len(warnings)} warning){': ' + failed if failed else ''}; "
        f"result {checked['result_id']}{docs}"
    )


def format_report(report: RunReport) -> str:
    """A human-readable run report."""
    lines = [
        f"run {report.run_id}: {report.status}",
        f"  model        {report.model_name} v{report.model_version}",
        f"  partition    {report.partition or 'all'}",
        f"  started      {report.started_at}   finished {report.finished_at}",
        f"  rows         read {report.rows_read:,}  valid {report.rows_valid:,}  "
        f"quarantined {report.rows_quarantined:,}  scored {report.rows_scored:,}",
    ]
    coverage = report.coverage_per_attribute
    if report.written_per_attribute:
        lines.append(
            "  written      "
            + "  ".join(
                f"{a} {n:,} ({coverage.get(a, 0):.0%} of scored)"
                for a, n in report.written_per_attribute.items()
            )
        )
    if report.stage_seconds:
        lines.append("  seconds      " + "  ".join(f"{k} {v:.1f}" for k, v in report.stage_seconds.items()))
    if report.products_per_second:
        lines.append(f"  throughput   {report.products_per_second:,.1f} products/s")
    if report.watermark:
        lines.append(f"  watermark    {report.watermark}")
    info = report.summary()
    if info:
        broken = {rule: n for rule, n in (info.get("row_rules") or {}).items() if n}
        lines.append(
            "  quarantined  "
            + ("; ".join(f"{rule} {n:,}" for rule, n in broken.items()) if broken else "no rule broken")
        )
        if EXPECTATIONS in info:
            lines.append(
                "  expectations " + expectations_line(info[EXPECTATIONS]).removeprefix("great expectations: ")
            )
        if "health" in info:
            failed = len(info.get("health_failures") or [])
            blocked = blocked_why(info.get("health_blocked"))
            lines.append(
                f"  health       {failed} failed check(s), blocked {', '.join(blocked) or 'nothing'} "
                "(report --health)"
            )
            lines += [f"  blocked      {a}: {why}" for a, why in blocked.items()]
        photos = [f"{s} out ({n:,} products)" for s, n in (info.get(SOURCES_OUT) or {}).items()]
        if info.get(PLACEHOLDERS):
            photos.append(f"{len(info[PLACEHOLDERS]):,} placeholder image(s)")
        if info.get(RETRY):
            photos.append(f"{len(info[RETRY]):,} products read again by the next run")
        if info.get(RETRIES_DROPPED):
            photos.append(f"{info[RETRIES_DROPPED]:,} past that list's limit, waiting until they change")
        if photos:
            lines.append("  photos       " + "; ".join(photos))
        if info.get("error"):
            lines.append(f"  error        {info['error']}")
    return "\n".join(lines)
