"""``sqlite:///abs/path``: Directories in SQLite (WAL), canonical bytes by digest.

A closure is committed in one transaction, so readers (also in other
processes) see all of it or nothing. Every read re-hashes the stored bytes.

A full disk: SQLite in WAL mode memory-maps its ``-shm`` file (the WAL
index) and grows it by writing one byte at the end of each 4 KiB page; on a
filesystem with smaller blocks (a small ext4 gets 1 KiB) the rest of each page is
a hole, and touching a hole through the map on a full filesystem kills the
process with SIGBUS. So :func:`connect` allocates the ``-shm`` file's blocks
for real (``posix_fallocate``, through SQLite's own descriptor) while there
is space, and every write transaction first makes sure they cover the WAL
plus a headroom (or fails with :class:`StorageFull` before SQLite touches
anything). Where the WAL index cannot be built for lack of space, the
connection is opened read-only with a heap-memory WAL index
(``readonly_shm``): reads keep working, writes raise :class:`StorageFull`
(until the process reopens the store).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import ThreadedDirectoryService, stored_directory
from tvix_castore.errors import (
    DataCorruption,
    StorageError,
    StorageFull,
    StorageUnavailable,
)
from tvix_castore.lazy import lazy_module
from tvix_castore.nodes import Directory

if TYPE_CHECKING:
    import asyncio
else:
    asyncio = lazy_module("asyncio")  # not needed to write a NAR from its plan

_T = TypeVar("_T")

__all__ = [
    "Connection",
    "SqliteDirectoryService",
    "connect",
    "prepare_write",
    "storage_error",
    "in_transaction",
    "write_one",
    "write_rows",
    "write_tables",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS directories (
    digest BLOB PRIMARY KEY,
    data BLOB NOT NULL
) WITHOUT ROWID;
"""
_BATCH = 500
# SQLite's own corruption reports are DATA_LOSS, not a generic failure (SPEC A2).
_CORRUPT = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_BUSY = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
# Failures that mean "out of space" when the filesystem is (nearly) full: SQLite
# reports a failed -shm extension as a disk I/O error, a read-only fallback
# connection's write as READONLY.
_MAYBE_FULL = frozenset({sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN})
# The -shm file holds 8 bytes per WAL frame (frames are >= 536 bytes: 1/64 of the
# WAL at most). Before a write transaction, its blocks are allocated for the WAL
# as it is plus this headroom (64k frames: a 256 MiB transaction of 4 KiB pages),
# and at least _SHM_SIZE (a 64 MiB WAL, when a checkpoint runs, needs ~130 KiB).
_SHM_HEADROOM = 512 << 10
_SHM_SIZE = 1 << 20
_LOW_SPACE = 1 << 20  # usable bytes below which a filesystem counts as full


class Connection(sqlite3.Connection):
    """A connection that knows its file and SQLite's descriptor of its ``-shm`` file."""

    where: Path
    read_only: bool  # opened read-only because the disk was full
    shm_fd: int  # SQLite's own descriptor of the -shm file (-1: unknown)
    shm_id: tuple[int, int]
    shm_allocated: int  # leading bytes of it known to have real blocks


