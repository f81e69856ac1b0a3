"""Row-level rules on a small Spark DataFrame with a known answer per row."""

from __future__ import annotations

import datetime as dt
import hashlib

import pyarrow as pa
import pytest

from catalog_enrichment.config import ValidationConfig
from catalog_enrichment.contracts import image_key, load_contract
from catalog_enrichment.validation import rules as rules_module
from catalog_enrichment.validation.rules import (
    CircuitBreakerTripped,
    ValidationCounts,
    add_duplicates,
    build_rules,
    check_breaker,
    check_rows,
    count_rows,
    latest_copies,
    quarantine_rows,
    repeated_rows,
    shared_image_rules,
    stale_copies,
    text_failures,
)

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

T = dt.datetime(2026, 11, 1, 12, tzinfo=dt.UTC)
EARLIER = T - dt.timedelta(hours=5)
D = dt.date(2026, 11, 1)
NOW = T + dt.timedelta(minutes=10)  # the run's start; updated_at may pass it by an hour of clock skew
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
    # missing values as pandas, spreadsheets and SQL clients write them out
    ("pd-na", "<NA>", None, T, ["title_is_text"]),
    ("n/a", " N/A ", None, T, ["title_is_text"]),
    ("xl-na", "#N/A", None, T, ["title_is_text"]),
    ("neg-nan", "-nan", None, T, ["title_is_text"]),
    ("sql-null", "NULL", None, T, ["title_is_text"]),
    ("n/a-text", "N/A brand tote", None, T, []),
    ("nan-desc", "Linen shirt", "nan", T, []),  # a missing description is allowed, spelled or not
    # invisible format characters (Unicode's Cf) alone are a blank title, or id
    ("zwsp", "\u200b", None, T, ["title_not_empty"]),
    ("bom", "\ufeff \u2060\u200c\u200d", None, T, ["title_not_empty"]),
    ("tag", "\U000e0041\U000e007f", None, T, ["title_not_empty"]),  # beyond the BMP
    ("\u200b\ufeff", "Shirt", None, T, ["product_id_not_blank"]),
    ("joined", "Tee\u200dshirt\u00ad", None, T, []),  # inside text they are text
    ("list", "[['S', 'M'], {'colour': 'red'}]", None, T, ["title_is_text"]),
    ("tagged", "[NEW] Summer dress [Size M]", None, T, []),  # bracketed words: text
    ("braced", "{Bundle} Mug {2 pack}", None, T, []),
    # Java's regex recursed once per character of a bracketed title: a long one overflowed the stack
    ("huge-list", "[" + "[x], " * 2000 + "]", None, T, ["title_is_text", "title_max_length"]),
    ("long", "y" * 301, None, T, ["title_max_length"]),
    ("long-desc", "Shirt", "z" * 5001, T, ["description_max_length"]),
    (None, "nan", None, T, ["product_id_not_null", "title_is_text"]),
    ("", "Shirt", None, T, ["product_id_not_blank"]),
    (" \t", "Shirt", None, T, ["product_id_not_blank", "product_id_no_control_chars"]),
    ("i" * 257, "Shirt", None, T, ["product_id_max_length"]),
    ("i" * 256, "Shirt", None, T, []),
    ("ctl\x00id", "Shirt", None, T, ["product_id_no_control_chars"]),
    ("c1\x9bid", "Shirt", None, T, ["product_id_no_control_chars"]),  # a C1 control (CSI)
    ("bell", "Shirt\x07", None, T, ["title_no_control_chars"]),
    ("tabs", "Red\tshirt\r\nnew", "line\nbreaks\x01", T, []),  # a description is not checked for them
    ("skew", "Shirt", None, NOW + dt.timedelta(minutes=59), []),
    ("future", "Shirt", None, NOW + dt.timedelta(minutes=61), ["updated_at_not_in_future"]),
    ("far-future", "Shirt", None, dt.datetime(9999, 1, 1, tzinfo=dt.UTC), ["updated_at_not_in_future"]),
    ("old", "Shirt", None, dt.datetime(1999, 12, 31, 23, 59, tzinfo=dt.UTC), ["updated_at_not_too_old"]),
    ("epoch", "Shirt", None, dt.datetime(1970, 1, 1, tzinfo=dt.UTC), ["updated_at_not_too_old"]),
    ("no-time", "Shirt", None, None, ["updated_at_not_null"]),
]


