"""``grpc+http://``, ``grpc+https://``, ``grpc+unix://``: a remote DirectoryService.

Nothing received is trusted: a single ``get`` re-hashes the reply and compares
it with the digest asked for; ``get_recursive`` checks the closure with a
:class:`ClosureVerifier` as it streams in (each Directory must have been
announced by one received earlier, sizes must match) and yields each one
only once it passed. Uploads are validated locally with a
:class:`DirectoryGraph` while they stream to the server, and the server's
``root_digest`` must equal ours. An invalid upload is cancelled before its
end, so the server persists nothing of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio

from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryPutter, DirectoryService
from tvix_castore.directoryservice.graph import Closure, ClosureVerifier, DirectoryGraph
from tvix_castore.errors import (
    ChecksumMismatch,
    DataCorruption,
    DirectoryGraphError,
    ValidationError,
)
from tvix_castore.nodes import DEFAULT_SIZE_MODE, Directory, SizeMode
from tvix_castore.protos import castore_pb2
from tvix_castore.protos import rpc_directory_pb2 as pb
from tvix_castore.protos import rpc_directory_pb2_grpc as pb_grpc
from tvix_castore.rpc.channel import open_channel
from tvix_castore.rpc.directory_server import directory_message
from tvix_castore.rpc.status import from_rpc_error

__all__ = ["GrpcDirectoryService"]

_QUEUE_DEPTH = 16  # Directories buffered towards the server before put() waits


def _received(msg: castore_pb2.Directory, what: str) -> Directory:
    """Validate a Directory sent by the server; an invalid one is corruption."""
    try:
        return Directory.from_proto(msg)
    except ValidationError as exc:
        raise DataCorruption(f"{what}: server sent an invalid directory: {exc}") from exc


class _GrpcPutter(DirectoryPutter):
    """Validates locally (DirectoryGraph) while streaming to the server's ``Put``.

    The call starts with the first Directory. A Directory rejected locally is
    not sent and the putter stays usable, as with any putter; if the closure
    is invalid at ``close()`` (or on ``abort()``) the call is cancelled, so the
    server never sees the end of the stream and persists nothing.
    """

    def __init__(self, stub: pb_grpc.DirectoryServiceAsyncStub, size_mode: SizeMode) -> None:
        self._stub = stub
        self._graph: DirectoryGraph | None = DirectoryGraph(size_mode)
        self._sent: set[B3Digest] = set()
        self._queue: asyncio.Queue[castore_pb2.Directory | None] = asyncio.Queue(_QUEUE_DEPTH)
        self._call: grpc.aio.StreamUnaryCall[castore_pb2.Directory, pb.PutDirectoryResponse]
        self._response: asyncio.Future[pb.PutDirectoryResponse] | None = None

    async def _requests(self) -> AsyncIterator[castore_pb2.Directory]:
        while (msg := await self._queue.get()) is not None:
            yield msg

    def _open_graph(self) -> DirectoryGraph:
        if self._graph is None:
            raise DirectoryGraphError("putter already closed")
        return self._graph

    async def _send(self, msg: castore_pb2.Directory | None) -> None:
        if self._response is None:
            self._call = self._stub.Put(self._requests())
            self._response = asyncio.ensure_future(self._call)
        if self._response.done():  # the server ended the call early
            await self._result()
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(msg)
            return
        put = asyncio.ensure_future(self._queue.put(msg))
        either: list[asyncio.Future[Any]] = [put, self._response]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            await self._result()

    async def _result(self) -> pb.PutDirectoryResponse:
        assert self._response is not None
        try:
            response = await self._response
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "directory put") from exc
        if self._graph is not None:  # still sending: an answer now is premature
            raise DataCorruption("directory put: server answered before the stream ended")
        return response

    async def put(self, directory: Directory) -> None:
        graph = self._open_graph()
        msg = directory_message(directory, ValidationError)
        graph.add(directory)
        digest = directory.digest
        if digest in self._sent:
            return
        self._sent.add(digest)
        await self._send(msg)

    async def close(self) -> B3Digest:
        graph = self._open_graph()
        try:
            closure = graph.finalize()
        except BaseException:
            await self.abort()
            raise
        self._graph = None
        try:
            await self._send(None)
            response = await self._result()
        except BaseException:
            await self.abort()
            raise
        if response.root_digest != closure.root.raw:
            raise DataCorruption(
                f"directory put: server reports root {response.root_digest.hex()},"
                f" we sent {closure.root}"
            )
        return closure.root

    async def abort(self) -> None:
        self._graph = None
        response = self._response
        if response is None:
            return
        if not response.done():
            self._call.cancel()
            await asyncio.wait([response])
        if not response.cancelled():
            response.exception()  # retrieved: the call's outcome no longer matters


class GrpcDirectoryService(DirectoryService):
    """A DirectoryService spoken over gRPC to any tvix-compatible server.

    ``size_mode`` must be the one the server counts sizes with (B §2.4).
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        own_channel: bool = True,
        size_mode: SizeMode = DEFAULT_SIZE_MODE,
    ) -> None:
        self._channel = channel
        self._own = own_channel
        self.size_mode = size_mode
        self._stub: pb_grpc.DirectoryServiceAsyncStub = pb_grpc.DirectoryServiceStub(channel)

    @classmethod
    def from_url(cls, url: str, *, size_mode: SizeMode = DEFAULT_SIZE_MODE) -> GrpcDirectoryService:
        """Connect (lazily) to ``grpc+http://``, ``grpc+https://`` or ``grpc+unix://``."""
        return cls(open_channel(url), size_mode=size_mode)

    async def aclose(self) -> None:
        if self._own:
            await self._channel.close(None)

    async def get(self, digest: B3Digest) -> Directory | None:
        call = self._stub.Get(pb.GetDirectoryRequest(digest=digest.raw, recursive=False))
        found: Directory | None = None
        try:
            async for msg in call:
                if found is not None:
                    raise DataCorruption(f"get {digest}: server sent more than one directory")
                found = _received(msg, f"get {digest}")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise from_rpc_error(exc, f"get {digest}") from exc
        finally:
            call.cancel()
        if found is not None and found.digest != digest:
            raise ChecksumMismatch(f"get {digest}: server sent directory {found.digest}")
        return found

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        verifier = ClosureVerifier(root, self.size_mode)
        call = self._stub.Get(pb.GetDirectoryRequest(digest=root.raw, recursive=True))
        received = False
        try:
            async for msg in call:
                directory = _received(msg, f"closure of {root}")
                verifier.add(directory)
                received = True
                yield directory
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND and not received:
                return
            raise from_rpc_error(exc, f"closure of {root}") from exc
        finally:
            call.cancel()
        verifier.finalize()

    async def put(self, directory: Directory) -> B3Digest:
        """Store one Directory whose children are already on the server.

        A ``Put`` stream must carry every child it refers to (B §2.6), so the
        children's closures are fetched (verified) and sent along.
        """
        closure: dict[B3Digest, Directory] = {}
        for child in directory.directories:
            if child.digest not in closure:
                fetched = [d async for d in self.get_recursive(child.digest)]
                if not fetched:
                    raise DirectoryGraphError(
                        f"directory {directory.digest} refers to unknown directory {child.digest}"
                    )
                closure.update((d.digest, d) for d in fetched)
            recorded = closure[child.digest].size(self.size_mode)
            if recorded != child.size:
                raise DirectoryGraphError(
                    f"child {child.digest} has size {recorded}, referred with {child.size}"
                )
        closure[directory.digest] = directory
        return await self._upload(Closure(directory.digest, closure).leaves_to_root())

    async def _upload(self, directories: Sequence[Directory]) -> B3Digest:
        async with self.put_multiple_start() as putter:
            for directory in directories:
                await putter.put(directory)
            return await putter.close()

    async def _commit(self, directories: Sequence[Directory]) -> None:
        """Upload ``directories`` (one closure, leaves first) in one ``Put``."""
        await self._upload(directories)

    def put_multiple_start(self) -> DirectoryPutter:
        return _GrpcPutter(self._stub, self.size_mode)
