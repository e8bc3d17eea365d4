"""Pins, deletes and ``--keep-since`` on a shared store (PostgreSQL path infos).

The same rules as the embedded store's (:mod:`tvix_store.pins`,
:mod:`tvix_store.gc`), kept in the database every frontend shares:

* ``pins`` (name, path) and ``pin_history``: a pin keeps the closure of its
  paths; closures are followed in SQL through ``pathinfo_references``
  (indexed by the referring path), never by loading every PathInfo;
* a path is *seen* when it was put (``pathinfos.updated``) or served
  (``pathinfos.accessed``, written at most hourly per path by the
  PostgreSQL path info service); ``gc --keep-since D`` keeps the closures of
  the paths seen within D and of the pins, and deletes the other path infos
  in the sweep, under the same lease check as the content;
* ``delete`` removes path infos in one transaction, refusing a path a
  staying path refers to (unless with its referrers) or a pin holds.

Content of deleted paths goes at the next collection.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nix_compat.store_path import StorePath
from tvix_castore.errors import NotFound, ValidationError
from tvix_castore.postgres import Database
from tvix_store.pins import Pins

if TYPE_CHECKING:
    import psycopg

    Connection = psycopg.Connection[tuple[Any, ...]]

__all__ = ["SharedPins", "delete_shared", "kept_paths"]

# (references to paths not in the store are followed, and match nothing)
_CLOSURE = """
WITH RECURSIVE kept(d) AS (
    SELECT digest FROM pathinfos WHERE digest = ANY(%s)
    UNION SELECT r.reference FROM pathinfo_references r JOIN kept ON r.digest = kept.d)
SELECT d FROM kept
"""
_REFERRERS = """
WITH RECURSIVE gone(d) AS (
    SELECT unnest(%s::bytea[])
    UNION SELECT r.digest FROM pathinfo_references r JOIN gone ON r.reference = gone.d)
SELECT p.digest, p.data FROM gone JOIN pathinfos p ON p.digest = gone.d
"""


class SharedPins:
    """The pins of a shared store."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def set(self, name: str, paths: Sequence[StorePath]) -> None:
        """Point ``name`` at ``paths`` (NotFound unless each is in the store)."""
        Pins.check_name(name)
        unique = list(dict.fromkeys(paths))

        def body(conn: Connection) -> None:
            digests = [p.digest for p in unique]
            have = {
                bytes(r[0])
                for r in conn.execute(
                    "SELECT digest FROM pathinfos WHERE digest = ANY(%s)", (digests,)
                )
            }
            for p in unique:
                if p.digest not in have:
                    raise NotFound(f"{p.absolute}: not in this store")
            conn.execute("DELETE FROM pins WHERE name = %s", (name,))
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO pins (name, digest, path) VALUES (%s, %s, %s)",
                    [(name, p.digest, p.absolute) for p in unique],
                )
            _history(conn, name, "set", [p.absolute for p in unique])

        self._db.run("setting a pin", body)

    def remove(self, name: str) -> tuple[str, ...]:
        """Remove pin ``name``; the paths it pointed at. NotFound if there is none."""

        def body(conn: Connection) -> tuple[str, ...]:
            rows = conn.execute(
                "DELETE FROM pins WHERE name = %s RETURNING path", (name,)
            ).fetchall()
            if not rows:
                raise NotFound(f"no pin named {name!r}")
            paths = tuple(sorted(str(r[0]) for r in rows))
            _history(conn, name, "removed", list(paths))
            return paths

        return self._db.run("removing a pin", body)

    def current(self) -> dict[str, tuple[str, ...]]:
        """Each pin and its paths (sorted)."""

        def body(conn: Connection) -> dict[str, tuple[str, ...]]:
            out: dict[str, list[str]] = {}
            for name, path in conn.execute("SELECT name, path FROM pins ORDER BY name, path"):
                out.setdefault(str(name), []).append(str(path))
            return {k: tuple(v) for k, v in out.items()}

        return self._db.run("listing pins", body)

    def history(self) -> list[dict[str, Any]]:
        """Every change of every pin, oldest first."""

        def body(conn: Connection) -> list[dict[str, Any]]:
            rows = conn.execute("SELECT at, name, action, paths FROM pin_history ORDER BY id")
            return [
                {"at": float(at), "name": str(n), "action": str(a), "paths": json.loads(p)}
                for at, n, a, p in rows
            ]

        return self._db.run("reading the pin history", body)


