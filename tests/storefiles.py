"""Helpers for tests that reach into an embedded store's files on purpose."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def forget_directories(db: Path) -> int:
    """Drop the index rows of every Directory (they live in DIRECTORIES frames); how many.

    An export that still succeeds afterwards was written from its NAR plan.
    """
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "DELETE FROM pack_blobs WHERE frame IN (SELECT id FROM pack_frames WHERE kind = 2)"
        ).rowcount
