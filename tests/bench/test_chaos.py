"""The chaos scenarios (``make chaos``) as tests: real ``catalog-enrich`` processes killed and
disturbed mid-run; no value lost, none wrong, no run half-committed, every failure one clear line.

The disturbed runs are real processes, as in ``make chaos``; the undisturbed ones (the reference,
the re-runs after a kill, the runs on a damaged artifact) run here, through ``cli.main`` on this
worker's Spark session."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from catalog_enrichment.bench.chaos import (
    SCENARIOS,
    ChaosSetup,
    Finished,
    Observation,
    format_table,
    run_chaos,
)
from catalog_enrichment.config import SyntheticConfig
from catalog_enrichment.data.synthetic import generate_marketplace
from tests.conftest import ONE_CORE, cli_in_process, mlflow_store, register_bundle

# The observations fixture runs ten real job processes one after another (about 12 to 16 minutes
# under make test, the cluster's tests running beside it on the other core), after waiting for
# the shared scoring bundle: its limit is for a hang, not for a slow machine.
pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.spark, pytest.mark.timeout(1500)]


def _in_this_process(arguments: Sequence[str]) -> Finished:
    started = time.perf_counter()
    code, out, err = cli_in_process(arguments)
    return Finished(code, out, err, time.perf_counter() - started)


@pytest.fixture(scope="module")
def observations(tmp_path_factory, spark, scoring_bundle, taxonomy) -> Iterator[dict[str, Observation]]:  # type: ignore[no-untyped-def]
    """Every scenario's observation; MLflow's tracking URI (a global and an environment variable
    that ``mlflow.set_tracking_uri`` sets) is put back afterwards, as a module fixture the
    per-test restore does not cover. The Great Expectations checkpoint is off in these runs (it is
    not what a kill tests; ``tests/test_expectations.py`` runs it in real processes)."""
    import mlflow

    from catalog_enrichment import registry

    env, uri_before = dict(os.environ), mlflow.get_tracking_uri()
    work = tmp_path_factory.mktemp("chaos")
    incoming = generate_marketplace(
        work / "incoming",
        SyntheticConfig(products=300, seed=7, bad_rate=0.04, image_size=32, days=3),
        taxonomy=taxonomy,
    )
    uri = mlflow_store(work / "mlflow.db")
    try:
        client = registry.configure_mlflow(uri)
        registered = register_bundle(
            client, scoring_bundle, incoming, name="chaos", artifacts=work / "artifacts"
        )
        registry.set_alias(client, "chaos", registry.CHAMPION, registered.version)
        setup = ChaosSetup(
            work,
            incoming.products,
            uri,
            "chaos",
            settings=("validation.great_expectations=false",),
            process_settings=(ONE_CORE,),
        )
        found = run_chaos(setup, say=lambda m: None, follow_up=_in_this_process)
    finally:
        mlflow.set_tracking_uri(uri_before)
        os.environ.clear()
        os.environ.update(env)
    print("\n" + format_table(found))
    print("\n".join(f"{o.seconds:7.1f} s  {o.scenario}" for o in found))
    yield dict(zip(SCENARIOS, found, strict=True))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_no_value_is_lost_or_wrong_and_no_run_is_half_committed(
    observations: dict[str, Any], name: str
) -> None:
    o = observations[name]
    assert (o.rows_lost, o.wrong_rows, o.half_committed) == (0, 0, 0), o
    assert o.passed, o


def test_every_failure_a_user_meets_is_one_line_naming_cause_and_next_step(
    observations: dict[str, Any],
) -> None:
    down = observations["mlflow_down"].messages[0]
    assert "MLflow tracking server http://127.0.0.1:" in down and "start it" in down
    for name in ("artifact_missing", "artifact_corrupt"):
        line = observations[name].messages[0]
        assert "models:/chaos/" in line and ("register" in line or "promote" in line), line
    assert "corrupt" in observations["artifact_corrupt"].messages[0]
