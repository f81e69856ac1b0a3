"""The Airflow DAGs against a real Airflow installation (its own environment: make airflow-venv).

The DAG files must import with zero errors, and the nightly DAG runs once end to end with
``airflow dags test`` against a small catalog, leaving a succeeded run report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from catalog_enrichment.catalog.reports import report_for
from tests.conftest import repo_root, tiny_registry

DAGS = repo_root() / "deploy" / "airflow"
AIRFLOW_PYTHON = os.environ.get("CATALOG_ENRICH_AIRFLOW_PYTHON", "")

pytestmark = pytest.mark.skipif(
    not Path(AIRFLOW_PYTHON or "/nonexistent").is_file(),
    reason="no Airflow environment: run through 'make test' (make airflow-venv builds it)",
)


def _airflow_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return {
        **env,
        "AIRFLOW_HOME": str(tmp / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        **extra,
    }


INSPECT = """
import json, sys
from airflow.models.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1], include_examples=False)
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag_id, dag in bag.dags.items():
    out["dags"][dag_id] = {
        "max_active_runs": dag.max_active_runs,
        "timeout": dag.dagrun_timeout.total_seconds() if dag.dagrun_timeout else None,
        "tasks": {t.task_id: {"retries": t.retries, "command": t.bash_command,
                              "timeout": t.execution_timeout.total_seconds() if t.execution_timeout else None}
                  for t in dag.tasks},
    }
print(json.dumps(out))
"""


@pytest.mark.timeout(300)
def test_dag_files_import_without_errors_and_are_production_shaped(tmp_path: Path) -> None:
    proc = subprocess.run(
        [AIRFLOW_PYTHON, "-c", INSPECT, str(DAGS)],
        env=_airflow_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["errors"] == {}
    assert set(info["dags"]) == {"catalog_enrichment_nightly", "catalog_enrichment_weekly"}
    nightly = info["dags"]["catalog_enrichment_nightly"]
    assert nightly["max_active_runs"] == 1 and nightly["timeout"] == 6 * 3600
    enrich = nightly["tasks"]["enrich"]
    assert enrich["retries"] == 2 and enrich["timeout"] == 4 * 3600
    assert "enrich --partition ingest_date={{ ds }} --full --run-id nightly-{{ ds }}" in enrich["command"]
    assert "report --run-id nightly-{{ ds }} --check" in nightly["tasks"]["check_report"]["command"]
    assert list(info["dags"]["catalog_enrichment_weekly"]["tasks"]) == ["train", "promote"]


@pytest.mark.spark
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_nightly_dag_runs_end_to_end(tmp_path: Path, incoming, scoring_bundle) -> None:  # type: ignore[no-untyped-def]

    _, uri, _, _ = tiny_registry(tmp_path, scoring_bundle, incoming)
    config = tmp_path / "nightly.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "spark": {"master": "local[2]"},
                "mlflow": {"tracking_uri": uri, "registered_model": "tiny"},
                "catalog": {"root": str(tmp_path / "lake"), "products": str(incoming.products)},
                "inference": {"device": "cpu"},
                "validation": {"run_expectations": False, "max_invalid_fraction": 0.1},
            }
        )
    )
    cli = str(Path(sys.executable).with_name("catalog-enrich"))
    env = _airflow_env(
        tmp_path,
        CATALOG_ENRICH_CONFIG=str(config),
        CATALOG_ENRICH_SUBMIT=cli,
        CATALOG_ENRICH_CLI=cli,
        PYTHONPATH=str(repo_root() / "src"),  # the job's checkout (the Airflow process ignores it)
        PYSPARK_PYTHON=sys.executable,
    )
    airflow = str(Path(AIRFLOW_PYTHON).with_name("airflow"))
    migrate = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=240)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    run = subprocess.run(
        [airflow, "dags", "test", "catalog_enrichment_nightly", "2026-11-02"],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    report = report_for(tmp_path / "lake" / "run_reports", "nightly-2026-11-02")
    assert report["status"] == "succeeded" and report["partition"] == "ingest_date=2026-11-02"
    assert 0 < report["rows_read"] < 2400  # one day of four
