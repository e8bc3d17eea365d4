"""BlobService over a real gRPC server, driven through raw generated stubs."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import blake3
import grpc
import grpc.aio
import pytest

from tvix_castore.blobservice import BlobService, MemoryBlobService, ObjectStoreBlobService
from tvix_castore.blobservice.grpc import GrpcBlobService
from tvix_castore.digests import EMPTY_DIGEST, B3Digest
from tvix_castore.errors import ConfigError
from tvix_castore.objectstore import MemoryObjectStore
from tvix_castore.protos import rpc_blobstore_pb2 as pb
from tvix_castore.protos import rpc_blobstore_pb2_grpc as pb_grpc
from tvix_castore.rpc.blob_server import BlobServiceServicer
from tvix_castore.rpc.channel import channel_options
from tvix_castore.rpc.server import Registration, start_server


def _reg(backend: BlobService) -> list[Registration]:
    return [
        (
            lambda s: pb_grpc.add_BlobServiceServicer_to_server(BlobServiceServicer(backend), s),
            "tvix.castore.v1.BlobService",
        )
    ]


@pytest.fixture
async def server_addr() -> AsyncIterator[str]:
    server, addr = await start_server(
        "127.0.0.1:0", _reg(ObjectStoreBlobService(MemoryObjectStore()))
    )
    yield addr
    await server.stop(None)


@pytest.fixture
async def stub(server_addr: str) -> AsyncIterator[pb_grpc.BlobServiceAsyncStub]:
    async with grpc.aio.insecure_channel(server_addr, options=channel_options()) as ch:
        yield pb_grpc.BlobServiceStub(ch)


async def test_bad_digest_lengths(stub: pb_grpc.BlobServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Stat(pb.StatBlobRequest(digest=b"\x00\x01"))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid digest length" in (exc.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stub.Read(pb.ReadBlobRequest(digest=b"")):
            pass
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_blob_not_found(stub: pb_grpc.BlobServiceAsyncStub) -> None:
    digest = bytes(32)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Stat(pb.StatBlobRequest(digest=digest))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert "not found" in (exc.value.details() or "")
    call = stub.Read(pb.ReadBlobRequest(digest=digest))
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for msg in call:
            got.append(msg)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert got == []  # status before any message


async def test_put_read_stat_raw(stub: pb_grpc.BlobServiceAsyncStub) -> None:
    async def chunks() -> AsyncIterator[pb.BlobChunk]:
        yield pb.BlobChunk(data=b"x86_")
        yield pb.BlobChunk(data=b"")  # empty messages are fine
        yield pb.BlobChunk(data=b"64-linux")

    resp = await stub.Put(chunks())
    assert B3Digest(resp.digest).b64() == "KOM3/IHEx7YfInAnlJpAElYezq0Sxn9fRz7xuClwNfA="
    stat = await stub.Stat(pb.StatBlobRequest(digest=resp.digest))
    assert list(stat.chunks) == []
    data = b"".join([m.data async for m in stub.Read(pb.ReadBlobRequest(digest=resp.digest))])
    assert data == b"x86_64-linux"


async def test_empty_stream_and_empty_blob(stub: pb_grpc.BlobServiceAsyncStub) -> None:
    async def nothing() -> AsyncIterator[pb.BlobChunk]:
        return
        yield

    resp = await stub.Put(nothing())
    assert resp.digest == EMPTY_DIGEST.raw
    msgs = [m async for m in stub.Read(pb.ReadBlobRequest(digest=EMPTY_DIGEST.raw))]
    assert msgs == []  # an empty blob is zero messages


async def test_read_messages_are_at_most_1mib_and_stat_lists_chunks(
    stub: pb_grpc.BlobServiceAsyncStub,
) -> None:
    data = bytes(range(256)) * 12_000  # ~3 MiB, several FastCDC chunks
    data = blake3.blake3(data).digest(length=len(data))  # incompressible, varied

    async def gen() -> AsyncIterator[pb.BlobChunk]:
        for i in range(0, len(data), 1 << 20):
            yield pb.BlobChunk(data=data[i : i + (1 << 20)])

    resp = await stub.Put(gen())
    stat = await stub.Stat(pb.StatBlobRequest(digest=resp.digest, send_chunks=True))
    assert len(stat.chunks) >= 2
    assert sum(c.size for c in stat.chunks) == len(data)
    sizes = [len(m.data) async for m in stub.Read(pb.ReadBlobRequest(digest=resp.digest))]
    assert max(sizes) <= 1 << 20 and sum(sizes) == len(data)
    # chunks can be read by their own digest
    first = stat.chunks[0]
    chunk = b"".join([m.data async for m in stub.Read(pb.ReadBlobRequest(digest=first.digest))])
    assert chunk == data[: first.size]


async def test_unknown_fields_are_ignored(
    stub: pb_grpc.BlobServiceAsyncStub, server_addr: str
) -> None:
    # A StatBlobRequest carrying an unknown field 9 still works (raw bytes on the wire).
    raw = pb.StatBlobRequest(digest=EMPTY_DIGEST.raw).SerializeToString() + b"\x48\x01"
    async with grpc.aio.insecure_channel(server_addr) as ch:
        call = ch.unary_unary(
            "/tvix.castore.v1.BlobService/Stat",
            request_serializer=lambda b: b,
            response_deserializer=pb.StatBlobResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call(raw)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND  # parsed fine, blob absent


async def test_client_detects_lying_server() -> None:
    """A server returning wrong bytes for a digest is caught by our client."""

    class Liar(MemoryBlobService):
        async def open_read(self, digest: B3Digest):  # type: ignore[no-untyped-def]
            from tvix_castore.blobservice import BytesBlobReader

            return BytesBlobReader(b"not what you asked for") if await self.has(digest) else None

    backend = Liar()
    server, addr = await start_server("127.0.0.1:0", _reg(backend))
    client = GrpcBlobService.from_url(f"grpc+http://{addr}")
    try:
        digest = await client.put(b"the real contents")
        from tvix_castore.errors import ChecksumMismatch

        with pytest.raises(ChecksumMismatch):
            await client.read_all(digest)
    finally:
        await client.aclose()
        await server.stop(None)


async def test_port_conflict_raises() -> None:
    server, addr = await start_server("127.0.0.1:0", _reg(MemoryBlobService()))
    try:
        with pytest.raises(ConfigError, match="cannot listen"):
            await start_server(addr, _reg(MemoryBlobService()))
    finally:
        await server.stop(None)


@pytest.mark.parametrize(
    "url",
    [
        "grpc+http://",
        "grpc+http://host:1/path",
        "grpc+unix://host/sock",
        "grpc+unix://relative",
        "http://x:1",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        GrpcBlobService.from_url(url)


# The client of test_large_blob_flat_memory, in a process of its own: it reports its own
# memory (not the test process's, whose peak includes the server and everything before).
_CLIENT = """
import asyncio, sys
import blake3
from tvix_castore.blobservice.grpc import GrpcBlobService
from tvix_castore.digests import B3Digest

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