@pytest.fixture(scope="module")
def frame(spark):  # type: ignore[no-untyped-def]
    schema = load_contract("products").spark_schema(enforce_nullability=False)
    data = [(pid, title, desc, None, None, None, None, ts, D) for pid, title, desc, ts, _ in ROWS]
    return spark.createDataFrame(data, schema)


def test_every_row_gets_exactly_the_rules_it_breaks(frame) -> None:  # type: ignore[no-untyped-def]
    rules = build_rules(load_contract("products"), ValidationConfig(), NOW)
    checked = check_rows(frame, rules).collect()
    got = sorted((r["product_id"] or "", r["title"] or "", sorted(r["_reasons"])) for r in checked)
    want = sorted((pid or "", title or "", sorted(reasons)) for pid, title, _, _, reasons in ROWS)
    assert got == want
    counts, _duplicates = count_rows(frame, rules)  # one Spark job: every rule and the duplicates
    assert counts.per_rule["product_id_unique"] == 3  # the old copy and both tied ones
    assert counts.rows_read == len(ROWS)
    assert counts.rows_invalid == sum(1 for row in ROWS if row[4])
    # the highest time read, whatever it is: the run caps it at its start (test_enrich)
    assert counts.per_rule["title_is_text"] == 12
    assert counts.watermark == dt.datetime(9999, 1, 1, tzinfo=dt.UTC)
    with pytest.raises(CircuitBreakerTripped, match=r"top failing rules: title_is_text \(12\)"):
        check_breaker(counts, 0.05)
    check_breaker(counts, 0.9)  # within the limit: no error


def test_training_finds_the_title_and_description_rules_the_job_would_quarantine_for() -> None:
    """Training's pure-Python reading of the title and description rules names what the Spark
    rules name for every row above (a title past its limit is not matched further)."""
    cfg = ValidationConfig()
    got = text_failures([r[1] for r in ROWS], [r[2] for r in ROWS], cfg)
    for (_, title, _, _, reasons), broken in zip(ROWS, got, strict=True):
        want = [r for r in reasons if r.startswith(("title_", "description_"))]
        if title is not None and len(title) > cfg.max_title_length:
            want = [r for r in want if r.endswith("_max_length")]
        assert sorted(broken) == sorted(want), title
    assert text_failures(["\u00a0\u2003", "7", "Tee 7"], [None, None, None], cfg) == [
        ("title_not_empty",),  # no-break and em spaces: blank, as Java's (?U)\s reads them
        ("title_is_text",),
        (),
    ]
    assert text_failures(["<NA>"], [None], cfg) == [("title_is_text",)]
    assert text_failures(["\u200b", "\ufeff \u2060"], [None, None], cfg) == [("title_not_empty",)] * 2
    assert text_failures(["Linen shirt"], ["nan"], cfg) == [()]  # a missing description is allowed


def test_a_title_of_format_characters_alone_is_blank_in_python_and_in_spark(spark) -> None:  # type: ignore[no-untyped-def]
    """Every format character (Unicode's Cf: zero-width spaces and joiners, the byte order mark,
    bidi marks, the soft hyphen, tags) alone is a blank title, as Python's Unicode tables know them,
    on both sides: Python's reading of the rules and the job's Java regexes."""
    import unicodedata

    cf = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Cf"]
    assert len(cf) > 150
    assert text_failures(cf, [None] * len(cf), ValidationConfig()) == [("title_not_empty",)] * len(cf)
    (rule,) = [
        r
        for r in build_rules(load_contract("products"), ValidationConfig(), NOW)
        if r.name == "title_not_empty"
    ]
    frame = spark.createDataFrame([(c,) for c in cf], "title string")
    assert [r["blank"] for r in frame.select(rule.fails().alias("blank")).collect()] == [True] * len(cf)


