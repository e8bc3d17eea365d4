"""Combinators: PathInfo ``cache`` (single-flight), ``lru``, ``signing``; Directory
``cache``; Blob ``combined``. Upstream data comes from the real Nix binary caches."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from nix_compat.signing import SigningKey
from tvix_castore.blobservice.base import (
    BlobReader,
    BlobService,
    BlobWriter,
    BytesBlobReader,
    ChunkMeta,
)
from tvix_castore.blobservice.combined import CombinedBlobService
from tvix_castore.blobservice.memory import MemoryBlobService
from tvix_castore.blobservice.objectstore import ObjectStoreBlobService
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.cache import CacheDirectoryService
from tvix_castore.directoryservice.memory import MemoryDirectoryService
from tvix_castore.errors import ConfigError, DataCorruption, StorageUnavailable
from tvix_castore.nodes import Directory, DirectoryNode, FileNode
from tvix_castore.objectstore import MemoryObjectStore
from tvix_store.nar.ingest import ingest_nar_file
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.base import PathInfoService
from tvix_store.pathinfoservice.combinators import (
    CachePathInfoService,
    LruPathInfoService,
    SigningPathInfoService,
)
from tvix_store.pathinfoservice.memory import MemoryPathInfoService
from tvix_store.pathinfoservice.nix_http import NixHttpPathInfoService
from tvix_store.pathinfoservice.sqlite import SqlitePathInfoService

from .conftest import CacheServers, Upstream
from .test_nix_http import RecordingDirs, check_info


def nix_svc(base: str, upstream: Upstream, *, retries: int = 3) -> NixHttpPathInfoService:
    return NixHttpPathInfoService(
        base,
        MemoryBlobService(),
        MemoryDirectoryService(),
        [upstream.key],
        retries=retries,
        backoff=0.01,
    )


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for ``condition`` (polled; the deadline only bounds a hang)."""
    deadline = time.monotonic() + 60
    while not condition():
        assert time.monotonic() < deadline, f"not within 60 s: {what}"
        await asyncio.sleep(0.01)


class CountingNear(PathInfoService):
    """A near service counting the gets that have answered their caller.

    ``CachePathInfoService.get`` does not yield between its near miss and
    joining (or starting) the fetch: once ``gets`` counts a get, that get
    waits on the fetch.
    """

    def __init__(self, inner: PathInfoService) -> None:
        self.inner = inner
        self.gets = 0

    async def get(self, digest: bytes) -> PathInfo | None:
        info = await self.inner.get(digest)
        self.gets += 1
        return info

    async def put(self, info: PathInfo) -> PathInfo:
        return await self.inner.put(info)

    def list(self) -> AsyncIterator[PathInfo]:
        return self.inner.list()

    async def aclose(self) -> None:
        await self.inner.aclose()


# -- PathInfo cache -----------------------------------------------------------------------------
@pytest.mark.parametrize("near_kind", ["memory", "sqlite"])
async def test_cache_single_flight(
    near_kind: str, servers: CacheServers, upstream: Upstream, tmp_path: Path
) -> None:
    server = servers.serve("xz")
    server.gate = threading.Event()  # no answer until every get waits on the fetch
    near = CountingNear(
        MemoryPathInfoService()
        if near_kind == "memory"
        else SqlitePathInfoService(tmp_path / "near.sqlite")
    )
    cache = CachePathInfoService(near, nix_svc(server.base, upstream))
    dep = upstream.by_name("dep")
    try:
        gets = [asyncio.ensure_future(cache.get(dep.digest)) for _ in range(20)]
        await until(lambda: near.gets == 20 and server.count() >= 1, "20 gets on one fetch")
        server.gate.set()
        infos = await asyncio.gather(*gets)
        assert server.count(".narinfo") == 1
        assert server.count(".nar.xz") == 1
        first = check_info(infos[0], dep, upstream)
        assert all(i == first for i in infos)
        assert await near.get(dep.digest) == first
        # Later gets are served by near alone.
        assert await cache.get(dep.digest) == first
        assert len(server.requests) == 2
        assert [i.store_path async for i in cache.list()] == [dep.store_path]
    finally:
        await cache.aclose()


