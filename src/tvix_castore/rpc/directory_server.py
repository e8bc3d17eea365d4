"""``tvix.castore.v1.DirectoryService`` over any :class:`DirectoryService` (a thin adapter).

``Get`` answers NOT_FOUND for an unknown root, recursive or not, before any
message is streamed; a closure comes root first, breadth-first, each
Directory once. ``Put`` validates every message, feeds the stream to one
putter of the backend, and persists nothing unless the whole closure is a
valid graph (SPEC A2, B §2.6–2.7) and the client half-closed the stream (a
cancelled or dropped stream commits nothing, see ``rpc.streams``). Statuses
come from ``rpc.status``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Final

import grpc.aio

from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import (
    ChecksumMismatch,
    InvalidDigest,
    NotFound,
    StorageError,
    ValidationError,
)
from tvix_castore.nodes import MAX_DIRECTORY_BYTES, Directory
from tvix_castore.protos import castore_pb2
from tvix_castore.protos import rpc_directory_pb2 as pb
from tvix_castore.protos import rpc_directory_pb2_grpc as pb_grpc
from tvix_castore.rpc.status import abort_with
from tvix_castore.rpc.streams import require_half_close

__all__ = ["MAX_DIRECTORY_MESSAGE", "DirectoryServiceServicer", "directory_message"]

MAX_DIRECTORY_MESSAGE: Final = MAX_DIRECTORY_BYTES
"""Encoded Directories must stay below this to be sent at all (SPEC A1.5); putters
refuse larger ones, so only a store written by an older version can hold any."""

Ctx = grpc.aio.ServicerContext[object, object]


def directory_message(directory: Directory, oversize: type[Exception]) -> castore_pb2.Directory:
    """The wire message for ``directory``; raise ``oversize`` if it cannot be sent."""
    msg = directory.to_proto()
    size = msg.ByteSize()
    if size >= MAX_DIRECTORY_MESSAGE:
        raise oversize(
            f"directory {directory.digest} encodes to {size} bytes,"
            f" over the {MAX_DIRECTORY_MESSAGE}-byte message limit"
        )
    return msg


def _request_digest(request: pb.GetDirectoryRequest) -> B3Digest:
    if request.WhichOneof("by_what") is None:
        raise ValidationError("by_what needs to be specified")
    if len(request.digest) != 32:
        raise InvalidDigest("invalid digest length", length=len(request.digest))
    return B3Digest(request.digest)


class DirectoryServiceServicer(pb_grpc.DirectoryServiceServicer):
    """Serves Get/Put from ``directories``."""

    def __init__(self, directories: DirectoryService) -> None:
        self._directories = directories

    async def Get(
        self, request: pb.GetDirectoryRequest, context: Ctx
    ) -> AsyncIterator[castore_pb2.Directory]:
        if not request.recursive:
            try:
                digest = _request_digest(request)
                directory = await self._directories.get(digest)
                if directory is None:
                    raise NotFound(f"directory {digest} not found")
                if directory.digest != digest:
                    raise ChecksumMismatch(f"backend returned {directory.digest} for {digest}")
                msg = directory_message(directory, StorageError)
            except Exception as exc:
                await abort_with(context, exc)
            yield msg
            return

        stream: AsyncIterator[Directory] | None = None  # closed early if the client leaves
        try:
            digest = _request_digest(request)
            stream = aiter(self._directories.get_recursive(digest))
            first = await anext(stream, None)
            if first is None:
                raise NotFound(f"directory {digest} not found")
            if first.digest != digest:
                raise ChecksumMismatch(f"backend returned {first.digest} for {digest}")
            yield directory_message(first, StorageError)
            async for directory in stream:
                yield directory_message(directory, StorageError)
        except Exception as exc:
            await abort_with(context, exc)
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    async def Put(
        self, request_iterator: AsyncIterator[castore_pb2.Directory], context: Ctx
    ) -> pb.PutDirectoryResponse:
        try:
            async with self._directories.put_multiple_start() as putter:
                index = 0
                async for msg in request_iterator:
                    try:
                        directory = Directory.from_proto(msg)
                    except ValidationError as exc:
                        raise ValidationError(
                            f"directory #{index} of the stream failed validation: {exc}"
                        ) from exc
                    await putter.put(directory)
                    index += 1
                await require_half_close(context)  # a cut stream commits nothing
                root = await putter.close()
        except Exception as exc:
            await abort_with(context, exc)
        return pb.PutDirectoryResponse(root_digest=root.raw)
