"""Log hygiene: identical lines in a burst are logged once, then counted.

A flood (a million refused or failing connections) must not turn into a
million log lines: :class:`RepeatFilter` lets the first of identical records
through, holds back the same record for ``window`` seconds, and appends how
many it held back to the next one it lets through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RepeatFilter"]

_MAX_KEYS = 4096


class RepeatFilter(logging.Filter):
    """At most one record per (logger, level, message) and ``window`` seconds."""

    def __init__(self, window: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._window = window
        self._clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}  # → (let through at, held)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        key = (record.name, record.levelno, message)
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self._window:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if len(self._seen) >= _MAX_KEYS:  # forget what is out of its window (or everything)
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._window}
            if len(self._seen) >= _MAX_KEYS:
                self._seen.clear()
        self._seen[key] = (now, 0)
        if last is not None and last[1]:
            record.msg = f"{message} (and {last[1]} more like it in {now - last[0]:.0f} s)"
            record.args = None
        return True
