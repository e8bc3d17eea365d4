"""Pins, delete and gc on a store filled by real ``nix copy`` through nar-bridge.

The closure (``top`` → ``mid`` → ``dep``, plus ``single`` and ``alink``, built
by real Nix) is uploaded, an unrelated tree imported; then pins, deletes and
collections run through the CLI, and what remains is checked exactly: pinned
closures complete and served byte for byte to real Nix, everything else gone
(its NAR refused, its bytes off the disk), a dry run changing nothing.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

from nix_compat.signing import SigningKey
from tests.compat.oracle import DigestSink
from tvix_castore.packstore.compact import store_bytes

from .conftest import (
    NIX_HTTP_OPTS,
    TVIX,
    Bridge,
    Bridges,
    Closure,
    PathData,
    copy_to,
    nix_in,
    tvix_env,
)
from .test_damage import narinfo_status


def tvix(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [TVIX, *args],
        capture_output=True,
        text=True,
        env={**tvix_env(home), **(env or {})},
        check=False,
        timeout=300,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def gc(home: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    proc = tvix(home, "gc", "--json", *args, env=env)
    assert proc.returncode in (0, 75), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def files(home: Path) -> dict[str, bytes]:
    """Every data file of a store and its bytes (packs, database)."""
    out = {}
    for p in sorted(home.rglob("*")):
        if p.is_file() and not p.name.endswith(".lock"):
            out[str(p.relative_to(home))] = p.read_bytes()
    return out


def drop_index(home: Path) -> None:
    """Delete ``store.sqlite`` (and its WAL): the next open rebuilds it from the packs."""
    for name in os.listdir(home):
        if name.startswith("store.sqlite"):
            os.unlink(home / name)


def import_tree(home: Path, root: Path, marker: bytes) -> str:
    root.mkdir()
    (root / "secret.bin").write_bytes(marker)
    (root / "note").write_text("an unrelated tree\n")
    proc = tvix(home, "import", str(root))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


async def served(bridge: Bridge, p: PathData) -> int:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        return await narinfo_status(session, bridge, p)


def uploaded_home(bridges: Bridges, closure: Closure, tmp_path: Path) -> Path:
    bridge = bridges.start()
    copy_to(nix_in(tmp_path), closure, f"{bridge.url}?compression=none")
    bridge.stop()  # (its write lease goes with it)
    return bridge.home


def assert_nix_gets(
    bridges: Bridges, home: Path, closure: Closure, names: list[str], tmp: Path
) -> None:
    """Real Nix substitutes each named path from a bridge on ``home``, byte for byte."""
    bridge = bridges.start(home)
    nix = nix_in(tmp, f"reader-{len(list(tmp.glob('reader-*')))}")
    paths = [closure.by_name(n).path for n in names]
    nix.run(
        "nix",
        "copy",
        "--from",
        bridge.url,
        "--to",
        nix.store,
        "--no-check-sigs",
        *NIX_HTTP_OPTS,
        *paths,
    )
    for name in names:
        p = closure.by_name(name)
        sink = DigestSink()
        nix.stream_out(["nix", "store", "dump-path", "--store", str(nix.store), p.path], sink)
        assert sink.data == p.nar, name
    bridge.stop()


def test_pin_delete_gc_keep_exactly_the_pinned_closure(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    home = uploaded_home(bridges, closure, tmp_path)
    marker = random.Random(7).randbytes(300_000)  # (incompressible: stored as it is)
    imported = import_tree(home, tmp_path / "unrelated", marker)
    top, mid, dep = (closure.by_name(n) for n in ("top", "mid", "dep"))

    assert tvix(home, "pin", "add", "release", top.path).returncode == 0
    listed = tvix(home, "pin", "list", "--json")
    assert json.loads(listed.stdout) == {"release": [top.path]}

    # A dependency of a kept path is not deleted without naming that choice.
    refused = tvix(home, "delete", dep.path)
    assert refused.returncode == 1 and mid.path in refused.stderr, refused.stderr
    # ...nor a pinned one.
    pinned = tvix(home, "delete", "--with-referrers", dep.path)
    assert pinned.returncode == 1 and "pinned by release" in pinned.stderr, pinned.stderr

    # A dry run reports and changes nothing.
    before = files(home)
    code, dry = gc(home, "--dry-run", "--keep-since", "0", "--grace", "0")
    assert code == 0 and dry["dry_run"]
    others = {closure.by_name("single").path, closure.by_name("alink").path, imported}
    assert set(dry["deleted_paths"]) == others
    assert dry["blobs"] >= 2 and dry["content_bytes"] >= len(marker)
    assert files(home) == before

    code, report = gc(home, "--keep-since", "0", "--grace", "0")
    assert code == 0, report
    assert set(report["deleted_paths"]) == others
    assert report["kept_paths"] == 3 and report["pinned_paths"] == 3
    assert report["bytes_after"] < report["bytes_before"] - len(marker)
    assert store_bytes(home) == report["bytes_after"]
    assert all(marker[:4096] not in data for data in files(home).values())
    for gone in others:
        assert tvix(home, "info", gone).returncode != 0
    fsck = tvix(home, "fsck", "--deep", "--json")
    assert fsck.returncode == 0 and json.loads(fsck.stdout)["paths"] == 3, fsck.stdout
    assert_nix_gets(bridges, home, closure, ["top", "mid", "dep"], tmp_path)

    # A second collection finds nothing more to do.
    code, again = gc(home, "--keep-since", "0", "--grace", "0")
    assert code == 0 and again["deleted_paths"] == [] and again["blobs"] == 0, again

    # Unpinned, the closure ages out too; the pin's history remembers it.
    assert tvix(home, "pin", "rm", "release").returncode == 0
    history = tvix(home, "pin", "list", "--history", "--json")
    assert [(h["name"], h["action"]) for h in json.loads(history.stdout)] == [
        ("release", "set"),
        ("release", "removed"),
    ]
    code, last = gc(home, "--keep-since", "0", "--grace", "0")
    assert code == 0 and len(last["deleted_paths"]) == 3, last


def test_delete_removes_a_secret_from_the_disk(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    home = uploaded_home(bridges, closure, tmp_path)
    secret = random.Random(11).randbytes(200_000)
    path = import_tree(home, tmp_path / "secret-a8f3k2", secret)
    assert any(secret[:4096] in data for data in files(home).values())
    assert any(b"secret-a8f3k2" in data for data in files(home).values())

    deleted = tvix(home, "delete", path)
    assert deleted.returncode == 0 and path in deleted.stdout, deleted.stderr
    assert tvix(home, "info", path).returncode != 0
    # Without a collection, the deletion survives losing the index (a tombstone).
    drop_index(home)
    assert tvix(home, "info", path).returncode != 0
    assert tvix(home, "info", closure.by_name("top").path).returncode == 0

    code, report = gc(home, "--grace", "0")  # (keeps every path still there)
    assert code == 0 and report["purge_pending"] == [], report
    assert report["blobs"] >= 1 and report["content_bytes"] >= len(secret)
    for name, data in files(home).items():
        assert secret[:4096] not in data, name
        assert b"secret-a8f3k2" not in data, name
    fsck = tvix(home, "fsck", "--json")
    assert fsck.returncode == 0 and json.loads(fsck.stdout)["paths"] == len(closure.paths)
    # And a rebuild from the packs alone still does not bring it back.
    drop_index(home)
    assert tvix(home, "info", path).returncode != 0
    assert_nix_gets(bridges, home, closure, ["top", "single"], tmp_path)


async def test_a_path_referring_to_a_deleted_one_is_refused(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    home = uploaded_home(bridges, closure, tmp_path)
    dep, mid, top = (closure.by_name(n) for n in ("dep", "mid", "top"))
    deleted = tvix(home, "delete", "--with-referrers", dep.path)
    assert deleted.returncode == 0, deleted.stderr
    assert set(deleted.stdout.split()) >= {dep.path, mid.path, top.path}
    bridge = bridges.start(home)
    assert await served(bridge, mid) == 404
    async with aiohttp.ClientSession() as session:
        url = f"nar/{mid.nar_hash.hex()}.nar"
        from nix_compat import nixbase32

        url = f"{bridge.url}/nar/{nixbase32.encode(mid.nar_hash)}.nar"
        async with session.put(url, data=mid.nar) as resp:
            assert resp.status == 200, await resp.text()
        async with session.put(
            f"{bridge.url}/{mid.hash_part}.narinfo", data=mid.narinfo().render().encode()
        ) as resp:
            text = await resp.text()
            assert resp.status == 400 and dep.path in text and "deleted" in text, text
    # nix copy uploads the whole closure again (dep first): then all is well.
    copy_to(nix_in(tmp_path), closure, f"{bridge.url}?compression=none")
    for p in (dep, mid, top):
        assert await served(bridge, p) == 200


def test_gc_defers_while_a_writer_holds_a_lease(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    bridge = bridges.start()
    home = bridge.home
    copy_to(nix_in(tmp_path), closure, f"{bridge.url}?compression=none")
    garbage = import_tree(home, tmp_path / "garbage", random.Random(3).randbytes(50_000))
    assert tvix(home, "delete", garbage).returncode == 0
    code, report = gc(home, "--grace", "0")  # (the bridge wrote just now: its lease lives)
    assert code == 75 and "lease" in report["deferred"], report
    bridge.stop()
    code, report = gc(home, "--grace", "0")
    assert code == 0 and report["deferred"] is None, report
    assert report["blobs"] >= 1, report  # (the deferred run swept nothing: this one does)


def test_a_lease_of_a_writer_killed_with_kill_9_does_not_defer(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    """A writer killed with kill -9 leaves its lease row; gc sees its process is gone."""
    import signal
    import socket
    import sqlite3
    import subprocess
    import time

    home = uploaded_home(bridges, closure, tmp_path)
    garbage = import_tree(home, tmp_path / "garbage", random.Random(4).randbytes(50_000))
    assert tvix(home, "delete", garbage).returncode == 0
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        with sqlite3.connect(home / "store.sqlite") as db:
            db.execute(
                "INSERT INTO leases VALUES ('alive', ?, ?)",
                (f"pid {sleeper.pid} on {socket.gethostname()}", time.time() + 600),
            )
        code, report = gc(home, "--grace", "0")  # (a live holder: deferred)
        assert code == 75 and "lease" in report["deferred"], report
        sleeper.send_signal(signal.SIGKILL)
        sleeper.wait()
        code, report = gc(home, "--grace", "0")  # (its holder is gone: not deferred)
        assert code == 0 and report["deferred"] is None, report
        assert report["blobs"] >= 1, report
    finally:
        sleeper.kill()
        sleeper.wait()


def test_bad_arguments_are_clear_errors(bridges: Bridges, closure: Closure, tmp_path: Path) -> None:
    home = uploaded_home(bridges, closure, tmp_path)
    bad = tvix(home, "gc", "--grace", "soon")
    assert bad.returncode == 2 and "expected a duration" in bad.stderr
    bad = tvix(home, "pin", "add", "-x", closure.by_name("top").path)
    assert bad.returncode != 0
    bad = tvix(home, "pin", "add", "has space", closure.by_name("top").path)
    assert bad.returncode == 1 and "pin name" in bad.stderr
    missing = "/nix/store/" + "0" * 32 + "-nothing"
    bad = tvix(home, "pin", "add", "x", missing)
    assert bad.returncode == 1 and "not in this store" in bad.stderr
    bad = tvix(home, "delete", missing)
    assert bad.returncode == 1 and "not in this store" in bad.stderr
    bad = tvix(home, "pin", "rm", "nope")
    assert bad.returncode == 1 and "no pin named" in bad.stderr
    empty = tmp_path / "empty-home"
    bad = tvix(empty, "gc")
    assert bad.returncode == 1 and "no embedded store" in bad.stderr
    shutil.rmtree(empty, ignore_errors=True)


async def test_keep_since_keeps_what_was_served_and_its_closure(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    home = uploaded_home(bridges, closure, tmp_path)
    time.sleep(2.5)  # (everything is now older than --keep-since 2s...)
    bridge = bridges.start(home)
    assert await served(bridge, closure.by_name("top")) == 200  # (...but what is served now)
    bridge.stop()  # (accesses are written in batches, at the latest on exit)
    code, report = gc(home, "--keep-since", "2s", "--grace", "0")
    assert code == 0, report
    gone = {closure.by_name("single").path, closure.by_name("alink").path}
    assert set(report["deleted_paths"]) == gone
    for name in ("top", "mid", "dep"):  # (mid and dep: never served, kept as top's closure)
        assert tvix(home, "info", closure.by_name(name).path).returncode == 0
    assert_nix_gets(bridges, home, closure, ["top"], tmp_path)


def test_one_collection_at_a_time(bridges: Bridges, closure: Closure, tmp_path: Path) -> None:
    home = uploaded_home(bridges, closure, tmp_path)
    fd = os.open(home / "gc.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # (as a running collection holds it)
        busy = tvix(home, "gc")
        assert busy.returncode == 1 and "another garbage collection" in busy.stderr
    finally:
        os.close(fd)
    code, report = gc(home, "--grace", "0")
    assert code == 0 and report["deleted_paths"] == [], report


async def test_replaced_and_deleted_pathinfos_survive_compaction_and_rebuild(
    bridges: Bridges, closure: Closure, tmp_path: Path, keys: Any
) -> None:
    """The newest PathInfo record wins a rebuild, also after compaction moved records."""
    home = uploaded_home(bridges, closure, tmp_path)
    single, alink = closure.by_name("single"), closure.by_name("alink")
    # Replace single's PathInfo (a signature added, by a key the bridge trusts), delete alink.
    key = SigningKey.from_file(keys.one.secret_file)
    bridge = bridges.start(home, "--trusted-public-keys", keys.one.public)
    async with aiohttp.ClientSession() as session:
        body = single.narinfo().signed(key).render().encode()
        async with session.put(f"{bridge.url}/{single.hash_part}.narinfo", data=body) as resp:
            assert resp.status == 200, await resp.text()
    bridge.stop()
    signed = tvix(home, "info", "--json", single.path).stdout
    assert key.name in signed
    assert tvix(home, "delete", alink.path).returncode == 0
    assert tvix(home, "compact", "--recompress").returncode == 0
    drop_index(home)
    assert tvix(home, "info", "--json", single.path).stdout == signed
    assert tvix(home, "info", alink.path).returncode != 0
    assert tvix(home, "info", closure.by_name("top").path).returncode == 0
