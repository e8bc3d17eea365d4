"""NixHttpPathInfoService against real Nix 2.8 binary caches served over loopback HTTP.

Success: every path of the closure, from the xz, zstd and uncompressed caches,
with the base URL given with and without a trailing slash, comes back with the
narinfo's metadata and content that renders to Nix's own NAR. Failure: each
way an upstream can lie or fail gives a specific error and stores nothing
that refers to the bad data.
"""

from __future__ import annotations

import asyncio
import bz2
import gzip
import hashlib
import lzma
import os
import struct
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import quote

import pytest
import zstandard

from nix_compat.narinfo import NarInfo
from nix_compat.signing import VerifyingKey
from nix_compat.store_path import StorePath
from tvix_castore.blobservice.memory import MemoryBlobService
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.memory import MemoryDirectoryService
from tvix_castore.errors import (
    ConfigError,
    DataCorruption,
    StorageError,
    StorageUnavailable,
    ValidationError,
)
from tvix_castore.nodes import Directory
from tvix_store.config import open_store, path_info_service_from_url
from tvix_store.nar.render import render_nar
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.combinators import CachePathInfoService
from tvix_store.pathinfoservice.memory import MemoryPathInfoService
from tvix_store.pathinfoservice.nix_http import (
    NarTooLarge,
    NixHttpPathInfoService,
    UntrustedPath,
)

from .conftest import PREFIX, CacheServer, CacheServers, PathData, Upstream, ca_of


class RecordingDirs(MemoryDirectoryService):
    """A memory DirectoryService that records every commit."""

    def __init__(self) -> None:
        super().__init__()
        self.commits: list[list[B3Digest]] = []

    async def _commit(self, directories: Sequence[Directory]) -> None:
        self.commits.append([d.digest for d in directories])
        await super()._commit(directories)


class Svc:
    """A NixHttpPathInfoService over memory blob/directory services."""

    def __init__(
        self,
        base: str,
        keys: list[VerifyingKey] | None,
        *,
        retries: int = 3,
    ) -> None:
        self.blobs = MemoryBlobService()
        self.dirs = RecordingDirs()
        self.svc = NixHttpPathInfoService(
            base, self.blobs, self.dirs, keys, retries=retries, backoff=0.01
        )

    async def nar(self, info: PathInfo) -> bytes:
        return b"".join(
            [p async for p in render_nar(info.node.with_name(b""), self.blobs, self.dirs)]
        )


def check_info(info: PathInfo | None, p: PathData, upstream: Upstream) -> PathInfo:
    assert info is not None, p.path
    assert info.store_path == p.store_path
    assert (info.nar_size, info.nar_sha256) == (len(p.nar), p.nar_hash)
    assert [r.absolute for r in info.references] == sorted(p.references)
    assert (info.deriver.absolute + ".drv" if info.deriver else None) == p.deriver
    assert info.ca == ca_of(p)
    assert [s.name for s in info.signatures] == ["upstream-test-1"]
    assert any(upstream.key.verify(info.fingerprint(), s) for s in info.signatures)
    return info


def narinfo_file(server: CacheServer, p: PathData) -> Path:
    return server.root / f"{p.hash_part}.narinfo"


def nar_file(server: CacheServer, p: PathData) -> Path:
    info = NarInfo.parse(narinfo_file(server, p).read_bytes())
    return server.root / info.url


@pytest.mark.parametrize("slash", [False, True], ids=["no-slash", "slash"])
@pytest.mark.parametrize("kind", ["xz", "zstd", "none"])
async def test_get_every_path(
    kind: str, slash: bool, servers: CacheServers, upstream: Upstream
) -> None:
    server = servers.serve(kind)
    s = Svc(server.base + ("/" if slash else ""), [upstream.key])
    try:
        for p in upstream.paths:
            info = check_info(await s.svc.get(p.digest), p, upstream)
            assert await s.nar(info) == p.nar, p.path
    finally:
        await s.svc.aclose()
    # One narinfo and one NAR per path, all below the base path.
    n = len(upstream.paths)
    assert server.count(".narinfo") == n
    assert len(server.requests) == 2 * n
    assert all(r.startswith(PREFIX + "/") for r in server.requests), server.requests
    # Each ingest committed its directories in one go.
    assert len(s.dirs.commits) == sum(1 for p in upstream.paths if p.name != "single")


