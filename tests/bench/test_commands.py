"""The bench commands no other test runs, each at its smallest: it runs and writes its JSON. Their
figures are docs/benchmarks.md's; what they time is tested where it is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli_in_process


def _bench(*arguments: str) -> str:
    code, out, err = cli_in_process(["bench", *arguments])
    assert code == 0, (out + err)[-3000:]
    return out


@pytest.mark.timeout(60)
def test_bench_generate_counts_and_times_the_products_it_generated(tmp_path: Path) -> None:
    out = tmp_path / "generate.json"
    _bench("generate", "--products", "40", "--image-size", "32", "--out", str(out))
    result = json.loads(out.read_text())
    assert (result["products"], result["image_size"]) == (40, 32)
    assert result["seconds"] > 0 and result["products_per_second"] > 0


@pytest.mark.spark
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_write_times_both_catalogs_writes(spark, pg_server, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from catalog_enrichment.catalog.postgres import PG_DSN_ENV

    monkeypatch.setenv(PG_DSN_ENV, pg_server.dsn())
    out = tmp_path / "write.json"
    _bench("write", "--products", "200", "--repeats", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert (result["products"], result["repeats"]) == (200, 1)
    assert sorted(result["kinds"]) == ["lakehouse", "postgres"]
    assert result["rows"]["insert"] > 0 and result["rows"]["replace"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_train_scale_trains_a_process_and_reports_its_cost_and_quality(tmp_path: Path) -> None:
    out = tmp_path / "train-scale.json"
    _bench(
        "train-scale", "--sizes", "300", "--processes", "1", "--epochs", "1", "--batch-size", "32",
        "--workdir", str(tmp_path / "work"), "--out", str(out),
    )  # fmt: skip
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert (run["products"], run["processes"]) == (300, 1)
    assert run["seconds"] > 0 and run["driver_peak_rss_mb"] > 50
    assert set(run["test_r_at_p95"]) == {"color", "material", "product_type", "pattern"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_pretrain_text_adapts_the_encoder_twice_and_fine_tunes_three_arms(tmp_path: Path) -> None:
    out = tmp_path / "pretrain.json"
    tiny_text = ("num_hidden_layers=1", "hidden_size=32", "num_attention_heads=2", "intermediate_size=64")
    _bench(
        "pretrain-text", "--products", "400", "--pretrain-epochs", "1", "--epochs", "1",
        "--label-fraction", "0.5", "--workdir", str(tmp_path / "work"), "--out", str(out),
        *(arg for setting in tiny_text for arg in ("--set", f"model.text.{setting}")),
        "--set", "model.image.image_size=32",
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert (result["study"], result["products"], result["pretrain_epochs"]) == ("pretrain-text", 400, 1)
    assert sorted(result["pretraining"]) == ["convirt", "simcse"]
    assert sorted(result["r_at_p95"]) == ["convirt", "plain", "simcse"]
    assert out.with_suffix(".md").is_file()
