"""``PackBlobService``: the embedded blob store on v2 packs (see PACKSTORE.md).

Writes go through explicit transactions (:class:`PackTxn`): blobs are
deduplicated, gathered into compressed segments and appended to this
process's pack as they come; at :meth:`PackTxn.commit` the last segment is
written, the pack is ``fsync``ed once and the index rows that name the new
frames commit. Until then nothing is visible, to this process or any other;
an aborted transaction leaves nothing indexed (and its bytes are cut back
when nothing was appended after them). Reads go through the shared
:class:`PackReader`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from tvix_castore.blobservice.base import (
    BlobReader,
    BlobService,
    BlobWriter,
    BytesBlobReader,
    ChunkMeta,
    ForkedIngest,
)
from tvix_castore.blobservice.objectstore import (
    ChunkingWriter,
    ObjectStoreBlobService,
)
from tvix_castore.digests import EMPTY_DIGEST, B3Digest
from tvix_castore.errors import ConfigError, StorageError
from tvix_castore.lazy import lazy_module
from tvix_castore.objectstore import MemoryObjectStore
from tvix_castore.packstore.blobreader import PackedChunkReader
from tvix_castore.packstore.format import DEFAULT_LEVEL, FrameMember, Kind, build_frame
from tvix_castore.packstore.index import IndexTxn, NewFrame, PackIndex
from tvix_castore.packstore.legacy import open_legacy
from tvix_castore.packstore.reader import Chunked, Location, Member, PackReader
from tvix_castore.packstore.rebuild import OnRecord, RebuildStats, catch_up
from tvix_castore.packstore.writer import (
    BATCH_BYTES,
    STREAM_BATCH_BYTES,
    PackWriter,
    SegmentBuilder,
    Stager,
    chunk_list,
    read_files,
)

if TYPE_CHECKING:
    import asyncio
    import sqlite3

    import pyfastcdc
else:
    asyncio = lazy_module("asyncio")

__all__ = ["ENV_FSYNC", "ENV_LEVEL", "STORE_DB", "PackBlobService", "PackTxn", "env_level"]

STORE_DB = "store.sqlite"
ENV_LEVEL = "TVIX_STORE_ZSTD_LEVEL"
ENV_FSYNC = "TVIX_STORE_FSYNC"
_log = logging.getLogger(__name__)


def env_level() -> int:
    """The zstd level from ``$TVIX_STORE_ZSTD_LEVEL`` (0: store raw), else the default."""
    text = os.environ.get(ENV_LEVEL, "").strip()
    if not text:
        return DEFAULT_LEVEL
    try:
        level = int(text)
    except ValueError:
        level = -1
    if not 0 <= level <= 22:
        raise ConfigError(f"{ENV_LEVEL}={text!r}: expected a zstd level 0-22 (0: uncompressed)")
    return level


def _size(loc: Location) -> int:
    return loc.size


class PackTxn:
    """Blobs and records written now, indexed together at :meth:`commit`.

    Not for concurrent use by several threads (open one per thread).
    """

    def __init__(self, svc: PackBlobService, *, batch_bytes: int = BATCH_BYTES) -> None:
        self._svc = svc
        self._txn: IndexTxn = svc.index.transaction()
        self._spans: dict[str, list[int]] = {}  # pack -> [start, end, bytes appended]
        self._builder = SegmentBuilder(svc.writer, svc.level, self._on_frame)
        self._stager = Stager(self._builder, self._ask, batch_bytes)
        self.done = False

    def _on_frame(self, frame: NewFrame) -> None:
        self._txn.add_frame(frame)
        span = self._spans.get(frame.pack)
        if span is None:
            self._spans[frame.pack] = [frame.offset, frame.offset + frame.length, frame.length]
        else:
            span[1] = frame.offset + frame.length
            span[2] += frame.length

    def _ask(self, raws: list[bytes]) -> Callable[[], set[bytes]]:
        return lambda: self._svc._present(raws)

    @property
    def stager(self) -> Stager:
        return self._stager

    def put(self, digest: B3Digest, data: bytes) -> None:
        """Store a blob unless it is stored already (one larger than a chunk is cut first)."""
        self._check()
        if len(data) <= self._svc.threshold:
            self._stager.add_blob(digest.raw, data)
            return
        chunks = []
        with memoryview(data) as view:
            for c in self._svc.chunker.cut_buf(view):
                chunk = bytes(view[c.offset : c.offset + c.length])
                chunks.append(ChunkMeta(B3Digest(blake3.blake3(chunk).digest()), len(chunk)))
                self._stager.add_blob(chunks[-1].digest.raw, chunk)
        if len(chunks) > 1:
            self.put_chunked(digest, chunks)
        elif chunks and chunks[0].digest != digest:
            raise ValueError(f"blob {digest}: its bytes hash to {chunks[0].digest}")

    def put_chunked(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        """A large blob's chunk list (its chunks put before, in this or an earlier txn)."""
        self._check()
        if len(chunks) > 1:
            self._stager.add_chunk_list(digest.raw, sum(c.size for c in chunks), chunk_list(chunks))

    def rewrite(self, digest: B3Digest, data: bytes | memoryview) -> None:
        """Write a blob even though it is stored (compaction moving it); indexed at commit.

        Its row then names the new frame (the newest row wins).
        """
        self._check()
        self._builder.add(digest.raw, bytes(data))

    def rewrite_chunked(self, digest: B3Digest, chunks: Sequence[ChunkMeta]) -> None:
        """Write a chunk list even though it is stored (after its chunks are put or rewritten)."""
        self._check()
        size = sum(c.size for c in chunks)
        self._builder.add_chunk_list(digest.raw, size, chunk_list(chunks))

    def records(self, kind: Kind, records: Sequence[tuple[bytes, bytes]]) -> None:
        """Journal (key, bytes) records of ``kind`` (Directories, PathInfos) in the packs.

        PathInfos are written at commit, after everything else, so a pack never
        holds one whose closure is not before it (or indexed already).
        """
        self._check()
        records = list(records)
        if kind == Kind.DIRECTORIES:  # (content-addressed: a wrong key would fail the frame)
            for key, data in records:
                if blake3.blake3(data).digest() != key:
                    raise ValueError(f"directory record {key.hex()} is not keyed by its BLAKE3")
        self._builder.add_records(int(kind), records, hold=kind == Kind.PATHINFOS)

    def append_frame(
        self,
        kind: int,
        members: Sequence[FrameMember],
        payload_pieces: Sequence[bytes | memoryview],
    ) -> NewFrame:
        """Write one frame as given (compaction), indexed at commit; what was appended."""
        self._check()
        payload = list(payload_pieces)
        level = self._svc.level if kind != Kind.CHUNK_LIST else 0
        frame = build_frame(kind, members, payload, level)
        pack, offset = self._svc.writer.append(frame.pieces, frame.length)
        chunks = b"".join(bytes(p) for p in payload) if kind == Kind.CHUNK_LIST else b""
        new = NewFrame(pack, offset, frame.length, kind, frame.members, chunks)
        self._on_frame(new)
        return new

    def add_frames(self, frames: Sequence[NewFrame]) -> None:
        """Index frames another process appended and fsynced (forked workers)."""
        self._check()
        for frame in frames:
            self._txn.add_frame(frame)

    def delete_frames(self, ids: Sequence[int]) -> None:
        """At commit, drop these frame rows and the blob rows naming them (compaction)."""
        self._txn.delete_frames(ids)

    def delete_pack(self, name: str) -> None:
        """At commit, drop every row of pack ``name`` (compaction deletes the file after).

        Not the pack this process is writing to (close :attr:`PackBlobService.writer`
        first, so the frames moved go to a new pack).
        """
        if name == self._svc.writer.current or name in self._spans:
            raise StorageError(f"pack {name} is being written to: it cannot be deleted")
        self._txn.delete_pack(name)

    def on_commit(self, hook: Callable[[sqlite3.Connection], None]) -> None:
        """Run ``hook(conn)`` in the commit's SQLite transaction (the store layer's rows)."""
        self._txn.on_commit(hook)

    def _check(self) -> None:
        if self.done:
            raise StorageError("pack transaction already finished")

    def commit(self) -> None:
        """Write what is pending, ``fsync`` once, then commit the index rows."""
        self._check()
        try:
            self._stager.flush()
            self._builder.flush()
            self._svc.writer.sync(list(self._spans))
            self._txn.commit()
        except BaseException:
            self.abort()
            raise
        self.done = True

    def abort(self) -> None:
        """Index nothing; cut this transaction's bytes back if nothing came after them."""
        if self.done:
            return
        self.done = True
        self._txn.abort()
        for pack, (start, end, appended) in self._spans.items():
            if end - start == appended:
                self._svc.writer.cut_back(pack, start, end)

    def __enter__(self) -> PackTxn:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        elif not self.done:
            self.commit()


