"""Compaction (``packstore.compact`` and ``tvix-store compact``) on real stores.

Garbage is made as a garbage collector will make it: by deleting the index
rows of blobs nothing needs any more (here with SQL, as the collector does
not exist yet), and by torn tails (bytes after the last frame: a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import blake3

from tests.store.test_legacy_store import legacy_meta, unpack_legacy
from tvix_castore.blobservice.grpc import GrpcBlobService
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.sqlite import SqliteDirectoryService
from tvix_castore.packstore import Kind, PackBlobService
from tvix_castore.packstore.compact import CompactStats, compact
from tvix_castore.packstore.directories import PackDirectoryService
from tvix_castore.packstore.format import FrameMember, scan
from tvix_store.nar.render import calculate_nar
from tvix_store.pathinfoservice.sqlite import SqlitePathInfoService

from .util import pseudo_random

MiB = 1 << 20
BIN = Path(sys.executable).parent
TVIX = str(BIN / "tvix-store")
ROOT = Path(__file__).resolve().parents[3]


def text(n: int, seed: int) -> bytes:
    """Compressible, varied bytes."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghijklmnop", k=rng.randrange(2, 9))) for _ in range(300)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def fill(home: Path, packs: int, seed: int = 0, per_pack: int = 2 * MiB) -> dict[bytes, bytes]:
    """Write ``packs`` packs (one process's worth each) of small and large blobs."""
    out: dict[bytes, bytes] = {}
    rng = random.Random(seed)
    for p in range(packs):
        blobs: list[bytes] = []
        total = 0
        while total < per_pack:
            n = rng.choice([100, 3000, 20000, 60000])
            data = (
                text(n, rng.randrange(1 << 30))
                if rng.random() < 0.8
                else pseudo_random(n, rng.randrange(1 << 30))
            )
            blobs.append(data)
            total += n
        blobs.append(text(600 * 1024, seed * 1000 + p))  # (chunked)
        svc = PackBlobService(home)
        try:
            for digest, data in zip(svc.put_many_sync(blobs), blobs, strict=True):
                out[digest.raw] = data
        finally:
            svc.close()
    return out


def forget(home: Path, digests: Iterable[bytes]) -> None:
    """What a garbage collector does: drop the index rows of blobs nobody needs."""
    with contextlib.closing(sqlite3.connect(home / "store.sqlite")) as db, db:
        db.executemany("DELETE FROM pack_blobs WHERE digest = ?", [(d,) for d in digests])


def small_digests(blobs: dict[bytes, bytes]) -> list[bytes]:
    return [d for d, b in blobs.items() if len(b) <= 128 * 1024]


def indexed(home: Path) -> set[bytes]:
    with contextlib.closing(sqlite3.connect(home / "store.sqlite")) as db:
        rows = list(
            db.execute("SELECT digest FROM pack_blobs UNION SELECT digest FROM pack_chunked")
        )
    return {bytes(r[0]) for r in rows}


def check_store(home: Path, expected: dict[bytes, bytes]) -> None:
    """Everything expected reads back verified, and so does everything indexed."""
    svc = PackBlobService(home)
    try:
        for digest, data in expected.items():
            got = svc.reader.read(B3Digest(digest))
            assert got == data, f"blob {B3Digest(digest)}"
        for digest in indexed(home):
            assert svc.reader.read(B3Digest(digest)) is not None
    finally:
        svc.close()


def pack_files(home: Path) -> list[Path]:
    return sorted((home / "packs").glob("*.tvpack"))


def data_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in pack_files(home))


