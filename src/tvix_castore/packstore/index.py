"""The pack index in ``store.sqlite``: the one owner of the ``pack_*`` tables.

The index is a cache of the packs (every row can be rebuilt from them), so
it only holds what lookups need, in small rows: a frame row per frame, a
blob row per blob (frame id, offset in the decoded payload, size) and a
chunk list per large blob. Writes happen in explicit transactions
(:class:`IndexTxn`): rows of frames whose bytes are already fsynced, all
committed at once or not at all.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from tvix_castore.blobservice.base import ChunkMeta
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.sqlite import connect, in_transaction, storage_error
from tvix_castore.errors import DataCorruption, StorageError
from tvix_castore.packstore.format import MEMBER, FrameMember, Kind

__all__ = [
    "BlobRow",
    "ChunkedRow",
    "FrameRef",
    "FrameRow",
    "IndexTxn",
    "NewFrame",
    "PackIndex",
    "parse_chunk_list",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pack_files (name TEXT PRIMARY KEY, indexed INTEGER NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pack_frames (id INTEGER PRIMARY KEY, pack TEXT NOT NULL,
    offset INTEGER NOT NULL, length INTEGER NOT NULL, kind INTEGER NOT NULL,
    UNIQUE (pack, offset));
CREATE TABLE IF NOT EXISTS pack_blobs (digest BLOB PRIMARY KEY, frame INTEGER NOT NULL,
    offset INTEGER NOT NULL, size INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pack_chunked (digest BLOB PRIMARY KEY, size INTEGER NOT NULL,
    chunks BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pack_meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
INSERT OR IGNORE INTO pack_meta (key, value) VALUES ('format', 2);
"""
_QUERY_BATCH = 500


class FrameRef(NamedTuple):
    """Where a frame lies: enough to read it (``id`` is its index row)."""

    id: int
    pack: str
    offset: int
    length: int


class FrameRow(NamedTuple):
    """A ``pack_frames`` row."""

    id: int
    pack: str
    offset: int
    length: int
    kind: int

    @property
    def ref(self) -> FrameRef:
        return FrameRef(self.id, self.pack, self.offset, self.length)


class BlobRow(NamedTuple):
    """A blob inside a frame: ``offset`` into the frame's decoded payload."""

    frame: FrameRef
    offset: int
    size: int


class ChunkedRow(NamedTuple):
    """A large blob: its size and chunks."""

    size: int
    chunks: tuple[ChunkMeta, ...]


class NewFrame(NamedTuple):
    """A frame appended (and fsynced) whose rows a transaction is to commit."""

    pack: str
    offset: int
    length: int
    kind: int
    members: tuple[FrameMember, ...]
    chunks: bytes = b""  # a CHUNK_LIST frame's payload


def parse_chunk_list(digest: bytes, data: bytes | memoryview) -> tuple[ChunkMeta, ...]:
    """A chunk list (``32-byte digest | u64 size`` each); DataCorruption if malformed."""
    if not data or len(data) % MEMBER.size:
        raise DataCorruption(f"blob {B3Digest(bytes(digest))}: its chunk list is corrupt")
    return tuple(ChunkMeta(B3Digest(d), n) for d, n in MEMBER.iter_unpack(data))


def _batches(items: Sequence[bytes]) -> Iterator[Sequence[bytes]]:
    for i in range(0, len(items), _QUERY_BATCH):
        yield items[i : i + _QUERY_BATCH]


