"""``sqlite:///abs/path``: PathInfos in SQLite (WAL), protobuf bytes by digest.

Shares the database file format (and, in the embedded store, the file) with
the SQLite DirectoryService; each service keeps its own connection.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tvix_castore.directoryservice.sqlite import connect, storage_error, write_one
from tvix_castore.errors import DataCorruption, ValidationError
from tvix_castore.lazy import lazy_module
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.base import PathInfoService

if TYPE_CHECKING:
    import asyncio
else:
    asyncio = lazy_module("asyncio")  # not needed to write a NAR from its plan

__all__ = ["SqlitePathInfoService"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pathinfos (
    digest BLOB PRIMARY KEY,
    data BLOB NOT NULL
) WITHOUT ROWID;
"""
_PAGE = 256


Journal = Callable[[bytes, bytes], None]
"""Gets (digest, encoding) of a PathInfo about to be stored (anew or changed), before it is."""


class SqlitePathInfoService(PathInfoService):
    """PathInfos in a SQLite database file.

    With ``journal``, each PathInfo stored anew (or changed) is handed to it
    before its row commits (the embedded store keeps them in its packs too).
    """

    def __init__(self, path: str | Path, *, journal: Journal | None = None) -> None:
        self.path = Path(path)
        self._journal = journal
        self._conn = connect(self.path)
        self._lock = threading.Lock()
        try:
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._conn.close()
            raise storage_error("creating the pathinfos table", exc, self.path) from exc

    def _decode(self, digest: bytes, data: bytes) -> PathInfo:
        try:
            info = PathInfo.from_bytes(data)
        except ValidationError as exc:
            raise DataCorruption(f"stored PathInfo {digest.hex()} is invalid: {exc}") from exc
        if info.digest != digest:
            raise DataCorruption(f"stored PathInfo {digest.hex()} is for another path")
        return info

    def _get(self, digest: bytes) -> bytes | None:
        with self._lock:
            try:
                row = self._conn.execute(
                    "SELECT data FROM pathinfos WHERE digest = ?", (digest,)
                ).fetchone()
            except sqlite3.Error as exc:
                raise storage_error("reading a PathInfo", exc) from exc
        return None if row is None else bytes(row[0])

    def _get_locked(self, digest: bytes) -> bytes | None:
        try:
            row = self._conn.execute(
                "SELECT data FROM pathinfos WHERE digest = ?", (digest,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise storage_error("reading a PathInfo", exc) from exc
        return None if row is None else bytes(row[0])

    def restore_sync(self, data: bytes | memoryview) -> None:
        """Put back a PathInfo found in a journal (not journaled again)."""
        data = bytes(data)
        try:
            info = PathInfo.from_bytes(data)
        except ValidationError as exc:
            raise DataCorruption(f"a journaled PathInfo is invalid: {exc}") from exc
        with self._lock:
            write_one(
                self._conn,
                "INSERT OR REPLACE INTO pathinfos (digest, data) VALUES (?, ?)",
                (info.digest, data),
                "restoring a PathInfo",
            )

    def get_sync(self, digest: bytes) -> PathInfo | None:
        """:meth:`get`, blocking."""
        data = self._get(digest)
        return None if data is None else self._decode(digest, data)

    async def get(self, digest: bytes) -> PathInfo | None:
        return await asyncio.to_thread(self.get_sync, digest)

    def _put(self, digest: bytes, data: bytes) -> None:
        with self._lock:
            if self._journal is not None and self._get_locked(digest) != data:
                self._journal(digest, data)  # first: a crash never leaves a row it lacks
            write_one(
                self._conn,
                "INSERT OR REPLACE INTO pathinfos (digest, data) VALUES (?, ?)",
                (digest, data),
                "writing a PathInfo",
            )

    async def put(self, info: PathInfo) -> PathInfo:
        await asyncio.to_thread(self._put, info.digest, info.encode())
        return info

    def _page(self, after: bytes) -> list[tuple[bytes, bytes]]:
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT digest, data FROM pathinfos WHERE digest > ? ORDER BY digest LIMIT ?",
                    (after, _PAGE),
                ).fetchall()
            except sqlite3.Error as exc:
                raise storage_error("listing PathInfos", exc) from exc
        return [(bytes(d), bytes(v)) for d, v in rows]

    async def list(self) -> AsyncIterator[PathInfo]:
        after = b""
        while rows := await asyncio.to_thread(self._page, after):
            for digest, data in rows:
                yield self._decode(digest, data)
            after = rows[-1][0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    async def aclose(self) -> None:
        self.close()
