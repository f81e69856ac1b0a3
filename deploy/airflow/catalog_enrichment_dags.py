"""Airflow DAGs for catalog-enrichment: nightly enrichment and weekly labels -> train -> promote.

No business logic here: every task calls a ``catalog-enrich`` command (or a ``jobs/`` entry point
through spark-submit) with parameters. Per environment, set (Airflow Variables, else environment):

* ``catalog_enrich_submit``  how the Spark jobs (enrichment, labels, training) start:
  ``catalog-enrich`` (local Spark, default), ``deploy/spark/submit.sh yarn`` or
  ``deploy/spark/submit.sh k8s`` (cluster);
* ``catalog_enrich_cli``     the ``catalog-enrich`` executable for the light steps (report, review);
* ``catalog_enrich_review_dir``  where the nightly review sample files go (people judge them there);
* ``catalog_enrich_home``    the folder every task runs in (default: the worker's
  ``$CATALOG_ENRICH_HOME``, else its ``$AIRFLOW_HOME``): relative paths of the config (tables,
  stores) resolve there, as cron's resolve in its checkout - not in the temporary folder Airflow
  gives a task and deletes after it;
* ``CATALOG_ENRICH_CONFIG`` and the other ``CATALOG_ENRICH_*`` variables in the worker's
  environment: config file, MLflow URI, catalog location; secrets (database passwords, tokens)
  come from the environment or a secrets backend, never from the command line.

The nightly run is the same as cron's: incremental over the whole catalog (every product new or
changed since the last run, in any partition), with run id ``nightly-<day>`` (its logical date)
- a retry or a re-run of the same night changes nothing that is done; a run triggered by hand is
its own (``nightly-<day>-manual-<when>``), so it neither takes the night's id nor finds it done -
then checks the run report (exit 3 =
circuit breaker tripped or a critical GX expectation failed) and the run's health (drift,
coverage, estimated precision, inputs against the model's held-out products: exit 1 when a check
failed), and only then draws the night's review sample; a failure alerts, fails the DAG run and
starts nothing after it. Partitions are for backfills (``catalog-enrich backfill``).

An aborted run (exit 3) is not retried. In cluster mode (``submit.sh yarn`` / ``k8s``)
``spark-submit`` returns only success or failure - never the job's 3 or 75 - so where ``enrich``
fails, the task asks the run's report (``report --check`` exits 3 for an aborted run) instead of
the exit code. A busy catalog (75) reads as a failure there and is retried, as it is in client
mode; every retry is the same run (the run id is fixed per night), so none writes twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from typing import Any

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.x
    from airflow import DAG  # type: ignore[no-redef]
    from airflow.operators.bash import BashOperator  # type: ignore[no-redef]

SUBMIT = "{{ var.value.get('catalog_enrich_submit', '%s') }}" % os.environ.get(
    "CATALOG_ENRICH_SUBMIT", "catalog-enrich"
)
CLI = "{{ var.value.get('catalog_enrich_cli', '%s') }}" % os.environ.get(
    "CATALOG_ENRICH_CLI", "catalog-enrich"
)
AIRFLOW_HOME = os.environ.get("AIRFLOW_HOME", os.path.expanduser("~/airflow"))
REVIEW_DIR = "{{ var.value.get('catalog_enrich_review_dir', '%s') }}" % os.environ.get(
    "CATALOG_ENRICH_REVIEW_DIR", os.path.join(AIRFLOW_HOME, "catalog-enrich-review")
)
# Every task's command starts in the catalog's home, resolved on the worker that runs it (a folder
# fixed when the DAG file is parsed may not exist there)
IN_HOME = (
    "home=\"{{ var.value.get('catalog_enrich_home', '') }}\"; "
    '[ -n "$home" ] || home="${CATALOG_ENRICH_HOME:-$AIRFLOW_HOME}"; [ -n "$home" ] || home="$HOME/airflow"; '
    'cd "$home" || exit 1; '
)
# A scheduled run is its night's: ``nightly-<day>``, every retry the same run. A run triggered by
# hand (or an Airflow backfill) is its own: its type and when it was to run follow the day, so one
# triggered before the night's scheduled run does not take that run's id (which would then find
# it done and do nothing), nor one triggered after it find the night done. A run triggered
# without a logical date (`airflow dags trigger` without -l: Airflow 3) has no ``ds``; its day is
# when it was to run.
RUN_ID = (
    "nightly-{{ (dag_run.logical_date or dag_run.run_after) | ds }}"
    "{{ '' if dag_run.run_type == 'scheduled' else "
    "'-' ~ (dag_run.run_type.value or dag_run.run_type) ~ '-' ~ "
    "((dag_run.run_after or dag_run.logical_date) | ts_nodash) }}"
)


def _day(context: dict[str, Any]) -> str:
    """The run's day as ``RUN_ID`` names it."""
    run = context.get("dag_run")
    when = getattr(run, "logical_date", None) or getattr(run, "run_after", None)
    return when.strftime("%Y-%m-%d") if when is not None else "?"


