"""One conformance suite for every BlobService backend."""

import hashlib
import io
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import blake3
import pytest
import zstandard

from tests.v1_packed import PackedBlobService
from tvix_castore.blobservice import (
    BlobService,
    ChunkedReader,
    ChunkMeta,
    MemoryBlobService,
    ObjectStoreBlobService,
)
from tvix_castore.blobservice.grpc import GrpcBlobService
from tvix_castore.blobservice.objectstore import (
    blob_key,
    chunk_key,
    raw_frame,
    raw_frame_pieces,
)
from tvix_castore.digests import EMPTY_DIGEST, B3Digest
from tvix_castore.errors import ChecksumMismatch, DataCorruption, NotFound
from tvix_castore.objectstore import LocalObjectStore, MemoryObjectStore
from tvix_castore.packstore import PackBlobService
from tvix_castore.protos import rpc_blobstore_pb2_grpc as pb_grpc
from tvix_castore.registry import blob_service_from_url
from tvix_castore.rpc.blob_server import BlobServiceServicer
from tvix_castore.rpc.server import start_server

BLOB_B = bytes(range(255)) * 4096
HELLOWORLD = b"Hello World!"


def pseudo_random(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha512(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


Factory = Callable[[Path], BlobService]

BACKENDS: dict[str, Factory] = {
    "memory": lambda _: MemoryBlobService(),
    "objectstore+memory": lambda _: ObjectStoreBlobService(MemoryObjectStore()),
    "objectstore+file": lambda p: ObjectStoreBlobService(LocalObjectStore(p / "objects")),
    "packed": lambda p: PackedBlobService(
        p / "blobs.sqlite", ObjectStoreBlobService(LocalObjectStore(p / "objects"))
    ),
    "packed, raw chunks": lambda p: PackedBlobService(
        p / "blobs.sqlite",
        ObjectStoreBlobService(LocalObjectStore(p / "objects"), zstd_level=None),
    ),
    "packstore": lambda p: PackBlobService(p / "home"),
    "packstore, raw": lambda p: PackBlobService(p / "home", level=0, fsync=False),
}


@asynccontextmanager
async def served(backend: BlobService, listen: str) -> AsyncIterator[GrpcBlobService]:
    """A real gRPC server on loopback (or a unix socket) and a client to it."""
    server, addr = await start_server(
        listen,
        [(lambda s: pb_grpc.add_BlobServiceServicer_to_server(BlobServiceServicer(backend), s),
          "tvix.castore.v1.BlobService")],
    )  # fmt: skip
    url = f"grpc+unix://{addr[5:]}" if addr.startswith("unix:") else f"grpc+http://{addr}"
    client = GrpcBlobService.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()
        await server.stop(None)


@pytest.fixture(
    params=[*sorted(BACKENDS), "objectstore+s3", "grpc->memory", "grpc->objectstore", "grpc-unix"]
)
async def svc(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobService]:
    name: str = request.param
    if name == "objectstore+s3":  # (moto's S3 server, a prefix of its own)
        async with blob_service_from_url(request.getfixturevalue("s3").fresh_url()) as service:
            yield service
    elif name == "grpc->memory":
        async with served(MemoryBlobService(), "127.0.0.1:0") as client:
            yield client
    elif name == "grpc->objectstore":
        async with served(ObjectStoreBlobService(MemoryObjectStore()), "[::1]:0") as client:
            yield client
    elif name == "grpc-unix":
        async with served(ObjectStoreBlobService(MemoryObjectStore()), str(tmp_path / "s")) as c:
            yield c
    else:
        async with BACKENDS[name](tmp_path) as service:
            yield service


@pytest.mark.parametrize(
    ("data", "hexdigest"),
    [
        (b"", "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"),
        (HELLOWORLD, "5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c"),
        (b"\x00\x01", "7b7015bb92cf0b318037702a6cdd81dee41224f734684c2c122cd6359cb1ee63"),
        (BLOB_B, "a82c5154a7a0c262c6fdb929a317585646f8fbcf80326d0a7b8747edaf2d99d2"),
        (b"\x01\x02\x03", "b177ec1bf26dfb3b7010d473e6d44713b29b765b99c6e60ecbfae742de496543"),
        (b"\x04\x05", "5f805527aa94f2a9a3a782cad8cc18b63cf6017e7bc65ca96aeada8392d4c525"),
        (b"\x01", "48fc721fbbc172e0925fa27af1671de225ba927134802998b10a1568a188652b"),
    ],
)
async def test_put_get_vectors(svc: BlobService, data: bytes, hexdigest: str) -> None:
    digest = B3Digest.from_hex(hexdigest)
    if data:
        assert not await svc.has(digest)
        assert await svc.open_read(digest) is None
        assert await svc.chunks(digest) is None
    assert await svc.put(data) == digest
    assert await svc.has(digest)
    assert await svc.read_all(digest) == data
    assert await svc.chunks(digest) is not None
    assert await svc.size(digest) == len(data)
    absent = B3Digest(bytes(32))
    assert await svc.size_many([digest, absent, digest]) == {digest: len(data)}


async def test_readme_example(svc: BlobService) -> None:
    digest = await svc.put(b"x86_64-linux")
    assert digest.b64() == "KOM3/IHEx7YfInAnlJpAElYezq0Sxn9fRz7xuClwNfA="


async def test_streamed_writes_in_odd_pieces(svc: BlobService) -> None:
    data = pseudo_random(3_000_000)
    w = svc.open_write()
    for i in range(0, len(data), 77_777):
        await w.write(data[i : i + 77_777])
    digest = await w.close()
    assert digest.raw == blake3.blake3(data).digest()
    assert await svc.read_all(digest) == data


async def test_seek_and_partial_reads(svc: BlobService) -> None:
    data = pseudo_random(2_500_000, seed=1)
    digest = await svc.put(data)
    reader = await svc.open_read(digest)
    assert reader is not None
    async with reader:
        for offset in (0, 1, 131_071, 262_144, 1_000_003, 2_499_999, 2_500_000):
            assert await reader.seek(offset) == offset
            assert await reader.readexactly(100_000) == data[offset : offset + 100_000]
        await reader.seek(-10, io.SEEK_END)
        assert await reader.read() == data[-10:]
        with pytest.raises(ValueError, match="beyond EOF"):
            await reader.seek(len(data) + 1)


async def test_abort_publishes_nothing(svc: BlobService) -> None:
    data = b"never published"
    with pytest.raises(RuntimeError):
        async with svc.open_write() as w:
            await w.write(data)
            raise RuntimeError("client went away")
    assert not await svc.has(B3Digest.of(data))


async def test_idempotent_put(svc: BlobService) -> None:
    a = await svc.put(HELLOWORLD)
    b = await svc.put(HELLOWORLD)
    assert a == b


async def test_objectstore_layout_and_chunks(tmp_path: Path) -> None:
    svc = ObjectStoreBlobService(LocalObjectStore(tmp_path))
    data = pseudo_random(4_000_000, seed=2)
    digest = await svc.put(data)
    chunks = await svc.chunks(digest)
    assert chunks is not None and len(chunks) > 4
    assert sum(c.size for c in chunks) == len(data)
    assert all(svc.min_size <= c.size <= svc.max_size for c in chunks[:-1])
    h = digest.hex()
    assert (tmp_path / "blobs" / "b3" / h[:4] / h).is_file()
    for c in chunks:
        assert (tmp_path / "chunks" / "b3" / c.digest.hex()[:4] / c.digest.hex()).is_file()
        assert await svc.has(c.digest)  # chunks answer has() too
        assert await svc.chunks(c.digest) == []
    # a small blob is a single chunk object and needs no index
    small = await svc.put(HELLOWORLD)
    assert (tmp_path / chunk_key(small)).is_file()
    assert not (tmp_path / blob_key(small)).exists()
    assert await svc.chunks(small) == []
    # no temp files are left behind
    assert not [p for p in tmp_path.rglob(".tmp-*")]


@pytest.mark.parametrize("size", [0, 1, 131_071, 131_072, 131_073, 262_144, 524_288, 600_001])
def test_raw_frame_is_zstd_and_served_without_copying(size: int) -> None:
    data = pseudo_random(size, seed=size)
    frame = raw_frame(data)
    # any zstd decoder reads it, and it says how large its content is
    assert zstandard.frame_content_size(frame) == size
    assert zstandard.ZstdDecompressor().decompress(frame) == data
    assert len(frame) == size + 9 + 3 * max(1, -(-size // 131_072))
    pieces = raw_frame_pieces(frame)
    assert pieces is not None and b"".join(pieces) == data


async def test_uncompressed_chunks_keep_the_layout(tmp_path: Path) -> None:
    """zstd_level=None stores raw zstd frames: same keys, readable by a compressing store."""
    raw = ObjectStoreBlobService(LocalObjectStore(tmp_path), zstd_level=None)
    text = b"very compressible line\n" * 100_000
    digest = await raw.put(text)
    chunks = await raw.chunks(digest)
    assert chunks is not None and len(chunks) > 1
    on_disk = sum((tmp_path / chunk_key(c.digest)).stat().st_size for c in chunks)
    assert on_disk > len(text)  # stored as is, plus frame and block headers
    for c in chunks:
        frame = (tmp_path / chunk_key(c.digest)).read_bytes()
        assert raw_frame_pieces(frame) is not None
    compressing = ObjectStoreBlobService(LocalObjectStore(tmp_path), zstd_level=3)
    assert await compressing.read_many([digest]) == {digest: text}
    other = await compressing.put(text + b"tail")  # shared chunks are not rewritten
    assert await raw.read_many([other]) == {other: text + b"tail"}


async def test_chunking_is_deterministic_across_write_patterns(tmp_path: Path) -> None:
    data = pseudo_random(3_000_000, seed=3)
    a = ObjectStoreBlobService(MemoryObjectStore())
    b = ObjectStoreBlobService(MemoryObjectStore())
    da = await a.put(data)
    w = b.open_write()
    for i in range(0, len(data), 4096):
        await w.write(data[i : i + 4096])
    assert await w.close() == da
    assert await a.chunks(da) == await b.chunks(da)


async def test_corrupt_chunk_is_detected(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    svc = ObjectStoreBlobService(store)
    digest = await svc.put(HELLOWORLD)
    import zstandard

    (tmp_path / chunk_key(digest)).write_bytes(zstandard.compress(b"Hello World?"))
    with pytest.raises(ChecksumMismatch):
        await svc.open_read(digest)
    (tmp_path / chunk_key(digest)).write_bytes(b"not zstd at all")
    with pytest.raises(DataCorruption):
        await svc.open_read(digest)


async def test_corrupt_chunk_in_large_blob(tmp_path: Path) -> None:
    svc = ObjectStoreBlobService(LocalObjectStore(tmp_path))
    data = pseudo_random(2_000_000, seed=4)
    digest = await svc.put(data)
    chunks = await svc.chunks(digest)
    assert chunks
    import zstandard

    bad = bytearray(data[: chunks[0].size])
    bad[10] ^= 1
    (tmp_path / chunk_key(chunks[0].digest)).write_bytes(zstandard.compress(bytes(bad)))
    reader = await svc.open_read(digest)
    assert reader is not None
    await reader.seek(chunks[0].size)  # other chunks still read fine
    assert await reader.readexactly(10) == data[chunks[0].size : chunks[0].size + 10]
    await reader.seek(0)
    with pytest.raises(ChecksumMismatch):
        await reader.read(10)
    os.unlink(tmp_path / chunk_key(chunks[1].digest))
    fresh = await svc.open_read(digest)
    assert fresh is not None
    await fresh.seek(chunks[0].size)
    with pytest.raises(NotFound):
        await fresh.read(10)


async def test_chunked_reader_vector() -> None:
    pieces = [
        b"\x00\x01",
        b"\x02\x03\x04\x05",
        b"\x06",
        b"\x07\x08",
        b"\x09\x0a\x0b\x0c\x0d\x0e\x0f",
    ]
    blobs = {B3Digest.of(p): p for p in pieces}

    async def load(digest: B3Digest, size: int) -> bytes | None:
        return blobs.get(digest)

    metas = [ChunkMeta(B3Digest.of(p), len(p)) for p in pieces]
    reader = ChunkedReader(metas, load)
    full = bytes(range(16))
    for offset in range(17):
        await reader.seek(offset)
        assert await reader.read() == full[offset:]
    for offset in range(17):  # (views inside a chunk, joined across chunks)
        for n in range(18 - offset):
            await reader.seek(offset)
            assert bytes(await reader.read_view(n)) == full[offset : offset + n]
            assert reader.tell() == min(16, offset + n)


async def test_empty_digest_always_readable() -> None:
    svc = ObjectStoreBlobService(MemoryObjectStore())
    assert await svc.read_all(EMPTY_DIGEST) == b""


async def test_concurrent_writers_of_the_same_blob(svc: BlobService) -> None:
    """Many writers racing on one (multi-chunk) blob all succeed and agree."""
    import asyncio

    data = pseudo_random(1_500_000, seed=9)

    async def put() -> B3Digest:
        w = svc.open_write()
        for i in range(0, len(data), 300_000):
            await w.write(data[i : i + 300_000])
            await asyncio.sleep(0)
        return await w.close()

    digests = await asyncio.gather(*(put() for _ in range(8)))
    assert len(set(digests)) == 1
    assert await svc.read_all(digests[0]) == data


def test_concurrent_processes_write_one_store(tmp_path: Path) -> None:
    """Separate processes writing the same blobs into one objectstore+file dir."""
    import subprocess
    import sys

    script = (
        "import asyncio, sys\n"
        "from tvix_castore.blobservice import ObjectStoreBlobService\n"
        "from tvix_castore.objectstore import LocalObjectStore\n"
        "from tests.castore.test_blobservice import pseudo_random\n"
        "async def main():\n"
        f"    s = ObjectStoreBlobService(LocalObjectStore({str(tmp_path)!r}))\n"
        "    for seed in range(6):\n"
        "        print((await s.put(pseudo_random(700_000, seed))).hex())\n"
        "asyncio.run(main())\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outputs)) == 1
    import asyncio

    async def check() -> None:
        s = ObjectStoreBlobService(LocalObjectStore(tmp_path))
        for seed, hexdigest in enumerate(outputs[0].split()):
            assert await s.read_all(B3Digest.from_hex(hexdigest)) == pseudo_random(700_000, seed)

    asyncio.run(check())
    assert not list(tmp_path.rglob(".tmp-*"))


async def test_packed_append_survives_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``writev`` may write less than asked (a signal, a full disk's last bytes): the
    rest, from the middle of a blob on, is written in order."""
    real = os.writev

    def short(fd: int, buffers: list[bytes]) -> int:
        return real(fd, [bytes(buffers[0])[:3]])  # at most 3 bytes at a time

    blobs = BACKENDS["packed, raw chunks"](tmp_path)
    assert isinstance(blobs, PackedBlobService)
    data = [os.urandom(n) for n in (1, 7, 100, 5000)]
    monkeypatch.setattr(os, "writev", short)
    async with blobs:
        digests = await blobs.put_many(data)
        monkeypatch.setattr(os, "writev", real)
        for digest, blob in zip(digests, data, strict=True):
            assert await blobs.read_all(digest) == blob


@pytest.mark.parametrize("zstd", [None, 3], ids=["raw: chunks packed", "zstd: chunk files"])
async def test_packed_ingest_of_large_files(tmp_path: Path, zstd: int | None) -> None:
    """Imported large files are cut as the object store cuts them: same chunk list (what
    gRPC ``Stat`` reports), every chunk a readable blob; raw, the chunks lie in the
    packs (no chunk files), compressed, in chunk files."""
    large = ObjectStoreBlobService(LocalObjectStore(tmp_path / "objects"), zstd_level=zstd)
    svc = PackedBlobService(tmp_path / "blobs.sqlite", large)
    reference = ObjectStoreBlobService(MemoryObjectStore())
    data = pseudo_random(3_000_000, seed=5)
    one_chunk = pseudo_random(svc.threshold + 10, seed=6)  # above the threshold, one chunk
    files = []
    for name, blob in (("large", data), ("one-chunk", one_chunk), ("small", HELLOWORLD)):
        (tmp_path / name).write_bytes(blob)
        files.append((str(tmp_path / name), len(blob)))
    async with svc:
        digests = await svc.ingest_files(files)
        assert digests == [B3Digest.of(d) for d in (data, one_chunk, HELLOWORLD)]
        digest = B3Digest.of(data)
        chunks = await svc.chunks(digest)
        assert chunks is not None and len(chunks) > 4
        assert chunks == await reference.chunks(await reference.put(data))
        assert await svc.chunks(B3Digest.of(one_chunk)) == []
        chunk_files = [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]
        assert bool(chunk_files) == (zstd is not None)
        assert await svc.has(digest) and await svc.size(digest) == len(data)
        assert await svc.has_many([digest, *[c.digest for c in chunks]]) == {
            digest,
            *[c.digest for c in chunks],
        }
        assert await svc.size_many([digest, B3Digest.of(HELLOWORLD)]) == {
            digest: len(data),
            B3Digest.of(HELLOWORLD): len(HELLOWORLD),
        }
        assert (await svc.read_many([digest]))[digest] == data
        reader = await svc.open_read(digest)
        assert reader is not None
        async with reader:
            await reader.seek(1_000_001)
            assert await reader.readexactly(500_000) == data[1_000_001:1_500_001]
        at = 0
        for c in chunks:  # each chunk is a blob of its own
            assert await svc.read_all(c.digest) == data[at : at + c.size]
            at += c.size
        # A second ingest appends nothing.
        packs = sum(p.stat().st_size for p in (tmp_path / "packs").iterdir())
        assert await svc.ingest_files(files) == digests
        assert sum(p.stat().st_size for p in (tmp_path / "packs").iterdir()) == packs


async def test_corrupt_packed_chunk_is_detected(tmp_path: Path) -> None:
    svc = BACKENDS["packed, raw chunks"](tmp_path)
    assert isinstance(svc, PackedBlobService)
    data = pseudo_random(2_000_000, seed=7)
    (tmp_path / "f").write_bytes(data)
    async with svc:
        (digest,) = await svc.ingest_files([(str(tmp_path / "f"), len(data))])
        assert isinstance(digest, B3Digest)
        chunks = await svc.chunks(digest)
        assert chunks
        pack, offset, size = svc.locate_many([chunks[1].digest.raw])[chunks[1].digest.raw]
        with open(svc.pack_path(pack), "r+b") as f:
            f.seek(offset + size // 2)
            f.write(b"\xff" if f.read(1) != b"\xff" else b"\x00")
        with pytest.raises(ChecksumMismatch):
            await svc.read_all(digest)


async def test_packed_staged_index(tmp_path: Path) -> None:
    """Staged index rows are seen by this process only, until committed; rows still
    staged at the end are dropped (another process never saw them)."""
    svc = BACKENDS["packed, raw chunks"](tmp_path)
    assert isinstance(svc, PackedBlobService)
    big = pseudo_random(1_000_000, seed=9)
    (tmp_path / "big").write_bytes(big)
    files = [(str(tmp_path / "big"), len(big))]

    def committed(digest: B3Digest) -> bool:
        other = BACKENDS["packed, raw chunks"](tmp_path)
        assert isinstance(other, PackedBlobService)
        try:
            return bool(other._locate([digest]) or other.chunked_sync(digest))
        finally:
            other.close()

    async with svc:
        with svc.staged_index() as commit:
            small = await svc.put_many([b"staged blob", b"and another: a segment"])
            (chunked,) = await svc.ingest_files(files)
            assert isinstance(chunked, B3Digest)
            for digest, data in ((small[0], b"staged blob"), (chunked, big)):
                assert await svc.read_all(digest) == data  # seen here
                assert not committed(digest)  # not by others
            assert small[0].raw in svc.appended
            chunks = await svc.chunks(chunked)
            assert chunks and len(chunks) > 1
            packs = [p.name for p in (tmp_path / "packs").iterdir()]
            assert any(svc.segments(packs).values())  # the staged segment too
            commit()
            assert committed(small[0]) and committed(chunked)
            dropped = (await svc.put_many([b"staged, never committed"]))[0]
            assert await svc.has(dropped)
        assert not committed(dropped)
        assert not await svc.has(dropped)
        assert await svc.read_all(chunked) == big


@pytest.mark.parametrize("zstd", [None, 3], ids=["raw: chunks packed", "zstd: chunk files"])
async def test_packed_streamed_large_blob(tmp_path: Path, zstd: int | None) -> None:
    """A large blob written as a stream (NAR ingestion, gRPC Put) is cut like an imported
    file: the same chunks as the object store makes, packed unless chunks are compressed."""
    large = ObjectStoreBlobService(LocalObjectStore(tmp_path / "objects"), zstd_level=zstd)
    svc = PackedBlobService(tmp_path / "blobs.sqlite", large)
    reference = ObjectStoreBlobService(MemoryObjectStore())
    data = pseudo_random(20_000_000, seed=11)  # several flushes of chunks
    async with svc:
        writer = svc.open_write()
        for i in range(0, len(data), 999_983):  # odd pieces
            await writer.write(data[i : i + 999_983])
        digest = await writer.close()
        assert digest == B3Digest.of(data)
        assert await svc.chunks(digest) == await reference.chunks(await reference.put(data))
        chunk_files = [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]
        assert bool(chunk_files) == (zstd is not None)
        assert await svc.read_all(digest) == data
    again = PackedBlobService(tmp_path / "blobs.sqlite", large)  # what was committed
    async with again:
        assert await again.size(digest) == len(data)
        reader = await again.open_read(digest)
        assert reader is not None
        async with reader:
            await reader.seek(len(data) - 1000)
            assert await reader.read() == data[-1000:]
