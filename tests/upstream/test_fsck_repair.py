"""``tvix-store fsck --repair --upstream URL``: damaged paths fetched again from a real Nix cache.

The store is filled from the upstream closure (built by real Nix); a byte
is flipped in the frame holding a file of ``dep``, and ``dep``'s large
file (its chunk list) is dropped from the index. fsck finds both; ``--repair`` with a
binary cache made by ``nix copy --to file://`` (served over HTTP) drops the
damaged rows, ingests the paths again (verified against the NarHash the
store recorded), and a second fsck finds nothing: ``export`` gives the
original NARs again. Without a source, ``--repair`` drops the damaged rows
and still says the paths are damaged (exit 1).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import blake3

from tests.store.packs import damage_frame, frame_of
from tvix_castore.digests import B3Digest

from .conftest import CacheServers, Upstream, filled, fsck_json, ok, tvix


def _damage(home: Path) -> None:
    damage_frame(frame_of(home, B3Digest(blake3.blake3(b"hello from upstream\n").digest())))


def _drop_a_blob(home: Path, upstream: Upstream) -> None:
    dep = upstream.by_name("dep")
    big = (upstream.store / dep.path.lstrip("/") / "big").read_bytes()
    with sqlite3.connect(home / "store.sqlite") as db:
        gone = db.execute(
            "DELETE FROM pack_chunked WHERE digest = ?", (blake3.blake3(big).digest(),)
        )
        assert gone.rowcount == 1


def test_repair_from_an_upstream_cache(
    upstream: Upstream, servers: CacheServers, tmp_path: Path
) -> None:
    home = filled(upstream, tmp_path / "home")
    dep = upstream.by_name("dep")
    _damage(home)
    _drop_a_blob(home, upstream)
    code, report = fsck_json(home)
    assert code == 1 and len(report["damaged_frames"]) == 1
    damaged = {d["path"] for d in report["damaged_paths"]}
    assert dep.path in damaged
    assert tvix(home, "export", dep.path).returncode != 0

    server = servers.serve("zstd")
    code, report = fsck_json(home, "--repair", "--upstream", server.base)
    assert code == 0 and report["ok"], report
    assert set(report["repaired"]) == damaged
    # (the failed export already unindexed the damaged frame, as any failed read does)

    code, report = fsck_json(home, "--deep")
    assert code == 0 and report["ok"], report
    assert _marked(home, upstream) == set()
    for p in upstream.paths:
        assert ok(tvix(home, "export", p.path)) == p.nar, p.path


def test_repair_without_a_source_drops_the_damage_and_says_so(
    upstream: Upstream, tmp_path: Path
) -> None:
    home = filled(upstream, tmp_path / "home")
    dep = upstream.by_name("dep")
    _damage(home)
    code, report = fsck_json(home, "--repair")
    assert code == 1 and not report["ok"]
    assert report["unindexed"] >= 1 and report["repaired"] == {}
    code, report = fsck_json(home)
    assert code == 1 and report["damaged_frames"] == []  # (its rows were dropped)
    damaged = {d["path"]: d["why"] for d in report["damaged_paths"]}
    assert "missing" in damaged[dep.path]
    assert dep.path in _marked(home, upstream)


def test_repair_killed_at_any_point_is_finished_by_the_next(
    upstream: Upstream, servers: CacheServers, tmp_path: Path
) -> None:
    """kill -9 of a repair (while its first fetch waits, then at random moments)
    leaves a store the next ``fsck --repair`` repairs completely."""
    import random
    import signal
    import subprocess
    import threading
    import time

    from .conftest import TVIX, tvix_env

    home = filled(upstream, tmp_path / "home")
    _damage(home)
    _drop_a_blob(home, upstream)
    server = servers.serve("zstd")
    argv = [TVIX, "fsck", "--repair", "--upstream", server.base]

    server.gate = threading.Event()  # (answers wait: the repair is caught mid-way)
    proc = subprocess.Popen(argv, env=tvix_env(home), stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not server.requests and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.01)
        assert server.requests, "the repair never asked the upstream"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        server.gate.set()
        server.gate = None
    rng = random.Random(14)
    for _ in range(3):
        proc = subprocess.Popen(argv, env=tvix_env(home), stdout=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 1.0))  # (any moment will do: what follows must hold)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    code, report = fsck_json(home, "--repair", "--upstream", server.base)
    assert code == 0 and report["ok"], report
    code, report = fsck_json(home, "--deep")
    assert code == 0 and report["ok"], report
    assert _marked(home, upstream) == set()  # (nar-bridge would serve every narinfo)
    for p in upstream.paths:
        assert ok(tvix(home, "export", p.path)) == p.nar, p.path


def _marked(home: Path, upstream: Upstream) -> set[str]:
    """The paths the store holds marked damaged (NarService.damage)."""
    import asyncio

    from tvix_store.embedded import Embedded

    async def run() -> set[str]:
        store = Embedded(home)
        try:
            nar = store.nar(store.blobs(), store.directories())
            out = set()
            for p in upstream.paths:
                info = await store.pathinfos().get(p.digest)
                assert info is not None
                if await nar.damage(info.node) is not None:
                    out.add(p.path)
            return out
        finally:
            store.close()

    return asyncio.run(run())
