"""``objectstore+file://`` / ``objectstore+memory://``: chunked blobs, B §7.1 layout.

Blobs are cut with FastCDC (2020, normalisation 1; min = avg/2, max = 2·avg),
each chunk stored zstd-compressed at ``chunks/b3/<hex[0:2]>/<hex>``, and a blob
made of two or more chunks gets an index ``blobs/b3/<hex[0:2]>/<hex>``
holding a ``StatBlobResponse`` with the chunk list. A one-chunk blob *is* its
chunk (same digest), so it needs no index object: this saves one object per
small file compared with tvix, and tvix reads such blobs the same way
(``open_read`` looks for a chunk object first).

Every chunk is verified against its BLAKE3 digest when read.
"""

from __future__ import annotations

import bisect
import io
import mmap
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import blake3

from tvix_castore import observe
from tvix_castore.blobservice.base import (
    Ask,
    BlobReader,
    BlobService,
    BlobWriter,
    BytesBlobReader,
    ChunkMeta,
    ForkedIngest,
    _resolve_seek,
    checked,
    read_file,
)
from tvix_castore.digests import EMPTY_DIGEST, B3Digest, hash_threads
from tvix_castore.errors import ChecksumMismatch, DataCorruption, NotFound, StorageError
from tvix_castore.lazy import lazy_module
from tvix_castore.objectstore import LocalObjectStore, ObjectStore
from tvix_castore.protos import rpc_blobstore_pb2 as pb

if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import pyfastcdc
    import zstandard
else:
    asyncio = lazy_module("asyncio")
    # (loaded on first use: writing a NAR from its plan needs neither)
    pyfastcdc = lazy_module("pyfastcdc")
    zstandard = lazy_module("zstandard")

__all__ = [
    "DEFAULT_AVG_CHUNK_SIZE",
    "DEFAULT_ZSTD_LEVEL",
    "ChunkLoader",
    "ChunkedReader",
    "ChunkSink",
    "ChunkingWriter",
    "ObjectStoreBlobService",
    "Publisher",
    "blob_key",
    "chunk_key",
    "raw_frame",
    "raw_frame_pieces",
]

DEFAULT_AVG_CHUNK_SIZE = 256 * 1024
_MAX_CHUNK_OUTPUT = 64 << 20  # refuse chunk objects claiming to inflate beyond this
DEFAULT_ZSTD_LEVEL = 3  # B §7.1; ``None``: raw frames (see :func:`raw_frame`)
_KNOWN_LIMIT = 1 << 20
_BLIND_PUT = 64 << 10  # chunks smaller than this are put without asking first (cloud)

ChunkLoader = Callable[[B3Digest, int], Awaitable[bytes | None]]
"""``await load(digest, size)`` returns the verified chunk bytes or ``None``."""


def chunk_key(digest: B3Digest) -> str:
    """Object key of a chunk."""
    h = digest.hex()
    return f"chunks/b3/{h[:4]}/{h}"


def blob_key(digest: B3Digest) -> str:
    """Object key of a blob index."""
    h = digest.hex()
    return f"blobs/b3/{h[:4]}/{h}"


def _decompress(data: bytes, digest: B3Digest, limit: int) -> bytes:
    try:
        size = zstandard.frame_content_size(data)
        if size > limit:
            raise DataCorruption(f"chunk {digest} claims {size} bytes, more than {limit}")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise DataCorruption(f"chunk {digest} is not valid zstd: {exc}") from exc


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_FCS_BYTES = (0, 2, 4, 8)
_DICT_BYTES = (0, 1, 2, 4)


_RAW_BLOCK = 128 * 1024  # zstd's Block_Maximum_Size


def raw_frame(data: bytes | memoryview) -> bytes:
    """``data`` as a zstd frame of raw (uncompressed) blocks.

    Any zstd decoder reads it, so an uncompressed chunk object keeps the B §7.1
    layout; :func:`raw_frame_pieces` serves it back without copying. The frame
    is single-segment with a 4-byte content size, and has no checksum (the
    chunk's BLAKE3 digest is its checksum).
    """
    view = memoryview(data)
    n = len(view)
    if n >= 1 << 32:
        raise ValueError("a chunk of 4 GiB or more")
    parts: list[bytes | memoryview] = [_ZSTD_MAGIC, b"\xa0", n.to_bytes(4, "little")]
    pos = 0
    while True:
        size = min(_RAW_BLOCK, n - pos)
        last = pos + size == n
        parts.append((size << 3 | last).to_bytes(3, "little"))
        parts.append(view[pos : pos + size])
        pos += size
        if last:
            return b"".join(parts)


