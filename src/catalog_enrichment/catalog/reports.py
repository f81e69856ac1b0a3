"""Run reports and quarantine: two more Delta tables beside the attributes.

The run-report table holds one row per run id (upserted, so a failed run that is re-run with the
same id ends as one row); incremental runs read their watermark from it. The quarantine table is
partitioned by run id and appended once per run.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.contracts import load_contract
from catalog_enrichment.errors import CatalogEnrichError

__all__ = [
    "append_quarantine",
    "format_report",
    "last_watermark",
    "read_reports",
    "report_for",
    "set_report_status",
    "upsert_report",
]


def _exists(path: str | Path) -> bool:
    return (Path(path) / "_delta_log").is_dir()


def read_reports(path: str | Path) -> list[dict[str, Any]]:
    """Every run report, oldest first (empty when the table does not exist yet)."""
    from deltalake import DeltaTable

    if not _exists(path):
        return []
    rows = DeltaTable(str(path)).to_pyarrow_table().to_pylist()
    for row in rows:
        for key in ("written_per_attribute", "coverage_per_attribute", "stage_seconds"):
            row[key] = dict(row[key] or [])
    return sorted(rows, key=lambda r: r["started_at"])


def report_for(path: str | Path, run_id: str | None = None) -> dict[str, Any]:
    """One run's report (the latest run when ``run_id`` is None).

    Raises:
        CatalogEnrichError: no such run / no runs yet.
    """
    reports = read_reports(path)
    if run_id is None:
        if not reports:
            raise CatalogEnrichError(f"no enrichment runs recorded in {path} yet")
        return reports[-1]
    for row in reports:
        if row["run_id"] == run_id:
            return row
    raise CatalogEnrichError(f"no run {run_id!r} in {path}")


def upsert_report(path: str | Path, report: dict[str, Any]) -> None:
    """Insert or replace the row of ``report['run_id']``."""
    from deltalake import DeltaTable, write_deltalake

    schema = load_contract("run_report").arrow_schema()
    row = {name: report.get(name) for name in schema.names}
    for key in ("written_per_attribute", "coverage_per_attribute", "stage_seconds"):
        row[key] = list((row[key] or {}).items())
    table = pa.Table.from_pylist([row], schema=schema)
    if not _exists(path):
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
    from deltalake import DeltaTable

    DeltaTable(str(path)).update(updates={"status": f"'{status}'"}, predicate=f"run_id = '{run_id}'")


def last_watermark(path: str | Path, scope: str | None) -> dt.datetime | None:
    """Highest watermark of the succeeded runs over the same scope (partition, or None = all)."""
    marks = [
        r["watermark"]
        for r in read_reports(path)
        if r["status"] == "succeeded" and r["partition"] == scope and r["watermark"] is not None
    ]
    return max(marks) if marks else None


def append_quarantine(path: str | Path, rows: pa.Table) -> int:
    """Append a run's quarantined rows once (a run id already present is not appended again)."""
    from deltalake import DeltaTable, write_deltalake

    if rows.num_rows == 0:
        return 0
    run_id = rows["run_id"][0].as_py()
    if _exists(path):
        existing = (
            DeltaTable(str(path))
            .to_pyarrow_dataset()
            .to_table(columns=["run_id"], filter=pc.field("run_id") == run_id)
        )
        if existing.num_rows:
            return 0
    write_deltalake(str(path), rows, mode="append", partition_by=["run_id"])
    return rows.num_rows


def format_report(report: dict[str, Any]) -> str:
    """A human-readable run report."""
    lines = [
        f"run {report['run_id']}: {report['status']}",
        f"  model        {report.get('model_name')} v{report.get('model_version')}",
        f"  partition    {report.get('partition') or 'all'}",
        f"  started      {report['started_at']}   finished {report.get('finished_at')}",
        f"  rows         read {report['rows_read']:,}  valid {report['rows_valid']:,}  "
        f"quarantined {report['rows_quarantined']:,}  scored {report['rows_scored']:,}",
    ]
    written = report.get("written_per_attribute") or {}
    coverage = report.get("coverage_per_attribute") or {}
    if written:
        lines.append(
            "  written      "
            + "  ".join(f"{a} {n:,} ({coverage.get(a, 0):.0%} of scored)" for a, n in written.items())
        )
    stages = report.get("stage_seconds") or {}
    if stages:
        lines.append("  seconds      " + "  ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    if report.get("products_per_second"):
        lines.append(f"  throughput   {report['products_per_second']:,.1f} products/s")
    if report.get("watermark"):
        lines.append(f"  watermark    {report['watermark']}")
    summary = report.get("validation_summary")
    if summary:
        info = json.loads(summary)
        broken = {rule: n for rule, n in (info.get("row_rules") or {}).items() if n}
        lines.append(
            "  quarantined  "
            + ("; ".join(f"{rule} {n:,}" for rule, n in broken.items()) if broken else "no rule broken")
        )
        if "success" in info:
            stats = info.get("statistics", {})
            met, total = stats.get("successful_expectations", 0), stats.get("evaluated_expectations", 0)
            lines.append(f"  GX suite     {met}/{total} expectations met")
        if info.get("error"):
            lines.append(f"  error        {info['error']}")
    return "\n".join(lines)
