"""Named caches: views over one deduplicated store.

A named cache is served at ``/<name>/…`` with its own priority, signing keys
and public/private flag. Its paths are its *members*: a path pushed to one
cache is visible only there, while the NARs' content is stored once for all.
A NAR counts for a cache only once it was uploaded to that cache (the bytes
are hashed again: an uploader proves it has them), so a narinfo can name
only a NAR its own cache received. Members are GC roots, for as long as
the cache's *retention* says: a member not pushed or fetched through its
cache for that long stops being one at the next ``gc``.

A cache may have an *upstream* Nix binary cache (pull-through): a path that
is not a member yet is looked up there, checked against the upstream's
trusted keys, ingested once into the shared store and becomes a member
(:mod:`tvix_store.nar_bridge.pullthrough`).

Configuration, members and NAR receipts live in ``service.sqlite`` in the
data directory, beside the tokens, or, for frontends over a shared store, in
its PostgreSQL database (:mod:`tvix_store.servicedb`). The unnamed default
cache at ``/`` is the whole store, as before.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nix_compat.signing import SigningKey, VerifyingKey
from tvix_castore.errors import NotFound, ValidationError
from tvix_store.servicedb import Executor, service_db

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
# Columns added after the first release of the SQLite tables: (table, column, definition).
_ADDED_COLUMNS = (
    ("caches", "upstream", "TEXT"),
    ("caches", "upstream_keys", "TEXT NOT NULL DEFAULT ''"),
    ("caches", "retention", "REAL"),
    ("cache_paths", "seen", "REAL"),
)
# The same tables in a shared PostgreSQL (component "caches"; tvix_castore.postgres).
MIGRATIONS = (
    """
    CREATE TABLE caches (name text PRIMARY KEY, created double precision NOT NULL,
        priority integer NOT NULL, public integer NOT NULL, keys text NOT NULL,
        upstream text, upstream_keys text NOT NULL DEFAULT '', retention double precision);
    CREATE TABLE cache_paths (cache text NOT NULL, digest bytea NOT NULL, path text NOT NULL,
        added double precision NOT NULL, seen double precision, PRIMARY KEY (cache, digest));
    CREATE INDEX cache_paths_digest ON cache_paths (digest);
    CREATE TABLE cache_nars (cache text NOT NULL, nar_hash bytea NOT NULL,
        added double precision NOT NULL, PRIMARY KEY (cache, nar_hash))
    """,
)
# When a member was last pushed or fetched.
_SEEN = "coalesce(seen, added)"
_COLUMNS = "name, created, priority, public, keys, upstream, upstream_keys, retention"
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
    upstream: str | None = None
    """A Nix binary cache (``http(s)://…``) paths are pulled through from."""
    upstream_keys: tuple[VerifyingKey, ...] = ()
    """Keys one of which must have signed an upstream narinfo."""
    retention: float | None = None
    """Seconds a member stays one after it was last pushed or fetched (``None``: always)."""

    def as_json(self, paths: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "created": self.created,
            "priority": self.priority,
            "public": self.public,
            "public_keys": [str(k.verifying_key()) for k in self.signing_keys],
            "upstream": self.upstream,
            "upstream_keys": [str(k) for k in self.upstream_keys],
            "retention": self.retention,
        }
        if paths is not None:
            out["paths"] = paths
        return out


class CacheRegistry:
    """The named caches of one data directory, or of a shared store's database."""

    def __init__(self, home: Path, url: str | None = None) -> None:
        """``url``: a PostgreSQL database (a shared store's) holding the tables."""
        self.home = home
        self._sdb = service_db(home, url, "caches", _SCHEMA, MIGRATIONS, _add_columns)

    @property
    def where(self) -> str:
        return self._sdb.where

    def close(self) -> None:
        self._sdb.close()

    # -- caches -------------------------------------------------------------------------
    def get(self, name: str) -> Cache | None:
        if not self._sdb.exists():
            return None
        row = self._sdb.one(f"SELECT {_COLUMNS} FROM caches WHERE name = ?", (name,))
        return None if row is None else _cache(row)

    def require(self, name: str) -> Cache:
        cache = self.get(name)
        if cache is None:
            raise NotFound(f"no cache named {name!r}")
        return cache

    def all(self) -> list[Cache]:
        if not self._sdb.exists():
            return []
        return [_cache(r) for r in self._sdb.rows(f"SELECT {_COLUMNS} FROM caches ORDER BY name")]

    def create(
        self,
        name: str,
        priority: int,
        public: bool,
        keys: tuple[SigningKey, ...],
        *,
        upstream: str | None = None,
        upstream_keys: tuple[VerifyingKey, ...] = (),
        retention: float | None = None,
    ) -> Cache:
        check_name(name)
        cache = Cache(name, time.time(), priority, public, keys, upstream, upstream_keys, retention)
        _check(cache)

        def insert(conn: Executor) -> None:
            if conn.execute("SELECT 1 FROM caches WHERE name = ?", (name,)).fetchone():
                raise ValidationError(f"cache {name!r} exists already")
            conn.execute(
                f"INSERT INTO caches ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                (name, cache.created, *_row(cache)),
            )

        self._sdb.write("creating a cache", insert)
        return cache

    def configure(self, name: str, **changes: Any) -> Cache:
        """Change the given settings of cache ``name`` (the fields of :class:`Cache`)."""
        old = self.require(name)
        unknown = set(changes) - set(_SETTINGS)
        if unknown:
            raise ValidationError(f"not a cache setting: {', '.join(sorted(unknown))}")
        new = dataclasses.replace(old, **changes)
        _check(new)

        def update(conn: Executor) -> None:
            conn.execute(
                "UPDATE caches SET priority = ?, public = ?, keys = ?, upstream = ?,"
                " upstream_keys = ?, retention = ? WHERE name = ?",
                (*_row(new), name),
            )

        self._sdb.write("configuring a cache", update)
        return new

    def destroy(self, name: str) -> int:
        """Forget a cache and its members (their content is left to the collector)."""
        self.require(name)

        def drop(conn: Executor) -> int:
            n = conn.execute("DELETE FROM cache_paths WHERE cache = ?", (name,)).rowcount
            conn.execute("DELETE FROM cache_nars WHERE cache = ?", (name,))
            conn.execute("DELETE FROM caches WHERE name = ?", (name,))
            return int(n)

        return self._sdb.write("destroying a cache", drop)

    # -- members and receipts -----------------------------------------------------------
    def has(self, name: str, digest: bytes) -> bool:
        return self.seen(name, digest) is not None

    def seen(self, name: str, digest: bytes) -> float | None:
        """When a member of ``name`` was last pushed or fetched (``None``: not a member)."""
        row = self._sdb.one(
            f"SELECT {_SEEN} FROM cache_paths WHERE cache = ? AND digest = ?", (name, digest)
        )
        return None if row is None else float(row[0])

    def add(self, name: str, digest: bytes, path: str) -> None:
        """Make ``path`` a member of ``name`` (again: its retention starts anew)."""

        def insert(conn: Executor) -> None:
            now = time.time()
            conn.execute(
                "INSERT INTO cache_paths (cache, digest, path, added, seen) VALUES (?,?,?,?,?)"
                " ON CONFLICT (cache, digest) DO UPDATE SET added = excluded.added,"
                " seen = excluded.seen",
                (name, digest, path, now, now),
            )

        self._sdb.write("adding a path to a cache", insert)

    def remove(self, name: str, digest: bytes) -> bool:
        """Take ``digest`` out of cache ``name``; whether it was a member."""

        def delete(conn: Executor) -> bool:
            sql = "DELETE FROM cache_paths WHERE cache = ? AND digest = ?"
            return bool(conn.execute(sql, (name, digest)).rowcount)

        return self._sdb.write("removing a path from a cache", delete)

    def touch(self, cache: Cache, digest: bytes, seen: float) -> None:
        """Record a fetch of member ``digest`` last seen at ``seen``.

        Written at most every ``min(1 h, retention / 4)`` per member, so that
        reads cost no write each and retention stays accurate to a quarter.
        """
        if cache.retention is None:
            return
        now = time.time()
        if now - seen < min(3600.0, cache.retention / 4):
            return

        def update(conn: Executor) -> None:
            conn.execute(
                "UPDATE cache_paths SET seen = ? WHERE cache = ? AND digest = ?",
                (now, cache.name, digest),
            )

        self._sdb.write("recording a fetch", update)

    def expired(self, now: float) -> list[tuple[str, bytes, str]]:
        """(cache, digest, path) of every member whose cache's retention has run out."""
        if not self._sdb.exists():
            return []
        rows = self._sdb.rows(
            "SELECT p.cache, p.digest, p.path FROM cache_paths p JOIN caches c"
            f" ON c.name = p.cache WHERE c.retention IS NOT NULL AND {_SEEN} < ? - c.retention"
            " ORDER BY p.path",
            (now,),
        )
        return [(str(r[0]), bytes(r[1]), str(r[2])) for r in rows]

    def expire(self, members: list[tuple[str, bytes, str]], now: float) -> None:
        """Drop ``members`` (from :meth:`expired`) unless pushed or fetched meanwhile."""

        def drop(conn: Executor) -> None:
            for name, digest, _ in members:
                conn.execute(
                    f"DELETE FROM cache_paths WHERE cache = ? AND digest = ? AND {_SEEN} <"
                    " ? - (SELECT retention FROM caches WHERE name = ?)",
                    (name, digest, now, name),
                )

        self._sdb.write("expiring cache members", drop)

    def members(self, name: str) -> list[bytes]:
        rows = self._sdb.rows(
            "SELECT digest FROM cache_paths WHERE cache = ? ORDER BY path", (name,)
        )
        return [bytes(r[0]) for r in rows]

    def count(self, name: str) -> int:
        row = self._sdb.one("SELECT count(*) FROM cache_paths WHERE cache = ?", (name,))
        return int(row[0])

    def all_members(self, now: float | None = None) -> set[bytes]:
        """Every path some cache holds (GC roots); at ``now``, those within retention."""
        if not self._sdb.exists():
            return set()
        if now is None:
            rows = self._sdb.rows("SELECT DISTINCT digest FROM cache_paths")
        else:
            rows = self._sdb.rows(
                "SELECT DISTINCT p.digest FROM cache_paths p LEFT JOIN caches c"
                f" ON c.name = p.cache WHERE c.retention IS NULL OR {_SEEN} >= ? - c.retention",
                (now,),
            )
        return {bytes(r[0]) for r in rows}

    def received(self, name: str, nar_hash: bytes) -> None:
        def insert(conn: Executor) -> None:
            conn.execute(
                "INSERT INTO cache_nars (cache, nar_hash, added) VALUES (?,?,?)"
                " ON CONFLICT (cache, nar_hash) DO UPDATE SET added = excluded.added",
                (name, nar_hash, time.time()),
            )

        self._sdb.write("recording a NAR upload", insert)

    def has_nar(self, name: str, nar_hash: bytes) -> bool:
        row = self._sdb.one(
            "SELECT 1 FROM cache_nars WHERE cache = ? AND nar_hash = ?", (name, nar_hash)
        )
        return row is not None


_SETTINGS = ("priority", "public", "signing_keys", "upstream", "upstream_keys", "retention")


def _check(cache: Cache) -> None:
    if cache.upstream is not None:
        if not cache.upstream.startswith(("http://", "https://")):
            raise ValidationError(f"upstream {cache.upstream!r}: not an http(s):// URL")
        if not cache.upstream_keys:
            raise ValidationError(
                "an upstream needs at least one trusted key (--upstream-key): this cache"
                " signs what it pulls through with its own keys"
            )
    if cache.retention is not None and cache.retention <= 0:
        raise ValidationError("retention must be a positive duration")


def _row(c: Cache) -> tuple[Any, ...]:
    return (
        c.priority,
        int(c.public),
        _keys_text(c.signing_keys),
        c.upstream,
        "\n".join(str(k) for k in c.upstream_keys),
        c.retention,
    )


def _add_columns(conn: Executor) -> None:
    for table, column, definition in _ADDED_COLUMNS:
        have = {str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})").fetchall()}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


def _keys_text(keys: tuple[SigningKey, ...]) -> str:
    return "\n".join(k.render() for k in keys)


def _cache(row: Any) -> Cache:
    keys = tuple(SigningKey.parse(t) for t in str(row[4]).split("\n") if t.strip())
    upstream_keys = tuple(VerifyingKey.parse(t) for t in str(row[6]).split("\n") if t.strip())
    retention = None if row[7] is None else float(row[7])
    return Cache(
        str(row[0]), float(row[1]), int(row[2]), bool(row[3]), keys,
        None if row[5] is None else str(row[5]), upstream_keys, retention,
    )  # fmt: skip
