"""Small blobs appended to pack files, large ones chunked in an object store.

Most files in real store paths are a few KiB, and one filesystem object per
blob costs far more than hashing it (a create + rename is ~0.3 ms here;
SQLite BLOB rows are better but still write every byte twice through the
WAL). So blobs up to ``threshold`` bytes (default: the FastCDC minimum chunk
size, below which a blob is a single chunk anyway) are appended, a batch at a
time, to this process's pack file under ``packs/``; a SQLite table maps each
digest to (pack, offset, length). Larger blobs go to an
:class:`ObjectStoreBlobService` (B §7.1 layout).

Safety: bytes are appended before their index rows are committed, so a crash
can leave unreferenced bytes in a pack, never an index row pointing at
nothing written by this process. Each process appends to its own pack file,
so concurrent writers (daemon, CLI, nar-bridge) never interleave. Every read
is verified against its BLAKE3 digest.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import threading
import uuid
from collections.abc import Sequence
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
)
from tvix_castore.blobservice.objectstore import ObjectStoreBlobService
from tvix_castore.digests import EMPTY_DIGEST, B3Digest
from tvix_castore.directoryservice.sqlite import connect, storage_error, write_tables
from tvix_castore.errors import DataCorruption, StorageError
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
_SegmentRow = tuple[str, int, int, bytes, bytes, bytes]  # ..., members, checksum
_MEMBER = struct.Struct("<32sQ")  # a segment's blob: digest, length (in order)


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
"""
_PACK_LIMIT = 1 << 30  # start a new pack file beyond this
_QUERY_BATCH = 500
_RECENT_LIMIT = 1 << 20  # locations remembered from this process's own writes
_PENDING_ROWS = 1 << 17  # index rows from forked workers committed at once


class _Appender:
    """Appends to one pack file of this process (a new one past ``_PACK_LIMIT``)."""

    def __init__(self, pack_dir: Path, fsync: bool) -> None:
        self._dir = pack_dir
        self._fsync = fsync
        self._lock = threading.Lock()
        self._name: str | None = None
        self._fd = -1
        self._size = 0

    def append(self, data: bytes) -> tuple[str, int]:
        """Write ``data`` at the end of the pack; return (pack name, offset)."""
        with self._lock:
            if self._fd < 0 or self._size + len(data) > _PACK_LIMIT:
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
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            if self._fsync:
                os.fsync(self._fd)
            self._size += len(data)
            assert self._name is not None
            return self._name, offset

    def append_blobs(self, blobs: dict[bytes, bytes]) -> tuple[list[_Row], list[_SegmentRow]]:
        """Append blobs (digest → bytes) in one write; their index rows, and its segment.

        The segment's BLAKE3 digest is of the very bytes each blob was hashed
        from, so verifying it verifies them all at once (bulk hashing is ~3×
        faster than hashing 5 KB blobs one by one). A lone blob has none.
        """
        data = b"".join(blobs.values())
        try:
            pack, offset = self.append(data)
        except OSError as exc:
            raise StorageError(f"appending to a pack file: {exc}") from exc
        segments = []
        if len(blobs) > 1:
            b3 = blake3.blake3(data).digest()
            members = b"".join([_MEMBER.pack(raw, len(blob)) for raw, blob in blobs.items()])
            check = _segment_checksum(pack, offset, len(data), b3, members)
            segments.append((pack, offset, len(data), b3, members, check))
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
        # Index rows received, committed in few large transactions: with random
        # digests as keys, every commit rewrites most of the index's pages to
        # the WAL (a commit per batch cost ~1 s of the parent for 47k files).
        self._pending: dict[bytes, _Row] = {}
        self._pending_segments: list[_SegmentRow] = []

    def ingest_in_child(
        self, files: Sequence[tuple[str | bytes, int]], ask: Ask
    ) -> list[B3Digest | Exception]:
        svc = self._svc
        if self._appender is None:
            self._appender = _Appender(svc.pack_dir, svc._fsync)
        out, small = svc._read_files(files)
        small = [(d, data) for d, data in small if data]
        if small:
            present = ask(("present", [d.raw for d, _ in small]))
            assert isinstance(present, set)
            new = {d.raw: data for d, data in small if d.raw not in present}
            if new:
                ask(("index", *self._appender.append_blobs(new)))
        return out

    def answer(self, question: object) -> object:
        match question:
            case ("present", list(raws)):
                pending = self._pending
                located = self._svc._locate([B3Digest(r) for r in raws if r not in pending])
                self._svc._remember(located)
                return set(located) | {r for r in raws if r in pending}
            case ("index", list(rows), list(segments)):
                self._pending.update((row[0], row) for row in rows)
                self._pending_segments += segments
                if len(self._pending) >= _PENDING_ROWS:
                    self.finish()
                return None
        return super().answer(question)

    def finish(self) -> None:
        """Commit the pending index rows (their bytes are already in the packs)."""
        if self._pending:
            rows, segments = list(self._pending.values()), self._pending_segments
            self._pending, self._pending_segments = {}, []
            self._svc._index(rows, segments)


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
            self._large = self._svc.large.open_write()
            await self._large.write(bytes(self._buf))
            self._buf.clear()

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


