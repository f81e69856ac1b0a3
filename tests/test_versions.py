"""A model version's name: its models:/ URI, and its bundle folder only once downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog_enrichment.versions import ModelVersion

pytestmark = pytest.mark.timeout(10)


def test_a_version_is_pinned_by_number_and_its_bundle_exists_only_once_downloaded(tmp_path: Path) -> None:
    version = ModelVersion("catalog-enrichment", "7", run_id="abc")
    assert version.uri == "models:/catalog-enrichment/7"
    with pytest.raises(ValueError, match="models:/catalog-enrichment/7 has no local bundle folder"):
        _ = version.bundle
    assert ModelVersion("catalog-enrichment", "7", bundle_dir=tmp_path).bundle == tmp_path
