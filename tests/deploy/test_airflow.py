"""The Airflow DAGs against a real Airflow installation (its own environment: make airflow-venv).

The DAG files must import with zero errors; the nightly DAG runs end to end with ``airflow dags
test`` against a small catalog, leaving a succeeded run report and the night's review sample, and
on a drifted feed its health check fails the DAG run and the review sample never starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from catalog_enrichment.catalog.reports import read_reports
from tests.conftest import ONE_CORE_MASTER, mlflow_store, repo_root, tiny_registry

DAGS = repo_root() / "deploy" / "airflow"
AIRFLOW_PYTHON = os.environ.get("CATALOG_ENRICH_AIRFLOW_PYTHON", "")

pytestmark = pytest.mark.skipif(
    not Path(AIRFLOW_PYTHON or "/nonexistent").is_file(),
    reason="no Airflow environment: run through 'make test' (make airflow-venv builds it)",
)


def _airflow_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "VIRTUAL_ENV")) and k != "CATALOG_ENRICH_HOME"
    }
    return {
        **env,
        "AIRFLOW_HOME": str(tmp / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        **extra,
    }


def _dags_test(
    tmp: Path, config: Path, dag_id: str, date: str, *, timeout: int, succeeds: bool = True
) -> dict[str, str]:
    """``airflow dags test`` of one DAG run, its tasks calling this checkout's ``catalog-enrich``
    with ``config`` in ``tmp`` (review samples under ``tmp/review``); asserts the DAG run's state
    (success or failed) and returns each task's state."""
    cli = str(Path(sys.executable).with_name("catalog-enrich"))
    env = _airflow_env(
        tmp,
        CATALOG_ENRICH_CONFIG=str(config),
        CATALOG_ENRICH_SUBMIT=cli,
        CATALOG_ENRICH_CLI=cli,
        CATALOG_ENRICH_REVIEW_DIR=str(tmp / "review"),
        CATALOG_ENRICH_HOME=str(tmp),
        PYTHONPATH=str(repo_root() / "src"),  # the job's checkout (the Airflow process ignores it)
        PYSPARK_PYTHON=sys.executable,
    )
    airflow = str(Path(AIRFLOW_PYTHON).with_name("airflow"))
    if not (tmp / "airflow" / "airflow.db").is_file():  # a second DAG run in one home: migrated
        migrate = subprocess.run(
            [airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=240
        )
        assert migrate.returncode == 0, migrate.stderr[-3000:]
    run = subprocess.run(
        [airflow, "dags", "test", dag_id, date], env=env, capture_output=True, text=True, timeout=timeout
    )
    # the run's and its tasks' states from Airflow's metadata database: the rows `airflow dags
    # list-runs` and `airflow tasks states-for-dag-run` print, without starting Airflow twice more
    with contextlib.closing(sqlite3.connect(tmp / "airflow" / "airflow.db")) as db:
        found = db.execute(
            "SELECT run_id, state FROM dag_run WHERE dag_id = ? AND date(logical_date) = ?", (dag_id, date)
        ).fetchone()
        assert found is not None, (run.stdout + run.stderr)[-5000:]
        run_id, state = found
        assert state == ("success" if succeeds else "failed"), (run.stdout + run.stderr)[-5000:]
        tasks = db.execute(
            "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?", (dag_id, run_id)
        ).fetchall()
    return dict(tasks)


INSPECT = """
import json, sys
from airflow.models.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1], include_examples=False)
out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
for dag_id, dag in bag.dags.items():
    out["dags"][dag_id] = {
        "max_active_runs": dag.max_active_runs,
        "timeout": dag.dagrun_timeout.total_seconds() if dag.dagrun_timeout else None,
        "tasks": {t.task_id: {"retries": t.retries, "command": t.bash_command, "cwd": t.cwd,
                              "timeout": t.execution_timeout.total_seconds() if t.execution_timeout else None,
                              # exponential backoff: at most twice each delay (its jitter)
                              "delays": sum(t.retry_delay.total_seconds()
                                            * (2**n if t.retry_exponential_backoff else 1)
                                            for n in range(1, t.retries + 1))}
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
    assert nightly["max_active_runs"] == 1 and nightly["timeout"] == 17 * 3600
    for dag in info["dags"].values():  # every attempt the retries allow fits in the DAG run's time
        attempts = sum((t["retries"] + 1) * t["timeout"] + t["delays"] for t in dag["tasks"].values())
        assert attempts <= dag["timeout"], (attempts / 3600, dag["timeout"] / 3600)
    enrich = nightly["tasks"]["enrich"]
    assert enrich["retries"] == 2 and enrich["timeout"] == 4 * 3600
    # the same run as cron's: incremental over every partition
    # the run's day: its logical date, or (triggered without one, where Airflow 3 gives no ``ds``)
    # the day it was to run: a retry is the same run; one triggered by hand is its own
    run_id = RUN_ID
    assert f" enrich --run-id {run_id} " in enrich["command"], enrich["command"]
    # an abort is not retried: check_report fails on its report, once. Told by the exit code 3 in
    # client mode, by the run's report where spark-submit in cluster mode says only "failed"
    for submit, report, done in [
        (0, None, True), (3, None, True), (1, 3, True), (1, 1, False), (1, 2, False), (75, 2, False),
    ]:  # fmt: skip
        assert _enrich_task(enrich["command"], tmp_path, submit, report) == (done, report), (submit, report)
    assert f"report --run-id {run_id} --check" in nightly["tasks"]["check_report"]["command"]
    assert f"report --run-id {run_id} --health --check" in nightly["tasks"]["check_health"]["command"]
    assert f"review sample --run-id {run_id}" in nightly["tasks"]["review_sample"]["command"]
    assert list(info["dags"]["catalog_enrichment_weekly"]["tasks"]) == ["labels", "train", "promote"]
    # every task runs in the configured home (relative config paths resolve there), not in the
    # temporary folder Airflow deletes after it: the worker that runs it resolves it
    for dag in info["dags"].values():
        for task in dag["tasks"].values():
            assert task["command"].startswith("home=\"{{ var.value.get('catalog_enrich_home', '') }}\"; ")
            assert 'cd "$home" || exit 1; ' in task["command"] and task["cwd"] is None


# the DAG's run id: a scheduled run's is its night's, a run triggered by hand its own
RUN_ID = (
    "nightly-{{ (dag_run.logical_date or dag_run.run_after) | ds }}"
    "{{ '' if dag_run.run_type == 'scheduled' else "
    "'-' ~ (dag_run.run_type.value or dag_run.run_type) ~ '-' ~ "
    "((dag_run.run_after or dag_run.logical_date) | ts_nodash) }}"
)


def _enrich_task(command: str, tmp: Path, submit: int, report: int | None) -> tuple[bool, int | None]:
    """The nightly enrich task's command run with a submit that exits ``submit`` and a CLI whose
    ``report --check`` exits ``report``: whether the task succeeds, and what the report exited
    (None: not asked)."""
    for name, rc in (("submit", submit), ("cli", report)):
        tool = tmp / "tools" / name
        tool.parent.mkdir(exist_ok=True)
        tool.write_text(f'#!/usr/bin/env bash\necho "$*" > {tmp}/tools/{name}.args\nexit {rc or 0}\n')
        tool.chmod(0o755)
        (tmp / "tools" / f"{name}.args").unlink(missing_ok=True)
    variables = {"submit": str(tmp / "tools" / "submit"), "cli": str(tmp / "tools" / "cli"), "home": str(tmp)}
    text = re.sub(
        r"\{\{ var\.value\.get\('catalog_enrich_(\w+)', '[^']*'\) \}\}",
        lambda m: variables[m.group(1)],
        command.replace(RUN_ID, "nightly-2026-11-02"),
    )
    assert "{{" not in text, text
    done = subprocess.run(["bash", "-c", text], capture_output=True, timeout=60).returncode == 0
    asked = tmp / "tools" / "cli.args"
    if asked.exists():
        assert asked.read_text().split() == ["report", "--run-id", "nightly-2026-11-02", "--check"]
    return done, report if asked.exists() else None


def _nightly_config(tmp: Path, uri: str, lake: Path, products: Path) -> Path:
    config = tmp / f"{lake.name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "spark": {"master": ONE_CORE_MASTER},
                "mlflow": {"tracking_uri": uri, "registered_model": "tiny"},
                "catalog": {"root": str(lake), "products": str(products)},
                "inference": {"device": "cpu"},
                "validation": {"max_invalid_fraction": 0.1},
            }
        )
    )
    return config


@pytest.mark.spark
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_nightly_dag_runs_end_to_end_and_a_drifted_night_fails_its_health_check(  # type: ignore[no-untyped-def]
    tmp_path: Path, incoming, scoring_bundle
) -> None:
    from catalog_enrichment.bench.drift import stripped_titles
    from catalog_enrichment.catalog.lakehouse import read_table, write_table

    _, uri, _, _ = tiny_registry(tmp_path, scoring_bundle, incoming)
    products = read_table(incoming.products).slice(0, 800)
    write_table(tmp_path / "clean", products)
    config = _nightly_config(tmp_path, uri, tmp_path / "lake", tmp_path / "clean")
    tasks = _dags_test(tmp_path, config, "catalog_enrichment_nightly", "2026-11-02", timeout=500)
    assert tasks == {
        "enrich": "success", "check_report": "success", "check_health": "success",
        "review_sample": "success", "report_failure": "skipped",
    }  # fmt: skip
    # `airflow dags test` triggers the run by hand: its own run id, after its night's
    (report,) = read_reports(tmp_path / "lake" / "run_reports")
    assert re.fullmatch(r"nightly-2026-11-02-manual-\d{8}T\d{6}", report.run_id), report.run_id
    # incremental over the whole catalog: the first run reads every partition
    assert report.status == "succeeded" and report.partition is None
    assert report.rows_read == products.num_rows
    assert (tmp_path / "review" / f"{report.run_id}.csv").is_file()

    # a feed whose titles are stripped to ids: the run succeeds, its health check fails the DAG run
    write_table(tmp_path / "stripped", stripped_titles(products))
    config = _nightly_config(tmp_path, uri, tmp_path / "drifted-lake", tmp_path / "stripped")
    tasks = _dags_test(
        tmp_path, config, "catalog_enrichment_nightly", "2026-11-03", timeout=500, succeeds=False
    )
    assert tasks["enrich"] == "success" and tasks["check_report"] == "success"
    assert tasks["check_health"] == "failed" and tasks["report_failure"] == "failed"
    assert tasks["review_sample"] == "upstream_failed"  # never started
    assert not list((tmp_path / "review").glob("nightly-2026-11-03*.csv"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_weekly_dag_builds_labels_trains_and_promotes(tmp_path: Path, taxonomy) -> None:  # type: ignore[no-untyped-def]
    """labels -> train -> promote on a catalog whose only labels are its merchants' values."""
    import datetime as dt

    from catalog_enrichment import registry
    from catalog_enrichment.catalog.attributes import merchant_rows
    from catalog_enrichment.catalog.lakehouse import read_table, write_table
    from catalog_enrichment.config import SyntheticConfig
    from catalog_enrichment.data.synthetic import generate_marketplace
    from tests.conftest import TINY_MODEL

    lake = tmp_path / "lake"
    market = SyntheticConfig(products=1500, seed=21, image_size=32, merchant_share=1.0)
    shop = generate_marketplace(tmp_path / "shop", market, taxonomy=taxonomy)
    generate_marketplace(
        lake / "eval-market", market.model_copy(update={"products": 400, "seed": 22}), taxonomy=taxonomy
    )
    products = read_table(shop.products)
    write_table(lake / "attributes", merchant_rows(products, dt.datetime(2026, 11, 1, tzinfo=dt.UTC)))
    # the frozen evaluation set holds 200 of the shop's own products: labels must leave them out
    write_table(lake / "eval", read_table(lake / "eval-market" / "products").slice(0, 200))
    uri = mlflow_store(tmp_path / "mlflow.db")
    config = tmp_path / "weekly.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "mlflow": {"tracking_uri": uri, "registered_model": "weekly",
                           "artifact_location": str(tmp_path / "artifacts")},
                # relative: under the task's home (tmp_path), not its temporary working folder
                "catalog": {"root": "lake", "products": str(shop.products)},
                "model": {**TINY_MODEL, "fusion": "concat"},
                "training": {"epochs": 2, "batch_size": 32, "crossfit_folds": 0},
                "inference": {"device": "cpu"},
            }
        )
    )  # fmt: skip
    _dags_test(tmp_path, config, "catalog_enrichment_weekly", "2026-11-08", timeout=800)
    labelled = read_table(lake / "labelled")
    # every shop product has 1-3 merchant values; the evaluation set's 200 are left out, and so are
    # their variants (the generator's templated titles make many), as the labels' report counts
    from deltalake import DeltaTable

    from catalog_enrichment.catalog.labels import METADATA_KEY

    report = json.loads(DeltaTable(str(lake / "labelled")).history(1)[0][METADATA_KEY])
    excluded = report["excluded_evaluation_products"]
    assert excluded > 200 and labelled.num_rows == 1500 - excluded
    assert not set(labelled["product_id"].to_pylist()) & set(
        read_table(lake / "eval")["product_id"].to_pylist()
    )
    client = registry.configure_mlflow(uri)
    version = client.get_model_version_by_alias("weekly", "challenger")
    assert str(version.version) == "1"
    run_tags = client.get_run(version.run_id).data.tags
    assert run_tags["data.path"] == str((lake / "labelled").resolve())
    assert read_table(lake / "promotion_log").num_rows == 1  # the gate ran on the challenger
