"""The enrichment run's stages, each a function with typed inputs and a typed result: read,
validate, score, collect the rows to write, write, store the embeddings."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from catalog_enrichment.catalog import Catalog
from catalog_enrichment.catalog.base import RunWrite
from catalog_enrichment.catalog.products import Partition, in_partitions, timeless
from catalog_enrichment.catalog.reports import (
    CAUGHT_UP,
    FUTURE,
    RETRY,
    SEEN,
    TIMELESS,
    RunReport,
    last_run,
    of_scope,
)
from catalog_enrichment.config import InferenceConfig
from catalog_enrichment.contracts import (
    IMAGE_READABLE,
    IMAGE_SHARED,
    Contract,
    Taxonomy,
    load_contract,
)
from catalog_enrichment.data.images import ImagePolicy, shared_images
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.health import HealthTally
from catalog_enrichment.inference.options import PredictorOptions
from catalog_enrichment.inference.spark import (
    DECISION_COLUMNS,
    ScoringCounters,
    ScoringSpec,
    mark_shared_images,
    score_dataframe,
    ship_bundle,
    stage_vectors,
)
from catalog_enrichment.redaction import redact_text
from catalog_enrichment.types import Say
from catalog_enrichment.validation.rules import (
    IN_FUTURE,
    REASONS,
    Rule,
    ValidationCounts,
    check_rows,
    count_rows,
    latest_copies,
    quarantine_rows,
    read_once,
    repeated_rows,
)
from catalog_enrichment.versions import ModelVersion

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from catalog_enrichment.inference.decide import DecisionPolicy

__all__ = [
    "ALL",
    "Decisions",
    "Read",
    "Scored",
    "Validated",
    "check_driver_room",
    "collect_decisions",
    "flatten_scores",
    "from_partitions",
    "future_next",
    "photos_quarantined",
    "read",
    "run_write",
    "score",
    "scoring_spec",
    "settled_unscored",
    "store_embeddings",
    "validate",
]

_UNIX_MICROS = "_updated_at_us"
_ROW_KEYS = f"product_id string, {_UNIX_MICROS} long"  # a row's key: product id, updated_at in µs
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
MAX_SEEN = 100_000
# what a run holds on the driver a product it scores: the decisions and the write's source (about
# 2.7 KB measured: docs/benchmarks.md, "Marketplace scale"; rounded up for wider taxonomies)
DRIVER_BYTES_PER_PRODUCT = 4096
# a run's list of the products with a timeless row (_timeless) where it names every one: more than
# MAX_SEEN, or a run from before the lists were kept
ALL = "all"
# the ids of the partitions' runs a position taken from a backfill's stands for (from_partitions)
PARTITION_RUNS = "partition_runs"


@dataclass(frozen=True)
class Read:
    """The products a run reads, and what the last run over the same scope left for it: its
    watermark (``since``), the rows it read near it (``seen``; None: too many, read again) and the
    products whose image could not be read, with their attempts (``retry``); ``superseded``: the
    rows left unread because a newer copy of their product is in another partition (a run of one
    partition) or was read by the last run (an old copy committed late, inside the look-back);
    ``last_run``: that last run's id (the partition runs', :func:`from_partitions`); ``timeless``:
    the ids of the products with a row no watermark places in the scope now, for the next run, and
    ``timeless_done`` the last run's, each
    :data:`ALL` where it names every one (:func:`_timeless`); ``caught_up``: the last run's
    :data:`~catalog_enrichment.catalog.reports.CAUGHT_UP` partitions, as listed; ``future``: the rows
    the last run quarantined as stamped in the future that still are, left unread
    (:func:`_still_future`)."""

    df: DataFrame
    since: dt.datetime | None
    seen: list[tuple[str, int]] | None
    retry: dict[str, int]
    lookback: dt.timedelta
    superseded: int = 0
    last_run: str | list[str] | None = None
    timeless: list[str] | str | None = None
    timeless_done: list[Any] | str | None = None
    caught_up: list[list[str]] | None = None
    future: list[tuple[str, int]] = field(default_factory=list)


def read(
    spark: SparkSession,
    catalog: Catalog,
    contract: Contract,
    partition: Partition | None,
    last: RunReport | None,
    lookback: dt.timedelta,
    staging: Path,
    *,
    earliest: dt.datetime | None = None,
    latest: dt.datetime | None = None,
    require_columns: bool = True,
) -> Read:
    """Incremental unless ``last`` is None: ``updated_at`` past ``last``'s watermark less
    ``lookback``, without the rows it already read, plus the products to retry and the rows no
    watermark places (:func:`~catalog_enrichment.catalog.products.timeless`: ``updated_at`` null
    or before ``earliest``) but those ``last`` read (:func:`_timeless`); staged once when the
    catalog's reads are not a snapshot (every stage then reads the same rows; the timeless list
    then also names the products of such rows committed after it was taken, which are staged). A run of one
    ``partition`` leaves out the rows another partition holds a newer copy of (:func:`_superseded`),
    and every run those older than a copy the last run read (:func:`_unseen`), the older copies
    of a product tried again (:func:`_older_retried`) and the rows the last run quarantined as
    stamped in the future that still are, past ``latest`` (the run's start and the clock skew): a
    row stamped in year 9999 is judged once, not quarantined again, and counted by the circuit
    breaker, every night. ``require_columns``: as :meth:`Catalog.read_products`."""
    since = None if last is None else last.watermark
    left = {} if last is None else last.summary()  # parsed once: its lists can be long
    kept = left.get(SEEN, [])
    seen = None if kept is None else [(str(p), int(at)) for p, at in kept]
    retry = {str(p): int(n) for p, n in left.get(RETRY, [])}
    caught = left.get(CAUGHT_UP)
    caught_up = None
    if caught is not None:  # each partition's own window
        caught_up = {Partition(*p.split("=", 1)): dt.datetime.fromisoformat(w) - lookback for p, w in caught}
    df = catalog.read_products(
        spark, contract, partition=partition, since=since and since - lookback, retry=sorted(retry),
        earliest=earliest, caught_up=caught_up, require_columns=require_columns,
    )  # fmt: skip
    # a last run from before the lists were kept left them all to a full run: none is new
    done = None if last is None else left.get(TIMELESS, ALL)
    df, present = _timeless(spark, df, earliest, done, caught_up or None)
    superseded = 0
    if partition is not None or caught_up is not None:
        df, superseded = _superseded(spark, catalog, contract, df, partition, staging)
    # first: a product's newer rows are judged without its copy stamped in the future (a retried
    # product's row must not be taken for an older copy of that one)
    df, future = _still_future(spark, df, left.get(FUTURE, []), latest)
    df, late = _unseen(spark, df, [(p, at) for p, at in seen or [] if p not in retry])
    df, older = _older_retried(spark, df, sorted(retry))
    superseded += late + older
    if not catalog.reads_snapshot:
        df.write.mode("overwrite").parquet(str(staging / "source"))
        df = spark.read.parquet(str(staging / "source"))
        if present != ALL:  # a row without a time committed since the first read is staged: listed too
            present = _ids_past(sorted(set(present) | set(_timeless_ids(df, earliest))))
    last_id = None if last is None else left.get(PARTITION_RUNS, last.run_id)
    return Read(df, since, seen, retry, lookback, superseded, last_id, present, done, caught, future)


def from_partitions(reports: list[RunReport], products: str, blocked_retries: int) -> RunReport | None:
    """Where a run over the whole ``products`` table that has no such run to read on from starts:
    the last runs over single partitions (a backfill's, ``enrich --partition``; :func:`last_run`,
    passing over ``blocked_retries`` blocked ones), taken as one run - each partition
    :data:`~catalog_enrichment.catalog.reports.CAUGHT_UP` to its own run's watermark (the run
    reads what changed there since, and every row of the other partitions), their lists of rows
    read and products to retry joined, the highest watermark and its run's id as the position the
    next run reads on from (:data:`PARTITION_RUNS`: all their ids, a quiet run's
    :data:`~catalog_enrichment.catalog.reports.RESUMED`). A partition whose last run could not list
    its timeless rows (:data:`ALL`) is read whole, and so are those whose products to retry or
    timeless rows would take the joined lists past :data:`MAX_SEEN` (the partitions with the
    shortest lists are taken first). None where no partition is left to read on from (the run
    reads everything, as before any backfill)."""
    by_scope: dict[str, list[RunReport]] = {}
    for r in sorted(reports, key=lambda r: str(r.partition)):  # last_run reads a partition's own reports
        if r.partition and of_scope(r, r.partition, products):
            by_scope.setdefault(r.partition, []).append(r)
    runs = [last_run(by_scope[s], s, products=products, blocked_retries=blocked_retries) for s in by_scope]
    candidates = [(r, r.summary()) for r in runs if r is not None and r.watermark is not None]
    candidates = [(r, s) for r, s in candidates if isinstance(s.get(TIMELESS), list)]
    candidates.sort(key=lambda rs: (len(rs[1].get(RETRY, [])) + len(rs[1][TIMELESS]), str(rs[0].partition)))
    found: list[tuple[RunReport, dict[str, Any]]] = []
    seen: list[list[Any]] | None = []
    future: set[tuple[str, int]] | None = set()
    retry: dict[str, int] = {}
    timeless_rows: set[tuple[str, str]] = set()  # (partition, product): its run read that one's
    for run, summary in candidates:
        theirs = {str(pid): int(n) for pid, n in summary.get(RETRY, [])}
        more = sum(pid not in retry for pid in theirs)
        if len(retry) + more > MAX_SEEN or len(timeless_rows) + len(summary[TIMELESS]) > MAX_SEEN:
            continue  # its lists cannot be carried: the partition is read whole
        found.append((run, summary))
        kept = summary.get(SEEN, [])
        if seen is None or kept is None or len(seen) + len(kept) > MAX_SEEN:
            seen = None  # too many to list: the run reads them again
        else:
            seen.extend(kept)
        ahead = summary.get(FUTURE, [])
        if future is None or ahead is None or len(future) + len(ahead) > MAX_SEEN:
            future = None  # the run reads them again
        else:
            future.update((str(p), int(at)) for p, at in ahead)
        for pid, n in theirs.items():
            retry[pid] = max(n, retry.get(pid, 0))
        timeless_rows.update((str(run.partition), str(p)) for p in summary[TIMELESS])
    if not found:
        return None
    last = max((r for r, _ in found), key=lambda r: (r.watermark, r.started_at))
    summary = {
        SEEN: seen,
        FUTURE: None if future is None else [list(row) for row in sorted(future)],
        RETRY: sorted(retry.items()),
        TIMELESS: [list(pair) for pair in sorted(timeless_rows)],
        CAUGHT_UP: sorted([r.partition, r.watermark.isoformat()] for r, _ in found if r.watermark),
        PARTITION_RUNS: sorted(r.run_id for r, _ in found),
    }
    return RunReport(
        run_id=last.run_id,
        status="succeeded",
        started_at=last.started_at,
        watermark=last.watermark,
        validation_summary=json.dumps(summary),
    )


def _timeless(
    spark: SparkSession,
    df: DataFrame,
    earliest: dt.datetime | None,
    done: list[Any] | str | None,
    within: Collection[Partition] | None = None,
) -> tuple[DataFrame, list[str] | str]:
    """``df`` without the :func:`~catalog_enrichment.catalog.products.timeless` rows of the products
    ``done`` (the last run's list: it read those and quarantined them, or found them so - without a
    time, a row cannot say it changed since; :data:`ALL`: every one; None: a full read, nothing
    left out) nor those without a product id; and the ids of every product with such a row in
    ``df`` now, for the next run (:data:`ALL` when more than :data:`MAX_SEEN`: the next run leaves
    them all to a full run, as runs did before the lists were kept). So a row without a time that
    arrives between two incremental runs is quarantined by the next one and counted by its breaker
    once, not left for a full run to find. ``within``: the partitions whose runs listed them, for
    a run reading on from those runs - ``done`` then holds (partition, product id) pairs, and a
    product's such row in another partition is read."""
    from pyspark.sql import functions as F

    if "updated_at" not in df.columns or "product_id" not in df.columns:  # the checkpoint names it
        return df, []
    present = _ids_past(_timeless_ids(df, earliest))
    if done is None:  # a read of every row
        return df, present
    read = timeless(earliest) if within is None else timeless(earliest) & in_partitions(within, df.schema)
    if done == ALL:
        return df.where(~read), present
    if not done:  # one without an id too: nothing tells a later run it was read (a full run reads it)
        return df.where(~(read & F.col("product_id").isNull())), present
    listed: list[tuple[str, ...]]
    if within is None:
        on, keyed, listed = ["product_id"], df, [(str(p),) for p in done]
    else:  # (partition, product id) pairs
        on, listed = ["product_id", "_partition"], [(str(e[1]), str(e[0]).split("=", 1)[1]) for e in done]
        keyed = df.withColumn("_partition", F.col(next(iter(within)).column).cast("string"))
    keys = spark.createDataFrame(listed, ", ".join(f"{c} string" for c in on))
    marked = keyed.join(F.broadcast(keys.withColumn("_done", F.lit(True))), on, "left")
    old = read & (F.col("product_id").isNull() | F.coalesce(F.col("_done"), F.lit(False)))
    return marked.where(~old).select(*df.columns), present