def test_merchant_attributes_that_are_not_utf8_break_their_rule(spark) -> None:  # type: ignore[no-untyped-def]
    """A scoring task decodes the merchant's attribute names and values: bytes that are not UTF-8
    there would fail the task (so the run), not the row."""
    from pyspark.sql import functions as F

    bad = b"caf\xe9"
    raw = spark.createDataFrame(
        [("name", bad, b"red"), ("value", b"color", bad), ("ok", b"color", b"red"), ("none", None, None)],
        "product_id string, k binary, v binary",
    )
    # every map has a second entry, "size", whose list is not filled (null)
    entry = (
        F.col("k").cast("string"),
        F.array(F.col("v").cast("string")),
        F.lit("size"),
        F.lit(None).cast("array<string>"),
    )
    merchant = F.when(F.col("k").isNotNull(), F.create_map(*entry))
    frame = raw.select("product_id", merchant.alias("merchant_attributes"))
    (rule,) = [
        r
        for r in build_rules(load_contract("products"), ValidationConfig(), NOW)
        if r.column == "merchant_attributes"
    ]
    assert rule.name == "merchant_attributes_valid_utf8"
    got = {
        r["product_id"]: r["fails"] for r in frame.select("product_id", rule.fails().alias("fails")).collect()
    }
    assert got == {"name": True, "value": True, "ok": False, "none": False}


def test_the_breaker_s_message_counts_what_it_counts() -> None:
    """Rows held for the next run (transient rules: a placeholder) are not the breaker's: its
    message gives the rows it did count, and the held ones beside them."""
    counts = ValidationCounts(1000, 360, {"image_shared": 300, "title_not_null": 60}, held=300)
    with pytest.raises(CircuitBreakerTripped) as tripped:
        check_breaker(counts, 0.05)
    assert str(tripped.value).startswith(
        "circuit breaker: 60 of 1,000 rows invalid (6.0% > validation.max_invalid_fraction 5.0%) "
        "(and 300 held for the next run, not counted); top failing rules: image_shared (300), "
    )
    check_breaker(ValidationCounts(1000, 340, {"image_shared": 300, "title_not_null": 40}, held=300), 0.05)


def test_a_quiet_night_s_one_bad_row_does_not_trip_the_breaker() -> None:
    """One bad row among twelve is 8 %, yet no outage: below ``validation.min_invalid_rows`` the
    breaker lets the run quarantine it; ten bad rows of twelve trip it (held rows count in neither)."""
    minimum = ValidationConfig().min_invalid_rows
    check_breaker(ValidationCounts(12, 1, {"title_not_null": 1}), 0.05, minimum)
    check_breaker(ValidationCounts(12, minimum + 1, {"image_shared": 2}, held=2), 0.05, minimum)
    with pytest.raises(CircuitBreakerTripped, match=r"10 of 12 rows invalid"):
        check_breaker(ValidationCounts(12, minimum, {"title_not_null": minimum}), 0.05, minimum)
    with pytest.raises(CircuitBreakerTripped, match=r"1 of 12 rows invalid"):
        check_breaker(ValidationCounts(12, 1, {"title_not_null": 1}), 0.05)  # no minimum: as before


def test_the_duplicates_are_found_once_and_mark_exactly_the_stale_copies(frame) -> None:  # type: ignore[no-untyped-def]
    rules = build_rules(load_contract("products"), ValidationConfig(), NOW)
    _, duplicates = count_rows(frame, rules)
    at = int(T.timestamp() * 1e6)
    assert sorted(duplicates.to_pylist(), key=lambda r: (r["product_id"], r["_at"])) == [
        {
            "product_id": "dup",
            "_at": int(EARLIER.timestamp() * 1e6),
            "_rows": 1,
            "_kinds": 1,
            "_ok": 1,
            "_held": 0,
        },
        {"product_id": "dup", "_at": at, "_rows": 1, "_kinds": 1, "_ok": 1, "_held": 0},
        {"product_id": "tie", "_at": at, "_rows": 2, "_kinds": 2, "_ok": 2, "_held": 0},
    ]
    assert repeated_rows(duplicates).num_rows == 0  # the tied copies are two different rows
    latest = latest_copies(duplicates)
    assert sorted(latest.to_pylist(), key=lambda r: r["product_id"]) == [
        {"product_id": "dup", "_latest": at, "_same": 1},
        {"product_id": "tie", "_latest": at, "_same": 2},
    ]
    checked = check_rows(frame, rules, latest=latest).collect()
    assert len(checked) == len(ROWS)  # the join adds no row
    # the stale and tied copies, and only those, fail product_id_unique
    stale = sorted(r["title"] for r in checked if "product_id_unique" in r["_reasons"])
    assert stale == ["A", "B", "Grey tee (old)"]


