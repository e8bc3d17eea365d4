"""The object-store DirectoryService's own rules (B §7.3), beyond the conformance suite.

The layout is checked by reading written objects by hand (zstd, then
``u32`` big-endian length-prefixed frames), and damaged or foreign objects
are written straight into the object store underneath the service. Over
``objectstore+memory``, ``objectstore+file`` and moto's S3.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
import zstandard

from tests.servers import S3
from tvix_castore import (
    B3Digest,
    ClosureRequired,
    DataCorruption,
    Directory,
    DirectoryNode,
)
from tvix_castore.cloudstore import CloudObjectStore
from tvix_castore.directoryservice.objectstore import (
    MAX_FRAME_LENGTH,
    ObjectStoreDirectoryService,
    closure_key,
    decode_frames,
)
from tvix_castore.objectstore import LocalObjectStore
from tvix_castore.protos import rpc_directory_pb2 as pb
from tvix_castore.protos import rpc_directory_pb2_grpc as pb_grpc
from tvix_castore.registry import directory_service_from_url
from tvix_castore.rpc.directory_server import DirectoryServiceServicer
from tvix_castore.rpc.server import start_server
from tvix_castore.rpc.status import code_for
from tvix_castore.testing.fixtures import directories

FX = directories()
A, B, C, D = FX.a, FX.b, FX.c, FX.d
WITH_KEEP, COMPLICATED = FX.with_keep, FX.complicated
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.fixture(params=["objectstore+memory", "objectstore+file", "objectstore+s3"])
async def svc(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[ObjectStoreDirectoryService]:
    name: str = request.param
    if name == "objectstore+memory":
        url = "objectstore+memory:///"
    elif name == "objectstore+file":
        url = f"objectstore+file://{tmp_path}/objects"
    else:
        s3: S3 = request.getfixturevalue("s3")
        url = s3.fresh_url()
    service = directory_service_from_url(url)
    assert isinstance(service, ObjectStoreDirectoryService)
    async with service:
        yield service


async def upload(svc: ObjectStoreDirectoryService, dirs: list[Directory]) -> B3Digest:
    async with svc.put_multiple_start() as putter:
        for directory in dirs:
            await putter.put(directory)
        return await putter.close()


def frames_by_hand(obj: bytes) -> list[bytes]:
    """An object's frames, decoded without the service's code."""
    assert obj.startswith(ZSTD_MAGIC)
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(obj)
    frames: list[bytes] = []
    pos = 0
    while pos < len(raw):
        length = int.from_bytes(raw[pos : pos + 4], "big")
        frames.append(raw[pos + 4 : pos + 4 + length])
        pos += 4 + length
    assert pos == len(raw)
    return frames


def object_of(frames: list[bytes]) -> bytes:
    """A closure object made by hand: zstd of length-prefixed frames."""
    raw = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
    return zstandard.ZstdCompressor().compress(raw)


def dir_keys(svc: ObjectStoreDirectoryService) -> list[str] | None:
    """Every key under ``dirs/`` where the store can list them (file, S3)."""
    store = svc.store
    if isinstance(store, LocalObjectStore):
        base = store.root
        return sorted(
            str(Path(dirpath, f).relative_to(base))
            for dirpath, _, files in os.walk(base / "dirs")
            for f in files
        )
    if isinstance(store, CloudObjectStore):
        return sorted(key for key, _, _ in store.list_sync("dirs/"))
    return None


# -- layout ---------------------------------------------------------------------------------------
async def test_one_object_per_root_zstd_frames_breadth_first_deduplicated(
    svc: ObjectStoreDirectoryService,
) -> None:
    # D = {a -> A, b -> B = {a -> A}}: A is reached twice but stored once.
    assert await upload(svc, [A, B, D]) == D.digest
    key = closure_key(D.digest)
    assert key == f"dirs/b3/{D.digest.hex()[:4]}/{D.digest.hex()}"
    obj = svc.store.get_sync(key)
    assert obj is not None
    frames = frames_by_hand(obj)
    assert frames == [D.encode(), A.encode(), B.encode()]  # root first, breadth-first, once each
    assert [B3Digest.of(f) for f in frames] == [D.digest, A.digest, B.digest]
    assert frames[1] == b""  # (the empty Directory: a zero-length frame)
    listed = dir_keys(svc)
    if listed is not None:  # nothing but the root's object
        assert listed == [key]
    if isinstance(svc.store, LocalObjectStore):
        assert (svc.store.root / key).read_bytes() == obj
    assert decode_frames(key, obj) == [D, A, B]


async def test_a_deeper_closure_is_stored_breadth_first(svc: ObjectStoreDirectoryService) -> None:
    root = Directory(directories=(D.to_node(b"d"), COMPLICATED.to_node(b"z")))
    await upload(svc, [A, B, D, WITH_KEEP, COMPLICATED, root])
    obj = svc.store.get_sync(closure_key(root.digest))
    assert obj is not None
    order = [root, D, COMPLICATED, A, B, WITH_KEEP]
    assert frames_by_hand(obj) == [d.encode() for d in order]
    assert [d async for d in svc.get_recursive(root.digest)] == order


async def test_written_only_if_absent(svc: ObjectStoreDirectoryService) -> None:
    # An object already there (here: the same closure in another valid order) stays as it is.
    key = closure_key(D.digest)
    theirs = object_of([D.encode(), B.encode(), A.encode()])
    svc.store.put_sync(key, theirs)
    local = svc.store.root / key if isinstance(svc.store, LocalObjectStore) else None
    before = local.stat().st_ino if local is not None else None
    assert await upload(svc, [A, B, D]) == D.digest
    assert svc.store.get_sync(key) == theirs
    if local is not None:
        assert local.stat().st_ino == before  # not even replaced by the same bytes
    # ... and is read back in its stored order (any root-first order is valid).
    assert [d async for d in svc.get_recursive(D.digest)] == [D, B, A]


async def test_inner_directories_are_found_by_their_own_root_only(
    svc: ObjectStoreDirectoryService,
) -> None:
    await upload(svc, [A, B, D])
    assert await svc.get(B.digest) is None
    assert [d async for d in svc.get_recursive(B.digest)] == []
    await upload(svc, [A, B])  # B as a root of its own
    assert await svc.get(B.digest) == B
    assert [d async for d in svc.get_recursive(B.digest)] == [B, A]


# -- single puts ----------------------------------------------------------------------------------
async def test_a_leaf_can_be_put_alone(svc: ObjectStoreDirectoryService) -> None:
    assert await svc.put(WITH_KEEP) == WITH_KEEP.digest
    obj = svc.store.get_sync(closure_key(WITH_KEEP.digest))
    assert obj is not None and frames_by_hand(obj) == [WITH_KEEP.encode()]
    assert await svc.get(WITH_KEEP.digest) == WITH_KEEP


async def test_a_non_leaf_put_alone_is_refused_and_writes_nothing(
    svc: ObjectStoreDirectoryService,
) -> None:
    await svc.put(A)
    with pytest.raises(ClosureRequired, match="subdirectories") as err:
        await svc.put(B)
    assert code_for(err.value) == grpc.StatusCode.INVALID_ARGUMENT  # (rpc.status's one table)
    assert svc.store.get_sync(closure_key(B.digest)) is None
    assert await svc.get(B.digest) is None


# -- damaged and foreign objects ------------------------------------------------------------------
def _non_canonical(d: Directory) -> bytes:
    return d.encode() + b"\x20\x01"  # an unknown field 4: decodes, but is not canonical


BROKEN_PARENT = Directory(directories=(DirectoryNode(b"foo", A.digest, A.size() + 42),))

# name -> (object stored under D's key, whether its first frame is already bad)
DAMAGED: dict[str, tuple[bytes, bool]] = {
    "not zstd": (b"this is not zstd at all", True),
    # (one block: cut, it decodes to nothing at all)
    "truncated zstd": (object_of([D.encode(), A.encode(), B.encode()])[:-3], True),
    "empty": (object_of([]), True),
    "length cut short": (zstandard.ZstdCompressor().compress(b"\x00\x00"), True),
    "frame past the end": (
        zstandard.ZstdCompressor().compress(b"\x00\x00\x00\x64" + D.encode()),
        True,
    ),
    "frame over the limit": (
        zstandard.ZstdCompressor().compress((MAX_FRAME_LENGTH + 1).to_bytes(4, "big")),
        True,
    ),
    "not a directory": (object_of([b"\xff\xff\xff"]), True),
    "not canonical": (object_of([_non_canonical(D), A.encode(), B.encode()]), True),
    "another root first": (object_of([B.encode(), A.encode()]), True),
    "a child missing": (object_of([D.encode(), A.encode()]), False),
    "a foreign frame": (object_of([D.encode(), A.encode(), B.encode(), C.encode()]), False),
    "a frame twice": (object_of([D.encode(), A.encode(), A.encode(), B.encode()]), False),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
async def test_damaged_or_foreign_bytes_are_data_corruption(
    svc: ObjectStoreDirectoryService, case: str
) -> None:
    obj, first_bad = DAMAGED[case]
    svc.store.put_sync(closure_key(D.digest), obj)
    got: list[Directory] = []
    with pytest.raises(DataCorruption, match="is damaged"):
        async for directory in svc.get_recursive(D.digest):
            got.append(directory)
    assert got == [D, A, B][: len(got)]  # what came before the error is right
    if first_bad:
        with pytest.raises(DataCorruption):
            await svc.get(D.digest)
    else:
        assert await svc.get(D.digest) == D  # (only the root's frame is read, and verified)


async def test_a_wrong_size_edge_is_data_corruption(svc: ObjectStoreDirectoryService) -> None:
    svc.store.put_sync(
        closure_key(BROKEN_PARENT.digest), object_of([BROKEN_PARENT.encode(), A.encode()])
    )
    with pytest.raises(DataCorruption, match="wrong size"):
        _ = [d async for d in svc.get_recursive(BROKEN_PARENT.digest)]


# -- over gRPC ------------------------------------------------------------------------------------
async def test_grpc_statuses(tmp_path: Path) -> None:
    backend = directory_service_from_url(f"objectstore+file://{tmp_path}/objects")
    assert isinstance(backend, ObjectStoreDirectoryService)
    servicer = DirectoryServiceServicer(backend)
    server, addr = await start_server(
        "127.0.0.1:0",
        [
            (
                lambda s: pb_grpc.add_DirectoryServiceServicer_to_server(servicer, s),
                "tvix.castore.v1.DirectoryService",
            )
        ],
    )
    try:
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = pb_grpc.DirectoryServiceStub(channel)
            reply = await stub.Put(iter([A.to_proto(), B.to_proto(), D.to_proto()]))
            assert reply.root_digest == D.digest.raw
            got = [
                Directory.from_proto(m)
                async for m in stub.Get(pb.GetDirectoryRequest(digest=D.digest.raw, recursive=True))
            ]
            assert got == [D, A, B]
            for recursive in (False, True):  # an inner Directory: not found
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    _ = [
                        m
                        async for m in stub.Get(
                            pb.GetDirectoryRequest(digest=B.digest.raw, recursive=recursive)
                        )
                    ]
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
            backend.store.put_sync(closure_key(D.digest), object_of([D.encode(), A.encode()]))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                _ = [
                    m
                    async for m in stub.Get(
                        pb.GetDirectoryRequest(digest=D.digest.raw, recursive=True)
                    )
                ]
            assert err.value.code() == grpc.StatusCode.DATA_LOSS
    finally:
        await server.stop(None)
        await backend.aclose()