def raw_frame_pieces(frame: bytes | mmap.mmap) -> list[memoryview] | None:
    """The contents of a zstd frame made only of raw blocks, as views into it.

    Incompressible chunks are stored that way (zstd keeps blocks that do not
    shrink as they are), so their bytes can be served straight from a mapped
    chunk file. ``None`` for any other frame (compressed or RLE blocks, a
    dictionary, several frames): decompress those.
    """
    view = memoryview(frame)
    n = len(view)
    if n < 6 or view[:4] != _ZSTD_MAGIC:
        return None
    fhd = view[4]
    if fhd & 0x08 or fhd & 0x03:  # reserved bit, dictionary id
        return None
    single = bool(fhd & 0x20)
    fcs = _FCS_BYTES[fhd >> 6] or (1 if single else 0)
    pos = 5 + (0 if single else 1) + _DICT_BYTES[fhd & 0x03] + fcs
    pieces: list[memoryview] = []
    while True:
        if pos + 3 > n:
            return None
        head = view[pos] | view[pos + 1] << 8 | view[pos + 2] << 16
        pos += 3
        size = head >> 3
        if (head >> 1) & 0x03 != 0 or pos + size > n:  # not a raw block
            return None
        if size:
            pieces.append(view[pos : pos + size])
        pos += size
        if head & 1:
            break
    if pos + (4 if fhd & 0x04 else 0) != n:
        return None
    return pieces


class ChunkedReader(BlobReader):
    """Seekable reader over an ordered chunk list (B §7.2).

    Chunks are fetched (and verified by ``load``) on demand; while one is
    read, the next ``read_ahead`` are already being fetched, so sequential
    reads overlap fetching, decompressing and hashing with consuming. Memory
    is bounded by ``read_ahead + 1`` chunks.
    """

    def __init__(self, chunks: list[ChunkMeta], load: ChunkLoader, read_ahead: int = 2) -> None:
        self._chunks = chunks
        self._load = load
        self._read_ahead = read_ahead
        self._pending: dict[int, asyncio.Task[bytes | None]] = {}
        self._starts: list[int] = []
        total = 0
        for c in chunks:
            self._starts.append(total)
            total += c.size
        self.size = total
        self._pos = 0
        self._cur_index = -1
        self._cur: bytes = b""

    def tell(self) -> int:
        return self._pos

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = _resolve_seek(self._pos, self.size, offset, whence)
        return self._pos

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = []
            while chunk := await self.read(1 << 20):
                parts.append(chunk)
            return b"".join(parts)
        if self._pos >= self.size or n == 0:
            return b""
        i = bisect.bisect_right(self._starts, self._pos) - 1
        if i != self._cur_index:
            meta = self._chunks[i]
            for j in list(self._pending):  # a seek elsewhere: drop unneeded fetches
                if not i <= j <= i + self._read_ahead:
                    self._pending.pop(j).cancel()
            task = self._pending.pop(i, None)
            for j in range(i + 1, min(i + 1 + self._read_ahead, len(self._chunks))):
                if j not in self._pending:
                    m = self._chunks[j]
                    self._pending[j] = asyncio.ensure_future(self._load(m.digest, m.size))
            data = await task if task is not None else await self._load(meta.digest, meta.size)
            if data is None:
                raise NotFound(f"chunk {meta.digest} not found")
            if len(data) != meta.size:
                raise DataCorruption(
                    f"chunk {meta.digest} has {len(data)} bytes, index says {meta.size}"
                )
            self._cur, self._cur_index = data, i
        off = self._pos - self._starts[i]
        out = self._cur[off : off + n]
        self._pos += len(out)
        return out

    async def read_view(self, n: int) -> bytes | memoryview:
        """A view of the current chunk when the bytes lie inside it (no copy), else joined."""
        i = bisect.bisect_right(self._starts, self._pos) - 1
        if 0 <= i == self._cur_index:
            off = self._pos - self._starts[i]
            if off + n <= len(self._cur):
                self._pos += n
                return memoryview(self._cur)[off : off + n]
        return await self.readexactly(n)

    async def aclose(self) -> None:
        for task in self._pending.values():
            task.cancel()
        self._pending.clear()


ChunkSink = Callable[[memoryview, list[ChunkMeta]], None]
"""Stores one chunk (its bytes are only valid during the call) and appends its ChunkMeta."""
Publisher = Callable[[B3Digest, list[ChunkMeta]], None]
"""Records a finished blob's chunks (all stored by then)."""


