"""The database of tokens and named caches: ``service.sqlite``, or a shared PostgreSQL.

One data directory keeps them in ``service.sqlite`` (mode 0600: it holds the
caches' secret keys). Frontends over a shared store (PostgreSQL path infos)
keep them in that database instead, so every frontend serves the same
caches and honours the same tokens and revocations.

:class:`ServiceDb` is the little both need: point reads and write
transactions in the SQL both engines speak (``?`` placeholders,
``ON CONFLICT``, ``coalesce``); each table owner gives its SQLite schema
and its PostgreSQL migrations.
"""

from __future__ import annotations

import abc
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from tvix_castore.directoryservice.sqlite import connect, in_transaction, storage_error

if TYPE_CHECKING:
    from tvix_castore.postgres import Database, Migration

__all__ = [
    "Cursor",
    "ServiceDb",
    "open_service_db",
    "service_db",
    "service_db_path",
    "shared_url",
]

_T = TypeVar("_T")


class Cursor(Protocol):
    """What a write transaction's ``execute`` returns."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Executor(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = (), /) -> Cursor: ...


def service_db_path(home: Path) -> Path:
    """Where ``home``'s service database is."""
    return home / "service.sqlite"


def open_service_db(home: Path, schema: str, what: str) -> sqlite3.Connection:
    """A connection to ``home``'s service database, ``schema`` applied.

    Mode 0600: it holds the caches' secret keys.
    """
    home.mkdir(parents=True, exist_ok=True)
    path = service_db_path(home)
    conn = connect(path)
    try:
        conn.executescript(schema)
    except sqlite3.Error as exc:
        conn.close()
        raise storage_error(f"creating the {what} tables", exc, path) from exc
    os.chmod(path, 0o600)
    return conn


class ServiceDb(abc.ABC):
    """Reads and write transactions on one component's tables."""

    where: str

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether anything can be in it yet (reads of a missing one are empty)."""

    @abc.abstractmethod
    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one query."""

    @abc.abstractmethod
    def write(self, what: str, body: Callable[[Executor], _T]) -> _T:
        """``body(executor)`` in one transaction: committed, or rolled back if it raises."""

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self.rows(sql, params)
        return rows[0] if rows else None

    @abc.abstractmethod
    def close(self) -> None: ...


class _Sqlite(ServiceDb):
    def __init__(
        self, home: Path, schema: str, what: str, upgrade: Callable[[Executor], None] | None
    ) -> None:
        self.home = home
        self.path = service_db_path(home)
        self.where = str(self.path)
        self._schema, self._what, self._upgrade = schema, what, upgrade
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = open_service_db(self.home, self._schema, self._what)
            if self._upgrade is not None:
                upgrade = self._upgrade
                try:
                    in_transaction(conn, f"upgrading the {self._what} tables", upgrade)
                except BaseException:
                    conn.close()
                    raise
            self._conn = conn
        return self._conn

    def exists(self) -> bool:
        return self._conn is not None or self.path.exists()

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._db().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise storage_error(f"reading the {self._what} tables", exc, self.path) from exc

    def write(self, what: str, body: Callable[[Executor], _T]) -> _T:
        return in_transaction(self._db(), what, body)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _PgExecutor:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        cur: Cursor = self._conn.execute(sql.replace("?", "%s"), tuple(params))
        return cur


class _Postgres(ServiceDb):
    def __init__(self, url: str, component: str, migrations: Sequence[Migration]) -> None:
        from tvix_castore.postgres import Database

        self._db: Database = Database.shared(url)
        self.where = self._db.where
        try:
            self._db.migrate(component, migrations)
        except BaseException:
            self._db.release()
            raise
        self._what = component
        self._closed = False

    def exists(self) -> bool:
        return True

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._db.run(
            f"reading the {self._what} tables",
            lambda conn: list(_PgExecutor(conn).execute(sql, params).fetchall()),
        )

    def write(self, what: str, body: Callable[[Executor], _T]) -> _T:
        return self._db.run(what, lambda conn: body(_PgExecutor(conn)))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._db.release()


def shared_url(path_info_url: str | None) -> str | None:
    """``path_info_url`` if it names a PostgreSQL database (the shared service tables)."""
    from tvix_castore.postgres import POSTGRES_SCHEMES

    if path_info_url and path_info_url.partition("://")[0] in POSTGRES_SCHEMES:
        return path_info_url
    return None


def service_db(
    home: Path,
    url: str | None,
    what: str,
    sqlite_schema: str,
    migrations: Sequence[Migration],
    upgrade: Callable[[Executor], None] | None = None,
) -> ServiceDb:
    """``what``'s tables: in PostgreSQL at ``url``, else in ``home``'s ``service.sqlite``.

    ``upgrade`` brings an older ``service.sqlite``'s tables up to ``sqlite_schema``;
    PostgreSQL runs ``migrations`` (component ``what``) instead.
    """
    if url is not None:
        return _Postgres(url, what, migrations)
    return _Sqlite(home, sqlite_schema, what, upgrade)