def _timeless_ids(df: DataFrame, earliest: dt.datetime | None) -> list[str]:
    """The ids of up to :data:`MAX_SEEN` + 1 products with a timeless row in ``df``."""
    from pyspark.sql import functions as F

    if "updated_at" not in df.columns or "product_id" not in df.columns:
        return []
    only = df.where(timeless(earliest) & F.col("product_id").isNotNull()).select("product_id").distinct()
    return sorted(str(r[0]) for r in only.limit(MAX_SEEN + 1).collect())


def _ids_past(ids: list[str]) -> list[str] | str:
    """``ids``, or :data:`ALL` where they are more than :data:`MAX_SEEN`."""
    return ids if len(ids) <= MAX_SEEN else ALL


def _superseded(
    spark: SparkSession,
    catalog: Catalog,
    contract: Contract,
    df: DataFrame,
    partition: Partition | None,
    staging: Path,
) -> tuple[DataFrame, int]:
    """``df`` (rows of ``partition``) without the rows of a product that another partition holds a
    later ``updated_at`` of, and how many those were. Such a row is an old copy, not bad data: a
    backfill of an old partition must not write what it says over what its newer copy gave, nor
    quarantine it. Without ``partition`` (a run over the whole table reading on from partitions'
    runs: ``df`` holds every row of some partitions and the changed rows of the others), the rows
    of a product that a row it does not read holds a later ``updated_at`` of. The table's other
    rows are read for their ids and times only, in Spark,
    and only the run's own products are grouped; the keys of the rows left out are staged
    (``staging/superseded``), so no stage reads the whole table again. Up to :data:`MAX_SEEN` of
    them are broadcast; more, and the partition's other rows are staged once (``staging/partition``)
    rather than each stage shuffling their photos through the join."""
    from pyspark.sql import functions as F

    if not {"product_id", "updated_at"} <= set(df.columns):  # the checkpoint names what is missing
        return df, 0
    every = catalog.read_products(spark, contract, require_columns=False)
    mine = df.select("product_id", F.unix_micros("updated_at").alias(_UNIX_MICROS))
    if partition is None:
        elsewhere = _without_rows(every, mine)
    else:
        elsewhere = every.filter(~F.col(partition.column).eqNullSafe(F.lit(partition.value).cast(
            every.schema[partition.column].dataType)))  # fmt: skip
    theirs = elsewhere.select("product_id", F.unix_micros("updated_at").alias("_at"))
    newest = (
        theirs.join(mine.select("product_id").distinct(), "product_id", "left_semi")
        .groupBy("product_id")
        .agg(F.max("_at").alias("_newer"))
    )
    old = mine.join(newest, "product_id").filter(F.col(_UNIX_MICROS) < F.col("_newer"))
    path = str(staging / "superseded")
    old.select("product_id", _UNIX_MICROS).write.mode("overwrite").parquet(path)
    keys = spark.read.parquet(path)
    count = keys.count()
    if not count:
        return df, 0
    if count <= MAX_SEEN:
        return _without_rows(df, F.broadcast(keys)), count
    _without_rows(df, keys).write.mode("overwrite").parquet(str(staging / "partition"))
    return spark.read.parquet(str(staging / "partition")), count


