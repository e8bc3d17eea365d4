"""Damaged content is never served as a 200 (issue 12, items 6 and 7).

A real bridge (or daemon) gets the closure from a real ``nix copy``; then a
pack file is deleted, truncated, or has one byte flipped. Missing or short
packs are seen before any header is sent (a 500); a flipped byte is found
while streaming, which cuts the connection and marks the path damaged: from
then on its NAR is refused before headers, its narinfo is 404 and gRPC
``CalculateNAR`` is DATA_LOSS, until the same NAR is uploaded again (or a
``tvix-store export`` reads it back whole).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import subprocess
from pathlib import Path

import aiohttp
import grpc.aio
import pytest

from nix_compat import nixbase32
from nix_compat.narinfo import NarInfo
from tests.store.packs import frame_of, planned_roots
from tvix_castore.digests import B3Digest
from tvix_castore.protos import castore_pb2
from tvix_castore.rpc.channel import channel_options
from tvix_store.nar.plancache import PlanCache
from tvix_store.protos import rpc_pathinfo_pb2, rpc_pathinfo_pb2_grpc

from .conftest import TVIX, Bridge, Bridges, Closure, PathData, copy_to, nix_in, tvix_env


def packed_blob(home: Path, p: PathData) -> tuple[Path, int, int]:
    """(pack file, offset, length) of the frame of the largest file of ``p``'s NAR."""
    sha = hashlib.sha256(p.nar).digest()
    roots = [root for root, vouched in planned_roots(home).items() if vouched == sha]
    assert roots, f"no plans vouch for {p.path}"
    cache = PlanCache(home / "store.sqlite")
    try:
        closure = cache.closure(roots[0])
        assert closure is not None
        largest = max((f for plan in closure.values() for f in plan.files), key=lambda f: f.size)
    finally:
        cache.close()
    place = frame_of(home, B3Digest(largest.digest))
    return place.pack, place.offset, place.length


def flip_byte(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))


async def nar_urls(session: aiohttp.ClientSession, bridge: Bridge, p: PathData) -> list[str]:
    """Both URL forms of ``p``'s NAR: the narinfo's (castore node) and ``nar/<NarHash>.nar``."""
    async with session.get(f"{bridge.url}/{p.hash_part}.narinfo") as resp:
        assert resp.status == 200, await resp.text()
        info = NarInfo.parse(await resp.read())
    assert info.url.startswith("nar/tvix-castore/")
    return [f"{bridge.url}/{info.url}", f"{bridge.url}/nar/{nixbase32.encode(p.nar_hash)}.nar"]


async def assert_refused(session: aiohttp.ClientSession, urls: list[str]) -> None:
    """GET and HEAD of each URL answer 410 Gone before any body (never a 200)."""
    for url in urls:
        async with session.head(url) as resp:
            assert resp.status == 410, (url, resp.status)
        async with session.get(url) as resp:
            assert resp.status == 410, (url, resp.status)
            assert "damaged" in await resp.text()


async def assert_served(session: aiohttp.ClientSession, urls: list[str], p: PathData) -> None:
    for url in urls:
        async with session.head(url) as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == len(p.nar)
        async with session.get(url) as resp:
            assert resp.status == 200
            assert await resp.read() == p.nar


async def narinfo_status(session: aiohttp.ClientSession, bridge: Bridge, p: PathData) -> int:
    url = f"{bridge.url}/{p.hash_part}.narinfo"
    async with session.head(url) as head, session.get(url) as resp:
        assert head.status == resp.status
        return resp.status


async def first_get_is_cut(session: aiohttp.ClientSession, url: str, p: PathData) -> None:
    """The GET that finds the corrupt blob: maybe a 200, but then never a whole body."""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.get(url) as resp:
            assert resp.status == 200
            await resp.read()


def export(home: Path, p: PathData) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [TVIX, "export", p.path], capture_output=True, env=tvix_env(home), check=False
    )


