"""Named caches: views over one deduplicated store.

A named cache is served at ``/<name>/…`` with its own priority, signing keys
and public/private flag. Its paths are its *members*: a path pushed to one
cache is visible only there, while the NARs' content is stored once for all.
A NAR counts for a cache only once it was uploaded to that cache (the bytes
are hashed again: an uploader proves it has them), so a narinfo can name
only a NAR its own cache received. Members are GC roots.

Configuration, members and NAR receipts live in ``service.sqlite`` in the
data directory, beside the tokens. The unnamed default cache at ``/`` is
the whole store, as before.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nix_compat.signing import SigningKey
from tvix_castore.directoryservice.sqlite import in_transaction
from tvix_castore.errors import NotFound, ValidationError
from tvix_store.servicedb import open_service_db, service_db_path

__all__ = ["RESERVED", "Cache", "CacheRegistry", "check_name"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS caches (name TEXT PRIMARY KEY, created REAL NOT NULL,
    priority INTEGER NOT NULL, public INTEGER NOT NULL, keys TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cache_paths (cache TEXT NOT NULL, digest BLOB NOT NULL,
    path TEXT NOT NULL, added REAL NOT NULL, PRIMARY KEY (cache, digest)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS cache_paths_digest ON cache_paths (digest);
CREATE TABLE IF NOT EXISTS cache_nars (cache TEXT NOT NULL, nar_hash BLOB NOT NULL,
    added REAL NOT NULL, PRIMARY KEY (cache, nar_hash)) WITHOUT ROWID;
"""
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# First path segments of the binary cache and its pages: no cache may be called so.
RESERVED = frozenset(
    {"nar", "log", "nix-cache-info", "metrics", "paths", "path", "stats", "static", "default"}
)


def check_name(name: str) -> str:
    """``name`` if it can name a cache (lower case, digits, ``-``/``_``; not reserved)."""
    if _NAME.fullmatch(name) is None:
        raise ValidationError(
            f"cache name {name!r}: 1-63 of a-z, 0-9, '-', '_', starting with a letter or digit"
        )
    if name in RESERVED:
        raise ValidationError(f"cache name {name!r} is reserved")
    return name


@dataclass(frozen=True)
class Cache:
    """One named cache's settings."""

    name: str
    created: float
    priority: int
    public: bool
    signing_keys: tuple[SigningKey, ...]

    def as_json(self, paths: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "created": self.created,
            "priority": self.priority,
            "public": self.public,
            "public_keys": [str(k.verifying_key()) for k in self.signing_keys],
        }
        if paths is not None:
            out["paths"] = paths
        return out


class CacheRegistry:
    """The named caches of one data directory."""

    def __init__(self, home: Path) -> None:
        self.db = service_db_path(home)
        self.home = home
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_service_db(self.home, _SCHEMA, "cache")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- caches -------------------------------------------------------------------------
    def get(self, name: str) -> Cache | None:
        if self._conn is None and not self.db.exists():
            return None
        row = (
            self._db()
            .execute(
                "SELECT name, created, priority, public, keys FROM caches WHERE name = ?", (name,)
            )
            .fetchone()
        )
        return None if row is None else _cache(row)

    def require(self, name: str) -> Cache:
        cache = self.get(name)
        if cache is None:
            raise NotFound(f"no cache named {name!r}")
        return cache

    def all(self) -> list[Cache]:
        if self._conn is None and not self.db.exists():
            return []
        rows = self._db().execute(
            "SELECT name, created, priority, public, keys FROM caches ORDER BY name"
        )
        return [_cache(r) for r in rows]

    def create(self, name: str, priority: int, public: bool, keys: tuple[SigningKey, ...]) -> Cache:
        check_name(name)
        cache = Cache(name, time.time(), priority, public, keys)

        def insert(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM caches WHERE name = ?", (name,)).fetchone():
                raise ValidationError(f"cache {name!r} exists already")
            conn.execute(
                "INSERT INTO caches (name, created, priority, public, keys) VALUES (?,?,?,?,?)",
                (name, cache.created, priority, int(public), _keys_text(keys)),
            )

        in_transaction(self._db(), "creating a cache", insert)
        return cache

    def configure(
        self,
        name: str,
        priority: int | None = None,
        public: bool | None = None,
        keys: tuple[SigningKey, ...] | None = None,
    ) -> Cache:
        old = self.require(name)
        new = Cache(
            name,
            old.created,
            old.priority if priority is None else priority,
            old.public if public is None else public,
            old.signing_keys if keys is None else keys,
        )

        def update(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE caches SET priority = ?, public = ?, keys = ? WHERE name = ?",
                (new.priority, int(new.public), _keys_text(new.signing_keys), name),
            )

        in_transaction(self._db(), "configuring a cache", update)
        return new

    def destroy(self, name: str) -> int:
        """Forget a cache and its members (their content is left to the collector)."""
        self.require(name)

        def drop(conn: sqlite3.Connection) -> int:
            n = conn.execute("DELETE FROM cache_paths WHERE cache = ?", (name,)).rowcount
            conn.execute("DELETE FROM cache_nars WHERE cache = ?", (name,))
            conn.execute("DELETE FROM caches WHERE name = ?", (name,))
            return int(n)

        return in_transaction(self._db(), "destroying a cache", drop)

    # -- members and receipts -----------------------------------------------------------
    def has(self, name: str, digest: bytes) -> bool:
        row = (
            self._db()
            .execute("SELECT 1 FROM cache_paths WHERE cache = ? AND digest = ?", (name, digest))
            .fetchone()
        )
        return row is not None

    def add(self, name: str, digest: bytes, path: str) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO cache_paths (cache, digest, path, added) VALUES (?,?,?,?)",
                (name, digest, path, time.time()),
            )

        in_transaction(self._db(), "adding a path to a cache", insert)

    def members(self, name: str) -> list[bytes]:
        rows = self._db().execute(
            "SELECT digest FROM cache_paths WHERE cache = ? ORDER BY path", (name,)
        )
        return [bytes(r[0]) for r in rows]

    def count(self, name: str) -> int:
        row = self._db().execute("SELECT count(*) FROM cache_paths WHERE cache = ?", (name,))
        return int(row.fetchone()[0])

    def all_members(self) -> set[bytes]:
        """Every path some cache holds (GC roots)."""
        if self._conn is None and not self.db.exists():
            return set()
        return {bytes(r[0]) for r in self._db().execute("SELECT DISTINCT digest FROM cache_paths")}

    def received(self, name: str, nar_hash: bytes) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO cache_nars (cache, nar_hash, added) VALUES (?,?,?)",
                (name, nar_hash, time.time()),
            )

        in_transaction(self._db(), "recording a NAR upload", insert)

    def has_nar(self, name: str, nar_hash: bytes) -> bool:
        row = (
            self._db()
            .execute("SELECT 1 FROM cache_nars WHERE cache = ? AND nar_hash = ?", (name, nar_hash))
            .fetchone()
        )
        return row is not None


def _keys_text(keys: tuple[SigningKey, ...]) -> str:
    return "\n".join(k.render() for k in keys)


def _cache(row: Any) -> Cache:
    keys = tuple(SigningKey.parse(t) for t in str(row[4]).split("\n") if t.strip())
    return Cache(str(row[0]), float(row[1]), int(row[2]), bool(row[3]), keys)
