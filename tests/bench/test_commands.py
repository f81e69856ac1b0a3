"""The bench commands no other test runs, each at its smallest: it runs and writes its JSON. Their
figures are docs/benchmarks.md's; what they time is tested where it is built."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

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
    assert set(run["test_r_at_p95"]) == {"color", "material", "product_type", "pattern", "color_family"}


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


def _never(*_args: object, **_kwargs: object) -> NoReturn:
    raise AssertionError("the command went past its flags' check")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("study", "flags", "given"),
    [
        (["--ensemble", "3"], ["--methods", "concat", "--config", "default"], "--config, --methods"),
        (
            ["--label-noise", "0.2"],
            ["--data", "a", "--test-data", "b", "--modes", "frozen"],
            "--data, --test-data, --modes",
        ),
    ],
)
def test_bench_quality_s_studies_refuse_the_flags_they_would_ignore(
    study: list[str], flags: list[str], given: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from catalog_enrichment.bench import commands

    monkeypatch.setattr(commands, "_paper_study", _never)
    code, _, err = cli_in_process(["bench", "quality", *study, *flags])
    assert code == 2, err
    assert f"{study[0]} runs its own study on a generated marketplace: {given} do not apply" in err


@pytest.mark.timeout(60)
def test_bench_quality_refuses_two_contender_configs_reported_under_one_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from catalog_enrichment.bench import quality

    configs = [tmp_path / team / "model.yaml" for team in ("a", "b")]
    for config in configs:
        config.parent.mkdir()
        config.write_text("model:\n  fusion: concat\n")
    monkeypatch.setattr(quality, "run_quality_benchmark", _never)
    code, _, err = cli_in_process(
        ["bench", "quality", "--config", str(configs[0]), "--config", str(configs[1])]
    )
    assert code == 2, err
    assert f"--config {configs[0]} and {configs[1]} would both be reported as 'model'" in err


@pytest.mark.timeout(60)
def test_bench_throughput_of_a_bundle_runs_the_modes_a_bundle_has(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from catalog_enrichment.bench import throughput
    from catalog_enrichment.inference.bundle import BundleFolder

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    BundleFolder(bundle).weights.write_bytes(b"")
    plans: list[Any] = []
    monkeypatch.setattr(
        throughput, "run_throughput_benchmark", lambda _c, _t, plan, **_k: plans.append(plan) or {}
    )
    flags = ["--bundle", str(bundle), "--workdir", str(tmp_path / "work"), "--out", str(tmp_path / "t.json")]
    code, _, err = cli_in_process(["bench", "throughput", *flags])
    assert code == 0, err
    (plan,) = plans  # raw_tasks on a CPU only
    assert [m for m in plan.modes if m != "raw_tasks"] == ["raw", "predictor"]
    # job runs a registered model as a process of its own: asked for with a bundle, it is refused
    code, _, err = cli_in_process(["bench", "throughput", *flags, "--modes", "raw,job"])
    assert code == 2 and "give --model-uri, not --bundle" in err and len(plans) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kinds", "colour_shfit"], "--kinds: unknown ['colour_shfit']; choose from colour_shift,"),
        (["--new-type", "lampe"], "--new-type 'lampe' is not a product_type of the taxonomy"),
        (["--new-type", "Sweater", "--data"], "--new-type 'Sweater' is not a product_type of "),
    ],
)
def test_bench_drift_refuses_an_unknown_kind_or_new_type_before_spark_starts(
    flags: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from catalog_enrichment import runtime

    if flags[-1] == "--data":  # a real catalog's two tables, without a sweater
        tables = [tmp_path / "train.parquet", tmp_path / "test.parquet"]
        for table in tables:
            pq.write_table(pa.table({"product_id": ["p1"], "product_type": ["shirt"]}), table)
        flags = [*flags, str(tables[0]), "--test-data", str(tables[1])]
    monkeypatch.setattr(runtime, "spark_session", _never)
    code, _, err = cli_in_process(["bench", "drift", *flags, "--workdir", str(tmp_path / "work")])
    assert code == 2 and message in err, err