# -- v2 packs --------------------------------------------------------------------------
def test_rewrites_packs_with_enough_garbage(tmp_path: Path) -> None:
    home = tmp_path / "store"
    first = fill(home, 1, seed=1)
    second = fill(home, 1, seed=2)
    packs = pack_files(home)
    assert len(packs) == 2
    gone = small_digests(first)[::2]  # about half of the first pack
    little = next(d for d in small_digests(second) if d not in first)
    forget(home, [*gone, little])  # and a little of the second
    sizes = {p.name: p.stat().st_size for p in packs}

    svc = PackBlobService(home)
    try:
        stats = compact(svc, min_garbage=0.2)
    finally:
        svc.close()
    assert stats.packs_rewritten == 1
    assert stats.damaged == []
    after = {p.name: p.stat().st_size for p in pack_files(home)}
    (first_pack,) = [p.name for p in packs if p.name not in after]
    second_pack = next(n for n in sizes if n != first_pack)
    assert after[second_pack] == sizes[second_pack]  # (under the threshold: untouched)
    assert stats.bytes_before == sum(sizes.values())
    assert stats.bytes_after == sum(after.values()) < stats.bytes_before
    dropped = {*gone, little}
    live = {d: b for d, b in {**first, **second}.items() if d not in dropped}
    check_store(home, live)
    svc = PackBlobService(home)
    try:
        for d in gone:
            assert svc.reader.read(B3Digest(d)) is None
        again = compact(svc, min_garbage=0.2)
    finally:
        svc.close()
    assert again.packs_rewritten == 0 and again.bytes_after == again.bytes_before

    # The packs alone give the same blobs back; what was forgotten in the
    # rewritten pack does not come back.
    (home / "store.sqlite").unlink()
    check_store(home, live)
    assert set(gone).isdisjoint(indexed(home))


def test_torn_tail_is_garbage(tmp_path: Path) -> None:
    home = tmp_path / "store"
    blobs = fill(home, 1, seed=3, per_pack=MiB)
    (pack,) = pack_files(home)
    size = pack.stat().st_size
    with pack.open("ab") as f:  # a crash in the middle of an append
        f.write(b"TVSG" + os.urandom(size // 2))
    svc = PackBlobService(home)
    try:
        stats = compact(svc, min_garbage=0.2)
    finally:
        svc.close()
    assert stats.packs_rewritten == 1
    (new,) = pack_files(home)
    assert new.stat().st_size <= size  # (the same frames again, without the tail)
    last = list(scan(new))[-1]
    assert last.offset + last.length == new.stat().st_size
    check_store(home, blobs)


def test_skips_a_pack_a_live_writer_holds(tmp_path: Path) -> None:
    home = tmp_path / "store"
    writer = PackBlobService(home)
    try:
        blobs = {
            d.raw: b
            for d, b in zip(
                writer.put_many_sync([text(5000, i) for i in range(200)]),
                [text(5000, i) for i in range(200)],
                strict=True,
            )
        }
        forget(home, list(blobs)[:150])
        other = PackBlobService(home)
        try:
            stats = compact(other, min_garbage=0.1)
        finally:
            other.close()
        assert stats.packs_skipped_locked == 1
        assert stats.packs_rewritten == 0
    finally:
        writer.close()
    svc = PackBlobService(home)
    try:
        stats = compact(svc, min_garbage=0.1)  # (the writer has let go)
    finally:
        svc.close()
    assert stats.packs_rewritten == 1
    check_store(home, dict(list(blobs.items())[150:]))


def test_chunk_lists_records_and_unknown_kinds_survive(tmp_path: Path) -> None:
    home = tmp_path / "store"
    svc = PackBlobService(home)
    try:
        large = text(2 * MiB, 7)
        small = [text(4000, i) for i in range(50)]
        digests = svc.put_many_sync([large, *small])
        records = [(hashlib.sha256(b"%d" % i).digest(), b"record %d" % i) for i in range(5)]
        # (Directories are content-addressed: keyed by the BLAKE3 of their bytes)
        dirs = [(blake3.blake3(b"dir %d" % i).digest(), b"dir %d" % i) for i in range(5)]
        svc.add_records(Kind.DIRECTORIES, dirs)
        svc.add_records(Kind.PATHINFOS, records[:2])
        with svc.transaction() as txn:
            txn.append_frame(9, [FrameMember(b"k" * 32, 5)], [b"newer"])
    finally:
        svc.close()
    forget(home, [d.raw for d in digests[1:40]])  # (7 % of the raw bytes)
    svc = PackBlobService(home)
    try:
        stats = compact(svc, min_garbage=0.05)
    finally:
        svc.close()
    assert stats.packs_rewritten == 1
    check_store(
        home,
        {
            digests[0].raw: large,
            **{d.raw: b for d, b in zip(digests[41:], small[40:], strict=True)},
        },
    )
    (pack,) = pack_files(home)
    kinds = [f.kind for f in scan(pack)]
    assert Kind.CHUNK_LIST in kinds and 9 in kinds

    # A rebuild from the packs alone finds the chunk list and every record again.
    (home / "store.sqlite").unlink()
    found: list[tuple[Kind, bytes, bytes]] = []
    svc = PackBlobService(home, on_record=lambda k, key, data: found.append((k, key, bytes(data))))
    try:
        assert svc.reader.read(digests[0]) == large
        for key, data in dirs:  # (indexed like blobs: no callback needed)
            assert svc.reader.read(B3Digest(key)) == data
    finally:
        svc.close()
    assert sorted(found) == sorted([(Kind.PATHINFOS, k, v) for k, v in records[:2]])


def test_damaged_frame_is_left_as_it_was(tmp_path: Path) -> None:
    home = tmp_path / "store"
    blobs = fill(home, 1, seed=4, per_pack=MiB)
    (pack,) = pack_files(home)
    frames = list(scan(pack))
    forget(home, small_digests(blobs)[::2])
    with pack.open("r+b") as f:  # one flipped byte in the first frame's payload
        at = frames[0].offset + frames[0].length - 40
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))
    before = pack.read_bytes()
    svc = PackBlobService(home)
    try:
        stats = compact(svc, min_garbage=0.2)
    finally:
        svc.close()
    assert stats.packs_rewritten == 0
    assert len(stats.damaged) == 1 and f"pack {pack.name}" in stats.damaged[0]
    assert pack_files(home) == [pack] and pack.read_bytes() == before


