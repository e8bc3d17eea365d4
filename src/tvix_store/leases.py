"""Leases: rows in ``store.sqlite`` saying "a writer is at work here, until …".

A writer that finds a blob or Directory present does not store it again, so
between that check and the PathInfo that finally refers to it, the content
is referenced by nothing but the writer's intent. The garbage collector
must not sweep it then. Each process writing to the embedded store holds one
lease row (taken at its first check or write, renewed as it keeps writing,
expiring :data:`LEASE_TTL` after its last write, deleted when it closes the
store), and :mod:`tvix_store.gc` sweeps nothing while another process holds
a live lease. Rows, not counters: a process killed with ``kill -9`` leaves a
row that simply expires.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tvix_castore.directoryservice.sqlite import connect, storage_error, write_one
from tvix_castore.errors import ConfigError

__all__ = ["LEASE_TTL", "Lease", "ProcessLease", "lease_ttl", "live_leases"]

ENV_LEASE_TTL = "TVIX_STORE_LEASE_TTL"
LEASE_TTL = 600.0  # seconds a writer's lease lasts after its last write
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY, holder TEXT NOT NULL,"
    " expires REAL NOT NULL) WITHOUT ROWID"
)


def lease_ttl() -> float:
    """The lease lifetime: ``TVIX_STORE_LEASE_TTL`` seconds, else :data:`LEASE_TTL`."""
    raw = os.environ.get(ENV_LEASE_TTL, "").strip()
    if not raw:
        return LEASE_TTL
    try:
        ttl = float(raw)
    except ValueError:
        ttl = -1.0
    if not 0 < ttl < 1e9:
        raise ConfigError(f"{ENV_LEASE_TTL}={raw!r}: expected a positive number of seconds")
    return ttl


@dataclass(frozen=True)
class Lease:
    """A lease row."""

    id: str
    holder: str
    expires: float


def _dead_here(holder: str) -> bool:
    """Whether ``holder`` names a process of this host that no longer exists.

    (A writer killed with kill -9 cannot release its row; without this, a gc
    after a crash would wait for the row to expire. A reused pid only makes a
    dead holder look alive, which errs on the safe side.)
    """
    pid, _, host = holder.removeprefix("pid ").partition(" on ")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # (alive, someone else's)
        return False
    return False


def live_leases(conn: sqlite3.Connection, now: float | None = None) -> list[Lease]:
    """The leases not expired at ``now`` whose holders may still be alive.

    Read on ``conn``, e.g. inside a sweep's transaction.
    """
    conn.execute(_SCHEMA)
    at = time.time() if now is None else now
    return [
        Lease(str(i), str(h), float(e))
        for i, h, e in conn.execute(
            "SELECT id, holder, expires FROM leases WHERE expires > ?", (at,)
        )
        if not _dead_here(str(h))
    ]


class ProcessLease:
    """The lease of the process on one store, taken lazily by :meth:`hold`."""

    def __init__(self, db: Path, ttl: float | None = None) -> None:
        self.db = db
        self.ttl = lease_ttl() if ttl is None else ttl
        self.id = uuid.uuid4().hex
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self._conn: sqlite3.Connection | None = None
        self._expires = 0.0
        self._lock = threading.Lock()

    def hold(self) -> None:
        """Make sure the lease lasts at least ``ttl / 2`` more (a write only when it would not)."""
        now = time.time()
        if self._expires - now > self.ttl / 2:
            return
        with self._lock:
            if self._expires - now > self.ttl / 2:
                return
            if self._conn is None:
                self._conn = connect(self.db)
                try:
                    self._conn.execute(_SCHEMA)
                except sqlite3.Error as exc:
                    raise storage_error("creating the leases table", exc, self.db) from exc
            expires = now + self.ttl
            write_one(
                self._conn,
                "INSERT OR REPLACE INTO leases (id, holder, expires) VALUES (?, ?, ?)",
                (self.id, self.holder, expires),
                "taking a write lease",
            )
            self._expires = expires

    def release(self) -> None:
        """Drop the lease (the writer is done); it is taken again by the next :meth:`hold`."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            self._expires = 0.0
            try:
                write_one(conn, "DELETE FROM leases WHERE id = ?", (self.id,), "dropping a lease")
            except Exception:
                pass
            finally:
                conn.close()
