"""The NAR plan cache in ``store.sqlite``: plans per Directory, vouched NAR hashes, damage.

Three tables, owned here (and used only by :class:`tvix_store.nar.service.NarService`):

* ``nar_dirplans (id, digest, plan)``: a :class:`~tvix_store.nar.dirplan.DirPlan`
  per Directory digest, compressed. Shared by every NAR containing that
  Directory. Bounded: past ``max_bytes`` in total, random plans are evicted
  (any plan can be made again from its Directory; a missing one only costs
  the next export a render).
* ``nar_roots (root, size, sha256)``: the NAR size and sha256 established
  (by hashing) for the NAR of a root Directory. A NAR written from plans whose
  root is vouched for needs no hashing again.
* ``nar_damage (root, reason)``: NARs found damaged (see
  :meth:`NarService.mark_damaged`), keyed by node kind, digest and size.

The table of today's ``main`` (``nar_plans``, one plan per root naming v1
pack offsets) is dropped when a store is opened for writing: it is a cache.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.sqlite import connect, storage_error, write_one, write_rows
from tvix_castore.errors import ConfigError, DataCorruption
from tvix_castore.nodes import DirectoryNode, FileNode, Node
from tvix_store.nar.dirplan import DirPlan

__all__ = ["DEFAULT_MAX_BYTES", "ENV_MAX_BYTES", "PlanCache", "Vouched"]

_log = logging.getLogger(__name__)
_BATCH = 500
ENV_MAX_BYTES = "TVIX_STORE_PLAN_CACHE_BYTES"
DEFAULT_MAX_BYTES = 256 << 20
_EVICT_SHARE = 0.2  # evicting, drop to this much below the bound

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nar_dirplans (
    id INTEGER PRIMARY KEY, digest BLOB NOT NULL, plan BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS nar_roots (
    root BLOB PRIMARY KEY, size INTEGER NOT NULL, sha256 BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS nar_damage (root BLOB PRIMARY KEY, reason TEXT NOT NULL) WITHOUT ROWID;
DROP TABLE IF EXISTS nar_plans;
"""
# Plans were first kept in a WITHOUT ROWID table, whose rows spill to overflow
# pages past ~1 KB (a third of its pages were slack), then with a unique index
# on the digest (0.4 MB for the stdlib tree): such a table is dropped (a cache)
# and made again as a rowid table keyed by the digest's first 8 bytes, which
# keeps rows up to a page inline and needs no index. Two Directories sharing
# those bytes only evict each other's plan: a row is used only if its full
# digest is the one asked for.
_OLD_LAYOUT = f"""
BEGIN IMMEDIATE;
DROP TABLE IF EXISTS nar_dirplans;
{_SCHEMA}
COMMIT;
"""


