"""Small blobs packed in SQLite, large ones chunked in an object store.

Most files in real store paths are a few KiB; one filesystem object per blob
costs far more than hashing it (a create + rename is ~0.3 ms here). So blobs
up to ``threshold`` bytes (default: the FastCDC minimum chunk size, below
which a blob is a single chunk anyway) live as rows of a SQLite table,
zstd-compressed when that helps, written in batches; larger blobs go to an
:class:`ObjectStoreBlobService` (B §7.1 layout). Every read is verified.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import blake3
import zstandard

from tvix_castore.blobservice.base import (
    BlobReader,
    BlobService,
    BlobWriter,
    BytesBlobReader,
    ChunkMeta,
    checked,
)
from tvix_castore.blobservice.objectstore import ObjectStoreBlobService
from tvix_castore.digests import EMPTY_DIGEST, B3Digest
from tvix_castore.directoryservice.sqlite import connect, storage_error
from tvix_castore.errors import DataCorruption

__all__ = ["PackedBlobService"]

# A rowid table: WITHOUT ROWID keeps whole rows in the B-tree, which is very
# slow for rows of kilobytes.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    digest BLOB PRIMARY KEY,
    compressed INTEGER NOT NULL,
    data BLOB NOT NULL
);
"""


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
        await asyncio.to_thread(self._svc._insert, [self._svc._row(digest, data)])
        return digest

    async def abort(self) -> None:
        self._buf.clear()
        if self._large is not None:
            await self._large.abort()


