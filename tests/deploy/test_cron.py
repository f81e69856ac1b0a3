"""The cron wrapper: a lock so runs never overlap, a dated log, the job's exit status."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catalog_enrichment.catalog.attributes import find_run_commit
from catalog_enrichment.catalog.lakehouse import table_version
from catalog_enrichment.catalog.reports import read_reports
from tests.conftest import ONE_CORE, repo_root, tiny_registry

WRAPPER = repo_root() / "deploy" / "cron" / "catalog-enrich-cron.sh"


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "CATALOG_ENRICH_HOME": str(repo_root()),
        "CATALOG_ENRICH_PYTHON": sys.executable,
        "CATALOG_ENRICH_LOG_DIR": str(tmp / "logs"),
        "CATALOG_ENRICH_LOCK_DIR": str(tmp / "locks"),
        "PYTHONPATH": str(repo_root() / "src"),
        **extra,
    }


@pytest.mark.timeout(60)
def test_a_failing_job_exits_non_zero_and_logs_to_a_dated_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(WRAPPER), "report", "--catalog", str(tmp_path / "none")],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "report failed with status 2" in proc.stderr
    logs = list((tmp_path / "logs").glob("report-*.log"))
    assert len(logs) == 1 and logs[0].name == f"report-{time.strftime('%Y-%m-%d', time.gmtime())}.log"
    assert "no enrichment runs recorded" in logs[0].read_text()
    bad = subprocess.run([str(WRAPPER), "nope"], env=_env(tmp_path), capture_output=True, text=True)
    assert bad.returncode == 64 and "no such job" in bad.stderr


@pytest.mark.timeout(60)
def test_a_job_runs_its_own_checkout_s_package_in_that_checkout(tmp_path: Path) -> None:
    """An interpreter whose installed package is another checkout's (the shared virtual environment
    points at whichever checkout ran make last) still runs this checkout's package beside its jobs/,
    from the checkout's folder, where the config's relative paths are."""
    checkout = tmp_path / "checkout"
    (checkout / "jobs").mkdir(parents=True)
    (checkout / "src" / "catalog_enrichment").mkdir(parents=True)
    (checkout / "src" / "catalog_enrichment" / "__init__.py").write_text("")
    (checkout / "jobs" / "where.py").write_text(
        "import os, catalog_enrichment\nprint('package', catalog_enrichment.__file__, 'in', os.getcwd())\n"
    )
    env = {k: v for k, v in _env(tmp_path, CATALOG_ENRICH_HOME=str(checkout)).items() if k != "PYTHONPATH"}
    done = subprocess.run([str(WRAPPER), "where"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (log,) = (tmp_path / "logs").glob("where-*.log")
    assert f"package {checkout}/src/catalog_enrichment/__init__.py in {checkout}" in log.read_text()


@pytest.mark.timeout(60)
def test_the_lock_lives_in_a_folder_only_the_job_s_user_can_write(tmp_path: Path) -> None:
    """By default under the user's own runtime or cache folder, never /tmp; a lock folder others can
    write (where any local user could hold the lock and block every run) is refused, exit 78."""
    env = {k: v for k, v in _env(tmp_path).items() if k not in ("CATALOG_ENRICH_LOCK_DIR", "XDG_RUNTIME_DIR")}
    home = tmp_path / "home"
    done = subprocess.run(
        [str(WRAPPER), "report", "--catalog", str(tmp_path / "none")],
        env={**env, "HOME": str(home)}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2  # the job ran (and found no runs)
    lock_dir = home / ".cache" / "catalog-enrich"
    assert (lock_dir / "report.lock").is_file() and lock_dir.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o1777)  # what /tmp is
    refused = subprocess.run(
        [str(WRAPPER), "report", "--catalog", str(tmp_path / "none")],
        env={**env, "CATALOG_ENRICH_LOCK_DIR": str(shared)}, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode == 78 and "writable by no one else" in refused.stderr
    assert list(shared.iterdir()) == []
    # a wait that is not a number of seconds is a config mistake, not "another run holds the lock"
    bad = subprocess.run(
        [str(WRAPPER), "report", "--catalog", str(tmp_path / "none")],
        env=_env(tmp_path, CATALOG_ENRICH_LOCK_WAIT="5m"), capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 78 and "must be a number of seconds, not '5m'" in bad.stderr


@pytest.mark.spark
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_runs_at_once_never_overlap_and_nothing_is_written_twice(
    tmp_path: Path, incoming, scoring_bundle
) -> None:  # type: ignore[no-untyped-def]

    _, _, _, flags = tiny_registry(tmp_path, scoring_bundle, incoming)
    args = [
        "enrich",
        "--catalog",
        str(tmp_path / "lake"),
        *flags,
        "--run-id",
        "nightly-1",
        "--set",
        ONE_CORE,
    ]
    first = subprocess.Popen(
        [str(WRAPPER), *args], env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    log = tmp_path / "logs" / f"enrich-{time.strftime('%Y-%m-%d', time.gmtime())}.log"
    deadline = time.time() + 60
    while not (log.exists() and "start" in log.read_text()):
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.2)
    # a second run while the first holds the lock: exits at once with 75
    second = subprocess.run(
        [str(WRAPPER), *args], env=_env(tmp_path), capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 75 and "another run holds" in second.stderr
    # a third one that may wait: runs after the first, finds the run done, writes nothing
    third = subprocess.Popen(
        [str(WRAPPER), *args],
        env=_env(tmp_path, CATALOG_ENRICH_LOCK_WAIT="500"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert first.wait(timeout=500) == 0, first.stderr.read() if first.stderr else ""
    attributes = tmp_path / "lake" / "attributes"
    version_after_first = table_version(attributes)
    assert third.wait(timeout=500) == 0
    assert table_version(attributes) == version_after_first
    assert find_run_commit(attributes, "nightly-1") == version_after_first
    assert [r.run_id for r in read_reports(tmp_path / "lake" / "run_reports")] == ["nightly-1"]
    text = log.read_text()
    assert text.count("enrich: start") == 2 and "already succeeded; nothing to do" in text
