"""One conformance suite for every PathInfoService backend (incl. gRPC to a real server)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nix_compat.nar import NarWriter
from nix_compat.store_path import StorePath
from tvix_castore.blobservice import MemoryBlobService
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice import MemoryDirectoryService
from tvix_castore.nodes import FileNode
from tvix_castore.rpc.server import start_server
from tvix_store.config import open_store, path_info_service_from_url
from tvix_store.daemon import registrations
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.base import PathInfoService
from tvix_store.pathinfoservice.grpc import GrpcPathInfoService
from tvix_store.pathinfoservice.memory import MemoryPathInfoService
from tvix_store.pathinfoservice.sqlite import SqlitePathInfoService


def nar_bytes(contents: bytes) -> bytes:
    out = io.BytesIO()
    w = NarWriter(out)
    w.file(contents)
    w.close()
    return out.getvalue()


# The NAR of a regular file holding b"hello": the blob every backend's PathInfos name.
HELLO_NAR = (120, hashlib.sha256(nar_bytes(b"hello")).digest())


def info_for(i: int, digest: B3Digest) -> PathInfo:
    sp = StorePath(i.to_bytes(20, "little"), f"p{i}")
    return PathInfo(sp, FileNode(sp.basename.encode(), digest, 5), *HELLO_NAR)


@pytest.fixture(params=["memory", "sqlite", "postgres", "grpc"])
async def svc(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[PathInfoService, B3Digest]]:
    if request.param == "memory":
        yield MemoryPathInfoService(), B3Digest(bytes(32))
    elif request.param == "postgres":  # (a real PostgreSQL, a schema of its own)
        p = path_info_service_from_url(
            request.getfixturevalue("postgres").fresh_url(),
            MemoryBlobService(),
            MemoryDirectoryService(),
        )
        yield p, B3Digest(bytes(32))
        await p.aclose()
    elif request.param == "sqlite":
        s = SqlitePathInfoService(tmp_path / "p.sqlite")
        yield s, B3Digest(bytes(32))
        await s.aclose()
    else:
        store = await open_store(home=tmp_path / "home")
        digest = await store.blobs.put(b"hello")  # content must exist for Put over gRPC
        server, addr = await start_server("127.0.0.1:0", registrations(store))
        client = GrpcPathInfoService.from_url(f"grpc+http://{addr}")
        yield client, digest
        await client.aclose()
        await server.stop(None)
        await store.aclose()


async def test_get_put_list(svc: tuple[PathInfoService, B3Digest]) -> None:
    service, digest = svc
    infos = [info_for(i, digest) for i in range(1, 301)]
    assert await service.get(infos[0].digest) is None
    for info in infos:
        assert await service.put(info) == info
    assert await service.get(infos[7].digest) == infos[7]
    listed = [i async for i in service.list()]
    assert sorted(i.store_path.name for i in listed) == sorted(i.store_path.name for i in infos)
    # last write wins
    newer = dataclasses.replace(infos[0], deriver=StorePath(bytes(20), "newer"))
    await service.put(newer)
    got = await service.get(infos[0].digest)
    assert got == newer


async def test_grpc_put_refuses_missing_content(tmp_path: Path) -> None:
    from tvix_castore.errors import ValidationError

    store = await open_store(home=tmp_path)
    server, addr = await start_server("127.0.0.1:0", registrations(store))
    client = path_info_service_from_url(f"grpc+http://{addr}", store.blobs, store.directories)
    try:
        with pytest.raises(ValidationError, match="not in the store"):
            await client.put(info_for(1, B3Digest(bytes(32))))
        assert await client.get(info_for(1, B3Digest(bytes(32))).digest) is None
    finally:
        await client.aclose()
        await server.stop(None)
        await store.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "memory://x",
        "memory:///",
        "sqlite://",
        "sqlite://host/p",
        "sqlite:///rel/../",
        "bogus://",
        "grpc+http://h:1/p",
        "memory://?a=1",
    ],
)
def test_bad_urls(url: str) -> None:
    from tvix_castore.errors import ConfigError

    with pytest.raises(ConfigError):
        path_info_service_from_url(url, MemoryBlobService(), MemoryDirectoryService())
