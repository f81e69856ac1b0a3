"""Run health through the real job on both catalogs: a run of products like the held-out ones passes
every check; the same products with their photos' red and blue swapped fail the colour's value mix
and, with that check in block mode, the colour keeps the values the clean run wrote while the other
attributes commit; titles stripped to ids fail the input checks (warn mode: nothing blocked). The
``run_health`` table holds every check; ``report --health --check`` exits 0 and 1 on the runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from catalog_enrichment.bench.drift import colour_shift, stripped_titles
from catalog_enrichment.catalog import open_catalog
from catalog_enrichment.catalog.lakehouse import read_table, write_table
from catalog_enrichment.cli import main
from catalog_enrichment.config import AppConfig
from catalog_enrichment.enrich import run_enrichment
from catalog_enrichment.versions import ModelVersion
from tests.conftest import tiny_config

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(900)]


def _with_health(cfg: AppConfig, **modes: str) -> AppConfig:
    health = cfg.validation.health.model_copy(update=modes)
    return cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"health": health})})


def _values(catalog: Any, attribute: str) -> list[tuple[Any, ...]]:
    rows = catalog.attribute_rows().to_pylist()
    return sorted((r["product_id"], r["value"], r["run_id"]) for r in rows if r["attribute"] == attribute)


def _runs(spark: Any, cfg: AppConfig, taxonomy: Any, bundle: Path, catalog: Any, load: Any) -> None:
    """The clean products; the same with colour-shifted photos, value mix in block mode; the same
    with titles stripped, warn mode - through ``catalog`` (``load`` puts a products table in it)."""
    model = ModelVersion("tiny", "1", bundle_dir=bundle)

    def run(config: AppConfig, run_id: str) -> dict[str, Any]:
        outcome = run_enrichment(
            spark, config, taxonomy, model=model, full=True, run_id=run_id, progress=lambda _m: None,
            catalog=catalog,
        )  # fmt: skip
        return outcome.report.summary()

    def failed(summary: dict[str, Any]) -> set[tuple[str, str]]:
        return {(h["scope"], h["check"]) for h in summary["health"] if h["status"] == "failed"}

    products = load(None)
    clean = run(cfg, "clean")
    assert clean["health_failures"] == [] and clean["health_blocked"] == []
    checks = catalog.keyed_rows("run_health").to_pylist()
    assert len(checks) == 4 * len(taxonomy.names) + 6  # 4 per attribute, 6 on the inputs
    assert {c["run_id"] for c in checks} == {"clean"}
    # every check passes; an attribute the model writes nothing of has no precision to estimate
    assert all(c["status"] == "passed" or c["message"] == "nothing written" for c in checks)
    before = {a: _values(catalog, a) for a in taxonomy.names}
    assert before["color"]

    load(colour_shift(products))
    shifted = run(_with_health(cfg, value_mix="block"), "shifted")
    assert ("color", "value_mix") in failed(shifted) and shifted["health_blocked"] == ["color"]
    for attribute in taxonomy.names:
        after = _values(catalog, attribute)
        if attribute == "color":  # what the clean run wrote, untouched
            assert after == before[attribute]
        else:  # this run's decisions replaced the clean run's
            assert {r[2] for r in after} <= {"shifted"}, attribute
            assert len(after) == shifted_written(catalog, attribute)
    rows = catalog.keyed_rows("run_health")
    mine = rows.filter(pc.equal(rows["run_id"], "shifted")).to_pylist()
    assert [(r["scope"], r["check"]) for r in mine if r["blocked"]] == [("color", "value_mix")]
    assert {r["mode"] for r in mine if r["check"] == "value_mix"} == {"block"}
    assert all(r["model_version"] == "1" and r["message"] for r in mine if r["status"] == "failed")

    load(stripped_titles(products))
    stripped = run(cfg, "stripped")
    assert {("input", "title_length"), ("input", "description")} <= failed(stripped)
    assert stripped["health_blocked"] == [] and len(stripped["health_failures"]) == len(failed(stripped))


def shifted_written(catalog: Any, attribute: str) -> int:
    """Values the ``shifted`` run reported writing for ``attribute``."""
    return {r.run_id: r for r in catalog.read_reports()}["shifted"].written_per_attribute[attribute]


def test_health_on_the_lakehouse_and_report_health_check(  # type: ignore[no-untyped-def]
    spark, incoming, taxonomy, scoring_bundle, tmp_path, capsys
) -> None:
    source = read_table(incoming.products)
    clean = source.filter(pc.is_valid(source["product_id"])).slice(0, 1000)
    cfg = tiny_config(
        catalog={"root": str(tmp_path / "lake"), "products": str(tmp_path / "products")},
        inference={"batch_size": 64, "device": "cpu"},
    )

    def load(products: pa.Table | None) -> pa.Table:
        write_table(tmp_path / "products", clean if products is None else products, mode="overwrite")
        return clean

    _runs(spark, cfg, taxonomy, scoring_bundle, open_catalog(cfg.catalog), load)
    for run_id, code, says in (
        ("clean", 0, "every check passed"),
        ("shifted", 1, "blocked (values not written): color"),
        ("stripped", 1, "failed: "),
    ):
        capsys.readouterr()
        args = ["report", "--health", "--check", "--catalog", str(tmp_path / "lake"), "--run-id", run_id]
        assert main(args) == code
        out = capsys.readouterr().out
        assert says in out and ("color: value mix PSI" in out) == (run_id == "shifted")


@pytest.mark.postgres
def test_health_on_postgres(spark, incoming, taxonomy, scoring_bundle, pg_catalog_config) -> None:  # type: ignore[no-untyped-def]
    source = read_table(incoming.products)
    clean = source.filter(pc.is_valid(source["product_id"])).slice(0, 1000)
    cfg = tiny_config(inference={"batch_size": 64, "device": "cpu"})
    cfg = cfg.model_copy(update={"catalog": pg_catalog_config})
    catalog = open_catalog(cfg.catalog)

    def load(products: pa.Table | None) -> pa.Table:
        catalog.load_products(clean if products is None else products)  # upserts by id
        return clean

    _runs(spark, cfg, taxonomy, scoring_bundle, catalog, load)
