"""Type names every layer shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

__all__ = ["Say"]

# A progress callback: called with one line per step, stage or epoch (print, a logger, a test's list).
Say: TypeAlias = Callable[[str], None]
