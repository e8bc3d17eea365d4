"""NarHash → root node: how a NAR uploaded by ``nix copy`` is found again.

Nix uploads a NAR, then (maybe to another frontend, maybe after a restart)
the narinfo naming it by NarHash. The index is kept next to the path infos —
a SQLite table in the same database — so it is persistent and shared by every
process using that store. Entries are written only after the NAR was fully
ingested and its hash checked, with the time: an entry younger than the
garbage collector's upload window is a root (a NAR whose narinfo is not PUT
yet), and the collector drops entries whose content it swept.
"""

from __future__ import annotations

import abc
import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from tvix_castore.directoryservice.sqlite import connect, storage_error, write_one
from tvix_castore.errors import DataCorruption
from tvix_castore.nodes import Node, node_from_proto, node_to_proto
from tvix_castore.protos import castore_pb2

__all__ = ["MemoryNarIndex", "NarIndex", "SqliteNarIndex", "decode_entry", "encode_entry"]


def encode_entry(node: Node) -> bytes:
    """How an index entry's root node is stored: a nameless castore ``Node`` message."""
    return node_to_proto(node.with_name(b"")).SerializeToString(deterministic=True)


def decode_entry(nar_sha256: bytes, data: bytes) -> Node:
    """A stored entry's root node (:class:`DataCorruption` if it does not decode)."""
    msg = castore_pb2.Node()
    try:
        msg.ParseFromString(data)
        return node_from_proto(msg)
    except Exception as exc:
        raise DataCorruption(f"NAR index entry {nar_sha256.hex()} is corrupt: {exc}") from exc


class NarIndex(abc.ABC):
    """Maps a NAR's sha256 to the (nameless) root node it was ingested as, and its size."""

    @abc.abstractmethod
    async def get(self, nar_sha256: bytes) -> tuple[Node, int] | None:
        """The root node and NAR size, or ``None``."""

    @abc.abstractmethod
    async def put(self, nar_sha256: bytes, node: Node, nar_size: int) -> None:
        """Record an ingested NAR."""

    async def aclose(self) -> None:
        """Release resources."""


class MemoryNarIndex(NarIndex):
    """Process-local (for memory:// and remote path info services)."""

    def __init__(self) -> None:
        self._entries: dict[bytes, tuple[Node, int]] = {}

    async def get(self, nar_sha256: bytes) -> tuple[Node, int] | None:
        return self._entries.get(nar_sha256)

    async def put(self, nar_sha256: bytes, node: Node, nar_size: int) -> None:
        self._entries[nar_sha256] = (node, nar_size)


class SqliteNarIndex(NarIndex):
    """A ``nar_index`` table (usually in the path-info database)."""

    def __init__(self, path: str | Path) -> None:
        self._conn = connect(path)
        self._lock = threading.Lock()
        try:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS nar_index ("
                " nar_sha256 BLOB PRIMARY KEY, node BLOB NOT NULL, nar_size INTEGER NOT NULL,"
                " added REAL NOT NULL DEFAULT 0) WITHOUT ROWID"
            )
            columns = {r[1] for r in self._conn.execute("PRAGMA table_info(nar_index)")}
            if "added" not in columns:  # (an older release's table)
                self._conn.execute("ALTER TABLE nar_index ADD COLUMN added REAL NOT NULL DEFAULT 0")
        except sqlite3.Error as exc:
            self._conn.close()
            raise storage_error("creating the nar_index table", exc, path) from exc

    def _get(self, nar_sha256: bytes) -> tuple[bytes, int] | None:
        with self._lock:
            try:
                row = self._conn.execute(
                    "SELECT node, nar_size FROM nar_index WHERE nar_sha256 = ?", (nar_sha256,)
                ).fetchone()
            except sqlite3.Error as exc:
                raise storage_error("reading the NAR index", exc) from exc
        return None if row is None else (bytes(row[0]), int(row[1]))

    async def get(self, nar_sha256: bytes) -> tuple[Node, int] | None:
        row = await asyncio.to_thread(self._get, nar_sha256)
        if row is None:
            return None
        return decode_entry(nar_sha256, row[0]), row[1]

    def _put(self, nar_sha256: bytes, node: bytes, nar_size: int) -> None:
        with self._lock:
            write_one(
                self._conn,
                "INSERT OR REPLACE INTO nar_index (nar_sha256, node, nar_size, added)"
                " VALUES (?, ?, ?, ?)",
                (nar_sha256, node, nar_size, time.time()),
                "writing the NAR index",
            )

    async def put(self, nar_sha256: bytes, node: Node, nar_size: int) -> None:
        await asyncio.to_thread(self._put, nar_sha256, encode_entry(node), nar_size)

    async def aclose(self) -> None:
        with self._lock:
            self._conn.close()
