"""Row-level rules on a small Spark DataFrame with a known answer per row, and the GX suite."""

from __future__ import annotations

import datetime as dt

import pytest

from catalog_enrichment.config import ValidationConfig
from catalog_enrichment.contracts import load_contract
from catalog_enrichment.validation import (
    CircuitBreakerTripped,
    build_rules,
    check_breaker,
    check_rows,
    count_reasons,
    run_suite,
)
from catalog_enrichment.validation import rules as rules_module

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

T = dt.datetime(2026, 11, 1, 12, tzinfo=dt.UTC)
EARLIER = T - dt.timedelta(hours=5)
D = dt.date(2026, 11, 1)
# product_id, title, description, updated_at -> expected reasons
ROWS = [
    ("ok-1", "Red cotton shirt", None, T, []),
    ("ok-2", "3-pack socks", "x" * 100, T, []),  # starts with a number but is text
    ("ok-3", "None of the above tote", None, T, []),
    (None, "Blue wool scarf", None, T, ["product_id_not_null"]),
    ("dup", "Grey tee (new)", None, T, []),
    ("dup", "Grey tee (old)", None, EARLIER, ["product_id_unique"]),
    ("tie", "A", None, T, ["product_id_unique"]),
    ("tie", "B", None, T, ["product_id_unique"]),
    ("blank", "   ", None, T, ["title_not_empty"]),
    ("null-title", None, None, T, ["title_not_null"]),
    ("nan", "nan", None, T, ["title_is_text"]),
    ("num", "12345.0", None, T, ["title_is_text"]),
    ("obj", "{'title': None}", None, T, ["title_is_text"]),
    ("js", "[object Object]", None, T, ["title_is_text"]),
    ("long", "y" * 301, None, T, ["title_max_length"]),
    ("long-desc", "Shirt", "z" * 5001, T, ["description_max_length"]),
    (None, "nan", None, T, ["product_id_not_null", "title_is_text"]),
]


@pytest.fixture(scope="module")
def frame(spark):  # type: ignore[no-untyped-def]
    schema = load_contract("products").spark_schema(enforce_nullability=False)
    data = [(pid, title, desc, None, None, None, None, ts, D) for pid, title, desc, ts, _ in ROWS]
    return spark.createDataFrame(data, schema)


@pytest.mark.parametrize("local_max", [1_000_000, 1], ids=["duplicates-on-driver", "too-many-to-collect"])
def test_every_row_gets_exactly_the_rules_it_breaks(frame, local_max: int, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # two duplicated ids: kept on the driver, or (over the limit) re-aggregated in every pass
    monkeypatch.setattr(rules_module, "LOCAL_DUPLICATES_MAX", local_max)
    rules = build_rules(load_contract("products"), ValidationConfig())
    checked = check_rows(frame, rules).collect()
    got = sorted((r["product_id"] or "", r["title"] or "", sorted(r["_reasons"])) for r in checked)
    want = sorted((pid or "", title or "", sorted(reasons)) for pid, title, _, _, reasons in ROWS)
    assert got == want
    counts = count_reasons(check_rows(frame, rules), rules)
    assert counts.rows_read == len(ROWS)
    assert counts.rows_invalid == sum(1 for row in ROWS if row[4])
    assert counts.per_rule["title_is_text"] == 5 and counts.watermark == T
    with pytest.raises(CircuitBreakerTripped, match=r"top failing rules: title_is_text \(5\)"):
        check_breaker(counts, 0.05)
    check_breaker(counts, 0.9)  # within the limit: no error


@pytest.mark.slow
def test_the_great_expectations_suite_counts_the_same_rows(frame) -> None:  # type: ignore[no-untyped-def]
    rules = build_rules(load_contract("products"), ValidationConfig())
    summary = run_suite(frame, rules)
    counts = count_reasons(check_rows(frame, rules), rules).per_rule
    gx = {e["rule"]: e["unexpected_count"] for e in summary["expectations"]}
    assert set(gx) == {r.name for r in rules}
    for rule, n in gx.items():
        # GX flags every row of a duplicated id (4), the row rule only the ones quarantined (3)
        assert n == (4 if rule == "product_id_unique" else counts[rule]), rule
    assert summary["success"] is False
