"""The v1 embedded blob store (blobs appended to raw pack files, indexed in SQLite), as released.

Kept for the tests only: they write v1 stores with it and check that the pack
store reads and converts them (tvix_castore.packstore.legacy, compact). The
original module docstring follows.

Blobs and chunks appended to pack files, indexed in SQLite.

Most files in real store paths are a few KiB, and one filesystem object per
blob costs far more than hashing it (a create + rename is ~0.3 ms here;
SQLite BLOB rows are better but still write every byte twice through the
WAL). So blobs up to ``threshold`` bytes (default: the FastCDC minimum chunk
size, below which a blob is a single chunk anyway) are appended, a batch at a
time, to this process's pack file under ``packs/``; a SQLite table maps each
digest to (pack, offset, length).

Larger files being ingested are cut into chunks exactly as the chunk store
would cut them (FastCDC, same sizes, so the same chunk digests), and the
chunks are packed like small blobs (a chunk is a blob of its own); the
``chunked`` table lists each such blob's chunks. One chunk file per chunk in
the B §7.1 layout cost ~0.8 ms each here (a fresh shard directory, a create,
a rename): 1.3 s of a 745 MB import. Large blobs written as a stream
(:meth:`open_write`: NAR ingestion, gRPC Put) are cut and packed the same
way. Packs are not compressed, so where the chunk store compresses
(``TVIX_STORE_CHUNK_ZSTD``), large blobs go to it instead: the
:class:`ObjectStoreBlobService` ``large`` (B §7.1 layout). Reads look in
both.

Safety: bytes are appended before their index rows are committed, so a crash
can leave unreferenced bytes in a pack, never an index row pointing at
nothing written by this process. An append that fails midway (a full disk)
is cut back to where it started, so later appends land where their rows say.
Each process appends to its own pack file, so concurrent writers (daemon,
CLI, nar-bridge) never interleave. Every read is verified against its BLAKE3
digest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import struct
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from tvix_castore.blobservice.base import (
    Ask,
    BlobReader,
    BlobService,
    BlobWriter,
    BytesBlobReader,
    ChunkMeta,
    ForkedIngest,
    checked,
    read_file,
    writev_all,
)
from tvix_castore.blobservice.objectstore import (
    ChunkedReader,
    ChunkingWriter,
    ChunkSink,
    ObjectStoreBlobService,
    Publisher,
)
from tvix_castore.digests import EMPTY_DIGEST, B3Digest, hash_threads
from tvix_castore.directoryservice.sqlite import (
    connect,
    prepare_write,
    storage_error,
    write_tables,
)
from tvix_castore.errors import DataCorruption, os_storage_error
from tvix_castore.lazy import lazy_module

if TYPE_CHECKING:
    import asyncio
else:
    asyncio = lazy_module("asyncio")  # not needed to write a NAR from its plan

__all__ = ["BlobLocation", "PackedBlobService", "Segment"]

BlobLocation = tuple[str, int, int]
"""Where a packed blob lies: (pack file name, offset, length)."""
Segment = tuple[int, int, bytes, dict[int, tuple[bytes, int]]]
"""Bytes appended to a pack at once: (offset, length, their BLAKE3 digest, and
its blobs: offset → (digest, length))."""
_Row = tuple[bytes, str, int, int]
_ChunkedRow = tuple[bytes, bytes]  # blob digest, its chunks (_MEMBER records)
_SegmentRow = tuple[str, int, int, bytes, bytes, bytes]  # ..., members, checksum
_MEMBER = struct.Struct("<32sQ")  # a segment's blob: digest, length (in order)
_log = logging.getLogger(__name__)


def _segment_checksum(pack: str, offset: int, length: int, b3: bytes, members: bytes) -> bytes:
    """Binds a segment row together: its members are checked before they are trusted."""
    head = f"{pack}\n{offset}\n{length}\n".encode()
    return blake3.blake3(head + b3 + members).digest()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS packed (
    digest BLOB PRIMARY KEY,
    pack TEXT NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pack_segments (
    pack TEXT NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    b3 BLOB NOT NULL,
    members BLOB NOT NULL,
    checksum BLOB NOT NULL,
    PRIMARY KEY (pack, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunked (
    digest BLOB PRIMARY KEY,
    chunks BLOB NOT NULL
) WITHOUT ROWID;
"""
_PACK_LIMIT = 1 << 30  # start a new pack file beyond this
_QUERY_BATCH = 500
_RECENT_LIMIT = 1 << 20  # locations remembered from this process's own writes
_PENDING_ROWS = 1 << 17  # index rows from forked workers committed at once
_SEGMENT_BLOB_MAX = 64 << 10  # batches of blobs larger than this on average get no segment
_FLUSH_BYTES = 8 << 20  # blob bytes read before they are appended (memory stays bounded)
_STREAM_FLUSH_BYTES = 1 << 20  # the same for a streamed blob: one per upload stream


