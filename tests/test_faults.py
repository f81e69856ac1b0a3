"""The fault hooks: one environment variable names one point (known answers)."""

from __future__ import annotations

import pytest

from catalog_enrichment.faults import FAULT_ENV, armed

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("value", "point", "expected"),
    [
        (None, "after_stage", None),
        ("after_stage", "after_stage", ""),
        ("after_stage", "after_merge", None),
        ("rank:1:3", "rank", "1:3"),
        ("worker:/tmp/a:b", "worker", "/tmp/a:b"),
        ("worker:/tmp/m", "rank", None),
        ("ranked", "rank", None),
    ],
)
def test_a_fault_is_armed_only_at_the_point_it_names(
    monkeypatch: pytest.MonkeyPatch, value: str | None, point: str, expected: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(FAULT_ENV, raising=False)
    else:
        monkeypatch.setenv(FAULT_ENV, value)
    assert armed(point) == expected
