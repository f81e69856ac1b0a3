"""Run only by ``tests/test_interrupted_run.py`` (its name is not collected): a pytest run holding
every kind of process the suite starts - a PostgreSQL server, a local Spark JVM, an MLflow server
and a job process with a JVM of its own - until the run is interrupted."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

HOLD = 600

_JOB = """
import time
from catalog_enrichment import runtime
from catalog_enrichment.config import AppConfig
runtime.spark_session(AppConfig(spark={"master": "local[1]"}))
time.sleep(600)
"""


@pytest.mark.timeout(HOLD)
def test_hold_postgres_and_spark(pg_server, spark) -> None:  # type: ignore[no-untyped-def]
    time.sleep(HOLD)


@pytest.mark.timeout(HOLD)
def test_hold_an_mlflow_server_and_a_job_process(mlflow_server) -> None:  # type: ignore[no-untyped-def]
    subprocess.run([sys.executable, "-c", _JOB], timeout=HOLD, check=False)
