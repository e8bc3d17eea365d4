"""One conformance suite for every DirectoryService backend, gRPC included (B §2.6–2.7, §3.2).

The object-store backends (B §7.3) keep closures by their root only, so
there a Directory stored only inside another closure is not found, and
``put`` of a single Directory with subdirectories is refused: the tests
state what those backends answer instead (``roots_only``, ``refuses_non_leaf``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from tests.servers import S3
from tvix_castore import (
    B3Digest,
    ClosureRequired,
    ClosureVerifier,
    Directory,
    DirectoryGraphError,
    DirectoryNode,
    SymlinkNode,
)
from tvix_castore.directoryservice import (
    DirectoryService,
    GrpcDirectoryService,
    MemoryDirectoryService,
    SqliteDirectoryService,
)
from tvix_castore.packstore import PackBlobService
from tvix_castore.packstore.directories import PackDirectoryService
from tvix_castore.protos import rpc_directory_pb2_grpc as pb_grpc
from tvix_castore.registry import directory_service_from_url
from tvix_castore.rpc.directory_server import DirectoryServiceServicer
from tvix_castore.rpc.server import Registration, start_server
from tvix_castore.testing.fixtures import directories

FX = directories()
A, B, C, D = FX.a, FX.b, FX.c, FX.d
WITH_KEEP, COMPLICATED = FX.with_keep, FX.complicated
ALL = {"a": A, "b": B, "c": C, "d": D, "with_keep": WITH_KEEP, "complicated": COMPLICATED}


def broken_parent() -> Directory:
    """{foo -> A} with a size 42 too big."""
    return Directory(directories=(DirectoryNode(b"foo", A.digest, A.size() + 42),))


def registration(backend: DirectoryService) -> list[Registration]:
    servicer = DirectoryServiceServicer(backend)
    return [
        (
            lambda s: pb_grpc.add_DirectoryServiceServicer_to_server(servicer, s),
            "tvix.castore.v1.DirectoryService",
        )
    ]


@asynccontextmanager
async def served(backend: DirectoryService, listen: str) -> AsyncIterator[GrpcDirectoryService]:
    """A real gRPC server on loopback (or a unix socket) and a client to it."""
    server, addr = await start_server(listen, registration(backend))
    url = f"grpc+unix://{addr[5:]}" if addr.startswith("unix:") else f"grpc+http://{addr}"
    client = GrpcDirectoryService.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()
        await server.stop(None)
        await backend.aclose()


Factory = Callable[[Path], DirectoryService]

BACKENDS: dict[str, Factory] = {
    "memory": lambda _: MemoryDirectoryService(),
    "sqlite": lambda p: SqliteDirectoryService(p / "dirs.sqlite"),
    "packstore": lambda p: PackDirectoryService(PackBlobService(p / "store"), owns=True),
    "objectstore+memory": lambda _: directory_service_from_url("objectstore+memory:///"),
    "objectstore+file": lambda p: directory_service_from_url(f"objectstore+file://{p}/objects"),
}
# Closures by root only (B §7.3): directly, or behind a gRPC server.
ROOTS_ONLY = {"objectstore+memory", "objectstore+file", "objectstore+s3", "grpc->objectstore"}
# ... and refusing put() of a non-leaf Directory. (A gRPC client's put() sends the
# children's closures along, so behind a server such a put works.)
REFUSES_NON_LEAF = ROOTS_ONLY - {"grpc->objectstore"}


@pytest.fixture(
    params=[
        *sorted(BACKENDS),
        "postgres",
        "objectstore+s3",
        "grpc->memory",
        "grpc->sqlite",
        "grpc->packstore",
        "grpc->objectstore",
        "grpc-unix",
    ]
)
async def svc(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DirectoryService]:
    name: str = request.param
    if name == "postgres":  # (a real PostgreSQL, a schema of its own)
        url = request.getfixturevalue("postgres").fresh_url()
        async with directory_service_from_url(url) as service:
            yield service
    elif name == "objectstore+s3":  # (moto's S3 server, a prefix of its own)
        s3: S3 = request.getfixturevalue("s3")
        async with directory_service_from_url(s3.fresh_url()) as service:
            yield service
    elif name == "grpc->objectstore":
        backend = directory_service_from_url(f"objectstore+file://{tmp_path}/objects")
        async with served(backend, "127.0.0.1:0") as client:
            yield client
    elif name == "grpc->memory":
        async with served(MemoryDirectoryService(), "127.0.0.1:0") as client:
            yield client
    elif name == "grpc->sqlite":
        async with served(SqliteDirectoryService(tmp_path / "d.sqlite"), "127.0.0.1:0") as client:
            yield client
    elif name == "grpc->packstore":
        async with served(BACKENDS["packstore"](tmp_path), "127.0.0.1:0") as client:
            yield client
    elif name == "grpc-unix":
        async with served(SqliteDirectoryService(tmp_path / "d.sqlite"), str(tmp_path / "s")) as c:
            yield c
    else:
        async with BACKENDS[name](tmp_path) as service:
            yield service


@pytest.fixture
def roots_only(request: pytest.FixtureRequest) -> bool:
    """Whether the backend finds closure roots only (B §7.3)."""
    return request.node.callspec.params["svc"] in ROOTS_ONLY


@pytest.fixture
def refuses_non_leaf(request: pytest.FixtureRequest) -> bool:
    """Whether the backend refuses ``put`` of a Directory with subdirectories (B §7.3)."""
    return request.node.callspec.params["svc"] in REFUSES_NON_LEAF


async def upload(svc: DirectoryService, dirs: list[Directory]) -> B3Digest:
    async with svc.put_multiple_start() as putter:
        for directory in dirs:
            await putter.put(directory)
        return await putter.close()


async def closure(svc: DirectoryService, root: B3Digest) -> list[Directory]:
    return [d async for d in svc.get_recursive(root)]


async def stored(svc: DirectoryService) -> set[str]:
    """Which fixtures (and the broken parent) the service holds."""
    names = {name for name, d in ALL.items() if await svc.get(d.digest) is not None}
    if await svc.get(broken_parent().digest) is not None:
        names.add("broken")
    return names


# --- uploads, leaves -> root (B §3.2 upload vectors) -------------------------


@pytest.mark.parametrize(
    ("sequence", "root", "kept"),
    [
        (["a"], "a", {"a"}),
        (["a", "b"], "b", {"a", "b"}),
        (["a", "a", "c"], "c", {"a", "c"}),
        (["a", "c"], "c", {"a", "c"}),
        (["a", "b", "d"], "d", {"a", "b", "d"}),
        (["a", "b", "a", "d"], "d", {"a", "b", "d"}),
        (["with_keep", "complicated"], "complicated", {"with_keep", "complicated"}),
    ],
)
async def test_upload_ok(
    svc: DirectoryService, sequence: list[str], root: str, kept: set[str], roots_only: bool
) -> None:
    assert await upload(svc, [ALL[n] for n in sequence]) == ALL[root].digest
    if roots_only:  # the closure is one object, found by its root only
        kept = {root}
    assert await stored(svc) == kept
    for name in kept:
        assert await svc.get(ALL[name].digest) == ALL[name]


async def test_upload_disconnected_fails_at_end(svc: DirectoryService) -> None:
    putter = svc.put_multiple_start()
    await putter.put(A)
    await putter.put(C)
    await putter.put(B)  # valid so far: B's child A was sent
    with pytest.raises(DirectoryGraphError, match="disconnected"):
        await putter.close()
    assert await stored(svc) == set()


async def test_upload_unknown_child_fails_immediately(svc: DirectoryService) -> None:
    await upload(svc, [A])  # in the store already: does not count for another stream
    putter = svc.put_multiple_start()
    with pytest.raises(DirectoryGraphError, match="unknown directory"):
        await putter.put(B)
    await putter.abort()
    assert await stored(svc) == {"a"}


async def test_upload_wrong_size_fails(svc: DirectoryService) -> None:
    putter = svc.put_multiple_start()
    await putter.put(A)
    with pytest.raises(DirectoryGraphError, match="wrong size"):
        await putter.put(broken_parent())
    await putter.abort()
    assert await stored(svc) == set()


async def test_rejected_put_leaves_putter_usable(svc: DirectoryService, roots_only: bool) -> None:
    async with svc.put_multiple_start() as putter:
        await putter.put(A)
        with pytest.raises(DirectoryGraphError):
            await putter.put(broken_parent())
        await putter.put(B)
        assert await putter.close() == B.digest
    assert await stored(svc) == ({"b"} if roots_only else {"a", "b"})
    assert await closure(svc, B.digest) == [B, A]


async def test_upload_empty_fails(svc: DirectoryService) -> None:
    with pytest.raises(DirectoryGraphError, match="no directories"):
        await upload(svc, [])


async def test_abort_persists_nothing(svc: DirectoryService) -> None:
    with pytest.raises(RuntimeError):
        async with svc.put_multiple_start() as putter:
            await putter.put(A)
            await putter.put(B)
            raise RuntimeError("client went away")
    assert await stored(svc) == set()


async def test_putter_cannot_be_reused(svc: DirectoryService) -> None:
    putter = svc.put_multiple_start()
    await putter.put(A)
    assert await putter.close() == A.digest
    with pytest.raises(DirectoryGraphError, match="closed"):
        await putter.close()
    with pytest.raises(DirectoryGraphError, match="closed"):
        await putter.put(B)


async def test_reupload_is_idempotent(svc: DirectoryService) -> None:
    for _ in range(2):
        assert await upload(svc, [A, B, D]) == D.digest
    assert await closure(svc, D.digest) == [D, A, B]


async def test_concurrent_uploads(svc: DirectoryService, roots_only: bool) -> None:
    one, two = svc.put_multiple_start(), svc.put_multiple_start()
    await one.put(A)
    await two.put(WITH_KEEP)
    await one.put(B)
    await two.put(COMPLICATED)
    roots = await asyncio.gather(one.close(), two.close())
    assert list(roots) == [B.digest, COMPLICATED.digest]
    if roots_only:
        assert await stored(svc) == {"b", "complicated"}
    else:
        assert await stored(svc) == {"a", "b", "with_keep", "complicated"}
    assert await closure(svc, COMPLICATED.digest) == [COMPLICATED, WITH_KEEP]


# --- downloads ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("upload_seq", "root", "expected"),
    [
        (["a"], "a", ["a"]),
        (["a", "b"], "b", ["b", "a"]),
        (["a", "c"], "c", ["c", "a"]),
        (["a", "b", "d"], "d", ["d", "a", "b"]),
        (["a", "b", "d"], "b", ["b", "a"]),  # an inner directory is a root too
        (["with_keep", "complicated"], "complicated", ["complicated", "with_keep"]),
    ],
)
async def test_get_recursive_order(
    svc: DirectoryService,
    upload_seq: list[str],
    root: str,
    expected: list[str],
    roots_only: bool,
) -> None:
    await upload(svc, [ALL[n] for n in upload_seq])
    if roots_only and root != upload_seq[-1]:
        expected = []  # ... except where closures are found by their root only
    assert await closure(svc, ALL[root].digest) == [ALL[n] for n in expected]


async def test_unknown_is_absent(svc: DirectoryService) -> None:
    assert await svc.get(B.digest) is None
    assert await closure(svc, B.digest) == []
    await upload(svc, [A])
    assert await svc.get(B.digest) is None
    assert await closure(svc, B.digest) == []


async def test_get_many(svc: DirectoryService, roots_only: bool) -> None:
    await upload(svc, [A, B, D])
    absent = C.digest
    found = await svc.get_many([D.digest, absent, A.digest, D.digest])
    # (where closures are found by their root only, A inside D is absent)
    assert found == ({D.digest: D} if roots_only else {D.digest: D, A.digest: A})
    assert await svc.get_many([]) == {}


async def test_get_recursive_can_stop_early(svc: DirectoryService, roots_only: bool) -> None:
    await upload(svc, [A, B, D])
    async for directory in svc.get_recursive(D.digest):
        assert directory == D
        break
    assert await svc.get(B.digest) == (None if roots_only else B)
    assert await svc.get(D.digest) == D


async def test_wide_and_deep_closures(svc: DirectoryService) -> None:
    leaves = [Directory(symlinks=(SymlinkNode(b"%05d" % i, b"target"),)) for i in range(600)]
    wide = Directory(directories=tuple(leaf.to_node(b"%05d" % i) for i, leaf in enumerate(leaves)))
    chain = [A]
    for _ in range(300):
        chain.append(Directory(directories=(chain[-1].to_node(b"sub"),)))
    root = Directory(directories=(wide.to_node(b"wide"), chain[-1].to_node(b"zdeep")))
    assert await upload(svc, [*leaves, wide, *chain, root]) == root.digest
    got = await closure(svc, root.digest)
    assert got[:3] == [root, wide, chain[-1]]
    assert got[3:603] == leaves  # breadth-first: wide's children before the chain goes deeper
    assert len(got) == 2 + 600 + 301
    verifier = ClosureVerifier(root.digest)
    for directory in got:
        verifier.add(directory)
    assert verifier.finalize() is not None


# --- single puts -------------------------------------------------------------


async def test_put_single(svc: DirectoryService, refuses_non_leaf: bool) -> None:
    assert await svc.put(A) == A.digest
    if refuses_non_leaf:  # a Directory with subdirectories only comes with its closure
        for directory in (B, D, COMPLICATED):
            with pytest.raises(ClosureRequired, match="subdirectories"):
                await svc.put(directory)
        assert await svc.put(WITH_KEEP) == WITH_KEEP.digest  # a leaf
        assert await stored(svc) == {"a", "with_keep"}
        assert await upload(svc, [A, B, D]) == D.digest  # the closure way
        assert await closure(svc, D.digest) == [D, A, B]
        return
    assert await svc.put(B) == B.digest
    assert await svc.put(D) == D.digest
    assert await svc.put(WITH_KEEP) == WITH_KEEP.digest
    assert await svc.put(COMPLICATED) == COMPLICATED.digest
    assert await closure(svc, D.digest) == [D, A, B]
    assert await svc.get(COMPLICATED.digest) == COMPLICATED


async def test_put_single_missing_child_fails(
    svc: DirectoryService, refuses_non_leaf: bool
) -> None:
    with pytest.raises(ClosureRequired if refuses_non_leaf else DirectoryGraphError) as err:
        await svc.put(B)
    if not refuses_non_leaf:
        assert "unknown directory" in str(err.value)
    assert await stored(svc) == set()


async def test_put_single_wrong_size_fails(svc: DirectoryService, refuses_non_leaf: bool) -> None:
    await svc.put(A)
    with pytest.raises(DirectoryGraphError, match="subdirectories" if refuses_non_leaf else "size"):
        await svc.put(broken_parent())
    assert await stored(svc) == {"a"}
