"""The products contract as row-level rules (quarantine) and as a Great Expectations suite (report)."""

from catalog_enrichment.validation.rules import (
    CircuitBreakerTripped,
    Rule,
    ValidationCounts,
    build_rules,
    check_breaker,
    check_rows,
    count_rows,
    quarantine_rows,
)
from catalog_enrichment.validation.suite import run_suite

__all__ = [
    "CircuitBreakerTripped",
    "Rule",
    "ValidationCounts",
    "build_rules",
    "check_breaker",
    "check_rows",
    "count_rows",
    "quarantine_rows",
    "run_suite",
]
