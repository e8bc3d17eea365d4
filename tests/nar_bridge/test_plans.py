"""nar-bridge serves whole NARs from NAR plans (real bridge, real ``nix copy``).

An upload records a plan vouching for the NarHash it was checked against; a
GET of a path without one renders, then records a plan that vouches for
nothing (``export`` replaces it after hashing).
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import subprocess
from pathlib import Path

import aiohttp
import pytest

from nix_compat.narinfo import NarInfo
from tests.store.packs import damage_frame, files_under, frame_of, planned_roots
from tests.storefiles import forget_directories

from .conftest import TVIX, Bridge, Bridges, Closure, PathData, copy_to, nix_in, tvix_env

ZERO = bytes(32)


def plans(home: Path) -> dict[bytes, bytes]:
    """Root digest of each path with plans → the NAR sha256 they vouch for (zeros: none)."""
    return planned_roots(home)


def forget_plans(home: Path) -> None:
    with contextlib.closing(sqlite3.connect(home / "store.sqlite")) as conn:
        conn.execute("DELETE FROM nar_dirplans")
        conn.execute("DELETE FROM nar_roots")
        conn.commit()


async def fetch_nar(session: aiohttp.ClientSession, bridge: Bridge, p: PathData) -> bytes:
    async with session.get(f"{bridge.url}/{p.hash_part}.narinfo") as resp:
        assert resp.status == 200
        info = NarInfo.parse(await resp.read())
    async with session.get(f"{bridge.url}/{info.url}") as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.read()
        assert int(resp.headers["Content-Length"]) == len(body)
        return body


def export_debug(home: Path, store_path: str) -> subprocess.CompletedProcess[bytes]:
    """``tvix-store --log-level DEBUG export STORE_PATH`` (must succeed)."""
    proc = subprocess.run(
        [TVIX, "--log-level", "DEBUG", "export", store_path],
        capture_output=True,
        env=tvix_env(home),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def directory_paths(closure: Closure) -> list[PathData]:
    # A NAR of a directory starts with its "type directory" token after the magic.
    return [p for p in closure.paths if p.nar[40:80].find(b"directory") >= 0]


async def test_upload_records_vouched_plans_and_get_serves_them(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    bridge = bridges.start()
    copy_to(nix_in(tmp_path), closure, f"{bridge.url}?compression=none")
    dirs = directory_paths(closure)
    assert dirs, "the closure has directory paths"
    recorded = plans(bridge.home)
    assert sorted(recorded.values()) == sorted(hashlib.sha256(p.nar).digest() for p in dirs)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for p in closure.paths:
            assert await fetch_nar(session, bridge, p) == p.nar, p.path
    # And `tvix-store export` of the same store uses them (they vouch for the NarHash):
    # with every Directory gone, only a plan can give the NAR.
    assert forget_directories(bridge.home / "store.sqlite") > 0
    for p in dirs:
        proc = export_debug(bridge.home, p.path)
        assert proc.stdout == p.nar


async def test_get_without_plan_renders_then_records_an_unvouched_one(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    bridge = bridges.start()
    copy_to(nix_in(tmp_path), closure, f"{bridge.url}?compression=none")
    forget_plans(bridge.home)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for p in closure.paths:
            assert await fetch_nar(session, bridge, p) == p.nar
        recorded = plans(bridge.home)
        assert len(recorded) == len(directory_paths(closure))
        assert set(recorded.values()) == {ZERO}
        for p in closure.paths:  # now from the plans
            assert await fetch_nar(session, bridge, p) == p.nar
    # export does not trust an unvouched plan: it renders, checks, and replaces it.
    p = directory_paths(closure)[0]
    proc = export_debug(bridge.home, p.path)
    assert proc.stdout == p.nar
    # rendered (checked) and replaced by a plan that vouches for the NAR
    assert hashlib.sha256(p.nar).digest() in plans(bridge.home).values()


async def test_corrupt_pack_cuts_the_planned_stream(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    bridge = bridges.start()
    copy_to(nix_in(tmp_path), closure, f"{bridge.url}?compression=none")
    victim = None
    for root, sha in plans(bridge.home).items():
        for p in directory_paths(closure):
            if sha == hashlib.sha256(p.nar).digest() and (files := files_under(bridge.home, root)):
                victim = (p, files[0])
    assert victim is not None, "a directory path with a file"
    p, blob = victim
    damage_frame(frame_of(bridge.home, blob))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            await fetch_nar(session, bridge, p)
        assert bridge.alive(), bridge.log()
        async with session.get(f"{bridge.url}/nix-cache-info") as resp:  # still serving
            assert resp.status == 200


async def test_range_and_head_come_from_the_plan(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    """With the Directories gone, only the plan can answer: ranges and HEAD still work."""
    bridge = bridges.start()
    copy_to(nix_in(tmp_path), closure, f"{bridge.url}?compression=none")
    p = max(directory_paths(closure), key=lambda p: len(p.nar))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(f"{bridge.url}/{p.hash_part}.narinfo") as resp:
            url = f"{bridge.url}/{NarInfo.parse(await resp.read()).url}"
        forget_directories(bridge.home / "store.sqlite")
        async with session.head(url) as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == len(p.nar)
        n = len(p.nar)
        for first, last in [(0, 9), (n // 3, n // 2), (n - 17, n - 1)]:
            async with session.get(url, headers={"Range": f"bytes={first}-{last}"}) as resp:
                assert resp.status == 206
                assert resp.headers["Content-Range"] == f"bytes {first}-{last}/{n}"
                assert await resp.read() == p.nar[first : last + 1]
        async with session.get(url, headers={"Range": "bytes=0-1,5-9"}) as resp:
            assert resp.status == 200  # several ranges: the whole NAR
            assert await resp.read() == p.nar