def test_recompress_rewrites_everything(tmp_path: Path) -> None:
    home = tmp_path / "store"
    raw = PackBlobService(home, level=0)
    try:
        blobs = {
            d.raw: b
            for d, b in zip(
                raw.put_many_sync([text(30000, i) for i in range(40)]),
                [text(30000, i) for i in range(40)],
                strict=True,
            )
        }
    finally:
        raw.close()
    before = data_bytes(home)
    svc = PackBlobService(home, level=3)
    try:
        stats = compact(svc, recompress=True)
    finally:
        svc.close()
    assert stats.packs_rewritten == 1
    assert data_bytes(home) < before / 2
    check_store(home, blobs)


# -- legacy (v1) stores ----------------------------------------------------------------
async def check_paths(home: Path) -> None:
    """Every PathInfo of the fixture renders, from the new store, to the recorded NAR."""
    recorded = {r["store_path"]: r for r in legacy_meta()["paths"]}
    blobs = PackBlobService(home)
    dirs = PackDirectoryService(blobs, legacy=SqliteDirectoryService(home / "store.sqlite"))
    infos = SqlitePathInfoService(home / "store.sqlite")
    try:
        seen = set()
        async for info in infos.list():
            rec = recorded[info.store_path.absolute]
            size, sha = await calculate_nar(info.node.with_name(b""), blobs, dirs)
            assert (size, sha.hex()) == (rec["nar_size"], rec["export_sha256"]), rec["store_path"]
            seen.add(info.store_path.absolute)
        assert seen == set(recorded)
        for rec in recorded.values():
            for b in rec["blobs"]:
                data = blobs.reader.read(B3Digest.from_hex(b["b3"]))
                assert data is not None and len(data) == b["size"]
    finally:
        blobs.close()
        await dirs.aclose()
        await infos.aclose()


def legacy_left(home: Path) -> list[str]:
    """Legacy files and index rows still in the store."""
    left = [p.name for p in (home / "packs").glob("*.pack")]
    if (home / "blobs").exists():
        left.append("blobs/")
    with contextlib.closing(sqlite3.connect(home / "store.sqlite")) as db:
        for table in ("packed", "chunked", "pack_segments", "directories"):
            with contextlib.suppress(sqlite3.OperationalError):
                (n,) = db.execute(f"SELECT count(*) FROM {table}").fetchone()
                if n:
                    left.append(f"{n} {table} rows")
    return left


