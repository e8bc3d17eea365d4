"""PackBlobService and PackTxn through their public interface, on real files."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import random
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.castore.test_forked import make_tree
from tvix_castore.blobservice import MemoryBlobService, ObjectStoreBlobService
from tvix_castore.blobservice.base import Ask, ChunkMeta, ForkedIngest
from tvix_castore.digests import EMPTY_DIGEST, B3Digest
from tvix_castore.directoryservice.memory import MemoryDirectoryService
from tvix_castore.errors import ConfigError, DataCorruption, StorageError
from tvix_castore.ingest import ingest_path
from tvix_castore.objectstore import MemoryObjectStore
from tvix_castore.packstore import Chunked, Kind, Member, PackBlobService, PackTxn
from tvix_castore.packstore.index import IndexTxn

from .util import pseudo_random

MiB = 1 << 20
THRESHOLD = 128 * 1024


def text(n: int, seed: int = 0) -> bytes:
    """Compressible bytes."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(b"abcdefghij", k=rng.randrange(2, 9))) for _ in range(200)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def index_rows(home: Path) -> dict[str, list[tuple[object, ...]]]:
    with contextlib.closing(sqlite3.connect(home / "store.sqlite")) as db:
        return {
            "blobs": sorted(
                db.execute(
                    "SELECT b.digest, f.pack, f.offset, f.length, b.offset, b.size"
                    " FROM pack_blobs b JOIN pack_frames f ON f.id = b.frame"
                )
            ),
            "chunked": sorted(db.execute("SELECT digest, size, chunks FROM pack_chunked")),
            "frames": sorted(db.execute("SELECT pack, offset, length, kind FROM pack_frames")),
            "files": sorted(db.execute("SELECT name, indexed FROM pack_files")),
        }


async def test_round_trips(tmp_path: Path) -> None:
    svc = PackBlobService(tmp_path)
    blobs = [
        b"",
        b"x",
        text(THRESHOLD - 1),
        text(THRESHOLD, 1),
        text(THRESHOLD + 1, 2),
        pseudo_random(3 * MiB, 3),
        text(5 * MiB, 4),
    ]
    async with svc:
        digests = await svc.put_many(blobs)
        reference = ObjectStoreBlobService(MemoryObjectStore())
        for data, digest in zip(blobs, digests, strict=True):
            assert digest == B3Digest.of(data)
            assert await svc.has(digest)
            assert await svc.size(digest) == len(data)
            assert await svc.read_all(digest) == data
            # the same chunks as the chunk store cuts (same chunk digests)
            await reference.put(data)
            expected = await reference.chunks(digest)
            got = await svc.chunks(digest)
            assert got == (expected if expected and len(expected) > 1 else [])
            for c in got or []:
                assert await svc.read_all(c.digest) == await reference.read_all(c.digest)
        assert await svc.read_many([*digests, B3Digest(bytes(32))]) == dict(
            zip(digests, blobs, strict=True)
        )
        assert await svc.size_many(digests) == {
            d: len(b) for d, b in zip(digests, blobs, strict=True)
        }
        absent = B3Digest(bytes(32))
        assert not await svc.has(absent)
        assert await svc.open_read(absent) is None
        assert await svc.chunks(absent) is None
        assert await svc.has(EMPTY_DIGEST)
        reader = await svc.open_read(digests[-1])
        assert reader is not None
        async with reader:
            for offset in (0, 1, 300_000, 2 * MiB + 7, 5 * MiB - 3):
                await reader.seek(offset)
                assert await reader.readexactly(400_000) == blobs[-1][offset : offset + 400_000]
            await reader.seek(-5, io.SEEK_END)
            assert await reader.read() == blobs[-1][-5:]


@pytest.mark.parametrize("size", [0, 1, THRESHOLD - 1, THRESHOLD, THRESHOLD + 1, 50 * MiB])
async def test_streamed_writes(tmp_path: Path, size: int) -> None:
    data = text(size, size) if size < MiB else pseudo_random(size, 7)
    async with PackBlobService(tmp_path) as svc:
        w = svc.open_write()
        for i in range(0, len(data), 1_000_003):
            await w.write(data[i : i + 1_000_003])
        digest = await w.close()
        assert digest == B3Digest.of(data)
        assert await svc.size(digest) == size
        if size:
            assert await svc.read_all(digest) == data
    if size == 50 * MiB:  # incompressible: stored raw, a little framing on top
        packs = sum(p.stat().st_size for p in (tmp_path / "packs").iterdir())
        assert size < packs < size * 1.01
    async with PackBlobService(tmp_path) as again:
        assert await again.size(digest) == size


