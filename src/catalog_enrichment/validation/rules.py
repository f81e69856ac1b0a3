"""Row-level validation of the products table on Spark: every failing row and every rule it broke.

The rules come from the products contract (``schemas/products.yaml``: non-null and unique columns)
and the validation config (length limits, the clock skew, the earliest ``updated_at``), plus rules
about content the contract's types cannot say: an id must not be blank (nothing but whitespace and
invisible format characters) or hold control characters, a title must be text (not blank, not a
missing value written out - ``nan``, ``<NA>``, ``N/A``, ``NULL`` - nor a stringified number or
object, no control characters), text a Python worker decodes must be UTF-8. A description written
as a missing value is no quarantine reason (a product may have none): the run health counts it as
none (:data:`~catalog_enrichment.health.profile.MISSING_TEXT`). Each rule is one Spark column
expression (no Python UDF), so checking costs one pass; the same rules become the Great Expectations
suite (:mod:`.suite`; UTF-8 has no expectation there).

Image rules (``image_decodable``, ``image_readable``, ``image_within_limits``,
``image_uri_allowed``) need the bytes read or decoded; the scoring pass does that anyway, so the
predictor reports them and the job quarantines those rows there (one decode per image, not two);
so does ``scores_finite``, a product the model scored NaN or infinite (a model fault).
A product with *no* image is valid and is scored as imageless. One image rule is decided before
scoring, by other rows: ``image_shared`` (:func:`shared_image_rules`), the same image bytes (or the
same ``image_uri``) on more than ``validation.max_products_per_image`` products of the run - what an
image CDN serves during an outage, or a "no image" tile - which is not those products' photo. It is
a *transient* rule: such rows are quarantined, read again by the next runs and kept out of the
circuit breaker's count (they are not bad data, and the rule already keeps every one of them out).

Duplicates: of the rows sharing a ``product_id`` the one with the latest ``updated_at`` is kept;
older copies fail ``product_id_unique``; rows tied at the latest time all fail it (which one is
right cannot be known), so nothing is silently picked. That rule is the only one that needs other
rows: :func:`count_rows` counts every rule and lists the duplicated ids in one pass (a small Arrow
table on the driver), and :func:`check_rows` joins them back to mark each row.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_enrichment.config import ValidationConfig
from catalog_enrichment.contracts import IMAGE_KEY, IMAGE_SHARED, UNREADABLE, Contract
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.health.profile import MISSING_TEXT

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

__all__ = [
    "IN_FUTURE",
    "REASONS",
    "CircuitBreakerTripped",
    "Rule",
    "ValidationCounts",
    "add_duplicates",
    "build_rules",
    "check_breaker",
    "check_rows",
    "count_rows",
    "latest_copies",
    "quarantine_rows",
    "read_once",
    "repeated_rows",
    "shared_image_rules",
    "stale_copies",
    "text_failures",
]

REASONS = "_reasons"
IN_FUTURE = "updated_at_not_in_future"  # a row stamped past the run's start and the clock skew
# Titles that are a stringified non-text value: a missing value written out (nan, None, <NA>, N/A,
# NULL: MISSING_TEXT), booleans, numbers, objects and lists - from a
# bracket to its kind's closing one, with no words between a closing bracket and a later opening
# one, so a title with bracketed words ("[NEW] Summer dress [Size M]") is text. Only single
# characters repeat (Java's regex recurses once per repetition of a group: a long title would
# overflow the stack of the Spark task), each checked once (linear in the title's length).
# (?U): \s is Unicode's White_Space (a title of no-break spaces is blank too)
NOT_TEXT_REGEX = (
    rf"(?iU)^\s*({MISSING_TEXT}|true|false|\[object object\]"
    r"|[-+]?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?"
    r"|\{(?!.*\}\s*[^\s,\[\]{}][^{}]*\{).*\}|\[(?!.*\]\s*[^\s,\[\]{}][^\[\]]*\[).*\])\s*$"
)
# Unicode's format characters (category Cf: zero-width spaces and joiners, the byte order mark, bidi
# marks, the soft hyphen, tags...), invisible: written out as of Unicode 15 (Java's \p{Cf} and
# Python's tables follow their own, older, versions), as characters (Java writes one beyond the BMP
# \x{...}, Python \U...)
FORMAT_CHARS = (
    "\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)
BLANK_REGEX = rf"(?U)^[\s{FORMAT_CHARS}]*$"  # nothing but whitespace and format characters
ID_CONTROL_REGEX = r"[\x00-\x1f\x7f-\x9f]"  # Unicode's controls (Cc): C0, DEL and C1
TEXT_CONTROL_REGEX = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"  # tab, line feed, carriage return allowed
# Text columns a Python worker decodes (the model's inputs, the key, the run health's category and
# the merchant's attribute names and values): bytes that are not UTF-8 would fail the worker's whole
# task, so such rows are quarantined first.
UTF8_COLUMNS = ("product_id", "title", "description", "image_uri", "category")
UTF8_MAP = "merchant_attributes"


# the same title rules for Python's re, whose \s is Unicode's whitespace without the U flag
_BLANK = re.compile(BLANK_REGEX.replace("(?U)", ""))
_NOT_TEXT = re.compile(NOT_TEXT_REGEX.replace("(?iU)", "(?i)"))
_TEXT_CONTROL = re.compile(TEXT_CONTROL_REGEX)


def text_failures(
    titles: Sequence[str | None], descriptions: Sequence[str | None], cfg: ValidationConfig
) -> list[tuple[str, ...]]:
    """The title and description rules each product breaks, as the enrichment job's row rules
    name them (empty: none), in Python: the run health checks' input baseline leaves such products
    out, as the job quarantines them before any night's checks count. A title past
    ``max_title_length`` is not matched further (the job's regexes read it whole)."""
    out = []
    for title, description in zip(titles, descriptions, strict=True):
        broken: list[str] = []
        if title is None:
            broken.append("title_not_null")
        elif len(title) > cfg.max_title_length:
            broken.append("title_max_length")
        else:
            broken += [
                name
                for name, pattern in (
                    ("title_not_empty", _BLANK),
                    ("title_is_text", _NOT_TEXT),
                    ("title_no_control_chars", _TEXT_CONTROL),
                )
                if pattern.search(title)
            ]
        if description is not None and len(description) > cfg.max_description_length:
            broken.append("description_max_length")
        out.append(tuple(broken))
    return out


@dataclass(frozen=True)
class Rule:
    """One validation rule: a name (the quarantine reason), the Spark test that a row *fails* it,
    and the Great Expectations expectation that checks the same thing on the whole table."""

    name: str
    description: str
    column: str
    fails: Callable[[], Any]  # () -> pyspark Column, true where the row breaks the rule
    expectation: Callable[[], Any] | None  # () -> great_expectations Expectation
    across_rows: bool = False  # decided by other rows too (the duplicates), not by the row alone
    transient: bool = False  # read again by the next runs; outside the circuit breaker


def build_rules(
    contract: Contract, cfg: ValidationConfig, started_at: dt.datetime, columns: Sequence[str] = ()
) -> list[Rule]:
    """The products contract's rules, in a fixed order; ``started_at`` (the run's start) bounds
    ``updated_at`` from above; ``columns`` (the read's columns) add ``<column>_readable`` for each
    contract column the source marks with :data:`~catalog_enrichment.contracts.UNREADABLE`."""
    return [
        *_required_and_unique(contract),
        *_text_rules(cfg),
        *_time_rules(cfg, started_at),
        *_readable_rules(contract, columns),
    ]


MAX_SHARED_IMAGES = 1000  # placeholders named in one run at most (each is on many products)


def shared_image_rules(
    df: DataFrame, limit: int, known: Iterable[str] = ()
) -> tuple[list[Rule], dict[str, int]]:
    """``[image_shared]`` when an image is on more than ``limit`` distinct products of ``df`` (one
    Spark job reading the image bytes: their SHA-256, or the ``image_uri`` of a row without bytes),
    or is one of ``known`` (images an earlier run found on more: :func:`_image_key`'s keys) on
    however few; ``[]`` when none is (or ``limit`` is 0: the rule is off), so a clean run's other
    passes read no image for it. With the rules, the images found (at most
    :data:`MAX_SHARED_IMAGES`, the known then the most used first) and their products, also named
    in the rule's description for the run's log."""
    from pyspark.sql import functions as F

    if not limit or not {"image", "image_uri"} & set(df.columns):
        return [], {}
    again = F.col("_image").isin(sorted(set(known)))
    counted = (
        df.where(F.col("product_id").isNotNull())
        .select("product_id", _image_key(df.columns).alias("_image"))
        .where(F.col("_image").isNotNull())
        .groupBy("_image")
        .agg(F.countDistinct("product_id").alias("_products"))
        .where((F.col("_products") > limit) | again)
        .orderBy(again.desc(), F.desc("_products"), "_image")  # the known on however few kept
        .limit(MAX_SHARED_IMAGES)
        .collect()
    )
    if not counted:
        return [], {}
    found = {r["_image"]: int(r["_products"]) for r in counted}
    keys = list(found)
    named = ", ".join(f"{k[:16]}… on {n:,}" for k, n in list(found.items())[:3])
    rule = Rule(
        IMAGE_SHARED,
        f"the image is on more than {limit} products of the run, or an earlier run found it so: a "
        f"placeholder ({named})",
        "image",
        lambda: _image_key(df.columns).isin(keys),
        None,  # decided by other rows; GX has no expectation for it
        transient=True,
    )
    return [rule], found


def _image_key(columns: Sequence[str]) -> Any:
    """A row's image: its bytes' key (:func:`~catalog_enrichment.contracts.image_key`), else
    ``uri:<image_uri>``, else null. Empty bytes (the scoring pass fails them as undecodable) and
    an empty ``image_uri`` (it reads none) name no image to count."""
    from pyspark.sql import functions as F

    parts = []
    if "image" in columns:
        image = F.col("image")
        parts.append(F.when(F.length(image) > 0, F.concat(F.lit(IMAGE_KEY), F.sha2(image, 256))))
    if "image_uri" in columns:
        parts.append(F.when(F.col("image_uri") != "", F.concat(F.lit("uri:"), F.col("image_uri"))))
    return F.coalesce(*parts)


def _gxe() -> Any:
    import great_expectations.expectations as expectations

    return expectations


def _required_and_unique(contract: Contract) -> list[Rule]:
    """The contract's required columns, and its primary key's uniqueness (stale copies fail it)."""
    from pyspark.sql import functions as F

    rules = [
        Rule(
            f"{s.name}_not_null",
            f"{s.name} is required",
            s.name,
            _null_test(s.name),
            _null_expectation(s.name),
        )
        for s in contract.fields
        if not s.nullable
    ]
    if contract.primary_key:
        key = contract.primary_key[0]
        rules.append(
            Rule(
                f"{key}_unique",
                f"{key} appears on more than one row (older copies are quarantined)",
                key,
                lambda: F.col("_dup_stale"),
                lambda: _gxe().ExpectColumnValuesToBeUnique(column=key),
                across_rows=True,
            )
        )
    return rules


def _text_rules(cfg: ValidationConfig) -> list[Rule]:
    """Ids and titles that are text (not blank, not a stringified value, no control characters),
    within their lengths, and every text column a worker decodes valid UTF-8."""
    return [
        _matches(
            "product_id_not_blank",
            "product_id is empty or only whitespace and invisible format characters",
            "product_id",
            BLANK_REGEX,
        ),
        _longer("product_id", cfg.max_id_length),
        _matches(
            "product_id_no_control_chars",
            "product_id holds control characters",
            "product_id",
            ID_CONTROL_REGEX,
        ),
        _matches(
            "title_not_empty",
            "title is blank (only whitespace and invisible format characters)",
            "title",
            BLANK_REGEX,
        ),
        _matches(
            "title_is_text",
            "title is a stringified non-text value (a missing value written out - nan, None, <NA>, "
            "N/A, NULL -, a number, an object)",
            "title",
            NOT_TEXT_REGEX,
        ),
        _matches(
            "title_no_control_chars",
            "title holds control characters (other than tab and line breaks)",
            "title",
            TEXT_CONTROL_REGEX,
        ),
        _longer("title", cfg.max_title_length),
        _longer("description", cfg.max_description_length),
        *[
            Rule(
                f"{c}_valid_utf8", f"{c} is not valid UTF-8 text", c, _invalid_utf8(c), None
            )  # no GX says it
            for c in UTF8_COLUMNS
        ],
        Rule(
            f"{UTF8_MAP}_valid_utf8",
            f"an attribute name or value in {UTF8_MAP} is not valid UTF-8 text",
            UTF8_MAP,
            _invalid_utf8_map(UTF8_MAP),
            None,
        ),
    ]


def _time_rules(cfg: ValidationConfig, started_at: dt.datetime) -> list[Rule]:
    """``updated_at`` within [validation.earliest_updated_at, the run's start + the clock skew]."""
    from pyspark.sql import functions as F

    earliest = cfg.earliest_time
    latest = started_at + dt.timedelta(seconds=cfg.max_clock_skew_seconds)
    return [
        Rule(
            IN_FUTURE,
            f"updated_at later than the run's start plus validation.max_clock_skew_seconds "
            f"({latest:%Y-%m-%d %H:%M:%S} UTC)",
            "updated_at",
            lambda: F.col("updated_at") > F.lit(latest),
            lambda: _gxe().ExpectColumnValuesToBeBetween(column="updated_at", max_value=latest),
        ),
        Rule(
            "updated_at_not_too_old",
            f"updated_at before validation.earliest_updated_at ({cfg.earliest_updated_at})",
            "updated_at",
            lambda: F.col("updated_at") < F.lit(earliest),
            lambda: _gxe().ExpectColumnValuesToBeBetween(column="updated_at", min_value=earliest),
        ),
    ]


def _readable_rules(contract: Contract, columns: Sequence[str]) -> list[Rule]:
    """``<column>_readable`` for each contract column the source marks as not fitting its type."""
    return [
        Rule(
            f"{spec.name}_readable",
            f"{spec.name} holds a value that is not a {spec.type} (kept in the raw row)",
            spec.name,
            _not_null_test(UNREADABLE.format(spec.name)),
            None,  # no GX expectation says it
        )
        for spec in contract.fields
        if UNREADABLE.format(spec.name) in columns
    ]


def _matches(name: str, description: str, column: str, regex: str) -> Rule:
    """A rule a row fails when ``column`` matches ``regex`` (Java regex, as Spark's ``rlike``)."""
    from pyspark.sql import functions as F

    def expectation() -> Any:
        import great_expectations.expectations as expectations

        return expectations.ExpectColumnValuesToNotMatchRegex(column=column, regex=regex)

    return Rule(name, description, column, lambda: F.col(column).rlike(regex), expectation)


def _longer(column: str, limit: int) -> Rule:
    """``<column>_max_length``: a row fails it when ``column`` has more than ``limit`` characters."""
    from pyspark.sql import functions as F

    def expectation() -> Any:
        import great_expectations.expectations as expectations

        return expectations.ExpectColumnValueLengthsToBeBetween(column=column, max_value=limit)

    return Rule(
        f"{column}_max_length",
        f"{column} longer than {limit} characters",
        column,
        lambda: F.length(column) > limit,
        expectation,
    )


def _invalid_utf8(column: str) -> Callable[[], Any]:
    from pyspark.sql import functions as F

    return lambda: ~F.is_valid_utf8(column)


def _invalid_utf8_map(column: str) -> Callable[[], Any]:
    """A ``map<string, list<string>>`` with a key or a value that is not UTF-8 (a null map, list or
    value is none)."""
    from pyspark.sql import functions as F

    def bad(text: Any) -> Any:
        return F.coalesce(~F.is_valid_utf8(text), F.lit(False))

    def fails() -> Any:
        keys = F.exists(F.map_keys(column), bad)
        values = F.exists(
            F.map_values(column), lambda listed: F.coalesce(F.exists(listed, bad), F.lit(False))
        )
        return F.coalesce(keys | values, F.lit(False))

    return fails


def _not_null_test(column: str) -> Callable[[], Any]:
    from pyspark.sql import functions as F

    return lambda: F.col(column).isNotNull()


def _null_test(column: str) -> Callable[[], Any]:
    from pyspark.sql import functions as F

    return lambda: F.col(column).isNull()


def _null_expectation(column: str) -> Callable[[], Any]:
    def make() -> Any:
        import great_expectations.expectations as expectations

        return expectations.ExpectColumnValuesToNotBeNull(column=column)

    return make


def latest_copies(duplicates: pa.Table, key: str = "product_id") -> pa.Table:
    """Per duplicated id: its latest time ``_latest`` and how many copies carry it, ``_same``."""
    latest = duplicates.group_by(key).aggregate([("_at", "max")]).rename_columns([key, "_latest"])
    at_latest = duplicates.join(latest, key).filter(pc.equal(pc.field("_at"), pc.field("_latest")))
    same = at_latest.select([key, "_rows"]).rename_columns([key, "_same"])
    return (
        latest.join(same, key)
        .select([key, "_latest", "_same"])
        .cast(pa.schema([(key, pa.string()), ("_latest", pa.int64()), ("_same", pa.int64())]))
    )


def repeated_rows(duplicates: pa.Table, key: str = "product_id") -> pa.Table:
    """The ids whose copies at their latest time are one row repeated (a replayed file, an
    at-least-once feed): ``key``, ``_latest`` and ``_rows``, the copies (:func:`count_rows`'s
    duplicates). Such copies do not contradict each other: the row is read once
    (:func:`read_once`), not quarantined as a tie."""
    latest = latest_copies(duplicates, key).select([key, "_latest"])
    at = duplicates.join(latest, key).filter(pc.equal(pc.field("_at"), pc.field("_latest")))
    at = at.filter(pc.and_(pc.greater(at["_rows"], 1), pc.equal(at["_kinds"], 1)))
    return at.select([key, "_latest", "_rows"]).sort_by(key)


def read_once(df: DataFrame, repeated: pa.Table, key: str = "product_id") -> DataFrame:
    """``df`` with each row :func:`repeated_rows` found repeated kept once; only those ids' rows at
    their latest time are shuffled (the rest, images included, are not)."""
    from pyspark.sql import functions as F

    ids = F.broadcast(df.sparkSession.createDataFrame(repeated.select([key, "_latest"])))
    tagged = df.join(ids, key, "left")
    again = F.coalesce(F.unix_micros("updated_at") == F.col("_latest"), F.lit(False))
    rest = tagged.where(~again).select(*df.columns)
    once = tagged.where(again).select(*df.columns).dropDuplicates([key])
    return rest.unionByName(once)


def _row_hash(df: DataFrame) -> Column:
    """A 64-bit hash of each whole row (a map column as its JSON, which Spark cannot hash), each
    column's nullness hashed too: xxhash64 skips a null, so a value moved from one nullable column
    to the next would hash alike."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import MapType

    values = [
        F.to_json(F.col(f.name)) if isinstance(f.dataType, MapType) else F.col(f.name) for f in df.schema
    ]
    return F.xxhash64(*values, *(F.col(f.name).isNull() for f in df.schema))


def stale_copies(rows: pa.Table, latest: pa.Table, key: str = "product_id", at: str = "_at") -> pa.Array:
    """Boolean mask of ``rows`` that fail ``product_id_unique``: an older copy of a duplicated id, or
    one of the copies tied at its latest time. ``latest`` is :func:`latest_copies`; ``rows[at]`` is
    ``updated_at`` in µs since the epoch. The same three-valued logic as :func:`check_rows` (a copy
    without a time is stale only in a tie).
    """
    index = pc.index_in(rows[key], value_set=latest[key])
    newest = pc.take(latest["_latest"], index)
    same = pc.take(latest["_same"], index)
    stale = pc.and_kleene(pc.is_valid(newest), pc.or_kleene(pc.less(rows[at], newest), pc.greater(same, 1)))
    return pc.fill_null(stale, False)


def check_rows(
    df: DataFrame, rules: list[Rule], key: str = "product_id", latest: pa.Table | None = None
) -> DataFrame:
    """``df`` plus ``_reasons`` (array of failed rule names, empty for valid rows).

    ``latest`` (:func:`latest_copies` of the duplicates of ``df``, found here when not given) is
    joined as a small broadcast table, so images are never shuffled.
    """
    from pyspark.sql import functions as F

    if latest is None:
        latest = latest_copies(count_rows(df, rules, key)[1], key)
    stamp = F.unix_micros("updated_at")  # exact, no time-zone round trip through the driver
    checked = df.join(F.broadcast(df.sparkSession.createDataFrame(latest)), on=key, how="left").withColumn(
        "_dup_stale",
        F.col("_latest").isNotNull() & ((stamp < F.col("_latest")) | (F.col("_same") > 1)),
    )
    failed = [F.when(F.coalesce(rule.fails(), F.lit(False)), F.lit(rule.name)) for rule in rules]
    return checked.withColumn(REASONS, F.filter(F.array(*failed), lambda x: x.isNotNull())).drop(
        "_latest", "_same", "_dup_stale"
    )


@dataclass
class ValidationCounts:
    """Rows read and invalid, failures per rule, the highest ``updated_at`` read, and the invalid
    rows that broke only transient rules (``held``: read again next run, outside the breaker)."""

    rows_read: int
    rows_invalid: int
    per_rule: dict[str, int] = field(default_factory=dict)
    watermark: dt.datetime | None = None
    held: int = 0

    @property
    def invalid_fraction(self) -> float:
        """The circuit breaker's share: the rows read that are invalid, less the ``held`` ones."""
        return (self.rows_invalid - self.held) / self.rows_read if self.rows_read else 0.0

    def top_rules(self, k: int = 3) -> str:
        top = sorted(((n, r) for r, n in self.per_rule.items() if n), reverse=True)[:k]
        return ", ".join(f"{r} ({n:,})" for n, r in top) or "none"


def count_rows(
    df: DataFrame, rules: list[Rule], key: str = "product_id"
) -> tuple[ValidationCounts, pa.Table]:
    """The counts (rows read, failures per rule, rows failing any, the watermark) and the duplicates,
    in one Spark job that reads no image.

    The duplicates are the copies of every id on more than one row, one row per (id, ``updated_at``):
    ``key``; ``_at``, ``updated_at`` in µs since the epoch (null where missing); ``_rows``, how many
    copies carry that time; ``_kinds``, how many different rows they are (1: one row repeated);
    ``_ok``, how many of those pass every per-row rule; ``_held``, how many break only transient ones.
    They are few (never more than the rows read) and come back to the driver as Arrow, to be joined
    back as a small broadcast table (:func:`check_rows`).
    """
    from pyspark.sql import functions as F

    per_row = [(i, r) for i, r in enumerate(rules) if not r.across_rows]
    tests = {i: F.coalesce(r.fails(), F.lit(False)) for i, r in per_row}
    bad = reduce(lambda a, b: a | b, tests.values(), F.lit(False))
    lasting = reduce(lambda a, b: a | b, [tests[i] for i, r in per_row if not r.transient], F.lit(False))
    sums = [f"_r{i}" for i in tests]
    groups = df.groupBy(key, F.unix_micros("updated_at").alias("_at")).agg(  # exact, no time-zone trip
        F.count(F.lit(1)).alias("_rows"),
        F.countDistinct(_row_hash(df)).alias("_kinds"),
        F.sum(F.when(bad, 0).otherwise(1)).alias("_ok"),
        F.sum(F.when(bad & ~lasting, 1).otherwise(0)).alias("_held"),
        *[F.sum(F.when(t, 1).otherwise(0)).alias(f"_r{i}") for i, t in tests.items()],
    )
    per_id = groups.groupBy(key).agg(
        F.sum("_rows").alias("_n"),
        F.sum("_ok").alias("_ok"),
        F.sum("_held").alias("_held"),
        F.max("_at").alias("_at"),
        *[F.sum(c).alias(c) for c in sums],
        F.collect_list(F.struct("_at", "_rows", "_kinds", "_ok", "_held")).alias("_copies"),
    )
    duplicated = F.col(key).isNotNull() & (F.col("_n") > 1)
    row = per_id.agg(
        F.sum("_n").alias("rows"),
        F.sum("_ok").alias("ok"),
        F.sum("_held").alias("held"),
        F.max("_at").alias("watermark"),
        *[F.sum(c).alias(c) for c in sums],
        F.collect_list(F.when(duplicated, F.struct(key, "_copies"))).alias("duplicates"),
    ).collect()[0]
    rows = int(row["rows"] or 0)
    counts = ValidationCounts(
        rows,
        rows - int(row["ok"] or 0),
        {r.name: int(row[f"_r{i}"] or 0) if i in tests else 0 for i, r in enumerate(rules)},
        None if row["watermark"] is None else _from_micros(int(row["watermark"])),
        int(row["held"] or 0),
    )
    copies = [(d[key], c) for d in row["duplicates"] for c in d["_copies"]]
    duplicates = pa.table(
        {
            key: pa.array([k for k, _ in copies], pa.string()),
            **{
                c: pa.array([copy[c] for _, copy in copies], pa.int64())
                for c in ("_at", "_rows", "_kinds", "_ok", "_held")
            },
        }
    )
    return add_duplicates(counts, duplicates, rules), duplicates


def add_duplicates(counts: ValidationCounts, duplicates: pa.Table, rules: list[Rule]) -> ValidationCounts:
    """``counts`` of the per-row rules plus the stale copies in ``duplicates`` (:func:`count_rows`)."""
    stale = duplicates.filter(stale_copies(duplicates, latest_copies(duplicates)))
    per_rule = dict(counts.per_rule)
    for rule in rules:
        if rule.across_rows:
            per_rule[rule.name] = int(pc.sum(stale["_rows"]).as_py() or 0)
    # a stale copy that breaks a per-row rule too is already among the invalid rows; one that broke
    # only transient rules is invalid for good now
    invalid = counts.rows_invalid + int(pc.sum(stale["_ok"]).as_py() or 0)
    held = counts.held - int(pc.sum(stale["_held"]).as_py() or 0)
    return ValidationCounts(counts.rows_read, invalid, per_rule, counts.watermark, held)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_LATEST_MICROS = (dt.datetime.max.replace(tzinfo=dt.UTC) - _EPOCH) // dt.timedelta(microseconds=1)


def _from_micros(us: int) -> dt.datetime:
    """µs since the epoch as a datetime; past year 9999 (an export that wrote nanoseconds as
    microseconds), the last one Python has: such a row is quarantined, and the run's watermark never
    passes its start."""
    return _EPOCH + dt.timedelta(microseconds=min(us, _LATEST_MICROS))


class CircuitBreakerTripped(CatalogEnrichError):
    """Too many invalid rows: the run stops before writing anything."""


def check_breaker(counts: ValidationCounts, max_fraction: float, min_rows: int = 1) -> None:
    """Raise :class:`CircuitBreakerTripped` when the invalid share exceeds ``max_fraction`` and at
    least ``min_rows`` rows are invalid (the ``held`` ones counted in neither)."""
    counted = counts.rows_invalid - counts.held
    if counts.rows_read and counts.invalid_fraction > max_fraction and counted >= min_rows:
        held = f" (and {counts.held:,} held for the next run, not counted)" if counts.held else ""
        raise CircuitBreakerTripped(
            f"circuit breaker: {counted:,} of {counts.rows_read:,} rows invalid "
            f"({counts.invalid_fraction:.1%} > validation.max_invalid_fraction {max_fraction:.1%}){held}; "
            f"top failing rules: {counts.top_rules()}. Nothing was written."
        )


def quarantine_rows(
    rows: Any,
    run_id: str,
    quarantined_at: dt.datetime,
    schema: pa.Schema,
    extra_reasons: Mapping[str, str] | None = None,
) -> pa.Table:
    """Quarantine-table rows from a (small) Spark DataFrame of invalid rows.

    ``rows`` must carry ``_reasons``; ``extra_reasons`` adds a reason per product id (the image
    rules the scoring pass found) to the row that was scored, the one without reasons of its own
    (a stale copy of the product keeps its own: its image was never decoded). The raw row is kept
    as JSON, every column but the image bytes, which stay in the products table: the image is its
    SHA-256 digest and size (``null`` when there was none), so quarantine rows stay small whatever
    the photos weigh.
    """
    from pyspark.sql import functions as F

    data_cols = [c for c in rows.columns if c != REASONS]
    digest = F.when(
        F.col("image").isNotNull(),
        F.struct(F.sha2(F.col("image"), 256).alias("sha256"), F.length(F.col("image")).alias("bytes")),
    )
    raw = F.to_json(
        F.struct(*[digest.alias(c) if c == "image" else F.col(c) for c in data_cols]),
        {"timestampFormat": "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX", "ignoreNullFields": "false"},
    )
    collected = rows.select(F.col("product_id"), F.col(REASONS), raw.alias("raw")).collect()
    extra = dict(extra_reasons or {})
    ids = [r["product_id"] for r in collected]
    reasons = [
        sorted(
            set(r[REASONS])
            | ({extra[r["product_id"]]} if r["product_id"] in extra and not r[REASONS] else set())
        )
        for r in collected
    ]
    return pa.table(
        {
            "product_id": pa.array(ids, pa.string()),
            "run_id": pa.array([run_id] * len(ids), pa.string()),
            "reasons": pa.array(reasons, pa.list_(pa.string())),
            "raw": pa.array([r["raw"] for r in collected], pa.string()),
            "quarantined_at": pa.array([quarantined_at] * len(ids), schema.field("quarantined_at").type),
        },
        schema=schema,
    )
