"""Run health through the real job: a run of products like the calibration's passes every check, a
feed whose titles are stripped to ids and whose photos are one placeholder fails, and
``report --health --check`` exits 0 and 1 on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from catalog_enrichment.catalog import open_catalog
from catalog_enrichment.catalog.lakehouse import read_table, write_table
from catalog_enrichment.cli import main
from catalog_enrichment.data.images import encode_image
from catalog_enrichment.enrich import run_enrichment
from catalog_enrichment.versions import ModelVersion
from tests.conftest import tiny_config

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(600)]


def _run(spark: Any, taxonomy: Any, bundle: Path, products: pa.Table, root: Path, run_id: str) -> Any:
    write_table(root / "products", products)
    cfg = tiny_config(catalog={"root": str(root / "lake")}, inference={"batch_size": 64, "device": "cpu"})
    catalog = open_catalog(cfg.catalog, products=root / "products")
    outcome = run_enrichment(
        spark, cfg, taxonomy, model=ModelVersion("tiny", "1", bundle_dir=bundle), full=True,
        run_id=run_id, progress=lambda _m: None, catalog=catalog,
    )  # fmt: skip
    return outcome.report.summary()


def test_a_clean_run_passes_and_a_stripped_feed_fails_its_health_checks(  # type: ignore[no-untyped-def]
    spark, incoming, taxonomy, scoring_bundle, tmp_path, capsys
) -> None:
    products = read_table(incoming.products).slice(0, 1000)
    clean = _run(spark, taxonomy, scoring_bundle, products, tmp_path / "clean", "clean")
    assert [h["attribute"] for h in clean["health"]] == taxonomy.names
    assert all(h["scored"] >= 50 and h["psi"] is not None for h in clean["health"])
    assert clean["health_failures"] == []

    placeholder = encode_image(np.full((32, 32, 3), 200, np.uint8))
    n = products.num_rows
    stripped = products.set_column(
        products.schema.get_field_index("title"), "title", products.column("product_id")
    )
    stripped = stripped.set_column(
        stripped.schema.get_field_index("description"), "description", pa.nulls(n, pa.string())
    )
    stripped = stripped.set_column(
        stripped.schema.get_field_index("image"), "image", pa.array([placeholder] * n, pa.binary())
    )
    drifted = _run(spark, taxonomy, scoring_bundle, stripped, tmp_path / "drifted", "drifted")
    assert any("score drift PSI" in f for f in drifted["health_failures"])

    for root, run_id, code in ((tmp_path / "clean", "clean", 0), (tmp_path / "drifted", "drifted", 1)):
        capsys.readouterr()
        args = ["report", "--health", "--check", "--catalog", str(root / "lake"), "--run-id", run_id]
        assert main(args) == code
        out = capsys.readouterr().out
        assert ("every check passed" in out) == (code == 0) and ("failed: " in out) == (code == 1)
