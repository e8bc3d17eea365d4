"""Blob ``combined`` combinator: local first, remote on a miss, chunks pulled through local."""

from __future__ import annotations

from tvix_castore.blobservice.base import BlobReader, BlobService, BlobWriter, ChunkMeta
from tvix_castore.blobservice.objectstore import ChunkedReader
from tvix_castore.digests import B3Digest
from tvix_castore.errors import ChecksumMismatch

__all__ = ["CombinedBlobService"]


class CombinedBlobService(BlobService):
    """Reads ``local`` first; on a miss reads ``remote`` and keeps a copy in ``local``.

    A chunked remote blob is read chunk by chunk, each chunk fetched through
    this service again (so chunks already local are not downloaded). Writes go
    to ``local`` only.
    """

    def __init__(self, local: BlobService, remote: BlobService) -> None:
        self.local = local
        self.remote = remote

    def begin_write(self) -> None:
        self.local.begin_write()

    async def has(self, digest: B3Digest) -> bool:
        return await self.local.has(digest) or await self.remote.has(digest)

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        if await self.local.has(digest):
            return await self.local.chunks(digest)
        return await self.remote.chunks(digest)

    async def _pull(self, digest: B3Digest) -> bool:
        """Copy a (small or single-chunk) blob from remote to local; False if absent."""
        reader = await self.remote.open_read(digest)
        if reader is None:
            return False
        async with reader:
            w = self.local.open_write()
            try:
                while data := await reader.read(1 << 20):
                    await w.write(data)
            except BaseException:
                await w.abort()
                raise
            got = await w.close()
        if got != digest:
            raise ChecksumMismatch(f"remote sent wrong contents for blob {digest} (got {got})")
        return True

    async def _load_chunk(self, digest: B3Digest, size: int) -> bytes | None:
        if not await self.local.has(digest) and not await self._pull(digest):
            return None
        return await self.local.read_all(digest)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        if await self.local.has(digest):
            return await self.local.open_read(digest)
        chunks = await self.remote.chunks(digest)
        if chunks is None:
            return None
        if len(chunks) >= 2:
            return ChunkedReader(chunks, self._load_chunk)
        if not await self._pull(digest):
            return None
        return await self.local.open_read(digest)

    def open_write(self) -> BlobWriter:
        return self.local.open_write()

    async def aclose(self) -> None:
        await self.local.aclose()
        await self.remote.aclose()
