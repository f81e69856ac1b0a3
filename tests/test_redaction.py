"""One redaction rule for every place the job writes something down; a secret reaches none of them."""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest

from catalog_enrichment.cli import main
from catalog_enrichment.config import load_config
from catalog_enrichment.redaction import (
    RedactingFilter,
    is_secret_name,
    redact_records,
    redact_text,
    redact_tree,
    redact_value,
)

pytestmark = pytest.mark.timeout(300)

SECRET = "s3cr3t-value-9f2"


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("spark.hadoop.fs.s3a.secret.key", True),
        ("spark.hadoop.fs.s3a.access.key", True),
        ("api_key", True),
        ("accessKey", True),
        ("SecretAccessKey", True),
        ("PGPASSWORD", True),
        ("password", True),
        ("auth-token", True),
        ("credentials", True),
        ("inference.keep_memory", False),
        ("model.text.tokenizer", False),
        ("monkey", False),
        ("keys", False),
        ("spark.sql.shuffle.partitions", False),
    ],
)
def test_which_names_are_secrets(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_values_and_text_are_masked_by_the_rule() -> None:
    assert redact_value("spark.hadoop.fs.s3a.secret.key", SECRET) == "***"
    assert redact_value("api_key", "") == ""  # nothing to hide: shown as empty
    assert (
        redact_value("mlflow.tracking_uri", f"https://me:{SECRET}@mlflow:5000")
        == "https://me:***@mlflow:5000"
    )
    assert redact_value("inference.batch_size", 128) == 128
    text = (
        f"could not connect: host=db user=u password={SECRET} sslmode=require; postgresql://u:{SECRET}@h/db"
    )
    assert redact_text(text) == (
        "could not connect: host=db user=u password=*** sslmode=require; postgresql://u:***@h/db"
    )
    assert redact_text(f"secret_key='{SECRET} x', KeyError: 'k', keys=3") == (
        "secret_key=***, KeyError: 'k', keys=3"
    )
    assert redact_tree({"spark": {"conf": {"fs.azure.account.key": SECRET, "a": "b"}}}) == {
        "spark": {"conf": {"fs.azure.account.key": "***", "a": "b"}}
    }


def test_config_params_and_the_printed_config_mask_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "job.yaml"
    file.write_text(
        f"spark:\n  conf:\n    spark.hadoop.fs.s3a.secret.key: {SECRET}\n"
        f"mlflow:\n  tracking_uri: https://ci:{SECRET}@mlflow.example:5000\n"
    )
    assert main(["config", "--config", str(file)]) == 0
    printed = capsys.readouterr().out
    assert SECRET not in printed
    assert "spark.hadoop.fs.s3a.secret.key: '***'" in printed and "ci:***@mlflow.example" in printed
    cfg = load_config(overrides={"spark": {"conf": {"spark.hadoop.fs.s3a.secret.key": SECRET}}})
    flat = cfg.to_flat_dict()
    assert flat["spark.conf.spark.hadoop.fs.s3a.secret.key"] == "***" and SECRET not in str(flat)
    assert cfg.spark.conf["spark.hadoop.fs.s3a.secret.key"] == SECRET  # the job itself still has it


def test_a_known_error_is_printed_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A registry URI with a password, in the registry's own error and as the CLI prints any error."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from catalog_enrichment import cli, registry
    from catalog_enrichment.errors import CatalogEnrichError

    class Registry:
        def get_registered_model(self, name: str) -> None:
            raise MlflowException(f"{name} not found", error_code=RESOURCE_DOES_NOT_EXIST)

    monkeypatch.setattr(mlflow, "get_registry_uri", lambda: f"postgresql://ci:{SECRET}@db/mlflow")
    with pytest.raises(CatalogEnrichError) as missing:
        registry.resolve_alias(Registry(), "typo", "champion")  # type: ignore[arg-type]
    assert "does not exist in postgresql://ci:***@db/mlflow" in str(missing.value)

    def fails(*args: Any, **kwargs: Any) -> None:
        raise CatalogEnrichError(f"cannot reach https://ci:{SECRET}@mlflow.example")

    monkeypatch.setattr(cli, "load_config", fails)
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert SECRET not in err and "https://ci:***@mlflow.example" in err


def test_the_traceback_verbose_prints_is_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """-v shows an unexpected error's traceback instead of its one line: masked as that line is
    (MLflow's error for a server it cannot reach names the URI with its password)."""
    from catalog_enrichment import runtime

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CATALOG_ENRICH_MLFLOW__TRACKING_URI", f"http://u:{SECRET}@127.0.0.1:1")
    try:
        assert main(["embeddings", "-v"]) == 1
    finally:
        runtime.configure_logging(0)
    err = capsys.readouterr().err
    assert "Traceback" in err and "MlflowException: API request to http://u:***@127.0.0.1:1" in err
    assert SECRET not in err


def test_log_records_are_masked(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("catalog_enrichment.test_redaction")
    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    caplog.handler.addFilter(RedactingFilter())
    try:
        logger.warning("connecting with password=%s to %s", SECRET, f"https://u:{SECRET}@h")
        try:
            raise RuntimeError(f"dsn host=db password={SECRET}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        caplog.handler.removeFilter(caplog.handler.filters[-1])
    assert SECRET not in caplog.text
    assert "password=*** to https://u:***@h" in caplog.text and "dsn host=db password=***" in caplog.text


def test_records_of_a_logger_printing_through_its_own_handler_are_masked() -> None:
    """MLflow's loggers do not propagate to the root's handlers (at -vv they print through their
    own): the CLI's redaction reaches their records too."""
    saved = logging.getLogRecordFactory()
    logger = logging.getLogger("catalog_enrichment.test_redaction.own")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger.addHandler(handler)
    logger.propagate, logger.level = False, logging.INFO
    try:
        redact_records()
        redact_records()  # a second call wraps nothing more
        assert logging.getLogRecordFactory().made is saved  # type: ignore[attr-defined]
        logger.info("No artifacts found to download at %s", f"http://ci:{SECRET}@127.0.0.1/api")
    finally:
        logging.setLogRecordFactory(saved)
        logger.removeHandler(handler)
        logger.propagate, logger.level = True, logging.NOTSET
    assert SECRET not in out.getvalue() and "http://ci:***@127.0.0.1/api" in out.getvalue()


@pytest.mark.spark
@pytest.mark.slow
def test_a_failed_run_reports_and_logs_no_secret(  # type: ignore[no-untyped-def]
    spark, scoring_bundle, taxonomy, incoming, tmp_path: Path, monkeypatch, caplog
) -> None:
    """The run report of a failed run keeps its error, masked; so does every log line."""
    from catalog_enrichment.catalog.embedded import LakehouseCatalog
    from catalog_enrichment.catalog.reports import read_reports
    from catalog_enrichment.enrich import RunScope, run_enrichment
    from catalog_enrichment.versions import ModelVersion
    from tests.conftest import tiny_config

    def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise OSError(f"cannot open s3a://reader:{SECRET}@bucket/products (fs.s3a.secret.key={SECRET})")

    monkeypatch.setattr(LakehouseCatalog, "read_products", unreachable)
    cfg = tiny_config(catalog={"root": str(tmp_path / "lake")})
    said: list[str] = []
    with pytest.raises(OSError):
        run_enrichment(
            spark,
            cfg,
            taxonomy,
            model=ModelVersion("tiny", "1", bundle_dir=scoring_bundle),
            scope=RunScope(products=incoming.products, run_id="r1"),
            progress=said.append,
        )
    (report,) = read_reports(cfg.catalog.table("run_reports"))
    error = report.summary()["error"]
    assert report.status == "failed"
    assert error == "OSError: cannot open s3a://reader:***@bucket/products (fs.s3a.secret.key=***)"
    assert SECRET not in str(report.to_row()) + " ".join(said) + caplog.text


@pytest.mark.postgres
def test_the_copy_tasks_carry_no_password(pg_catalog_config) -> None:  # type: ignore[no-untyped-def]
    """The function each Spark task runs (what Spark pickles into the task) holds the connection
    without its password; libpq on the executor finds it in the environment (runtime.spark_conf)."""
    import cloudpickle
    from psycopg.conninfo import conninfo_to_dict

    from catalog_enrichment import runtime
    from catalog_enrichment.catalog.postgres import PostgresCatalog
    from catalog_enrichment.catalog.postgres.write import _copier
    from catalog_enrichment.config import AppConfig

    catalog = PostgresCatalog(pg_catalog_config)
    conninfo, password = catalog.conninfo()
    assert password and "password" not in conninfo_to_dict(conninfo)
    task = cloudpickle.dumps(_copier(conninfo, ("s", "stage_x")))
    assert password.encode() not in task and pickle.loads(task) is not None
    conf = runtime.spark_conf(AppConfig(catalog=pg_catalog_config))
    assert conf["spark.executorEnv.PGPASSWORD"] == password
    # an executor environment the user set up wins
    given = AppConfig(catalog=pg_catalog_config, spark={"conf": {"spark.executorEnv.PGPASSFILE": "/p"}})
    assert "spark.executorEnv.PGPASSWORD" not in runtime.spark_conf(given)


@pytest.mark.spark
@pytest.mark.postgres
def test_the_database_password_is_on_no_process_command_line(spark, pg_server) -> None:  # type: ignore[no-untyped-def]
    """PySpark starts the driver JVM with its settings as ``--conf`` arguments, which any local user
    reads in the process list for the whole run: the session (built by the job's runtime, with the
    test server's DSN in the environment) starts it without the password and hands the executors'
    ``PGPASSWORD`` over afterwards."""
    from psycopg.conninfo import conninfo_to_dict
    from pyspark import SparkContext

    password = conninfo_to_dict(pg_server.dsn())["password"]
    jvm = SparkContext._gateway.proc  # type: ignore[union-attr]
    command = Path(f"/proc/{jvm.pid}/cmdline").read_bytes()
    assert b"spark.sql.session.timeZone=UTC" in command  # the settings travel here
    assert password.encode() not in command
    assert spark.sparkContext.getConf().get("spark.executorEnv.PGPASSWORD") == password


@pytest.mark.spark
@pytest.mark.slow
def test_what_the_scoring_tasks_are_sent_holds_no_secret(  # type: ignore[no-untyped-def]
    spark, scoring_bundle, taxonomy, incoming, tmp_path: Path, monkeypatch
) -> None:
    """A run whose config holds secrets (object-store keys in spark.conf): the spec every scoring
    task unpickles carries none of them."""
    import cloudpickle

    from catalog_enrichment.catalog.attributes import ensure_attributes_table
    from catalog_enrichment.catalog.products import list_partitions
    from catalog_enrichment.enrich import RunScope, run_enrichment, stages
    from catalog_enrichment.versions import ModelVersion
    from tests.conftest import tiny_config

    sent: list[bytes] = []
    real = stages.score_dataframe

    def recording(df: Any, spec: Any, counters: Any) -> Any:
        sent.append(cloudpickle.dumps(spec))
        return real(df, spec, counters)

    monkeypatch.setattr(stages, "score_dataframe", recording)
    cfg = tiny_config(
        catalog={"root": str(tmp_path / "lake")},
        spark={"conf": {"spark.hadoop.fs.s3a.secret.key": SECRET}},
        inference={"device": "cpu"},
    )
    ensure_attributes_table(cfg.catalog.table("attributes"))
    day = list_partitions(incoming.products, "ingest_date")[0]
    run_enrichment(
        spark,
        cfg,
        taxonomy,
        model=ModelVersion("tiny", "1", bundle_dir=scoring_bundle),
        scope=RunScope(products=incoming.products, partition=f"ingest_date={day}", run_id="r2"),
        progress=lambda _m: None,
    )
    assert sent and not [blob for blob in sent if SECRET.encode() in blob]
