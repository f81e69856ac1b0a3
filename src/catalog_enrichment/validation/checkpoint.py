"""A run's batch validated by a Great Expectations checkpoint (``validation.great_expectations``).

The run hands GX the DataFrame it already holds (a Spark data source with one DataFrame asset, not
a second reader of the catalog): the suite of :mod:`.suite`, one validation definition and one
checkpoint, all named ``catalog-enrichment``, in a file-backed GX project (``validation.gx_project``,
default ``<catalog.root>/gx``). The checkpoint stores the validation result under the run's id and
updates the project's Data Docs. The job runs it beside the row rules and awaits it before anything
is scored (``enrich/run.py``). A failed ``critical`` expectation stops the run before anything is
scored, like the circuit breaker (:class:`ExpectationsFailed`, its expectations named in one line);
a failed ``warning`` one is reported and the run goes on.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from catalog_enrichment.validation.rules import CircuitBreakerTripped
from catalog_enrichment.validation.suite import CRITICAL, main_with_a_file, quiet_gx

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

__all__ = ["NAME", "BatchValidation", "ExpectationsFailed", "gx_project", "validate_batch"]

NAME = "catalog-enrichment"  # the data source, validation definition and checkpoint


class ExpectationsFailed(CircuitBreakerTripped):
    """A critical expectation failed: the run stops before anything is scored."""


@dataclass(frozen=True)
class BatchValidation:
    """What the checkpoint found: its stored result's id, each failed expectation in one line
    (critical ones first), and the result's Data Docs page."""

    result_id: str
    evaluated: int
    critical: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    docs: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gx_project(configured: str | None, catalog_root: str | Path) -> Path:
    """The folder holding the GX project's ``gx/``: ``validation.gx_project``, or under the catalog root."""
    return Path(configured) if configured else Path(catalog_root) / "gx"


def validate_batch(df: DataFrame, suite: Any, *, project: Path, run_id: str) -> BatchValidation:
    """Run the checkpoint over ``df`` (see the module docstring); the result is stored under
    ``run_id`` and the Data Docs updated, whatever it found."""
    with main_with_a_file():
        return _validate_batch(df, suite, project, run_id)


def _validate_batch(df: DataFrame, suite: Any, project: Path, run_id: str) -> BatchValidation:
    gx = quiet_gx()
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    started = time.perf_counter()
    project.mkdir(parents=True, exist_ok=True)
    context = gx.get_context(mode="file", project_root_dir=str(project))
    # no progress bars in a job's log; in memory only: a project of the user's keeps its own config
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = _batch_definition(context)
    suite = context.suites.add_or_update(suite)
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=NAME, data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=NAME,
            validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            # counts and shares, without the sample of unexpected values (a Spark job each)
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 0},
        )
    )
    outcome = checkpoint.run(batch_parameters={"dataframe": df}, run_id=RunIdentifier(run_name=run_id))
    (identifier, result), *_ = outcome.run_results.items()
    critical: list[str] = []
    warnings: list[str] = []
    for r in result.results:
        if not r.success:
            (critical if str(r.expectation_config.severity.value) == CRITICAL else warnings).append(
                _failed(r)
            )
    pages = context.get_docs_sites_urls(resource_identifier=identifier)
    docs = next((p["site_url"] for p in pages if p.get("site_url")), None)
    return BatchValidation(
        result_id=str(identifier).split("::", 1)[-1],
        evaluated=len(result.results),
        critical=critical,
        warnings=warnings,
        docs=docs.removeprefix("file://") if docs else None,
        seconds=round(time.perf_counter() - started, 3),
    )


def _batch_definition(context: Any) -> Any:
    # not persisted: GX would cache the whole batch, photos included, and never release it
    try:
        source = context.data_sources.get(NAME)
    except KeyError:
        source = context.data_sources.add_spark(NAME, persist=False)
    if source.persist:  # a project a version before this one wrote
        source = context.data_sources.add_or_update_spark(NAME, persist=False)
    try:
        asset = source.get_asset("batch")
    except LookupError:
        asset = source.add_dataframe_asset("batch")
    try:
        return asset.get_batch_definition("whole batch")
    except KeyError:
        return asset.add_batch_definition_whole_dataframe("whole batch")


def _failed(r: Any) -> str:
    """One failed expectation in one line: its type, column, severity, what it checks and what GX
    observed."""
    config, got = r.expectation_config, r.result or {}
    observed: Any = got.get("observed_value")
    if r.exception_info and r.exception_info.get("raised_exception"):  # e.g. its SQL's column is missing
        observed = f"error {r.exception_info.get('exception_message')}"
    elif "unexpected_percent" in got:
        mostly = config.kwargs.get("mostly", 1)
        observed = f"{got['unexpected_percent']:.1f}% of rows unexpected (mostly {mostly})"
    elif (got.get("details") or {}).get("mismatched"):
        observed = f"missing {got['details']['mismatched'].get('missing')}"
    elif config.type == "unexpected_rows_expectation" and observed is not None:
        observed = f"{observed:,} rows"
    column = f" {config.kwargs['column']}" if config.kwargs.get("column") else ""
    what = config.meta.get("check") or config.meta.get("description")
    return f"{config.type}{column} ({config.severity.value}): {what}; observed {observed}"