def _still_future(
    spark: SparkSession, df: DataFrame, listed: list[Any] | None, latest: dt.datetime | None
) -> tuple[DataFrame, list[tuple[str, int]]]:
    """``df`` without the rows the last run ``listed`` as quarantined for a stamp in the future
    (:data:`~catalog_enrichment.catalog.reports.FUTURE`) that still are, past ``latest``, and those
    rows' keys, for the next run: the ones still in ``df`` (a row fixed or deleted since leaves the
    list). None of them is left out where the last run could not list them, or without ``latest``."""
    from pyspark.sql import functions as F

    if not listed or latest is None or not {"product_id", "updated_at"} <= set(df.columns):
        return df, []
    ahead = [(str(p), int(at)) for p, at in listed if int(at) > _micros(latest)]
    if not ahead:
        return df, []
    keys = F.broadcast(spark.createDataFrame(ahead, _ROW_KEYS))
    with_us = df.withColumn(_UNIX_MICROS, F.unix_micros("updated_at"))
    present = with_us.join(keys, ["product_id", _UNIX_MICROS], "left_semi")
    still = sorted({(str(r[0]), int(r[1])) for r in present.select("product_id", _UNIX_MICROS).collect()})
    return (_without_rows(df, keys) if still else df), still


def _micros(at: dt.datetime) -> int:
    """``at`` in µs since the epoch, exactly (``unix_micros``)."""
    return (at - _EPOCH) // dt.timedelta(microseconds=1)


