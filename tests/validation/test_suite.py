"""The rules as a Great Expectations suite: the exported file, added to a GX context and run on a
Spark DataFrame, counts what the row rules count."""

from __future__ import annotations

import json

import pytest

from catalog_enrichment.config import ValidationConfig
from catalog_enrichment.contracts import load_contract
from catalog_enrichment.validation.rules import build_rules, count_rows
from catalog_enrichment.validation.suite import build_suite, write_suite
from tests.validation import test_rules

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

frame = test_rules.frame  # the rows with a known answer each (a module fixture)
NOW = test_rules.NOW


@pytest.mark.slow
def test_the_exported_great_expectations_suite_counts_the_same_rows(frame, tmp_path) -> None:  # type: ignore[no-untyped-def]
    contract, cfg = load_contract("products"), ValidationConfig()
    rules = build_rules(contract, cfg, NOW)
    suite = build_suite(rules, cfg, contract, None)
    result = _validate_with_gx(frame, write_suite(suite, tmp_path / "products.json"))
    counts = count_rows(frame, rules)[0].per_rule
    by_rule = [r for r in result["results"] if "rule" in r["expectation_config"]["meta"]]
    gx = {r["expectation_config"]["meta"]["rule"]: r["result"]["unexpected_count"] for r in by_rule}
    # without a model's input baseline: the contract's columns and the row count besides the rules
    assert [r["expectation_config"]["type"] for r in result["results"] if r not in by_rule] == [
        "expect_table_columns_to_match_set",
        "expect_table_row_count_to_be_between",
    ]
    assert set(gx) == {r.name for r in rules if r.expectation is not None}
    assert {r.name for r in rules if r.expectation is None} == {
        f"{c}_valid_utf8"
        for c in ("product_id", "title", "description", "image_uri", "category", "merchant_attributes")
    }
    for rule, n in gx.items():
        # GX flags every row of a duplicated id (4), the row rule only the ones quarantined (3)
        assert n == (4 if rule == "product_id_unique" else counts[rule]), rule


def _validate_with_gx(frame, suite_file):  # type: ignore[no-untyped-def]
    """What a GX project does with the file: add the suite to a context and validate a Spark batch."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    suite = context.suites.add(gx.ExpectationSuite(**json.loads(suite_file.read_text())))
    batch = (
        context.data_sources.add_spark(name="marketplace")
        .add_dataframe_asset(name="products")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    return batch.validate(suite, result_format={"result_format": "BASIC"}).to_json_dict()


@pytest.mark.timeout(120)
def test_a_model_that_reads_no_photo_expects_no_share_of_photos() -> None:
    """The critical share of products without an image stops a night for a model that reads the
    photo; a text-only model's suite has no such expectation (a feed without photos changes nothing
    it reads)."""
    from catalog_enrichment.health import ProductInputs, input_baseline

    n = 20
    inputs = input_baseline(
        ProductInputs(["t"] * n, ["d"] * n, [True] * n, [None] * n, [None] * n, [None] * n)
    )
    contract, cfg = load_contract("products"), ValidationConfig()

    def image_checks(reads_images: bool) -> list[str]:
        suite = build_suite([], cfg, contract, inputs, reads_images=reads_images)
        return [e.meta["check"] for e in suite.expectations if "without an image" in e.meta["check"]]

    assert len(image_checks(True)) == 1 and image_checks(False) == []
