"""NAR plans: ``tvix-store export`` straight from the pack files (real CLI, real Nix).

A plan is recorded when a path is imported (and when one is first exported
without a plan); export then writes from it. These tests check that the bytes
equal ``nix-store --dump`` on both the one-process and the two-process path,
that a plan missing or corrupt falls back to rendering, and that corrupt
content fails the export with a clear message instead of wrong bytes.

Which path runs is forced (``fork=``, ``$TVIX_STORE_FORK``), not left to the
number of CPUs, and the forked one is seen to fork (a child process appears).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.compat.oracle import DigestSink, Nix, assert_same_nar
from tests.forking import FORK_ENV, child_pids, wait_for_child
from tvix_castore.blobservice.base import writev_all
from tvix_castore.blobservice.objectstore import chunk_key, raw_frame_pieces
from tvix_castore.blobservice.packed import PackedBlobService
from tvix_castore.digests import B3Digest
from tvix_castore.errors import IngestionError
from tvix_store.nar import plan as plan_mod
from tvix_store.nar.plan import NarPlan, SqliteNarPlans
from tvix_store.nar.render import NarRenderError

from .conftest import TVIX, export_to, ok, tvix, tvix_env

MiB = 1 << 20
# The two paths of a large NAR (export, PlanHasher, ingestion), forced by $TVIX_STORE_FORK.
PATHS = [pytest.param(0, "never", id="one-process"), pytest.param(40 * MiB, "always", id="forked")]


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


def import_tree(home: Path, path: Path, zstd: str = "none") -> str:
    env = {"TVIX_STORE_CHUNK_ZSTD": zstd}
    return ok(tvix(home, "import", path, extra_env=env)).decode().strip()


def the_plan(home: Path) -> tuple[B3Digest, NarPlan]:
    with sqlite3.connect(home / "store.sqlite") as conn:
        rows = conn.execute("SELECT root FROM nar_plans").fetchall()
    assert len(rows) == 1, rows
    root = B3Digest(bytes(rows[0][0]))
    plans = SqliteNarPlans(home / "store.sqlite")
    try:
        found = plans.get_sync(root)
    finally:
        asyncio.run(plans.aclose())
    assert found is not None
    return root, found


def chunked_rows(home: Path) -> int:
    """Blobs stored as several chunks in the packs."""
    with sqlite3.connect(home / "store.sqlite") as conn:
        n: int = conn.execute("SELECT count(*) FROM chunked").fetchone()[0]
    return n


def export_forked(home: Path, store_path: str) -> DigestSink:
    """``export`` with ``$TVIX_STORE_FORK=always``, seen to fork: its stdout is not read
    until a child of the exporting process exists (neither can finish before)."""
    sink = DigestSink()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [TVIX, "--log-level", "DEBUG", "export", store_path],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=tvix_env(home, {FORK_ENV: "always"}),
        )
        assert proc.stdout is not None
        try:
            wait_for_child(proc.pid)
            with proc.stdout:
                while chunk := proc.stdout.read(1 << 20):
                    sink.write(chunk)
            rc = proc.wait(timeout=120)
        finally:
            proc.kill()
            proc.wait()
        err.seek(0)
        log = err.read().decode(errors="replace")
    assert rc == 0, log
    return sink


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
    with sqlite3.connect(home / "store.sqlite") as conn:
        assert conn.execute("DELETE FROM directories").rowcount > 0


def nix_dump(nix: Nix, path: Path) -> DigestSink:
    sink = DigestSink()
    nix.dump(path, sink)
    return sink


@pytest.mark.parametrize(("big", "fork"), PATHS)
def test_export_from_plan_matches_nix(
    tmp_path: Path, home: Path, nix: Nix, big: int, fork: str
) -> None:
    tree = make_tree(tmp_path / "tree", big=big)
    store_path = import_tree(home, tree)
    _, plan = the_plan(home)
    assert all(e[3] >= 0 for e in plan.entries), "every file (or chunk) is packed"
    assert chunked_rows(home) >= 1, "large files are chunked"
    files = sum(
        1 for p in tree.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size
    )
    assert len(plan.entries) > files, "a chunked file has an entry per chunk"
    only_the_plan_left(home)
    ours = export_forked(home, store_path) if fork == "always" else export_nar(home, store_path)
    assert_same_nar(ours, nix_dump(nix, tree), "export from the plan")
    assert plan.nar_size == ours.size


def test_export_without_plan_renders_then_records_one(tmp_path: Path, home: Path, nix: Nix) -> None:
    tree = make_tree(tmp_path / "tree", big=0)
    store_path = import_tree(home, tree)
    with sqlite3.connect(home / "store.sqlite") as conn:
        conn.execute("DELETE FROM nar_plans")
    ours = export_nar(home, store_path)  # without a plan: rendered
    the_plan(home)  # and one recorded
    theirs = nix_dump(nix, tree)
    assert_same_nar(ours, theirs, "rendered export")
    only_the_plan_left(home)
    again = export_nar(home, store_path)
    assert_same_nar(again, theirs, "export from the recorded plan")


def test_corrupt_plan_is_ignored(tmp_path: Path, home: Path, nix: Nix) -> None:
    tree = make_tree(tmp_path / "tree", big=0)
    store_path = import_tree(home, tree)
    with sqlite3.connect(home / "store.sqlite") as conn:
        (data,) = conn.execute("SELECT plan FROM nar_plans").fetchone()
        bad = bytearray(data)
        bad[len(bad) // 2] ^= 0xFF
        conn.execute("UPDATE nar_plans SET plan = ?", (bytes(bad),))
    ours = export_nar(home, store_path)
    assert_same_nar(ours, nix_dump(nix, tree), "export with a corrupt plan")


def corrupt_pack(home: Path, plan: NarPlan, which: int) -> None:
    """Flip a byte of the ``which``-th packed blob (in NAR order)."""
    packed = [e for e in plan.entries if e[3] >= 0]
    _, _, size, pack, offset = packed[which]
    path = home / "packs" / plan.packs[pack]
    with open(path, "r+b") as f:
        f.seek(offset + size // 2)
        byte = f.read(1)
        f.seek(offset + size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize(("big", "fork"), PATHS)
@pytest.mark.parametrize("which", [0, -1], ids=["first", "last"])
def test_corrupt_pack_fails_export(
    tmp_path: Path, home: Path, big: int, fork: str, which: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FORK_ENV, fork)
    tree = make_tree(tmp_path / "tree", big=big)
    store_path = import_tree(home, tree)
    _, plan = the_plan(home)
    corrupt_pack(home, plan, which)
    assert_export_fails(home, store_path, plan)


def assert_export_fails(home: Path, store_path: str, plan: NarPlan) -> None:
    proc = tvix(home, "export", store_path)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    assert "wrong contents" in err or "failed rendering nar" in err, err
    # Nothing of the corrupt blob (or after it) was written.
    assert len(proc.stdout) < plan.nar_size


def test_corrupt_packed_chunk_fails_export(tmp_path: Path, home: Path) -> None:
    """A large file's chunks lie in the packs: one damaged chunk fails the export."""
    tree = make_tree(tmp_path / "tree", big=0)
    store_path = import_tree(home, tree)
    _, plan = the_plan(home)
    with sqlite3.connect(home / "store.sqlite") as conn:
        (members,) = conn.execute("SELECT chunks FROM chunked").fetchone()
    packed = [e for e in plan.entries if e[3] >= 0]
    corrupt_pack(home, plan, next(i for i, e in enumerate(packed) if e[1] == members[:32]))
    assert_export_fails(home, store_path, plan)


