"""Progress of a long loop: a tqdm bar on a terminal; elsewhere (a scheduler's log, a pipe, where
tqdm shows nothing) one line about every minute, so a step that runs for minutes is never silent."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import TypeVar

from catalog_enrichment.types import Say

__all__ = ["HEARTBEAT_SECONDS", "library_bars", "progress"]

T = TypeVar("T")

# how often a loop that runs without a terminal says how far it got
HEARTBEAT_SECONDS = 60.0


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def progress(
    items: Iterable[T],
    *,
    desc: str,
    unit: str,
    total: int | None = None,
    size: Callable[[T], int] | None = None,
    say: Say | None = None,
    every: float = HEARTBEAT_SECONDS,
) -> Iterator[T]:
    """``items``, counted as they pass: on a terminal a tqdm bar (``leave=False``), elsewhere a line
    through ``say`` (default: standard error) at most every ``every`` seconds, "DESC: 1,536 of 6,391
    UNITs, 1.2 min". ``size``: how many units an item holds (default 1), e.g. a batch's products;
    ``total`` defaults to ``len(items)`` where items are counted one each and have a length."""
    from tqdm.auto import tqdm

    if total is None and size is None and isinstance(items, Sized):
        total = len(items)
    if sys.stderr.isatty():
        with tqdm(total=total, desc=desc, unit=unit, leave=False) as bar:
            for item in items:
                yield item
                bar.update(1 if size is None else size(item))
        return
    say = say or _stderr
    started = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1 if size is None else size(item)
        now = time.monotonic()
        if now - last >= every:
            last = now
            of = "" if total is None else f" of {total:,}"
            say(f"{desc}: {done:,}{of} {unit}s, {(now - started) / 60:.1f} min")


@contextmanager
def library_bars() -> Iterator[None]:
    """Within: transformers' and the Hugging Face hub's own bars (e.g. "Loading weights") drawn on a
    terminal only, as :func:`progress` draws its own; a scheduler's log gets none of their redraws.
    Their setting is restored on leaving."""
    from huggingface_hub import utils as hub
    from transformers.utils import logging as transformers_logging

    hub_off = hub.are_progress_bars_disabled()
    turned_off = transformers_logging.is_progress_bar_enabled() and not sys.stderr.isatty()
    if turned_off:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if turned_off:
            transformers_logging.enable_progress_bar()  # turns the hub's on as well
            if hub_off:
                hub.disable_progress_bars()
