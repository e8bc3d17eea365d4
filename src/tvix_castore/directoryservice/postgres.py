"""``postgresql://…``: Directories in PostgreSQL, canonical bytes keyed by digest.

A closure is committed in one transaction (``INSERT … ON CONFLICT DO
NOTHING``, so concurrent uploads of shared subtrees are harmless): readers in
any process see all of it or nothing. Every read re-hashes the stored bytes.
``directory_edges`` holds each parent → child link, indexed both ways, for a
garbage collector's mark phase; nothing cascades (children are shared).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import ThreadedDirectoryService, stored_directory
from tvix_castore.nodes import Directory
from tvix_castore.postgres import Database, Migration

if TYPE_CHECKING:
    import psycopg

__all__ = ["CASTORE_MIGRATIONS", "PostgresDirectoryService"]

CASTORE_MIGRATIONS: tuple[Migration, ...] = (
    """
    CREATE TABLE directories (digest bytea PRIMARY KEY, data bytea NOT NULL);
    CREATE TABLE directory_edges (parent bytea NOT NULL, child bytea NOT NULL,
        PRIMARY KEY (parent, child));
    CREATE INDEX directory_edges_child ON directory_edges (child)
    """,
    # 2: when each Directory was first stored (a collector keeps young ones)
    """
    ALTER TABLE directories ADD COLUMN added timestamptz NOT NULL DEFAULT now();
    CREATE INDEX directories_added ON directories (added)
    """,
)
_BATCH = 1000


class PostgresDirectoryService(ThreadedDirectoryService):
    """Directories in a PostgreSQL database (tables created on first open)."""

    def __init__(self, url: str) -> None:
        self._db = Database.shared(url)
        self._closed = False
        self.on_write: Callable[[], None] | None = None  # (a shared store's writer lease)
        try:
            self._db.migrate("castore", CASTORE_MIGRATIONS)
        except BaseException:
            self._db.release()
            raise

    def _get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        def body(conn: psycopg.Connection[tuple[Any, ...]]) -> list[tuple[bytes, bytes]]:
            rows: list[tuple[bytes, bytes]] = []
            for i in range(0, len(digests), _BATCH):
                batch = [d.raw for d in digests[i : i + _BATCH]]
                rows += conn.execute(
                    "SELECT digest, data FROM directories WHERE digest = ANY(%s)", (batch,)
                ).fetchall()
            return rows

        rows = self._db.run("reading directories", body)
        out: dict[B3Digest, Directory] = {}
        for raw, data in rows:
            digest = B3Digest(bytes(raw))
            out[digest] = stored_directory(digest, bytes(data))
        return out

    def _commit_sync(self, directories: Sequence[Directory]) -> None:
        rows = [(d.digest.raw, d.encode()) for d in directories]
        edges = sorted({(d.digest.raw, c.digest.raw) for d in directories for c in d.directories})

        def body(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            with conn.cursor() as cur:
                # (sorted: concurrent writers of overlapping closures lock rows in one order)
                cur.executemany(
                    "INSERT INTO directories (digest, data) VALUES (%s, %s)"
                    " ON CONFLICT (digest) DO NOTHING",
                    sorted(rows),
                )
                if edges:
                    cur.executemany(
                        "INSERT INTO directory_edges (parent, child) VALUES (%s, %s)"
                        " ON CONFLICT DO NOTHING",
                        edges,
                    )

        if rows:
            if self.on_write is not None:
                self.on_write()
            self._db.run("writing directories", body)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._db.release)