def test_corrupt_chunk_fails_export(tmp_path: Path, home: Path) -> None:
    """Compressed, large files are chunk files (B §7.1): one damaged chunk fails the export."""
    tree = make_tree(tmp_path / "tree", big=0)
    store_path = import_tree(home, tree, zstd="1")
    _, plan = the_plan(home)
    (_, raw, size, _, _) = next(e for e in plan.entries if e[3] < 0 and e[2] == 700 * 1024)
    chunks_dir = home / "blobs"
    # The random 700 KiB file is cut into chunks; damage the first one's stored bytes.
    from tvix_castore.blobservice.objectstore import blob_key
    from tvix_castore.protos import rpc_blobstore_pb2 as pb

    index = pb.StatBlobResponse.FromString((chunks_dir / blob_key(B3Digest(raw))).read_bytes())
    chunk = chunks_dir / chunk_key(B3Digest(index.chunks[0].digest))
    frame = bytearray(chunk.read_bytes())
    frame[-10] ^= 0xFF
    chunk.write_bytes(bytes(frame))
    proc = tvix(home, "export", store_path)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    assert "wrong contents" in err or "corrupt" in err, err
    assert len(proc.stdout) < size


def test_export_into_a_pipe_matches(tmp_path: Path, home: Path, nix: Nix) -> None:
    """Through a pipe read slowly (short writes, both processes writing in turn)."""
    tree = make_tree(tmp_path / "tree", big=40 * MiB)
    store_path = import_tree(home, tree)
    ours = export_forked(home, store_path)
    theirs = DigestSink(keep=False)
    nix.dump(tree, theirs)
    assert (ours.size, ours.digest) == (theirs.size, theirs.digest)


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
            assert store.plans is None
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
            assert store.plans is not None
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