def _without_rows(df: DataFrame, keys: DataFrame) -> DataFrame:
    """``df`` without the rows whose (product id, ``updated_at`` in µs) ``keys`` holds (its columns
    ``product_id`` and ``_UNIX_MICROS``); the time compared exactly, with no time-zone trip."""
    from pyspark.sql import functions as F

    with_us = df.withColumn(_UNIX_MICROS, F.unix_micros("updated_at"))
    return with_us.join(keys, ["product_id", _UNIX_MICROS], "left_anti").select(*df.columns)


def check_driver_room(products: int) -> None:
    """Refuse, before anything is scored, a run of ``products`` valid rows whose decisions would
    not fit the driver's free memory (:data:`DRIVER_BYTES_PER_PRODUCT` each): a table this large
    gets its first values a partition at a time, and the nightly after reads on from there.

    Raises:
        CatalogEnrichError: what the run would hold, what is free, and what to do instead.
    """
    from catalog_enrichment.catalog.embedded import available_memory

    need, free = products * DRIVER_BYTES_PER_PRODUCT, available_memory()
    if need > free:
        raise CatalogEnrichError(
            f"this run would score {products:,} products and hold their decisions on the driver, about "
            f"{need / 2**30:.1f} GB, with {free / 2**30:.1f} GB free: nothing was scored or written. Run "
            "catalog-enrich backfill (a partition at a time; the nightly after it reads on from the "
            "partitions' runs), or give the driver more memory"
        )


def describe_window(got: Read) -> str:
    """What a run read, for its progress line."""
    window = f"changed since {got.since - got.lookback:%Y-%m-%d %H:%M:%S}" if got.since else "full"
    if got.retry:
        window += f", {len(got.retry):,} products quarantined for their image tried again"
    return window


