"""The catalog lock: one run at a time, a clear message for the one that gives up, and a lock that
dies with its holder (even by SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catalog_enrichment.catalog.lock import CatalogBusy, catalog_lock

pytestmark = pytest.mark.timeout(60)

HOLD = """
import sys, time
from catalog_enrichment.catalog.lock import catalog_lock
with catalog_lock(sys.argv[1], owner="run holder-1", wait_seconds=0):
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(root: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow  # a holder process and a wait: not the fast tier
def test_a_second_run_waits_then_gives_up_naming_the_holder(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    said: list[str] = []
    try:
        started = time.monotonic()
        busy = r"run holder-1, pid \d+ .*wrote nothing.*lock_wait_seconds"
        with (
            pytest.raises(CatalogBusy, match=busy),
            catalog_lock(tmp_path, owner="second", wait_seconds=1.0, say=said.append),
        ):
            pass
        assert 1.0 <= time.monotonic() - started < 5
        assert len(said) == 1 and "waiting up to 1s" in said[0]
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow  # a process killed: not the fast tier
def test_the_lock_dies_with_a_killed_holder(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with catalog_lock(tmp_path, owner="next", wait_seconds=5):
        assert "next" in (tmp_path / "_lock").read_text()


def test_one_process_cannot_take_it_twice(tmp_path: Path) -> None:
    with (
        catalog_lock(tmp_path, owner="first", wait_seconds=0),
        pytest.raises(CatalogBusy),
        catalog_lock(tmp_path, owner="second", wait_seconds=0),
    ):
        pass


@pytest.mark.slow  # a holder process and the CLI: not the fast tier
def test_the_cli_exits_75_when_the_catalog_stays_busy(tmp_path: Path) -> None:
    from catalog_enrichment.catalog.attributes import ensure_attributes_table

    ensure_attributes_table(tmp_path / "lake" / "attributes")
    holder = _holder(tmp_path / "lake")
    try:
        done = subprocess.run(
            [sys.executable, "-c", "from catalog_enrichment.cli import run; run()",
             "rollback", "--run-id", "r1", "--catalog", str(tmp_path / "lake"),
             "--set", "catalog.lock_wait_seconds=0"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 75, done.stderr
    assert done.stderr.count("\n") == 1
    assert "another run holds the catalog" in done.stderr