class PackedBlobService(BlobService):
    """SQLite rows for small blobs, chunk objects for large ones."""

    def __init__(
        self,
        db_path: str | Path,
        large: ObjectStoreBlobService,
        threshold: int | None = None,
        *,
        compression_level: int | None = None,
    ) -> None:
        self.path = Path(db_path)
        self.large = large
        self.threshold = large.min_size if threshold is None else threshold
        # Off by default: for many small files zstd costs more time than
        # anything else in an import (see benchmarks/RESULTS.md).
        self.compression_level = compression_level
        self._conn = connect(self.path)
        self._lock = threading.Lock()
        self._local = threading.local()
        try:
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._conn.close()
            raise storage_error("creating the blobs table", exc) from exc

    def _row(self, digest: B3Digest, data: bytes) -> tuple[bytes, int, bytes]:
        if self.compression_level is None or len(data) <= 64:
            return (digest.raw, 0, data)
        cctx: zstandard.ZstdCompressor | None = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self.compression_level)
        packed = cctx.compress(data)
        if len(packed) < len(data) * 0.9:
            return (digest.raw, 1, packed)
        return (digest.raw, 0, data)

    def _insert(self, rows: list[tuple[bytes, int, bytes]]) -> None:
        if not rows:
            return
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.executemany(
                        "INSERT OR IGNORE INTO blobs (digest, compressed, data) VALUES (?, ?, ?)",
                        rows,
                    )
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise storage_error("writing blobs", exc) from exc

    def _present(self, digests: list[B3Digest]) -> set[bytes]:
        """Which of ``digests`` are already stored (skips rewriting them)."""
        found: set[bytes] = set()
        with self._lock:
            try:
                for i in range(0, len(digests), 500):
                    batch = [d.raw for d in digests[i : i + 500]]
                    marks = ",".join("?" * len(batch))
                    rows = self._conn.execute(
                        f"SELECT digest FROM blobs WHERE digest IN ({marks})", batch
                    )
                    found.update(bytes(r[0]) for r in rows)
            except sqlite3.Error as exc:
                raise storage_error("looking up blobs", exc) from exc
        return found

    def _select(self, digest: B3Digest) -> tuple[int, bytes] | None:
        with self._lock:
            try:
                row = self._conn.execute(
                    "SELECT compressed, data FROM blobs WHERE digest = ?", (digest.raw,)
                ).fetchone()
            except sqlite3.Error as exc:
                raise storage_error("reading a blob", exc) from exc
        return None if row is None else (int(row[0]), bytes(row[1]))

    def _read_small(self, digest: B3Digest) -> bytes | None:
        row = self._select(digest)
        if row is None:
            return None
        compressed, data = row
        if compressed:
            try:
                data = zstandard.ZstdDecompressor().decompress(
                    data, max_output_size=max(self.threshold, 1 << 20)
                )
            except zstandard.ZstdError as exc:
                raise DataCorruption(f"blob {digest} is not valid zstd: {exc}") from exc
        return checked(digest, data)

    def _read_many_small(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        rows: list[tuple[bytes, int, bytes]] = []
        with self._lock:
            try:
                for i in range(0, len(digests), 500):
                    batch = [d.raw for d in digests[i : i + 500]]
                    marks = ",".join("?" * len(batch))
                    rows.extend(
                        self._conn.execute(
                            f"SELECT digest, compressed, data FROM blobs WHERE digest IN ({marks})",
                            batch,
                        )
                    )
            except sqlite3.Error as exc:
                raise storage_error("reading blobs", exc) from exc
        out: dict[B3Digest, bytes] = {}
        for raw, compressed, data in rows:
            digest = B3Digest(bytes(raw))
            data = bytes(data)
            if compressed:
                try:
                    data = zstandard.ZstdDecompressor().decompress(
                        data, max_output_size=max(self.threshold, 1 << 20)
                    )
                except zstandard.ZstdError as exc:
                    raise DataCorruption(f"blob {digest} is not valid zstd: {exc}") from exc
            out[digest] = checked(digest, data)
        return out

    async def read_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        unique = list(dict.fromkeys(digests))
        found = await asyncio.to_thread(self._read_many_small, unique)
        if EMPTY_DIGEST in unique:
            found[EMPTY_DIGEST] = b""
        rest = [d for d in unique if d not in found]
        if rest:
            found.update(await self.large.read_many(rest))
        return found

    async def has(self, digest: B3Digest) -> bool:
        if digest == EMPTY_DIGEST:
            return True
        if await asyncio.to_thread(self._select, digest) is not None:
            return True
        return await self.large.has(digest)

    def _small_size(self, digest: B3Digest) -> tuple[int, int] | None:
        with self._lock:
            try:
                row = self._conn.execute(
                    "SELECT compressed, length(data) FROM blobs WHERE digest = ?", (digest.raw,)
                ).fetchone()
            except sqlite3.Error as exc:
                raise storage_error("reading a blob size", exc) from exc
        return None if row is None else (int(row[0]), int(row[1]))

    async def size(self, digest: B3Digest) -> int | None:
        if digest == EMPTY_DIGEST:
            return 0
        row = await asyncio.to_thread(self._small_size, digest)
        if row is None:
            return await self.large.size(digest)
        if not row[0]:
            return row[1]
        data = await asyncio.to_thread(self._read_small, digest)
        return None if data is None else len(data)

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        if digest == EMPTY_DIGEST or await asyncio.to_thread(self._select, digest) is not None:
            return []
        return await self.large.chunks(digest)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        if digest == EMPTY_DIGEST:
            return BytesBlobReader(b"")
        data = await asyncio.to_thread(self._read_small, digest)
        if data is not None:
            return BytesBlobReader(data)
        return await self.large.open_read(digest)

    def open_write(self) -> BlobWriter:
        return _Writer(self)

    async def ingest_files(
        self, files: Sequence[tuple[str | bytes, int]]
    ) -> list[B3Digest | Exception]:
        def work() -> list[tuple[B3Digest, list[ChunkMeta]] | Exception]:
            pending: list[tuple[B3Digest, bytes]] = []
            out: list[tuple[B3Digest, list[ChunkMeta]] | Exception] = []
            for path, size in files:
                try:
                    if size > self.threshold:
                        out.append(self.large._ingest_file_sync(path, size))
                        continue
                    with open(path, "rb") as f:
                        data = f.read(size + 1)
                    if len(data) != size:
                        raise ValueError(f"file changed size while reading ({len(data)} != {size})")
                    digest = B3Digest(blake3.blake3(data).digest())
                    pending.append((digest, data))
                    out.append((digest, []))
                except (OSError, ValueError) as exc:
                    out.append(exc)
            present = self._present([d for d, _ in pending])
            self._insert([self._row(d, data) for d, data in pending if d.raw not in present])
            return out

        results: list[B3Digest | Exception] = []
        for r in await asyncio.to_thread(work):
            if isinstance(r, Exception):
                results.append(r)
            else:
                digest, chunks = r
                if chunks:
                    await self.large._publish(digest, chunks)
                results.append(digest)
        return results

    async def ingest_file(self, path: str | bytes, size: int) -> B3Digest:
        (result,) = await self.ingest_files([(path, size)])
        if isinstance(result, Exception):
            raise result
        return result

    async def aclose(self) -> None:
        with self._lock:
            self._conn.close()
        await self.large.aclose()