class PackedBlobService(BlobService):
    """Pack files + SQLite index for small blobs, chunk objects for large ones."""

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
        try:
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._conn.close()
            raise storage_error("creating the packed blobs table", exc) from exc

    # -- writing ----------------------------------------------------------
    def _store_small(self, blobs: Sequence[tuple[B3Digest, bytes]]) -> None:
        """Append new blobs in one write and index them in one transaction."""
        present = self._locate([d for d, _ in blobs])  # already stored: not appended again
        new: dict[bytes, bytes] = {}
        for digest, data in blobs:
            if digest.raw not in present and data:
                new.setdefault(digest.raw, data)
        self._remember(present)
        if not new:
            return
        self._index(*self._appender.append_blobs(new))

    def _index(self, rows: list[_Row], segments: list[_SegmentRow]) -> None:
        with self._lock:
            write_tables(
                self._conn,
                [
                    (
                        "INSERT OR IGNORE INTO packed (digest, pack, offset, length)"
                        " VALUES (?, ?, ?, ?)",
                        rows,
                    ),
                    (
                        "INSERT OR IGNORE INTO pack_segments"
                        " (pack, offset, length, b3, members, checksum)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        segments,
                    ),
                ],
                "indexing packed blobs",
            )
        self._remember({raw: (p, off, n) for raw, p, off, n in rows})

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
            ask = [B3Digest(raw) for raw in dict.fromkeys(raws) if raw not in out]
            out.update(self._locate(ask))
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
        self, files: Sequence[tuple[str | bytes, int]]
    ) -> tuple[list[B3Digest | Exception], list[tuple[B3Digest, bytes]]]:
        """Large files stored as chunks; small ones read and hashed, to be packed by the caller.

        Per file its digest or the ``OSError``/``ValueError``, and the small blobs.
        """
        out: list[B3Digest | Exception] = []
        small: list[tuple[B3Digest, bytes]] = []
        for path, size in files:
            try:
                if size > self.threshold:
                    out.append(self.large.ingest_file_sync(path, size))
                    continue
                data = read_file(path, size)
                digest = B3Digest(blake3.blake3(data).digest())
                small.append((digest, data))
                out.append(digest)
            except (OSError, ValueError) as exc:
                out.append(exc)
        return out, small

    async def ingest_files(
        self, files: Sequence[tuple[str | bytes, int]]
    ) -> list[B3Digest | Exception]:
        def work() -> list[B3Digest | Exception]:
            out, small = self._read_files(files)
            self._store_small(small)
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
            found |= await self.large.has_many(rest)
        return found

    async def ingest_file(self, path: str | bytes, size: int) -> B3Digest:
        (result,) = await self.ingest_files([(path, size)])
        if isinstance(result, Exception):
            raise result
        return result

    # -- reading ----------------------------------------------------------
    def _locate(self, digests: Sequence[B3Digest]) -> dict[bytes, tuple[str, int, int]]:
        found: dict[bytes, tuple[str, int, int]] = {}
        with self._lock:
            try:
                for i in range(0, len(digests), _QUERY_BATCH):
                    batch = [d.raw for d in digests[i : i + _QUERY_BATCH]]
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
        if len(data) != length:
            raise DataCorruption(f"blob {digest}: pack {pack} is truncated")
        return checked(digest, data)

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
        return await self.large.has(digest)

    async def size(self, digest: B3Digest) -> int | None:
        if digest == EMPTY_DIGEST:
            return 0
        found = await asyncio.to_thread(self._locate, [digest])
        if found:
            return found[digest.raw][2]
        return await self.large.size(digest)

    async def size_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, int]:
        unique = list(dict.fromkeys(digests))
        located = await asyncio.to_thread(self._locate, unique)
        out = {d: located[d.raw][2] for d in unique if d.raw in located}
        if EMPTY_DIGEST in unique:
            out[EMPTY_DIGEST] = 0
        rest = [d for d in unique if d not in out]
        if rest:
            out.update(await self.large.size_many(rest))
        return out

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        if digest == EMPTY_DIGEST or len(await asyncio.to_thread(self._locate, [digest])):
            return []
        return await self.large.chunks(digest)

    async def read_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        unique = list(dict.fromkeys(digests))
        found = await asyncio.to_thread(self._read_many_small, unique)
        if EMPTY_DIGEST in unique:
            found[EMPTY_DIGEST] = b""
        rest = [d for d in unique if d not in found]
        if rest:
            found.update(await self.large.read_many(rest))
        return found

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        if digest == EMPTY_DIGEST:
            return BytesBlobReader(b"")
        found = await asyncio.to_thread(self._read_many_small, [digest])
        if digest in found:
            return BytesBlobReader(found[digest])
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
