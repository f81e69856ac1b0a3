"""The CLI: every command has --help; user mistakes are one line and exit 2; generate works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from catalog_enrichment import runtime
from catalog_enrichment.cli import build_parser, main
from catalog_enrichment.config import AppConfig, SparkConfig


def _commands() -> list[list[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = [[name] for name in sub.choices]  # type: ignore[union-attr]
    for group in ("bench", "review"):
        inner = sub.choices[group]  # type: ignore[index]
        steps = next(a for a in inner._actions if a.dest == group)
        commands += [[group, name] for name in steps.choices]  # type: ignore[union-attr]
    return commands


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: catalog-enrich" in capsys.readouterr().out


def test_generate_then_summarize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "market"
    code = main(
        [
            "generate",
            "--out",
            str(out),
            "--products",
            "120",
            "--seed",
            "5",
            "--bad-rate",
            "0.1",
            "--format",
            "parquet",
            "--quiet",
        ]
    )
    assert code == 0
    assert (out / "products").is_dir() and (out / "truth").is_dir()
    capsys.readouterr()
    assert main(["summarize", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 120
    assert sum(summary["bad_rows_by_kind"].values()) == 8 * round(120 * 0.1 / 8)
    assert set(summary["value_frequencies"]) == {"color", "material", "product_type", "pattern"}
    # images as files lie outside the products table's folder: the setting that reads them is said
    assert (
        main(["generate", "--out", str(tmp_path / "files"), "--products", "20", "--image-files", "--quiet"])
        == 0
    )
    images = (tmp_path / "files" / "images").resolve()
    assert f"""--set images.roots='["{images}"]'""" in capsys.readouterr().out


def test_expectations_writes_a_suite_great_expectations_reads_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import great_expectations as gx

    out = tmp_path / "gx" / "suite.json"
    flags = ["--out", str(out), "--name", "nightly", "--set", "validation.max_title_length=300"]
    flags += ["--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'none.db'}"]
    assert main(["expectations", *flags]) == 0
    printed = capsys.readouterr().out
    # no registered model: the 15 rules and the two batch expectations that need no training profile
    assert "no MLflow store at" in printed and f"wrote 17 expectations to {out}" in printed
    assert not (tmp_path / "none.db").exists()
    gx.get_context(mode="ephemeral")
    suite = gx.ExpectationSuite(**json.loads(out.read_text()))
    assert suite.name == "nightly" and len(suite.expectations) == 17
    title = next(e for e in suite.expectations if e.meta.get("rule") == "title_max_length")
    assert title.max_value == 300
    # a model named and not found is an error, not a suite without its shares
    out.unlink()
    assert main(["expectations", *flags, "--model", "models:/nowhere/3"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err and not out.exists()


def test_config_command_applies_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--set", "inference.batch_size=7", "--set", "model.fusion=concat"]) == 0
    text = capsys.readouterr().out
    assert "batch_size: 7" in text and "fusion: concat" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["config", "--config", "/no/such/file.yaml"], "config file not found"),
        (["config", "--set", "inference.batch_size=lots"], "inference.batch_size"),
        (["config", "--set", "inference.nope=1"], "inference.nope: unknown key"),
        (["generate", "--out", "x", "--taxonomy", "/no/such/taxonomy.yaml"], "taxonomy file not found"),
        (["generate", "--out", "x", "--bad-rate", "1.5"], "synthetic.bad_rate"),
        (["summarize", "/no/such/dir"], "does not hold a generated marketplace"),
        (
            ["bench", "throughput", "--modes", "raw,fast"],
            "choose from raw, predictor, raw_tasks, encoders, job",
        ),
        (["bench", "throughput", "--bundle", "/no/such/bundle"], "is not a model bundle"),
        (["bench", "throughput", "--products", "16k"], "comma-separated numbers expected"),
        (["bench", "throughput", "--modes", "raw_tasks", "--set", "inference.device=cuda"], "cuda"),
        (["bench", "quality", "--data", "train.parquet"], "--data and --test-data go together"),
        (["bench", "quality", "--data", "/no/a", "--test-data", "/no/b"], "no such table: /no/a, /no/b"),
        (["review", "import", "/no/such/verdicts.csv"], "no verdict file at /no/such/verdicts.csv"),
        (["report", "--model-version", "3"], "--model-version and --sample go with --audit"),
        (["report", "--audit", "--run-id", "r1"], "audits a model version (--model-version) or a sample"),
        # refused before Spark starts or a model downloads (none is reachable from here)
        (["enrich", "--run-id", "night of 2 Dec"], "run id 'night of 2 Dec' is not valid"),
        (
            ["backfill", "--from", "2026-11-03", "--to", "2026-11-02"],
            "--from 2026-11-03 is after --to 2026-11-02",
        ),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("catalog-enrich: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_known_error_a_spark_task_raised_is_its_own_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An executor refusing the model (its image decoder) fails the Spark job: the user reads the
    refusal, not Spark's "Job aborted due to stage failure" wrapper."""
    from catalog_enrichment import commands

    worker = (
        "Job aborted due to stage failure: Task 0 in stage 3.0 failed 4 times, most recent failure: "
        "org.apache.spark.api.python.PythonException: Traceback (most recent call last):\n"
        '  File "/opt/app/catalog_enrichment/inference/spark.py", line 315, in _worker_state\n'
        "catalog_enrichment.errors.DecoderMismatch: /models/v7 cannot be served on this machine: install "
        "the decoders it was trained with (pillow==13.0.0 simplejpeg==1.8.2) or train it again here\n"
        "\tat org.apache.spark.api.python.BasePythonRunner.handlePythonException(PythonRunner.scala:572)"
    )

    def fails(*_args: object) -> int:
        raise RuntimeError(worker)

    monkeypatch.setattr(commands, "report", fails)
    assert main(["report"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "catalog-enrich: error: /models/v7 cannot be served on this machine: install the decoders it "
        "was trained with (pillow==13.0.0 simplejpeg==1.8.2) or train it again here\n"
    )


@pytest.mark.timeout(300)
def test_console_script_runs_as_a_process(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "catalog_enrichment.cli",
            "bench",
            "generate",
            "--products",
            "200",
            "--out",
            str(tmp_path / "bench.json"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["products"] == 200 and bench["products_per_second"] > 0


@pytest.mark.parametrize(
    ("master", "cores"), [("local", 1), ("local[2]", 2), ("local[3,2]", 3), ("local[*]", os.cpu_count() or 1)]
)
def test_local_masters_get_shuffle_partitions_for_their_cores(master: str, cores: int) -> None:
    cfg = AppConfig(spark={"master": master})
    assert cfg.spark.local_cores() == cores
    assert runtime.spark_conf(cfg)["spark.sql.shuffle.partitions"] == str(2 * cores)
    # under spark-submit the submitted master decides: no local settings
    assert "spark.sql.shuffle.partitions" not in runtime.spark_conf(cfg, submitted=True)


def test_a_parquet_read_batch_is_as_small_as_an_arrow_batch() -> None:
    # Spark reads 4,096 rows per Parquet batch by default: of a filled embedding store (~2,000
    # floats a row) that is more than a 1 GB heap holds for two tasks at once
    conf = runtime.spark_conf(AppConfig(spark={"arrow_max_records_per_batch": 128}))
    assert conf["spark.sql.parquet.columnarReaderBatchSize"] == "128"
    assert conf["spark.sql.execution.arrow.maxRecordsPerBatch"] == "128"


@pytest.mark.spark
@pytest.mark.timeout(120)
def test_a_local_session_runs_its_jvm_with_the_c1_compiler_only_and_the_class_archive(spark) -> None:  # type: ignore[no-untyped-def]
    # the option reaches the JVM when set on the builder (it is read at launch, not later), with a
    # code cache a long session's generated classes do not fill (C1 alone would get 48 MB)
    jvm = spark.sparkContext._jvm
    arguments = list(jvm.java.lang.management.ManagementFactory.getRuntimeMXBean().getInputArguments())
    assert "-XX:TieredStopAtLevel=1" in arguments and "-XX:ReservedCodeCacheSize=256m" in arguments
    # the classes it started with were mapped from the class-data-sharing archive (tests/conftest.py
    # writes it before the run)
    archive = runtime.class_archive(SparkConfig())
    assert archive is not None and f"-XX:SharedArchiveFile={archive}" in arguments
    assert "sharing" in jvm.java.lang.System.getProperty("java.vm.info")
    # one switch turns it off, for the driver and for executors
    conf = runtime.spark_conf(AppConfig(spark={"c1_jit": False, "class_data_sharing": False}))
    assert "TieredStopAtLevel" not in conf["spark.driver.extraJavaOptions"]  # only the quiet logging
    assert "spark.executor.extraJavaOptions" not in conf
    assert runtime.spark_conf(AppConfig())["spark.executor.extraJavaOptions"] == runtime.C1_JIT


_RUN = """
import atexit, sys
import catalog_enrichment.cli as cli
main = cli.main
def command(argv):
    atexit.register(print, "a handler the command registered ran")  # as Spark's and MLflow's do
    return main(argv)
cli.main = command
cli.run(sys.argv[1:])
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("argv", "code"), [(["config"], 0), (["report", "--run-id", "no-such-run"], 2)])
def test_the_console_script_exits_with_the_commands_code_after_its_atexit_handlers(
    tmp_path: Path, argv: list[str], code: int
) -> None:
    # run() ends the process before the interpreter's teardown (Arrow's thread pools abort there on a
    # busy machine): the code, the piped output and the handlers registered by the command all survive
    env = {**os.environ, "CATALOG_ENRICH_CATALOG__ROOT": str(tmp_path / "lake")}
    result = subprocess.run(
        [sys.executable, "-c", _RUN, *argv], capture_output=True, text=True, timeout=100, env=env
    )
    assert result.returncode == code, result.stderr
    assert result.stdout.rstrip().endswith("a handler the command registered ran")
    if code == 0:
        assert "catalog:" in result.stdout  # the whole YAML made it through the pipe
    else:
        assert "catalog-enrich: error:" in result.stderr


def test_logs_are_quiet_by_default_and_verbose_on_request() -> None:
    import logging

    root = logging.getLogger()
    saved = (None, root.level, [h.level for h in root.handlers], list(root.handlers))
    try:
        runtime.configure_logging(0)
        options = runtime.spark_conf(AppConfig())["spark.driver.extraJavaOptions"]
        assert f"-Dlog4j2.configurationFile={runtime.LOG4J2}" in options and runtime.LOG4J2.is_file()
        assert all(h.level == logging.WARNING for h in root.handlers)  # a library's INFO line is dropped
        assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"
        runtime.configure_logging(2)  # -vv: Spark's own logging, every library's info lines
        assert "log4j2" not in runtime.spark_conf(AppConfig())["spark.driver.extraJavaOptions"]
        assert runtime._spark_log_level() == "INFO" and all(h.level == logging.INFO for h in root.handlers)
    finally:
        root.level = saved[1]
        for handler in list(root.handlers):
            if handler not in saved[3]:
                root.removeHandler(handler)
        for handler, level in zip(saved[3], saved[2], strict=True):
            handler.setLevel(level)


@pytest.mark.parametrize("kind", ["lakehouse", "postgres"])
def test_the_demo_opens_its_catalog_of_either_kind(kind: str, tmp_path: Path) -> None:
    """The demo's work-folder config opens the catalog it asks for (PostgreSQL: no lakehouse
    products path beside it)."""
    from catalog_enrichment.catalog import open_catalog
    from catalog_enrichment.config import AppConfig
    from catalog_enrichment.demo import demo_config

    cfg = demo_config(AppConfig(catalog={"kind": kind}), tmp_path)
    catalog = open_catalog(cfg.catalog)
    assert catalog.kind == kind
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    if kind == "lakehouse":
        assert catalog.products == tmp_path / "incoming" / "products"  # type: ignore[attr-defined]


def test_a_backfill_the_run_health_kept_from_a_partition_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Such a partition is not done: a scheduler or a script must see the backfill did not finish."""
    import argparse
    import datetime as dt
    from types import SimpleNamespace

    from catalog_enrichment import commands, enrich
    from catalog_enrichment.catalog.reports import BLOCKED, RunReport

    def outcome(blocked: dict[str, str] | None) -> SimpleNamespace:
        report = RunReport(run_id="r", status="succeeded", started_at=dt.datetime(2026, 11, 4, tzinfo=dt.UTC))
        if blocked:
            report.add_to_summary(**{BLOCKED: blocked})
        return SimpleNamespace(report=report)

    results = [("ingest_date=2026-11-01", outcome(None)), ("ingest_date=2026-11-02", None)]
    monkeypatch.setattr(runtime, "job_context", lambda cfg, uri: (None, None, None))
    monkeypatch.setattr(enrich, "backfill_partitions", lambda *a, **k: results)
    args = argparse.Namespace(date_from="2026-11-01", date_to="2026-11-02", force=False, model_uri=None)
    assert commands.backfill(args, AppConfig()) == 0
    results.append(("ingest_date=2026-11-03", outcome({"color": "input image PSI 2.1"})))
    assert commands.backfill(args, AppConfig()) == 1
    assert "kept values out of ingest_date=2026-11-03" in capsys.readouterr().out


def test_flags_that_cannot_both_run_are_refused_not_one_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["embeddings", "--fill", "--vacuum"])
    assert done.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_pretrain_text_refuses_a_flag_out_of_range_before_reading_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--epochs 0 read the whole table and saved an unadapted encoder; the flags are checked first."""
    market, out = tmp_path / "market", tmp_path / "encoder"
    assert main(["generate", "--out", str(market), "--products", "80", "--image-size", "16", "--quiet"]) == 0
    capsys.readouterr()
    argv = ["pretrain-text", "--method", "simcse", "--data", str(market / "products"), "--out", str(out)]
    assert main([*argv, "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("catalog-enrich: error: argument --epochs: must be at least 1, got 0")
    assert err.count("\n") == 1 and not out.exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--batch-size", "0", "--batch-size: must be at least 2, got 0"),
        ("--batch-size", "1", "--batch-size: must be at least 2, got 1"),  # no negatives in the batch
        ("--temperature", "0", "--temperature: must be above 0, got 0"),  # a NaN loss
        ("--temperature", "-0.1", "--temperature: must be above 0, got -0.1"),
        ("--temperature", "nan", "--temperature: a finite number expected, got 'nan'"),
        ("--alpha", "1.5", "--alpha: must be at least 0 and at most 1, got 1.5"),
        ("--learning-rate", "-0.5", "--learning-rate: must be above 0, got -0.5"),
        ("--epochs", "two", "--epochs: a whole number expected, got 'two'"),
    ],
)
def test_pretrain_text_flags_are_checked_by_the_parser(
    tmp_path: Path, flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "encoder"
    argv = ["pretrain-text", "--method", "convirt", "--data", str(tmp_path / "none"), "--out", str(out)]
    assert main([*argv, flag, value]) == 2
    err = capsys.readouterr().err
    assert f"catalog-enrich: error: argument {message}" in err and not out.exists()


@pytest.mark.parametrize("value", ["-1", "0", "inf"])
def test_bench_quality_takes_a_kl_lambda_above_0_only(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["bench", "quality", "--kl-lambda", value])
    assert done.value.code == 2 and "argument --kl-lambda: " in capsys.readouterr().err


def test_load_products_refuses_a_parquet_folder_without_a_contract_column(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Read with the contract's schema, a Parquet folder holds every contract column (null where its
    files have none): the files' own columns are checked, before anything is read or loaded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from catalog_enrichment.catalog.postgres import PostgresCatalog

    def never(*_args: object) -> None:
        raise AssertionError("loaded")

    monkeypatch.setattr(PostgresCatalog, "load_products", never)
    products = tmp_path / "products"
    for day, columns in (("2026-11-01", {"product_id": ["p1"]}), ("2026-11-02", {"title": ["t2"]})):
        (products / f"ingest_date={day}").mkdir(parents=True)
        pq.write_table(pa.table(columns), products / f"ingest_date={day}" / "part-0.parquet")
    assert main(["load-products", str(products), "--set", "catalog.kind=postgres"]) == 2
    err = capsys.readouterr().err
    # a column of one file, or of the partition folders, is the table's
    missing = ["description", "image", "image_uri", "category", "merchant_attributes", "updated_at"]
    assert f"{products} lacks contract column(s) {missing}" in err
