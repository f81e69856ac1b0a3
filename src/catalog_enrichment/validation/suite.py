"""The validation rules as a Great Expectations 1.x suite, run on the Spark DataFrame.

The suite's results (per expectation: success, unexpected count and share) go into the run report;
the row-level quarantine comes from the same rules as Spark expressions (:mod:`.rules`). GX counts
*every* row of a duplicated id as unexpected, the row rule only the stale copies, so the two counts
differ for ``product_id_unique`` by design; every other rule counts the same rows.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from catalog_enrichment.validation.rules import Rule

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["run_suite"]


def run_suite(df: DataFrame, rules: list[Rule], *, suite_name: str = "products") -> dict[str, Any]:
    """Validate ``df`` with the rules' expectations on an ephemeral GX context; JSON-able summary."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_spark(name="catalog_enrichment")
        .add_dataframe_asset(name=suite_name)
        .add_batch_definition_whole_dataframe("whole_table")
    )
    suite = gx.ExpectationSuite(name=suite_name)
    names: list[str] = []
    for rule in rules:
        if rule.expectation is not None:
            suite.add_expectation(rule.expectation())
            names.append(rule.name)
    suite = context.suites.add(suite)
    # only the checked columns: no pass of the suite reads the image bytes
    checked = df.select(*dict.fromkeys(r.column for r in rules if r.expectation is not None))
    batch = batch_definition.get_batch(batch_parameters={"dataframe": checked})
    # counts only: no sample of unexpected values (one more Spark job per expectation; the quarantine
    # table already holds every bad row whole)
    result_format = {"result_format": "BASIC", "partial_unexpected_count": 0}
    result = batch.validate(suite, result_format=result_format).to_json_dict()
    by_key = {_key(r["expectation_config"]): r for r in result["results"]}
    expectations = []
    for name, expectation in zip(names, suite.expectations, strict=True):
        r = by_key.get(_key(expectation.configuration.to_json_dict()), {})
        res = r.get("result", {})
        expectations.append(
            {
                "rule": name,
                "expectation": expectation.expectation_type,
                "column": expectation.configuration.kwargs.get("column"),
                "success": bool(r.get("success", False)),
                "unexpected_count": int(res.get("unexpected_count") or 0),
                "unexpected_percent": float(res.get("unexpected_percent") or 0.0),
                "element_count": int(res.get("element_count") or 0),
            }
        )
    return {
        "suite": suite_name,
        "success": bool(result["success"]),
        "statistics": result["statistics"],
        "expectations": expectations,
    }


def _key(config: dict[str, Any]) -> tuple[str, str]:
    kwargs = {k: v for k, v in config.get("kwargs", {}).items() if k != "batch_id"}
    return config.get("type", ""), repr(sorted(kwargs.items()))