class _Writer(BlobWriter):
    """A streamed blob: small ones buffered, large ones cut as they come (FastCDC)."""

    def __init__(self, svc: PackBlobService, txn: PackTxn | None) -> None:
        self._svc = svc
        self._given = txn
        self._txn = txn
        self._buf = bytearray()
        self._large: ChunkingWriter | None = None

    def _open(self) -> PackTxn:
        if self._txn is None:
            self._txn = PackTxn(self._svc, batch_bytes=STREAM_BATCH_BYTES)
        return self._txn

    async def write(self, data: bytes | memoryview) -> None:
        if self._large is not None:
            await self._large.write(data)
            return
        self._buf += data
        if len(self._buf) > self._svc.threshold:
            txn = self._open()
            self._large = ChunkingWriter(self._svc._cdc, self._sink(txn), self._publish(txn))
            with memoryview(self._buf) as view:
                await self._large.write(view)
            self._buf = bytearray()

    @staticmethod
    def _sink(txn: PackTxn) -> Callable[[memoryview, list[ChunkMeta]], None]:
        def store(data: memoryview, out: list[ChunkMeta]) -> None:
            chunk = bytes(data)
            digest = B3Digest(blake3.blake3(chunk).digest())
            out.append(ChunkMeta(digest, len(chunk)))
            txn.put(digest, chunk)

        return store

    def _publish(self, txn: PackTxn) -> Callable[[B3Digest, list[ChunkMeta]], None]:
        def publish(digest: B3Digest, chunks: list[ChunkMeta]) -> None:
            txn.put_chunked(digest, chunks)
            if self._given is None:
                txn.commit()

        return publish

    async def close(self) -> B3Digest:
        if self._large is not None:
            return await self._large.close()
        data = bytes(self._buf)
        digest = B3Digest(blake3.blake3(data).digest())
        if data:
            txn = self._open()

            def store() -> None:
                txn.put(digest, data)
                if self._given is None:
                    txn.commit()

            await asyncio.to_thread(store)
        return digest

    async def abort(self) -> None:
        self._buf = bytearray()
        if self._large is not None:
            await self._large.abort()
        if self._given is None and self._txn is not None:
            await asyncio.to_thread(self._txn.abort)


