"""``sqlite:///abs/path``: PathInfos in SQLite (WAL), protobuf bytes by digest.

Shares the database file format (and, in the embedded store, the file) with
the SQLite DirectoryService; each service keeps its own connection.

Beside the ``pathinfos`` rows it keeps what the lifecycle needs
(:mod:`tvix_store.gc`): ``pathinfo_journal`` (the sequence number of each
path's latest journal record, and whether that record is a deletion, so a
rebuild from the packs applies records newest-wins and never brings back a
deleted path), ``path_access`` (when each path was last put or served:
batched, one write per path and :data:`ACCESS_RESOLUTION`, not per request)
and a ``generation`` counter bumped by every change, which lets a garbage
collector notice paths added while it was marking.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tvix_castore.directoryservice.sqlite import connect, in_transaction, storage_error
from tvix_castore.errors import DataCorruption, StorageUnavailable, ValidationError
from tvix_castore.lazy import lazy_module
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.base import PathInfoService, paged, stored_pathinfo

if TYPE_CHECKING:
    import asyncio
else:
    asyncio = lazy_module("asyncio")  # not needed to write a NAR from its plan

__all__ = [
    "ACCESS_RESOLUTION",
    "DeletedReference",
    "GenerationChanged",
    "SqlitePathInfoService",
    "journal_key",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pathinfos (
    digest BLOB PRIMARY KEY,
    data BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pathinfo_journal (digest BLOB PRIMARY KEY, seq INTEGER NOT NULL,
    deleted INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS path_access (digest BLOB PRIMARY KEY, at REAL NOT NULL)
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
INSERT OR IGNORE INTO store_meta (key, value) VALUES ('generation', 0);
"""
_PAGE = 256
_BUMP = "UPDATE store_meta SET value = value + 1 WHERE key = 'generation'"
ACCESS_RESOLUTION = 3600.0  # a path's last access is recorded to within this many seconds
_ACCESS_FLUSH = 30.0  # pending accesses are written at least this often (and at close)
_ACCESS_BATCH = 512


def journal_key(digest: bytes, seq: int) -> bytes:
    """A PathInfo journal record's key: its 20-byte digest, the sequence number, zero pad."""
    return digest + seq.to_bytes(8, "big") + bytes(4)


def _key_seq(key: bytes) -> int:
    return int.from_bytes(key[20:28], "big") if len(key) >= 28 else 0


Journal = Callable[[Sequence[tuple[bytes, int, bytes]]], None]
"""Gets (digest, seq, encoding) of PathInfos about to be stored (empty: deleted), first."""


class DeletedReference(ValidationError):
    """A PathInfo names a reference this store deleted (and has not received again)."""


class GenerationChanged(StorageUnavailable):
    """The store changed since the caller looked (a collector marks again)."""