async def test_compression_at_rest(tmp_path: Path) -> None:
    data = [text(20_000, i) for i in range(300)]
    async with PackBlobService(tmp_path) as svc:
        await svc.put_many(data)
    packs = sum(p.stat().st_size for p in (tmp_path / "packs").iterdir())
    assert packs < sum(map(len, data)) * 0.5


async def test_ingest_files(tmp_path: Path) -> None:
    files = []
    for i, size in enumerate([0, 10, THRESHOLD, THRESHOLD + 1, 2 * MiB]):
        path = tmp_path / f"f{i}"
        path.write_bytes(text(size, i))
        files.append((str(path), size))
    files.append((str(tmp_path / "missing"), 3))
    async with PackBlobService(tmp_path / "home") as svc:
        out = await svc.ingest_files(files)
        assert isinstance(out[-1], FileNotFoundError)
        for (name, _), digest in zip(files[:-1], out, strict=False):
            data = Path(name).read_bytes()
            assert isinstance(digest, B3Digest) and digest == B3Digest.of(data)
            assert await svc.read_all(digest) == data


async def test_transaction_commit_and_abort(tmp_path: Path) -> None:
    svc = PackBlobService(tmp_path)
    other = PackBlobService(tmp_path)
    a, b = text(1000, 1), pseudo_random(300_000, 2)
    da, db_ = B3Digest.of(a), B3Digest.of(b)
    with svc.transaction() as txn:
        assert isinstance(txn, PackTxn)
        txn.put(da, a)
        txn.records(Kind.DIRECTORIES, [(B3Digest.of(b"a directory").raw, b"a directory")])
        assert not await svc.has(da) and not await other.has(da)
    assert await svc.has(da) and await other.read_all(da) == a
    before = {p.name: p.stat().st_size for p in (tmp_path / "packs").iterdir()}
    txn = svc.transaction()
    txn.put(db_, b)
    txn.stager.flush()
    txn.abort()
    assert not await svc.has(db_) and not await other.has(db_)
    # nothing came after it: its bytes are cut back
    assert {p.name: p.stat().st_size for p in (tmp_path / "packs").iterdir()} == before
    with pytest.raises(RuntimeError), svc.transaction() as txn:
        txn.put(db_, b)
        raise RuntimeError("failed")
    assert not await svc.has(db_)
    await svc.aclose()
    await other.aclose()


async def test_one_fsync_per_transaction_before_its_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_commit = os.fsync, IndexTxn.commit

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def commit(self: IndexTxn) -> None:
        events.append("commit")
        real_commit(self)

    async with PackBlobService(tmp_path) as svc:
        await svc.put(b"first")  # (a new pack: its directory is fsynced too)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(IndexTxn, "commit", commit)
        await svc.put_many([text(100_000, i) for i in range(200)])  # several frames
        assert events == ["fsync", "commit"]
        events.clear()
        await svc.put(b"one more")
        assert events == ["fsync", "commit"]
    async with PackBlobService(tmp_path, fsync=False) as svc:
        events.clear()
        await svc.put(b"unsynced")
        assert events == ["commit"]