class ChunkingWriter(BlobWriter):
    """Hashes and cuts a stream as the chunk store does; where chunks go is up to the sinks.

    By default (``ObjectStoreBlobService.open_write``) chunk objects and an index
    object; a packed store appends the chunks to its packs instead.
    """

    def __init__(
        self,
        svc: ObjectStoreBlobService,
        store: ChunkSink | None = None,
        publish: Publisher | None = None,
    ) -> None:
        self._svc = svc
        self._store = store or svc._store_chunk_sync
        self._publish = publish or svc.publish_sync
        self._buf = bytearray()
        self._hashed = 0  # leading bytes of _buf already fed to the hasher
        self._hasher = blake3.blake3()
        self._chunks: list[ChunkMeta] = []
        self._closed = False

    async def write(self, data: bytes | memoryview) -> None:
        if self._closed:
            raise ValueError("write to a closed blob writer")
        self._buf += data
        if len(self._buf) >= self._svc._flush_at:
            await asyncio.to_thread(self._cut, False)

    def _cut(self, final: bool) -> None:
        """Hash, chunk and store what is buffered (runs in a worker thread).

        Unless ``final``, the last piece found is kept back: it may continue
        in the next write, and FastCDC decides a cut only from a chunk's start.
        """
        svc = self._svc
        buf = self._buf
        with memoryview(buf) as view:
            self._hasher.update(view[self._hashed :])
            if final and len(buf) <= svc.min_size:
                cuts = [(0, len(buf))] if buf else []
            else:
                cuts = [(c.offset, c.length) for c in svc.chunker.cut_buf(view)]
                if not final and cuts:
                    cuts.pop()
            consumed = 0
            for off, length in cuts:
                self._store(view[off : off + length], self._chunks)
                consumed = off + length
        del buf[:consumed]
        self._hashed = len(buf)

    async def close(self) -> B3Digest:
        if self._closed:
            raise ValueError("blob writer already closed")
        self._closed = True
        await asyncio.to_thread(self._cut, True)
        digest = B3Digest(self._hasher.digest())
        await asyncio.to_thread(self._publish, digest, self._chunks)
        return digest

    async def abort(self) -> None:
        self._closed = True
        # Not clear(): after a failed store, the traceback may still hold views of it.
        self._buf = bytearray()


class _ForkedObjectStoreIngest(ForkedIngest):
    """Workers write chunk and index objects themselves (atomic renames make that safe)."""

    def __init__(self, svc: ObjectStoreBlobService) -> None:
        self._svc = svc

    def ingest_in_child(
        self, files: Sequence[tuple[str | bytes, int]], ask: Ask
    ) -> list[B3Digest | Exception]:
        return self._svc.ingest_files_sync(files)


