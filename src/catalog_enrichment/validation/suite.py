"""The Great Expectations 1.x expectation suite a run validates its batch with
(:mod:`.checkpoint`), and that ``catalog-enrich expectations`` exports for a marketplace's own GX
project.

Two kinds of expectation:

- **The row rules** (:mod:`.rules`), each said the same way: the same column, the same regex or
  bound (the UTF-8 and ``<column>_readable`` rules have no expectation), at severity ``warning``
  with ``mostly`` at the circuit breaker's share. The row rules themselves quarantine every failing
  row and the breaker stops the run; the suite records how many rows each rule caught. GX counts
  *every* row of a duplicated id as unexpected, the row rule only the stale copies, so the two
  counts differ for ``product_id_unique`` by design.
- **Batch expectations** the row rules cannot express: the contract's columns are all there, the
  row count within ``validation.min_rows``/``max_rows``, and the shares of products without an
  image, without a description and outside the categories the model was trained on, each bounded
  by the training products' share plus ``validation.max_share_increase``. Columns, row count and
  images are ``critical`` (a failure stops the run before anything is scored); descriptions and
  categories are ``warning`` (reported; the run goes on). The shares need the model's input
  baseline (its health profile); without one those three expectations are left out.

The exported file is GX's own JSON form of the suite; a GX project adds it with
``context.suites.add(gx.ExpectationSuite(**json.load(f)))``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from catalog_enrichment.config import ValidationConfig
from catalog_enrichment.contracts import Contract
from catalog_enrichment.health.profile import IMAGE_STATES, NONE, OTHER, InputBaseline
from catalog_enrichment.validation.rules import Rule

__all__ = ["CRITICAL", "WARNING", "build_suite", "main_with_a_file", "quiet_gx", "write_suite"]

CRITICAL, WARNING = "critical", "warning"


def quiet_gx() -> Any:
    """``great_expectations``, imported without usage statistics, progress bars or INFO logging."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    with main_with_a_file():
        import great_expectations as gx
    return gx


@contextlib.contextmanager
def main_with_a_file() -> Iterator[None]:
    """GX imports ``pyspark.sql.connect`` modules (at import and when a Spark data source is used),
    and each takes a process whose ``__main__`` has no file (``python -c``) for pyspark's own
    doctests: without Spark Connect's extras it calls ``sys.exit(0)``. Such a ``__main__`` gets a
    file name meanwhile."""
    main = sys.modules.get("__main__")
    bare = main is not None and getattr(main, "__spec__", None) is None and not hasattr(main, "__file__")
    if bare:
        main.__file__ = "<string>"  # type: ignore[union-attr]
    try:
        yield
    finally:
        if bare:
            del main.__file__  # type: ignore[union-attr]


def build_suite(
    rules: Sequence[Rule],
    cfg: ValidationConfig,
    contract: Contract,
    inputs: InputBaseline | None,
    *,
    name: str = "products",
    reads_images: bool = True,
) -> Any:
    """The run's suite (see the module docstring) as a ``great_expectations.ExpectationSuite`` named
    ``name``: the batch expectations, then the rules' in the rules' order; each carries what it
    checks in ``meta`` (a rule's name and description). ``reads_images`` False: the model reads no
    photo, so the share without one is not expected."""
    gx = quiet_gx()
    with main_with_a_file():
        gx.get_context(mode="ephemeral")  # a suite can only be built inside a context
        suite = gx.ExpectationSuite(name=name)
        for expectation in _batch_expectations(cfg, contract, inputs, reads_images):
            suite.add_expectation(expectation)
        for rule in rules:
            if rule.expectation is not None:
                expectation = rule.expectation()
                expectation.severity = WARNING
                expectation.mostly = round(1.0 - cfg.max_invalid_fraction, 6)
                expectation.meta = {"rule": rule.name, "description": rule.description}
                suite.add_expectation(expectation)
    return suite


def _batch_expectations(
    cfg: ValidationConfig, contract: Contract, inputs: InputBaseline | None, reads_images: bool
) -> list[Any]:
    import great_expectations.expectations as gxe

    def made(expectation: Any, severity: str, description: str) -> Any:
        expectation.severity = severity
        expectation.meta = {"check": description}
        return expectation

    out = [
        made(
            gxe.ExpectTableColumnsToMatchSet(column_set=contract.names, exact_match=False),
            CRITICAL,
            "every column of the products contract (schemas/products.yaml) is there",
        ),
        made(
            gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows, max_value=cfg.max_rows),
            CRITICAL,
            "the batch's row count within validation.min_rows and validation.max_rows",
        ),
    ]
    if inputs is None:
        return out
    products, more = inputs.products, cfg.max_share_increase
    if reads_images:  # a text-only model reads no photo: a feed without them is no concern of its
        no_image = min(1.0, inputs.image[IMAGE_STATES.index("absent")] / products + more)
        # neither image bytes nor an image_uri (an empty one is none, unless the baseline counted it one):
        # the products without one, when their share is above the bound
        nothing = "image IS NULL AND " + (
            "image_uri IS NULL" if inputs.empty_uri_is_photo else "(image_uri IS NULL OR image_uri = '')"
        )
        share = f"(SELECT avg(CASE WHEN {nothing} THEN 1.0 ELSE 0.0 END) FROM {{batch}})"
        query = f"SELECT product_id FROM {{batch}} WHERE {nothing} AND {share} > {no_image:.4f}"
        out.append(
            made(
                gxe.UnexpectedRowsExpectation(
                    unexpected_rows_query=query,
                    description=f"at most {no_image:.1%} of the products without an image",
                ),
                CRITICAL,
                f"the share of products without an image at most the training products' plus {more:g}",
            )
        )
    without, _with = inputs.description
    out.append(
        made(
            gxe.ExpectColumnValuesToNotBeNull(
                column="description", mostly=round(max(0.0, 1.0 - without / products - more), 4)
            ),
            WARNING,
            f"the share of products without a description at most the training products' plus {more:g}",
        )
    )
    named = sorted(c for c in inputs.categories if c not in (OTHER, NONE))
    with_category = products - inputs.categories.get(NONE, 0)
    if named and with_category:
        known = 1.0 - inputs.categories.get(OTHER, 0) / with_category
        out.append(
            made(
                gxe.ExpectColumnValuesToBeInSet(
                    column="category", value_set=named, mostly=round(max(0.0, known - more), 4)
                ),
                WARNING,
                f"the share of products in a category the model was trained on at least the training "
                f"products' less {more:g}",
            )
        )
    return out


def write_suite(suite: Any, path: Path) -> Path:
    """Write a suite of :func:`build_suite` to ``path`` as GX's JSON; the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(suite.to_json_dict(), indent=2) + "\n")
    return path
