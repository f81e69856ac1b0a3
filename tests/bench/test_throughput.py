"""bench throughput runs and reports what it promises (no speed is asserted here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from catalog_enrichment.bench.throughput import (
    ThroughputPlan,
    _ratios,
    measure_process,
    run_throughput_benchmark,
)
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


def test_the_peer_scores_what_the_predictor_scores_through_mlflow_spark_udf(
    tmp_path: Path, spark, incoming, scoring_bundle
) -> None:  # type: ignore[no-untyped-def]
    """The peer ``bench throughput --peer`` times (MLflow's ``spark_udf`` on the registered model), run
    here on this worker's Spark session, gives each product the scores of the job's predictor."""
    import numpy as np
    import pyarrow.parquet as pq

    from catalog_enrichment.bench import peer
    from catalog_enrichment.catalog.lakehouse import read_table, write_table
    from catalog_enrichment.inference.bundle import load_bundle
    from catalog_enrichment.inference.predictor import BatchPredictor

    _, _, version, _ = tiny_registry(tmp_path, scoring_bundle, incoming)
    table = read_table(incoming.products).slice(0, 200)
    ids = table["product_id"].to_pylist()
    once = [i for i, pid in enumerate(ids) if pid is not None and ids.count(pid) == 1]
    products = tmp_path / "products"
    write_table(products, table.take(once))  # one row per product id: the scores are keyed by it
    out = tmp_path / "scores"
    uri = f"models:/tiny/{version}"
    assert peer.main(["--model-uri", uri, "--products", str(products), "--out", str(out)]) == 0
    served = pq.read_table(out).to_pandas().set_index("product_id")["scores"]
    frame = read_table(products).to_pandas()  # every column the job's predictor reads
    expected = BatchPredictor(load_bundle(scoring_bundle), device="cpu").score_frame(frame)
    expected.index = frame["product_id"]
    assert sorted(served.index) == sorted(expected.index)
    got = np.stack([served[i] for i in expected.index])
    np.testing.assert_allclose(got, expected.to_numpy(), atol=1e-5)


def test_the_peer_passes_every_input_the_registered_signature_names() -> None:
    """MLflow passes a pyfunc model only the struct fields given to ``spark_udf``: the peer gives all
    the signature's inputs (a lexical fusion reads the category, an imageless product its
    image_uri), so its scores are the job's."""
    import pandas as pd
    import pyarrow as pa

    from catalog_enrichment.bench import peer
    from catalog_enrichment.registry import _signature
    from catalog_enrichment.training.job import _example_frame

    products = pa.table(
        {
            "product_id": ["p1"],
            "title": ["red shoe"],
            "description": [None],
            "image": [b"\x89PNG"],
            "image_uri": pa.array([None], pa.string()),
            "category": ["shoes"],
        }
    )
    signature = _signature(_example_frame(products), pd.DataFrame({"color=red": [0.5]}))
    assert sorted(signature.inputs.input_names()) == sorted(peer.INPUT_COLUMNS)
    # a training table of image URIs only: the bytes a consumer sends still reach the model
    uris = _signature(_example_frame(products.drop_columns(["image"])), pd.DataFrame({"color=red": [0.5]}))
    assert sorted(uris.inputs.input_names()) == sorted(peer.INPUT_COLUMNS)


def test_a_whole_process_is_timed_with_its_cpu_and_peak_memory(tmp_path: Path) -> None:
    """A process holding 64 MB and spinning 0.6 CPU seconds: sampled every 0.2 s, at least 0.4 of
    them are seen and the 64 MB are."""
    import sys

    spin = "import time\nx = bytearray(64 * 2**20)\nt = time.process_time()\n"
    spin += "while time.process_time() - t < 0.6: pass"
    run = measure_process([sys.executable, "-c", spin], dict(os.environ), tmp_path)
    assert run["seconds"] >= 0.6 and run["driver_peak_rss_mb"] > 64
    assert run["cpu_seconds"]["driver"] >= 0.4
    with pytest.raises(CatalogEnrichError, match="exited with 3"):
        measure_process([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), tmp_path)


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
