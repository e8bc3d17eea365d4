"""``postgresql://…``: PathInfos and nar-bridge's NarHash index in PostgreSQL.

Tables (component ``store`` of :mod:`tvix_castore.postgres`'s migrations):

* ``pathinfos``: the PathInfo protobuf by its 20-byte digest, with its root
  node's digest (indexed: which paths hold a blob or Directory) and its NAR
  sha256; last write wins (``INSERT … ON CONFLICT DO UPDATE``);
* ``pathinfo_references``: one row per (path, reference), indexed by the
  reference (a collector's "who refers to this?"); rewritten with the path
  in one transaction;
* ``nar_index``: NarHash → root node and NAR size, with the root digest
  (indexed) and when it was added (a collector's upload window);
* ``pins``, ``pin_history`` and ``pathinfos.accessed`` (when a path was last
  served, recorded at most hourly): :mod:`tvix_store.sharedlife`.

Nothing cascades: references and root digests name shared children.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from tvix_castore.nodes import Node
from tvix_castore.postgres import Database, Migration
from tvix_store.narindex import NarIndex, decode_entry, encode_entry
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.base import PathInfoService, paged, stored_pathinfo

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "STORE_MIGRATIONS",
    "PostgresNarIndex",
    "PostgresPathInfoService",
    "components",
    "open_database",
]

STORE_MIGRATIONS: tuple[Migration, ...] = (
    """
    CREATE TABLE pathinfos (digest bytea PRIMARY KEY, data bytea NOT NULL,
        root_digest bytea, nar_sha256 bytea NOT NULL, updated double precision NOT NULL);
    CREATE INDEX pathinfos_root_digest ON pathinfos (root_digest);
    CREATE INDEX pathinfos_nar_sha256 ON pathinfos (nar_sha256);
    CREATE TABLE pathinfo_references (digest bytea NOT NULL, reference bytea NOT NULL,
        PRIMARY KEY (digest, reference));
    CREATE INDEX pathinfo_references_reference ON pathinfo_references (reference);
    CREATE TABLE nar_index (nar_sha256 bytea PRIMARY KEY, node bytea NOT NULL,
        nar_size bigint NOT NULL, root_digest bytea, added double precision NOT NULL);
    CREATE INDEX nar_index_root_digest ON nar_index (root_digest);
    CREATE INDEX nar_index_added ON nar_index (added)
    """,
    # 2: writers' leases and a collector's sweep (tvix_store.sharedgc)
    """
    CREATE TABLE leases (id text PRIMARY KEY, holder text NOT NULL,
        expires timestamptz NOT NULL);
    CREATE TABLE gc_sweeps (id text PRIMARY KEY, holder text NOT NULL,
        expires timestamptz NOT NULL)
    """,
    # 3: pins, and when a path was last served (tvix_store.sharedlife)
    """
    CREATE TABLE pins (name text NOT NULL, digest bytea NOT NULL, path text NOT NULL,
        PRIMARY KEY (name, digest));
    CREATE INDEX pins_digest ON pins (digest);
    CREATE TABLE pin_history (id bigserial PRIMARY KEY, at double precision NOT NULL,
        name text NOT NULL, action text NOT NULL, paths text NOT NULL);
    ALTER TABLE pathinfos ADD COLUMN accessed double precision;
    CREATE INDEX pathinfos_seen ON pathinfos (greatest(updated, coalesce(accessed, 0)))
    """,
)
_SEEN_EVERY = 3600.0  # seconds between two records of a path being served
_PAGE = 256


def _root_digest(node: Node) -> bytes | None:
    digest = getattr(node, "digest", None)
    return None if digest is None else bytes(digest.raw)


def components() -> tuple[tuple[str, tuple[Migration, ...]], ...]:
    """Each component whose tables a store's database holds, with its migrations, in order."""
    from tvix_castore.directoryservice.postgres import CASTORE_MIGRATIONS

    return (("castore", CASTORE_MIGRATIONS), ("store", STORE_MIGRATIONS))


def open_database(url: str) -> Database:
    """The shared pool for ``url`` with the store's tables migrated (release it when done)."""
    db = Database.shared(url)
    try:
        for component, migrations in components():
            db.migrate(component, migrations)
    except BaseException:
        db.release()
        raise
    return db


