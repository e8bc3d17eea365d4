"""NAR plans: ``tvix-store export`` from plans per Directory (real CLI, real Nix).

Plans are recorded when a path is imported (and when one is first exported
without them); export then writes from them, reading blobs through the pack
store's reader. These tests check that the bytes equal ``nix-store --dump``,
that plans missing, corrupt or with stale location hints fall back (to
rendering, or to locating the blob), that corrupt content fails the export
with a clear message instead of wrong bytes, and that store paths sharing
directories share their plans.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.compat.oracle import DigestSink, Nix, assert_same_nar
from tests.storefiles import forget_directories
from tvix_castore.blobservice.base import writev_all
from tvix_castore.blobservice.objectstore import raw_frame_pieces
from tvix_castore.digests import B3Digest
from tvix_castore.errors import IngestionError
from tvix_store.nar.dirplan import DirPlan, FileRef, Hint
from tvix_store.nar.plancache import PlanCache

from .conftest import TVIX, export_to, ok, stored_infos, tvix, tvix_env
from .packs import damage_frame, frame_of, plan_bytes, vouched

MiB = 1 << 20


def make_tree(root: Path, *, big: int) -> Path:
    """Small text files, executables, symlinks, empty files, compressible and random
    chunked files, and (with ``big``) a random file of that size."""
    rng = random.Random(7)
    root.mkdir()
    for d in range(6):
        sub = root / f"dir{d}" / "nested"
        sub.mkdir(parents=True)
        for i in range(40):
            (sub / f"f{i}.txt").write_bytes(f"file {d}/{i}\n".encode() * rng.randrange(1, 400))
        (sub / "empty").write_bytes(b"")
        exe = sub / "run.sh"
        exe.write_bytes(b"#!/bin/sh\necho hi\n")
        exe.chmod(0o755)
        (root / f"dir{d}" / "link").symlink_to("nested/f1.txt")
    (root / "text-300k").write_bytes(b"compressible line of text\n" * 12000)
    (root / "random-700k").write_bytes(rng.randbytes(700 * 1024))
    if big:
        (root / "big.bin").write_bytes(rng.randbytes(big))
    return root


def import_tree(home: Path, path: Path) -> str:
    return ok(tvix(home, "import", path)).decode().strip()


def forget_plans(home: Path) -> None:
    """Drop every plan (a cache): the next export renders."""
    with sqlite3.connect(home / "store.sqlite") as conn:
        conn.execute("DELETE FROM nar_dirplans")
        conn.execute("DELETE FROM nar_roots")


def export_nar(home: Path, store_path: str) -> DigestSink:
    """``tvix-store export STORE_PATH`` (must succeed; its debug log shows if not)."""
    sink = DigestSink()
    proc = subprocess.run(
        [TVIX, "--log-level", "DEBUG", "export", store_path],
        capture_output=True,
        env=tvix_env(home),
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    sink.write(proc.stdout)
    return sink


def only_the_plan_left(home: Path) -> None:
    """Delete every Directory: an export that still succeeds was written from its plan."""
    assert forget_directories(home / "store.sqlite") > 0


def nix_dump(nix: Nix, path: Path) -> DigestSink:
    sink = DigestSink()
    nix.dump(path, sink)
    return sink


@pytest.mark.parametrize("big", [0, 40 * MiB], ids=["small", "chunked"])
def test_export_from_plans_matches_nix(tmp_path: Path, home: Path, nix: Nix, big: int) -> None:
    tree = make_tree(tmp_path / "tree", big=big)
    store_path = import_tree(home, tree)
    assert len(vouched(home)) == 1
    only_the_plan_left(home)  # so the export below can only come from plans
    ours = export_nar(home, store_path)
    assert_same_nar(ours, nix_dump(nix, tree), "export from plans")


def test_export_without_plans_renders_then_records_them(
    tmp_path: Path, home: Path, nix: Nix
) -> None:
    tree = make_tree(tmp_path / "tree", big=0)
    store_path = import_tree(home, tree)
    want = nix_dump(nix, tree)
    forget_plans(home)
    assert_same_nar(export_nar(home, store_path), want, "rendered export")
    assert list(vouched(home).values()) == [want.digest]
    only_the_plan_left(home)
    assert_same_nar(export_nar(home, store_path), want, "export from the recorded plans")


def test_corrupt_plan_is_ignored(tmp_path: Path, home: Path, nix: Nix) -> None:
    tree = make_tree(tmp_path / "tree", big=0)
    store_path = import_tree(home, tree)
    with sqlite3.connect(home / "store.sqlite") as conn:
        digest, plan = conn.execute("SELECT digest, plan FROM nar_dirplans LIMIT 1").fetchone()
        bad = bytearray(plan)
        bad[len(bad) // 2] ^= 0xFF
        conn.execute("UPDATE nar_dirplans SET plan = ? WHERE digest = ?", (bytes(bad), digest))
    assert_same_nar(export_nar(home, store_path), nix_dump(nix, tree), "export past a bad plan")


def _rewrite_hints(home: Path, change: Any) -> int:
    """Replace every file's hint in the stored plans by ``change(hint)``; how many changed."""
    cache = PlanCache(home / "store.sqlite")
    try:
        with sqlite3.connect(home / "store.sqlite") as conn:
            digests = [bytes(d) for (d,) in conn.execute("SELECT digest FROM nar_dirplans")]
        plans = cache.get_many(digests)
        changed = 0
        out: dict[bytes, DirPlan] = {}
        for raw, plan in plans.items():
            items = []
            for item in plan.items:
                if isinstance(item, FileRef) and item.hint.frame:
                    item = item._replace(hint=change(item.hint))
                    changed += 1
                items.append(item)
            out[raw] = DirPlan(plan.literals, plan.ends, tuple(items), plan.size)
        cache.put_many(out)
        return changed
    finally:
        cache.close()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda h: Hint(h.frame, h.offset + 1), id="wrong-offset"),
        pytest.param(lambda h: Hint(h.frame + 1_000_000, h.offset), id="frame-gone"),
        pytest.param(lambda h: Hint(1 if h.frame != 1 else 2, 0), id="other-frame"),
    ],
)
def test_stale_hints_fall_back_to_locating(
    tmp_path: Path, home: Path, nix: Nix, change: Any
) -> None:
    """Compaction moves blobs: a plan's hint that no longer holds is only a slower read."""
    tree = make_tree(tmp_path / "tree", big=0)
    store_path = import_tree(home, tree)
    assert _rewrite_hints(home, change) > 100
    assert _stale_hints(home) > 100
    only_the_plan_left(home)
    want = nix_dump(nix, tree)
    assert_same_nar(export_nar(home, store_path), want, "export, stale hints")
    # The export wrote the plans again with the hints it found: later ones read directly.
    assert _stale_hints(home) == 0
    assert_same_nar(export_nar(home, store_path), want, "export, refreshed hints")


