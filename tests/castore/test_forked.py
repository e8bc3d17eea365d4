"""Ingestion in forked worker processes: same digests as in-process, dedup, failures.

Trees of at least 32 MiB are ingested by forked workers where the backend
supports it (objectstore on disk, the embedded packed store) and more than one
CPU is usable; these tests force the forked path (``fork=True``, two workers)
whatever the machine, see that two worker processes ran (each notes its pid),
compare their results with the in-memory, in-process ingestion of the same
tree, and make workers fail on purpose.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.forking import FORK_ENV
from tests.v1_packed import PackedBlobService
from tvix_castore.blobservice import MemoryBlobService, ObjectStoreBlobService
from tvix_castore.blobservice.base import Ask, BlobService, ForkedIngest
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.memory import MemoryDirectoryService
from tvix_castore.directoryservice.sqlite import SqliteDirectoryService
from tvix_castore.errors import IngestionError, StorageError
from tvix_castore.forked import Cancelled, run_forked
from tvix_castore.ingest import _FORK_MIN, ingest_path, ingest_tree, scan_tree
from tvix_castore.objectstore import LocalObjectStore

MiB = 1 << 20


def make_tree(root: Path) -> Path:
    """Many small files (several batches), a few chunked ones; over the fork threshold."""
    rng = random.Random(11)
    for d in range(8):
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(300):
            (sub / f"f{i}").write_bytes(rng.randbytes(rng.randrange(0, 6000)))
        (sub / "dup").write_bytes(b"the same in every directory\n")
    for i in range(3):
        (root / f"large{i}").write_bytes(rng.randbytes(12 * MiB + i))
    (root / "text").write_bytes(b"a line of text\n" * 100_000)
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total >= _FORK_MIN
    return root


class _Noting(ForkedIngest):
    """A backend's forked ingestion; each worker notes its pid in ``log`` first."""

    def __init__(self, inner: ForkedIngest, log: Path) -> None:
        self._inner = inner
        self._log = log

    def ingest_in_child(
        self, files: Sequence[tuple[str | bytes, int]], ask: Ask
    ) -> list[B3Digest | Exception]:
        with open(self._log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return self._inner.ingest_in_child(files, ask)

    def answer(self, question: object) -> object:
        return self._inner.answer(question)

    def finish(self) -> None:
        self._inner.finish()


class _NotingObjectStore(ObjectStoreBlobService):
    pid_log: Path

    def forked_ingest(self) -> ForkedIngest | None:
        inner = super().forked_ingest()
        return None if inner is None else _Noting(inner, self.pid_log)


class _NotingPacked(PackedBlobService):
    pid_log: Path

    def forked_ingest(self) -> ForkedIngest | None:
        inner = super().forked_ingest()
        return None if inner is None else _Noting(inner, self.pid_log)


def backend(kind: str, tmp_path: Path) -> BlobService:
    """A backend whose forked workers note their pids (see :func:`worker_pids`)."""
    blobs: _NotingObjectStore | _NotingPacked
    if kind == "objectstore":
        blobs = _NotingObjectStore(LocalObjectStore(tmp_path / "objects"))
    else:
        # "packed": large files go to compressed chunk files; "packed-raw": chunked into the packs
        zstd = None if kind == "packed-raw" else 3
        blobs = _NotingPacked(
            tmp_path / "store.sqlite",
            ObjectStoreBlobService(LocalObjectStore(tmp_path / "blobs"), zstd_level=zstd),
        )
    blobs.pid_log = tmp_path / "worker-pids"
    return blobs


def worker_pids(tmp_path: Path) -> list[int]:
    """The pids noted by forked workers of :func:`backend` (once per batch), then forgotten."""
    log = tmp_path / "worker-pids"
    if not log.exists():
        return []
    pids = [int(line) for line in log.read_text().split()]
    log.unlink()
    return pids


def assert_forked(tmp_path: Path) -> None:
    """Two worker processes, not this one, ingested the batches."""
    pids = worker_pids(tmp_path)
    assert len(set(pids)) == 2 and os.getpid() not in pids, pids


@pytest.mark.parametrize("kind", ["objectstore", "packed", "packed-raw"])
async def test_forked_ingest_matches_in_process(tmp_path: Path, kind: str) -> None:
    src = make_tree(tmp_path / "src")
    expected = await ingest_path(src, MemoryBlobService(), MemoryDirectoryService())
    blobs = backend(kind, tmp_path)
    assert blobs.forked_ingest() is not None
    dirs = SqliteDirectoryService(tmp_path / "dirs.sqlite")
    async with blobs, dirs:
        node = await ingest_path(src, blobs, dirs, fork=True, concurrency=2)
        assert_forked(tmp_path)
        assert node == expected
        # every file is readable and verified from this process
        for path in sorted(src.rglob("*")):
            if path.is_file():
                got = await blobs.read_all(B3Digest.of(path.read_bytes()))
                assert got == path.read_bytes(), path


@pytest.mark.parametrize("kind", ["packed", "packed-raw"])
async def test_forked_reingest_appends_nothing(tmp_path: Path, kind: str) -> None:
    src = make_tree(tmp_path / "src")
    blobs = backend(kind, tmp_path)
    dirs = SqliteDirectoryService(tmp_path / "dirs.sqlite")
    async with blobs, dirs:
        first = await ingest_path(src, blobs, dirs, fork=True, concurrency=2)
        assert_forked(tmp_path)
        packs = tmp_path / "packs"
        size = sum(p.stat().st_size for p in packs.iterdir())
        chunks = sorted(p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file())
        assert await ingest_path(src, blobs, dirs, fork=True, concurrency=2) == first
        assert_forked(tmp_path)
        assert sum(p.stat().st_size for p in packs.iterdir()) == size
        assert sorted(p.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()) == chunks


@pytest.mark.parametrize("kind", ["packed", "packed-raw"])
async def test_forked_index_rows_are_committed_once_per_blob(tmp_path: Path, kind: str) -> None:
    """The parent defers the workers' index rows; they are all committed when ingestion ends.

    The same small contents recur in every directory, so batches ask about
    blobs whose rows are still pending: each gets one index row.
    """
    src = make_tree(tmp_path / "src")
    for d in range(8):
        for i in range(200):
            (src / f"d{d}" / f"copy{i}").write_bytes(f"shared content {i}\n".encode() * 50)
    small = {
        p.read_bytes() for p in src.rglob("*") if p.is_file() and 0 < p.stat().st_size <= 128 * 1024
    }
    blobs = backend(kind, tmp_path)
    dirs = SqliteDirectoryService(tmp_path / "dirs.sqlite")
    async with blobs, dirs:
        await ingest_path(src, blobs, dirs, fork=True, concurrency=2)
        assert_forked(tmp_path)
    fresh = backend(kind, tmp_path)  # sees only what was committed
    assert isinstance(fresh, PackedBlobService)
    async with fresh:
        with contextlib.closing(sqlite3.connect(tmp_path / "store.sqlite")) as db:
            rows = db.execute("SELECT count(*) FROM packed").fetchone()[0]
            # Larger files are packed as chunks, each a blob with its own row too.
            chunks: set[bytes] = set()
            for (members,) in db.execute("SELECT chunks FROM chunked"):
                chunks |= {bytes(members[i : i + 32]) for i in range(0, len(members), 40)}
        assert bool(chunks) == (kind == "packed-raw")
        assert rows == len({B3Digest.of(d).raw for d in small} | chunks)
        for data in small:
            assert await fresh.read_all(B3Digest.of(data)) == data


async def test_forked_ingest_reports_a_vanished_file(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    tree = scan_tree(src)
    (src / "d5" / "f17").unlink()  # after the scan, before the workers read it
    blobs = backend("packed", tmp_path)
    dirs = SqliteDirectoryService(tmp_path / "dirs.sqlite")
    async with blobs, dirs:
        with pytest.raises(IngestionError, match=r"d5/f17: cannot read: No such file"):
            await ingest_tree(tree, blobs, dirs, fork=True, concurrency=2)
        assert_forked(tmp_path)
        with contextlib.closing(sqlite3.connect(tmp_path / "dirs.sqlite")) as db:
            assert db.execute("SELECT count(*) FROM directories").fetchone()[0] == 0


class _Dies(ForkedIngest):
    def ingest_in_child(
        self, files: Sequence[tuple[str | bytes, int]], ask: Ask
    ) -> list[B3Digest | Exception]:
        os._exit(3)


class _Raises(ForkedIngest):
    def ingest_in_child(
        self, files: Sequence[tuple[str | bytes, int]], ask: Ask
    ) -> list[B3Digest | Exception]:
        raise RuntimeError("disk on fire")


class _Asks(ForkedIngest):
    """Sends every batch to the parent and returns what it says."""

    def ingest_in_child(
        self, files: Sequence[tuple[str | bytes, int]], ask: Ask
    ) -> list[B3Digest | Exception]:
        answer = ask(("count", len(files)))
        assert isinstance(answer, int)
        return [B3Digest(bytes([answer]) * 32) for _ in files]

    def answer(self, question: object) -> object:
        match question:
            case ("count", int(n)):
                return n + 1
        return super().answer(question)


JOBS = [[(b"/x", 1)] * n for n in range(1, 9)]


def test_worker_death_is_an_error() -> None:
    with pytest.raises(StorageError, match="exited unexpectedly"):
        run_forked(_Dies(), JOBS, 2)


def test_worker_exception_is_an_error() -> None:
    with pytest.raises(StorageError, match="RuntimeError: disk on fire"):
        run_forked(_Raises(), JOBS, 2)


def test_questions_reach_the_parent_in_order() -> None:
    results = run_forked(_Asks(), JOBS, 3)
    assert [len(r) for r in results] == [len(j) for j in JOBS]
    assert [r[0] for r in results] == [B3Digest(bytes([len(j) + 1]) * 32) for j in JOBS]


class _Slow(ForkedIngest):
    """Notes each batch in a file, then takes its time."""

    def __init__(self, log: Path) -> None:
        self._log = log

    def ingest_in_child(
        self, files: Sequence[tuple[str | bytes, int]], ask: Ask
    ) -> list[B3Digest | Exception]:
        with open(self._log, "a") as f:
            f.write("batch\n")
        time.sleep(0.05)
        return [B3Digest(bytes(32)) for _ in files]


def test_cancel_stops_the_workers(tmp_path: Path) -> None:
    log = tmp_path / "batches"
    log.touch()
    cancel = threading.Event()
    jobs = [[(b"/x", 1)]] * 2000  # about 50 s of work for two workers

    def cancel_once_started() -> None:
        while len(log.read_text().splitlines()) < 4:
            time.sleep(0.01)
        cancel.set()

    threading.Thread(target=cancel_once_started, daemon=True).start()
    with pytest.raises(Cancelled):
        run_forked(_Slow(log), jobs, 2, cancel)
    done = len(log.read_text().splitlines())  # the workers have exited (waited for)
    assert 4 <= done < len(jobs)


_DECIDE = """
import os
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # as under taskset -c N
from tvix_castore import forked, ingest
print(forked.usable_cpus(), ingest.DEFAULT_CONCURRENCY,
      forked.want_fork(None, large=True), forked.want_fork(None, large=False),
      forked.want_fork(True, large=False), forked.want_fork(False, large=True))
"""


@pytest.mark.parametrize(
    ("env", "auto_large", "auto_small"),
    [(None, False, False), ("auto", False, False), ("always", True, True), ("never", False, False)],
)
def test_fork_decision_on_one_usable_cpu(
    env: str | None, auto_large: bool, auto_small: bool
) -> None:
    """CPUs are counted by affinity (taskset, cpusets), not os.cpu_count(): on one usable CPU
    large work does not fork by itself; $TVIX_STORE_FORK and ``fork=`` force the choice."""
    environ = {k: v for k, v in os.environ.items() if k != FORK_ENV}
    if env is not None:
        environ[FORK_ENV] = env
    proc = subprocess.run(
        [sys.executable, "-c", _DECIDE], capture_output=True, env=environ, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout.decode().split() == [
        "1", "1", str(auto_large), str(auto_small), "True", "False"
    ]  # fmt: skip