async def test_no_keys_means_no_verification(servers: CacheServers, upstream: Upstream) -> None:
    server = servers.serve("none")
    dep = upstream.by_name("dep")
    text = narinfo_file(server, dep).read_text()
    narinfo_file(server, dep).write_text(
        "".join(line + "\n" for line in text.splitlines() if not line.startswith("Sig:"))
    )
    s = Svc(server.base, None)
    try:
        info = await s.svc.get(dep.digest)
        assert info is not None and info.signatures == ()
        assert await s.nar(info) == dep.nar
    finally:
        await s.svc.aclose()
    s = Svc(server.base, [upstream.key])
    try:
        with pytest.raises(UntrustedPath):
            await s.svc.get(dep.digest)
    finally:
        await s.svc.aclose()


async def test_not_found_is_none(servers: CacheServers, upstream: Upstream) -> None:
    server = servers.serve("xz")
    s = Svc(server.base, [upstream.key])
    try:
        assert await s.svc.get(bytes(20)) is None
        assert server.count() == 1  # a 404 is an answer, not a reason to retry
        dep = upstream.by_name("dep")
        server.status[f"{PREFIX}/{dep.hash_part}.narinfo"] = 403
        assert await s.svc.get(dep.digest) is None
        assert server.count() == 2
        server.status[f"{PREFIX}/{dep.hash_part}.narinfo"] = 400
        with pytest.raises(StorageError) as err:
            await s.svc.get(dep.digest)
        assert not isinstance(err.value, StorageUnavailable)
        assert "400" in str(err.value)
        assert server.count() == 3  # 4xx are not retried
    finally:
        await s.svc.aclose()
    assert s.dirs.commits == []


async def test_tampered_nar_is_refused_and_nothing_kept(
    servers: CacheServers, upstream: Upstream
) -> None:
    server = servers.serve("none")
    dep = upstream.by_name("dep")
    f = nar_file(server, dep)
    data = f.read_bytes()
    i = data.index(b"hello from upstream")
    f.write_bytes(data[:i] + b"j" + data[i + 1 :])  # same size, still a valid NAR
    s = Svc(server.base, [upstream.key])
    near = MemoryPathInfoService()
    cache = CachePathInfoService(near, s.svc)
    try:
        with pytest.raises(DataCorruption) as err:
            await cache.get(dep.digest)
        assert "NarHash" in str(err.value) or "hash" in str(err.value).lower()
        assert [i async for i in near.list()] == []
        assert s.dirs.commits == []
        # The other paths of the cache are still fine.
        single = upstream.by_name("single")
        check_info(await cache.get(single.digest), single, upstream)
    finally:
        await cache.aclose()


