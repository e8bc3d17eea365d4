"""PostgreSQL for metadata: one connection pool per database, versioned migrations.

``postgresql://user[:password]@host[:port]/db?…`` is a libpq URI (any libpq
parameter works: ``sslmode``, ``connect_timeout``, ``application_name`` …)
plus parameters of ours, removed before it reaches libpq:

* ``schema=name``: keep the tables in this schema (created if missing), so
  several stores share a database;
* ``pool_max=N`` (default 16): connections per process;
* ``statement_timeout=S`` (default 60): seconds before a statement is cancelled.

Every service of a process that names the same URL shares one pool
(:meth:`Database.shared`): a small one of our own over psycopg 3 connections,
plain thread-safe objects not bound to an event loop, so the services call it
from worker threads exactly as they call SQLite. (psycopg_pool was tried
first: while the server is down it makes each request wait its full checkout
timeout before failing, and after a restart it reconnects on a backoff, so
the first request waited 9 s.) Here a request that finds the server away
fails at once with :class:`StorageUnavailable` (503 / UNAVAILABLE), and the
first request after it is back succeeds: a dead idle connection is replaced
and the transaction run again.

The schema is created and migrated by the program (:meth:`Database.migrate`):
each component (``castore``, ``store``) has an ordered list of migrations,
recorded in ``tvix_schema``; they run in one transaction under a PostgreSQL
advisory lock, so two frontends starting at once apply each migration once.
Only plain tables, indexes and ``INSERT … ON CONFLICT`` are used (no
extensions), so PostgreSQL-compatible engines work too.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from tvix_castore.errors import ConfigError, StorageError, StorageUnavailable

if TYPE_CHECKING:
    import psycopg

    Connection = psycopg.Connection[tuple[Any, ...]]

__all__ = ["POSTGRES_SCHEMES", "Database", "Migration"]

POSTGRES_SCHEMES = ("postgresql", "postgres")
_OURS = ("schema", "pool_max", "statement_timeout")
_LOCK_KEY = 0x7476_6978_5F73_6368  # pg_advisory_xact_lock key of the migrations ("tvix_sch")
_T = TypeVar("_T")
_CHECKOUT_TIMEOUT = 10.0  # seconds a request waits for one of the pool_max connections
_IDLE = 0  # psycopg.pq.TransactionStatus.IDLE

Migration = str
"""One migration: SQL statements separated by ``;`` (applied in one transaction)."""


def _error(what: str, exc: Exception, where: str) -> StorageError:
    """A typed error for a failed database operation."""
    import psycopg

    detail = " ".join(str(exc).split())
    if isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return StorageError(f"{what}: permission denied: {detail} ({where})")
    if isinstance(exc, psycopg.OperationalError):
        return StorageUnavailable(f"{what}: the database is unavailable: {detail} ({where})")
    return StorageError(f"{what}: {detail} ({where})")


class Database:
    """A pool of connections to one PostgreSQL database (and schema)."""

    _shared: ClassVar[dict[str, tuple[Database, int]]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, url: str) -> None:
        self.url = url
        self.where, conninfo, self.schema, pool_max = _parse(url)
        self._conninfo = conninfo
        self._migrated: set[str] = set()
        self._migrate_lock = threading.Lock()
        self._pool_max = pool_max
        self._slots = threading.BoundedSemaphore(pool_max)
        self._idle: list[Connection] = []
        self._idle_lock = threading.Lock()
        self._closed = False
        self._check_reachable()

    @property
    def conninfo(self) -> str:
        """The libpq URI the pool connects with (our own parameters applied)."""
        return self._conninfo

    @classmethod
    def shared(cls, url: str) -> Database:
        """The process's pool for ``url`` (opened on first use; :meth:`release` each)."""
        with cls._shared_lock:
            found = cls._shared.get(url)
            db = found[0] if found else cls(url)
            cls._shared[url] = (db, (found[1] if found else 0) + 1)
            return db

    def release(self) -> None:
        """Give back a :meth:`shared` reference; the last one closes the pool."""
        with self._shared_lock:
            db, refs = self._shared.get(self.url, (self, 1))
            if db is self and refs > 1:
                self._shared[self.url] = (db, refs - 1)
                return
            if db is self:
                del self._shared[self.url]
        self.close()

    def _check_reachable(self) -> None:
        """Connect once now, so a wrong URL is an error at start-up, not at the first request.

        (The connection then starts the pool: migrations and the first request use it.)
        """
        import psycopg

        try:
            conn, _ = self._take()
            conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise ConfigError(f"cannot use PostgreSQL at {self.where}: {exc}".strip()) from exc
        self._give(conn)

    def _take(self) -> tuple[Connection, bool]:
        """An idle connection (and True), else a new one (and False)."""
        with self._idle_lock:
            if self._idle:
                return self._idle.pop(), True
        import psycopg

        return psycopg.connect(self._conninfo, autocommit=True), False

    def _give(self, conn: Connection) -> None:
        if conn.closed or conn.broken or conn.info.transaction_status != _IDLE:
            conn.close()
            return
        with self._idle_lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def _drop_idle(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def run(self, what: str, body: Callable[[Connection], _T]) -> _T:
        """``body(conn)`` in one transaction (blocking: call it from a worker thread).

        A reused connection that turns out dead (the server restarted) is
        replaced and ``body`` run once more on a new one: every write of
        ours is an idempotent upsert, so a retry after an unknown outcome is
        safe. A server that cannot be reached fails at once
        (:class:`StorageUnavailable`); nothing waits for it to come back.
        """
        import psycopg

        if not self._slots.acquire(timeout=_CHECKOUT_TIMEOUT):
            raise StorageUnavailable(
                f"{what}: all {self._pool_max} connections to {self.where} are busy"
            )
        try:
            for attempt in (1, 2):
                try:
                    conn, reused = self._take()
                except psycopg.Error as exc:
                    raise _error(what, exc, self.where) from exc
                try:
                    with conn.transaction():
                        result = body(conn)
                except psycopg.Error as exc:
                    dead = conn.broken or conn.closed
                    self._give(conn)
                    if dead and reused and attempt == 1:
                        self._drop_idle()  # (they all went with the server)
                        continue
                    raise _error(what, exc, self.where) from exc
                except BaseException:
                    self._give(conn)
                    raise
                self._give(conn)
                return result
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            self._slots.release()

    def migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        """Bring ``component``'s tables to the newest version; the version before.

        Raises:
            StorageError: the database is newer than this program, or a migration failed.
        """
        with self._migrate_lock:
            if component in self._migrated:
                return len(migrations)
            before = self._migrate(component, migrations)
            self._migrated.add(component)
            return before

    def _migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        from psycopg import sql

        def body(conn: Connection) -> int:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            if self.schema is not None:
                conn.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
                )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS tvix_schema (component text NOT NULL,"
                " version integer NOT NULL, applied timestamptz NOT NULL DEFAULT now(),"
                " PRIMARY KEY (component, version))"
            )
            row = conn.execute(
                "SELECT coalesce(max(version), 0) FROM tvix_schema WHERE component = %s",
                (component,),
            ).fetchone()
            current = int(row[0]) if row else 0
            if current > len(migrations):
                raise StorageError(
                    f"the {component} tables in {self.where} are at version {current}, newer"
                    f" than this program knows ({len(migrations)}): upgrade tvix-store"
                )
            for version in range(current + 1, len(migrations) + 1):
                for statement in migrations[version - 1].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "INSERT INTO tvix_schema (component, version) VALUES (%s, %s)",
                    (component, version),
                )
            return current

        return self.run(f"migrating the {component} tables", body)

    def versions(self) -> dict[str, int]:
        """Each component's schema version in this database."""

        def body(conn: Connection) -> dict[str, int]:
            exists = conn.execute("SELECT to_regclass('tvix_schema')").fetchone()
            if not exists or exists[0] is None:
                return {}
            rows = conn.execute(
                "SELECT component, max(version) FROM tvix_schema GROUP BY component"
            ).fetchall()
            return {str(c): int(v) for c, v in rows}

        return self.run("reading the schema version", body)

    def close(self) -> None:
        """Close the idle connections; connections in use are closed when given back."""
        with self._idle_lock:
            self._closed = True
        self._drop_idle()


