"""bench throughput runs and reports what the issue asks for (no speed is asserted here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog_enrichment.bench.throughput import run_throughput_benchmark
from catalog_enrichment.enrich import ModelRef
from catalog_enrichment.errors import CatalogEnrichError
from tests.conftest import tiny_config

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(600)]


def test_throughput_benchmark_reports_every_mode_ratio_and_memory(
    spark, tmp_path: Path, taxonomy, scoring_bundle
) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(catalog={"root": str(tmp_path / "lake")}, inference={"device": "cpu", "batch_size": 64})
    result = run_throughput_benchmark(
        cfg,
        taxonomy,
        model=ModelRef("tiny", "1", scoring_bundle),
        products=300,
        workdir=tmp_path / "bench",
        modes=("raw", "predictor", "raw_tasks", "job"),
        repeats=1,
        spark=spark,
        sweep=(150, 300),
        progress=lambda m: None,
    )
    assert result["products"] == 300
    for mode in ("raw", "predictor", "raw_tasks", "job"):
        assert result[f"{mode}_products_per_second"] > 0
    assert result["predictor_ratio"] > 0 and result["job_ratio"] > 0
    # raw_tasks: one single-threaded model process per core of the session, the job's layout
    assert result["raw_tasks_processes"] == spark.sparkContext.defaultParallelism
    tasks, job = result["runs"]["raw_tasks"][0], result["runs"]["job"][0]
    assert result["job_ratio_to_raw_tasks_per_run"] == [
        pytest.approx(job["products_per_second"] / tasks["products_per_second"])
    ]
    assert 0 < result["predictor_forward_share"] <= 1
    assert result["runs"]["job"][0]["rows_scored"] == 300  # the generated products are all valid
    assert set(result["job_stage_seconds"]) == {"read", "validate", "score", "decide", "write"}
    assert result["worker_peak_rss_mb"] > 50 and result["driver_peak_rss_mb"] > 50
    cpu = result["job_cpu_seconds"]
    assert set(cpu) == {"driver", "jvm", "python_workers"}
    assert cpu["jvm"] > 0 and cpu["python_workers"] > 0  # Spark read the table, the workers scored
    small, large = result["sweep"]
    assert (small["products"], large["products"]) == (150, 300)
    assert "marginal_ms_per_product" not in small
    want = 1000 * (large["seconds"] - small["seconds"]) / 150
    assert large["marginal_ms_per_product"] == pytest.approx(want)


@pytest.mark.timeout(60)
def test_raw_tasks_is_a_cpu_layout_and_refuses_a_gpu(tmp_path: Path, taxonomy, scoring_bundle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CatalogEnrichError, match="device cpu only"):
        run_throughput_benchmark(
            tiny_config(),
            taxonomy,
            model=ModelRef("tiny", "1", scoring_bundle),
            products=10,
            workdir=tmp_path,
            modes=("raw", "raw_tasks"),
            device="cuda",
            progress=lambda m: None,
        )
    assert not any(tmp_path.iterdir())  # refused before generating or loading anything
