"""Row-level validation of the products table on Spark: every failing row and every rule it broke.

The rules come from the products contract (``schemas/products.yaml``: non-null and unique columns)
and the validation config (length limits), plus two rules about content the contract's types cannot
say: a title must be text (not a stringified ``nan``/``None``/number/object), and an image that is
there must decode. Each rule is one Spark column expression (no Python UDF), so checking costs one
pass; the same rules become the Great Expectations suite (:mod:`.suite`).

Image rules (``image_decodable``, ``image_readable``) need the bytes decoded; the scoring pass
decodes every image anyway, so the predictor reports them and the job quarantines those rows there
(one decode per image, not two). A product with *no* image is valid and is scored as imageless.

Duplicates: of the rows sharing a ``product_id`` the one with the latest ``updated_at`` is kept;
older copies fail ``product_id_unique``; rows tied at the latest time all fail it (which one is
right cannot be known), so nothing is silently picked.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from catalog_enrichment.config import ValidationConfig
from catalog_enrichment.contracts import Contract
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.inference.predictor import IMAGE_DECODABLE, IMAGE_READABLE

__all__ = [
    "IMAGE_RULES",
    "REASONS",
    "CircuitBreakerTripped",
    "Rule",
    "ValidationCounts",
    "build_rules",
    "check_breaker",
    "check_rows",
    "count_reasons",
    "quarantine_rows",
]

REASONS = "_reasons"
IMAGE_RULES = (IMAGE_DECODABLE, IMAGE_READABLE)
# Titles that are a stringified non-text value: nan/None/null, numbers, objects and lists.
NOT_TEXT_REGEX = (
    r"(?i)^\s*(nan|none|null|nat|undefined|true|false|\[object object\]"
    r"|[-+]?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?|\{.*\}|\[.*\])\s*$"
)
BLANK_REGEX = r"^\s*$"


@dataclass(frozen=True)
class Rule:
    """One validation rule: a name (the quarantine reason), the Spark test that a row *fails* it,
    and the Great Expectations expectation that checks the same thing on the whole table."""

    name: str
    description: str
    column: str
    fails: Callable[[], Any]  # () -> pyspark Column, true where the row breaks the rule
    expectation: Callable[[], Any] | None  # () -> great_expectations Expectation


def build_rules(contract: Contract, cfg: ValidationConfig) -> list[Rule]:
    """The products contract's rules, in a fixed order."""
    from pyspark.sql import functions as F

    def gxe() -> Any:
        import great_expectations.expectations as expectations

        return expectations

    rules: list[Rule] = []
    for spec in contract.fields:
        if not spec.nullable:
            rules.append(
                Rule(
                    f"{spec.name}_not_null",
                    f"{spec.name} is required",
                    spec.name,
                    _null_test(spec.name),
                    _null_expectation(spec.name),
                )
            )
    if contract.primary_key:
        key = contract.primary_key[0]
        rules.append(
            Rule(
                f"{key}_unique",
                f"{key} appears on more than one row (older copies are quarantined)",
                key,
                lambda: F.col("_dup_stale"),
                lambda: gxe().ExpectColumnValuesToBeUnique(column=key),
            )
        )
    rules += [
        Rule(
            "title_not_empty",
            "title is blank",
            "title",
            lambda: F.col("title").rlike(BLANK_REGEX),
            lambda: gxe().ExpectColumnValuesToNotMatchRegex(column="title", regex=BLANK_REGEX),
        ),
        Rule(
            "title_is_text",
            "title is a stringified non-text value (nan, None, a number, an object)",
            "title",
            lambda: F.col("title").rlike(NOT_TEXT_REGEX),
            lambda: gxe().ExpectColumnValuesToNotMatchRegex(column="title", regex=NOT_TEXT_REGEX),
        ),
        Rule(
            "title_max_length",
            f"title longer than {cfg.max_title_length} characters",
            "title",
            lambda: F.length("title") > cfg.max_title_length,
            lambda: gxe().ExpectColumnValueLengthsToBeBetween(column="title", max_value=cfg.max_title_length),
        ),
        Rule(
            "description_max_length",
            f"description longer than {cfg.max_description_length} characters",
            "description",
            lambda: F.length("description") > cfg.max_description_length,
            lambda: gxe().ExpectColumnValueLengthsToBeBetween(
                column="description", max_value=cfg.max_description_length
            ),
        ),
    ]
    return rules


def _null_test(column: str) -> Callable[[], Any]:
    from pyspark.sql import functions as F

    return lambda: F.col(column).isNull()


def _null_expectation(column: str) -> Callable[[], Any]:
    def make() -> Any:
        import great_expectations.expectations as expectations

        return expectations.ExpectColumnValuesToNotBeNull(column=column)

    return make


# Up to this many duplicated ids are kept on the driver after one aggregation (see check_rows).
LOCAL_DUPLICATES_MAX = 1_000_000