def _unseen(spark: SparkSession, df: DataFrame, seen: list[tuple[str, int]]) -> tuple[DataFrame, int]:
    """``df`` without the (product id, ``updated_at``) rows the last run already read, nor the rows
    older than a copy of their product it read - an old copy committed late, inside the look-back,
    whose newer copy's values the last run wrote and must stand - and how many of those there were
    (a row without a time is kept: validation quarantines it)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    if not seen or not {"product_id", "updated_at"} <= set(df.columns):
        return df, 0  # no such column: the checkpoint names it
    schema = StructType([StructField("product_id", StringType()), StructField(_UNIX_MICROS, LongType())])
    done = spark.createDataFrame(seen, schema)
    fresh = _without_rows(df, F.broadcast(done)).withColumn(_UNIX_MICROS, F.unix_micros("updated_at"))
    newest = F.broadcast(done.groupBy("product_id").agg(F.max(_UNIX_MICROS).alias("_newer")))
    older = F.col(_UNIX_MICROS) < F.col("_newer")
    late = fresh.join(newest, "product_id").filter(older).count()
    if late:
        fresh = fresh.join(newest, "product_id", "left").filter(~F.coalesce(older, F.lit(False)))
    return fresh.select(*df.columns), late


def _older_retried(spark: SparkSession, df: DataFrame, retry: list[str]) -> tuple[DataFrame, int]:
    """``df`` without the copies of a product to ``retry`` older than its newest one there, and how
    many those were. A product is tried again by its id, which reads every copy of it (an old copy
    edited since into a later day's partition too): such a copy is not new bad data - the run that
    first read it judged it - and, counted again, would trip the circuit breaker each night the
    retries last. Copies tied at the newest time are kept (``product_id_unique`` fails them)."""
    from pyspark.sql import functions as F

    if not retry or not {"product_id", "updated_at"} <= set(df.columns):
        return df, 0
    ids = F.broadcast(spark.createDataFrame([(p,) for p in retry], "product_id string"))
    mine = df.select("product_id", F.unix_micros("updated_at").alias(_UNIX_MICROS)).join(
        ids, "product_id", "left_semi"
    )
    newest = mine.groupBy("product_id").agg(F.max(_UNIX_MICROS).alias("_newer"))
    old = mine.join(newest, "product_id").filter(F.col(_UNIX_MICROS) < F.col("_newer"))
    rows = old.select("product_id", _UNIX_MICROS).collect()  # a few copies of the retried products
    if not rows:
        return df, 0
    keys = sorted({(r[0], int(r[1])) for r in rows})
    schema = "product_id string, " + _UNIX_MICROS + " long"
    return _without_rows(df, F.broadcast(spark.createDataFrame(keys, schema))), len(rows)


def near_watermark(got: Read, watermark: dt.datetime | None) -> list[tuple[str, int]] | None:
    """(product id, ``updated_at`` in µs) of the rows read - by this run or the last - that the next
    run's look-back reads again; ``None`` when more than :data:`MAX_SEEN` (the next run reads them).
    When the last run kept none (``seen`` is None), this run read the whole look-back itself."""
    from pyspark.sql import functions as F

    if watermark is None or not got.lookback:
        return []
    mark = _micros(watermark)  # rows after it (stamped in the future) are read again
    edge = _micros(watermark - got.lookback)
    rows = (
        got.df.where(F.col("product_id").isNotNull() & F.unix_micros("updated_at").between(edge + 1, mark))
        .select("product_id", F.unix_micros("updated_at").alias(_UNIX_MICROS))
        .distinct()
        .limit(MAX_SEEN + 1)
        .collect()
    )
    near = sorted({*(p for p in got.seen or [] if p[1] > edge), *((r[0], int(r[1])) for r in rows)})
    return near if len(near) <= MAX_SEEN else None


@dataclass(frozen=True)
class Validated:
    """The rows with their failed rules (``_reasons``), the counts, and the watermark the rows give
    (never past the run's start)."""

    checked: DataFrame
    counts: ValidationCounts
    watermark: dt.datetime | None
    repeated: int = 0  # rows read more than once, the same row each time: read once (not counted)


def validate(df: DataFrame, rules: list[Rule], started_at: dt.datetime, say: Say) -> Validated:
    """Count every rule and find the duplicates (one pass), mark each row. A row read more than
    once, the same each time (a replayed file), is read once: the copies are counted again without
    the repeats (a second pass, only where there are repeats)."""
    counts, duplicates = count_rows(df, rules)
    repeated = repeated_rows(duplicates)
    extra = int(pc.sum(repeated["_rows"]).as_py() or 0) - repeated.num_rows
    if extra:
        df = read_once(df, repeated)
        counts, duplicates = count_rows(df, rules)
        say(f"  {extra:,} rows repeated the row of the same product and time exactly: each read once")
    # never past the run's start: a row stamped in the future (quarantined beyond the allowed clock
    # skew) must not make every later incremental run skip the products changed in between
    watermark = None if counts.watermark is None else min(counts.watermark, started_at)
    say(f"  validated {counts.rows_read:,} rows: {counts.rows_invalid:,} invalid ({counts.top_rules()})")
    return Validated(check_rows(df, rules, latest=latest_copies(duplicates)), counts, watermark, extra)


def future_next(got: Read, validated: Validated) -> list[tuple[str, int]] | None:
    """(product id, ``updated_at`` in µs) of the rows quarantined as stamped in the future
    (``updated_at_not_in_future``), this run's and those it left unread (``got.future``), for the
    next run to leave unread while they still are; None when more than :data:`MAX_SEEN` (the next
    run reads them again). A row without a product id is not listed: it is read again."""
    from pyspark.sql import functions as F

    if not validated.counts.per_rule.get(IN_FUTURE):
        return sorted(got.future)
    rows = (
        validated.checked.where(F.array_contains(REASONS, IN_FUTURE) & F.col("product_id").isNotNull())
        .select("product_id", F.unix_micros("updated_at"))
        .distinct()
        .limit(MAX_SEEN + 1)
        .collect()
    )
    listed = sorted({*got.future, *((str(r[0]), int(r[1])) for r in rows)})
    return listed if len(listed) <= MAX_SEEN else None


@dataclass(frozen=True)
class Scored:
    """The staged decisions of the valid rows, and the scoring stage's counters (with the embedding
    store: the model's encoder fingerprint, products fused from stored vectors and encoded); the
    placeholders found among the images read (``shared``: digest -> products quarantined for it)."""

    table: pa.Table
    model_loads: dict[int, int]
    arrow_batches: int
    encoder: str | None = None
    reused: int = 0
    encoded: int = 0
    health: HealthTally = field(default_factory=HealthTally)  # the run health counts (health.py)
    shared: dict[str, int] = field(default_factory=dict)
    shared_counted: bool = False  # the counts still hold the ``shared`` products (score)
    store_error: str | None = None  # why the store could not be read (every product was encoded)


def scoring_spec(
    spark: SparkSession,
    model: ModelVersion,
    taxonomy: Taxonomy,
    inference: InferenceConfig,
    images: ImagePolicy,
    rejected: Iterable[tuple[str, str, str]] = (),
    retried: Iterable[str] = (),
    placeholders: Iterable[str] = (),
) -> ScoringSpec:
    """What the executors score with: ``model``'s bundle shipped to them, ``inference``'s settings,
    images read under ``images``; the (product, attribute, value)s in ``rejected`` never written;
    the products ``retried`` for their photo (:attr:`ScoringSpec.retried`); no stored vector fused
    whose image bytes are one of ``placeholders`` (found by earlier runs)."""
    return ScoringSpec(
        bundle_name=ship_bundle(spark, model.bundle),
        bundle_path=None,
        allowed_taxonomy=taxonomy.to_dict(),
        device=inference.device,
        torch_threads=inference.torch_threads,
        predictor=PredictorOptions(
            **inference.predictor_options(),
            image_policy=images,
            placeholders=frozenset(placeholders),
        ),
        rejected=_by_product(rejected),
        retried=frozenset(retried),
    )


def score(
    spark: SparkSession,
    checked: DataFrame,
    spec: ScoringSpec,
    staging: Path,
    *,
    store: tuple[Catalog, str] | None = None,
    max_products_per_image: int = 0,
    placeholders: Iterable[str] = (),
) -> Scored:
    """Score and decide the valid rows on the executors as ``spec`` says (:func:`scoring_spec`);
    stage the decisions; read them back. The same image bytes read for more than
    ``max_products_per_image`` products (a placeholder behind their own URLs, which validation
    cannot see), or bytes with a digest of ``placeholders`` (found by earlier runs) on however
    few, fail those products as :data:`IMAGE_SHARED`: nothing written for them, no vector stored,
    and later runs read them again.

    With the embedding store (``store``: the catalog and the model's encoder fingerprint), the valid
    rows are joined to the catalog's stored vectors of the model's encoders first, and the vectors
    the tasks computed stay in the staged scores for :func:`store_embeddings`. A store that cannot
    be read (a file of it lost or cut short) is a cache lost: every product is encoded, and why is
    kept in ``store_error``.
    """
    from pyspark.sql import functions as F

    encoder = None if store is None else store[1]
    counters = ScoringCounters.create(spark)
    valid = checked.where(F.size(REASONS) == 0)
    stored, store_error = None, None
    try:
        stored = None if store is None else store[0].stored_embeddings(spark, store[1], valid)
    except Exception as exc:
        store_error = redact_text(f"{type(exc).__name__}: {' '.join(str(exc).split())}")[:500]
    if stored is not None:
        valid = valid.join(stored, "product_id", "left")
    scores = staging / "scores"
    score_dataframe(valid, spec, counters).write.mode("overwrite").parquet(str(scores))
    table = ds.dataset(str(scores), format="parquet").to_table(columns=list(DECISION_COLUMNS))
    shared: dict[str, int] = {}
    health, counted = counters.health.value, False
    found = shared_images(table["product_id"], table["image_digest"], max_products_per_image, placeholders)
    if found:
        mark_shared_images(spark, scores, sorted(found))
        table = ds.dataset(str(scores), format="parquet").to_table(columns=list(DECISION_COLUMNS))
        marked = table.filter(pc.equal(table["image_error"], IMAGE_SHARED))
        shared = dict(Counter(marked["image_digest"].to_pylist()))
        # the run health judges what is written: the placeholders' products were counted as scored
        read = dict(zip(marked["product_id"].to_pylist(), marked["image_digest"].to_pylist(), strict=True))
        less = _without_placeholders(spark, valid, spec, read, health)
        counted, health = less is None, health if less is None else less
    return Scored(
        table,
        dict(counters.loads.value),
        int(counters.batches.value),
        encoder,
        int(counters.reused.value),
        int(counters.encoded.value),
        health,
        shared,
        counted,
        store_error,
    )


def _without_placeholders(
    spark: SparkSession, valid: DataFrame, spec: ScoringSpec, read: dict[str, str], health: HealthTally
) -> HealthTally | None:
    """``health`` less what the scoring tasks counted for the products ``read`` (product id -> the
    placeholder's digest): their rows of ``valid`` scored again, the same way (the scores, and so
    the counts, are deterministic). Where a photo reads other bytes the second time (the CDN came
    back meanwhile), the counts would not be the same ones: None, ``health`` to be kept whole (its
    checks may then block the night, the safe side), and the log says so."""
    from pyspark.sql import functions as F

    again = ScoringCounters.create(spark)
    ids = spark.createDataFrame([(p,) for p in sorted(read)], "product_id string")
    rows = valid.join(F.broadcast(ids), "product_id", "left_semi")
    scored = score_dataframe(rows, spec, again).select("product_id", "image_digest").collect()
    if {r["product_id"]: r["image_digest"] for r in scored} != read:
        logging.getLogger(__name__).warning(
            "the placeholders' photos read other bytes when scored again: the run health counts them"
        )
        return None
    return health.without(again.health.value)


def _by_product(rejected: Iterable[tuple[str, str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for pid, attr, value in sorted(rejected):
        out.setdefault(pid, []).append(f"{attr}={value}")
    return out


@dataclass(frozen=True)
class Decisions:
    """What the run writes: values, pairs (scored, or ``settled`` by a merchant's value:
    :func:`flatten_scores`), quarantine rows; the counts with the image rules added; the rows
    scored, valid and quarantined (every row read is one or the other)."""

    values: pa.Table
    pairs: pa.Table
    quarantine: pa.Table
    counts: ValidationCounts
    rows_scored: int
    unscored: pa.Table | None = None  # the settled pairs of products quarantined before scoring

    @property
    def rows_valid(self) -> int:
        return self.counts.rows_read - self.counts.rows_invalid


def collect_decisions(
    scored: pa.Table, validated: Validated, run_id: str, unscored: pa.Table | None = None
) -> Decisions:
    """The rows the run writes: the values and scored pairs of the products whose image decoded, the
    pairs a merchant's value settles (:func:`flatten_scores`; ``unscored``: those of products
    quarantined before scoring, :func:`settled_unscored`), and the quarantine rows of the products
    whose image did not decode and of the rows that broke a rule.

    Raises:
        CatalogEnrichError: a row read is neither valid nor quarantined (nothing is written).
    """
    from pyspark.sql import functions as F

    image_errors = scored.filter(pc.is_valid(scored["image_error"]))
    image_reasons = dict(
        zip(image_errors["product_id"].to_pylist(), image_errors["image_error"].to_pylist(), strict=True)
    )
    counts = validated.counts
    reasons = Counter(image_reasons.values())
    per_rule = dict(counts.per_rule)
    for reason, n in reasons.items():  # image_shared is found before scoring and after reading
        per_rule[reason] = per_rule.get(reason, 0) + n
    total = ValidationCounts(
        counts.rows_read,
        counts.rows_invalid + len(image_reasons),
        per_rule,
        counts.watermark,
        counts.held + reasons[IMAGE_SHARED],  # a placeholder read is not bad data: outside the breaker
    )
    good = scored.filter(pc.is_null(scored["image_error"]))
    values, pairs = flatten_scores(scored)
    if unscored is not None and unscored.num_rows:
        pairs = pa.concat_tables([pairs, unscored.cast(pairs.schema)])
    schema = load_contract("quarantine").arrow_schema()
    quarantine = schema.empty_table()
    if total.rows_invalid:  # else nothing to collect: no Spark job for it
        bad = validated.checked.where((F.size(REASONS) > 0) | F.col("product_id").isin(list(image_reasons)))
        quarantine = quarantine_rows(bad, run_id, dt.datetime.now(dt.UTC), schema, image_reasons)
    decisions = Decisions(values, pairs, quarantine, total, good.num_rows, unscored)
    valid = decisions.rows_valid
    if valid + quarantine.num_rows != total.rows_read or good.num_rows != valid:
        raise CatalogEnrichError(
            f"row accounting broke: read {total.rows_read} != valid {valid} (decided "
            f"{good.num_rows}) + quarantined {quarantine.num_rows}; nothing was written"
        )
    return decisions


def flatten_scores(scored: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Flatten staged decisions into value rows and the run's (product, attribute) pairs: those it
    scored and, marked ``settled``, those a merchant's value settles (their model values go). The
    values and scored pairs are those of the products whose image was read (``image_error`` null);
    the settled pairs those of every product, one quarantined for its image too (its merchant's
    values need none)."""
    good = scored.filter(pc.is_null(scored["image_error"]))
    ids = good["product_id"].combine_chunks()
    value_lists = good["values"].combine_chunks()
    flat = value_lists.flatten()
    values = pa.table(
        {
            "product_id": ids.take(pc.list_parent_indices(value_lists)),
            **{k: flat.field(k) for k in ("attribute", "value", "confidence", "threshold")},
        }
    )
    pairs = pa.concat_tables(
        [_pairs_in(good, "scored", settled=False), _pairs_in(scored, "settled", settled=True)]
    )
    return values, pairs


def settled_unscored(validated: Validated, policy: DecisionPolicy) -> pa.Table:
    """The (product, attribute) pairs, ``settled``, a merchant's value settles on the products
    quarantined before scoring only as placeholders (:data:`IMAGE_SHARED`: the same image on too
    many products, or one an earlier run found so): their model values go, as those of a product
    whose photo scoring could not use (:func:`flatten_scores`). One Spark job, on nights with such
    products only."""
    from pyspark.sql import functions as F

    pairs = pa.schema([("product_id", pa.string()), ("attribute", pa.string()), ("settled", pa.bool_())])
    checked = validated.checked
    if not validated.counts.per_rule.get(IMAGE_SHARED) or "merchant_attributes" not in checked.columns:
        return pairs.empty_table()
    only = (F.size(REASONS) == 1) & F.array_contains(REASONS, IMAGE_SHARED) & F.col("product_id").isNotNull()
    rows = checked.where(only).select("product_id", "merchant_attributes").toArrow()
    products, attributes = np.nonzero(policy.settled(policy.filled(rows["merchant_attributes"])))
    names = pa.array(policy.taxonomy.names, pa.string())
    settled = pa.repeat(pa.scalar(True), len(products))
    return pa.table([rows["product_id"].take(products), names.take(attributes), settled], schema=pairs)


def _pairs_in(scored: pa.Table, column: str, *, settled: bool) -> pa.Table:
    """The (product, attribute) pairs the list column ``column`` of staged decisions names, and
    whether they are the ``settled`` ones."""
    lists = scored[column].combine_chunks()
    attributes = lists.flatten()
    return pa.table(
        {
            "product_id": scored["product_id"].combine_chunks().take(pc.list_parent_indices(lists)),
            "attribute": attributes,
            "settled": pa.repeat(pa.scalar(settled), len(attributes)),
        }
    )


def _quarantined_only_for(quarantine: pa.Table, transient: set[str]) -> list[str]:
    """Ids of the products quarantined only for reasons in ``transient``."""
    ids, reasons_of = quarantine["product_id"].to_pylist(), quarantine["reasons"].to_pylist()
    rows = zip(ids, reasons_of, strict=True)
    return [p for p, reasons in rows if p is not None and reasons and set(reasons) <= transient]


def new_rows(decisions: Decisions, retry: dict[str, int]) -> ValidationCounts:
    """The counts without the retried products whose image still could not be read: an image
    host still down is not a new batch of bad rows (and a quiet night's only rows may be those).
    (Placeholders are outside the breaker already: ``held``.)"""
    unread = _quarantined_only_for(decisions.quarantine, {IMAGE_READABLE})
    again = sum(pid in retry for pid in unread)
    counts = decisions.counts
    return ValidationCounts(
        counts.rows_read - again, counts.rows_invalid - again, counts.per_rule, counts.watermark, counts.held
    )


def photos_quarantined(
    quarantine: pa.Table, scored: pa.Table, retry: Collection[str], shared_counted: bool = False
) -> int:
    """The products quarantined for their photo alone (a placeholder's, found by validation or by
    the scoring), which the run health's counts leave out, but those read again for one (``retry``:
    they have a photo by that choice, which the image check does not count); ``scored``: the staged
    decisions (a photo the scoring found unreadable was counted there, and so was a placeholder it
    found where ``shared_counted``: :attr:`Scored.shared_counted`)."""
    found = pc.is_valid(scored["image_error"])
    if not shared_counted:  # the placeholders the scoring found were taken out of its counts (score)
        found = pc.and_(found, pc.not_equal(scored["image_error"], IMAGE_SHARED))
    counted = set(scored.filter(found)["product_id"].to_pylist())
    pairs = zip(quarantine["product_id"].to_pylist(), quarantine["reasons"].to_pylist(), strict=True)
    return sum(reasons == [IMAGE_SHARED] and p not in retry and p not in counted for p, reasons in pairs)


def image_outages(
    scored: pa.Table, min_products: int, retried: Collection[str] = frozenset()
) -> tuple[dict[str, int], set[str]]:
    """The image sources (``image_source`` of the staged decisions: a URI's scheme, host and port)
    out tonight, each with its products whose photo could not be read or was a placeholder, and
    those products' ids. A source is out when the run could use none of its photos and at least
    ``min_products`` of them failed so that were not ``retried`` (0: none is ever out): a host down,
    or a CDN answering every URL with its outage image, says nothing of those products' own photos.
    The products read again for their photo are no evidence of an outage: ten dead links would
    otherwise keep their host out, and themselves retried, for good. Products fused from a stored
    vector read no photo and have no source."""
    if not min_products or not scored.num_rows:
        return {}, set()
    error, source = scored["image_error"], scored["image_source"]
    failed = pc.fill_null(pc.is_in(error, pa.array([IMAGE_READABLE, IMAGE_SHARED])), False)
    again = pc.is_in(scored["product_id"], pa.array(list(retried), pa.string()))
    per_source = (
        pa.table(
            {
                "source": source,
                "used": pc.and_(pc.is_null(error), pc.is_valid(scored["image_digest"])),
                "failed": pc.and_(failed, pc.invert(pc.fill_null(again, False))),
            }
        )
        .filter(pc.is_valid(source))
        .group_by("source")
        .aggregate([("used", "any"), ("failed", "sum")])
    )
    rows = zip(*(per_source[c].to_pylist() for c in ("source", "used_any", "failed_sum")), strict=True)
    out = [source for source, used, n in rows if not used and n >= min_products]
    if not out:
        return {}, set()
    hit = scored.filter(pc.and_(failed, pc.fill_null(pc.is_in(source, pa.array(out)), False)))
    return dict(Counter(hit["image_source"].to_pylist())), set(hit["product_id"].to_pylist())


def retry_next(
    quarantine: pa.Table,
    retry: dict[str, int],
    cap: int,
    uncounted: Collection[str] = frozenset(),
    limit: int = MAX_SEEN,
) -> tuple[list[tuple[str, int]], int]:
    """(product id, attempts) of the products quarantined only because their image could not be
    read or was a placeholder, which the next run reads again while their attempts stay within
    ``cap``; and how many more there were than the ``limit`` a run lists (the next read filters on
    the list, carried in the run report): those with the most attempts, then the highest ids, are
    left out and wait, as a product past ``cap`` does, until they change. Tonight is no attempt for
    the ``uncounted`` ones (their image source was out: :func:`image_outages`); ``cap`` 0 retries
    none."""
    if not cap:
        return [], 0
    transient = _quarantined_only_for(quarantine, {IMAGE_READABLE, IMAGE_SHARED})
    attempts = [(pid, retry.get(pid, 0) + (pid not in uncounted)) for pid in transient]
    due = sorted(((n, pid) for pid, n in attempts if n <= cap))
    return sorted((pid, n) for n, pid in due[:limit]), max(0, len(due) - limit)


def run_write(
    run_id: str,
    model: ModelVersion,
    written_at: dt.datetime,
    rejected: Iterable[tuple[str, str, str]],
    decisions: Decisions | None = None,
    staging: Path | None = None,
    blocked: Sequence[str] = (),
    taxonomy: Taxonomy | None = None,
) -> RunWrite:
    """What the run commits: its decisions and the removal of the values people rejected for its
    version; without decisions (nothing to score) only that removal. The ``blocked`` attributes
    (run health) are left as the catalog holds them: neither their values nor their scored pairs
    are written (and the backend stages from ``values``, not from the staged scores); the pairs a
    merchant's value settles lose their model values all the same (never one beside the
    merchant's). ``taxonomy``: the configured one, whose
    :meth:`~catalog_enrichment.contracts.Taxonomy.held_together` has a merchant row of an attribute
    in the catalog hold the others linked to it (None: each holds only its own)."""
    if decisions is None:
        strings = [pa.field(k, pa.string()) for k in ("product_id", "attribute", "value")]
        values = pa.schema(
            [*strings, ("confidence", pa.float64()), ("threshold", pa.float64())]
        ).empty_table()
        pairs = pa.schema([*strings[:2], ("settled", pa.bool_())]).empty_table()
        quarantine = load_contract("quarantine").arrow_schema().empty_table()
    else:
        values, pairs, quarantine = decisions.values, decisions.pairs, decisions.quarantine
    if blocked:
        out = pa.array(list(blocked), pa.string())
        values = values.filter(pc.invert(pc.is_in(values["attribute"], out)))
        pairs = pairs.filter(pc.or_(pairs["settled"], pc.invert(pc.is_in(pairs["attribute"], out))))
        staging = None
    rows = sorted(rejected)
    return RunWrite(
        run_id=run_id,
        model_name=model.name,
        model_version=model.version,
        written_at=written_at,
        values=values,
        pairs=pairs.select(["product_id", "attribute"]),
        quarantine=quarantine,
        unscored=None
        if decisions is None or decisions.unscored is None
        else decisions.unscored.select(["product_id", "attribute"]),
        scores=None if staging is None else str(staging / "scores"),
        retract=pa.table(
            {
                k: pa.array([r[i] for r in rows], pa.string())
                for i, k in enumerate(("product_id", "attribute", "value"))
            }
        ),
        linked={} if taxonomy is None else taxonomy.held_together(),
    )


def store_embeddings(
    spark: SparkSession, catalog: Catalog, scored: Scored, staging: Path, run_id: str, say: Say
) -> dict[str, Any]:
    """After the commit: the vectors this run computed (staged beside its scores) into the store,
    and the run summary's record of it. The store is a cache, so a failure here is reported and
    costs the next run the encoding; the committed run stands."""
    try:
        stored = 0
        if scored.encoded and scored.encoder is not None:
            vectors = staging / "embeddings"
            stage_vectors(spark.read.parquet(str(staging / "scores")), scored.encoder, run_id, vectors)
            stored = catalog.write_embeddings(str(vectors), spark)
    except Exception as exc:
        error = redact_text(f"{type(exc).__name__}: {exc}")[:500]
        say(f"  could not store this run's embeddings (the next run encodes them again): {error}")
        return {"embeddings_store_error": scored.store_error or error}
    say(
        f"  embeddings: {scored.reused:,} products fused from the store, {scored.encoded:,} encoded, "
        f"{stored:,} stored"
    )
    if scored.store_error is not None:
        return {"embeddings_stored": stored, "embeddings_store_error": scored.store_error}
    return {"embeddings_stored": stored}