def _stale_hints(home: Path) -> int:
    """Files in the stored plans whose hint does not name where their blob is."""
    from tvix_castore.errors import DataCorruption
    from tvix_castore.packstore.reader import Member
    from tvix_store.embedded import Embedded

    store = Embedded(home)
    try:
        reader = store.blobs().reader
        with sqlite3.connect(home / "store.sqlite") as conn:
            digests = [bytes(d) for (d,) in conn.execute("SELECT digest FROM nar_dirplans")]
        files = [f for p in store.plans().get_many(digests).values() for f in p.files]
        frames = reader.frame_by_id([f.hint.frame for f in files if f.hint.frame])
        stale = 0
        for f in files:
            ref = frames.get(f.hint.frame)
            if ref is None:
                stale += f.hint.frame != 0
                continue
            try:
                reader.member(f.digest, Member(ref, f.hint.offset, f.size))
            except DataCorruption:
                stale += 1
        return stale
    finally:
        store.close()


def _one_file(tree: Path, name: str) -> B3Digest:
    import blake3

    return B3Digest(blake3.blake3((tree / name).read_bytes()).digest())


def test_corrupt_frame_fails_export(tmp_path: Path, home: Path) -> None:
    tree = make_tree(tmp_path / "tree", big=0)
    store_path = import_tree(home, tree)
    victim = _one_file(tree, "dir2/nested/f3.txt")
    damage_frame(frame_of(home, victim))
    proc = tvix(home, "export", store_path)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert "blob" in err and ("damaged" in err or "checksum" in err or "corrupt" in err), err
    assert len(proc.stdout) < sum(f.stat().st_size for f in tree.rglob("*") if f.is_file())


