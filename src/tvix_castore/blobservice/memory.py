"""``memory://``: blobs in a process-local dict (tests, caches, ephemeral daemons)."""

from __future__ import annotations

import blake3

from tvix_castore.blobservice.base import BlobReader, BlobService, BlobWriter, BytesBlobReader
from tvix_castore.digests import B3Digest

__all__ = ["MemoryBlobService"]


class _MemoryWriter(BlobWriter):
    def __init__(self, store: dict[B3Digest, bytes]) -> None:
        self._store = store
        self._parts: list[bytes] = []
        self._hasher = blake3.blake3()

    async def write(self, data: bytes | memoryview) -> None:
        data = bytes(data)
        self._hasher.update(data)
        self._parts.append(data)

    async def close(self) -> B3Digest:
        digest = B3Digest(self._hasher.digest())
        self._store.setdefault(digest, b"".join(self._parts))
        self._parts.clear()
        return digest

    async def abort(self) -> None:
        self._parts.clear()


class MemoryBlobService(BlobService):
    """Blobs held in memory; no chunking."""

    def __init__(self) -> None:
        self._blobs: dict[B3Digest, bytes] = {}

    async def has(self, digest: B3Digest) -> bool:
        return digest in self._blobs

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        data = self._blobs.get(digest)
        return None if data is None else BytesBlobReader(data)

    def open_write(self) -> BlobWriter:
        return _MemoryWriter(self._blobs)
