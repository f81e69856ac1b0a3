"""How fast a run's write lands in each catalog (``catalog-enrich bench write``).

The values of N products are staged as a run stages them (the scores Parquet under the run's
staging folder), then :meth:`Catalog.write` is timed end to end, as the run's ``write`` stage:

* PostgreSQL: every Spark partition COPYs into the run's staging table, one transaction merges
  (run log, replaced values kept, deletes, upserts), the staging table is dropped;
* lakehouse: one Delta MERGE.

A run's session has read and scored before it writes, so one untimed write per kind warms the
session first. Two writes per repeat on a fresh catalog: ``insert`` (a first run: every value
new) and ``replace`` (a second run re-scores the same products with other values: every old value
is kept for rollback, deleted or updated). Rows/s = attribute rows the run wrote / seconds;
medians over the repeats.
"""

from __future__ import annotations

import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from catalog_enrichment.catalog import Catalog, open_catalog
from catalog_enrichment.catalog.base import RunWrite
from catalog_enrichment.config import CatalogConfig
from catalog_enrichment.contracts import load_contract
from catalog_enrichment.enrich import flatten_scores
from catalog_enrichment.types import Say

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["format_write_bench", "run_write_bench", "stage_scores"]

ATTRIBUTES = ("color", "material", "product_type")
_VALUE = pa.struct(
    [
        ("attribute", pa.string()),
        ("value", pa.string()),
        ("confidence", pa.float64()),
        ("threshold", pa.float64()),
    ]
)


def stage_scores(folder: Path, products: int, *, seed: int, files: int = 4) -> tuple[pa.Table, pa.Table, int]:
    """Scores of ``products`` products as a run stages them (``files`` Parquet files): every
    attribute scored, 1 or 2 values each. Returns (values, pairs, value rows)."""
    rng = np.random.default_rng(seed)
    ids = [f"P{i:09d}" for i in range(products)]
    counts = rng.integers(1, 3, size=(products, len(ATTRIBUTES)))
    values = []
    for i in range(products):
        row = []
        for j, attribute in enumerate(ATTRIBUTES):
            for k in range(int(counts[i, j])):
                value = f"{attribute}-{(int(rng.integers(40)) + k) % 40}"
                confidence = float(rng.uniform(0.6, 1.0))
                row.append(
                    {"attribute": attribute, "value": value, "confidence": confidence, "threshold": 0.5}
                )
        values.append(row)
    # one value per (product, attribute, value): a repeated draw keeps its first
    scores = pa.table(
        {
            "product_id": ids,
            "values": pa.array([_unique(r) for r in values], pa.list_(_VALUE)),
            "scored": [list(ATTRIBUTES)] * products,
            "settled": pa.array([[]] * products, pa.list_(pa.string())),
            "image_error": pa.nulls(products, pa.string()),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    step = -(-products // files)
    for f in range(files):
        pq.write_table(scores.slice(f * step, step), folder / f"part-{f}.parquet")
    value_table, pairs = flatten_scores(scores)
    return value_table, pairs, value_table.num_rows


def _unique(row: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for v in row:
        seen.setdefault((v["attribute"], v["value"]), v)
    return list(seen.values())


def _write(
    catalog: Catalog, spark: SparkSession, run_id: str, staged: tuple[pa.Table, pa.Table, int], scores: Path
) -> float:
    values, pairs, _ = staged
    quarantine = load_contract("quarantine").arrow_schema().empty_table()
    run = RunWrite(run_id, "bench", "1", dt.datetime.now(dt.UTC), values, pairs, quarantine, str(scores))
    started = time.perf_counter()
    with catalog.lock(f"bench {run_id}", say=lambda _m: None):
        catalog.write(run, spark)
    return time.perf_counter() - started


def run_write_bench(
    spark: SparkSession,
    catalogs: dict[str, Callable[[int], CatalogConfig]],
    *,
    products: int,
    repeats: int,
    say: Say = print,
) -> dict[str, Any]:
    """Time the two writes on a fresh catalog of each kind per repeat (kinds alternate)."""
    with tempfile.TemporaryDirectory(prefix="bench-write-") as tmp:
        first = stage_scores(Path(tmp) / "first", products, seed=0)
        second = stage_scores(Path(tmp) / "second", products, seed=1)
        warm = stage_scores(Path(tmp) / "warm", 1000, seed=2)
        seconds: dict[str, dict[str, list[float]]] = {k: {"insert": [], "replace": []} for k in catalogs}
        for make in catalogs.values():  # a run's session has scored before it writes: warm
            _write(open_catalog(make(-1)), spark, "bench-warm-up", warm, Path(tmp) / "warm")
        for repeat in range(repeats):
            for kind, make in catalogs.items():
                catalog = open_catalog(make(repeat))
                for phase, staged, scores in (("insert", first, "first"), ("replace", second, "second")):
                    took = _write(catalog, spark, f"bench-{phase}-{repeat}", staged, Path(tmp) / scores)
                    seconds[kind][phase].append(took)
                    say(
                        f"  {kind:9s} {phase:7s} repeat {repeat + 1}/{repeats}: {staged[2]:,} rows in "
                        f"{took:.2f}s"
                    )
    rows = {"insert": first[2], "replace": second[2]}
    result: dict[str, Any] = {"products": products, "repeats": repeats, "rows": rows, "kinds": {}}
    for kind, phases in seconds.items():
        result["kinds"][kind] = {
            phase: {
                "seconds": [round(s, 3) for s in runs],
                "median_seconds": round(statistics.median(runs), 3),
                "rows_per_second": round(rows[phase] / statistics.median(runs)),
            }
            for phase, runs in phases.items()
        }
    return result


def format_write_bench(result: dict[str, Any]) -> str:
    lines = [
        f"write of one run: {result['products']:,} products, medians of {result['repeats']} repeats",
        f"{'catalog':10s} {'write':8s} {'rows':>9s} {'seconds':>8s} {'rows/s':>9s}  runs (s)",
    ]
    for kind, phases in result["kinds"].items():
        for phase, r in phases.items():
            lines.append(
                f"{kind:10s} {phase:8s} {result['rows'][phase]:>9,} {r['median_seconds']:>8.2f} "
                f"{r['rows_per_second']:>9,}  {', '.join(f'{s:.2f}' for s in r['seconds'])}"
            )
    return "\n".join(lines)