def test_forked_export_after_the_hash_thread_pool_started(
    tmp_path: Path, home: Path, nix: Nix
) -> None:
    """blake3's pool does not survive fork: the child must not wait for its threads."""
    import blake3

    from tvix_store.config import embedded_blobs

    tree = make_tree(tmp_path / "tree", big=40 * MiB)
    import_tree(home, tree)
    blake3.blake3(b"x" * (8 * MiB), max_threads=blake3.blake3.AUTO).digest()  # starts the pool
    _, plan = the_plan(home)
    blobs = embedded_blobs(home)
    assert isinstance(blobs, PackedBlobService)
    ours = DigestSink()
    before = child_pids(os.getpid())
    r, w = os.pipe()
    failed: list[BaseException] = []

    def write() -> None:
        try:
            plan_mod.write_plan(plan, blobs, w, fork=True)
        except BaseException as exc:
            failed.append(exc)
        finally:
            os.close(w)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        wait_for_child(os.getpid(), ignore=before)  # the pipe is not read yet: it stays
        with open(r, "rb") as out:
            while chunk := out.read(1 << 20):
                ours.write(chunk)
    finally:
        writer.join()
        asyncio.run(blobs.aclose())
    assert not failed, failed
    assert_same_nar(ours, nix_dump(nix, tree), "in-process forked export")


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


