"""The rules as a Great Expectations suite: the exported file, added to a GX context and run on a
Spark DataFrame, counts what the row rules count."""

from __future__ import annotations

import json

import pytest

from catalog_enrichment.config import ValidationConfig
from catalog_enrichment.contracts import load_contract
from catalog_enrichment.validation.rules import build_rules, count_rows
from catalog_enrichment.validation.suite import write_suite
from tests.validation import test_rules

pytestmark = [pytest.mark.spark, pytest.mark.timeout(300)]

frame = test_rules.frame  # the rows with a known answer each (a module fixture)
NOW = test_rules.NOW


@pytest.mark.slow
def test_the_exported_great_expectations_suite_counts_the_same_rows(frame, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rules = build_rules(load_contract("products"), ValidationConfig(), NOW)
    result = _validate_with_gx(frame, write_suite(rules, tmp_path / "products.json"))
    counts = count_rows(frame, rules)[0].per_rule
    gx = {r["expectation_config"]["meta"]["rule"]: r["result"]["unexpected_count"] for r in result["results"]}
    assert set(gx) == {r.name for r in rules if r.expectation is not None}
    assert {r.name for r in rules if r.expectation is None} == {
        f"{c}_valid_utf8" for c in ("product_id", "title", "description", "image_uri")
    }
    for rule, n in gx.items():
        # GX flags every row of a duplicated id (4), the row rule only the ones quarantined (3)
        assert n == (4 if rule == "product_id_unique" else counts[rule]), rule
    assert result["success"] is False


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