async def uploaded(
    bridges: Bridges, closure: Closure, tmp_path: Path, daemon: bool = False
) -> Bridge:
    bridge = bridges.start_daemon() if daemon else bridges.start()
    copy_to(nix_in(tmp_path), closure, f"{bridge.url}?compression=none")
    return bridge


async def test_deleted_pack_is_refused_before_headers(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    bridge = await uploaded(bridges, closure, tmp_path)
    dep, single = closure.by_name("dep"), closure.by_name("single")
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        urls = {p.path: await nar_urls(session, bridge, p) for p in (dep, single)}
        for pack in (bridge.home / "packs").iterdir():
            pack.unlink()
        for p in (dep, single):  # a directory (from its plan) and a lone file
            await assert_refused(session, urls[p.path])
            assert await narinfo_status(session, bridge, p) == 404
    proc = export(bridge.home, dep)
    assert proc.returncode == 1 and proc.stdout == b""
    assert b"damaged" in proc.stderr and b"missing" in proc.stderr
    assert bridge.alive()


async def test_truncated_pack_is_refused_before_headers(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    bridge = await uploaded(bridges, closure, tmp_path)
    dep = closure.by_name("dep")
    pack, offset, size = packed_blob(bridge.home, dep)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        urls = await nar_urls(session, bridge, dep)
        os.truncate(pack, offset + size // 2)
        await assert_refused(session, urls)
        assert await narinfo_status(session, bridge, dep) == 404
    proc = export(bridge.home, dep)
    assert proc.returncode == 1 and proc.stdout == b""
    assert b"truncated" in proc.stderr
    assert bridge.alive()


async def test_flipped_byte_cuts_then_refuses_until_uploaded_again(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    bridge = await uploaded(bridges, closure, tmp_path)
    dep = closure.by_name("dep")
    pack, offset, size = packed_blob(bridge.home, dep)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        urls = await nar_urls(session, bridge, dep)
        flip_byte(pack, offset + size // 2)
        await first_get_is_cut(session, urls[1], dep)
        await assert_refused(session, urls)
        assert await narinfo_status(session, bridge, dep) == 404
        proc = export(bridge.home, dep)
        assert proc.returncode == 1  # (the frame found corrupt was unindexed: "not in the store")
        assert b"damaged: blob" in proc.stderr and b"is not in the store" in proc.stderr
        assert proc.stdout != dep.nar
        # Nix sees the path missing, so it uploads it again: that repairs it.
        copy_to(nix_in(tmp_path, "nix2"), closure, f"{bridge.url}?compression=none")
        assert await narinfo_status(session, bridge, dep) == 200
        await assert_served(session, urls, dep)
    proc = export(bridge.home, dep)
    assert proc.returncode == 0 and proc.stdout == dep.nar
    assert bridge.alive()


async def test_restored_pack_is_served_after_export_verifies_it(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    """A mark outlives putting the bytes back; a whole, verified export clears it."""
    bridge = await uploaded(bridges, closure, tmp_path)
    dep = closure.by_name("dep")
    pack, _, _ = packed_blob(bridge.home, dep)
    aside = tmp_path / "aside.pack"
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        urls = await nar_urls(session, bridge, dep)
        pack.rename(aside)
        await assert_refused(session, urls)
        aside.rename(pack)
        await assert_refused(session, urls)
        assert await narinfo_status(session, bridge, dep) == 404
        proc = export(bridge.home, dep)
        assert proc.returncode == 0 and proc.stdout == dep.nar
        assert await narinfo_status(session, bridge, dep) == 200
        await assert_served(session, urls, dep)


async def test_calculate_nar_and_narinfo_stop_vouching_for_damage(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    daemon = await uploaded(bridges, closure, tmp_path, daemon=True)
    assert daemon.grpc_addr is not None
    dep = closure.by_name("dep")
    pack, offset, size = packed_blob(daemon.home, dep)
    async with grpc.aio.insecure_channel(daemon.grpc_addr, options=channel_options()) as channel:
        stub = rpc_pathinfo_pb2_grpc.PathInfoServiceStub(channel)
        digest = nixbase32.decode(dep.hash_part, 20)
        info = await stub.Get(rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=digest))
        info.node.directory.name = b""  # a root node has no name
        got = await stub.CalculateNAR(info.node)
        assert (got.nar_size, got.nar_sha256) == (len(dep.nar), dep.nar_hash)
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            urls = await nar_urls(session, daemon, dep)
            flip_byte(pack, offset + size // 2)
            # A plan answers without reading blobs: still vouched for, until a read ...
            got = await stub.CalculateNAR(info.node)
            assert got.nar_sha256 == dep.nar_hash
            await first_get_is_cut(session, urls[0], dep)
            # ... found the damage: then neither gRPC nor the binary cache vouch for it.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CalculateNAR(info.node)
            assert err.value.code() == grpc.StatusCode.DATA_LOSS
            assert "damaged" in (err.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Get(rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=digest))
            assert err.value.code() == grpc.StatusCode.DATA_LOSS
            assert "damaged in this store" in (err.value.details() or "")
            assert await narinfo_status(session, daemon, dep) == 404
            await assert_refused(session, urls)
    assert daemon.alive()


async def test_pack_truncated_while_streaming_cuts_without_a_signal(
    bridges: Bridges, tmp_path: Path
) -> None:
    """A server reads packs with pread: a pack truncated mid-download is no SIGBUS."""
    bridge = bridges.start()
    tree = tmp_path / "big"
    tree.mkdir()
    (tree / "data").write_bytes(random.Random(12).randbytes(64 << 20))
    proc = subprocess.run(
        [TVIX, "import", str(tree)], capture_output=True, env=tvix_env(bridge.home), check=True
    )
    hash_part = Path(proc.stdout.decode().strip()).name[:32]
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(f"{bridge.url}/{hash_part}.narinfo") as resp:
            assert resp.status == 200
            url = f"{bridge.url}/{NarInfo.parse(await resp.read()).url}"
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.get(url) as resp:
                assert resp.status == 200
                assert len(await resp.content.readexactly(1 << 16)) == 1 << 16
                for pack in (bridge.home / "packs").iterdir():
                    os.truncate(pack, 1 << 20)
                while await resp.content.read(1 << 20):
                    pass
        assert bridge.alive(), bridge.log()
        async with session.get(url) as resp:
            assert resp.status == 410


async def test_a_made_up_node_url_marks_no_real_path(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    """A node URL with a wrong size fails to render; the real path stays served."""
    bridge = await uploaded(bridges, closure, tmp_path)
    single = closure.by_name("single")
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        urls = await nar_urls(session, bridge, single)
        text = urls[0].split("/nar/tvix-castore/", 1)[1].split("?", 1)[0]
        node = castore_pb2.Node()
        node.ParseFromString(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        node.file.size += 1
        raw = node.SerializeToString(deterministic=True)
        bad = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        with contextlib.suppress(aiohttp.ClientPayloadError):
            async with session.get(f"{bridge.url}/nar/tvix-castore/{bad}") as resp:
                assert resp.status != 200 or len(await resp.read()) != len(single.nar) + 1
        assert await narinfo_status(session, bridge, single) == 200
        await assert_served(session, urls, single)


def test_import_again_repairs_a_deleted_pack(tmp_path: Path) -> None:
    """The CLI alone: export fails cleanly on a lost pack; importing the tree again repairs it."""
    home = tmp_path / "home"
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a").write_bytes(b"alpha\n" * 100)
    (tree / "sub" / "b").write_bytes(random.Random(3).randbytes(300_000))
    env = tvix_env(home)

    def tvix(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([TVIX, *args], capture_output=True, env=env, check=False)

    imported = tvix("import", str(tree))
    assert imported.returncode == 0, imported.stderr
    store_path = imported.stdout.decode().strip()
    nar = tvix("export", store_path).stdout
    for pack in (home / "packs").iterdir():
        pack.unlink()
    broken = tvix("export", store_path)
    assert broken.returncode == 1 and broken.stdout == b""
    assert b"damaged" in broken.stderr and b"missing" in broken.stderr
    assert tvix("import", str(tree)).returncode == 0
    again = tvix("export", store_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout == nar