class PackBlobService(BlobService):
    """Blobs in compressed v2 packs under ``home``, indexed in ``home/store.sqlite``.

    On open, packs the index is missing or behind on are indexed
    (``catch_up=False`` skips it); Directories and PathInfos found in them go
    to ``on_record`` (see :meth:`rebuild`).
    """

    def __init__(
        self,
        home: Path,
        *,
        level: int | None = None,
        fsync: bool | None = None,
        on_record: OnRecord | None = None,
        catch_up: bool = True,
        on_write: Callable[[], None] | None = None,
    ) -> None:
        self._on_write = on_write
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.pack_dir = self.home / "packs"
        self.level = env_level() if level is None else level
        if not 0 <= self.level <= 22:
            raise ConfigError(f"zstd level {self.level}: expected 0-22 (0: uncompressed)")
        if fsync is None:
            fsync = os.environ.get(ENV_FSYNC, "1").strip() not in ("0", "false", "no")
        self.index = PackIndex(self.home / STORE_DB)
        self.reader = PackReader(self.index, self.pack_dir, open_legacy(self.index, self.home))
        self.writer = PackWriter(self.pack_dir, fsync=fsync)
        # (for the chunker and ChunkingWriter only: cuts exactly as the chunk store)
        self._cdc = ObjectStoreBlobService(MemoryObjectStore())
        self.threshold = self._cdc.min_size  # larger files are cut into chunks
        if catch_up:
            try:
                self.rebuild(on_record)
            except StorageError as exc:  # (a full disk: reads keep working)
                _log.warning("cannot index the packs of %s now: %s", self.home, exc)

    @property
    def chunker(self) -> pyfastcdc.FastCDC:
        return self._cdc.chunker

    def begin_write(self) -> None:
        """Tell ``on_write`` (the embedded store's lease) that a writer is at work."""
        if self._on_write is not None:
            self._on_write()

    def transaction(self) -> PackTxn:
        """A transaction: what is written through it is indexed at its commit."""
        self.begin_write()
        return PackTxn(self)

    def _present(self, raws: Sequence[bytes]) -> set[bytes]:
        """Which of ``raws`` are stored where they can be read (blocking; a writer's check)."""
        self.begin_write()
        return set(self.reader.intact(self.reader.locate(raws)))

    def rebuild(self, on_record: OnRecord | None = None) -> RebuildStats:
        """Index the packs the index is missing or behind on (all of them if it is new).

        Records of kinds DIRECTORIES and PATHINFOS are handed to ``on_record``
        before the index moves past them (so it must be idempotent). Packs
        locked by a live writer are skipped.
        """
        own = self.writer.current
        return catch_up(self.index, self.reader, self.pack_dir, {own} if own else set(), on_record)

    def add_records(self, kind: Kind, records: Sequence[tuple[bytes, bytes]]) -> None:
        """Journal records in their own transaction (blocking)."""
        with self.transaction() as txn:
            txn.records(kind, records)

    # -- writing --------------------------------------------------------------
    def open_write(self, txn: PackTxn | None = None) -> BlobWriter:
        """A streamed blob; with ``txn``, indexed at its commit (else at ``close``)."""
        return _Writer(self, txn)

    def ingest_files_sync(
        self, files: Sequence[tuple[str | bytes, int]], txn: PackTxn | None = None
    ) -> list[B3Digest | Exception]:
        """:meth:`ingest_files`, blocking; with ``txn``, indexed at its commit."""
        own = txn is None
        t = self.transaction() if txn is None else txn
        try:
            out = read_files(files, self.threshold, self.chunker, t.stager)
            if own:
                t.commit()
        except BaseException:
            if own:
                t.abort()
            raise
        return out

    async def ingest_files(
        self, files: Sequence[tuple[str | bytes, int]]
    ) -> list[B3Digest | Exception]:
        return await asyncio.to_thread(self.ingest_files_sync, files)

    async def ingest_file(self, path: str | bytes, size: int) -> B3Digest:
        (result,) = await self.ingest_files([(path, size)])
        if isinstance(result, Exception):
            raise result
        return result

    def put_many_sync(self, blobs: Sequence[bytes], txn: PackTxn | None = None) -> list[B3Digest]:
        """:meth:`put_many`, blocking; large blobs are cut as the chunk store cuts them."""
        own = txn is None
        t = self.transaction() if txn is None else txn
        out: list[B3Digest] = []
        try:
            for blob in blobs:
                digest = B3Digest(blake3.blake3(blob).digest())
                out.append(digest)
                t.put(digest, blob)
            if own:
                t.commit()
        except BaseException:
            if own:
                t.abort()
            raise
        return out

    async def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        return await asyncio.to_thread(self.put_many_sync, blobs)

    def forked_ingest(self, txn: PackTxn | None = None) -> ForkedIngest | None:
        """Workers build, compress and append segments to packs of their own.

        The parent indexes their frames once all are done (in ``txn`` if given).
        """
        from tvix_castore.packstore.workers import ForkedPackIngest

        return ForkedPackIngest(self, txn)

    # -- reading --------------------------------------------------------------
    def _locate(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Location]:
        found = self.reader.locate([d.raw for d in digests])
        return {d: found[d.raw] for d in digests if d.raw in found}

    async def has(self, digest: B3Digest) -> bool:
        return digest in await self.has_many([digest])

    async def has_many(self, digests: Sequence[B3Digest]) -> set[B3Digest]:
        unique = list(dict.fromkeys(digests))
        found = set(await asyncio.to_thread(self._locate, unique))
        if EMPTY_DIGEST in unique:
            found.add(EMPTY_DIGEST)
        return found

    async def size(self, digest: B3Digest) -> int | None:
        return (await self.size_many([digest])).get(digest)

    async def size_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, int]:
        unique = list(dict.fromkeys(digests))
        located = await asyncio.to_thread(self._locate, unique)
        out = {d: _size(loc) for d, loc in located.items()}
        if EMPTY_DIGEST in unique:
            out[EMPTY_DIGEST] = 0
        return out

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        if digest == EMPTY_DIGEST:
            return []
        loc = (await asyncio.to_thread(self._locate, [digest])).get(digest)
        if loc is None:
            return None
        return list(loc.chunks) if isinstance(loc, Chunked) else []

    def read_many_sync(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        """:meth:`read_many`, blocking (verified; DataCorruption names a damaged blob)."""
        unique = list(dict.fromkeys(digests))
        out = {d: self.reader.read_located(d.raw, loc) for d, loc in self._locate(unique).items()}
        if EMPTY_DIGEST in unique:
            out[EMPTY_DIGEST] = b""
        return out

    async def read_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        return await asyncio.to_thread(self.read_many_sync, digests)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        if digest == EMPTY_DIGEST:
            return BytesBlobReader(b"")
        loc = (await asyncio.to_thread(self._locate, [digest])).get(digest)
        if loc is None:
            return None
        if isinstance(loc, Chunked):
            return PackedChunkReader(self.reader, digest, loc.chunks)
        if isinstance(loc, Member):
            data = await asyncio.to_thread(self.reader.member, digest.raw, loc)
            return BytesBlobReader(bytes(data))
        return BytesBlobReader(await asyncio.to_thread(self.reader.read_located, digest.raw, loc))

    def close(self) -> None:
        """Release the pack being written, the readers and the index (blocking)."""
        self.writer.close()
        self.reader.close()
        self.index.close()

    async def aclose(self) -> None:
        self.close()
