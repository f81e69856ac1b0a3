"""Progress of long loops: without a terminal, a line about every minute; on one, tqdm's bar."""

from __future__ import annotations

import io

import pytest

from catalog_enrichment import progress as progress_module
from catalog_enrichment.progress import library_bars, progress

pytestmark = pytest.mark.timeout(30)


class _Clock:
    """``time.monotonic`` advancing 25 s at each reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 25.0
        return self.now


def test_without_a_terminal_a_line_comes_about_every_minute_with_the_count_so_far(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())  # not a terminal
    monkeypatch.setattr(progress_module.time, "monotonic", _Clock())
    said: list[str] = []
    batches = [[0] * 100] * 5 + [[0] * 50]
    out = list(progress(batches, desc="embedding", unit="product", total=550, size=len, say=said.append))
    assert out == batches  # every item passes, in order
    # the clock reads 25 s at the start, then 50, 75, ... after each batch: a line once 60 s have
    # passed since the last one (after the third batch, 75 s in, and the sixth, 150 s in)
    assert said == ["embedding: 300 of 550 products, 1.2 min", "embedding: 550 of 550 products, 2.5 min"]


def test_items_with_a_length_give_the_total_and_standard_error_is_the_default(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    err = io.StringIO()
    monkeypatch.setattr(progress_module.sys, "stderr", err)
    monkeypatch.setattr(progress_module.time, "monotonic", _Clock())
    assert list(progress(range(3), desc="epoch 1/2", unit="step", every=40.0)) == [0, 1, 2]
    assert err.getvalue().splitlines() == ["epoch 1/2: 2 of 3 steps, 0.8 min"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_tqdm_draws_the_bar_and_nothing_is_said(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    terminal = _Terminal()
    monkeypatch.setattr(progress_module.sys, "stderr", terminal)
    said: list[str] = []
    items = list(progress(range(5), desc="scoring", unit="batch", say=said.append, every=0.0))
    assert items == list(range(5))
    assert said == [] and "scoring" in terminal.getvalue()


def test_transformers_loading_bar_is_drawn_on_a_terminal_only_and_its_setting_restored(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import utils as hub
    from transformers.utils import logging as transformers_logging
    from transformers.utils.logging import tqdm

    before, hub_before = transformers_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    transformers_logging.enable_progress_bar()
    try:
        for stderr, drawn in ((io.StringIO(), False), (_Terminal(), True)):
            monkeypatch.setattr(progress_module.sys, "stderr", stderr)
            with library_bars():
                assert transformers_logging.is_progress_bar_enabled() is drawn
                assert list(tqdm(range(3), desc="Loading weights", file=stderr)) == [0, 1, 2]
            assert transformers_logging.is_progress_bar_enabled()
            assert ("Loading weights" in stderr.getvalue()) is drawn
        transformers_logging.disable_progress_bar()  # a setting turned off before is left off
        with library_bars():
            pass
        assert not transformers_logging.is_progress_bar_enabled()
        # the hub's bars turned off on their own stay off, whether or not transformers' were changed
        transformers_logging.enable_progress_bar()
        for stderr in (io.StringIO(), _Terminal()):
            hub.disable_progress_bars()
            monkeypatch.setattr(progress_module.sys, "stderr", stderr)
            with library_bars():
                pass
            assert hub.are_progress_bars_disabled() and transformers_logging.is_progress_bar_enabled()
    finally:
        (transformers_logging.enable_progress_bar if before else transformers_logging.disable_progress_bar)()
        (hub.disable_progress_bars if hub_before else hub.enable_progress_bars)()
