"""``grpc+http://``, ``grpc+https://``, ``grpc+unix://``: a remote BlobService.

Unlike tvix's client, every byte received is verified: chunked blobs chunk by
chunk (each chunk read by its own digest), small single-chunk blobs before
they are returned, and large single-chunk blobs incrementally, with the
mismatch raised at the end of the stream (before the reader reports EOF).
Uploads go out in 1 MiB messages and the server's digest is checked against
our own.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import blake3
import grpc
import grpc.aio

from tvix_castore.blobservice.base import (
    BlobReader,
    BlobService,
    BlobWriter,
    BytesBlobReader,
    ChunkMeta,
    _resolve_seek,
    checked,
)
from tvix_castore.blobservice.objectstore import ChunkedReader
from tvix_castore.digests import B3Digest
from tvix_castore.errors import ChecksumMismatch, DataCorruption, NotFound
from tvix_castore.protos import rpc_blobstore_pb2 as pb
from tvix_castore.protos import rpc_blobstore_pb2_grpc as pb_grpc
from tvix_castore.rpc.channel import CHUNK_SIZE, open_channel
from tvix_castore.rpc.status import from_rpc_error

__all__ = ["GrpcBlobService"]

_BUFFER_LIMIT = 4 << 20  # single-chunk blobs up to this are verified before use
_MAX_CHUNK = 64 << 20


class _StreamingReader(BlobReader):
    """A large blob read as one stream; verified when the stream ends.

    Forward seeks skip bytes; backward seeks restart the stream.
    """

    def __init__(self, svc: GrpcBlobService, digest: B3Digest) -> None:
        self._svc = svc
        self._digest = digest
        self._pos = 0
        self._stream: AsyncIterator[bytes] | None = None
        self._stream_pos = 0
        self._pending = b""
        self._size: int | None = None

    def tell(self) -> int:
        return self._pos

    async def _open(self) -> AsyncIterator[bytes]:
        hasher = blake3.blake3()
        total = 0
        async for data in self._svc._read_stream(self._digest):
            hasher.update(data)
            total += len(data)
            yield data
        if hasher.digest() != self._digest.raw:
            raise ChecksumMismatch(f"blob {self._digest} received with wrong contents")
        self._size = total

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END and self._size is None:
            async for _ in self._open():  # one pass to learn (and verify) the size
                pass
        if self._size is not None:
            self._pos = _resolve_seek(self._pos, self._size, offset, whence)
        else:
            new = offset if whence == io.SEEK_SET else self._pos + offset
            if whence not in (io.SEEK_SET, io.SEEK_CUR) or new < 0:
                raise ValueError("invalid seek")
            self._pos = new  # checked against the end once the stream reaches it
        return self._pos

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            parts = []
            while data := await self.read(CHUNK_SIZE):
                parts.append(data)
            return b"".join(parts)
        if self._stream is None or self._stream_pos > self._pos:
            self._stream = self._open()
            self._stream_pos = 0
            self._pending = b""
        while self._stream_pos + len(self._pending) <= self._pos:
            self._stream_pos += len(self._pending)
            try:
                self._pending = await anext(self._stream)
            except StopAsyncIteration:
                self._pending = b""
                if self._pos > self._stream_pos:
                    raise ValueError("seeked beyond EOF") from None
                return b""
        off = self._pos - self._stream_pos
        out = self._pending[off : off + n]
        self._pos += len(out)
        return out


class _ChunkVerifyingStream(BlobReader):
    """A chunked blob read as ONE stream, each chunk verified before it is handed out.

    One ``Read`` call instead of one per chunk (round trips dominate on
    loopback); the whole-blob digest is checked at the end too, since the
    chunk list itself came from the server. Any seek other than to the
    current position switches to a :class:`ChunkedReader` (random access by
    chunk digest).
    """

    def __init__(self, svc: GrpcBlobService, digest: B3Digest, chunks: list[ChunkMeta]) -> None:
        self._svc = svc
        self._digest = digest
        self._chunks = chunks
        self.size = sum(c.size for c in chunks)
        self._pos = 0
        self._next = 0  # index of the next chunk to take from the stream
        self._stream: AsyncIterator[bytes] | None = None
        self._pending = bytearray()
        self._cur = b""
        self._cur_off = 0
        self._hasher = blake3.blake3()
        self._random: ChunkedReader | None = None

    def tell(self) -> int:
        return self._random.tell() if self._random is not None else self._pos

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self._random is None:
            target = _resolve_seek(self._pos, self.size, offset, whence)
            if target == self._pos:
                return target
            await self._close_stream()
            self._random = ChunkedReader(self._chunks, self._svc._load_chunk)
        return await self._random.seek(offset, whence)

    async def _close_stream(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()  # type: ignore[attr-defined]
            self._stream = None

    async def _take_chunk(self) -> None:
        meta = self._chunks[self._next]
        if self._stream is None:
            self._stream = self._svc._read_stream(self._digest)
        while len(self._pending) < meta.size:
            try:
                self._pending += await anext(self._stream)
            except StopAsyncIteration:
                raise DataCorruption(f"blob {self._digest}: stream ended early") from None
        data = bytes(self._pending[: meta.size])
        del self._pending[: meta.size]
        checked(meta.digest, data, "chunk")
        self._hasher.update(data)
        self._next += 1
        if self._next == len(self._chunks):
            extra: bytes = await anext(self._stream, b"")
            if self._pending or extra:
                raise DataCorruption(
                    f"blob {self._digest}: server sent more than {self.size} bytes"
                )
            await self._close_stream()
            if self._hasher.digest() != self._digest.raw:
                raise ChecksumMismatch(f"blob {self._digest}: chunk list does not match the blob")
        self._cur, self._cur_off = data, 0

    async def read(self, n: int = -1) -> bytes:
        if self._random is not None:
            return await self._random.read(n)
        if n < 0:
            parts = []
            while data := await self.read(CHUNK_SIZE):
                parts.append(data)
            return b"".join(parts)
        if n == 0 or self._pos >= self.size:
            return b""
        if self._cur_off >= len(self._cur):
            await self._take_chunk()
        out = self._cur[self._cur_off : self._cur_off + n]
        self._cur_off += len(out)
        self._pos += len(out)
        return out

    async def aclose(self) -> None:
        await self._close_stream()
        if self._random is not None:
            await self._random.aclose()


class _Writer(BlobWriter):
    def __init__(self, stub: pb_grpc.BlobServiceAsyncStub) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=8)
        self._hasher = blake3.blake3()
        self._call = stub.Put(self._requests())
        self._ended: asyncio.Future[Any] | None = None
        self._buf = bytearray()

    def _call_ended(self) -> asyncio.Future[Any]:
        """One future for the call's end (a new one per send would each log its error)."""
        if self._ended is None:
            self._ended = asyncio.ensure_future(self._call)
            # retrieved here; _finish reports the error
            self._ended.add_done_callback(lambda f: f.cancelled() or f.exception())
        return self._ended

    async def _requests(self) -> AsyncIterator[pb.BlobChunk]:
        while (data := await self._queue.get()) is not None:
            yield pb.BlobChunk(data=data)

    async def _send(self, data: bytes) -> None:
        put: asyncio.Future[Any] = asyncio.ensure_future(self._queue.put(data))
        done, _ = await asyncio.wait([put, self._call_ended()], return_when=asyncio.FIRST_COMPLETED)
        if put not in done:  # the call ended early: report its error
            put.cancel()
            await self._finish()

    async def write(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)
        self._buf += data
        while len(self._buf) >= CHUNK_SIZE:
            piece = bytes(self._buf[:CHUNK_SIZE])
            del self._buf[:CHUNK_SIZE]
            await self._send(piece)

    async def _finish(self) -> pb.PutBlobResponse:
        try:
            return await self._call
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "blob put") from exc

    async def close(self) -> B3Digest:
        if self._buf:
            await self._send(bytes(self._buf))
            self._buf.clear()
        await self._queue.put(None)
        resp = await self._finish()
        ours = B3Digest(self._hasher.digest())
        if resp.digest != ours.raw:
            raise DataCorruption(f"server stored {resp.digest.hex()} for blob {ours}")
        return ours

    async def abort(self) -> None:
        self._call.cancel()