def test_a_row_repeated_exactly_is_read_once_and_a_tie_of_different_rows_stays_quarantined(spark) -> None:  # type: ignore[no-untyped-def]
    """A replayed file: "rep" three times the same row at its latest time (and once, older): the
    row is read once, valid, and the two repeats are counted apart, not quarantined; "tie" and
    "moved", two different rows at one time each, still fail product_id_unique, every copy."""
    from catalog_enrichment.enrich.stages import validate

    schema = load_contract("products").spark_schema(enforce_nullability=False)
    image = b"\x89PNG same bytes"
    rows = [
        *[("rep", "Grey tee", "cotton", image, None, None, {"color": ["grey"]}, T, D)] * 3,
        ("rep", "Grey tee (old)", None, None, None, None, None, EARLIER, D),
        ("tie", "A", None, None, None, None, None, T, D),
        ("tie", "B", None, None, None, None, None, T, D),
        # the same text in another column: two rows (a hash that skipped nulls took them for one)
        ("moved", "Shoes", "Leather", None, None, None, None, T, D),
        ("moved", "Shoes", None, None, None, "Leather", None, T, D),
        ("ok", "Red shirt", None, None, None, None, None, T, D),
    ]
    said: list[str] = []
    rules = build_rules(load_contract("products"), ValidationConfig(), NOW)
    validated = validate(spark.createDataFrame(rows, schema), rules, NOW, said.append)
    checked = validated.checked.collect()
    assert validated.repeated == 2 and validated.counts.rows_read == 7 == len(checked)
    assert sorted((r["product_id"], r["title"], list(r["_reasons"])) for r in checked) == [
        ("moved", "Shoes", ["product_id_unique"]),
        ("moved", "Shoes", ["product_id_unique"]),
        ("ok", "Red shirt", []),
        ("rep", "Grey tee", []),
        ("rep", "Grey tee (old)", ["product_id_unique"]),
        ("tie", "A", ["product_id_unique"]),
        ("tie", "B", ["product_id_unique"]),
    ]
    assert validated.counts.per_rule["product_id_unique"] == 5
    assert any("2 rows repeated the row of the same product and time exactly" in line for line in said)


def test_an_image_reason_the_scoring_found_goes_on_the_scored_row_not_the_product_s_stale_copy(
    spark,
) -> None:  # type: ignore[no-untyped-def]
    from catalog_enrichment.validation.rules import REASONS

    rows = spark.createDataFrame(
        [("dup", None, ["product_id_unique"]), ("dup", None, []), ("ok", None, [])],
        f"product_id string, image binary, {REASONS} array<string>",
    )
    schema = load_contract("quarantine").arrow_schema()
    table = quarantine_rows(rows, "r1", T, schema, {"dup": "image_decodable", "ok": "image_readable"})
    assert sorted(zip(table["product_id"].to_pylist(), table["reasons"].to_pylist(), strict=True)) == [
        ("dup", ["image_decodable"]),
        ("dup", ["product_id_unique"]),
        ("ok", ["image_readable"]),
    ]