async def test_cache_single_flight_shares_errors_but_does_not_keep_them(
    servers: CacheServers, upstream: Upstream
) -> None:
    server = servers.serve("zstd")
    server.gate = threading.Event()  # no answer until every get waits on the fetch
    near = CountingNear(MemoryPathInfoService())
    cache = CachePathInfoService(near, nix_svc(server.base, upstream, retries=0))
    top = upstream.by_name("top")
    try:
        server.fail(1000)
        gets = [asyncio.ensure_future(cache.get(top.digest)) for _ in range(20)]
        await until(lambda: near.gets == 20 and server.count() >= 1, "20 gets on one fetch")
        server.gate.set()
        results = await asyncio.gather(*gets, return_exceptions=True)
        assert all(isinstance(r, StorageUnavailable) for r in results), results
        assert server.count() == 1
        assert [i async for i in near.list()] == []
        server.fail(0)
        check_info(await cache.get(top.digest), top, upstream)
        # A miss everywhere is None, and not remembered as a hit.
        assert await cache.get(bytes(20)) is None
        assert await near.get(bytes(20)) is None
    finally:
        await cache.aclose()


async def test_cache_waiter_survives_cancelled_leader(
    servers: CacheServers, upstream: Upstream
) -> None:
    """Cancelling the request that started a fetch must not cancel the others waiting on it."""
    server = servers.serve("xz")
    server.gate = threading.Event()  # the fetch stays in flight until released
    near = CountingNear(MemoryPathInfoService())
    cache = CachePathInfoService(near, nix_svc(server.base, upstream))
    dep = upstream.by_name("dep")
    try:
        leader = asyncio.create_task(cache.get(dep.digest))
        await until(lambda: server.count(".narinfo") == 1, "the leader's fetch at the server")
        follower = asyncio.create_task(cache.get(dep.digest))
        await until(lambda: near.gets == 2, "the follower waiting on the leader's fetch")
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        server.gate.set()
        try:
            info = await asyncio.wait_for(follower, 60)
        except asyncio.CancelledError:
            if asyncio.current_task() is not None and asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            pytest.fail("a waiter that nobody cancelled got CancelledError from the leader")
        check_info(info, dep, upstream)
        assert server.count(".narinfo") == 1  # the leader's fetch, not one of its own
    finally:
        await cache.aclose()


# -- lru -------------------------------------------------------------------------------------------
async def _infos(servers: CacheServers, upstream: Upstream) -> list[PathInfo]:
    server = servers.serve("none")
    svc = nix_svc(server.base, upstream)
    try:
        out = []
        for p in upstream.paths:
            info = await svc.get(p.digest)
            assert info is not None
            out.append(info)
        return out
    finally:
        await svc.aclose()


async def test_lru_capacity(servers: CacheServers, upstream: Upstream) -> None:
    a, b, c, d = await _infos(servers, upstream)
    lru = LruPathInfoService(2)
    await lru.put(a)
    await lru.put(b)
    assert await lru.get(a.digest) == a  # refreshes a
    await lru.put(c)  # evicts b, the least recently used
    assert await lru.get(b.digest) is None
    assert await lru.get(a.digest) == a
    assert await lru.get(c.digest) == c
    await lru.put(d)  # evicts a (c was used after it)
    assert await lru.get(a.digest) is None
    assert {i.digest async for i in lru.list()} == {c.digest, d.digest}
    await lru.put(d)  # re-put: no growth
    assert len([i async for i in lru.list()]) == 2
    for bad in (0, -1):
        with pytest.raises(ConfigError):
            LruPathInfoService(bad)