def _run_id(context: dict[str, Any]) -> str:
    """The run id ``RUN_ID`` renders for this DAG run."""
    run = context.get("dag_run")
    kind = getattr(run, "run_type", "scheduled")
    kind = str(getattr(kind, "value", kind))  # Airflow 3's enum, Airflow 2's string
    if kind == "scheduled":
        return f"nightly-{_day(context)}"
    after = getattr(run, "run_after", None) or getattr(run, "logical_date", None)
    return f"nightly-{_day(context)}-{kind}-{after.strftime('%Y%m%dT%H%M%S') if after else '?'}"


def alert(context: dict[str, Any]) -> None:
    """on_failure_callback: one loud log line per failed task (wire your pager/Slack hook here)."""
    ti = context.get("task_instance")
    logging.getLogger("catalog_enrichment.alerts").error(
        "ALERT catalog-enrichment: task %s of %s failed for %s (try %s); run id %s",
        getattr(ti, "task_id", "?"),
        getattr(ti, "dag_id", "?"),
        _day(context),
        getattr(ti, "try_number", "?"),
        _run_id(context),
    )


DEFAULTS: dict[str, Any] = {
    "owner": "data-platform",
    "retries": 2,
    "retry_delay": dt.timedelta(minutes=10),
    "retry_exponential_backoff": True,
    "on_failure_callback": alert,
}


def _dag(dag_id: str, description: str, schedule: str, timeout_hours: int) -> DAG:
    """One DAG of this project: no catch-up, one run at a time, the shared retries and alert. Its
    ``timeout_hours`` holds every attempt its tasks' retries allow, one after the other (tested):
    a shorter one would end the run before the retries it promises."""
    return DAG(
        dag_id=dag_id,
        description=description,
        schedule=schedule,
        start_date=dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
        catchup=False,
        max_active_runs=1,
        dagrun_timeout=dt.timedelta(hours=timeout_hours),
        default_args=DEFAULTS,
        # a run stopped by its dagrun_timeout skips the tasks left (report_failure too): alert here
        on_failure_callback=alert,
        tags=["catalog-enrichment"],
    )


with _dag(
    "catalog_enrichment_nightly",
    "Enrich the new and changed products with the champion model",
    "15 2 * * *",
    17,
) as nightly:
    enrich = BashOperator(
        task_id="enrich",
        # exit 3: the circuit breaker or a critical expectation stopped the run before any write - bad
        # data, not a flaky job, so not retried (a retry reads a bigger window that may pass the
        # breaker): check_report then fails on the aborted report, once, and report_failure says why.
        # In cluster mode spark-submit exits 1 for it: the run's report says it aborted (exit 3).
        bash_command=(
            f"{IN_HOME}{SUBMIT} enrich --run-id {RUN_ID} || [ $? -eq 3 ] "
            f"|| {{ {CLI} report --run-id {RUN_ID} --check; [ $? -eq 3 ]; }}"
        ),
        execution_timeout=dt.timedelta(hours=4),
    )
    check_report = BashOperator(
        task_id="check_report",
        bash_command=f"{IN_HOME}{CLI} report --run-id {RUN_ID} --check",
        execution_timeout=dt.timedelta(minutes=10),
        retries=0,
    )
    check_health = BashOperator(
        task_id="check_health",
        bash_command=f"{IN_HOME}{CLI} report --run-id {RUN_ID} --health --check",
        execution_timeout=dt.timedelta(minutes=10),
        retries=0,
    )
    review_sample = BashOperator(
        task_id="review_sample",
        bash_command=f"{IN_HOME}{CLI} review sample --run-id {RUN_ID} --out {REVIEW_DIR}/{RUN_ID}.csv",
        execution_timeout=dt.timedelta(minutes=30),
    )
    report_failure = BashOperator(
        task_id="report_failure",
        # Runs only when a step failed: prints the run report (aborted runs name the failing rules)
        # and its health checks into this task's log for the alert; fails itself so the run shows red.
        bash_command=(
            f"{IN_HOME}{CLI} report --run-id {RUN_ID} || true; {CLI} report --run-id {RUN_ID} --health || true; "
            f"echo 'enrichment {RUN_ID} failed' >&2; exit 1"
        ),
        trigger_rule="one_failed",
        execution_timeout=dt.timedelta(minutes=10),
        retries=0,
    )
    enrich >> check_report >> check_health >> review_sample
    [enrich, check_report, check_health] >> report_failure

with _dag(
    "catalog_enrichment_weekly",
    "Labels from the catalog's merchant values, train a challenger on them, then the promotion gate",
    "0 3 * * 0",
    40,
) as weekly:
    labels = BashOperator(
        task_id="labels", bash_command=f"{IN_HOME}{SUBMIT} labels", execution_timeout=dt.timedelta(hours=3)
    )
    train = BashOperator(
        task_id="train", bash_command=f"{IN_HOME}{SUBMIT} train", execution_timeout=dt.timedelta(hours=8)
    )
    promote = BashOperator(
        task_id="promote", bash_command=f"{IN_HOME}{SUBMIT} promote", execution_timeout=dt.timedelta(hours=1)
    )
    labels >> train >> promote