def test_stale_copies_and_their_counts_follow_the_rule_on_missing_times() -> None:
    # the copies of two duplicated ids per (id, time), as find_duplicates returns them
    duplicates = pa.table(
        {
            "product_id": ["d", "d", "d", "t", "t"],
            "_at": [10, 5, None, 20, None],
            "_rows": [1, 2, 1, 3, 1],
            "_kinds": [1, 2, 1, 3, 1],
            "_ok": [1, 1, 0, 2, 1],  # copies passing every per-row rule
            "_held": [0, 1, 0, 0, 0],  # copies breaking only transient rules
        },
        pa.schema(
            [("product_id", pa.string())]
            + [(c, pa.int64()) for c in ("_at", "_rows", "_kinds", "_ok", "_held")]
        ),
    )
    latest = latest_copies(duplicates)
    assert sorted(latest.to_pylist(), key=lambda r: r["product_id"]) == [
        {"product_id": "d", "_latest": 10, "_same": 1},
        {"product_id": "t", "_latest": 20, "_same": 3},
    ]
    ids = ["d", "d", "d", "t", "t", "x", None]
    rows = pa.table({"product_id": ids, "_at": [10, 5, None, 20, None, 1, 1]})
    # newest kept; older stale; no time: stale only in a tie (as the Spark rule's null logic);
    # ids not duplicated and null ids are never stale here (null ids fail product_id_not_null)
    assert stale_copies(rows, latest).to_pylist() == [False, True, False, True, True, False, False]
    assert stale_copies(rows, latest.slice(0, 0)).to_pylist() == [False] * 7
    # counted: 2 old copies of d, 3 tied copies of t and its copy without a time; of those, the 4
    # that pass every per-row rule are invalid now, the other 2 were invalid already
    rules = build_rules(load_contract("products"), ValidationConfig(), NOW)
    before = ValidationCounts(20, 5, {r.name: 0 for r in rules}, held=3)
    after = add_duplicates(before, duplicates, rules)
    assert after.per_rule["product_id_unique"] == 6 and after.rows_invalid == 9 and after.rows_read == 20
    assert after.held == 2  # the old copy of d that broke only a transient rule is invalid for good


def test_an_image_on_more_products_than_the_limit_is_a_placeholder_and_only_those_rows_break_it(
    spark, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    schema = load_contract("products").spark_schema(enforce_nullability=False)
    placeholder, variant, tile = b"grey square", b"one shirt in four sizes", "https://cdn/no-image.png"
    rows = [
        *[(f"cdn-{i}", placeholder, None) for i in range(21)],  # the CDN's outage image: over 20
        *[(f"size-{i}", variant, None) for i in range(4)],  # a shared photo of size variants
        *[(f"tile-{i}", None, tile) for i in range(21)],  # one "no image" URL
        ("again", placeholder, None),
        ("again", placeholder, None),  # a copy of an id counts once
        *[(f"own-{i}", f"photo {i}".encode(), None) for i in range(5)],
        ("none", None, None),
        *[(f"empty-{i}", b"", "") for i in range(25)],  # no image to count (the scoring pass fails b"")
    ]
    data = [(pid, "Shirt", None, image, uri, None, None, T, D) for pid, image, uri in rows]
    frame = spark.createDataFrame(data, schema)
    assert shared_image_rules(frame, 0) == ([], {})  # off
    assert shared_image_rules(frame, 22) == ([], {})  # none on more than 22 products: a clean run's answer
    [rule], found = shared_image_rules(frame, 20)
    assert rule.name == "image_shared" and rule.transient and "on 22" in rule.description
    key = f"sha256:{hashlib.sha256(placeholder).hexdigest()}"
    assert key == image_key(placeholder)  # the key the scoring pass gives the same bytes read
    assert found == {key: 22, f"uri:{tile}": 21}
    # what an earlier run found is a placeholder on however few products, while the limit is on
    [known], again = shared_image_rules(frame, 22, known={key, "uri:https://cdn/gone.png"})
    assert again == {key: 22}
    assert shared_image_rules(frame, 0, known={key}) == ([], {})
    # where a run finds more placeholders than it names, the known ones are named first
    monkeypatch.setattr(rules_module, "MAX_SHARED_IMAGES", 1)
    assert shared_image_rules(frame, 20, known={image_key(variant)})[1] == {image_key(variant): 4}
    marked = check_rows(frame, [known]).collect()
    assert sorted(r["product_id"] for r in marked if r["_reasons"]) == sorted(
        ["again", "again", *(f"cdn-{i}" for i in range(21))]
    )
    rules = [*build_rules(load_contract("products"), ValidationConfig(), NOW), rule]
    checked = check_rows(frame, rules).collect()
    flagged = sorted({r["product_id"] for r in checked if "image_shared" in r["_reasons"]})
    assert flagged == sorted(["again", *(f"cdn-{i}" for i in range(21)), *(f"tile-{i}" for i in range(21))])
    counts, _ = count_rows(frame, rules)
    # the copy of "again" breaks product_id_unique too: only the other 43 rows are held (transient)
    assert counts.per_rule["image_shared"] == 44 and counts.rows_invalid == 44 and counts.held == 42
    assert counts.invalid_fraction == pytest.approx(2 / len(rows))