async def test_writer_holds_a_lock_on_its_pack(tmp_path: Path) -> None:
    async with PackBlobService(tmp_path) as svc:
        await svc.put(b"locked")
        (pack,) = (tmp_path / "packs").iterdir()
        with open(pack, "rb") as f, pytest.raises(BlockingIOError):
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(pack, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


async def test_rebuild_from_packs_equals_the_index(tmp_path: Path) -> None:
    home = tmp_path / "home"
    records = [(bytes([i]) * 32, f"record {i}".encode()) for i in range(5)]
    records[:3] = [(B3Digest.of(v).raw, v) for _, v in records[:3]]  # (content-addressed)
    async with PackBlobService(home) as svc:
        await svc.put_many([text(30_000, i) for i in range(300)])
        await svc.put(pseudo_random(2 * MiB, 1))
        svc.add_records(Kind.DIRECTORIES, records[:3])
        svc.add_records(Kind.PATHINFOS, records[3:])
    expected = index_rows(home)
    assert expected["chunked"] and expected["blobs"]
    os.unlink(home / "store.sqlite")
    got: list[tuple[Kind, bytes, bytes]] = []
    again = PackBlobService(home, on_record=lambda k, key, b: got.append((k, key, bytes(b))))
    assert index_rows(home) == expected
    # Directories are indexed like blobs; PathInfos go to the callback.
    assert sorted(got) == sorted([(Kind.PATHINFOS, k, v) for k, v in records[3:]])
    for key, value in records[:3]:
        assert again.reader.read(B3Digest(key)) == value
    stats = again.rebuild()
    assert stats.frames == 0  # nothing behind any more
    await again.aclose()


async def test_flipped_byte_names_the_blob(tmp_path: Path) -> None:
    data = [text(10_000, i) for i in range(10)]
    async with PackBlobService(tmp_path) as svc:
        digests = await svc.put_many(data)
        big = await svc.put(text(1 * MiB, 99))
        small_frame = svc.reader.locate([digests[0].raw])[digests[0].raw]
        chunked = svc.reader.locate([big.raw])[big.raw]
        assert isinstance(small_frame, Member) and isinstance(chunked, Chunked)
        chunk = svc.reader.locate([chunked.chunks[1].digest.raw])[chunked.chunks[1].digest.raw]
        assert isinstance(chunk, Member)
    (pack,) = (tmp_path / "packs").iterdir()
    raw = bytearray(pack.read_bytes())
    for frame in (small_frame.frame, chunk.frame):
        raw[frame.offset + frame.length // 2] ^= 0x10
    pack.write_bytes(raw)
    async with PackBlobService(tmp_path) as svc:
        with pytest.raises(DataCorruption, match=re.escape(str(digests[0]))):
            await svc.read_all(digests[0])
        # The frame failed its check: it is unindexed, so its blobs are absent
        # (not served, not deduplicated against) until they are stored again.
        assert await svc.has_many(digests) == set()
        assert await svc.put_many(data) == digests
        assert await svc.read_many(digests[3:]) == dict(zip(digests[3:], data[3:], strict=True))
        with pytest.raises(DataCorruption, match=re.escape(str(big))):
            await svc.read_all(big)
        with pytest.raises(DataCorruption, match=re.escape(str(big))):
            svc.reader.read(big)


async def test_truncated_pack_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    async with PackBlobService(tmp_path) as svc:
        (digest,) = await svc.put_many([text(50_000)])
        assert svc.reader.problem([digest.raw]) is None
    (pack,) = (tmp_path / "packs").iterdir()
    os.truncate(pack, pack.stat().st_size - 10)
    async with PackBlobService(tmp_path) as svc:
        assert "truncated" in (svc.reader.problem([digest.raw]) or "")
        assert "not in the store" in (svc.reader.problem([bytes(32)]) or "")
        with pytest.raises(DataCorruption, match=re.escape(str(digest))):
            await svc.read_all(digest)


class _Noting(ForkedIngest):
    def __init__(self, inner: ForkedIngest, log: Path) -> None:
        self._inner, self._log = inner, log

    def ingest_in_child(
        self, files: Sequence[tuple[str | bytes, int]], ask: Ask
    ) -> list[B3Digest | Exception]:
        with open(self._log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return self._inner.ingest_in_child(files, ask)

    def finish_in_child(self, ask: Ask) -> None:
        self._inner.finish_in_child(ask)

    def answer(self, question: object) -> object:
        return self._inner.answer(question)

    def finish(self) -> None:
        self._inner.finish()


class _NotingPack(PackBlobService):
    log: Path

    def forked_ingest(self, txn: PackTxn | None = None) -> ForkedIngest | None:
        inner = super().forked_ingest(txn)
        assert inner is not None
        return _Noting(inner, self.log)


async def test_forked_ingest(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    expected = await ingest_path(src, MemoryBlobService(), MemoryDirectoryService())
    home = tmp_path / "home"
    svc = _NotingPack(home)
    svc.log = tmp_path / "pids"
    async with svc:
        node = await ingest_path(src, svc, MemoryDirectoryService(), fork=True, concurrency=2)
        assert node == expected
        pids = {int(p) for p in svc.log.read_text().split()}
        assert len(pids) == 2 and os.getpid() not in pids
        packs = sorted((home / "packs").iterdir())
        assert len(packs) == 2  # one per worker; the parent wrote nothing
        size = sum(p.stat().st_size for p in packs)
        # again: everything is there already, nothing is appended
        assert await ingest_path(src, svc, MemoryDirectoryService(), fork=True) == node
        assert sum(p.stat().st_size for p in (home / "packs").iterdir()) == size
    rows = index_rows(home)
    digests = [r[0] for r in rows["blobs"]]
    assert len(digests) == len(set(digests))  # each blob once, across workers
    (home / "store.sqlite").unlink()
    PackBlobService(home).close()
    rebuilt = index_rows(home)  # rebuilt from the workers' packs alone
    assert {k: v for k, v in rebuilt.items() if k != "blobs"} == {
        k: v for k, v in rows.items() if k != "blobs"
    }
    # (the same blobs; where two workers raced to store the same bytes, both copies
    # are in the packs and the rebuild may index the other one: read back below)
    assert [(r[0], r[-1]) for r in rebuilt["blobs"]] == [(r[0], r[-1]) for r in rows["blobs"]]
    async with PackBlobService(home) as fresh:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                assert await fresh.read_all(B3Digest.of(data)) == data, path
                loc = fresh.reader.locate([B3Digest.of(data).raw]).get(B3Digest.of(data).raw)
                assert data == b"" or isinstance(loc, Member | Chunked)


async def test_frames_moved_by_a_transaction(tmp_path: Path) -> None:
    """What compaction does: rewrite live blobs, drop the old pack; readers locate again."""
    data = [text(20_000, i) for i in range(20)]
    big = text(2 * MiB, 5)
    async with PackBlobService(tmp_path) as svc:
        digests = await svc.put_many(data)
        big_digest = await svc.put(big)
        old = {p.name for p in (tmp_path / "packs").iterdir()}
        reader = PackBlobService(tmp_path)  # another reader, its frames cached
        assert await reader.read_all(digests[0]) == data[0]
        chunked = svc.reader.locate([big_digest.raw])[big_digest.raw]
        assert isinstance(chunked, Chunked)
        with svc.transaction() as txn, pytest.raises(StorageError, match="being written"):
            txn.delete_pack(next(iter(old)))
        svc.writer.close()  # (the moved frames go to a new pack)
        with svc.transaction() as txn:
            for digest, blob in zip(digests, data, strict=True):
                txn.rewrite(digest, blob)
            for c in chunked.chunks:
                chunk = svc.reader.read(c.digest)
                assert chunk is not None
                txn.rewrite(c.digest, chunk)
            txn.rewrite_chunked(big_digest, chunked.chunks)
            txn.records(Kind.PATHINFOS, [(bytes(32), b"kept")])
            for name in old:
                txn.delete_pack(name)
        for name in old:
            svc.reader.forget([name])
            (tmp_path / "packs" / name).unlink()
        for digest, blob in zip(digests, data, strict=True):
            assert await svc.read_all(digest) == blob
            assert await reader.read_all(digest) == blob  # located again
        assert await svc.read_all(big_digest) == big
        assert svc.reader.problem([*(d.raw for d in digests), big_digest.raw]) is None
        await reader.aclose()
    rows = index_rows(tmp_path)
    assert {r[1] for r in rows["blobs"]} & old == set()


async def test_rebuild_of_a_chunk_list_whose_chunks_are_in_a_later_pack(tmp_path: Path) -> None:
    """Forked workers can leave a chunk list in one pack and its chunks in another."""
    big = text(2 * MiB, 8)
    svc = PackBlobService(tmp_path)
    chunks = []
    with svc.transaction() as txn:
        for c in svc.chunker.cut_buf(big):
            chunk = big[c.offset : c.offset + c.length]
            chunks.append(ChunkMeta(B3Digest.of(chunk), len(chunk)))
            txn.put(chunks[-1].digest, chunk)
    chunk_pack = svc.writer.current
    svc.writer.close()
    digest = B3Digest.of(big)
    with svc.transaction() as txn:
        txn.put_chunked(digest, chunks)
    list_pack = svc.writer.current
    svc.close()
    assert chunk_pack and list_pack and len(chunks) > 2
    packs = tmp_path / "packs"
    (packs / list_pack).rename(packs / f"{'0' * 32}.tvpack")  # scanned first
    (packs / chunk_pack).rename(packs / f"{'f' * 32}.tvpack")
    (tmp_path / "store.sqlite").unlink()
    async with PackBlobService(tmp_path) as again:
        assert await again.chunks(digest) == chunks
        assert await again.read_all(digest) == big


async def test_forked_blobs_are_never_lost_silently(tmp_path: Path) -> None:
    """A wrapper that does not pass ``finish_in_child`` on is an error, not missing blobs."""
    from tests.castore.test_forked import _Noting as Forgetful

    class _Forgetful(PackBlobService):
        def forked_ingest(self, txn: PackTxn | None = None) -> ForkedIngest | None:
            inner = super().forked_ingest(txn)
            assert inner is not None
            return Forgetful(inner, tmp_path / "pids")

    src = make_tree(tmp_path / "src")
    async with _Forgetful(tmp_path / "home") as svc:
        with pytest.raises(StorageError, match="did not hand over"):
            await ingest_path(src, svc, MemoryDirectoryService(), fork=True, concurrency=2)


async def test_threads_reading_the_same_frames(tmp_path: Path) -> None:
    """Read-ahead threads and readers meet on frames: each is decoded once, read right."""
    import concurrent.futures

    data = [text(100_000, i) for i in range(120)]  # a few frames
    async with PackBlobService(tmp_path) as svc:
        digests = await svc.put_many(data)
        located = svc.reader.locate([d.raw for d in digests])
        frames = list(
            dict.fromkeys(loc.frame for loc in located.values() if isinstance(loc, Member))
        )
        assert len(frames) >= 3

        def read(i: int) -> bool:
            if i % 3 == 0:
                svc.reader.payload(frames[i % len(frames)])
                return True
            d = digests[i % len(digests)]
            loc = located[d.raw]
            assert isinstance(loc, Member)
            return bytes(svc.reader.member(d.raw, loc)) == data[i % len(data)]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert all(pool.map(read, range(600)))


def test_level_and_fsync_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TVIX_STORE_ZSTD_LEVEL", "0")
    monkeypatch.setenv("TVIX_STORE_FSYNC", "0")
    svc = PackBlobService(tmp_path)
    assert svc.level == 0 and not svc.writer.fsync
    (digest,) = svc.put_many_sync([text(100_000)])
    svc.close()
    assert sum(p.stat().st_size for p in (tmp_path / "packs").iterdir()) > 100_000  # raw
    monkeypatch.setenv("TVIX_STORE_ZSTD_LEVEL", "fast")
    with pytest.raises(ConfigError, match="TVIX_STORE_ZSTD_LEVEL"):
        PackBlobService(tmp_path)
    monkeypatch.delenv("TVIX_STORE_ZSTD_LEVEL")
    monkeypatch.delenv("TVIX_STORE_FSYNC")
    with pytest.raises(ConfigError, match="level 23"):
        PackBlobService(tmp_path, level=23)
    again = PackBlobService(tmp_path)
    assert again.level == 5 and again.writer.fsync
    assert again.reader.read(digest) == text(100_000)
    again.close()


async def test_chunked_reads_across_frames_and_a_damaged_one(tmp_path: Path) -> None:
    """A large blob read in windows of its frames: any offset and length, the
    bytes exactly (views or joined across frames); a damaged frame fails only
    the reads that need it, naming the blob."""
    data = pseudo_random(24 * MiB, 11)
    async with PackBlobService(tmp_path) as svc:
        digest = await svc.put(data)
        loc = svc.reader.locate([digest.raw])[digest.raw]
        assert isinstance(loc, Chunked)
        where = svc.reader.locate([c.digest.raw for c in loc.chunks])
        frames = list(dict.fromkeys(where[c.digest.raw].frame for c in loc.chunks))  # type: ignore[union-attr]
        assert len(frames) >= 4
        reader = await svc.open_read(digest)
        assert reader is not None
        rng = random.Random(5)
        async with reader:
            pos = 0
            while pos < len(data):  # (sequential, the FUSE way)
                got = await reader.read_view(MiB)
                assert bytes(got) == data[pos : pos + MiB]
                pos += len(got)
            assert await reader.read_view(MiB) == b""
            for _ in range(40):
                off, n = rng.randrange(len(data)), rng.choice([1, 4096, MiB, 5 * MiB])
                await reader.seek(off)
                assert bytes(await reader.read_view(n)) == data[off : off + n]
    damaged = frames[2]
    with open(tmp_path / "packs" / damaged.pack, "r+b") as f:
        f.seek(damaged.offset + damaged.length // 2)
        byte = f.read(1)
        f.seek(damaged.offset + damaged.length // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    async with PackBlobService(tmp_path) as svc:
        reader = await svc.open_read(digest)
        assert reader is not None
        async with reader:
            assert bytes(await reader.read_view(MiB)) == data[:MiB]
            with pytest.raises(DataCorruption, match=re.escape(str(digest))):
                await reader.seek(len(data) // 2 - 4 * MiB)
                while await reader.read_view(MiB):
                    pass