def _history(conn: Connection, name: str, action: str, paths: list[str]) -> None:
    conn.execute(
        "INSERT INTO pin_history (at, name, action, paths) VALUES (%s, %s, %s, %s)",
        (time.time(), name, action, json.dumps(paths)),
    )


def kept_paths(conn: Connection, keep_since: float, now: float) -> tuple[set[bytes], int]:
    """What a collection keeps, and how many paths the pins' closures hold.

    The closure of the pins, of named caches' members within their retention
    and of the paths seen since ``now - keep_since``.
    """
    pinned = [bytes(r[0]) for r in conn.execute("SELECT DISTINCT digest FROM pins")]
    seen = [
        bytes(r[0])
        for r in conn.execute(
            "SELECT digest FROM pathinfos WHERE greatest(updated, coalesce(accessed, 0)) >= %s",
            (now - keep_since,),
        )
    ]
    members: list[bytes] = []
    row = conn.execute("SELECT to_regclass('cache_paths') IS NOT NULL").fetchone()
    if row is not None and row[0]:  # (named caches: their members within retention)
        members = [
            bytes(r[0])
            for r in conn.execute(
                "SELECT DISTINCT p.digest FROM cache_paths p LEFT JOIN caches c"
                " ON c.name = p.cache WHERE c.retention IS NULL"
                " OR coalesce(p.seen, p.added) >= %s - c.retention",
                (now,),
            )
        ]
    pinned_closure = {bytes(r[0]) for r in conn.execute(_CLOSURE, (pinned,))}
    kept = {bytes(r[0]) for r in conn.execute(_CLOSURE, (list({*pinned, *seen, *members}),))}
    return kept, len(pinned_closure)


def delete_shared(
    db: Database, paths: Sequence[StorePath], *, with_referrers: bool = False
) -> list[str]:
    """Delete these paths' PathInfos from a shared store; the store paths deleted, sorted.

    Raises:
        NotFound: a path is not in the store.
        Referenced: a path that stays refers to one (without ``with_referrers``), or a
            pin holds one.
    """
    from tvix_store.gc import Referenced
    from tvix_store.pathinfoservice.base import stored_pathinfo

    targets = list(dict.fromkeys(p.digest for p in paths))

    def body(conn: Connection) -> list[str]:
        found = {
            bytes(d): stored_pathinfo(bytes(d), bytes(v))
            for d, v in conn.execute(
                "SELECT digest, data FROM pathinfos WHERE digest = ANY(%s) FOR UPDATE",
                (targets,),
            )
        }
        for p in paths:
            if p.digest not in found or found[p.digest].store_path != p:
                raise NotFound(f"{p.absolute}: not in this store")
        if with_referrers:
            found = {
                bytes(d): stored_pathinfo(bytes(d), bytes(v))
                for d, v in conn.execute(_REFERRERS, (targets,))
            }
        doomed = list(found)
        outside = conn.execute(
            "SELECT r.reference, p.data, p.digest FROM pathinfo_references r"
            " JOIN pathinfos p ON p.digest = r.digest"
            " WHERE r.reference = ANY(%s) AND NOT r.digest = ANY(%s) LIMIT 6",
            (doomed, doomed),
        ).fetchall()
        if outside:
            ref = found[bytes(outside[0][0])].store_path.absolute
            names = [stored_pathinfo(bytes(d), bytes(v)).store_path.absolute
                     for _, v, d in outside]  # fmt: skip
            raise Referenced(
                f"{ref} is referred to by {', '.join(names[:5])}"
                f"{' …' if len(names) > 5 else ''}; --with-referrers deletes those too"
            )
        pinned = conn.execute(
            "SELECT digest, string_agg(name, ', ' ORDER BY name) FROM pins"
            " WHERE digest = ANY(%s) GROUP BY digest LIMIT 1",
            (doomed,),
        ).fetchone()
        if pinned is not None:
            raise Referenced(
                f"{found[bytes(pinned[0])].store_path.absolute} is pinned by {pinned[1]};"
                " `tvix-store pin rm` it first"
            )
        conn.execute("DELETE FROM pathinfo_references WHERE digest = ANY(%s)", (doomed,))
        conn.execute("DELETE FROM pathinfos WHERE digest = ANY(%s)", (doomed,))
        return sorted(info.store_path.absolute for info in found.values())

    if not targets:
        raise ValidationError("no paths to delete")
    return db.run("deleting paths", body)
