"""What blob services tell an observer: bytes written to them, and how many were new.

The store layer (``tvix_store.telemetry``) turns these into its dedup
metrics; castore itself records nothing and imports nothing for it. One
observer per process (metrics are per process too); without one, every
report is a no-op::

    >>> from tvix_castore import observe
    >>> seen = []
    >>> observe.set_blob_observer(lambda received, stored: seen.append((received, stored)))
    >>> observe.blobs_written(10, 4)
    >>> observe.set_blob_observer(None)
    >>> seen
    [(10, 4)]

Backends report from whatever thread writes (the observer must be
thread-safe); bytes written in a forked ingestion worker are not reported.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["BlobObserver", "blobs_written", "set_blob_observer"]

BlobObserver = Callable[[int, int], None]
"""``(received, stored)``: blob bytes handed to a service, and those of them stored anew."""

_observer: BlobObserver | None = None
_pid = 0  # the process the observer was set in (a forked worker reports nothing)


def set_blob_observer(observer: BlobObserver | None) -> None:
    """Send every later report to ``observer`` (``None``: to nobody)."""
    global _observer, _pid
    _observer, _pid = observer, os.getpid()


def blobs_written(received: int, stored: int) -> None:
    """Report ``received`` blob bytes written, ``stored`` of which were not stored before."""
    observer = _observer
    if observer is not None and received and os.getpid() == _pid:
        observer(received, stored)
