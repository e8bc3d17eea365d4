"""``service.sqlite``: the data directory's database of tokens and named caches."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from tvix_castore.directoryservice.sqlite import connect, storage_error

__all__ = ["open_service_db", "service_db_path"]


def service_db_path(home: Path) -> Path:
    """Where ``home``'s service database is."""
    return home / "service.sqlite"


def open_service_db(home: Path, schema: str, what: str) -> sqlite3.Connection:
    """A connection to ``home``'s service database, ``schema`` applied.

    Mode 0600: it holds the caches' secret keys.
    """
    home.mkdir(parents=True, exist_ok=True)
    path = service_db_path(home)
    conn = connect(path)
    try:
        conn.executescript(schema)
    except sqlite3.Error as exc:
        conn.close()
        raise storage_error(f"creating the {what} tables", exc, path) from exc
    os.chmod(path, 0o600)
    return conn