class PackIndex:
    """The pack tables of one ``store.sqlite`` (thread-safe: one connection, one lock)."""

    def __init__(self, db: Path) -> None:
        self.path = Path(db)
        self._conn = connect(self.path)
        self._lock = threading.RLock()
        #: opened read-only (a full disk) on a database without pack tables: all absent
        self.missing = False
        if getattr(self._conn, "read_only", False):
            self.missing = not self.has_table("pack_blobs")
            return
        try:
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._conn.close()
            raise storage_error("creating the pack index", exc, self.path) from exc

    def transaction(self, *, replace: bool = True) -> IndexTxn:
        """A new transaction; with ``replace=False`` existing blob rows are kept (rebuild)."""
        return IndexTxn(self, replace)

    def _read(self, what: str, sql: str, params: Sequence[object] = ()) -> list[Any]:
        if self.missing and "pack_" in sql:
            return []
        with self._lock:
            try:
                return list(self._conn.execute(sql, params))
            except sqlite3.Error as exc:
                raise storage_error(what, exc, self.path) from exc

    def query(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        """A read query on the index's database (for legacy.py and compaction)."""
        return self._read("querying the pack index", sql, params)

    def has_table(self, name: str) -> bool:
        rows = self._read(
            "looking up a table", "SELECT 1 FROM sqlite_master WHERE name = ?", (name,)
        )
        return bool(rows)

    def lookup(self, digests: Sequence[bytes]) -> dict[bytes, BlobRow | ChunkedRow]:
        """Where each indexed blob among ``digests`` is (absent ones are left out)."""
        out: dict[bytes, BlobRow | ChunkedRow] = {}
        unique = list(dict.fromkeys(digests))
        for batch in _batches(unique):
            marks = ",".join("?" * len(batch))
            for raw, off, size, fid, pack, foff, flen in self._read(
                "looking up blobs",
                "SELECT b.digest, b.offset, b.size, f.id, f.pack, f.offset, f.length"
                " FROM pack_blobs b JOIN pack_frames f ON f.id = b.frame"
                f" WHERE b.digest IN ({marks})",
                batch,
            ):
                ref = FrameRef(int(fid), str(pack), int(foff), int(flen))
                out[bytes(raw)] = BlobRow(ref, int(off), int(size))
        rest = [d for d in unique if d not in out]
        for batch in _batches(rest):
            marks = ",".join("?" * len(batch))
            for raw, size, chunks in self._read(
                "looking up chunked blobs",
                f"SELECT digest, size, chunks FROM pack_chunked WHERE digest IN ({marks})",
                batch,
            ):
                key = bytes(raw)
                meta = parse_chunk_list(key, bytes(chunks))
                out[key] = ChunkedRow(int(size), meta)
        return out

    def frames(self, ids: Sequence[int]) -> dict[int, FrameRow]:
        out: dict[int, FrameRow] = {}
        unique = list(dict.fromkeys(ids))
        for i in range(0, len(unique), _QUERY_BATCH):
            batch = unique[i : i + _QUERY_BATCH]
            marks = ",".join("?" * len(batch))
            for fid, pack, off, length, kind in self._read(
                "looking up frames",
                f"SELECT id, pack, offset, length, kind FROM pack_frames WHERE id IN ({marks})",
                batch,
            ):
                row = FrameRow(int(fid), str(pack), int(off), int(length), int(kind))
                out[row.id] = row
        return out

    def frames_of(self, pack: str) -> list[FrameRow]:
        """Every indexed frame of ``pack``, by offset (compaction)."""
        return [
            FrameRow(int(i), str(p), int(o), int(n), int(k))
            for i, p, o, n, k in self._read(
                "listing frames",
                "SELECT id, pack, offset, length, kind FROM pack_frames"
                " WHERE pack = ? ORDER BY offset",
                (pack,),
            )
        ]

    def live_members(self, pack: str) -> dict[int, dict[bytes, tuple[int, int]]]:
        """The blobs indexed in each frame of ``pack``: frame → digest → (offset, size).

        One query per pack (compaction): ``pack_blobs`` has no index by frame
        (it would cost disk on every store), so a query per frame would scan
        the whole table once per frame.
        """
        out: dict[int, dict[bytes, tuple[int, int]]] = {}
        for fid, d, o, n in self._read(
            "listing frame members",
            "SELECT frame, digest, offset, size FROM pack_blobs"
            " WHERE frame IN (SELECT id FROM pack_frames WHERE pack = ?)",
            (pack,),
        ):
            out.setdefault(int(fid), {})[bytes(d)] = (int(o), int(n))
        return out

    def pack_files(self) -> dict[str, int]:
        """Each known pack and how many of its bytes are indexed."""
        return {
            str(name): int(n)
            for name, n in self._read("listing packs", "SELECT name, indexed FROM pack_files")
        }

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class IndexTxn:
    """Rows to commit at once: frames (with their blobs/chunk lists), deletions.

    Nothing is written before :meth:`commit`; :meth:`abort` (or leaving a
    ``with`` block by an exception) drops everything.
    """

    def __init__(self, index: PackIndex, replace: bool) -> None:
        self._index = index
        self._replace = replace
        self.frames: list[NewFrame] = []
        self.packs: dict[str, int] = {}  # pack -> bytes indexed (even without frames)
        self._deleted_frames: list[int] = []
        self._deleted_blobs: list[bytes] = []
        self._deleted_packs: list[str] = []
        self._hooks: list[Callable[[sqlite3.Connection], None]] = []
        self.done = False

    def add_frame(self, frame: NewFrame) -> None:
        self.frames.append(frame)
        self.mark(frame.pack, frame.offset + frame.length)

    def mark(self, pack: str, indexed: int) -> None:
        """Record that ``pack`` is indexed up to ``indexed`` bytes (never moves back)."""
        self.packs[pack] = max(self.packs.get(pack, 0), indexed)

    def delete_frames(self, ids: Sequence[int]) -> None:
        """Drop frame rows and every blob row naming them (compaction)."""
        self._deleted_frames += ids

    def delete_blobs(self, digests: Sequence[bytes]) -> None:
        """Drop the rows of these blobs (small or chunked), e.g. damaged ones to store again."""
        self._deleted_blobs += digests

    def delete_pack(self, name: str) -> None:
        """Drop a pack's rows: its frames, their blobs, its ``pack_files`` row."""
        self._deleted_packs.append(name)

    def on_commit(self, hook: Callable[[sqlite3.Connection], None]) -> None:
        """Run ``hook(conn)`` inside the commit's SQLite transaction (the store layer's rows)."""
        self._hooks.append(hook)

    def __enter__(self) -> IndexTxn:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.done:
            self.commit()

    def abort(self) -> None:
        self.done = True
        self.frames.clear()

    def commit(self) -> None:
        if self.done:
            raise StorageError("index transaction already finished")
        self.done = True
        if not (
            self.frames
            or self.packs
            or self._deleted_frames
            or self._deleted_blobs
            or self._deleted_packs
            or self._hooks
        ):
            return
        index = self._index

        def body(conn: sqlite3.Connection) -> None:
            self._write(conn)
            for hook in self._hooks:
                hook(conn)

        with index._lock:
            in_transaction(index._conn, "indexing pack frames", body)

    def _write(self, conn: sqlite3.Connection) -> None:
        verb = "INSERT OR REPLACE" if self._replace else "INSERT OR IGNORE"
        blobs: list[tuple[bytes, int, int, int]] = []
        chunked: list[tuple[bytes, int, bytes]] = []
        for f in self.frames:
            (fid,) = conn.execute(
                "INSERT INTO pack_frames (pack, offset, length, kind) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (pack, offset) DO UPDATE SET length = excluded.length"
                " RETURNING id",
                (f.pack, f.offset, f.length, f.kind),
            ).fetchone()
            if f.kind in (Kind.BLOBS, Kind.DIRECTORIES):  # (content-addressed: one namespace)
                at = 0
                for m in f.members:
                    blobs.append((m.key, fid, at, m.size))
                    at += m.size
            elif f.kind == Kind.CHUNK_LIST:
                for m in f.members:
                    chunked.append((m.key, m.size, f.chunks))
        for name in self._deleted_packs:
            conn.execute(
                "DELETE FROM pack_blobs WHERE frame IN (SELECT id FROM pack_frames WHERE pack = ?)",
                (name,),
            )
            conn.execute("DELETE FROM pack_frames WHERE pack = ?", (name,))
            conn.execute("DELETE FROM pack_files WHERE name = ?", (name,))
        for digest in self._deleted_blobs:
            conn.execute("DELETE FROM pack_blobs WHERE digest = ?", (digest,))
            conn.execute("DELETE FROM pack_chunked WHERE digest = ?", (digest,))
        for fid in self._deleted_frames:
            conn.execute("DELETE FROM pack_blobs WHERE frame = ?", (fid,))
            conn.execute("DELETE FROM pack_frames WHERE id = ?", (fid,))
        blobs.sort()  # (in key order: pages fill up instead of splitting half-full)
        conn.executemany(
            f"{verb} INTO pack_blobs (digest, frame, offset, size) VALUES (?, ?, ?, ?)", blobs
        )
        conn.executemany(
            f"{verb} INTO pack_chunked (digest, size, chunks) VALUES (?, ?, ?)", chunked
        )
        conn.executemany(
            "INSERT INTO pack_files (name, indexed) VALUES (?, ?) ON CONFLICT (name)"
            " DO UPDATE SET indexed = max(indexed, excluded.indexed)",
            [(name, n) for name, n in self.packs.items() if name not in self._deleted_packs],
        )
