"""``tvix.castore.v1.BlobService`` over any :class:`BlobService` (a thin adapter)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc.aio

from tvix_castore.blobservice.base import BlobService
from tvix_castore.digests import B3Digest
from tvix_castore.errors import InvalidDigest, NotFound
from tvix_castore.protos import rpc_blobstore_pb2 as pb
from tvix_castore.protos import rpc_blobstore_pb2_grpc as pb_grpc
from tvix_castore.rpc.channel import CHUNK_SIZE
from tvix_castore.rpc.status import abort_with
from tvix_castore.rpc.streams import require_half_close

__all__ = ["BlobServiceServicer"]

Ctx = grpc.aio.ServicerContext[object, object]


def _digest(raw: bytes) -> B3Digest:
    if len(raw) != 32:
        raise InvalidDigest("invalid digest length", length=len(raw))
    return B3Digest(raw)


class BlobServiceServicer(pb_grpc.BlobServiceServicer):
    """Serves Stat/Read/Put; Read streams up to 1 MiB per message."""

    def __init__(self, blobs: BlobService) -> None:
        self._blobs = blobs

    async def Stat(self, request: pb.StatBlobRequest, context: Ctx) -> pb.StatBlobResponse:
        try:
            digest = _digest(request.digest)
            chunks = await self._blobs.chunks(digest)
            if chunks is None:
                raise NotFound(f"blob {digest} not found")
        except Exception as exc:
            await abort_with(context, exc)
        return pb.StatBlobResponse(
            chunks=[pb.StatBlobResponse.ChunkMeta(digest=c.digest.raw, size=c.size) for c in chunks]
        )

    async def Read(self, request: pb.ReadBlobRequest, context: Ctx) -> AsyncIterator[pb.BlobChunk]:
        try:
            digest = _digest(request.digest)
            reader = await self._blobs.open_read(digest)
            if reader is None:
                raise NotFound(f"blob {digest} not found")
        except Exception as exc:
            await abort_with(context, exc)
        try:
            async with reader:
                while data := await reader.read(CHUNK_SIZE):
                    yield pb.BlobChunk(data=data)
        except Exception as exc:
            await abort_with(context, exc)

    async def Put(
        self, request_iterator: AsyncIterator[pb.BlobChunk], context: Ctx
    ) -> pb.PutBlobResponse:
        writer = self._blobs.open_write()
        try:
            async for chunk in request_iterator:
                if chunk.data:
                    await writer.write(chunk.data)
            await require_half_close(context)  # a cut stream is not a blob
            digest = await writer.close()
        except asyncio.CancelledError:  # the client left: drop what it sent
            await writer.abort()
            raise
        except Exception as exc:
            await writer.abort()
            await abort_with(context, exc)
        return pb.PutBlobResponse(digest=digest.raw)