def _parse(url: str) -> tuple[str, str, str | None, int]:
    """(shown location, libpq URI, schema, pool size) of a ``postgresql://`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in POSTGRES_SCHEMES:
        raise ConfigError(f"{url!r}: not a postgresql:// URL")
    if parts.fragment:
        raise ConfigError(f"{url!r}: service URLs take no #fragment")
    try:
        params = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise ConfigError(f"{url!r}: malformed query: {exc}") from exc
    ours = {k: v for k, v in params if k in _OURS}
    rest = [(k, v) for k, v in params if k not in _OURS]
    schema = ours.get("schema")
    if schema is not None and (
        not schema or not schema.replace("_", "a").isalnum() or not schema.isascii()
    ):
        raise ConfigError(f"{url!r}: schema must be letters, digits and '_', got {schema!r}")
    pool_max = _int(url, ours, "pool_max", 16, 1, 1000)
    timeout = _int(url, ours, "statement_timeout", 60, 1, 86400)
    options = [f"-c statement_timeout={timeout * 1000}"]
    if schema is not None:
        options.append(f"-c search_path={schema}")
    rest = [(k, v) for k, v in rest if k != "options"] + [
        ("options", " ".join([*(v for k, v in rest if k == "options"), *options]))
    ]
    if not any(k == "connect_timeout" for k, _ in rest):
        rest.append(("connect_timeout", "5"))
    host = parts.hostname or "localhost"
    where = f"postgresql://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"
    if schema:
        where += f" (schema {schema})"
    query = urlencode(rest, quote_via=quote)  # (libpq does not read "+" as a space)
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, query, ""))
    return where, conninfo, schema, pool_max


def _int(url: str, params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
        raise ConfigError(f"{url!r}: {name} must be an integer in [{low}, {high}], got {raw!r}")
    return int(raw)