async def test_truncated_and_garbled_nars(servers: CacheServers, upstream: Upstream) -> None:
    dep = upstream.by_name("dep")
    manglers: list[tuple[str, Callable[[bytes], bytes]]] = [
        ("none", lambda b: b[:-16]),  # truncated NAR
        ("none", lambda b: b + b"\0" * 8),  # trailing garbage
        ("xz", lambda b: b[: len(b) // 2]),  # truncated xz stream
        ("zstd", lambda b: b[:8] + bytes(len(b) - 8)),  # garbled zstd
    ]
    for kind, mangle in manglers:
        server = servers.serve(kind)
        f = nar_file(server, dep)
        f.write_bytes(mangle(f.read_bytes()))
        s = Svc(server.base, [upstream.key])
        try:
            with pytest.raises(DataCorruption):
                await s.svc.get(dep.digest)
        finally:
            await s.svc.aclose()
        assert s.dirs.commits == [], kind


async def test_wrong_trusted_key(servers: CacheServers, upstream: Upstream) -> None:
    server = servers.serve("xz")
    s = Svc(server.base, [upstream.other_key])
    try:
        for p in upstream.paths:
            with pytest.raises(UntrustedPath, match="signature"):
                await s.svc.get(p.digest)
    finally:
        await s.svc.aclose()
    assert server.count(".nar.xz") == 0  # refused before downloading anything
    assert s.dirs.commits == []
    assert await s.blobs.has(B3Digest(bytes(32))) is False


async def test_altered_narinfo_breaks_its_signature(
    servers: CacheServers, upstream: Upstream
) -> None:
    server = servers.serve("none")
    top = upstream.by_name("top")
    text = narinfo_file(server, top).read_text()
    # Drop the reference to ``mid``: the signed fingerprint no longer matches.
    mid = upstream.by_name("mid").store_path.basename
    narinfo_file(server, top).write_text(text.replace(f" {mid}", "").replace(f"{mid} ", ""))
    assert narinfo_file(server, top).read_text() != text
    s = Svc(server.base, [upstream.other_key, upstream.key])
    try:
        with pytest.raises(UntrustedPath):
            await s.svc.get(top.digest)
    finally:
        await s.svc.aclose()


async def test_narinfo_for_another_path(servers: CacheServers, upstream: Upstream) -> None:
    server = servers.serve("xz")
    dep, top = upstream.by_name("dep"), upstream.by_name("top")
    # A correctly signed narinfo, but for ``top``, served as ``dep``'s.
    narinfo_file(server, dep).write_bytes(narinfo_file(server, top).read_bytes())
    s = Svc(server.base, [upstream.key])
    try:
        with pytest.raises(DataCorruption, match=dep.hash_part):
            await s.svc.get(dep.digest)
    finally:
        await s.svc.aclose()
    assert server.count(".nar.xz") == 0
    assert s.dirs.commits == []


async def test_upstream_down_then_back(servers: CacheServers, upstream: Upstream) -> None:
    server = servers.serve("zstd")
    dep = upstream.by_name("dep")
    s = Svc(server.base, [upstream.key], retries=1)
    near = MemoryPathInfoService()
    cache = CachePathInfoService(near, s.svc)
    try:
        # Warm the connection pool first: a stale kept-alive connection must not
        # turn "down" into something else.
        check_info(
            await cache.get(upstream.by_name("single").digest), upstream.by_name("single"), upstream
        )
        server.stop()
        with pytest.raises(StorageUnavailable, match="unreachable"):
            await cache.get(dep.digest)
        assert await near.get(dep.digest) is None
        server.start()
        info = check_info(await cache.get(dep.digest), dep, upstream)
        assert await s.nar(info) == dep.nar
        # Cached: upstream down again, still served.
        server.stop()
        assert await cache.get(dep.digest) == info
    finally:
        await cache.aclose()


async def test_transient_500s_are_retried(servers: CacheServers, upstream: Upstream) -> None:
    server = servers.serve("xz")
    dep, top = upstream.by_name("dep"), upstream.by_name("top")
    s = Svc(server.base, [upstream.key], retries=3)
    try:
        server.fail(2, ".narinfo")
        check_info(await s.svc.get(dep.digest), dep, upstream)
        assert server.count(".narinfo") == 3
        server.fail(3, ".nar.xz")
        info = check_info(await s.svc.get(top.digest), top, upstream)
        assert await s.nar(info) == top.nar
        assert server.count(".nar.xz") == 2 + 3  # dep once, top 3 failures + 1
        # Persistent failure: bounded retries, then a clean "unavailable".
        before = server.count()
        server.fail(100)
        with pytest.raises(StorageUnavailable, match="500"):
            await s.svc.get(dep.digest)
        assert server.count() - before == 4  # 1 + 3 retries
    finally:
        await s.svc.aclose()


def _nar_str(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b + bytes(-len(b) % 8)


def _single_file_nar_parts(size: int) -> tuple[bytes, bytes]:
    """Head and tail of the NAR of one regular file of ``size`` bytes."""
    head = b"".join(
        _nar_str(x) for x in (b"nix-archive-1", b"(", b"type", b"regular", b"contents")
    ) + struct.pack("<Q", size)
    tail = bytes(-size % 8) + _nar_str(b")")
    return head, tail


def _write_signed(
    server: CacheServer,
    upstream: Upstream,
    name: str,
    url: str,
    nar_hash: bytes,
    nar_size: int,
    compression: str | None,
) -> StorePath:
    sp = StorePath(hashlib.sha256(name.encode()).digest()[:20], name)
    info = NarInfo(
        store_path=sp,
        url=url,
        compression=compression,
        nar_hash=nar_hash,
        nar_size=nar_size,
    ).signed(upstream.signing_key)
    (server.root / f"{sp.hash_part}.narinfo").write_text(info.render())
    return sp


BOMB = 256 << 20  # decompressed size of the bombs


def _zstd_bomb() -> bytes:
    head, tail = _single_file_nar_parts(BOMB)
    c = zstandard.ZstdCompressor(level=3).compressobj()
    zeros = bytes(16 << 20)
    parts = [c.compress(head)] + [c.compress(zeros) for _ in range(BOMB // len(zeros))]
    return b"".join([*parts, c.compress(tail), c.flush()])


def _xz_bomb() -> bytes:
    size = 64 << 20
    head, tail = _single_file_nar_parts(size)
    c = lzma.LZMACompressor(preset=0)
    zeros = bytes(16 << 20)
    parts = [c.compress(head)] + [c.compress(zeros) for _ in range(size // len(zeros))]
    return b"".join([*parts, c.compress(tail), c.flush()])


@pytest.mark.parametrize("kind", ["zstd", "xz"])
async def test_decompression_bomb_refused(
    kind: str, servers: CacheServers, upstream: Upstream
) -> None:
    server = servers.serve("none")
    data = _zstd_bomb() if kind == "zstd" else _xz_bomb()
    assert len(data) < 64 << 10
    suffix = ".nar.zst" if kind == "zstd" else ".nar.xz"
    (server.root / "nar" / f"bomb{suffix}").write_bytes(data)
    sp = _write_signed(server, upstream, "bomb", f"nar/bomb{suffix}", bytes(32), 4096, kind)
    s = Svc(server.base, [upstream.key])
    try:
        with pytest.raises(DataCorruption):
            await s.svc.get(sp.digest)
    finally:
        await s.svc.aclose()
    assert s.dirs.commits == []


async def test_decompression_bomb_error_is_specific(
    servers: CacheServers, upstream: Upstream
) -> None:
    """The refusal says the NAR is larger than its NarSize (a specific error)."""
    server = servers.serve("none")
    (server.root / "nar" / "bomb.nar.zst").write_bytes(_zstd_bomb())
    sp = _write_signed(server, upstream, "bomb", "nar/bomb.nar.zst", bytes(32), 4096, "zstd")
    s = Svc(server.base, [upstream.key])
    try:
        with pytest.raises(NarTooLarge, match="larger than its NarSize"):
            await s.svc.get(sp.digest)
    finally:
        await s.svc.aclose()


async def test_connection_dropped_mid_nar_is_unavailable(
    servers: CacheServers, upstream: Upstream
) -> None:
    """A NAR download cut short by the network is "unavailable", not corrupt data.

    Today the StorageUnavailable raised by the read callback is wrapped by the
    NAR reader into a NarError, so the caller sees DataCorruption ("bad NAR",
    gRPC DATA_LOSS) for what is a transient network failure.
    """
    server = servers.serve("none")
    dep = upstream.by_name("dep")
    nar_url = NarInfo.parse(narinfo_file(server, dep).read_bytes()).url
    server.cut_short.add(f"{PREFIX}/{nar_url}")
    s = Svc(server.base, [upstream.key], retries=0)
    try:
        with pytest.raises(StorageError) as err:
            await s.svc.get(dep.digest)
    finally:
        await s.svc.aclose()
    assert s.dirs.commits == []
    assert isinstance(err.value, StorageUnavailable), repr(err.value)


async def test_decompression_bomb_memory_stays_bounded(
    servers: CacheServers, upstream: Upstream
) -> None:
    """Refusing a zstd bomb must not first inflate it in memory.

    compression.py promises output "in pieces of at most 1 MiB, so a
    decompression bomb never balloons memory"; zstd is fed 8 KiB input pieces,
    but 8 KiB of zstd can hold ~256 MiB of output.
    """
    server = servers.serve("none")
    (server.root / "nar" / "bomb.nar.zst").write_bytes(_zstd_bomb())
    sp = _write_signed(server, upstream, "bomb", "nar/bomb.nar.zst", bytes(32), 4096, "zstd")
    s = Svc(server.base, [upstream.key])
    tracemalloc.start()
    try:
        with pytest.raises(DataCorruption):
            await s.svc.get(sp.digest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        await s.svc.aclose()
    assert peak < 64 << 20, f"refusing a {BOMB >> 20} MiB zstd bomb peaked at {peak >> 20} MiB"


@pytest.mark.parametrize("compression", ["gzip", "bzip2", None])
async def test_other_compressions(
    compression: str | None, servers: CacheServers, upstream: Upstream
) -> None:
    """gzip and bzip2 (and an absent Compression field, meaning bzip2) also work."""
    server = servers.serve("none")
    dep = upstream.by_name("dep")
    packed = gzip.compress(dep.nar) if compression == "gzip" else bz2.compress(dep.nar)
    (server.root / "nar" / "dep.packed").write_bytes(packed)
    info = NarInfo.parse(narinfo_file(server, dep).read_bytes())
    text = NarInfo(
        store_path=info.store_path,
        url="nar/dep.packed",
        compression=compression,
        nar_hash=info.nar_hash,
        nar_size=info.nar_size,
        references=info.references,
        signatures=info.signatures,
        ca=info.ca,
    ).render()
    narinfo_file(server, dep).write_text(text)
    s = Svc(server.base, [upstream.key])
    try:
        got = check_info(await s.svc.get(dep.digest), dep, upstream)
        assert await s.nar(got) == dep.nar
    finally:
        await s.svc.aclose()


async def test_unsupported_compression_and_missing_nar(
    servers: CacheServers, upstream: Upstream
) -> None:
    server = servers.serve("none")
    dep, single = upstream.by_name("dep"), upstream.by_name("single")
    text = narinfo_file(server, dep).read_text()
    narinfo_file(server, dep).write_text(text.replace("Compression: none", "Compression: lz4"))
    os.unlink(nar_file(server, single))
    s = Svc(server.base, [upstream.key])
    try:
        with pytest.raises(DataCorruption, match="compression"):
            await s.svc.get(dep.digest)
        with pytest.raises(StorageError, match="NAR"):
            await s.svc.get(single.digest)
    finally:
        await s.svc.aclose()


async def test_read_only(servers: CacheServers, upstream: Upstream) -> None:
    server = servers.serve("none")
    s = Svc(server.base, [upstream.key])
    try:
        info = check_info(
            await s.svc.get(upstream.by_name("single").digest), upstream.by_name("single"), upstream
        )
        with pytest.raises(ValidationError):
            await s.svc.put(info)
        with pytest.raises(ValidationError):
            [i async for i in s.svc.list()]
    finally:
        await s.svc.aclose()


def test_configuration_errors(upstream: Upstream) -> None:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    with pytest.raises(ConfigError, match="empty"):
        NixHttpPathInfoService("http://127.0.0.1:1/prefix", blobs, dirs, [])
    with pytest.raises(ConfigError):
        NixHttpPathInfoService("ftp://127.0.0.1/prefix", blobs, dirs, None)
    for url in [
        "nix+http://127.0.0.1:1/prefix?trusted-public-keys=",
        "nix+http://127.0.0.1:1/prefix?trusted-public-keys=%20%20",
        "nix+http://127.0.0.1:1/prefix?trusted-public-keys=not-a-key",
        "nix+http://127.0.0.1:1/prefix?unknown=1",
        "nix+http:///prefix",
    ]:
        with pytest.raises(ConfigError):
            path_info_service_from_url(url, blobs, dirs)


@pytest.mark.parametrize("slash", [False, True], ids=["no-slash", "slash"])
async def test_from_url(slash: bool, servers: CacheServers, upstream: Upstream) -> None:
    """``nix+http://host/prefix?trusted-public-keys=k1 k2`` (keys percent-encoded)."""
    server = servers.serve("xz")
    keys = " ".join(quote(k, safe="") for k in (upstream.other_public_key, upstream.public_key))
    base = "nix+" + server.base + ("/" if slash else "")
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    for url in (
        f"{base}?trusted-public-keys={quote(keys, safe='%')}",
        # the parameter may repeat
        f"{base}?trusted-public-keys={quote(upstream.other_public_key, safe='')}"
        f"&trusted-public-keys={quote(upstream.public_key, safe='')}",
    ):
        svc = path_info_service_from_url(url, blobs, dirs)
        assert isinstance(svc, NixHttpPathInfoService)
        try:
            top = upstream.by_name("top")
            check_info(await svc.get(top.digest), top, upstream)
        finally:
            await svc.aclose()
    only_other = f"{base}?trusted-public-keys={quote(upstream.other_public_key, safe='')}"
    svc = path_info_service_from_url(only_other, blobs, dirs)
    try:
        with pytest.raises(UntrustedPath):
            await svc.get(upstream.by_name("top").digest)
    finally:
        await svc.aclose()


async def test_open_store_wraps_nix_http_in_a_local_cache(
    servers: CacheServers, upstream: Upstream, tmp_path: Path
) -> None:
    """A nix+http path-info URL is cached in the embedded store (survives a restart)."""
    server = servers.serve("xz")
    url = f"nix+{server.base}?trusted-public-keys={quote(upstream.public_key, safe='')}"
    home = tmp_path / "home"
    async with await open_store(path_info_url=url, home=home) as store:
        assert isinstance(store.pathinfos, CachePathInfoService)
        for p in upstream.paths:
            check_info(await store.pathinfos.get(p.digest), p, upstream)
    fetched = len(server.requests)
    server.stop()
    async with await open_store(path_info_url=url, home=home) as store:
        for p in upstream.paths:
            info = check_info(await store.pathinfos.get(p.digest), p, upstream)
            nar = b"".join(
                [
                    x
                    async for x in render_nar(
                        info.node.with_name(b""), store.blobs, store.directories
                    )
                ]
            )
            assert nar == p.nar
        assert len(server.requests) == fetched
        # A miss still asks upstream, which is down: a clean "unavailable".
        with pytest.raises(StorageUnavailable):
            await store.pathinfos.get(bytes(20))


async def test_concurrent_gets_share_connections(servers: CacheServers, upstream: Upstream) -> None:
    """Many parallel gets of different paths all succeed (connection pool, no leaks)."""
    server = servers.serve("zstd")
    s = Svc(server.base, [upstream.key])
    try:
        infos = await asyncio.gather(*(s.svc.get(p.digest) for p in upstream.paths * 3))
        for info, p in zip(infos, upstream.paths * 3, strict=True):
            check_info(info, p, upstream)
    finally:
        await s.svc.aclose()
