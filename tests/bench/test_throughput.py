"""bench throughput runs and reports what it promises (no speed is asserted here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog_enrichment.bench.throughput import ThroughputPlan, _ratios, run_throughput_benchmark
from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.versions import ModelVersion
from tests.conftest import tiny_config, tiny_registry

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(900)]


def test_in_process_modes_report_rates_and_ratios(tmp_path: Path, taxonomy, scoring_bundle) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config(inference={"device": "cpu", "batch_size": 64}, spark={"master": "local[2]"})
    plan = ThroughputPlan(
        ModelVersion("", "tiny", bundle_dir=scoring_bundle),
        (300,),
        modes=("raw", "predictor", "raw_tasks", "encoders"),
        repeats=1,
    )
    result = run_throughput_benchmark(
        cfg, taxonomy, plan, workdir=tmp_path / "bench", progress=lambda m: None
    )
    assert result["in_process_products"] == 300
    # each encoder alone in both runtimes (a torch bundle's encoders exported for the comparison)
    encoders = result["encoders_ms_per_product"]
    assert sorted(encoders) == ["image_encoder", "text_encoders.0"]
    assert all(figures[r] > 0 for figures in encoders.values() for r in ("torch", "onnx"))
    for mode in ("raw", "predictor", "raw_tasks"):
        assert result[f"{mode}_products_per_second"] > 0
        assert result[f"{mode}_ms_per_product"] == pytest.approx(1000 / result[f"{mode}_products_per_second"])
    assert result["predictor_ratio"] > 0 and 0 < result["predictor_forward_share"] <= 1
    assert not any(k.startswith(("job_", "peer_")) for k in result)  # no process was timed


def test_job_and_peer_run_as_whole_processes_on_the_registered_model(
    tmp_path: Path, taxonomy, incoming, scoring_bundle
) -> None:  # type: ignore[no-untyped-def]
    """The job and its peer (MLflow's ``spark_udf``) as processes, once each; the re-score mode is
    the job's process on a filled store (``tests/test_embedding_store.py`` proves what it writes),
    timed by ``bench throughput``, and the slope between sizes is arithmetic (the test below)."""
    _, uri, version, _ = tiny_registry(tmp_path, scoring_bundle, incoming)
    cfg = tiny_config(
        catalog={"root": str(tmp_path / "lake")},
        mlflow={"tracking_uri": uri, "registered_model": "tiny"},
        inference={"device": "cpu", "batch_size": 64},
    )
    messages: list[str] = []
    plan = ThroughputPlan(
        ModelVersion("tiny", version, bundle_dir=scoring_bundle),
        (100,),
        modes=("job", "peer"),
        repeats=1,
        config_args=["--set", "inference.device=cpu", "--set", "inference.batch_size=64"],
    )
    result = run_throughput_benchmark(
        cfg, taxonomy, plan, workdir=tmp_path / "bench", progress=messages.append
    )
    job, peer = (result["runs"]["100"][m][0] for m in ("job", "peer"))
    assert result["job_vs_peer_100"] == pytest.approx(job["seconds"] / peer["seconds"])
    for run in (job, peer):  # a JVM and Python workers did the work, each in its own process
        assert run["cpu_seconds"]["jvm"] > 0 and run["cpu_seconds"]["python_workers"] > 0
        assert run["worker_peak_rss_mb"] > 50 and run["driver_peak_rss_mb"] > 50
    assert [m.split()[-2] for m in messages if "run 1/1" in m] == ["job", "peer"]


def test_the_ratios_are_against_the_peer_and_the_slope_between_sizes() -> None:
    times = {
        "job_seconds_100": 30.0,
        "job_seconds_200": 40.0,
        "peer_seconds_100": 20.0,
        "peer_seconds_200": 25.0,
    }
    assert _ratios(times, (100, 200), ["job", "peer"]) == {
        "job_vs_peer_100": 1.5,
        "job_vs_peer_200": 1.6,
        "job_marginal_ms_per_product_100_200": 100.0,
        "peer_marginal_ms_per_product_100_200": 50.0,
    }
    assert _ratios(times, (100,), ["job"]) == {}  # nothing to compare against


@pytest.mark.timeout(60)
def test_what_the_benchmark_refuses_before_doing_anything(tmp_path: Path, taxonomy, scoring_bundle) -> None:  # type: ignore[no-untyped-def]
    bundle = ModelVersion("", "tiny", bundle_dir=scoring_bundle)
    with pytest.raises(CatalogEnrichError, match="device cpu only"):
        run_throughput_benchmark(
            tiny_config(), taxonomy, ThroughputPlan(bundle, (10,), modes=("raw", "raw_tasks"), device="cuda"),
            workdir=tmp_path, progress=lambda m: None,
        )  # fmt: skip
    with pytest.raises(CatalogEnrichError, match="registered model"):
        run_throughput_benchmark(
            tiny_config(), taxonomy, ThroughputPlan(bundle, (10,), modes=("job",)), workdir=tmp_path,
            progress=lambda m: None,
        )  # fmt: skip
    assert not any(tmp_path.iterdir())  # refused before generating or loading anything