async def main(addr, size):
    client = GrpcBlobService.from_url("grpc+http://" + addr)
    try:
        assert await client.size(B3Digest.of(b"absent")) is None  # the channel is up
        before = kib("VmRSS")  # interpreter, modules, channel
        block = blake3.blake3(b"seed").digest(length=1 << 20)
        w = client.open_write()
        hasher = blake3.blake3()
        for i in range(size >> 20):
            piece = block[i:] + block[:i]
            hasher.update(piece)
            await w.write(piece)
        digest = await w.close()
        assert digest.raw == hasher.digest()
        reader = await client.open_read(digest)
        assert reader is not None
        check = blake3.blake3()
        total = 0
        while data := await reader.read(1 << 20):
            check.update(data)
            total += len(data)
        assert total == size and check.digest() == digest.raw
    finally:
        await client.aclose()
    print(before, kib("VmHWM"))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_large_blob_flat_memory() -> None:
    """110 MiB through a real server and back; the client's memory stays far below the blob.

    The client runs in a child process and reads its own VmRSS (after start-up) and
    VmHWM (its peak) from /proc/self/status.
    """
    backend = ObjectStoreBlobService(MemoryObjectStore())
    server, addr = await start_server("127.0.0.1:0", _reg(backend))
    size = 110 << 20
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CLIENT,
            addr,
            str(size),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 300)
        assert proc.returncode == 0, err.decode(errors="replace")
    finally:
        await server.stop(None)
    before_kib, peak_kib = map(int, out.split())
    # Holding the blob (or a good part of it) would add 110 MiB; streaming adds buffers.
    grown_mib = (peak_kib - before_kib) / 1024
    assert grown_mib < (size >> 20) / 2, f"client grew by {grown_mib:.0f} MiB"


async def test_client_detects_lying_server_for_chunked_blobs() -> None:
    """A chunked blob streamed in one Read: a wrong chunk is caught before it is returned."""
    from tvix_castore.blobservice import BytesBlobReader
    from tvix_castore.errors import ChecksumMismatch

    data = blake3.blake3(b"chunky").digest(length=3 << 20)
    bad = bytearray(data)
    bad[len(data) // 2] ^= 1

    class Liar(ObjectStoreBlobService):
        async def open_read(self, digest: B3Digest):  # type: ignore[no-untyped-def]
            if digest == B3Digest.of(data):
                return BytesBlobReader(bytes(bad))
            return await super().open_read(digest)

    backend = Liar(MemoryObjectStore())
    server, addr = await start_server("127.0.0.1:0", _reg(backend))
    client = GrpcBlobService.from_url(f"grpc+http://{addr}")
    try:
        digest = await backend.put(data)
        chunks = await client.chunks(digest)
        assert chunks is not None and len(chunks) >= 2
        reader = await client.open_read(digest)
        assert reader is not None
        got = b""
        with pytest.raises(ChecksumMismatch):
            while piece := await reader.read(1 << 20):
                got += piece
        assert got == data[: len(got)]  # only verified bytes were handed out
        assert len(got) < len(data) // 2 + (1 << 20)
    finally:
        await client.aclose()
        await server.stop(None)