def test_corrupt_chunk_fails_export(tmp_path: Path, home: Path) -> None:
    tree = make_tree(tmp_path / "tree", big=0)
    store_path = import_tree(home, tree)
    damage_frame(frame_of(home, _one_file(tree, "random-700k")))
    proc = tvix(home, "export", store_path)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert "blob" in err, err


def test_export_into_a_pipe_matches(tmp_path: Path, home: Path, nix: Nix) -> None:
    tree = make_tree(tmp_path / "tree", big=3 * MiB)
    store_path = import_tree(home, tree)
    sink = DigestSink()
    export_to(home, store_path, sink)
    assert_same_nar(sink, nix_dump(nix, tree), "export into a pipe")


def test_paths_sharing_directories_share_plans(tmp_path: Path, home: Path, nix: Nix) -> None:
    """A second release with one file changed deep down adds plans for the changed
    directories only (the file's and its ancestors'): a small fraction of the first."""
    rng = random.Random(5)
    first = tmp_path / "v1"
    for d in range(40):
        for e in range(5):
            sub = first / "pkg" / f"mod{d}" / f"sub{e}"
            sub.mkdir(parents=True)
            for i in range(20):
                (sub / f"f{i}.py").write_bytes(rng.randbytes(20).hex().encode() * 20)
    import_tree(home, first)
    one = plan_bytes(home)
    second = tmp_path / "v2"
    subprocess.run(["cp", "-a", str(first), str(second)], check=True)
    (second / "pkg" / "mod7" / "sub3" / "f2.py").write_bytes(b"changed\n")
    sp2 = import_tree(home, second)
    added = plan_bytes(home) - one
    assert 0 < added < one * 0.02, (added, one)
    only_the_plan_left(home)
    assert_same_nar(export_nar(home, sp2), nix_dump(nix, second), "the second release")


def test_import_does_not_hash_a_corrupt_stored_blob(tmp_path: Path, home: Path) -> None:
    """Blobs an import finds already stored are read back verified before their bytes
    count in its NarHash: a damaged one fails the import (nothing recorded)."""
    first = make_tree(tmp_path / "first", big=0)
    import_tree(home, first)
    damage_frame(frame_of(home, _one_file(first, "dir1/nested/f5.txt")))
    second = make_tree(tmp_path / "second", big=0)  # the same small files
    (second / "more").write_bytes(b"and one more\n")
    proc = tvix(home, "import", second)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in err, err
    assert "blob" in err, err
    assert len(stored_infos(home)) == 1


# -- import: a tree that changes while it is imported -------------------------------
def unplanned_store_urls(tmp_path: Path) -> tuple[str, str, str]:
    """Services without packs or plans: import reads the tree twice (ingest, NAR hash)."""
    return (
        f"objectstore+file://{tmp_path / 'blobs'}",
        f"sqlite://{tmp_path / 'dirs.sqlite'}",
        f"sqlite://{tmp_path / 'pathinfo.sqlite'}",
    )


def test_import_fails_if_a_file_changes_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tvix_store import importer
    from tvix_store.config import open_store

    tree = make_tree(tmp_path / "tree", big=0)
    victim = tree / "dir3" / "nested" / "f7.txt"
    real = importer.nar_hash_path  # type: ignore[attr-defined]

    def hash_while_someone_writes(path: str | os.PathLike[str]) -> tuple[int, bytes]:
        result = real(path)
        # A concurrent writer, after both reads: same size, other bytes, other mtime.
        data = victim.read_bytes()
        victim.write_bytes(data[::-1])
        os.utime(victim, ns=(1, 1))
        return result

    monkeypatch.setattr(importer, "nar_hash_path", hash_while_someone_writes)

    async def run() -> int:
        store = await open_store(*unplanned_store_urls(tmp_path))
        async with store:
            assert store.nar.plans is None
            with pytest.raises(IngestionError, match="changed while it was being imported"):
                await importer.import_path(tree, store)
            return len([i async for i in store.pathinfos.list()])

    assert asyncio.run(run()) == 0