class ObjectStoreBlobService(BlobService):
    """Chunked, compressed, verified blobs over an :class:`ObjectStore`."""

    def __init__(
        self,
        store: ObjectStore,
        avg_chunk_size: int = DEFAULT_AVG_CHUNK_SIZE,
        *,
        zstd_level: int | None = DEFAULT_ZSTD_LEVEL,
    ) -> None:
        self.store = store
        self._zstd_level = zstd_level
        self.avg_size = avg_chunk_size
        self.min_size = avg_chunk_size // 2
        self.max_size = avg_chunk_size * 2
        self._cdc_instance: pyfastcdc.FastCDC | None = None
        # A streamed blob is cut once this much is buffered: with 1 MiB gRPC
        # messages a writer holds at most ~2 MiB (issue 12, item 9).
        self._flush_at = max(2 * self.max_size, 1 << 20)
        self._local = threading.local()
        # Chunks known to exist (written or seen here): skips a stat per chunk.
        self._known: set[B3Digest] = set()
        self.on_write: Callable[[], None] | None = None  # (a lease: see begin_write)
        self._uploads: ThreadPoolExecutor | None = None  # (cloud: see ingest_files_sync)
        self._uploads_lock = threading.Lock()

    @property
    def compresses(self) -> bool:
        """Whether chunks are stored zstd-compressed (else as raw frames)."""
        return self._zstd_level is not None

    @property
    def chunker(self) -> pyfastcdc.FastCDC:
        """The FastCDC cutter of this store's chunk sizes (same input, same chunks)."""
        cdc = self._cdc_instance
        if cdc is None:
            cdc = self._cdc_instance = pyfastcdc.FastCDC(
                self.avg_size,
                min_size=self.min_size,
                max_size=self.max_size,
                normalized_chunking=1,
            )
        return cdc

    # -- writing ----------------------------------------------------------
    def begin_write(self) -> None:
        """Tell ``on_write`` (a shared store's lease, see :mod:`tvix_store.sharedgc`)."""
        if self.on_write is not None:
            self.on_write()

    def _store_chunk_sync(
        self, data: memoryview, out: list[ChunkMeta], digest: B3Digest | None = None
    ) -> None:
        self.begin_write()
        if digest is None:
            digest = B3Digest(blake3.blake3(data).digest())
        stored = 0
        if digest not in self._known:
            key = chunk_key(digest)
            # (where a lookup costs a request, a small chunk is put without one:
            # its key is its content, so overwriting it changes nothing)
            if (not self.store.cheap_exists and len(data) < _BLIND_PUT) or not (
                self.store.exists_sync(key)
            ):
                self.store.put_sync(key, self._encode(data))
                stored = len(data)  # (a blind put counts as new)
            if len(self._known) >= _KNOWN_LIMIT:
                self._known.clear()
            self._known.add(digest)
        out.append(ChunkMeta(digest, len(data)))
        observe.blobs_written(len(data), stored)

    def _encode(self, data: memoryview) -> bytes:
        """A chunk object's bytes: a zstd frame, compressed at the configured level or raw."""
        if self._zstd_level is None:
            return raw_frame(data)
        # One compressor per thread: creating a context per chunk is costly.
        cctx: zstandard.ZstdCompressor | None = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(level=self._zstd_level)
            self._local.cctx = cctx
        return cctx.compress(data)

    @staticmethod
    def _index_bytes(chunks: list[ChunkMeta]) -> bytes:
        index = pb.StatBlobResponse(
            chunks=[pb.StatBlobResponse.ChunkMeta(digest=c.digest.raw, size=c.size) for c in chunks]
        )
        return index.SerializeToString()

    def publish_sync(self, digest: B3Digest, chunks: list[ChunkMeta]) -> None:
        """Write the blob's index object, unless present (blocking)."""
        if len(chunks) == 1:
            return  # the chunk object is the blob
        key = blob_key(digest)
        if not self.store.cheap_exists or not self.store.exists_sync(key):
            self.store.put_sync(key, self._index_bytes(chunks))

    def ingest_file_sync(self, path: str | bytes, size: int) -> B3Digest:
        """Store the file at ``path`` (chunks and index), blocking."""
        digest, chunks = self._ingest_file_sync(path, size)
        self.publish_sync(digest, chunks)
        return digest

    def ingest_files_sync(
        self, files: Sequence[tuple[str | bytes, int]]
    ) -> list[B3Digest | Exception]:
        """:meth:`ingest_files`, blocking (in a worker thread or process).

        Where each object is a network request (cloud storage), the files of
        a batch are uploaded ``store.upload_concurrency`` at a time, so the
        round trips overlap instead of adding up.
        """
        width = self.store.upload_concurrency
        if width <= 1 or len(files) < 2:
            return [self._ingest_or_error(path, size) for path, size in files]
        with self._uploads_lock:
            if self._uploads is None:
                from concurrent.futures import ThreadPoolExecutor

                self._uploads = ThreadPoolExecutor(width, thread_name_prefix="upload")
            pool = self._uploads
        return list(pool.map(lambda f: self._ingest_or_error(*f), files))

    def _ingest_or_error(self, path: str | bytes, size: int) -> B3Digest | Exception:
        try:
            return self.ingest_file_sync(path, size)
        except (OSError, ValueError) as exc:
            return exc

    async def aclose(self) -> None:
        with self._uploads_lock:
            pool, self._uploads = self._uploads, None
        if pool is not None:
            pool.shutdown(wait=False)
        await super().aclose()

    def forked_ingest(self) -> ForkedIngest | None:
        # Only a local directory is shared with forked workers (memory is not).
        return _ForkedObjectStoreIngest(self) if isinstance(self.store, LocalObjectStore) else None

    def open_write(self) -> BlobWriter:
        return ChunkingWriter(self)

    def _ingest_file_sync(self, path: str | bytes, size: int) -> tuple[B3Digest, list[ChunkMeta]]:
        chunks: list[ChunkMeta] = []
        if size <= self.min_size:  # FastCDC cannot cut below min_size: one chunk
            data = read_file(path, size)
            if size == 0:
                return EMPTY_DIGEST, chunks
            digest = B3Digest(blake3.blake3(data).digest())
            self._store_chunk_sync(memoryview(data), chunks, digest)
            return digest, chunks
        with open(path, "rb") as f:
            hasher = blake3.blake3(max_threads=hash_threads())
            total = 0
            for c in self.chunker.cut_stream(f):
                hasher.update(c.data)
                total += c.length
                self._store_chunk_sync(c.data, chunks)
            if total != size:
                raise ValueError(f"file changed size while reading ({total} != {size})")
        return B3Digest(hasher.digest()), chunks

    async def ingest_file(self, path: str | bytes, size: int) -> B3Digest:
        return await asyncio.to_thread(self.ingest_file_sync, path, size)

    async def ingest_files(
        self, files: Sequence[tuple[str | bytes, int]]
    ) -> list[B3Digest | Exception]:
        return await asyncio.to_thread(self.ingest_files_sync, files)

    # -- reading ----------------------------------------------------------
    async def has(self, digest: B3Digest) -> bool:
        return await self.store.exists(blob_key(digest)) or await self.store.exists(
            chunk_key(digest)
        )

    @staticmethod
    def _parse_index(digest: B3Digest, raw: bytes) -> list[ChunkMeta]:
        index = pb.StatBlobResponse()
        try:
            index.ParseFromString(raw)
            return [ChunkMeta(B3Digest(c.digest), c.size) for c in index.chunks]
        except Exception as exc:
            raise DataCorruption(f"blob index {digest} is corrupt: {exc}") from exc

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        raw = await self.store.get(blob_key(digest))
        if raw is None:
            return [] if await self.store.exists(chunk_key(digest)) else None
        return self._parse_index(digest, raw)

    def chunks_sync(self, digest: B3Digest) -> list[ChunkMeta] | None:
        """:meth:`chunks` on the caller's thread (for worker threads reading many blobs)."""
        raw = self.store.get_sync(blob_key(digest))
        if raw is None:
            return [] if self.store.exists_sync(chunk_key(digest)) else None
        return self._parse_index(digest, raw)

    def unreadable_sync(self, digest: B3Digest) -> str | None:
        """Why ``digest`` cannot be read (absent, index corrupt, a chunk file missing or empty).

        ``None`` if every object a read needs is there; their bytes are
        verified by the read itself. Blocking.
        """
        if digest == EMPTY_DIGEST:
            return None
        try:
            chunks = self.chunks_sync(digest)
        except StorageError as exc:
            return str(exc)
        if chunks is None:
            return f"blob {digest} is not in the store"
        for c in chunks or [ChunkMeta(digest, 0)]:
            try:
                size = self.store.size_sync(chunk_key(c.digest))
            except StorageError as exc:
                return str(exc)
            if not size:  # (a chunk file is a zstd frame: never empty)
                return f"blob {digest}: chunk file of {c.digest} is missing or empty"
        return None

    def load_chunk_pieces_sync(
        self, digest: B3Digest, size: int, *, mapped: bool = True
    ) -> list[bytes | memoryview] | None:
        """A chunk's verified bytes as pieces, zero-copy for incompressible chunks.

        ``None`` if the chunk is absent; raises ``DataCorruption`` if it does
        not hash to ``digest``. Without ``mapped`` the chunk file is read, not
        mapped (for servers: a file truncated while mapped raises SIGBUS).
        """
        key = chunk_key(digest)
        frame = self.store.view_sync(key) if mapped else self.store.get_sync(key)
        if frame is None:
            return None
        raw = raw_frame_pieces(frame)
        if raw is None:
            return [checked(digest, _decompress(bytes(frame), digest, size), "chunk")]
        hasher = blake3.blake3()
        for piece in raw:
            hasher.update(piece)
        if hasher.digest() != digest.raw:
            actual = B3Digest(hasher.digest())
            raise ChecksumMismatch(f"chunk {digest} has wrong contents (hashes to {actual})")
        return list(raw)

    async def _load_chunk(self, digest: B3Digest, size: int | None = None) -> bytes | None:
        raw = await self.store.get(chunk_key(digest))
        if raw is None:
            return None
        limit = _MAX_CHUNK_OUTPUT if size is None else size
        return await asyncio.to_thread(
            lambda: checked(digest, _decompress(raw, digest, limit), "chunk")
        )

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        if digest == EMPTY_DIGEST:
            return BytesBlobReader(b"")
        data = await self._load_chunk(digest)
        if data is not None:
            return BytesBlobReader(data)
        chunks = await self.chunks(digest)
        if not chunks:
            return None
        return ChunkedReader(chunks, self._load_chunk)
