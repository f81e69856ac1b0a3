"""``bench drift`` runs and writes its JSON: the smallest plan (one clean night and one whose titles
are stripped to ids), on this worker's Spark session. What the health checks decide is
``tests/test_health.py``'s and ``tests/test_health_job.py``'s; the detection rates are
docs/benchmarks.md's."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from catalog_enrichment.bench.drift import missing_images
from tests.conftest import cli_in_process

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(300)]


def test_bench_drift_runs_a_clean_and_a_drifted_night_and_writes_its_result(spark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "drift.json"
    code, stdout, stderr = cli_in_process(
        [
            "bench", "drift", "--batches", "1", "--batch-size", "100",
            "--kinds", "stripped_titles,missing_images", "--train-products", "400",
            "--workdir", str(tmp_path / "work"), "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0, stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["batches"], result["batch_size"], result["share"]) == (1, 100, 0.5)
    assert sorted(result["kinds"]) == ["clean", "missing_images", "stripped_titles"]
    runs = [(r["kind"], r["batch"]) for r in result["runs"]]
    assert runs == [("clean", 0), ("stripped_titles", 0), ("missing_images", 0)]
    # titles stripped to ids are an input the training data never had: the night is caught
    stripped = result["kinds"]["stripped_titles"]
    assert stripped["alarmed"] == 1 and stripped["checks"].get("input:title_length") == 1
    # half the photos gone (the training products' share without one plus far more than 0.2): the
    # critical expectation stops the run, nothing is written, and the next run fills what it held
    gone = result["kinds"]["missing_images"]
    assert gone["checks"] == {"expectations": 1} and gone["blocked_values_written"] == 0
    assert gone["filled_next_run"] == gone["held_back"]
    assert out.with_suffix(".md").is_file() and "| stripped_titles |" in stdout


def test_missing_images_takes_the_photos_and_their_addresses_and_nothing_else() -> None:
    products = pa.table(
        {
            "product_id": ["a", "b"],
            "title": ["t1", "t2"],
            "image": pa.array([b"\x89PNG", None], pa.binary()),
            "image_uri": ["file:///a.png", "file:///b.png"],
        }
    )
    gone = missing_images(products)
    assert gone.schema == products.schema and gone["title"] == products["title"]
    assert gone["image"].null_count == gone["image_uri"].null_count == 2
