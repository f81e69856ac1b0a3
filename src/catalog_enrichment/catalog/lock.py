"""One run at a time per catalog: an exclusive lock on ``<catalog root>/_lock``.

Enrichment runs (``enrich``, each partition of a ``backfill``) and ``rollback`` hold it from their
first read of the catalog's tables to their last write, whichever scheduler started them (cron,
Airflow, a person), so two of them never interleave their reads and commits. It is an advisory
``flock``: the kernel releases it when the holding process dies, even by SIGKILL, so a crashed run
never leaves the catalog locked. It works where the catalog is on a local or NFSv4 file system;
the Delta commit itself is optimistic as well (a conflicting commit fails, nothing half-written).
Promotions recording into one promotion log take another lock beside it the same way
(``promotion._decision_lock``), for their decision only.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from catalog_enrichment.errors import CatalogEnrichError
from catalog_enrichment.types import Say

__all__ = ["CatalogBusy", "catalog_lock"]


class CatalogBusy(CatalogEnrichError):
    """Another run held the catalog for longer than the run would wait."""


@contextlib.contextmanager
def catalog_lock(
    root: str | Path,
    *,
    owner: str,
    wait_seconds: float,
    say: Say = print,
    name: str = "_lock",
    guards: str = "the catalog",
) -> Iterator[None]:
    """Hold the catalog's lock for the ``with`` block, waiting up to ``wait_seconds`` for it;
    ``name``: another lock file in ``root`` (the promotion log's), ``guards`` what it guards, as the
    messages say it.

    Raises:
        CatalogBusy: another process still held it after ``wait_seconds``.
    """
    path = Path(root) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, waiting = time.monotonic() + wait_seconds, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(path)
                if time.monotonic() >= deadline:
                    raise CatalogBusy(
                        f"another run holds {guards} {root} ({holder}); this one wrote nothing. "
                        f"Run it again when that run has finished, or let it wait longer "
                        f"(catalog.lock_wait_seconds, now {wait_seconds:g})"
                    ) from None
                if not waiting:
                    say(f"  waiting up to {wait_seconds:g}s for the lock of {guards} {root}, held by "
                        f"{holder}")  # fmt: skip
                    waiting = True
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        since = f"{dt.datetime.now(dt.UTC):%Y-%m-%dT%H:%M:%SZ}"
        me = {"owner": owner, "pid": os.getpid(), "host": socket.gethostname(), "since": since}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "unknown holder"
    if not info:
        return "unknown holder"
    return f"{info.get('owner')}, pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