class GrpcBlobService(BlobService):
    """A BlobService spoken over gRPC to any tvix-compatible server."""

    def __init__(self, channel: grpc.aio.Channel, *, own_channel: bool = True) -> None:
        self._channel = channel
        self._own = own_channel
        self._stub: pb_grpc.BlobServiceAsyncStub = pb_grpc.BlobServiceStub(channel)

    @classmethod
    def from_url(cls, url: str) -> GrpcBlobService:
        """Connect (lazily) to ``grpc+http://``, ``grpc+https://`` or ``grpc+unix://``."""
        return cls(open_channel(url))

    async def aclose(self) -> None:
        if self._own:
            await self._channel.close(None)

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        try:
            resp = await self._stub.Stat(pb.StatBlobRequest(digest=digest.raw, send_chunks=True))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise from_rpc_error(exc, f"stat {digest}") from exc
        try:
            return [ChunkMeta(B3Digest(c.digest), c.size) for c in resp.chunks]
        except Exception as exc:
            raise DataCorruption(f"server sent an invalid chunk list for {digest}") from exc

    async def has(self, digest: B3Digest) -> bool:
        return await self.chunks(digest) is not None

    async def _read_stream(self, digest: B3Digest) -> AsyncIterator[bytes]:
        call = self._stub.Read(pb.ReadBlobRequest(digest=digest.raw))
        try:
            async for msg in call:
                if msg.data:
                    yield msg.data
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, f"read {digest}") from exc
        finally:
            call.cancel()

    async def _read_small(self, digest: B3Digest, limit: int) -> bytes | None:
        parts: list[bytes] = []
        total = 0
        try:
            async for data in self._read_stream(digest):
                total += len(data)
                if total > limit:
                    raise DataCorruption(f"{digest}: server sent more than {limit} bytes")
                parts.append(data)
        except NotFound:
            return None
        return checked(digest, b"".join(parts))

    async def _load_chunk(self, digest: B3Digest, size: int) -> bytes | None:
        return await self._read_small(digest, min(size, _MAX_CHUNK))

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        chunks = await self.chunks(digest)
        if chunks is None:
            return None
        if len(chunks) >= 2:
            return _ChunkVerifyingStream(self, digest, chunks)
        # One chunk: buffer and verify small blobs; stream large ones.
        parts: list[bytes] = []
        total = 0
        hasher = blake3.blake3()
        stream = self._read_stream(digest)
        try:
            async for data in stream:
                hasher.update(data)
                parts.append(data)
                total += len(data)
                if total > _BUFFER_LIMIT:
                    break
            else:
                if hasher.digest() != digest.raw:
                    raise ChecksumMismatch(f"blob {digest} received with wrong contents")
                return BytesBlobReader(b"".join(parts))
        except NotFound:
            return None
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        return _StreamingReader(self, digest)

    def open_write(self) -> BlobWriter:
        return _Writer(self._stub)
