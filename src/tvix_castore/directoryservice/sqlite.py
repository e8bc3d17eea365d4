"""``sqlite:///abs/path``: Directories in SQLite (WAL), canonical bytes by digest.

A closure is committed in one transaction, so readers (also in other
processes) see all of it or nothing. Every read re-hashes the stored bytes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import (
    ChecksumMismatch,
    DataCorruption,
    StorageError,
    StorageUnavailable,
    ValidationError,
)
from tvix_castore.lazy import lazy_module
from tvix_castore.nodes import Directory

if TYPE_CHECKING:
    import asyncio
else:
    asyncio = lazy_module("asyncio")  # not needed to write a NAR from its plan

__all__ = ["SqliteDirectoryService", "connect", "storage_error", "write_rows", "write_tables"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS directories (
    digest BLOB PRIMARY KEY,
    data BLOB NOT NULL
) WITHOUT ROWID;
"""
_BATCH = 500
# SQLite's own corruption reports are DATA_LOSS, not a generic failure (SPEC A2).
_CORRUPT = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def storage_error(what: str, exc: sqlite3.Error) -> StorageError:
    """Our error for a failed SQLite operation, classed by SQLite's primary result code."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF  # extended codes keep it in the low byte
    if primary in _CORRUPT:
        return DataCorruption(f"{what}: {exc}")
    if primary in _BUSY:
        return StorageUnavailable(f"{what}: {exc}")
    return StorageError(f"{what}: {exc}")


def write_rows(
    conn: sqlite3.Connection, sql: str, rows: Sequence[tuple[Any, ...]], what: str
) -> None:
    """``executemany(sql, rows)`` in one immediate transaction (all rows or none)."""
    write_tables(conn, [(sql, rows)], what)


def write_tables(
    conn: sqlite3.Connection, writes: Sequence[tuple[str, Sequence[tuple[Any, ...]]]], what: str
) -> None:
    """Each ``executemany(sql, rows)`` of ``writes``, all in one immediate transaction."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in writes:
                conn.executemany(sql, rows)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise storage_error(what, exc) from exc


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in WAL mode, tuned for many small transactions."""
    try:
        conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA wal_autocheckpoint=16384")
    except sqlite3.Error as exc:
        raise storage_error(f"cannot open SQLite database {path}", exc) from exc
    return conn


class SqliteDirectoryService(DirectoryService):
    """Directories in a SQLite database file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn = connect(self.path)
        self._lock = threading.Lock()
        with self._lock:
            try:
                self._conn.executescript(_SCHEMA)
            except sqlite3.Error as exc:
                self._conn.close()
                raise storage_error(f"cannot set up SQLite database {path}", exc) from exc

    def _decode(self, digest: B3Digest, data: bytes) -> Directory:
        if B3Digest.of(data) != digest:
            raise ChecksumMismatch(f"stored directory {digest} does not match its digest")
        try:
            return Directory.from_bytes(data)
        except ValidationError as exc:
            raise DataCorruption(f"stored directory {digest} is invalid: {exc}") from exc

    def _get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        out: dict[B3Digest, Directory] = {}
        with self._lock:
            try:
                for i in range(0, len(digests), _BATCH):
                    batch = digests[i : i + _BATCH]
                    marks = ",".join("?" * len(batch))
                    rows = self._conn.execute(
                        f"SELECT digest, data FROM directories WHERE digest IN ({marks})",
                        [d.raw for d in batch],
                    ).fetchall()
                    for raw, data in rows:
                        digest = B3Digest(raw)
                        out[digest] = self._decode(digest, data)
            except sqlite3.Error as exc:
                raise storage_error("reading directories", exc) from exc
        return out

    async def get(self, digest: B3Digest) -> Directory | None:
        found = await asyncio.to_thread(self._get_many, [digest])
        return found.get(digest)

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        level = [root]
        seen = {root}
        first = True
        while level:
            found = await asyncio.to_thread(self._get_many, level)
            if first and root not in found:
                return
            first = False
            queue: deque[B3Digest] = deque(level)
            nxt: list[B3Digest] = []
            while queue:
                digest = queue.popleft()
                directory = found.get(digest)
                if directory is None:
                    raise DataCorruption(f"directory {digest} missing from closure of {root}")
                yield directory
                for child in directory.directories:
                    if child.digest not in seen:
                        seen.add(child.digest)
                        nxt.append(child.digest)
            level = nxt

    def _commit_sync(self, directories: Sequence[Directory]) -> None:
        rows = [(d.digest.raw, d.encode()) for d in directories]
        with self._lock:
            write_rows(
                self._conn,
                "INSERT OR IGNORE INTO directories (digest, data) VALUES (?, ?)",
                rows,
                "writing directories",
            )

    async def _commit(self, directories: Sequence[Directory]) -> None:
        await asyncio.to_thread(self._commit_sync, directories)

    async def aclose(self) -> None:
        with self._lock:
            self._conn.close()
