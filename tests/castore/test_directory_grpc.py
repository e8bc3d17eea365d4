"""DirectoryService over a real gRPC server: raw generated stubs, statuses (SPEC A2), liars."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import grpc
import grpc.aio
import pytest

from tvix_castore import (
    EMPTY_DIGEST,
    ChecksumMismatch,
    ConfigError,
    DataCorruption,
    Directory,
    DirectoryNode,
    FileNode,
    ValidationError,
)
from tvix_castore.directoryservice import (
    DirectoryService,
    GrpcDirectoryService,
    MemoryDirectoryService,
    SqliteDirectoryService,
)
from tvix_castore.protos import castore_pb2 as cpb
from tvix_castore.protos import rpc_directory_pb2 as pb
from tvix_castore.protos import rpc_directory_pb2_grpc as pb_grpc
from tvix_castore.rpc.channel import channel_options
from tvix_castore.rpc.directory_server import MAX_DIRECTORY_MESSAGE, DirectoryServiceServicer
from tvix_castore.rpc.server import Registration, start_server
from tvix_castore.testing.fixtures import directories

FX = directories()
A, B, C, D = FX.a, FX.b, FX.c, FX.d
WITH_KEEP, COMPLICATED = FX.with_keep, FX.complicated
if TYPE_CHECKING:
    Stub: TypeAlias = pb_grpc.DirectoryServiceAsyncStub
Code = grpc.StatusCode


def _reg(servicer: pb_grpc.DirectoryServiceServicer) -> list[Registration]:
    return [
        (
            lambda s: pb_grpc.add_DirectoryServiceServicer_to_server(servicer, s),
            "tvix.castore.v1.DirectoryService",
        )
    ]


@pytest.fixture
def backend() -> MemoryDirectoryService:
    return MemoryDirectoryService()


@pytest.fixture
async def server_addr(backend: DirectoryService) -> AsyncIterator[str]:
    server, addr = await start_server("127.0.0.1:0", _reg(DirectoryServiceServicer(backend)))
    yield addr
    await server.stop(None)


@pytest.fixture
async def channel(server_addr: str) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server_addr, options=channel_options()) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    return pb_grpc.DirectoryServiceStub(channel)


@pytest.fixture
async def client(server_addr: str) -> AsyncIterator[GrpcDirectoryService]:
    svc = GrpcDirectoryService.from_url(f"grpc+http://{server_addr}")
    yield svc
    await svc.aclose()


async def get_all(
    stub: Stub, request: pb.GetDirectoryRequest
) -> tuple[list[cpb.Directory], grpc.aio.AioRpcError | None]:
    """Messages received and the error the stream ended with (if any)."""
    got: list[cpb.Directory] = []
    try:
        async for msg in stub.Get(request):
            got.append(msg)
    except grpc.aio.AioRpcError as exc:
        return got, exc
    return got, None


async def put_all(stub: Stub, msgs: list[cpb.Directory]) -> pb.PutDirectoryResponse:
    async def gen() -> AsyncIterator[cpb.Directory]:
        for msg in msgs:
            yield msg

    return await stub.Put(gen())


async def put_status(stub: Stub, msgs: list[cpb.Directory]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await put_all(stub, msgs)
    return exc.value


async def nothing_stored(svc: DirectoryService) -> bool:
    for directory in (A, B, C, D, WITH_KEEP, COMPLICATED):
        if await svc.get(directory.digest) is not None:
            return False
    return True


# --- Get ----------------------------------------------------------------------


@pytest.mark.parametrize("recursive", [False, True])
async def test_get_by_what_unset(stub: Stub, recursive: bool) -> None:
    got, err = await get_all(stub, pb.GetDirectoryRequest(recursive=recursive))
    assert got == [] and err is not None
    assert err.code() == Code.INVALID_ARGUMENT
    assert "by_what" in (err.details() or "")


@pytest.mark.parametrize("recursive", [False, True])
@pytest.mark.parametrize("length", [0, 2, 31, 33])
async def test_get_bad_digest_length(stub: Stub, recursive: bool, length: int) -> None:
    request = pb.GetDirectoryRequest(digest=bytes(length), recursive=recursive)
    assert request.WhichOneof("by_what") == "digest"  # set, even when empty
    got, err = await get_all(stub, request)
    assert got == [] and err is not None
    assert err.code() == Code.INVALID_ARGUMENT
    assert "invalid digest length" in (err.details() or "")


@pytest.mark.parametrize("recursive", [False, True])
async def test_get_unknown_root_not_found(
    stub: Stub, backend: DirectoryService, recursive: bool
) -> None:
    await backend.put(A)
    got, err = await get_all(stub, pb.GetDirectoryRequest(digest=B.digest.raw, recursive=recursive))
    assert got == [] and err is not None  # status before any message
    assert err.code() == Code.NOT_FOUND
    assert err.details() == f"directory {B.digest} not found"


async def test_get_single_and_recursive(stub: Stub, backend: DirectoryService) -> None:
    for directory in (A, B, D):
        await backend.put(directory)
    got, err = await get_all(stub, pb.GetDirectoryRequest(digest=D.digest.raw))
    assert err is None
    assert [m.SerializeToString() for m in got] == [D.encode()]
    got, err = await get_all(stub, pb.GetDirectoryRequest(digest=D.digest.raw, recursive=True))
    assert err is None
    assert [m.SerializeToString() for m in got] == [D.encode(), A.encode(), B.encode()]


# --- Put ----------------------------------------------------------------------


async def test_put_returns_root(stub: Stub, backend: DirectoryService) -> None:
    resp = await put_all(stub, [A.to_proto(), A.to_proto(), C.to_proto()])
    assert resp.root_digest == C.digest.raw
    assert await backend.get(C.digest) == C
    assert await backend.get(A.digest) == A


def _invalid_directories() -> Iterator[tuple[str, cpb.Directory, str]]:
    dn, fn, sn = cpb.DirectoryNode, cpb.FileNode, cpb.SymlinkNode
    e = EMPTY_DIGEST.raw
    yield (
        "unsorted",
        cpb.Directory(directories=[dn(name=b"b", digest=e), dn(name=b"a", digest=e)]),
        "'a': wrong sorting",
    )
    yield (
        "duplicate",
        cpb.Directory(directories=[dn(name=b"a", digest=e), dn(name=b"a", digest=e)]),
        "'a': duplicate name",
    )
    yield (
        "duplicate-across",
        cpb.Directory(directories=[dn(name=b"a", digest=e)], symlinks=[sn(name=b"a", target=b"x")]),
        "'a': duplicate name",
    )
    yield "dot", cpb.Directory(directories=[dn(name=b".", digest=e)]), "'.': invalid name"
    yield "dotdot", cpb.Directory(files=[fn(name=b"..", digest=e)]), "'..': invalid name"
    yield "nul", cpb.Directory(symlinks=[sn(name=b"\0", target=b"x")]), "invalid name"
    yield (
        "slash",
        cpb.Directory(symlinks=[sn(name=b"foo/bar", target=b"x")]),
        "'foo/bar': invalid name",
    )
    yield "long", cpb.Directory(symlinks=[sn(name=b"X" * 500, target=b"x")]), "name too long"
    yield (
        "digest",
        cpb.Directory(directories=[dn(name=b"a", digest=b"\0\0")]),
        "'a': invalid digest",
    )
    yield (
        "target",
        cpb.Directory(symlinks=[sn(name=b"a", target=b"")]),
        "'a': invalid symlink target",
    )
    yield "empty-name", cpb.Directory(files=[fn(name=b"", digest=e)]), "invalid name"


@pytest.mark.parametrize(
    ("msg", "needle"), [pytest.param(m, n, id=i) for i, m, n in _invalid_directories()]
)
async def test_put_invalid_directory(
    stub: Stub, backend: DirectoryService, msg: cpb.Directory, needle: str
) -> None:
    err = await put_status(stub, [A.to_proto(), msg])
    assert err.code() == Code.INVALID_ARGUMENT
    details = err.details() or ""
    assert "directory #1 of the stream failed validation" in details
    assert needle in details
    assert await nothing_stored(backend)


@pytest.mark.parametrize(
    ("sequence", "needle"),
    [
        ([], "got no directories"),
        ([A, C, B], "disconnected"),
        ([B], "unknown directory"),
        (
            [A, Directory(directories=(DirectoryNode(b"foo", A.digest, 42),))],
            "'foo' has wrong size, specified 42, recorded 0",
        ),
        (
            [WITH_KEEP, Directory(directories=(WITH_KEEP.to_node(b"keep", "tvix-2024"),))],
            "wrong size",
        ),
    ],
    ids=["empty", "disconnected", "unknown-child", "wrong-size", "other-size-mode"],
)
async def test_put_bad_graph(
    stub: Stub, backend: DirectoryService, sequence: list[Directory], needle: str
) -> None:
    err = await put_status(stub, [d.to_proto() for d in sequence])
    assert err.code() == Code.INVALID_ARGUMENT
    assert needle in (err.details() or "")
    assert await nothing_stored(backend)


async def test_put_unknown_child_even_if_stored(stub: Stub, backend: DirectoryService) -> None:
    await backend.put(A)
    err = await put_status(stub, [B.to_proto()])
    assert err.code() == Code.INVALID_ARGUMENT
    assert await backend.get(B.digest) is None


async def test_noncanonical_wire_is_normalised(
    channel: grpc.aio.Channel, backend: DirectoryService
) -> None:
    """Unknown fields and non-canonical field order: digest of the canonical re-encoding."""
    raw_put = channel.stream_unary(
        "/tvix.castore.v1.DirectoryService/Put",
        request_serializer=lambda b: b,
        response_deserializer=pb.PutDirectoryResponse.FromString,
    )
    keep_noisy = WITH_KEEP.encode() + bytes.fromhex("2203616263")  # unknown field 4
    msg = COMPLICATED.to_proto()
    shuffled = b"".join(
        cpb.Directory(**{field: getattr(msg, field)}).SerializeToString()
        for field in ("symlinks", "files", "directories")
    )
    assert shuffled != COMPLICATED.encode()

    async def gen() -> AsyncIterator[bytes]:
        yield keep_noisy
        yield shuffled

    resp = await raw_put(gen())
    assert resp.root_digest == COMPLICATED.digest.raw
    raw_get = channel.unary_stream(
        "/tvix.castore.v1.DirectoryService/Get",
        request_serializer=pb.GetDirectoryRequest.SerializeToString,
        response_deserializer=lambda b: b,
    )
    request = pb.GetDirectoryRequest(digest=COMPLICATED.digest.raw, recursive=True)
    assert [m async for m in raw_get(request)] == [COMPLICATED.encode(), WITH_KEEP.encode()]


async def test_undecodable_message(channel: grpc.aio.Channel, backend: DirectoryService) -> None:
    raw_put = channel.stream_unary(
        "/tvix.castore.v1.DirectoryService/Put",
        request_serializer=lambda b: b,
        response_deserializer=pb.PutDirectoryResponse.FromString,
    )

    async def gen() -> AsyncIterator[bytes]:
        yield A.encode()
        yield b"\x0a\xff"

    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await raw_put(gen())
    assert exc.value.code() != Code.OK
    assert await nothing_stored(backend)


async def test_client_cancel_persists_nothing(
    backend: DirectoryService, client: GrpcDirectoryService
) -> None:
    putter = client.put_multiple_start()
    await putter.put(A)
    await putter.put(B)
    await putter.abort()
    assert await nothing_stored(backend)
    assert await client.put(A) == A.digest  # the channel is fine afterwards


async def test_server_rejection_reaches_client(client: GrpcDirectoryService) -> None:
    """Server counts tvix-2024 sizes, the client the documented ones: the server says no."""
    backend = MemoryDirectoryService()
    backend.size_mode = "tvix-2024"
    server, addr = await start_server("127.0.0.1:0", _reg(DirectoryServiceServicer(backend)))
    other = GrpcDirectoryService.from_url(f"grpc+http://{addr}")
    try:
        with pytest.raises(ValidationError, match=r"INVALID_ARGUMENT.*wrong size"):
            async with other.put_multiple_start() as putter:
                await putter.put(WITH_KEEP)
                await putter.put(COMPLICATED)
                await putter.close()
        assert await nothing_stored(backend)
        # with matching modes on both ends it works
        fx24 = directories("tvix-2024")
        agreeing = GrpcDirectoryService.from_url(f"grpc+http://{addr}", size_mode="tvix-2024")
        try:
            async with agreeing.put_multiple_start() as putter:
                await putter.put(fx24.with_keep)
                await putter.put(fx24.complicated)
                assert await putter.close() == fx24.complicated.digest
            got = [d async for d in agreeing.get_recursive(fx24.complicated.digest)]
            assert got == [fx24.complicated, fx24.with_keep]
            # a documented-mode client refuses the tvix-2024 closure it receives
            with pytest.raises(DataCorruption, match="wrong size"):
                _ = [d async for d in other.get_recursive(fx24.complicated.digest)]
        finally:
            await agreeing.aclose()
    finally:
        await other.aclose()
        await server.stop(None)


# --- message size limit ---------------------------------------------------------


def huge_directory() -> Directory:
    """A valid Directory whose encoding exceeds 4 MiB."""
    files = tuple(FileNode(b"%06d" % i + b"x" * 249, EMPTY_DIGEST, 1) for i in range(14_500))
    directory = Directory(files=files)
    assert len(directory.encode()) >= MAX_DIRECTORY_MESSAGE
    return directory


async def test_oversized_directories_are_never_sent(
    stub: Stub, backend: DirectoryService, client: GrpcDirectoryService
) -> None:
    huge = huge_directory()
    with pytest.raises(ValidationError, match="message limit"):
        await client.put(huge)
    with pytest.raises(ValidationError, match="too large"):  # nor stored locally
        await backend.put(huge)
    with pytest.raises(ValidationError, match="too large"):
        async with backend.put_multiple_start() as putter:
            await putter.put(huge)
    _, err = await get_all(stub, pb.GetDirectoryRequest(digest=huge.digest.raw))
    assert err is not None and err.code() == Code.NOT_FOUND


# --- clients never trust the server -------------------------------------------


class Liar(pb_grpc.DirectoryServiceServicer):
    """Answers every Get with ``replies`` and every Put with ``root``."""

    def __init__(self) -> None:
        self.replies: list[cpb.Directory] = []
        self.root = b""
        self.status: grpc.StatusCode | None = None

    async def Get(
        self, request: pb.GetDirectoryRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[cpb.Directory]:
        for msg in self.replies:
            yield msg
        if self.status is not None:
            await context.abort(self.status, "liar gives up")

    async def Put(
        self,
        request_iterator: AsyncIterator[cpb.Directory],
        context: grpc.aio.ServicerContext[object, object],
    ) -> pb.PutDirectoryResponse:
        async for _ in request_iterator:
            pass
        return pb.PutDirectoryResponse(root_digest=self.root)


@pytest.fixture
async def liar() -> AsyncIterator[tuple[Liar, GrpcDirectoryService]]:
    servicer = Liar()
    server, addr = await start_server("127.0.0.1:0", _reg(servicer))
    svc = GrpcDirectoryService.from_url(f"grpc+http://{addr}")
    yield servicer, svc
    await svc.aclose()
    await server.stop(None)


async def test_liar_wrong_directory(liar: tuple[Liar, GrpcDirectoryService]) -> None:
    servicer, svc = liar
    servicer.replies = [B.to_proto()]
    with pytest.raises(ChecksumMismatch):
        await svc.get(D.digest)
    assert await svc.get(B.digest) == B
    servicer.replies = [B.to_proto(), B.to_proto()]
    with pytest.raises(DataCorruption, match="more than one"):
        await svc.get(B.digest)
    servicer.replies = []
    assert await svc.get(B.digest) is None  # an empty answer is "absent"


@pytest.mark.parametrize(
    ("root", "replies", "needle"),
    [
        (D, [B, A], "unexpected"),  # not the root
        (C, [C, B], "unexpected"),  # not referenced
        (B, [B, A, A], "unexpected|twice"),  # duplicate
        (D, [D, A], "premature end"),  # B never came
        (B, [B], "premature end"),
    ],
    ids=["wrong-root", "unreferenced", "duplicate", "missing-child", "missing-leaf"],
)
async def test_liar_bad_closure(
    liar: tuple[Liar, GrpcDirectoryService], root: Directory, replies: list[Directory], needle: str
) -> None:
    servicer, svc = liar
    servicer.replies = [d.to_proto() for d in replies]
    with pytest.raises(DataCorruption, match=needle):
        _ = [d async for d in svc.get_recursive(root.digest)]


async def test_liar_wrong_size_in_closure(liar: tuple[Liar, GrpcDirectoryService]) -> None:
    servicer, svc = liar
    parent = Directory(directories=(DirectoryNode(b"foo", A.digest, 42),))
    servicer.replies = [parent.to_proto(), A.to_proto()]
    got: list[Directory] = []
    with pytest.raises(DataCorruption, match="wrong size"):
        async for directory in svc.get_recursive(parent.digest):
            got.append(directory)
    assert got == [parent]  # yielded only what was verified


async def test_liar_invalid_directory(liar: tuple[Liar, GrpcDirectoryService]) -> None:
    servicer, svc = liar
    e = EMPTY_DIGEST.raw
    servicer.replies = [
        cpb.Directory(files=[cpb.FileNode(name=b"b", digest=e), cpb.FileNode(name=b"a", digest=e)])
    ]
    with pytest.raises(DataCorruption, match="invalid directory"):
        await svc.get(B.digest)
    with pytest.raises(DataCorruption, match="invalid directory"):
        _ = [d async for d in svc.get_recursive(B.digest)]


async def test_liar_status_mid_stream(liar: tuple[Liar, GrpcDirectoryService]) -> None:
    servicer, svc = liar
    servicer.replies = [B.to_proto()]
    servicer.status = Code.NOT_FOUND  # a child vanished: not "absent", an error
    with pytest.raises(Exception, match="NOT_FOUND") as exc:
        _ = [d async for d in svc.get_recursive(B.digest)]
    assert not isinstance(exc.value, grpc.aio.AioRpcError)
    servicer.replies = []
    assert [d async for d in svc.get_recursive(B.digest)] == []  # NOT_FOUND first: absent
    servicer.status = Code.DATA_LOSS
    with pytest.raises(DataCorruption, match="liar gives up"):
        await svc.get(B.digest)


async def test_liar_wrong_put_root(liar: tuple[Liar, GrpcDirectoryService]) -> None:
    servicer, svc = liar
    servicer.root = A.digest.raw
    with pytest.raises(DataCorruption, match="server reports root"):
        await svc.put(WITH_KEEP)
    servicer.root = WITH_KEEP.digest.raw
    assert await svc.put(WITH_KEEP) == WITH_KEEP.digest


# --- storage corruption is DATA_LOSS ------------------------------------------


async def _sqlite_served(path: Path) -> tuple[grpc.aio.Server, str, SqliteDirectoryService]:
    backend = SqliteDirectoryService(path)
    server, addr = await start_server("127.0.0.1:0", _reg(DirectoryServiceServicer(backend)))
    return server, addr, backend


async def test_sqlite_changed_value_is_data_loss(tmp_path: Path) -> None:
    db = tmp_path / "d.sqlite"
    server, addr, backend = await _sqlite_served(db)
    svc = GrpcDirectoryService.from_url(f"grpc+http://{addr}")
    try:
        await svc.put(WITH_KEEP)
        await svc.put(COMPLICATED)
        with sqlite3.connect(db) as conn:  # someone edits the stored bytes of the child
            conn.execute(
                "UPDATE directories SET data = ? WHERE digest = ?",
                (WITH_KEEP.encode().replace(b".keep", b".kept"), WITH_KEEP.digest.raw),
            )
        conn.close()
        async with grpc.aio.insecure_channel(addr, options=channel_options()) as ch:
            stub: Stub = pb_grpc.DirectoryServiceStub(ch)
            got, err = await get_all(stub, pb.GetDirectoryRequest(digest=WITH_KEEP.digest.raw))
            assert got == [] and err is not None and err.code() == Code.DATA_LOSS
            request = pb.GetDirectoryRequest(digest=COMPLICATED.digest.raw, recursive=True)
            got, err = await get_all(stub, request)
            assert [m.SerializeToString() for m in got] == [COMPLICATED.encode()]
            assert err is not None and err.code() == Code.DATA_LOSS  # in-stream
        with pytest.raises(DataCorruption):
            await svc.get(WITH_KEEP.digest)
        with pytest.raises(DataCorruption):
            _ = [d async for d in svc.get_recursive(COMPLICATED.digest)]
        assert await svc.get(COMPLICATED.digest) == COMPLICATED
    finally:
        await svc.aclose()
        await server.stop(None)
        await backend.aclose()


@pytest.mark.parametrize("where", ["value", "page"])
async def test_sqlite_changed_file_bytes_is_data_loss(tmp_path: Path, where: str) -> None:
    db = tmp_path / "d.sqlite"
    setup = SqliteDirectoryService(db)
    await setup.put(WITH_KEEP)
    await setup.put(COMPLICATED)
    await setup.aclose()  # checkpoints the WAL into the main file
    data = bytearray(db.read_bytes())
    if where == "value":
        at = data.find(b".keep")
        assert at > 0
        while at > 0:
            data[at + 4] ^= 0x01
            at = data.find(b".keep", at + 1)
    else:
        page_size = int.from_bytes(data[16:18], "big")
        data[page_size] = 0x77  # page 2's b-tree page type
    db.write_bytes(bytes(data))
    server, addr, backend = await _sqlite_served(db)
    try:
        async with grpc.aio.insecure_channel(addr, options=channel_options()) as ch:
            stub: Stub = pb_grpc.DirectoryServiceStub(ch)
            for digest in (WITH_KEEP.digest, COMPLICATED.digest):
                for recursive in (False, True):
                    request = pb.GetDirectoryRequest(digest=digest.raw, recursive=recursive)
                    got, err = await get_all(stub, request)
                    assert got == [] and err is not None
                    assert err.code() == Code.DATA_LOSS, err.details()
    finally:
        await server.stop(None)
        await backend.aclose()


# --- addresses ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["grpc+http://", "grpc+unix://host/sock", "http://x:1", "sqlite:///x"]
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        GrpcDirectoryService.from_url(url)


def test_package_exports_grpc_lazily() -> None:
    import subprocess
    import sys

    code = (
        "import sys, tvix_castore.directoryservice as d\n"
        "assert 'grpc' not in sys.modules\n"
        "assert d.GrpcDirectoryService.__name__ == 'GrpcDirectoryService'\n"
        "assert 'grpc' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