def usable_space(path: str | Path) -> int:
    """Bytes this process can still allocate on the filesystem of ``path``.

    For root, ext4's reserve for root counts; its reserve for metadata (2% of
    the blocks, at most 4096) does not.
    """
    st = os.statvfs(path)
    if os.geteuid() != 0:
        return st.f_bavail * st.f_frsize
    reserve = min(st.f_blocks // 50, 4096)
    return max(st.f_bfree - reserve, 0) * st.f_frsize


def _is_low(where: str | Path | None) -> bool:
    if where is None:
        return False
    path = Path(where)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return usable_space(path) < _LOW_SPACE
    except OSError:
        return False


def storage_error(what: str, exc: sqlite3.Error, where: str | Path | None = None) -> StorageError:
    """Our error for a failed SQLite operation, classed by SQLite's primary result code.

    ``where`` (the database file) lets a disk I/O error on a full filesystem
    be reported as :class:`StorageFull`.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF  # extended codes keep it in the low byte
    if primary in _CORRUPT:
        return DataCorruption(f"{what}: {exc}")
    if primary in _BUSY:
        return StorageUnavailable(f"{what}: {exc}")
    if primary == sqlite3.SQLITE_FULL or (primary in _MAYBE_FULL and _is_low(where)):
        return StorageFull(what, where)
    return StorageError(f"{what}: {exc}")


def write_rows(
    conn: sqlite3.Connection, sql: str, rows: Sequence[tuple[Any, ...]], what: str
) -> None:
    """``executemany(sql, rows)`` in one immediate transaction (all rows or none)."""
    write_tables(conn, [(sql, rows)], what)


def write_tables(
    conn: sqlite3.Connection, writes: Sequence[tuple[str, Sequence[tuple[Any, ...]]]], what: str
) -> None:
    """Each ``executemany(sql, rows)`` of ``writes``, all in one immediate transaction."""

    def body(c: sqlite3.Connection) -> None:
        for sql, rows in writes:
            c.executemany(sql, rows)

    in_transaction(conn, what, body)


def in_transaction(
    conn: sqlite3.Connection, what: str, body: Callable[[sqlite3.Connection], _T]
) -> _T:
    """``body(conn)`` inside one immediate transaction: committed, or rolled back if it raises.

    A SQLite failure becomes our error (:func:`storage_error`, naming ``what``);
    any other exception from ``body`` propagates as it is.
    """
    where = prepare_write(conn, what)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise storage_error(what, exc, where) from exc
    return result


def write_one(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...], what: str) -> None:
    """``execute(sql, params)``: one write statement in its own (autocommit) transaction."""
    where = prepare_write(conn, what)
    try:
        conn.execute(sql, params)
    except sqlite3.Error as exc:
        raise storage_error(what, exc, where) from exc


def prepare_write(conn: sqlite3.Connection, what: str) -> Path | None:
    """Before a write transaction: make sure SQLite's -shm has real blocks to grow into.

    Raises :class:`StorageFull` (nothing written) if they cannot be allocated,
    or if ``conn`` was opened read-only for lack of space. Returns the
    database file, for error messages.
    """
    if not isinstance(conn, Connection):
        return None
    if conn.read_only:
        raise StorageFull(what, conn.where)
    if conn.shm_fd < 0:
        _find_shm(conn)  # a new database has none before its first write
        if conn.shm_fd < 0:
            return conn.where
    try:
        wal = os.stat(f"{conn.where}-wal").st_size
    except OSError:
        wal = 0
    if wal // 64 + _SHM_HEADROOM <= conn.shm_allocated:
        return conn.where  # (the usual case: one stat)
    try:
        st = os.fstat(conn.shm_fd)
    except OSError:
        st = None
    if st is None or (st.st_dev, st.st_ino) != conn.shm_id:
        _find_shm(conn)  # (not expected while the connection is open)
        return conn.where
    try:
        _allocate_shm(conn, st)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(what, conn.where) from exc
        raise StorageError(f"{what}: allocating {conn.where}-shm: {exc}") from exc
    return conn.where


def _allocate_shm(conn: Connection, st: os.stat_result) -> None:
    """Give the -shm file real blocks for the WAL index's growth (a no-op when it has them).

    ``posix_fallocate`` never changes bytes, so other processes using the
    file are unaffected.
    """
    try:
        wal = os.stat(f"{conn.where}-wal").st_size
    except OSError:
        wal = 0
    want = max(wal // 64 + _SHM_HEADROOM, _SHM_SIZE)
    if st.st_size >= want and st.st_blocks * 512 >= st.st_size:
        conn.shm_allocated = st.st_size
        return
    # a step ahead (not to be called again for every frame the WAL grows)
    size = max(want + _SHM_SIZE, st.st_size)
    os.posix_fallocate(conn.shm_fd, 0, size)
    conn.shm_allocated = size


def _find_shm(conn: Connection) -> None:
    """Find SQLite's descriptor of the -shm file and allocate its blocks.

    SQLite's own descriptor, because opening and closing another one would
    drop every POSIX lock this process holds on the file.
    """
    conn.shm_fd, conn.shm_allocated = -1, 0
    try:
        st = os.stat(f"{conn.where}-shm")
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return
    conn.shm_id = (st.st_dev, st.st_ino)
    for name in fds:
        try:
            fd = int(name)
            other = os.fstat(fd)
        except (OSError, ValueError):
            continue
        if (other.st_dev, other.st_ino) == conn.shm_id:
            conn.shm_fd = fd
            break
    else:
        return
    with contextlib.suppress(OSError):  # no space: the next write transaction will say so
        _allocate_shm(conn, os.fstat(conn.shm_fd))


def _wal_index_fits(path: Path) -> bool:
    """Whether the filesystem has room to (re)build the WAL index of ``path``.

    The first connection truncates the -shm file and rebuilds it from the
    WAL; without the space, SQLite would fault (SIGBUS) writing its holes.
    """
    try:
        wal = os.stat(f"{path}-wal").st_size
    except FileNotFoundError:
        wal = 0
    except OSError:
        return True  # let SQLite report it
    try:
        return usable_space(path.parent) >= wal // 64 + _LOW_SPACE
    except OSError:
        return True


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in WAL mode, tuned for many small transactions.

    On a full disk, a read-only one (see the module docstring) if the
    database exists, else :class:`StorageFull`.
    """
    where = Path(path)
    if where.exists() and not _wal_index_fits(where):
        return _connect_read_only(where)
    conn: Connection | None = None
    try:
        conn = sqlite3.connect(
            where, timeout=30, check_same_thread=False, isolation_level=None, factory=Connection
        )
        conn.where, conn.read_only, conn.shm_fd, conn.shm_allocated = where, False, -1, 0
        conn.execute("PRAGMA journal_mode=WAL")  # (maps the -shm file)
        _find_shm(conn)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA wal_autocheckpoint=16384")
    except sqlite3.Error as exc:
        error = storage_error(f"cannot open SQLite database {where}", exc, where)
        if conn is not None:
            conn.close()
        if isinstance(error, StorageFull) and where.exists():
            return _connect_read_only(where)
        raise error from exc
    return conn


def _connect_read_only(where: Path) -> Connection:
    """A read-only connection whose WAL index is in heap memory (disk full)."""
    with contextlib.suppress(OSError):  # (SQLite opens it read-only, without creating it)
        os.close(os.open(f"{where}-shm", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644))
    uri = f"file:{urllib.parse.quote(str(where))}?mode=ro&readonly_shm=1"
    try:
        conn = sqlite3.connect(
            uri,
            uri=True,
            timeout=30,
            check_same_thread=False,
            isolation_level=None,
            factory=Connection,
        )
        conn.where, conn.read_only, conn.shm_fd, conn.shm_allocated = where, True, -1, 0
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
    except sqlite3.Error as exc:
        raise storage_error(f"cannot open SQLite database {where}", exc, where) from exc
    return conn


Journal = Callable[[Sequence[tuple[bytes, bytes]]], None]
"""Gets (digest, encoding) of each Directory about to be stored anew, before it is."""


class SqliteDirectoryService(ThreadedDirectoryService):
    """Directories in a SQLite database file.

    With ``journal``, new Directories are handed to it before their rows commit
    (the embedded store keeps them in its packs too, to rebuild from).
    """

    def __init__(self, path: str | Path, *, journal: Journal | None = None) -> None:
        self.path = Path(path)
        self._journal = journal
        self._conn = connect(self.path)
        self._lock = threading.Lock()
        with self._lock:
            try:
                self._conn.executescript(_SCHEMA)
            except sqlite3.Error as exc:
                self._conn.close()
                raise storage_error(f"cannot set up SQLite database {path}", exc, path) from exc

    def _get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        out: dict[B3Digest, Directory] = {}
        with self._lock:
            try:
                for i in range(0, len(digests), _BATCH):
                    batch = digests[i : i + _BATCH]
                    marks = ",".join("?" * len(batch))
                    rows = self._conn.execute(
                        f"SELECT digest, data FROM directories WHERE digest IN ({marks})",
                        [d.raw for d in batch],
                    ).fetchall()
                    for raw, data in rows:
                        digest = B3Digest(raw)
                        out[digest] = stored_directory(digest, data)
            except sqlite3.Error as exc:
                raise storage_error("reading directories", exc) from exc
        return out

    def _commit_sync(self, directories: Sequence[Directory]) -> None:
        rows = [(d.digest.raw, d.encode()) for d in directories]
        with self._lock:
            if self._journal is not None and rows:
                new = self._absent([raw for raw, _ in rows])
                if new:  # journaled first: a crash never leaves rows the journal lacks
                    self._journal([row for row in rows if row[0] in new])
            write_rows(
                self._conn,
                "INSERT OR IGNORE INTO directories (digest, data) VALUES (?, ?)",
                rows,
                "writing directories",
            )

    def _absent(self, raws: Sequence[bytes]) -> set[bytes]:
        """Which of ``raws`` are not stored (the lock held)."""
        out = set(raws)
        try:
            for i in range(0, len(raws), _BATCH):
                batch = raws[i : i + _BATCH]
                marks = ",".join("?" * len(batch))
                for (raw,) in self._conn.execute(
                    f"SELECT digest FROM directories WHERE digest IN ({marks})", batch
                ):
                    out.discard(bytes(raw))
        except sqlite3.Error as exc:
            raise storage_error("reading directories", exc) from exc
        return out

    def restore_sync(self, digest: bytes, data: bytes | memoryview) -> None:
        """Put back a Directory found in a journal (its digest checked; not journaled again)."""
        data = bytes(data)
        if B3Digest.of(data).raw != digest:
            raise DataCorruption(
                f"journaled directory {B3Digest(digest)} does not match its digest"
            )
        with self._lock:
            write_one(
                self._conn,
                "INSERT OR IGNORE INTO directories (digest, data) VALUES (?, ?)",
                (digest, data),
                "restoring a directory",
            )

    def close(self) -> None:
        """Close the connection (blocking)."""
        with self._lock:
            self._conn.close()

    async def aclose(self) -> None:
        self.close()