class _Appender:
    """Appends to one pack file of this process (a new one past ``_PACK_LIMIT``)."""

    def __init__(self, pack_dir: Path, fsync: bool) -> None:
        self._dir = pack_dir
        self._fsync = fsync
        self._lock = threading.Lock()
        self._name: str | None = None
        self._fd = -1
        self._size = 0

    def append(self, pieces: list[bytes | memoryview], size: int) -> tuple[str, int]:
        """Write ``pieces`` (``size`` bytes; consumed) at the end of the pack, in order.

        Returns (pack name, offset).
        """
        with self._lock:
            if self._fd < 0 or self._size + size > _PACK_LIMIT:
                if self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1
                self._dir.mkdir(parents=True, exist_ok=True)
                self._name = f"{uuid.uuid4().hex}.pack"
                self._fd = os.open(
                    self._dir / self._name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                    0o644,
                )
                self._size = 0
            offset = self._size
            try:
                writev_all(self._fd, pieces, size)
                if self._fsync:
                    os.fsync(self._fd)
            except BaseException:
                self._cut_back()
                raise
            self._size += size
            assert self._name is not None
            return self._name, offset

    def _cut_back(self) -> None:
        """After a failed append: drop its partial bytes.

        So later appends land where they are recorded (``O_APPEND`` writes at
        the file's end, not at ``_size``), and the space is given back.
        """
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:  # then never append to this pack again
            os.close(self._fd)
            self._fd = -1

    def append_blobs(self, blobs: dict[bytes, bytes]) -> tuple[list[_Row], list[_SegmentRow]]:
        """Append blobs (digest → bytes) in one write; their index rows, and its segment.

        The segment's BLAKE3 digest is of the very bytes each blob was hashed
        from, so verifying it verifies them all at once (bulk hashing is ~3×
        faster than hashing 5 KB blobs one by one). A lone blob has none, nor
        have batches of large blobs (chunks: they are hashed fast one by one).
        """
        total = sum(len(blob) for blob in blobs.values())
        try:
            pack, offset = self.append(list(blobs.values()), total)
        except OSError as exc:
            raise os_storage_error("appending to a pack file", exc, self._dir) from exc
        segments = []
        if len(blobs) > 1 and total < _SEGMENT_BLOB_MAX * len(blobs):
            hasher = blake3.blake3()
            for blob in blobs.values():
                hasher.update(blob)
            b3 = hasher.digest()
            members = b"".join([_MEMBER.pack(raw, len(blob)) for raw, blob in blobs.items()])
            check = _segment_checksum(pack, offset, total, b3, members)
            segments.append((pack, offset, total, b3, members, check))
        rows = []
        for raw, blob in blobs.items():
            rows.append((raw, pack, offset, len(blob)))
            offset += len(blob)
        return rows, segments

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class _ForkedPackedIngest(ForkedIngest):
    """Workers read, hash, compress and append; the parent keeps the SQLite index.

    SQLite connections must not cross a fork, so a worker asks the parent
    which small blobs are already stored (they are not appended again) and
    sends it the index rows of those it appended; large blobs go to the
    chunk store, which workers can write themselves.
    """

    def __init__(self, svc: PackedBlobService) -> None:
        self._svc = svc
        self._appender: _Appender | None = None  # the worker's own pack file
        # what the worker appended (the parent's "present" may not know it yet)
        self._appended: set[bytes] = set()
        # Index rows received, committed in few large transactions: with random
        # digests as keys, every commit rewrites most of the index's pages to
        # the WAL (a commit per batch cost ~1 s of the parent for 47k files).
        self._pending: dict[bytes, _Row] = {}
        self._pending_segments: list[_SegmentRow] = []
        self._pending_chunked: list[_ChunkedRow] = []

    def ingest_in_child(
        self, files: Sequence[tuple[str | bytes, int]], ask: Ask
    ) -> list[B3Digest | Exception]:
        svc = self._svc
        if self._appender is None:
            self._appender = _Appender(svc.pack_dir, svc._fsync)
        appender = self._appender
        mine = self._appended
        # Which blobs are present is asked a batch ahead: while the parent
        # answers, this worker reads and hashes the next batch.
        waiting: list[tuple[list[tuple[B3Digest, bytes]], Callable[[], object]]] = []

        def append(blobs: list[tuple[B3Digest, bytes]], present: object) -> None:
            assert isinstance(present, set)
            new = {d.raw: data for d, data in blobs if d.raw not in present and d.raw not in mine}
            if new:  # (one-way: other workers' "present" see it, in order)
                ask(("index", *appender.append_blobs(new)), reply=False)
                if len(mine) + len(new) > _RECENT_LIMIT:
                    mine.clear()
                mine.update(new)

        def store(blobs: list[tuple[B3Digest, bytes]]) -> None:
            waiting.append((blobs, ask.later(("present", [d.raw for d, _ in blobs]))))
            if len(waiting) > 1:
                earlier, answer = waiting.pop(0)
                append(earlier, answer())

        out, chunked = svc._read_files(files, store)
        for blobs, answer in waiting:
            append(blobs, answer())
        if chunked:
            # after their chunks' rows: committed with or after them
            ask(("chunked", chunked), reply=False)
        return out

    def answer(self, question: object) -> object:
        match question:
            case ("present", list(raws)):
                pending = self._pending
                located = self._svc._intact(
                    self._svc._locate_raw([r for r in raws if r not in pending])
                )
                self._svc._remember(located)
                return set(located) | {r for r in raws if r in pending}
            case ("index", list(rows), list(segments)):
                self._pending.update((row[0], row) for row in rows)
                self._pending_segments += segments
                if len(self._pending) >= _PENDING_ROWS:
                    self.finish()
                return None
            case ("chunked", list(chunked)):
                self._pending_chunked += chunked
                return None
        return super().answer(question)

    def finish(self) -> None:
        """Commit the pending index rows (their bytes are already in the packs)."""
        if self._pending or self._pending_chunked:
            rows, segments = list(self._pending.values()), self._pending_segments
            chunked = self._pending_chunked
            self._pending, self._pending_segments, self._pending_chunked = {}, [], []
            self._svc._index(rows, segments, chunked)