class SqlitePathInfoService(PathInfoService):
    """PathInfos in a SQLite database file.

    With ``journal``, each PathInfo stored anew (or changed, or deleted) is
    handed to it before its row commits (the embedded store keeps them in
    its packs too).
    """

    def __init__(self, path: str | Path, *, journal: Journal | None = None) -> None:
        self.path = Path(path)
        self._journal = journal
        self._conn = connect(self.path)
        self._lock = threading.Lock()
        self._access: dict[bytes, float] = {}  # digest -> last access not written yet
        self._written: dict[bytes, float] = {}  # digest -> last access written (this process)
        self._flushed = time.monotonic()
        if getattr(self._conn, "read_only", False):
            return
        try:
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._conn.close()
            raise storage_error("creating the pathinfos table", exc, self.path) from exc

    def _get(self, digest: bytes) -> bytes | None:
        with self._lock:
            return self._get_locked(digest)

    def _get_locked(self, digest: bytes) -> bytes | None:
        try:
            row = self._conn.execute(
                "SELECT data FROM pathinfos WHERE digest = ?", (digest,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise storage_error("reading a PathInfo", exc) from exc
        return None if row is None else bytes(row[0])

    def _state(self, digest: bytes) -> tuple[int, bool] | None:
        """(seq, deleted) of ``digest``'s latest journal record, if this database knows it."""
        row = self._conn.execute(
            "SELECT seq, deleted FROM pathinfo_journal WHERE digest = ?", (digest,)
        ).fetchone()
        return None if row is None else (int(row[0]), bool(row[1]))

    def _transaction(self, what: str, body: Callable[[sqlite3.Connection], None]) -> None:
        in_transaction(self._conn, what, body)

    def restore_sync(self, key: bytes, data: bytes | memoryview) -> None:
        """Apply a record found in a journal (not journaled again): the newest record wins.

        An empty record is a deletion. Records of older releases (sequence 0)
        lose against any record with a sequence number.
        """
        data = bytes(data)
        digest, seq = bytes(key[:20]), _key_seq(key)
        if data:
            try:
                info = PathInfo.from_bytes(data)
            except ValidationError as exc:
                raise DataCorruption(f"a journaled PathInfo is invalid: {exc}") from exc
            if info.digest != digest:
                raise DataCorruption(f"a journaled PathInfo under {digest.hex()} is for another")

        def apply(conn: sqlite3.Connection) -> None:
            state = self._state(digest)
            if state is not None and (state[0] > seq or (state[0] == seq and seq > 0)):
                return  # (a newer record, or this one, is applied already)
            if data:
                conn.execute(
                    "INSERT OR REPLACE INTO pathinfos (digest, data) VALUES (?, ?)", (digest, data)
                )
            else:
                conn.execute("DELETE FROM pathinfos WHERE digest = ?", (digest,))
            conn.execute(
                "INSERT OR REPLACE INTO pathinfo_journal (digest, seq, deleted) VALUES (?, ?, ?)",
                (digest, seq, 0 if data else 1),
            )
            conn.execute(_BUMP)

        with self._lock:
            self._transaction("restoring a PathInfo", apply)

    def live_records(self, keys: Sequence[bytes]) -> set[bytes]:
        """Which journal record keys are each path's latest record (compaction keeps those)."""
        out: set[bytes] = set()
        with self._lock:
            for key in keys:
                digest, seq = bytes(key[:20]), _key_seq(key)
                state = self._state(digest)
                if state is None:
                    # (an older release's record: kept while its path is)
                    if seq == 0 and self._get_locked(digest) is not None:
                        out.add(key)
                elif state[0] == seq:
                    out.add(key)
        return out

    def get_sync(self, digest: bytes) -> PathInfo | None:
        """:meth:`get`, blocking (not recorded as an access)."""
        data = self._get(digest)
        return None if data is None else stored_pathinfo(digest, data)

    def _get_served(self, digest: bytes) -> PathInfo | None:
        info = self.get_sync(digest)
        if info is not None:
            self.touch([digest])
        return info

    async def get(self, digest: bytes) -> PathInfo | None:
        """The PathInfo, recorded as an access (served)."""
        return await asyncio.to_thread(self._get_served, digest)

    # -- accesses ----------------------------------------------------------------
    def touch(self, digests: Sequence[bytes]) -> None:
        """Record that these paths were served now (written in batches, see the module)."""
        now = time.time()
        flush = False
        with self._lock:
            for digest in digests:
                if now - self._written.get(digest, 0.0) >= ACCESS_RESOLUTION:
                    self._access[digest] = now
            if self._access and (
                len(self._access) >= _ACCESS_BATCH
                or time.monotonic() - self._flushed >= _ACCESS_FLUSH
            ):
                flush = True
        if flush:
            self.flush_access()

    def flush_access(self) -> None:
        """Write the accesses recorded so far (a failure is logged: they are a hint)."""
        import logging

        with self._lock:
            pending, self._access = self._access, {}
            self._flushed = time.monotonic()
            if not pending or getattr(self._conn, "read_only", False):
                return
            rows = list(pending.items())

            def write(conn: sqlite3.Connection) -> None:
                conn.executemany(
                    "INSERT INTO path_access (digest, at) VALUES (?, ?) ON CONFLICT (digest)"
                    " DO UPDATE SET at = max(at, excluded.at)",
                    rows,
                )

            try:
                self._transaction("recording path accesses", write)
            except Exception as exc:
                logging.getLogger(__name__).warning("cannot record path accesses: %s", exc)
                return
            self._written.update(pending)
            if len(self._written) > 1 << 16:
                self._written.clear()

    # -- writing -------------------------------------------------------------------
    def _deleted_refs(self, info: PathInfo) -> list[str]:
        refs = [r for r in info.references if r.digest != info.digest]
        out = []
        for ref in refs:
            state = self._state(ref.digest)
            if state is not None and state[1]:
                out.append(ref.absolute)
        return out

    def _next_seq(self, digest: bytes) -> int:
        state = self._state(digest)
        return max(time.time_ns(), (state[0] + 1) if state else 0)

    def _put(self, info: PathInfo, data: bytes) -> None:
        digest = info.digest
        with self._lock:
            if self._get_locked(digest) == data:
                self._access[digest] = time.time()  # (uploaded again: an access)
                return
            deleted = self._deleted_refs(info)
            if deleted:
                raise DeletedReference(
                    f"{info.store_path.absolute}: its reference {deleted[0]} was deleted from"
                    " this store; upload that path again first"
                )
            seq = self._next_seq(digest)
            if self._journal is not None:
                self._journal([(digest, seq, data)])  # first: a crash never leaves a row it lacks

            def write(conn: sqlite3.Connection) -> None:
                if self._deleted_refs(info):  # (deleted since: the record is superseded below)
                    raise DeletedReference(f"{info.store_path.absolute}: a reference was deleted")
                conn.execute(
                    "INSERT OR REPLACE INTO pathinfos (digest, data) VALUES (?, ?)", (digest, data)
                )
                conn.execute(
                    "INSERT OR REPLACE INTO pathinfo_journal (digest, seq, deleted)"
                    " VALUES (?, ?, 0)",
                    (digest, seq),
                )
                conn.execute(
                    "INSERT OR REPLACE INTO path_access (digest, at) VALUES (?, ?)",
                    (digest, time.time()),
                )
                conn.execute(_BUMP)

            try:
                self._transaction("writing a PathInfo", write)
            except BaseException:
                self._cancel([digest], seq)
                raise
            self._written[digest] = time.time()

    async def put(self, info: PathInfo) -> PathInfo:
        await asyncio.to_thread(self._put, info, info.encode())
        return info

    def _cancel(self, digests: Sequence[bytes], seq: int) -> None:
        """After a journaled change did not commit: journal each path's state as it is, newer.

        (Else a rebuild from the packs would apply the change that never was.)
        """
        if self._journal is None:
            return
        try:
            newer = max(time.time_ns(), seq + 1)
            records = [(d, newer, self._get_locked(d) or b"") for d in digests]
            self._journal(records)
            rows = [
                (d, newer, 0 if data else 1)
                for d, _, data in records
                if data or self._state(d) is not None
            ]

            def note(conn: sqlite3.Connection) -> None:
                conn.executemany(
                    "INSERT OR REPLACE INTO pathinfo_journal (digest, seq, deleted)"
                    " VALUES (?, ?, ?)",
                    rows,
                )

            self._transaction("journaling PathInfos", note)
        except Exception as exc:
            import logging

            logging.getLogger(__name__).warning("cannot journal a cancelled change: %s", exc)

    def generation(self) -> int:
        """The store's change counter (bumped by every put, delete and pin change)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT value FROM store_meta WHERE key = 'generation'"
            ).fetchone()
        return int(row[0]) if row else 0

    def access_times(self) -> dict[bytes, float]:
        """When each path was last put or served (as recorded so far)."""
        self.flush_access()
        with self._lock:
            rows = self._conn.execute("SELECT digest, at FROM path_access").fetchall()
        return {bytes(d): float(a) for d, a in rows}

    def delete_sync(
        self, digests: Sequence[bytes], *, expect_generation: int | None = None
    ) -> list[bytes]:
        """Delete these paths (journaling a deletion first); the digests that were there.

        With ``expect_generation``, nothing is deleted (GenerationChanged) if
        the store changed since the caller read that generation.
        """
        gone: list[bytes] = []
        with self._lock:
            present = [d for d in dict.fromkeys(digests) if self._get_locked(d) is not None]
            seqs = {d: self._next_seq(d) for d in present}
            if self._journal is not None and present:
                self._journal([(d, seqs[d], b"") for d in present])

            def write(conn: sqlite3.Connection) -> None:
                if expect_generation is not None:
                    (gen,) = conn.execute(
                        "SELECT value FROM store_meta WHERE key = 'generation'"
                    ).fetchone()
                    if int(gen) != expect_generation:
                        raise GenerationChanged("the store changed while it was being marked")
                for d in present:
                    conn.execute("DELETE FROM pathinfos WHERE digest = ?", (d,))
                    conn.execute("DELETE FROM path_access WHERE digest = ?", (d,))
                    conn.execute(
                        "INSERT OR REPLACE INTO pathinfo_journal (digest, seq, deleted)"
                        " VALUES (?, ?, 1)",
                        (d, seqs[d]),
                    )
                conn.execute(_BUMP)

            if present:
                try:
                    self._transaction("deleting PathInfos", write)
                except BaseException:
                    self._cancel(present, max(seqs.values()))
                    raise
                gone = present
            for d in present:
                self._access.pop(d, None)
                self._written.pop(d, None)
        return gone

    def _page(self, after: bytes) -> list[tuple[bytes, bytes]]:
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT digest, data FROM pathinfos WHERE digest > ? ORDER BY digest LIMIT ?",
                    (after, _PAGE),
                ).fetchall()
            except sqlite3.Error as exc:
                raise storage_error("listing PathInfos", exc) from exc
        return [(bytes(d), bytes(v)) for d, v in rows]

    def list_sync(self) -> list[PathInfo]:
        """Every PathInfo (blocking; for the lifecycle commands)."""
        out: list[PathInfo] = []
        after = b""
        while rows := self._page(after):
            out += [stored_pathinfo(d, v) for d, v in rows]
            after = rows[-1][0]
        return out

    async def list(self) -> AsyncIterator[PathInfo]:
        async for info in paged(self._page):
            yield info

    def close(self) -> None:
        self.flush_access()
        with self._lock:
            self._conn.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
