"""Named pins: GC roots an operator names, with the history of what each pointed at.

``pins`` holds each pin's current paths, ``pin_history`` every change (when,
set/removed, the paths), both in ``store.sqlite``. A pin keeps the whole
closure of its paths (:mod:`tvix_store.gc`). Every change bumps the store's
generation, so a collector marking at that moment marks again.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nix_compat.store_path import StorePath
from tvix_castore.directoryservice.sqlite import connect, in_transaction, storage_error
from tvix_castore.errors import NotFound, ValidationError

__all__ = ["PinChange", "Pins"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pins (name TEXT NOT NULL, digest BLOB NOT NULL, path TEXT NOT NULL,
    PRIMARY KEY (name, digest)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pin_history (id INTEGER PRIMARY KEY, at REAL NOT NULL,
    name TEXT NOT NULL, action TEXT NOT NULL, paths TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
INSERT OR IGNORE INTO store_meta (key, value) VALUES ('generation', 0);
"""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,127}")
_BUMP = "UPDATE store_meta SET value = value + 1 WHERE key = 'generation'"


@dataclass(frozen=True)
class PinChange:
    """One entry of a pin's history."""

    at: float
    name: str
    action: str  # "set" or "removed"
    paths: tuple[str, ...]


class Pins:
    """The pins of one store database."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self._conn = connect(db)
        try:
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self._conn.close()
            raise storage_error("creating the pin tables", exc, db) from exc

    @staticmethod
    def check_name(name: str) -> str:
        if not _NAME.fullmatch(name):
            raise ValidationError(
                f"pin name {name!r}: expected 1-128 of A-Z a-z 0-9 . _ + @ -, not starting"
                " with a punctuation mark"
            )
        return name

    def _write(self, what: str, statements: Sequence[tuple[str, Sequence[object]]]) -> None:
        def body(conn: sqlite3.Connection) -> None:
            for sql, params in statements:
                conn.execute(sql, params)
            conn.execute(_BUMP)

        in_transaction(self._conn, what, body)

    def set(self, name: str, paths: Sequence[StorePath]) -> None:
        """Point ``name`` at ``paths`` (they must be in the store: the caller checks)."""
        self.check_name(name)
        unique = list(dict.fromkeys(paths))
        statements: list[tuple[str, Sequence[object]]] = [
            ("DELETE FROM pins WHERE name = ?", (name,))
        ]
        statements += [
            ("INSERT INTO pins (name, digest, path) VALUES (?, ?, ?)", (name, p.digest, p.absolute))
            for p in unique
        ]
        statements.append(
            (
                "INSERT INTO pin_history (at, name, action, paths) VALUES (?, ?, 'set', ?)",
                (time.time(), name, json.dumps([p.absolute for p in unique])),
            )
        )
        self._write("setting a pin", statements)

    def remove(self, name: str) -> tuple[str, ...]:
        """Remove pin ``name``; the paths it pointed at. NotFound if there is none."""
        current = self.current().get(name)
        if current is None:
            raise NotFound(f"no pin named {name!r}")
        self._write(
            "removing a pin",
            [
                ("DELETE FROM pins WHERE name = ?", (name,)),
                (
                    "INSERT INTO pin_history (at, name, action, paths) VALUES (?, ?, 'removed', ?)",
                    (time.time(), name, json.dumps(list(current))),
                ),
            ],
        )
        return current

    def current(self) -> dict[str, tuple[str, ...]]:
        """Each pin and its paths (sorted)."""
        out: dict[str, list[str]] = {}
        try:
            rows = self._conn.execute("SELECT name, path FROM pins ORDER BY name, path")
            for name, path in rows:
                out.setdefault(str(name), []).append(str(path))
        except sqlite3.Error as exc:
            raise storage_error("listing pins", exc) from exc
        return {k: tuple(v) for k, v in out.items()}

    def pinned_digests(self) -> dict[bytes, list[str]]:
        """Each pinned path's digest and the pins holding it."""
        out: dict[bytes, list[str]] = {}
        for name, digest in self._conn.execute("SELECT name, digest FROM pins"):
            out.setdefault(bytes(digest), []).append(str(name))
        return out

    def history(self, name: str | None = None) -> list[PinChange]:
        """Every change (of ``name``, or of all pins), oldest first."""
        sql = "SELECT at, name, action, paths FROM pin_history"
        params: tuple[object, ...] = ()
        if name is not None:
            sql += " WHERE name = ?"
            params = (name,)
        rows = self._conn.execute(sql + " ORDER BY id", params).fetchall()
        return [
            PinChange(float(a), str(n), str(act), tuple(json.loads(p))) for a, n, act, p in rows
        ]

    def close(self) -> None:
        self._conn.close()
