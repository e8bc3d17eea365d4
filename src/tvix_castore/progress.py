"""What long castore work reports its progress to (ingestion, pack checks, compaction).

Only the interface: the store's CLI passes an object that draws a bar
(``tvix_store.progress``); ``None`` reports nothing.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Progress"]


class Progress(Protocol):
    """Told how much work the current step has, and how much more is done.

    ``items`` are the step's unit (files, frames, packs), ``bytes`` what they
    hold. Calls come from one thread at a time, not always the caller's.
    """

    def total(self, *, items: int | None = None, bytes: int | None = None) -> None:
        """How much there is, once known."""

    def advance(self, items: int = 0, bytes: int = 0) -> None:
        """How much more is done."""