@pytest.mark.parametrize("zstd", ["1", "none"], ids=["compressed-chunks", "raw-chunks"])
def test_export_memory_stays_flat_for_a_large_compressible_file(
    tmp_path: Path, home: Path, nix: Nix, zstd: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """160 MiB of text compresses to almost nothing: it must still be streamed.

    Compressed, the forked child cannot keep all it decompressed, and reads
    the rest again when it writes; raw, it serves views of the mapped packs.
    """
    monkeypatch.setenv(FORK_ENV, "always")  # the two-process export, whatever the CPUs
    tree = make_tree(tmp_path / "tree", big=0)
    line = b"the same compressible line, again and again and again\n"
    with open(tree / "huge.txt", "wb") as f:
        for _ in range(160 * MiB // (len(line) * 1024)):
            f.write(line * 1024)
    store_path = import_tree(home, tree, zstd)
    frames = [p.read_bytes() for p in (home / "blobs" / "chunks").rglob("*") if p.is_file()]
    if zstd == "none":  # raw: chunked into the packs, served as views of the mapped packs
        assert not frames and chunked_rows(home) >= 2
    else:
        assert any(raw_frame_pieces(f) is None for f in frames)  # compressed ones among them
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
    # Interpreter and plan (~50 MiB for both processes), the child's 64 MiB
    # of kept chunks, an 8 MiB write batch; holding the file would add 160 MiB.
    assert peak < 150 * 1024, f"peak anonymous RSS {peak // 1024} MiB"


@pytest.mark.parametrize("planned", [True, False], ids=["from-plan", "rendered"])
def test_export_to_a_full_disk_fails_cleanly(tmp_path: Path, home: Path, planned: bool) -> None:
    tree = make_tree(tmp_path / "tree", big=0)
    store_path = import_tree(home, tree)
    if not planned:
        with sqlite3.connect(home / "store.sqlite") as conn:
            conn.execute("DELETE FROM nar_plans")
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


# -- pack segments --------------------------------------------------------------
def test_plan_verifies_pack_segments_whole(tmp_path: Path, home: Path, nix: Nix) -> None:
    """A fresh import's small files lie in segments its plan lists, each hashed as a whole."""
    import blake3

    tree = make_tree(tmp_path / "tree", big=40 * MiB)
    store_path = import_tree(home, tree)
    _, plan = the_plan(home)
    assert plan.segments, "the batches of small files are segments of the plan"
    with sqlite3.connect(home / "store.sqlite") as conn:
        chunks = {
            bytes(m[i : i + 32])
            for (m,) in conn.execute("SELECT chunks FROM chunked")
            for i in range(0, len(m), 40)
        }
    # Batches of large files' chunks are no segments (chunks are hashed fast one by one).
    packed_bytes = sum(e[2] for e in plan.entries if e[3] >= 0 and e[1] not in chunks)
    assert sum(s[2] for s in plan.segments) >= packed_bytes // 2
    for pack, offset, length, b3 in plan.segments:
        with open(home / "packs" / plan.packs[pack], "rb") as f:
            f.seek(offset)
            assert blake3.blake3(f.read(length)).digest() == b3
    # an encoded plan decodes to the same plan
    assert NarPlan.decode(plan.encode()) == plan
    only_the_plan_left(home)
    ours = export_nar(home, store_path)
    assert_same_nar(ours, nix_dump(nix, tree), "export verifying whole segments")


def test_damaged_segment_rows_are_not_trusted(tmp_path: Path, home: Path, nix: Nix) -> None:
    """A segment row failing its checksum is ignored: its blobs are checked one by one."""
    tree = make_tree(tmp_path / "tree", big=0)
    store_path = import_tree(home, tree)
    with sqlite3.connect(home / "store.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM pack_segments").fetchone()[0] > 0
        conn.execute("UPDATE pack_segments SET members = members || x'00'")
        conn.execute("DELETE FROM nar_plans")
    first = export_nar(home, store_path)  # renders, then records a new plan
    _, plan = the_plan(home)
    assert plan.segments == ()
    only_the_plan_left(home)
    again = export_nar(home, store_path)
    theirs = nix_dump(nix, tree)
    assert_same_nar(first, theirs, "rendered export")
    assert_same_nar(again, theirs, "export checking each blob")


def test_index_row_pointing_elsewhere_keeps_the_segment_out(tmp_path: Path, home: Path) -> None:
    """An index row that points at another blob of a segment is caught by the member list."""
    from tvix_castore.directoryservice.sqlite import SqliteDirectoryService
    from tvix_castore.nodes import DirectoryNode
    from tvix_store.config import embedded_blobs
    from tvix_store.nar.render import NarRenderError, fetch_closure

    from .conftest import stored_infos

    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(20):
        (tree / f"f{i:02}").write_bytes(bytes([65 + i]) * 1000)  # same sizes, other bytes
    import_tree(home, tree)
    (info,) = stored_infos(home)
    db = home / "store.sqlite"
    a, b = B3Digest.of(b"A" * 1000), B3Digest.of(b"B" * 1000)
    with sqlite3.connect(db) as conn:
        (off_b,) = conn.execute("SELECT offset FROM packed WHERE digest = ?", (b.raw,)).fetchone()
        conn.execute("UPDATE packed SET offset = ? WHERE digest = ?", (off_b, a.raw))

    async def build() -> NarPlan:
        blobs = embedded_blobs(home)
        dirs = SqliteDirectoryService(db)
        async with blobs, dirs:
            assert isinstance(blobs, PackedBlobService)
            assert isinstance(info.node, DirectoryNode)
            closure = await fetch_closure(info.node, dirs)
            return plan_mod.build_plan(info.node, closure, blobs, info.nar_sha256)

    plan = asyncio.run(build())
    entry = next(e for e in plan.entries if e[1] == a.raw)
    assert not [s for s in plan.segments if s[0] == entry[3] and s[1] <= entry[4] < s[1] + s[2]]
    blobs = embedded_blobs(home)
    assert isinstance(blobs, PackedBlobService)
    try:
        with (
            open(tmp_path / "out.nar", "wb") as out,
            pytest.raises(NarRenderError, match="wrong contents"),
        ):
            plan_mod.write_plan(plan, blobs, out.fileno())
    finally:
        asyncio.run(blobs.aclose())


def test_plans_without_segments_are_still_read(tmp_path: Path, home: Path, nix: Nix) -> None:
    """Plans written before segments existed (NARPLAN1) keep serving exports."""
    tree = make_tree(tmp_path / "tree", big=0)
    store_path = import_tree(home, tree)
    root, plan = the_plan(home)
    old = (
        plan_mod._HEAD.pack(
            b"NARPLAN1",
            plan.nar_size,
            plan.nar_sha256,
            len("\n".join(plan.packs).encode()),
            len(plan.entries),
            len(plan.literals),
        )
        + "\n".join(plan.packs).encode()
        + plan.literals
        + b"".join(plan_mod._ENTRY.pack(*e) for e in plan.entries)
    )
    assert NarPlan.decode(old) == NarPlan(
        plan.nar_size, plan.nar_sha256, plan.packs, plan.literals, plan.entries
    )
    import blake3

    with sqlite3.connect(home / "store.sqlite") as conn:
        conn.execute(
            "UPDATE nar_plans SET plan = ?, checksum = ? WHERE root = ?",
            (old, blake3.blake3(old).digest(), root.raw),
        )
    only_the_plan_left(home)
    ours = export_nar(home, store_path)
    assert_same_nar(ours, nix_dump(nix, tree), "export from a NARPLAN1 plan")


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
    with sqlite3.connect(home / "store.sqlite") as conn:
        conn.execute("DELETE FROM nar_plans")
    rendered, err = export()
    assert "asyncio loaded: True" in err, err
    assert rendered == ours.data


@pytest.mark.parametrize("arg", ["{sp}/dir0", "{sp}/dir0/link"])
def test_export_of_a_path_inside_a_store_path(tmp_path: Path, home: Path, arg: str) -> None:
    store_path = import_tree(home, make_tree(tmp_path / "tree", big=0))
    proc = tvix(home, "export", arg.format(sp=store_path))
    assert proc.returncode != 0 and proc.stdout == b""
    assert "export takes a store path, not a path inside one" in proc.stderr.decode()


# -- hashing a just uploaded tree's NAR from the packs ------------------------------
def _uploaded_plan(home: Path, tree: Path) -> NarPlan:
    """The plan of a tree uploaded into the embedded store at ``home`` (unvouched)."""
    from tvix_castore.ingest import scan_tree, upload_files
    from tvix_store.config import open_store

    async def run() -> NarPlan:
        store = await open_store(home=home)
        async with store:
            assert isinstance(store.blobs, PackedBlobService)
            scanned = scan_tree(tree)
            await upload_files(scanned, store.blobs)
            return plan_mod.scanned_plan(scanned, store.blobs)

    return asyncio.run(run())


def _hash_plan(home: Path, plan: NarPlan, *, fork: bool) -> tuple[bytes, bool]:
    """PlanHasher's result, and whether a child process appeared (it is waited for only
    by ``result``/``close``, so it is listed until then, even if it has exited)."""
    from tvix_store.config import open_store

    async def run() -> tuple[bytes, bool]:
        store = await open_store(home=home)
        async with store:
            assert isinstance(store.blobs, PackedBlobService)
            before = child_pids(os.getpid())
            hasher = plan_mod.PlanHasher(plan, store.blobs, fork=fork)
            forked = bool(child_pids(os.getpid()) - before)
            try:
                return hasher.result(), forked
            finally:
                hasher.close()

    return asyncio.run(run())


@pytest.mark.parametrize(("big", "fork"), PATHS)
def test_plan_hasher_matches_nix(tmp_path: Path, home: Path, nix: Nix, big: int, fork: str) -> None:
    tree = make_tree(tmp_path / "tree", big=big)
    plan = _uploaded_plan(home, tree)
    want = nix_dump(nix, tree)
    assert plan.nar_size == want.size
    sha, forked = _hash_plan(home, plan, fork=fork == "always")
    assert forked == (fork == "always")
    assert sha == want.digest


def test_plan_hasher_does_not_trust_a_misplaced_blob(tmp_path: Path, home: Path, nix: Nix) -> None:
    """The child reads blobs unverified: one not where the plan says (here: one byte
    off) must not make its sha256 count; the NAR is hashed again, blobs looked up."""
    tree = make_tree(tmp_path / "tree", big=40 * MiB)
    plan = _uploaded_plan(home, tree)
    entries = list(plan.entries)
    i = next(i for i, e in enumerate(entries) if e[3] >= 0 and 100 < e[2] < 10_000)
    lit_end, raw, size, pack, offset = entries[i]
    entries[i] = (lit_end, raw, size, pack, offset + 1)
    bad = dataclasses.replace(plan, entries=tuple(entries), segments=())
    sha, forked = _hash_plan(home, bad, fork=True)
    assert forked
    assert sha == nix_dump(nix, tree).digest


def test_plan_hasher_fails_on_a_corrupt_blob(tmp_path: Path, home: Path) -> None:
    tree = make_tree(tmp_path / "tree", big=40 * MiB)
    plan = _uploaded_plan(home, tree)
    corrupt_pack(home, plan, 3)
    with pytest.raises(NarRenderError, match=r"wrong contents|failed rendering nar"):
        _hash_plan(home, plan, fork=True)


@pytest.mark.parametrize(("big", "fork"), PATHS)
def test_import_does_not_hash_a_corrupt_stored_blob(
    tmp_path: Path, home: Path, big: int, fork: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blobs an import finds already stored are verified before their bytes count in
    its NarHash: a damaged one fails the import (nothing recorded), never a wrong path."""
    monkeypatch.setenv(FORK_ENV, fork)
    first = make_tree(tmp_path / "first", big=0)
    import_tree(home, first)
    _, plan = the_plan(home)
    corrupt_pack(home, plan, 5)
    second = make_tree(tmp_path / "second", big=big)  # the same small files, and more
    proc = tvix(home, "import", second)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in err, err
    assert "wrong contents" in err or "failed rendering nar" in err, err
    with sqlite3.connect(home / "store.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM nar_plans").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM pathinfos").fetchone()[0] == 1