class _Writer(BlobWriter):
    def __init__(self, svc: PackedBlobService) -> None:
        self._svc = svc
        self._buf = bytearray()
        self._large: BlobWriter | None = None

    async def write(self, data: bytes | memoryview) -> None:
        if self._large is not None:
            await self._large.write(data)
            return
        self._buf += data
        if len(self._buf) > self._svc.threshold:
            svc = self._svc
            if svc.large.compresses:  # chunk files, for the space
                self._large = svc.large.open_write()
            else:
                self._large = ChunkingWriter(svc.large, *_PackedChunks(svc).sinks())
            with memoryview(self._buf) as view:
                await self._large.write(view)
            self._buf = bytearray()

    async def close(self) -> B3Digest:
        if self._large is not None:
            return await self._large.close()
        data = bytes(self._buf)
        digest = B3Digest(blake3.blake3(data).digest())
        await asyncio.to_thread(self._svc._store_small, [(digest, data)])
        return digest

    async def abort(self) -> None:
        self._buf.clear()
        if self._large is not None:
            await self._large.abort()


class _Batch:
    """(digest, bytes) pairs handed to ``store`` about ``flush_bytes`` at a time.

    Blobs are appended a batch at a time; memory stays bounded whatever the sizes.
    """

    def __init__(
        self,
        store: Callable[[list[tuple[B3Digest, bytes]]], None],
        flush_bytes: int = _FLUSH_BYTES,
    ) -> None:
        self._store = store
        self._flush_bytes = flush_bytes
        self._pairs: list[tuple[B3Digest, bytes]] = []
        self._held = 0

    def add(self, digest: B3Digest, data: bytes) -> None:
        self._pairs.append((digest, data))
        self._held += len(data)
        if self._held >= self._flush_bytes:
            self.flush()

    def flush(self) -> None:
        pairs, self._pairs, self._held = self._pairs, [], 0
        if pairs:
            self._store(pairs)


def _add_chunk(data: bytes | memoryview, out: list[ChunkMeta], batch: _Batch) -> bytes:
    """Hash one chunk, list it in ``out`` and hand its bytes to ``batch``; its bytes."""
    chunk = bytes(data)  # (a cutter's view is only valid until its next chunk)
    digest = B3Digest(blake3.blake3(chunk).digest())
    out.append(ChunkMeta(digest, len(chunk)))
    batch.add(digest, chunk)
    return chunk


def _chunk_list(chunks: list[ChunkMeta]) -> bytes:
    """A ``chunked`` row's chunk list: each chunk's digest and size, in order."""
    return b"".join([_MEMBER.pack(c.digest.raw, c.size) for c in chunks])