def _env_max_bytes() -> int:
    text = os.environ.get(ENV_MAX_BYTES, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{ENV_MAX_BYTES}={text!r}: expected a number of bytes (0: no plans)")
    return value


def _key(digest: bytes) -> int:
    """A plan's row id: the first 8 bytes of its Directory's digest (as SQLite's int64)."""
    return int.from_bytes(digest[:8], "big", signed=True)


def damage_key(node: Node) -> bytes | None:
    """The key of ``node``'s damage mark: kind, digest and size (symlinks cannot be damaged).

    With the size, a node URL a client made up with a wrong size (which fails
    to render) marks only itself, not the path whose node has the real one.
    """
    if isinstance(node, DirectoryNode):
        return b"d" + node.digest.raw + node.size.to_bytes(8, "little")
    if isinstance(node, FileNode):
        return b"f" + node.digest.raw + node.size.to_bytes(8, "little")
    return None


class Vouched(NamedTuple):
    """A root's NAR size and sha256, as established by hashing it."""

    size: int
    sha256: bytes


class PlanCache:
    """The plan tables of one ``store.sqlite`` (thread-safe; blocking calls)."""

    def __init__(self, path: str | Path, *, max_bytes: int | None = None) -> None:
        self.path = Path(path)
        self.max_bytes = _env_max_bytes() if max_bytes is None else max_bytes
        self._conn = connect(self.path)
        self._lock = threading.Lock()
        self._read_only = bool(getattr(self._conn, "read_only", False))  # (a full disk)
        if not self._read_only:
            try:
                self._conn.executescript(_OLD_LAYOUT if self._old_layout() else _SCHEMA)
            except sqlite3.Error as exc:
                self._conn.close()
                raise storage_error("creating the NAR plan tables", exc, path) from exc

    def _old_layout(self) -> bool:
        row = self._conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'nar_dirplans'"
        ).fetchone()
        sql = str(row[0]).upper() if row is not None else ""
        return "WITHOUT ROWID" in sql or "UNIQUE" in sql

    def _query(self, what: str, sql: str, params: Sequence[object]) -> list[tuple[object, ...]]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # read-only, not created yet
                    return []
                raise storage_error(what, exc) from exc
            except sqlite3.Error as exc:
                raise storage_error(what, exc) from exc

    # -- plans -------------------------------------------------------------
    def get_many(self, digests: Sequence[bytes]) -> dict[bytes, DirPlan]:
        """The plans stored for ``digests``; a damaged one is logged and left out."""
        out: dict[bytes, DirPlan] = {}
        unique = list(dict.fromkeys(digests))
        for i in range(0, len(unique), _BATCH):
            batch = unique[i : i + _BATCH]
            marks = ",".join("?" * len(batch))
            rows = self._query(
                "reading NAR plans",
                f"SELECT digest, plan FROM nar_dirplans WHERE id IN ({marks})",
                [_key(d) for d in batch],
            )
            wanted = set(batch)
            for raw, data in rows:
                assert isinstance(raw, bytes) and isinstance(data, bytes)
                if raw not in wanted:
                    continue  # (another Directory whose digest starts the same)
                try:
                    out[raw] = DirPlan.decode(data, f"directory {B3Digest(raw)}")
                except DataCorruption as exc:
                    _log.warning("ignoring a NAR plan: %s", exc)
        return out

    def closure(self, root: bytes) -> dict[bytes, DirPlan] | None:
        """Plans of every Directory under ``root``, or ``None`` if one is missing."""
        out: dict[bytes, DirPlan] = {}
        level = [root]
        while level:
            found = self.get_many(level)
            if len(found) != len(level):
                return None
            out.update(found)
            level = list(
                dict.fromkeys(
                    c.digest for p in found.values() for c in p.children if c.digest not in out
                )
            )
        return out

    def put_many(self, plans: Mapping[bytes, DirPlan]) -> None:
        """Store plans (replacing older ones: their hints may be stale), then keep the bound."""
        if not plans or self.max_bytes == 0:
            return
        # (in key order: a fresh table's pages then fill up instead of splitting half-full)
        rows = sorted((_key(raw), raw, plan.encode()) for raw, plan in plans.items())
        with self._lock:
            write_rows(
                self._conn,
                "INSERT OR REPLACE INTO nar_dirplans (id, digest, plan) VALUES (?, ?, ?)",
                rows,
                "writing NAR plans",
            )
        self._bound()

    def stored_bytes(self) -> int:
        """Bytes of all plans (their rows' payloads)."""
        rows = self._query(
            "measuring NAR plans", "SELECT coalesce(sum(length(plan)), 0) FROM nar_dirplans", ()
        )
        value = rows[0][0] if rows else 0
        return int(value) if isinstance(value, int) else 0

    def _bound(self) -> None:
        # (a whole database file within the bound holds plans within it: no scan
        # of every row after every write, except in a store that large)
        rows = self._query(
            "measuring the database",
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
            (),
        )
        if rows and isinstance(rows[0][0], int) and rows[0][0] <= self.max_bytes:
            return
        total = self.stored_bytes()
        if total <= self.max_bytes:
            return
        target = self.max_bytes * (1 - _EVICT_SHARE)
        _log.info("NAR plans take %d bytes (bound %d): evicting", total, self.max_bytes)
        # (random rows, as many as their share of the excess; again while the
        # rows dropped were smaller than the average and it is not enough)
        while total > target:
            rows = self._query("counting NAR plans", "SELECT count(*) FROM nar_dirplans", ())
            count = int(rows[0][0]) if rows and isinstance(rows[0][0], int) else 0
            if not count:
                return
            drop = max(1, int(count * (total - target) / max(total, 1)))
            with self._lock:
                write_one(
                    self._conn,
                    "DELETE FROM nar_dirplans WHERE id IN"
                    " (SELECT id FROM nar_dirplans ORDER BY random() LIMIT ?)",
                    (drop,),
                    "evicting NAR plans",
                )
            total = self.stored_bytes()

    # -- vouched NAR hashes -------------------------------------------------------
    def vouched(self, root: bytes) -> Vouched | None:
        """The NAR size and sha256 established for the root Directory ``root``."""
        rows = self._query(
            "reading a NAR hash", "SELECT size, sha256 FROM nar_roots WHERE root = ?", (root,)
        )
        if not rows:
            return None
        size, sha = rows[0]
        assert isinstance(size, int) and isinstance(sha, bytes)
        return Vouched(size, sha)

    def roots(self) -> dict[bytes, Vouched]:
        """Every vouched root (for inspection)."""
        rows = self._query("listing NAR hashes", "SELECT root, size, sha256 FROM nar_roots", ())
        return {bytes(r): Vouched(int(n), bytes(h)) for r, n, h in rows}  # type: ignore[call-overload]

    def vouch(self, root: bytes, size: int, sha256: bytes) -> None:
        """Record the NAR size and sha256 of the root Directory ``root``."""
        with self._lock:
            write_one(
                self._conn,
                "INSERT OR REPLACE INTO nar_roots (root, size, sha256) VALUES (?, ?, ?)",
                (root, size, sha256),
                "writing a NAR hash",
            )

    # -- damage marks -----------------------------------------------------------
    def damage(self, node: Node) -> str | None:
        """Why ``node``'s NAR was found damaged, or ``None`` if it is not marked."""
        key = damage_key(node)
        if key is None:
            return None
        rows = self._query(
            "reading a damage mark", "SELECT reason FROM nar_damage WHERE root = ?", (key,)
        )
        return None if not rows else str(rows[0][0])

    def mark_damaged(self, node: Node, reason: str) -> None:
        key = damage_key(node)
        if key is None:
            return
        with self._lock:
            write_one(
                self._conn,
                "INSERT OR REPLACE INTO nar_damage (root, reason) VALUES (?, ?)",
                (key, reason[:1000]),
                "writing a damage mark",
            )

    def clear_damage(self, node: Node) -> bool:
        """Remove ``node``'s mark; whether there was one (no write if not)."""
        if self.damage(node) is None:
            return False
        with self._lock:
            write_one(
                self._conn,
                "DELETE FROM nar_damage WHERE root = ?",
                (damage_key(node),),
                "clearing a damage mark",
            )
        return True

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._conn.close()

    async def aclose(self) -> None:
        self.close()
