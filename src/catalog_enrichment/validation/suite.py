"""The validation rules as a Great Expectations 1.x expectation suite, for a marketplace's own GX
project (``catalog-enrich expectations``).

The job itself does not run it: the row rules (:mod:`.rules`) count every rule and mark every row
in the one pass the job makes anyway, and the suite would re-read the source to count the same rows
again while deciding nothing. What the suite says, each rule says the same way: the same column,
the same regex or bound (the UTF-8 and ``<column>_readable`` rules have no expectation). GX counts
*every* row of a duplicated id as unexpected, the row rule only the stale copies, so the two counts
differ for ``product_id_unique`` by design.

The file is GX's own JSON form of the suite; a GX project adds it with
``context.suites.add(gx.ExpectationSuite(**json.load(f)))``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from catalog_enrichment.validation.rules import Rule

__all__ = ["build_suite", "write_suite"]


def build_suite(rules: Sequence[Rule], *, name: str = "products") -> Any:
    """The rules' expectations as a ``great_expectations.ExpectationSuite`` named ``name``, in the
    rules' order, each carrying its rule's name and description in ``meta``."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx

    gx.get_context(mode="ephemeral")  # a suite can only be built inside a context
    suite = gx.ExpectationSuite(name=name)
    for rule in rules:
        if rule.expectation is not None:
            expectation = rule.expectation()
            expectation.meta = {"rule": rule.name, "description": rule.description}
            suite.add_expectation(expectation)
    return suite


def write_suite(rules: Sequence[Rule], path: Path, *, name: str = "products") -> Path:
    """Write :func:`build_suite` to ``path`` as GX's JSON; the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_suite(rules, name=name).to_json_dict(), indent=2) + "\n")
    return path