async def test_lru_as_near_of_a_cache(servers: CacheServers, upstream: Upstream) -> None:
    server = servers.serve("xz")
    cache = CachePathInfoService(LruPathInfoService(1), nix_svc(server.base, upstream))
    dep, top = upstream.by_name("dep"), upstream.by_name("top")
    try:
        await cache.get(dep.digest)
        await cache.get(dep.digest)
        assert server.count(".narinfo") == 1
        await cache.get(top.digest)  # evicts dep
        await cache.get(dep.digest)
        assert server.count(".narinfo") == 3
    finally:
        await cache.aclose()


# -- signing ----------------------------------------------------------------------------------------
async def test_signing_adds_a_verifying_signature_and_keeps_others(
    servers: CacheServers, upstream: Upstream
) -> None:
    infos = await _infos(servers, upstream)
    ours = SigningKey.from_file(upstream.other_secret_key)
    inner = MemoryPathInfoService()
    signing = SigningPathInfoService(inner, ours)
    for info in infos:
        assert [s.name for s in info.signatures] == ["upstream-test-1"]
        stored = await signing.put(info)
        assert await inner.get(info.digest) == stored
        assert [s.name for s in stored.signatures] == ["upstream-test-1", "upstream-test-other"]
        fp = stored.fingerprint()
        upstream_sig, our_sig = stored.signatures
        assert upstream.key.verify(fp, upstream_sig)
        assert upstream.other_key.verify(fp, our_sig)
        assert not upstream.key.verify(fp, our_sig)
        # Putting it again does not sign twice.
        again = await signing.put(stored)
        assert again.signatures == stored.signatures
        assert await signing.get(info.digest) == stored
    assert len([i async for i in signing.list()]) == len(infos)


# -- directory cache --------------------------------------------------------------------------------
class CountingDirs(RecordingDirs):
    def __init__(self) -> None:
        super().__init__()
        self.recursive_gets = 0

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        self.recursive_gets += 1
        async for d in super().get_recursive(root):
            yield d


async def _dep_closure(upstream: Upstream) -> tuple[CountingDirs, DirectoryNode]:
    far = CountingDirs()
    result = await ingest_nar_file(
        io.BytesIO(upstream.by_name("dep").nar), MemoryBlobService(), far
    )
    assert isinstance(result.node, DirectoryNode)
    far.commits.clear()
    return far, result.node


async def test_directory_cache_fills_near_in_one_putter(upstream: Upstream) -> None:
    far, root = await _dep_closure(upstream)
    closure = [d async for d in far.get_recursive(root.digest)]
    assert len(closure) == 3  # dep, sub, sub/deeper
    near = RecordingDirs()
    cache = CacheDirectoryService(near, far)
    far.recursive_gets = 0
    got = await cache.get(root.digest)
    assert got is not None and got.digest == root.digest
    assert far.recursive_gets == 1
    assert len(near.commits) == 1
    (commit,) = near.commits
    assert sorted(commit, key=str) == sorted((d.digest for d in closure), key=str)
    assert commit[-1] == root.digest  # leaves first, root last
    # Now served from near alone.
    assert [d.digest async for d in cache.get_recursive(root.digest)] == [d.digest for d in closure]
    sub = next(d for d in closure if d.digest != root.digest)
    assert await cache.get(sub.digest) == sub
    assert far.recursive_gets == 1
    # Unknown everywhere: None, nothing committed.
    assert await cache.get(B3Digest(bytes(32))) is None
    assert [d async for d in cache.get_recursive(B3Digest(bytes(32)))] == []
    assert len(near.commits) == 1


class LyingDirs(MemoryDirectoryService):
    """Answers the closure of a root with the root and then a directory nobody asked for."""

    def __init__(self, root: Directory, extra: Directory) -> None:
        super().__init__()
        self._root, self._extra = root, extra

    async def get(self, digest: B3Digest) -> Directory | None:
        return self._root if digest == self._root.digest else None

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        if root == self._root.digest:
            yield self._root
            yield self._extra

    async def _commit(self, directories: Sequence[Directory]) -> None:
        raise AssertionError("not used")