def test_embedded_import_hashes_what_it_stored(
    tmp_path: Path, home: Path, nix: Nix, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded store hashes the NAR from its packs: a file changed after it was read
    changes nothing recorded (NarHash, store path and export all describe what was read)."""
    from tvix_store import importer
    from tvix_store.config import open_store

    tree = make_tree(tmp_path / "tree", big=0)
    before = nix_dump(nix, tree)
    want = nix.run("nix-store", *nix.store_args, "--add", tree).decode().strip()
    victim = tree / "dir3" / "nested" / "f7.txt"
    real = importer.upload_files  # type: ignore[attr-defined]

    async def upload_then_someone_writes(*args: Any, **kwargs: Any) -> None:
        await real(*args, **kwargs)
        victim.write_bytes(b"changed after it was read\n")

    monkeypatch.setattr(importer, "upload_files", upload_then_someone_writes)

    async def run() -> tuple[str, int, bytes]:
        store = await open_store(home=home)
        async with store:
            assert store.nar.plans is not None
            info = await importer.import_path(tree, store)
            return info.store_path.absolute, info.nar_size, info.nar_sha256

    printed, nar_size, nar_sha256 = asyncio.run(run())
    assert (nar_size, nar_sha256) == (before.size, before.digest)
    assert printed == want
    ours = DigestSink(keep=False)
    export_to(home, printed, ours)
    assert (ours.size, ours.digest) == (before.size, before.digest)


@pytest.mark.parametrize("racy", [False, True])
def test_import_nar_hash_source(
    tmp_path: Path, nix: Nix, monkeypatch: pytest.MonkeyPatch, racy: bool
) -> None:
    """Without packs: files older than the racy window: NarHash from the tree; fresh ones:
    from castore."""
    from tvix_castore import ingest
    from tvix_store import importer
    from tvix_store.config import open_store

    tree = make_tree(tmp_path / "tree", big=0)
    # The window decides; the tree was just written, so it is racy unless the window is empty.
    monkeypatch.setattr(ingest, "_RACY_NS", 1_000_000_000 if racy else -(10**18))
    calls: list[object] = []
    real = importer.calculate_nar  # type: ignore[attr-defined]

    async def counting(*args: Any, **kwargs: Any) -> tuple[int, bytes]:
        calls.append(args)
        return await real(*args, **kwargs)

    monkeypatch.setattr(importer, "calculate_nar", counting)

    async def run() -> str:
        store = await open_store(*unplanned_store_urls(tmp_path))
        async with store:
            info = await importer.import_path(tree, store)
            return info.store_path.absolute

    printed = asyncio.run(run())
    assert printed == nix.run("nix-store", *nix.store_args, "--add", tree).decode().strip()
    assert len(calls) == (1 if racy else 0)


# -- pieces of the writer --------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "raw"),
    [
        (random.Random(1).randbytes(300_000), True),  # several raw blocks
        (random.Random(2).randbytes(100), True),
        (b"", True),
        (b"abc" * 100_000, False),  # compressed blocks
    ],
)
def test_raw_frame_pieces(data: bytes, raw: bool) -> None:
    frame = zstandard.ZstdCompressor(level=3).compress(data)
    pieces = raw_frame_pieces(frame)
    assert (pieces is not None) == raw
    if pieces is not None:
        assert b"".join(pieces) == data


def test_raw_frame_pieces_rejects_damaged_frames() -> None:
    data = random.Random(3).randbytes(200_000)
    frame = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    pieces = raw_frame_pieces(frame)
    assert pieces is not None and b"".join(pieces) == data  # a checksum is allowed
    assert raw_frame_pieces(frame[:-5]) is None  # truncated
    assert raw_frame_pieces(frame + b"x") is None  # trailing bytes
    assert raw_frame_pieces(b"not zstd at all") is None


def test_writev_all_resumes_after_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.writev

    def at_most_7(fd: int, buffers: list[bytes | memoryview]) -> int:
        head = b"".join(bytes(b) for b in buffers)[:7]
        return real(fd, [head])

    monkeypatch.setattr(os, "writev", at_most_7)
    parts: list[bytes | memoryview] = [b"abc", memoryview(b"defghij"), b"", b"klmnopqrstuvwxyz"]
    with open(tmp_path / "out", "wb") as f:
        writev_all(f.fileno(), parts, sum(len(p) for p in parts))
    assert (tmp_path / "out").read_bytes() == b"abcdefghijklmnopqrstuvwxyz"


def test_export_memory_stays_flat_for_a_large_compressible_file(
    tmp_path: Path, home: Path, nix: Nix
) -> None:
    """160 MiB of text compresses to almost nothing: it must still be streamed."""
    tree = make_tree(tmp_path / "tree", big=0)
    line = b"the same compressible line, again and again and again\n"
    with open(tree / "huge.txt", "wb") as f:
        for _ in range(160 * MiB // (len(line) * 1024)):
            f.write(line * 1024)
    store_path = import_tree(home, tree)
    peak = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [TVIX, "export", store_path], stdout=out, stderr=err, env=tvix_env(home)
        )
        while proc.poll() is None:
            pids = [proc.pid, *_children(proc.pid)]
            peak = max(peak, sum(_rss_anon_kib(p) for p in pids))
            time.sleep(0.002)
        err.seek(0)
        assert proc.wait() == 0, err.read()
        size = out.tell()
    assert size > 160 * MiB
    out_sink = DigestSink()
    export_to(home, store_path, out_sink)
    assert_same_nar(out_sink, nix_dump(nix, tree), "export of a large compressible file")
    # Interpreter, plans, a few decoded 4 MiB frames and an 8 MiB write batch.
    assert peak < 150 * 1024, f"peak anonymous RSS {peak // 1024} MiB"


def _rss_anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


@pytest.mark.parametrize("planned", [True, False], ids=["from-plan", "rendered"])
def test_export_to_a_full_disk_fails_cleanly(tmp_path: Path, home: Path, planned: bool) -> None:
    tree = make_tree(tmp_path / "tree", big=0)
    store_path = import_tree(home, tree)
    if not planned:
        forget_plans(home)
    with open("/dev/full", "wb") as full:
        proc = subprocess.run(
            [TVIX, "export", store_path],
            stdout=full,
            stderr=subprocess.PIPE,
            env=tvix_env(home),
            check=False,
        )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1
    assert "Traceback" not in err, err
    assert "cannot write the NAR to stdout: No space left on device" in err


# -- the export fast path -------------------------------------------------------
def test_export_from_a_plan_runs_no_event_loop(tmp_path: Path, home: Path, nix: Nix) -> None:
    """With the embedded store, export writes from the plan without loading asyncio."""
    tree = make_tree(tmp_path / "tree", big=0)
    store_path = import_tree(home, tree)
    probe = (
        "import sys\n"
        "from tvix_store.cli import main\n"
        "sys.argv = ['tvix-store', '--log-level', 'DEBUG', 'export', sys.argv[1]]\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    print('asyncio loaded:', 'asyncio' in sys.modules, file=sys.stderr)\n"
    )

    def export() -> tuple[bytes, str]:
        proc = subprocess.run(
            [sys.executable, "-c", probe, store_path],
            capture_output=True,
            env=tvix_env(home),
            timeout=60,
            check=False,
        )
        err = proc.stderr.decode()
        assert proc.returncode == 0, err
        return proc.stdout, err

    nar, err = export()
    assert "asyncio loaded: False" in err, err  # (the probe's line, not a log line)
    ours = DigestSink()
    ours.write(nar)
    assert_same_nar(ours, nix_dump(nix, tree), "export without an event loop")
    # Without a vouching plan the general way runs (and records one).
    forget_plans(home)
    rendered, err = export()
    assert "asyncio loaded: True" in err, err
    assert rendered == ours.data


@pytest.mark.parametrize("arg", ["{sp}/dir0", "{sp}/dir0/link"])
def test_export_of_a_path_inside_a_store_path(tmp_path: Path, home: Path, arg: str) -> None:
    store_path = import_tree(home, make_tree(tmp_path / "tree", big=0))
    proc = tvix(home, "export", arg.format(sp=store_path))
    assert proc.returncode != 0 and proc.stdout == b""
    assert "export takes a store path, not a path inside one" in proc.stderr.decode()


def test_directories_shared_within_a_tree(tmp_path: Path, home: Path, nix: Nix) -> None:
    """The same Directory under several parents (met in any order) has one plan, made
    before any parent's."""
    tree = tmp_path / "tree"
    for top in ("a", "m", "z"):
        for mid in ("p", "q"):
            sub = tree / top / mid / "same"
            sub.mkdir(parents=True)
            (sub / "f").write_bytes(b"identical everywhere\n")
        (tree / top / "own").write_bytes(top.encode() * 100)
    store_path = import_tree(home, tree)
    assert len(vouched(home)) == 1
    only_the_plan_left(home)
    assert_same_nar(export_nar(home, store_path), nix_dump(nix, tree), "shared directories")


def test_plans_of_directories_sharing_a_digest_prefix_never_mix(tmp_path: Path) -> None:
    """Plan rows are keyed by the first 8 bytes of the Directory digest: two
    Directories sharing them evict each other's plan, and a row is only ever
    used for the digest it was made for (a miss otherwise, never another plan)."""
    a, b = b"\x01" * 8 + b"a" * 24, b"\x01" * 8 + b"b" * 24
    plan_a = DirPlan(b"literal a", (4,), (FileRef(b"x" * 32, 3, Hint(1, 0)),), 12)
    plan_b = DirPlan(b"literal b!", (), (), 10)
    cache = PlanCache(tmp_path / "store.sqlite")
    try:
        cache.put_many({a: plan_a})
        assert cache.get_many([a, b]) == {a: plan_a}
        cache.put_many({b: plan_b})
        assert cache.get_many([a]) == {}
        assert cache.get_many([a, b]) == {b: plan_b}
    finally:
        cache.close()


def test_plan_cache_stays_within_its_bound(tmp_path: Path, home: Path, nix: Nix) -> None:
    """``TVIX_STORE_PLAN_CACHE_BYTES``: past it, plans are evicted (and a NAR whose
    plans went is rendered again, byte-exact); 0 keeps none; a bad value is refused."""
    bound = 6_000
    env = {"TVIX_STORE_PLAN_CACHE_BYTES": str(bound)}
    trees = [make_tree(tmp_path / f"t{i}", big=0) for i in range(3)]
    for i, t in enumerate(trees):
        (t / "own").write_bytes(f"tree {i}\n".encode() * 50)
    unbounded = tmp_path / "unbounded-home"
    for t in trees:
        ok(tvix(unbounded, "import", t))
    assert plan_bytes(unbounded) > 2 * bound  # (so the bound below must evict)
    paths = [ok(tvix(home, "import", t, extra_env=env)).decode().strip() for t in trees]
    assert 0 < plan_bytes(home) <= bound
    for t, p in zip(trees, paths, strict=True):
        proc = tvix(home, "export", p, extra_env=env)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        ours = DigestSink()
        ours.write(proc.stdout)
        assert_same_nar(ours, nix_dump(nix, t), f"export of {p} with a small plan cache")
        assert plan_bytes(home) <= bound
    none = tmp_path / "none-home"
    ok(tvix(none, "import", trees[0], extra_env={"TVIX_STORE_PLAN_CACHE_BYTES": "0"}))
    assert plan_bytes(none) == 0
    bad = tvix(home, "import", trees[0], extra_env={"TVIX_STORE_PLAN_CACHE_BYTES": "lots"})
    assert bad.returncode != 0 and b"TVIX_STORE_PLAN_CACHE_BYTES" in bad.stderr
