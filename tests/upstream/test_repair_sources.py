"""``fsck --repair``: each kind of damage, healed from a real Nix cache or from another tvix store.

The store is filled from the upstream closure (built by real Nix). Four
kinds of damage, one at a time: a flipped byte in a frame, a pack cut
short, a chunk of ``dep``'s large file and one of ``dep``'s Directories
gone from the index. fsck names the paths each breaks; ``--repair
--upstream`` heals them from the binary cache ``nix copy --to file://``
made (over HTTP), or from another tvix store: a daemon over gRPC, or
another embedded store on disk. A source that lacks the path or is itself
damaged is passed over for the next. Afterwards ``fsck --deep`` finds
nothing and ``export`` gives Nix's NARs byte for byte.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest

from tests.store.packs import damage_frame, frame_of
from tvix_castore.digests import B3Digest
from tvix_castore.packstore.reader import Chunked
from tvix_store.embedded import Embedded

from .conftest import (
    DAEMON_READY,
    CacheServers,
    Processes,
    Upstream,
    filled,
    fsck_json,
    ok,
    tvix,
)

HELLO = B3Digest(blake3.blake3(b"hello from upstream\n").digest())


def _unindex(home: Path, digest: bytes) -> None:
    with sqlite3.connect(home / "store.sqlite") as db:
        assert db.execute("DELETE FROM pack_blobs WHERE digest = ?", (digest,)).rowcount == 1


def _flip(home: Path, upstream: Upstream) -> None:
    damage_frame(frame_of(home, HELLO))


def _truncate(home: Path, upstream: Upstream) -> None:
    place = frame_of(home, HELLO)
    os.truncate(place.pack, place.offset + place.length // 2)


def _drop_chunk(home: Path, upstream: Upstream) -> None:
    big = (upstream.store / upstream.by_name("dep").path.lstrip("/") / "big").read_bytes()
    digest = blake3.blake3(big).digest()
    store = Embedded(home)
    try:
        loc = store.blobs().reader.locate([digest])[digest]
        assert isinstance(loc, Chunked) and len(loc.chunks) > 1
        chunk = loc.chunks[1].digest.raw
    finally:
        store.close()
    _unindex(home, chunk)


def _drop_directory(home: Path, upstream: Upstream) -> None:
    info = json.loads(ok(tvix(home, "info", "--json", upstream.by_name("dep").path)))
    store = Embedded(home)
    try:
        dirs = store.directories()
        (root,) = dirs.get_many_sync([B3Digest.parse(info["root"]["digest"])]).values()
        (sub,) = [d for d in root.directories if d.name == b"sub"]
        (sub_dir,) = dirs.get_many_sync([sub.digest]).values()
        (deeper,) = sub_dir.directories
    finally:
        store.close()
    _unindex(home, deeper.digest.raw)


DAMAGE: dict[str, tuple[Callable[[Path, Upstream], None], str]] = {
    "flipped byte": (_flip, "damaged bytes"),
    "truncated pack": (_truncate, ""),
    "missing chunk": (_drop_chunk, "missing"),
    "missing directory": (_drop_directory, "directory"),
}


def _assert_whole(home: Path, upstream: Upstream) -> None:
    code, report = fsck_json(home, "--deep")
    assert code == 0 and report["ok"], report
    for p in upstream.paths:
        assert ok(tvix(home, "export", p.path)) == p.nar, p.path


def _repair(home: Path, *sources: str) -> dict[str, Any]:
    """``fsck --repair`` from ``sources`` (in order), which must succeed; its report."""
    code, report = fsck_json(home, "--repair", *(a for s in sources for a in ("--upstream", s)))
    assert code == 0 and report["ok"], report
    return report


def _damaged(home: Path, upstream: Upstream, kind: str) -> set[str]:
    hurt, why = DAMAGE[kind]
    hurt(home, upstream)
    code, report = fsck_json(home)
    assert code == 1 and not report["ok"], report
    damaged = {d["path"]: d["why"] for d in report["damaged_paths"]}
    dep = upstream.by_name("dep").path
    assert dep in damaged, report
    if kind in ("flipped byte", "truncated pack"):
        assert report["damaged_frames"], report
    assert why in (damaged[dep] + json.dumps(report["damaged_frames"])), report
    return set(damaged)


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_damage_is_found_and_repaired_from_a_nix_cache(
    kind: str, upstream: Upstream, servers: CacheServers, tmp_path: Path
) -> None:
    home = filled(upstream, tmp_path / "home")
    damaged = _damaged(home, upstream, kind)
    server = servers.serve("zstd")
    report = _repair(home, server.base)
    assert report["repaired"] == dict.fromkeys(damaged, server.base)
    _assert_whole(home, upstream)


def test_repair_from_a_daemon_over_another_store(
    upstream: Upstream, processes: Processes, tmp_path: Path
) -> None:
    home = filled(upstream, tmp_path / "home")
    other = filled(upstream, tmp_path / "other")
    damaged = _damaged(home, upstream, "missing chunk") | _damaged(home, upstream, "flipped byte")
    # A store without these paths first, so the daemon after it is asked ...
    empty = tmp_path / "unrelated"
    (tmp_path / "a-file").write_bytes(b"unrelated\n")
    ok(tvix(empty, "import", tmp_path / "a-file"))
    daemon = processes.start(other, ["daemon", "-l", "127.0.0.1:0"], DAEMON_READY)
    # (and before both, a daemon that is not there: unreachable, passed over)
    sources = ["grpc+http://127.0.0.1:1", f"embedded://{empty}", f"grpc+http://{daemon.address}"]
    report = _repair(home, *sources)
    assert report["repaired"] == dict.fromkeys(damaged, sources[2])
    _assert_whole(home, upstream)


def test_a_damaged_store_is_passed_over_for_the_next_source(
    upstream: Upstream, servers: CacheServers, tmp_path: Path
) -> None:
    home = filled(upstream, tmp_path / "home")
    other = filled(upstream, tmp_path / "other")
    _flip(other, upstream)  # (the same bytes damaged there too)
    damaged = _damaged(home, upstream, "flipped byte")
    server = servers.serve("xz")
    report = _repair(home, f"embedded://{other}", server.base)
    assert report["repaired"][upstream.by_name("dep").path] == server.base
    assert set(report["repaired"]) == damaged
    _assert_whole(home, upstream)

    # And a healthy embedded store on its own heals the other one.
    report = _repair(other, f"embedded://{home}")
    assert report["repaired"][upstream.by_name("dep").path] == f"embedded://{home}"
    _assert_whole(other, upstream)


def test_bad_sources_are_refused_before_anything_is_changed(
    upstream: Upstream, tmp_path: Path
) -> None:
    home = filled(upstream, tmp_path / "home")
    _flip(home, upstream)
    before = (home / "store.sqlite").read_bytes()
    for url, message in [
        ("ftp://example.org/cache", "not a repair source"),
        (f"embedded://{home}", "is the store being repaired"),
        (f"embedded://{tmp_path / 'nothing'}", "no embedded store"),
        ("grpc+http://127.0.0.1:1/x", "path"),
    ]:
        proc = tvix(home, "fsck", "--repair", "--upstream", url)
        assert proc.returncode == 1, (url, proc)
        assert message in proc.stderr.decode(), (url, proc.stderr)
        assert b"Traceback" not in proc.stderr
    assert (home / "store.sqlite").read_bytes() == before
    code, _ = fsck_json(home)
    assert code == 1
