"""``tvix-store fsck`` on a store filled by real ``nix copy`` through nar-bridge.

A closure with references (built by real Nix) is uploaded; fsck must pass a
whole store (also ``--deep``: every NAR rendered and compared with its
NarHash), and after a flipped byte or a truncated pack it must exit 1, name
the damaged frame and the damaged paths with why, and mark them, so the
running nar-bridge answers their narinfo 404 while every path it did not
report stays served byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import TVIX, Bridge, Bridges, Closure, copy_to, nix_in, tvix_env
from .test_damage import flip_byte, nar_urls, narinfo_status, packed_blob, uploaded


def fsck(home: Path, *flags: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [TVIX, "fsck", "--json", *flags],
        capture_output=True,
        env=tvix_env(home),
        check=False,
        timeout=300,
    )
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    return proc.returncode, json.loads(proc.stdout)


async def _check_served(bridge: Bridge, closure: Closure, damaged: set[str]) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for p in closure.paths:
            if p.path in damaged:
                assert await narinfo_status(session, bridge, p) == 404, p.path
                continue
            assert await narinfo_status(session, bridge, p) == 200, p.path
            for url in await nar_urls(session, bridge, p):
                async with session.get(url) as resp:
                    assert resp.status == 200
                    assert await resp.read() == p.nar


async def test_a_whole_store_passes(bridges: Bridges, closure: Closure, tmp_path: Path) -> None:
    bridge = await uploaded(bridges, closure, tmp_path)
    for flags in ((), ("--deep",)):
        code, report = fsck(bridge.home, *flags)
        assert code == 0 and report["ok"], report
        assert report["paths"] == len(closure.paths)
        assert report["damaged_paths"] == [] and report["damaged_frames"] == []
        assert report["bytes_verified"] >= sum(len(p.nar) for p in closure.paths) // 2
    await _check_served(bridge, closure, set())


async def test_flipped_byte_is_found_and_its_paths_marked(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    bridge = await uploaded(bridges, closure, tmp_path)
    dep = closure.by_name("dep")
    pack, offset, size = packed_blob(bridge.home, dep)
    flip_byte(pack, offset + size // 2)
    code, report = fsck(bridge.home)
    assert code == 1 and not report["ok"]
    assert [(f["pack"], f["offset"]) for f in report["damaged_frames"]] == [(pack.name, offset)]
    assert "check failed" in report["damaged_frames"][0]["reason"]
    damaged = {d["path"]: d["why"] for d in report["damaged_paths"]}
    assert dep.path in damaged and "blob" in damaged[dep.path], damaged
    await _check_served(bridge, closure, set(damaged))
    assert bridge.alive()


async def test_truncated_pack_is_found(bridges: Bridges, closure: Closure, tmp_path: Path) -> None:
    bridge = await uploaded(bridges, closure, tmp_path)
    dep = closure.by_name("dep")
    pack, offset, size = packed_blob(bridge.home, dep)
    os.truncate(pack, offset + size // 2)
    code, report = fsck(bridge.home, "--deep")
    assert code == 1
    assert any("truncated" in f["reason"] for f in report["damaged_frames"]), report
    damaged = {d["path"] for d in report["damaged_paths"]}
    assert dep.path in damaged
    await _check_served(bridge, closure, damaged)


async def test_repair_then_nix_copy_again_heals(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    """With no upstream, ``--repair`` drops the damaged rows; the damaged paths'
    narinfos 404, so a plain ``nix copy --to`` uploads them again, and those
    uploads store the bytes anew (no deduplication against the damage)."""
    bridge = await uploaded(bridges, closure, tmp_path)
    dep = closure.by_name("dep")
    pack, offset, size = packed_blob(bridge.home, dep)
    flip_byte(pack, offset + size // 2)
    code, report = fsck(bridge.home, "--repair")
    assert code == 1 and report["unindexed"] >= 1 and report["repaired"] == {}
    damaged = {d["path"] for d in report["damaged_paths"]}
    assert dep.path in damaged
    await _check_served(bridge, closure, damaged)
    copy_to(nix_in(tmp_path / "again"), closure, f"{bridge.url}?compression=none")
    code, report = fsck(bridge.home, "--deep")
    assert code == 0 and report["ok"], report
    await _check_served(bridge, closure, set())