class _PackedChunks:
    """Where a streamed large blob's chunks go in a packed store: into the packs.

    Chunks are appended a batch at a time (their index rows committed with
    them); the ``chunked`` row, last, once all are.
    """

    def __init__(self, svc: PackedBlobService) -> None:
        self._svc = svc
        # (small batches: a server runs many of these streams at once)
        self._batch = _Batch(svc._store_small, _STREAM_FLUSH_BYTES)

    def sinks(self) -> tuple[ChunkSink, Publisher]:
        return self._store, self._publish

    def _store(self, data: memoryview, out: list[ChunkMeta]) -> None:
        _add_chunk(data, out, self._batch)

    def _publish(self, digest: B3Digest, chunks: list[ChunkMeta]) -> None:
        self._batch.flush()
        if len(chunks) > 1:  # (a one-chunk blob is its chunk)
            self._svc._index([], [], [(digest.raw, _chunk_list(chunks))])


@dataclass(slots=True)
class _Staged:
    """Index rows not committed yet (see :meth:`PackedBlobService.staged_index`)."""

    rows: dict[bytes, _Row] = field(default_factory=dict)
    segments: list[_SegmentRow] = field(default_factory=list)
    chunked: dict[bytes, bytes] = field(default_factory=dict)


class PackedBlobService(BlobService):
    """Pack files + SQLite index for blobs and chunks; chunk objects for large written blobs."""

    def __init__(
        self,
        db_path: str | Path,
        large: ObjectStoreBlobService,
        pack_dir: str | Path | None = None,
        threshold: int | None = None,
        *,
        fsync: bool = False,
    ) -> None:
        self.path = Path(db_path)
        self.pack_dir = Path(pack_dir) if pack_dir is not None else self.path.parent / "packs"
        self.large = large
        self.threshold = large.min_size if threshold is None else threshold
        self._fsync = fsync
        self._conn = connect(self.path)
        self._lock = threading.Lock()  # the connection
        self._appender = _Appender(self.pack_dir, fsync)
        self._readers: dict[str, int] = {}
        # Locations of blobs this process appended or found present while writing,
        # so callers building read plans right after a write need no queries.
        self._recent: dict[bytes, BlobLocation] = {}
        # Blobs this process (or its ingestion workers) appended and indexed: their
        # bytes were written from the very buffers their digests were computed from.
        self.appended: set[bytes] = set()
        # Index rows kept in memory instead of committed (see staged_index).
        self._staged: _Staged | None = None
        try:
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._conn.close()
            raise storage_error("creating the packed blobs table", exc, self.path) from exc

    # -- writing ----------------------------------------------------------
    def _store_small(self, blobs: Sequence[tuple[B3Digest, bytes]]) -> None:
        """Append new blobs in one write and index them in one transaction."""
        # already stored (and its pack still holds it): not appended again
        present = self._intact(self._locate([d for d, _ in blobs]))
        new: dict[bytes, bytes] = {}
        for digest, data in blobs:
            if digest.raw not in present and data:
                new.setdefault(digest.raw, data)
        self._remember(present)
        if not new:
            return
        # No bytes are appended when their index rows could not be written.
        prepare_write(self._conn, "indexing packed blobs")
        self._index(*self._appender.append_blobs(new))

    @contextlib.contextmanager
    def staged_index(self) -> Iterator[Callable[[], None]]:
        """Keep index rows in memory until the function this yields commits them.

        Meanwhile this process sees them as committed; rows still staged at
        exit are dropped (their bytes stay behind unreferenced, as after any
        failure). An import commits them while a forked child hashes its NAR,
        not before.
        """
        with self._lock:
            self._staged = _Staged()
        try:
            yield self._commit_staged
        finally:
            with self._lock:
                self._staged = None

    def _commit_staged(self) -> None:
        with self._lock:
            staged = self._staged
            if staged is None:
                return
            self._staged = _Staged()
            self._write_index(
                list(staged.rows.values()), staged.segments, list(staged.chunked.items())
            )

    def _index(
        self, rows: list[_Row], segments: list[_SegmentRow], chunked: Sequence[_ChunkedRow] = ()
    ) -> None:
        with self._lock:
            staged = self._staged
            if staged is None:
                self._write_index(rows, segments, chunked)
            else:
                staged.rows.update((row[0], row) for row in rows)
                staged.segments += segments
                staged.chunked.update(chunked)
        self._remember({raw: (p, off, n) for raw, p, off, n in rows})
        if len(self.appended) + len(rows) > _RECENT_LIMIT:
            self.appended.clear()
        self.appended.update(row[0] for row in rows)

    def _write_index(
        self, rows: list[_Row], segments: list[_SegmentRow], chunked: Sequence[_ChunkedRow]
    ) -> None:
        """Commit index rows (the caller holds the lock)."""
        if rows or segments or chunked:
            write_tables(
                self._conn,
                [
                    (  # REPLACE: a row whose pack lost the bytes is superseded
                        "INSERT OR REPLACE INTO packed (digest, pack, offset, length)"
                        " VALUES (?, ?, ?, ?)",
                        rows,
                    ),
                    (
                        "INSERT OR IGNORE INTO pack_segments"
                        " (pack, offset, length, b3, members, checksum)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        segments,
                    ),
                    ("INSERT OR IGNORE INTO chunked (digest, chunks) VALUES (?, ?)", chunked),
                ],
                "indexing packed blobs",
            )

    def _intact(self, located: dict[bytes, BlobLocation]) -> dict[bytes, BlobLocation]:
        """Those of ``located`` whose pack file exists and is long enough (blocking).

        A blob whose pack was deleted or truncated counts as absent, so
        storing it again (a re-upload, a re-import) appends it anew and its
        row is replaced. One ``stat`` per pack.
        """
        sizes: dict[str, int] = {}
        out = {}
        for raw, loc in located.items():
            pack, offset, length = loc
            if pack not in sizes:
                sizes[pack] = self._pack_size(pack)
            if offset + length <= sizes[pack]:
                out[raw] = loc
        return out

    def _pack_size(self, pack: str) -> int:
        """The size of pack file ``pack``; -1 if it is missing or unreadable."""
        try:
            return os.stat(self.pack_path(pack)).st_size
        except (OSError, DataCorruption):
            return -1

    def unreadable_sync(self, digests: Sequence[B3Digest]) -> str | None:
        """Why one of ``digests``, all indexed, cannot be read: ``None`` if all can (blocking).

        Checks what a read needs without reading it: each packed blob's (or
        packed chunk's) pack file is there and long enough, each chunk file of
        the chunk store exists. What a blob's bytes hash to is for the reader
        to check. A blob not indexed at all is reported too.
        """
        unique = [d for d in dict.fromkeys(digests) if d != EMPTY_DIGEST]
        located = self._locate(unique)
        rest = [d for d in unique if d.raw not in located]
        chunked = self._chunked([d.raw for d in rest]) if rest else {}
        for meta in chunked.values():
            raws = [c.digest.raw for c in meta]
            found = self._locate_raw(raws)
            for c in meta:
                if c.digest.raw not in found:
                    return f"chunk {c.digest} of a blob is not in the store"
            located.update(found)
        sizes: dict[str, int] = {}
        for raw, (pack, offset, length) in located.items():
            if pack not in sizes:
                sizes[pack] = self._pack_size(pack)
            if sizes[pack] < 0:
                return f"blob {B3Digest(raw)}: pack file {pack} is missing"
            if offset + length > sizes[pack]:
                return (
                    f"blob {B3Digest(raw)}: pack file {pack} is truncated"
                    f" ({sizes[pack]} bytes, the blob ends at {offset + length})"
                )
        for digest in rest:
            if digest.raw in chunked:
                continue
            problem = self.large.unreadable_sync(digest)
            if problem is not None:
                return problem
        return None

    def _forget(self, digest: B3Digest, pack: str, offset: int) -> None:
        """Drop the index row of a blob found damaged at ``pack``/``offset``.

        Its bytes there are useless; without the row, the blob is absent, so
        storing it again (a re-upload of its NAR) appends it anew. A failure
        to write is logged: the read fails either way.
        """
        self._recent.pop(digest.raw, None)
        with self._lock:
            try:
                self._conn.execute(
                    "DELETE FROM packed WHERE digest = ? AND pack = ? AND offset = ?",
                    (digest.raw, pack, offset),
                )
            except sqlite3.Error as exc:
                _log.warning("cannot unindex damaged blob %s: %s", digest, exc)
            else:
                _log.warning("unindexed blob %s: damaged in pack %s", digest, pack)

    def _remember(self, located: dict[bytes, BlobLocation]) -> None:
        if len(self._recent) + len(located) > _RECENT_LIMIT:
            self._recent.clear()
        self._recent.update(located)

    def locate_many(self, raws: Sequence[bytes]) -> dict[bytes, BlobLocation]:
        """Where each packed blob among the digests ``raws`` lies (others are absent).

        Keyed by the digests' bytes (plans look up tens of thousands at once).
        Blocking; locations of this process's recent writes need no query.
        Callers read through :meth:`pack_path` and must verify what they read.
        """
        recent = self._recent
        out = {raw: loc for raw in raws if (loc := recent.get(raw)) is not None}
        if len(out) < len(raws):
            out.update(self._locate_raw([raw for raw in dict.fromkeys(raws) if raw not in out]))
        return out

    def segments(self, packs: Sequence[str]) -> dict[str, list[Segment]]:
        """The intact segment rows of ``packs``, by offset (blocking).

        A row failing its checksum is left out (its blobs are then verified
        one by one). The bytes themselves are for the reader to verify.
        """
        out: dict[str, list[Segment]] = {}
        with self._lock:
            try:
                rows = {
                    pack: self._conn.execute(
                        # CAST: a damaged row of another type must fail its checksum,
                        # not the query (text that is not UTF-8 would)
                        "SELECT offset, length, CAST(b3 AS BLOB), CAST(members AS BLOB),"
                        " CAST(checksum AS BLOB) FROM pack_segments"
                        " WHERE pack = ? ORDER BY offset",
                        (pack,),
                    ).fetchall()
                    for pack in packs
                }
            except sqlite3.Error as exc:
                raise storage_error("looking up pack segments", exc) from exc
            if self._staged is not None:
                touched = set()
                for pack, *row in self._staged.segments:
                    if pack in rows:
                        rows[pack].append(tuple(row))
                        touched.add(pack)
                for pack in touched:
                    rows[pack].sort(key=lambda r: r[0] if isinstance(r[0], int) else -1)
        for pack, found in rows.items():
            out[pack] = segs = []
            for off, n, b3, members, check in found:
                if not (isinstance(off, int) and isinstance(n, int) and b3 and members):
                    continue  # damaged: its blobs are checked one by one
                if _segment_checksum(pack, off, n, b3, members) != check:
                    continue
                blobs: dict[int, tuple[bytes, int]] = {}
                at = off
                for raw, size in _MEMBER.iter_unpack(members):
                    blobs[at] = (raw, size)
                    at += size
                segs.append((off, n, b3, blobs))
        return out

    def pack_path(self, pack: str) -> Path:
        """The file of pack ``pack`` (a name from the index, checked)."""
        if "/" in pack or pack.startswith(".") or not pack:
            raise DataCorruption(f"invalid pack name {pack!r} in the index")
        return self.pack_dir / pack

    def open_write(self) -> BlobWriter:
        return _Writer(self)

    def forked_ingest(self) -> ForkedIngest | None:
        if self.large.forked_ingest() is None:
            return None
        return _ForkedPackedIngest(self)

    def _read_files(
        self,
        files: Sequence[tuple[str | bytes, int]],
        store: Callable[[list[tuple[B3Digest, bytes]]], None],
    ) -> tuple[list[B3Digest | Exception], list[_ChunkedRow]]:
        """Read and hash files (large ones cut into chunks); ``store`` packs the bytes.

        ``store`` gets (digest, bytes) batches of about ``_FLUSH_BYTES``, so
        memory stays bounded whatever the file sizes. Returns per file its
        digest or the ``OSError``/``ValueError``, and the ``chunked`` rows of
        the files cut into several chunks (to be indexed after their chunks).
        """
        out: list[B3Digest | Exception] = []
        chunked: list[_ChunkedRow] = []
        batch = _Batch(store)
        compressed = self.large.compresses  # chunk files, for the space
        for path, size in files:
            try:
                if size > self.threshold and compressed:
                    out.append(self.large.ingest_file_sync(path, size))
                    continue
                if size > self.threshold:
                    digest, chunks = self._cut_file(path, size, batch)
                    if len(chunks) > 1:  # (a one-chunk blob is its chunk)
                        chunked.append((digest.raw, _chunk_list(chunks)))
                    out.append(digest)
                    continue
                data = read_file(path, size)
                digest = B3Digest(blake3.blake3(data).digest())
                if data:
                    batch.add(digest, data)
                out.append(digest)
            except (OSError, ValueError) as exc:
                out.append(exc)
        batch.flush()
        return out, chunked

    def _cut_file(
        self, path: str | bytes, size: int, batch: _Batch
    ) -> tuple[B3Digest, list[ChunkMeta]]:
        """Cut a large file as the chunk store would, handing each chunk to ``batch``.

        Returns the blob's digest and its chunks. Raises ``ValueError`` if the
        file no longer has ``size`` bytes.
        """
        hasher = blake3.blake3(max_threads=hash_threads())
        chunks: list[ChunkMeta] = []
        total = 0
        with open(path, "rb") as f:
            for c in self.large.chunker.cut_stream(f):
                chunk = _add_chunk(c.data, chunks, batch)
                hasher.update(chunk)
                total += len(chunk)
        if total != size:
            raise ValueError(f"file changed size while reading ({total} != {size})")
        return B3Digest(hasher.digest()), chunks

    async def ingest_files(
        self, files: Sequence[tuple[str | bytes, int]]
    ) -> list[B3Digest | Exception]:
        def work() -> list[B3Digest | Exception]:
            out, chunked = self._read_files(files, self._store_small)
            if chunked:
                self._index([], [], chunked)
            return out

        return await asyncio.to_thread(work)

    async def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        small = [b for b in blobs if len(b) <= self.threshold]

        def work() -> list[B3Digest]:
            hashed = [(B3Digest(blake3.blake3(b).digest()), b) for b in small]
            self._store_small(hashed)
            return [d for d, _ in hashed]

        small_digests = iter(await asyncio.to_thread(work))
        out: list[B3Digest] = []
        for b in blobs:
            out.append(next(small_digests) if len(b) <= self.threshold else await self.put(b))
        return out

    async def has_many(self, digests: Sequence[B3Digest]) -> set[B3Digest]:
        unique = list(dict.fromkeys(digests))
        located = await asyncio.to_thread(self._locate, unique)
        found = {d for d in unique if d.raw in located or d == EMPTY_DIGEST}
        rest = [d for d in unique if d not in found]
        if rest:
            chunked = await asyncio.to_thread(self._chunked, [d.raw for d in rest])
            found |= {d for d in rest if d.raw in chunked}
            rest = [d for d in rest if d not in found]
        if rest:
            found |= await self.large.has_many(rest)
        return found

    async def ingest_file(self, path: str | bytes, size: int) -> B3Digest:
        (result,) = await self.ingest_files([(path, size)])
        if isinstance(result, Exception):
            raise result
        return result

    # -- reading ----------------------------------------------------------
    def _locate(self, digests: Sequence[B3Digest]) -> dict[bytes, tuple[str, int, int]]:
        return self._locate_raw([d.raw for d in digests])

    def _locate_raw(self, raws: Sequence[bytes]) -> dict[bytes, tuple[str, int, int]]:
        found: dict[bytes, tuple[str, int, int]] = {}
        with self._lock:
            if self._staged is not None and self._staged.rows:
                staged = self._staged.rows
                for raw in raws:
                    if (row := staged.get(raw)) is not None:
                        found[raw] = row[1:]
                raws = [raw for raw in raws if raw not in found]
            try:
                for i in range(0, len(raws), _QUERY_BATCH):
                    batch = raws[i : i + _QUERY_BATCH]
                    marks = ",".join("?" * len(batch))
                    for raw, pack, offset, length in self._conn.execute(
                        "SELECT digest, pack, offset, length FROM packed"
                        f" WHERE digest IN ({marks})",
                        batch,
                    ):
                        found[bytes(raw)] = (str(pack), int(offset), int(length))
            except sqlite3.Error as exc:
                raise storage_error("looking up packed blobs", exc) from exc
        return found

    def _chunked(self, digests: Sequence[bytes]) -> dict[bytes, list[ChunkMeta]]:
        """The chunk lists of those of ``digests`` stored as packed chunks (blocking)."""
        found: dict[bytes, list[ChunkMeta]] = {}
        rows: list[tuple[bytes, bytes]] = []
        with self._lock:
            if self._staged is not None and self._staged.chunked:
                staged = self._staged.chunked
                rows += [(raw, staged[raw]) for raw in digests if raw in staged]
            try:
                for i in range(0, len(digests), _QUERY_BATCH):
                    batch = list(digests[i : i + _QUERY_BATCH])
                    marks = ",".join("?" * len(batch))
                    rows += self._conn.execute(
                        "SELECT digest, CAST(chunks AS BLOB) FROM chunked"
                        f" WHERE digest IN ({marks})",
                        batch,
                    ).fetchall()
            except sqlite3.Error as exc:
                raise storage_error("looking up chunked blobs", exc) from exc
        for raw, members in rows:
            if not members or len(members) % _MEMBER.size:
                raise DataCorruption(f"blob {B3Digest(bytes(raw))}: its chunk list is corrupt")
            found[bytes(raw)] = [
                ChunkMeta(B3Digest(d), n) for d, n in _MEMBER.iter_unpack(bytes(members))
            ]
        return found

    def chunked_sync(self, digest: B3Digest) -> list[ChunkMeta] | None:
        """The chunks of a blob stored as packed chunks, or ``None`` (blocking)."""
        return self._chunked([digest.raw]).get(digest.raw)

    def chunked_many(self, raws: Sequence[bytes]) -> dict[bytes, list[ChunkMeta]]:
        """:meth:`chunked_sync` for many digests (given as bytes) at once (blocking)."""
        return self._chunked(list(dict.fromkeys(raws)))

    async def _load_chunk(self, digest: B3Digest, size: int) -> bytes | None:
        data = await asyncio.to_thread(self.read_packed_sync, digest)
        if data is not None and len(data) != size:
            raise DataCorruption(f"chunk {digest} does not have the {size} bytes indexed")
        return data

    def _pread(self, digest: B3Digest, pack: str, offset: int, length: int) -> bytes:
        try:
            path = self.pack_path(pack)
        except DataCorruption as exc:
            raise DataCorruption(f"blob {digest}: {exc}") from exc
        try:
            fd = self._readers.get(pack)
            if fd is None:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                self._readers[pack] = fd
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise DataCorruption(f"blob {digest}: cannot read pack {pack}: {exc}") from exc
        if len(data) != length:  # (kept indexed: the pack may be put back)
            raise DataCorruption(f"blob {digest}: pack {pack} is truncated")
        try:
            return checked(digest, data)
        except DataCorruption:
            self._forget(digest, pack, offset)
            raise

    def read_packed_sync(self, digest: B3Digest) -> bytes | None:
        """A packed blob's verified bytes (``None`` if not packed), on the caller's thread."""
        if digest == EMPTY_DIGEST:
            return b""
        return self._read_many_small([digest]).get(digest)

    def _read_many_small(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        out: dict[B3Digest, bytes] = {}
        for raw, (pack, offset, length) in self._locate(digests).items():
            digest = B3Digest(raw)
            out[digest] = self._pread(digest, pack, offset, length)
        return out

    async def has(self, digest: B3Digest) -> bool:
        if digest == EMPTY_DIGEST:
            return True
        if await asyncio.to_thread(self._locate, [digest]):
            return True
        if await asyncio.to_thread(self.chunked_sync, digest) is not None:
            return True
        return await self.large.has(digest)

    async def size(self, digest: B3Digest) -> int | None:
        if digest == EMPTY_DIGEST:
            return 0
        found = await asyncio.to_thread(self._locate, [digest])
        if found:
            return found[digest.raw][2]
        chunks = await asyncio.to_thread(self.chunked_sync, digest)
        if chunks is not None:
            return sum(c.size for c in chunks)
        return await self.large.size(digest)

    async def size_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, int]:
        unique = list(dict.fromkeys(digests))
        located = await asyncio.to_thread(self._locate, unique)
        out = {d: located[d.raw][2] for d in unique if d.raw in located}
        if EMPTY_DIGEST in unique:
            out[EMPTY_DIGEST] = 0
        rest = [d for d in unique if d not in out]
        if rest:
            chunked = await asyncio.to_thread(self._chunked, [d.raw for d in rest])
            out.update({d: sum(c.size for c in chunked[d.raw]) for d in rest if d.raw in chunked})
            rest = [d for d in rest if d not in out]
        if rest:
            out.update(await self.large.size_many(rest))
        return out

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        if digest == EMPTY_DIGEST or len(await asyncio.to_thread(self._locate, [digest])):
            return []
        chunks = await asyncio.to_thread(self.chunked_sync, digest)
        if chunks is not None:
            return chunks
        return await self.large.chunks(digest)

    async def read_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        unique = list(dict.fromkeys(digests))
        found = await asyncio.to_thread(self._read_many_small, unique)
        if EMPTY_DIGEST in unique:
            found[EMPTY_DIGEST] = b""
        rest = [d for d in unique if d not in found]
        if rest:
            found.update(await asyncio.to_thread(self._read_many_chunked, rest))
            rest = [d for d in rest if d not in found]
        if rest:
            found.update(await self.large.read_many(rest))
        return found

    def _read_many_chunked(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        """Whole blobs stored as packed chunks, each chunk verified (blocking)."""
        out: dict[B3Digest, bytes] = {}
        for raw, chunks in self._chunked([d.raw for d in digests]).items():
            got = self._read_many_small([c.digest for c in chunks])
            parts = []
            for c in chunks:
                part = got.get(c.digest)
                if part is None or len(part) != c.size:
                    raise DataCorruption(f"blob {B3Digest(raw)}: chunk {c.digest} is missing")
                parts.append(part)
            out[B3Digest(raw)] = b"".join(parts)
        return out

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        if digest == EMPTY_DIGEST:
            return BytesBlobReader(b"")
        found = await asyncio.to_thread(self._read_many_small, [digest])
        if digest in found:
            return BytesBlobReader(found[digest])
        chunks = await asyncio.to_thread(self.chunked_sync, digest)
        if chunks is not None:
            return ChunkedReader(chunks, self._load_chunk)
        return await self.large.open_read(digest)

    def close(self) -> None:
        """Release the index, the pack file and readers (blocking; :meth:`aclose` does more)."""
        with self._lock:
            self._conn.close()
        self._appender.close()
        for fd in self._readers.values():
            os.close(fd)
        self._readers.clear()

    async def aclose(self) -> None:
        self.close()
        await self.large.aclose()
