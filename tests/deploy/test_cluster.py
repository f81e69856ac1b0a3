"""spark-submit jobs/enrich.py to a real Spark standalone cluster (a master and two workers on
127.0.0.1, started from PySpark's own spark-class) and compare with a local-mode run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pytest

from catalog_enrichment.catalog.lakehouse import read_table
from tests.conftest import repo_root, tiny_registry

pytestmark = [pytest.mark.spark, pytest.mark.slow, pytest.mark.timeout(600)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spark_home() -> str:
    import pyspark

    return os.path.dirname(pyspark.__file__)


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [f"{_spark_home()}/bin/spark-class", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[str, list[Path]]]:
    """A standalone master and two 1-core workers; stopped at the end, even on failure."""
    env = {
        **os.environ,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_DAEMON_MEMORY": "512m",
        "SPARK_HOME": _spark_home(),
    }
    port, ui = _port(), _port()
    master = f"spark://127.0.0.1:{port}"
    procs = [
        _start(
            [
                "org.apache.spark.deploy.master.Master",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--webui-port",
                str(ui),
            ],
            tmp_path / "master.log",
            env,
        )
    ]
    work_dirs = []
    try:
        for i in range(2):
            work = tmp_path / f"worker{i}"
            work.mkdir()
            work_dirs.append(work)
            procs.append(
                _start(
                    [
                        "org.apache.spark.deploy.worker.Worker",
                        master,
                        "--host",
                        "127.0.0.1",
                        "--cores",
                        "1",
                        "--memory",
                        "1536m",
                        "--work-dir",
                        str(work),
                        "--webui-port",
                        str(_port()),
                    ],
                    tmp_path / f"worker{i}.log",
                    env,
                )
            )
        deadline = time.time() + 90
        while True:
            try:
                state = json.load(urllib.request.urlopen(f"http://127.0.0.1:{ui}/json/", timeout=2))
                if state.get("aliveworkers") == 2:
                    break
            # not up yet: no connection (OSError), or the master page's HTML (ValueError) while the
            # UI's root handler is attached and its /json/ one not yet (seen once on a busy machine)
            except (OSError, ValueError):
                pass
            if time.time() > deadline:
                raise RuntimeError(
                    "cluster did not come up: " + (tmp_path / "master.log").read_text()[-2000:]
                )
            time.sleep(1)
        yield master, work_dirs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _model_rows(path: Path) -> list[tuple[str, str, str, float, float]]:
    table = read_table(path)
    table = table.filter(pc.equal(table["source"], "model"))
    return sorted(
        (r["product_id"], r["attribute"], r["value"], r["confidence"], r["threshold"])
        for r in table.to_pylist()
    )


def test_spark_submit_to_a_standalone_cluster_writes_what_local_mode_writes(  # type: ignore[no-untyped-def]
    cluster, tmp_path: Path, incoming, scoring_bundle, spark
) -> None:
    from catalog_enrichment.cli import main

    master, work_dirs = cluster
    _, _, _, flags = tiny_registry(tmp_path, scoring_bundle, incoming)
    args = [*flags, "--full", "--run-id", "same-run", "--set", "spark.arrow_max_records_per_batch=256"]
    src = str(repo_root() / "src")
    env = {
        **os.environ,
        "SPARK_MASTER": master,
        "PYSPARK_PYTHON": sys.executable,
        "PYTHONPATH": src,
        "SPARK_LOCAL_IP": "127.0.0.1",
        "SPARK_SUBMIT_EXTRA": f"--conf spark.executorEnv.PYTHONPATH={src} --conf spark.executor.memory=1g "
        "--conf spark.driver.memory=1g --conf spark.sql.execution.arrow.maxRecordsPerBatch=256",
    }
    started = time.perf_counter()
    proc = subprocess.run(
        [
            str(repo_root() / "deploy/spark/submit.sh"),
            "standalone",
            "enrich",
            "--catalog",
            str(tmp_path / "cluster"),
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    assert "run same-run: succeeded" in proc.stdout
    print(f"cluster run: {time.perf_counter() - started:.0f}s")
    # the same job in local mode (this process's local[2] session) on the same data and model
    assert main(["enrich", "--catalog", str(tmp_path / "local"), *args]) == 0
    cluster_rows = _model_rows(tmp_path / "cluster" / "attributes")
    assert len(cluster_rows) > 1000
    local_rows = _model_rows(tmp_path / "local" / "attributes")
    # the same values with the same thresholds; the confidences agree to float noise, because the
    # rows are spread over 4 partitions per core and the cluster has other cores than local[2], so
    # the model batches (and their padding) are cut differently - as the predictor test allows
    assert [(*r[:3], r[4]) for r in cluster_rows] == [(*r[:3], r[4]) for r in local_rows]
    assert max(abs(a[3] - b[3]) for a, b in zip(cluster_rows, local_rows, strict=True)) < 1e-5
    # both workers ran an executor, and each executor ran tasks of the job
    for work in work_dirs:
        logs = list(work.glob("app-*/*/stderr"))
        assert logs, f"no executor ran on {work}"
        assert any("Running task" in log.read_text(errors="replace") for log in logs), work
