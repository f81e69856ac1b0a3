"""A test run stopped part-way - Ctrl-C (SIGINT) or a CI timeout (SIGTERM) sent to its process group
- leaves no PostgreSQL server, Spark JVM, MLflow server or job process running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import repo_root

pytestmark = [pytest.mark.slow, pytest.mark.spark, pytest.mark.postgres, pytest.mark.timeout(400)]

# Every process the interrupted run starts inherits this variable: it is how they are found.
MARK = "CATALOG_ENRICH_INTERRUPTED_RUN"


def _marked(value: str) -> dict[int, str]:
    """The live processes whose environment carries ``MARK=value``: pid -> command line."""
    found = {}
    needle = f"{MARK}={value}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def _kinds(processes: dict[int, str]) -> dict[str, int]:
    commands = list(processes.values())
    return {
        "postgres": sum("bin/postgres" in c for c in commands),
        "java": sum(c.startswith(("java", "/usr/lib/jvm")) or "/bin/java " in c for c in commands),
        "mlflow": sum("mlflow" in c and "server" in c for c in commands),
    }


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_leaves_no_server_or_job_running(tmp_path: Path, sig: signal.Signals) -> None:
    value = uuid.uuid4().hex
    command = [
        sys.executable, "-m", "pytest", "-n", "2", "--dist", "load", "-p", "no:cacheprovider", "-q",
        "--basetemp", str(tmp_path / "run"), "tests/interrupted_run_target.py",
    ]  # fmt: skip
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        run = subprocess.Popen(
            command,
            cwd=repo_root(),
            env={**os.environ, MARK: value},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group of its own, as a terminal or a CI runner gives it
        )
    try:
        deadline = time.monotonic() + 240
        kinds = _kinds(_marked(value))
        while not (kinds["postgres"] and kinds["java"] >= 2 and kinds["mlflow"]):
            assert run.poll() is None and time.monotonic() < deadline, (kinds, log.read_text()[-3000:])
            time.sleep(1)
            kinds = _kinds(_marked(value))
        os.killpg(run.pid, sig)
        code = run.wait(timeout=120)
        deadline = time.monotonic() + 60
        while _marked(value) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _marked(value)
        assert not left, f"left running after {sig.name} (exit {code}): {left}\n{log.read_text()[-3000:]}"
        assert code != 0, log.read_text()[-3000:]  # it was interrupted, not finished
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        for pid in _marked(value):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _at_the_tenth_look(action: str) -> str:
    """A driver script's start: PySpark's looks for the port file (under ``sys.argv[1]``) run
    ``action`` at the tenth."""
    return f"""
import os, signal, sys
import pyspark.java_gateway
looks, isfile = [0], os.path.isfile
def looking(path):
    if os.path.dirname(str(path)).startswith(sys.argv[1]):
        looks[0] += 1
        if looks[0] == 10:
            {action}
    return isfile(path)
pyspark.java_gateway.os.path.isfile = looking
"""


# A Ctrl-C while PySpark waits for the JVM it started to report its port (raised here at the
# tenth look for the port file): the JVM, which ignores SIGINT and has no driver yet, must not stay.
_INTERRUPTED_START = (
    _at_the_tenth_look("raise KeyboardInterrupt")
    + """
import time, psutil
from catalog_enrichment import runtime
from catalog_enrichment.config import AppConfig
try:
    runtime.spark_session(AppConfig(spark={"master": "local[1]"}))
except KeyboardInterrupt:
    deadline = time.monotonic() + 30
    while any(c.status() != psutil.STATUS_ZOMBIE for c in psutil.Process().children()):
        assert time.monotonic() < deadline, psutil.Process().children()
        time.sleep(0.2)
    print("interrupted; no JVM left")
"""
)


# A Ctrl-C while the JVM starts, and the driver killed outright as soon as PySpark has removed the
# folder the JVM writes its port to: what ``subprocess.run`` does to a child a quarter-second after
# a Ctrl-C it got too (the driver's own clean-up never runs), and what a test run's job process
# met in CI. The JVM, which ignores SIGINT, writes no port and reads no closed pipe, must not stay.
_KILLED_AFTER_CTRL_C = (
    _at_the_tenth_look("os.kill(os.getpid(), signal.SIGINT)")
    + """
import shutil
rmtree = shutil.rmtree
def removed_then_killed(path, *args, **kwargs):
    rmtree(path, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
pyspark.java_gateway.shutil.rmtree = removed_then_killed
from catalog_enrichment import runtime
from catalog_enrichment.config import AppConfig
runtime.spark_session(AppConfig(spark={"master": "local[1]"}))
"""
)


@pytest.mark.timeout(120)
def test_a_driver_killed_right_after_a_ctrl_c_while_spark_starts_leaves_no_jvm(tmp_path: Path) -> None:
    import tempfile

    value = uuid.uuid4().hex
    log = tmp_path / "driver.log"
    try:
        with log.open("wb") as out:  # a file, not a pipe: a JVM left behind would hold a pipe open
            done = subprocess.run(
                [sys.executable, "-c", _KILLED_AFTER_CTRL_C, tempfile.gettempdir()],
                env={**os.environ, MARK: value},
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=90,
            )
        assert done.returncode == -signal.SIGKILL, log.read_text()[-3000:]
        deadline = time.monotonic() + 30
        while _marked(value) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _marked(value)
    finally:
        for pid in _marked(value):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
def test_a_ctrl_c_while_spark_starts_leaves_no_jvm() -> None:
    import tempfile

    done = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_START, tempfile.gettempdir()],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.stdout.strip() == "interrupted; no JVM left", done.stderr[-3000:]
