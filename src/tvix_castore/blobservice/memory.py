"""``memory://``: blobs in a process-local dict (tests, caches, ephemeral daemons)."""

from __future__ import annotations

import bisect
import io

import blake3

from tvix_castore import observe
from tvix_castore.blobservice.base import (
    BlobReader,
    BlobService,
    BlobWriter,
    BytesBlobReader,
    _resolve_seek,
)
from tvix_castore.digests import B3Digest

__all__ = ["MemoryBlobService"]


class _PartsReader(BlobReader):
    """A seekable reader over a blob kept as the pieces it was written in."""

    def __init__(self, parts: tuple[bytes, ...]) -> None:
        self._parts = parts
        self._starts: list[int] = []
        total = 0
        for p in parts:
            self._starts.append(total)
            total += len(p)
        self.size = total
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = _resolve_seek(self._pos, self.size, offset, whence)
        return self._pos

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = []
            while piece := await self.read(1 << 20):
                parts.append(piece)
            return b"".join(parts)
        if n == 0 or self._pos >= self.size:
            return b""
        i = bisect.bisect_right(self._starts, self._pos) - 1
        off = self._pos - self._starts[i]
        out = self._parts[i][off : off + n]
        self._pos += len(out)
        return out


class _MemoryWriter(BlobWriter):
    def __init__(self, store: dict[B3Digest, tuple[bytes, ...]]) -> None:
        self._store = store
        self._parts: list[bytes] = []
        self._hasher = blake3.blake3()

    async def write(self, data: bytes | memoryview) -> None:
        data = bytes(data)
        if data:
            self._hasher.update(data)
            self._parts.append(data)

    async def close(self) -> B3Digest:
        digest = B3Digest(self._hasher.digest())
        # Kept as written: joining would copy (and fault in) the whole blob again.
        size = sum(len(p) for p in self._parts)
        new = digest not in self._store
        self._store.setdefault(digest, tuple(self._parts))
        self._parts = []
        observe.blobs_written(size, size if new else 0)
        return digest

    async def abort(self) -> None:
        self._parts.clear()


class MemoryBlobService(BlobService):
    """Blobs held in memory; no chunking."""

    def __init__(self) -> None:
        self._blobs: dict[B3Digest, tuple[bytes, ...]] = {}

    async def has(self, digest: B3Digest) -> bool:
        return digest in self._blobs

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        parts = self._blobs.get(digest)
        if parts is None:
            return None
        if len(parts) == 1:
            return BytesBlobReader(parts[0])
        return _PartsReader(parts)

    def open_write(self) -> BlobWriter:
        return _MemoryWriter(self._blobs)