def run_compact(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_SERVICE_ADDR")}
    env["TVIX_STORE_HOME"] = str(home)
    return subprocess.run(
        [TVIX, "compact", *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_legacy_store_converted_by_cli(tmp_path: Path) -> None:
    home = unpack_legacy(tmp_path)
    files = [
        *(home / "packs").glob("*.pack"),
        *(p for p in (home / "blobs").rglob("*") if p.is_file()),
    ]
    before = sum(p.stat().st_size for p in files)
    proc = run_compact(home)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"bytes before: {before}" in out
    assert "legacy: 5 packs" in out and "0 legacy files left" in out
    assert legacy_left(home) == []
    assert data_bytes(home) < before / 2
    asyncio.run(check_paths(home))
    proc = run_compact(home, "--json")  # (nothing left to do)
    assert proc.returncode == 0, proc.stderr
    assert '"packs_rewritten": 0' in proc.stdout and '"legacy_rows_converted": 0' in proc.stdout


def test_legacy_store_exports_after_cli_compact(tmp_path: Path) -> None:
    from tests.store.test_legacy_store import check_exports

    home = unpack_legacy(tmp_path)
    assert run_compact(home).returncode == 0
    check_exports(home)


# -- while others read --------------------------------------------------------------------
_SERVER = """
import asyncio, sys
from pathlib import Path
from tvix_castore.packstore import PackBlobService
from tvix_castore.protos import rpc_blobstore_pb2_grpc as pb_grpc
from tvix_castore.rpc.blob_server import BlobServiceServicer
from tvix_castore.rpc.server import start_server

async def main():
    svc = PackBlobService(Path(sys.argv[1]))
    reg = [(lambda s: pb_grpc.add_BlobServiceServicer_to_server(BlobServiceServicer(svc), s),
            "tvix.castore.v1.BlobService")]
    server, addr = await start_server("127.0.0.1:0", reg)
    print(addr, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(None)
    svc.close()

asyncio.run(main())
"""


def test_compaction_while_a_server_reads(tmp_path: Path) -> None:
    """A gRPC server on the store keeps answering every read, verified, throughout."""
    home = unpack_legacy(tmp_path)
    blobs = fill(home, 3, seed=5)
    forget(home, small_digests(blobs)[::2])
    live = {d: b for d, b in blobs.items() if d not in set(small_digests(blobs)[::2])}
    for rec in legacy_meta()["paths"]:
        for b in rec["blobs"]:
            live.setdefault(bytes.fromhex(b["b3"]), b"")  # (read back and verified by the client)
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(home)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    errors: list[str] = []
    reads = 0
    stop = threading.Event()
    progress = threading.Semaphore(0)

    async def reader(addr: str) -> None:
        nonlocal reads
        client = GrpcBlobService.from_url(f"grpc+http://{addr}")
        try:
            order = list(live)
            while not stop.is_set():
                random.shuffle(order)
                for d in order[:40]:
                    data = await client.read_all(B3Digest(d))
                    if data is None or (live[d] and data != live[d]):
                        errors.append(f"blob {B3Digest(d)}: {None if data is None else len(data)}")
                    reads += 1
                progress.release()  # (a round of reads done)
        except Exception as exc:
            errors.append(repr(exc))
        finally:
            await client.aclose()

    try:
        assert server.stdout is not None
        addr = server.stdout.readline().decode().strip()
        assert addr, "the server did not start"
        t = threading.Thread(target=lambda: asyncio.run(reader(addr)))
        t.start()
        assert progress.acquire(timeout=60)  # reading before compaction starts
        proc = run_compact(home)
        while progress.acquire(blocking=False):  # (rounds done meanwhile)
            pass
        assert progress.acquire(timeout=60) or errors  # and a whole round after it
        stop.set()
        t.join(timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "packs: 3 examined, 3 rewritten" in proc.stdout, proc.stdout
        assert errors == [], errors[:5]
        assert reads > 40
        print(f"{reads} reads during compaction:\n{proc.stdout}")
    finally:
        assert server.stdin is not None and server.stdout is not None
        server.stdin.close()
        server.wait(timeout=60)
        server.stdout.close()
    assert legacy_left(home) == []
    asyncio.run(check_paths(home))


# -- kill -9 --------------------------------------------------------------------------------
_CHILD = """
import sys
from pathlib import Path
from tvix_castore.packstore import PackBlobService
from tvix_castore.packstore.compact import compact
svc = PackBlobService(Path(sys.argv[1]))
print("go", flush=True)
compact(svc, min_garbage=0.2)
svc.close()
print("done", flush=True)
"""


def _compact_killed(home: Path, delay: float) -> float | None:
    """Compact in a subprocess killed (SIGKILL) ``delay`` s after it starts; its run time if it finished."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(home)], stdout=subprocess.PIPE, cwd=ROOT
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"go\n"
    start = time.monotonic()
    try:
        proc.wait(timeout=delay)
        return time.monotonic() - start
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None
    finally:
        proc.stdout.close()


def test_kill_9_at_random_points_loses_nothing(tmp_path: Path) -> None:
    template = unpack_legacy(tmp_path / "template")
    blobs = fill(template, 3, seed=6, per_pack=MiB)
    gone = set(small_digests(blobs)[::2])
    forget(template, gone)
    live = {d: b for d, b in blobs.items() if d not in gone}

    # How long an uninterrupted run takes (from the child's "go").
    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    took = _compact_killed(probe, 120)
    assert took is not None
    check_store(probe, live)

    rng = random.Random(1)
    runs = int(os.environ.get("TVIX_TEST_KILL_RUNS", "12"))
    states = set()
    for i in range(runs):
        home = tmp_path / f"run-{i}"
        shutil.copytree(template, home)
        for _ in range(2):  # killed twice: a crash during the recovery from one
            _compact_killed(home, rng.uniform(0, took * 1.1))
        states.add((len(legacy_left(home)), len(pack_files(home))))
        check_store(home, live)
        asyncio.run(check_paths(home))
        shutil.rmtree(home)
    assert len(states) >= 3, states  # (killed at different stages)
    home = tmp_path / "finish"
    shutil.copytree(template, home)
    _compact_killed(home, rng.uniform(0, took))
    assert _compact_killed(home, 120) is not None  # and then one to the end
    check_store(home, live)
    assert legacy_left(home) == []
    asyncio.run(check_paths(home))


def test_stats_summary_names_the_numbers() -> None:
    s = CompactStats(
        bytes_before=1000, bytes_after=250, packs_rewritten=2, legacy_objects_converted=3
    )
    text = s.summary()
    assert "bytes before: 1000" in text and "bytes after:  250 (750 freed, 75.0%)" in text
    assert "2 rewritten" in text and "3 chunk store objects converted" in text


def test_compaction_while_tvix_store_daemon_serves(tmp_path: Path) -> None:
    """``tvix-store daemon --nar-bridge`` serves every NAR and blob, exact, before and after."""
    from tests.store.test_legacy_store import _Serving, check_served

    home = unpack_legacy(tmp_path)
    srv = _Serving(home, tmp_path / "daemon.log")
    errors: list[str] = []
    stop = threading.Event()

    progress = threading.Semaphore(0)

    def serve_loop() -> None:
        while not stop.is_set():
            try:
                check_served(srv)
            except Exception as exc:
                errors.append(repr(exc))
                progress.release()
                return
            progress.release()  # (a whole pass done)

    try:
        t = threading.Thread(target=serve_loop)
        t.start()
        assert progress.acquire(timeout=300)  # serving before compaction starts
        proc = run_compact(home)
        while progress.acquire(blocking=False):  # (passes done meanwhile)
            pass
        if not errors:  # (a failed pass ends the loop: no pass is coming)
            assert progress.acquire(timeout=300) or errors  # and a whole pass after it
        stop.set()
        t.join(timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert errors == [], errors
        check_served(srv)  # (after: from the new packs only)
    finally:
        assert srv.stop() == 0, (tmp_path / "daemon.log").read_text()
    assert legacy_left(home) == []