def check_rows(df: Any, rules: list[Rule], key: str = "product_id") -> Any:
    """``df`` plus ``_reasons`` (array of failed rule names, empty for valid rows).

    The duplicated ids (rarely more than a few) are found by one aggregation here and kept on the
    driver as a small local table: every later pass over the rows (the counts, the scoring stage,
    the quarantine) joins that instead of re-reading and re-aggregating the whole source, about
    0.6 s of two busy cores per pass on 16k products. Past ``LOCAL_DUPLICATES_MAX`` duplicated ids
    the aggregation stays part of each pass. Either way only duplicated ids are joined (broadcast),
    so images are never shuffled.
    """
    from pyspark.sql import functions as F

    stamp = F.unix_micros("updated_at")  # exact, no time-zone round trip through the driver
    present = df.where(F.col(key).isNotNull()).select(key, stamp.alias("_at"))
    dups = (
        present.groupBy(key)
        .agg(F.count(F.lit(1)).alias("_n"), F.max("_at").alias("_latest"))
        .where(F.col("_n") > 1)
    )
    tied = present.groupBy(key, "_at").agg(F.count(F.lit(1)).alias("_same"))
    dups = dups.join(tied.withColumnRenamed("_at", "_latest"), on=[key, "_latest"], how="left").select(
        key, "_latest", "_same"
    )
    found = dups.limit(LOCAL_DUPLICATES_MAX + 1).collect()
    if len(found) <= LOCAL_DUPLICATES_MAX:
        dups = df.sparkSession.createDataFrame(found, dups.schema)
    checked = df.join(F.broadcast(dups), on=key, how="left").withColumn(
        "_dup_stale",
        F.col("_latest").isNotNull() & ((stamp < F.col("_latest")) | (F.col("_same") > 1)),
    )
    failed = [F.when(F.coalesce(rule.fails(), F.lit(False)), F.lit(rule.name)) for rule in rules]
    return checked.withColumn(REASONS, F.filter(F.array(*failed), lambda x: x.isNotNull())).drop(
        "_latest", "_same", "_dup_stale"
    )


@dataclass
class ValidationCounts:
    """Rows read and invalid, failures per rule, and the highest ``updated_at`` read."""

    rows_read: int
    rows_invalid: int
    per_rule: dict[str, int] = field(default_factory=dict)
    watermark: dt.datetime | None = None

    @property
    def invalid_fraction(self) -> float:
        return self.rows_invalid / self.rows_read if self.rows_read else 0.0

    def top_rules(self, k: int = 3) -> str:
        top = sorted(((n, r) for r, n in self.per_rule.items() if n), reverse=True)[:k]
        return ", ".join(f"{r} ({n:,})" for n, r in top) or "none"


def count_reasons(checked: Any, rules: list[Rule]) -> ValidationCounts:
    """One aggregation over the checked rows."""
    from pyspark.sql import functions as F

    aggs = [F.count(F.lit(1)).alias("rows"), F.sum(F.when(F.size(REASONS) > 0, 1).otherwise(0)).alias("bad")]
    aggs += [
        F.sum(F.when(F.array_contains(REASONS, r.name), 1).otherwise(0)).alias(f"r{i}")
        for i, r in enumerate(rules)
    ]
    aggs.append(F.max(F.unix_micros("updated_at")).alias("watermark"))  # exact, no local-time conversion
    row = checked.agg(*aggs).collect()[0]
    return ValidationCounts(
        int(row["rows"]),
        int(row["bad"] or 0),
        {r.name: int(row[f"r{i}"] or 0) for i, r in enumerate(rules)},
        None if row["watermark"] is None else _from_micros(int(row["watermark"])),
    )


def _from_micros(us: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=us)


class CircuitBreakerTripped(CatalogEnrichError):
    """Too many invalid rows: the run stops before writing anything."""


def check_breaker(counts: ValidationCounts, max_fraction: float) -> None:
    """Raise :class:`CircuitBreakerTripped` when the invalid share exceeds ``max_fraction``."""
    if counts.rows_read and counts.invalid_fraction > max_fraction:
        raise CircuitBreakerTripped(
            f"circuit breaker: {counts.rows_invalid:,} of {counts.rows_read:,} rows invalid "
            f"({counts.invalid_fraction:.1%} > validation.max_invalid_fraction {max_fraction:.1%}); "
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
    rules the scoring pass found). The raw row is kept whole as JSON, binary base64-encoded.
    """
    from pyspark.sql import functions as F

    data_cols = [c for c in rows.columns if c != REASONS]
    raw = F.to_json(
        F.struct(*[F.base64(c).alias(c) if c == "image" else F.col(c) for c in data_cols]),
        {"timestampFormat": "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX", "ignoreNullFields": "false"},
    )
    collected = rows.select(F.col("product_id"), F.col(REASONS), raw.alias("raw")).collect()
    extra = dict(extra_reasons or {})
    ids = [r["product_id"] for r in collected]
    reasons = [
        sorted(set(r[REASONS]) | ({extra[r["product_id"]]} if r["product_id"] in extra else set()))
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