async def test_directory_cache_verifies_what_far_sends(upstream: Upstream) -> None:
    far, root = await _dep_closure(upstream)
    closure = [d async for d in far.get_recursive(root.digest)]
    top = closure[0]
    unrelated = Directory.from_nodes([FileNode(b"x", B3Digest(bytes(32)), 0, False)])
    for liar in (
        LyingDirs(top, unrelated),  # unexpected directory
        LyingDirs(top, top),  # the root twice
    ):
        near = RecordingDirs()
        cache = CacheDirectoryService(near, liar)
        with pytest.raises(DataCorruption):
            await cache.get(root.digest)
        assert near.commits == []
    # A far that stops early (children missing) is also refused.

    class Truncated(LyingDirs):
        async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
            yield top

    near = RecordingDirs()
    with pytest.raises(DataCorruption):
        await CacheDirectoryService(near, Truncated(top, top)).get(root.digest)
    assert near.commits == []


# -- blob combined ----------------------------------------------------------------------------------
class CountingBlobs(ObjectStoreBlobService):
    def __init__(self) -> None:
        super().__init__(MemoryObjectStore(), avg_chunk_size=1024)
        self.reads: list[B3Digest] = []

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        self.reads.append(digest)
        return await super().open_read(digest)


async def test_combined_pulls_chunks_through_local() -> None:
    remote = CountingBlobs()
    data = os.urandom(64 * 1024 + 5)
    digest = await remote.put(data)
    chunks = await remote.chunks(digest)
    assert chunks is not None and len(chunks) >= 8
    local = MemoryBlobService()
    combined = CombinedBlobService(local, remote)
    assert await combined.has(digest)
    assert await combined.chunks(digest) == chunks
    reader = await combined.open_read(digest)
    assert reader is not None
    async with reader:
        assert await reader.read() == data
    # Every chunk now lives in local; reading again downloads nothing.
    for c in chunks:
        assert await local.has(c.digest), c.digest
    n = len(remote.reads)
    assert n == len({c.digest for c in chunks})
    assert await combined.read_all(digest) == data
    reader = await combined.open_read(digest)
    assert reader is not None
    async with reader:
        await reader.seek(1000)
        assert await reader.readexactly(5000) == data[1000:6000]
    assert len(remote.reads) == n
    # A small (single-chunk) blob is copied whole into local.
    small = await remote.put(b"small blob")
    assert await combined.read_all(small) == b"small blob"
    assert await local.has(small)
    # Writes go to local only.
    written = await combined.put(b"written through combined")
    assert await local.has(written) and not await remote.has(written)
    # Unknown: None.
    assert await combined.open_read(B3Digest(bytes(32))) is None
    assert not await combined.has(B3Digest(bytes(32)))


class LyingBlobs(BlobService):
    """Claims to have one blob and returns other bytes for it."""

    def __init__(self, digest: B3Digest) -> None:
        self._digest = digest

    async def has(self, digest: B3Digest) -> bool:
        return digest == self._digest

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return [] if digest == self._digest else None

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        return BytesBlobReader(b"not what was asked for") if digest == self._digest else None

    def open_write(self) -> BlobWriter:
        raise AssertionError("not used")


async def test_combined_refuses_wrong_bytes_from_remote() -> None:
    """A3: a remote answering other bytes is DATA_LOSS, never passed on (nor "not found")."""
    real = await MemoryBlobService().put(b"the real content")
    local = MemoryBlobService()
    combined = CombinedBlobService(local, LyingBlobs(real))
    with pytest.raises(DataCorruption):
        reader = await combined.open_read(real)
        if reader is not None:
            async with reader:
                await reader.read()
        else:
            pytest.fail("wrong bytes from remote reported as 'not found' (None)")
    assert not await local.has(real)
