"""Fault hooks: the points where the test suite and ``bench chaos`` kill a job on purpose.

One environment variable, :data:`FAULT_ENV` (``CATALOG_ENRICH_FAULT``), names one point; the
process that reaches it SIGKILLs itself. Nothing sets it in production, where each hook is one
environment lookup.

=========================  =====================================================================
``CATALOG_ENRICH_FAULT=``  the process killed
=========================  =====================================================================
``before_merge``           enrich: the values decided, nothing written yet (``enrich/run.py``)
``after_stage``            a catalog write: the run's rows staged, not merged
``during_merge``           a catalog write: the merge under way (the lakehouse: as its first file
                           appears, from a watcher process; PostgreSQL: between its statements)
``after_merge``            a catalog write: merged, the quarantine not written
``after_quarantine``       a catalog write: all written, the run not yet marked finished
``during_rollback``        a rollback with runs still to undo
``after_rollback``         a rollback committed, its output not yet printed
``rank:<r>:<step>``        distributed training: rank ``r`` at its training step ``step`` (read
                           on the driver and sent to the ranks, so it reaches a cluster's too)
``worker:<marker file>``   Spark scoring: the first Python worker to create the marker file,
                           after scoring a batch (Spark retries the task)
=========================  =====================================================================
"""

from __future__ import annotations

import os
import signal

__all__ = ["FAULT_ENV", "armed", "fault_point", "kill_this_process"]

FAULT_ENV = "CATALOG_ENRICH_FAULT"


def armed(point: str) -> str | None:
    """What :data:`FAULT_ENV` gives ``point``: the text after ``<point>:`` ("" for the bare name), or
    None when it names another point or is unset."""
    value = os.environ.get(FAULT_ENV)
    if value is None:
        return None
    name, _, argument = value.partition(":")
    return argument if name == point else None


def kill_this_process() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def fault_point(point: str) -> None:
    """SIGKILL this process when :data:`FAULT_ENV` names ``point``."""
    if armed(point) is not None:
        kill_this_process()