class PostgresPathInfoService(PathInfoService):
    """PathInfos in a PostgreSQL database (tables created on first open)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._db = open_database(url)
        self._closed = False

    def _get(self, digest: bytes) -> bytes | None:
        def body(conn: psycopg.Connection[tuple[Any, ...]]) -> bytes | None:
            row = conn.execute(
                "SELECT data, greatest(updated, coalesce(accessed, 0)) FROM pathinfos"
                " WHERE digest = %s",
                (digest,),
            ).fetchone()
            if row is None:
                return None
            now = time.time()
            if now - float(row[1]) > _SEEN_EVERY:  # (for gc --keep-since; at most hourly)
                conn.execute("UPDATE pathinfos SET accessed = %s WHERE digest = %s", (now, digest))
            return bytes(row[0])

        return self._db.run("reading a PathInfo", body)

    async def get(self, digest: bytes) -> PathInfo | None:
        data = await asyncio.to_thread(self._get, digest)
        return None if data is None else stored_pathinfo(digest, data)

    def _put(self, info: PathInfo, data: bytes) -> None:
        digest = info.digest
        refs = sorted({r.digest for r in info.references})

        def body(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            # The upsert takes the row's lock first: concurrent puts of one path serialise.
            conn.execute(
                "INSERT INTO pathinfos (digest, data, root_digest, nar_sha256, updated)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (digest) DO UPDATE SET"
                " data = excluded.data, root_digest = excluded.root_digest,"
                " nar_sha256 = excluded.nar_sha256, updated = excluded.updated",
                (digest, data, _root_digest(info.node), info.nar_sha256, time.time()),
            )
            conn.execute("DELETE FROM pathinfo_references WHERE digest = %s", (digest,))
            if refs:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO pathinfo_references (digest, reference) VALUES (%s, %s)",
                        [(digest, r) for r in refs],
                    )

        self._db.run("writing a PathInfo", body)

    async def put(self, info: PathInfo) -> PathInfo:
        await asyncio.to_thread(self._put, info, info.encode())
        return info

    def _page(self, after: bytes) -> list[tuple[bytes, bytes]]:
        def body(conn: psycopg.Connection[tuple[Any, ...]]) -> list[tuple[bytes, bytes]]:
            rows = conn.execute(
                "SELECT digest, data FROM pathinfos WHERE digest > %s ORDER BY digest LIMIT %s",
                (after, _PAGE),
            ).fetchall()
            return [(bytes(d), bytes(v)) for d, v in rows]

        return self._db.run("listing PathInfos", body)

    async def list(self) -> AsyncIterator[PathInfo]:
        async for info in paged(self._page):
            yield info

    @property
    def database(self) -> Database:
        """The pool it uses (shared with the NAR index and directories on the same URL)."""
        return self._db

    def nar_index(self) -> PostgresNarIndex:
        """The NarHash index kept in the same database."""
        return PostgresNarIndex(self.url)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._db.release)


class PostgresNarIndex(NarIndex):
    """The ``nar_index`` table, shared by every frontend on the database."""

    def __init__(self, url: str) -> None:
        self._db = open_database(url)
        self._closed = False

    def _get(self, nar_sha256: bytes) -> tuple[bytes, int] | None:
        def body(conn: psycopg.Connection[tuple[Any, ...]]) -> tuple[bytes, int] | None:
            row = conn.execute(
                "SELECT node, nar_size FROM nar_index WHERE nar_sha256 = %s", (nar_sha256,)
            ).fetchone()
            return None if row is None else (bytes(row[0]), int(row[1]))

        return self._db.run("reading the NAR index", body)

    async def get(self, nar_sha256: bytes) -> tuple[Node, int] | None:
        row = await asyncio.to_thread(self._get, nar_sha256)
        if row is None:
            return None
        return decode_entry(nar_sha256, row[0]), row[1]

    def _put(self, nar_sha256: bytes, node: bytes, root: bytes | None, nar_size: int) -> None:
        def body(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            conn.execute(
                "INSERT INTO nar_index (nar_sha256, node, nar_size, root_digest, added)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (nar_sha256) DO UPDATE SET"
                " node = excluded.node, nar_size = excluded.nar_size,"
                " root_digest = excluded.root_digest, added = excluded.added",
                (nar_sha256, node, nar_size, root, time.time()),
            )

        self._db.run("writing the NAR index", body)

    async def put(self, nar_sha256: bytes, node: Node, nar_size: int) -> None:
        data = encode_entry(node)
        await asyncio.to_thread(self._put, nar_sha256, data, _root_digest(node), nar_size)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._db.release)
