"""Garbage collection of a shared store: blobs in object storage, metadata in PostgreSQL.

What is collected is content nothing refers to: blobs, chunks and
Directories that no path info names (directly or through Directories) and
no NAR upload younger than the grace period names (its narinfo may still
come), and that were written before the grace period. That is what a
killed upload, a failed import or an interrupted ``nix copy`` leaves
behind. Every path is a root, unless ``keep_since`` is given: then the roots
are the pins and the paths put or served within it (with their closures),
and the other path infos are deleted in the sweep
(:mod:`tvix_store.sharedlife`).

Writers and the collector (one at a time, by a PostgreSQL advisory lock):

* every process writing blobs holds a lease row (``leases``), taken before
  its first check or write and renewed while it writes, expiring
  :data:`LEASE_TTL` after the last; closing the store ends it;
* the mark reads the roots and the Directory graph, the bucket is listed;
* then, in one transaction under a second advisory lock that writers take
  to renew their lease, the collector checks that no lease was live at any
  time since the mark began (else it defers: exit 75) and records its sweep
  (``gc_sweeps``); a writer that wants a lease while a sweep is recorded
  waits for it to end (a sweep recorded by a killed collector expires);
* then objects and Directories are deleted in batches, and the sweep row
  removed.

So what a writer found present, and did not upload again, is either marked
(its path info committed before the mark) or protected by its lease.
Database times are the server's (``now()``), so frontends' clocks do not
matter; object ages are the object store's ``Last-Modified``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tvix_castore.digests import B3Digest
from tvix_castore.errors import ConfigError, DataCorruption, StorageError, StorageUnavailable
from tvix_castore.nodes import Directory, DirectoryNode, FileNode, Node
from tvix_castore.postgres import Database
from tvix_castore.protos import rpc_blobstore_pb2
from tvix_store.leases import LEASE_TTL
from tvix_store.narindex import decode_entry
from tvix_store.pathinfoservice.base import stored_pathinfo
from tvix_store.progress import NULL, Progress

if TYPE_CHECKING:
    import psycopg

    from tvix_castore.cloudstore import CloudObjectStore

__all__ = ["LEASE_TTL", "PgLease", "SharedGcReport", "collect_shared"]

SWEEP_TTL = 120.0  # seconds a recorded sweep lasts unless renewed (a killed collector)
_SWEEP_LOCK = 0x7476_6978_5F67_6331  # writers' lease changes and the sweep check ("tvix_gc1")
_GC_LOCK = 0x7476_6978_5F67_6332  # one collector at a time ("tvix_gc2")
_BATCH = 1000
_WAIT_FOR_SWEEP = 300.0  # seconds a writer waits for a sweep to end before failing


class SweepRunning(StorageUnavailable):
    """A collector is sweeping this store (try again shortly)."""


class PgLease:
    """A process's lease on a shared store, renewed at most every TTL/4 (thread-safe)."""

    def __init__(self, db: Database, ttl: float | None = None) -> None:
        from tvix_store.leases import lease_ttl

        self._db = db
        self._ttl = lease_ttl() if ttl is None else ttl
        self.id = uuid.uuid4().hex
        self._holder = f"{socket.gethostname()}:{os.getpid()}"
        self._renewed = 0.0
        self._lock = threading.Lock()

    def touch(self) -> None:
        """Take or renew the lease (blocking; a no-op when renewed recently)."""
        now = time.monotonic()
        if now - self._renewed < self._ttl / 4:
            return
        with self._lock:
            if time.monotonic() - self._renewed < self._ttl / 4:
                return
            deadline = time.monotonic() + _WAIT_FOR_SWEEP
            while not self._db.run("taking a writer's lease", self._take):
                if time.monotonic() > deadline:
                    raise SweepRunning("a garbage collection is sweeping this store; try again")
                time.sleep(0.2)
            self._renewed = time.monotonic()

    def _take(self, conn: psycopg.Connection[tuple[Any, ...]]) -> bool:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SWEEP_LOCK,))
        sweeping = conn.execute("SELECT 1 FROM gc_sweeps WHERE expires > now()").fetchone()
        if sweeping:
            return False
        conn.execute(
            "INSERT INTO leases (id, holder, expires)"
            " VALUES (%s, %s, now() + make_interval(secs => %s))"
            " ON CONFLICT (id) DO UPDATE SET expires = excluded.expires",
            (self.id, self._holder, self._ttl),
        )
        return True

    def release(self) -> None:
        """End the lease now (it stays as a row that says when the writer stopped)."""
        if not self._renewed:
            return

        def body(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            conn.execute("UPDATE leases SET expires = now() WHERE id = %s", (self.id,))

        with contextlib.suppress(Exception):  # (it expires by itself anyway)
            self._db.run("ending a writer's lease", body)
        self._renewed = 0.0


@dataclass
class SharedGcReport:
    """What a collection found and did."""

    dry_run: bool
    keep_since: float | None = None
    deferred: list[str] = field(default_factory=list)
    paths: int = 0
    kept_paths: int = 0
    pinned_paths: int = 0
    deleted_paths: list[str] = field(default_factory=list)
    live_directories: int = 0
    live_blobs: int = 0
    directories: int = 0
    objects: int = 0
    object_bytes: int = 0
    kept_young: int = 0

    def as_json(self) -> dict[str, Any]:
        """The report as a JSON-able dict."""
        return dict(self.__dict__)

    def summary(self) -> str:
        """One paragraph for a terminal."""
        verb = "would remove" if self.dry_run else "removed"
        text = ""
        if self.keep_since is not None:
            text = (
                f"paths: {self.paths} ({self.kept_paths} kept, {self.pinned_paths} pinned);"
                f" {verb} {len(self.deleted_paths)}\n"
            )
            text += "".join(f"  {verb}: {p}\n" for p in self.deleted_paths)
        text += (
            f"marked {self.kept_paths} paths: {self.live_directories} directories,"
            f" {self.live_blobs} blobs live; {verb} {self.directories} directories and"
            f" {self.objects} objects ({self.object_bytes} bytes);"
            f" kept {self.kept_young} unreferenced ones younger than the grace period"
        )
        if self.deferred:
            text += "\nsweep deferred: writers active since the mark began: " + ", ".join(
                self.deferred
            )
        return text


def _files(node: Node) -> Iterable[bytes]:
    if isinstance(node, FileNode):
        yield node.digest.raw


class _Mark:
    def __init__(self, grace: float, keep_since: float | None, progress: Progress = NULL) -> None:
        self.progress = progress
        self.grace = grace
        self.keep_since = keep_since
        self.kept: set[bytes] | None = None  # (None: every path)
        self.pinned = 0
        self.doomed: dict[bytes, str] = {}  # path infos to delete: digest -> store path
        self.started = 0.0
        self.paths = 0
        self.dir_roots: set[bytes] = set()
        self.blobs: set[bytes] = set()
        self.dirs: set[bytes] = set()

    def _root(self, node: Node) -> None:
        if isinstance(node, DirectoryNode):
            self.dir_roots.add(node.digest.raw)
        else:
            self.blobs.update(_files(node))

    def roots(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        (self.started,) = conn.execute("SELECT extract(epoch FROM now())::float8").fetchone() or (
            0.0,
        )
        if self.keep_since is not None:
            from tvix_store.sharedlife import kept_paths

            self.kept, self.pinned = kept_paths(conn, self.keep_since, time.time())
        after = b""
        while True:
            rows = conn.execute(
                "SELECT digest, data FROM pathinfos WHERE digest > %s ORDER BY digest LIMIT %s",
                (after, _BATCH),
            ).fetchall()
            if not rows:
                break
            for digest, data in rows:
                info = stored_pathinfo(bytes(digest), bytes(data))
                self.paths += 1
                if self.kept is not None and info.digest not in self.kept:
                    self.doomed[info.digest] = info.store_path.absolute
                    continue
                self._root(info.node)
            self.progress.advance(len(rows))
            after = bytes(rows[-1][0])
        for sha, node in conn.execute(
            "SELECT nar_sha256, node FROM nar_index WHERE added > %s",
            (self.started - self.grace,),
        ):
            self._root(decode_entry(bytes(sha), bytes(node)))

    def directories(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        rows = conn.execute(
            "WITH RECURSIVE live(d) AS (SELECT unnest(%s::bytea[])"
            " UNION SELECT e.child FROM directory_edges e JOIN live ON e.parent = live.d)"
            " SELECT d FROM live",
            (list(self.dir_roots),),
        ).fetchall()
        self.dirs = {bytes(r[0]) for r in rows}
        live = list(self.dirs)
        self.progress.total(items=len(live))
        read: set[bytes] = set()
        for i in range(0, len(live), _BATCH):
            batch = live[i : i + _BATCH]
            for digest, data in conn.execute(
                "SELECT digest, data FROM directories WHERE digest = ANY(%s)", (batch,)
            ):
                read.add(bytes(digest))
                d = B3Digest(bytes(digest))
                if B3Digest.of(bytes(data)) != d:
                    raise DataCorruption(f"stored directory {d} does not match its digest")
                directory = Directory.from_bytes(bytes(data))
                self.blobs.update(f.digest.raw for f in directory.files)
            self.progress.advance(len(batch))
        missing = self.dirs - read
        if missing:  # (its files would look unreferenced: never sweep then)
            raise StorageError(
                f"{len(missing)} live directories (e.g. {B3Digest(min(missing))}) are not in"
                " PostgreSQL: gc of a shared store needs its directories there"
                " (not in objectstore+…); nothing was deleted"
            )

    def old_directories(self, conn: psycopg.Connection[tuple[Any, ...]]) -> tuple[list[bytes], int]:
        """Unmarked Directories written before the grace period, and how many younger."""
        doomed: list[bytes] = []
        young = 0
        for digest, old in conn.execute(
            "SELECT digest, added < to_timestamp(%s) FROM directories",
            (self.started - self.grace,),
        ):
            raw = bytes(digest)
            if raw not in self.dirs:
                if old:
                    doomed.append(raw)
                else:
                    young += 1
        return doomed, young


def _digest_of(key: str) -> bytes | None:
    """The digest a B §7.1 key names; ``None`` for any other object (never deleted)."""
    name = key.rsplit("/", 1)[-1]
    if len(name) != 64:
        return None
    try:
        return bytes.fromhex(name)
    except ValueError:
        return None


def _objects(store: CloudObjectStore, mark: _Mark, report: SharedGcReport) -> list[str]:
    """Keys of unmarked objects older than the grace period (chunks of marked blobs kept)."""
    cutoff = mark.started - mark.grace
    indexes: dict[bytes, tuple[str, int, float]] = {}
    progress = mark.progress
    for key, size, modified in store.list_sync("blobs/"):
        progress.advance(1, size)
        raw = _digest_of(key)
        if raw is not None:
            indexes[raw] = (key, size, modified)
    live_chunks: set[bytes] = set()
    for raw in mark.blobs:
        if raw in indexes:  # a chunked blob: its chunks are live too
            data = store.get_sync(indexes[raw][0])
            if data is None:
                continue
            msg = rpc_blobstore_pb2.StatBlobResponse()
            try:
                msg.ParseFromString(data)
            except Exception as exc:
                raise DataCorruption(f"blob index {B3Digest(raw)} is corrupt: {exc}") from exc
            live_chunks.update(c.digest for c in msg.chunks)
        else:
            live_chunks.add(raw)
    doomed: list[str] = []
    for raw, (key, size, modified) in indexes.items():
        if raw not in mark.blobs:
            if modified < cutoff:
                doomed.append(key)
                report.object_bytes += size
            else:
                report.kept_young += 1
    for key, size, modified in store.list_sync("chunks/"):
        progress.advance(1, size)
        raw = _digest_of(key)
        if raw is not None and raw not in live_chunks:
            if modified < cutoff:
                doomed.append(key)
                report.object_bytes += size
            else:
                report.kept_young += 1
    return doomed


def collect_shared(
    blobs: Any,
    pathinfo_url: str,
    *,
    grace: float,
    keep_since: float | None = None,
    dry_run: bool = False,
    progress: Progress = NULL,
) -> SharedGcReport:
    """Collect what nothing refers to in an S3 (or GCS, Azure) + PostgreSQL store (blocking).

    See :func:`_collect`; a collection (not a dry run) is recorded in the data
    directory for the metrics (:func:`tvix_store.telemetry.store.record_gc`).
    """
    start = time.monotonic()
    report = _collect(
        blobs, pathinfo_url, grace=grace, keep_since=keep_since, dry_run=dry_run, progress=progress
    )
    if not dry_run:
        from tvix_store.embedded import data_dir
        from tvix_store.telemetry.store import record_gc

        seconds = time.monotonic() - start
        record_gc(data_dir(), "shared", seconds, report.object_bytes, bool(report.deferred))
    return report


def _collect(
    blobs: Any,
    pathinfo_url: str,
    *,
    grace: float,
    keep_since: float | None = None,
    dry_run: bool = False,
    progress: Progress = NULL,
) -> SharedGcReport:
    """Collect what nothing refers to in an S3 (or GCS, Azure) + PostgreSQL store (blocking).

    ``progress`` shows the steps: paths marked, live Directories read,
    objects listed, then what the sweep deletes.

    Raises:
        ConfigError: the blob service is not on object storage.
        StorageUnavailable: another collection is running.
    """
    from tvix_castore.blobservice.objectstore import ObjectStoreBlobService
    from tvix_castore.cloudstore import CloudObjectStore
    from tvix_store.pathinfoservice.postgres import open_database

    if not isinstance(blobs, ObjectStoreBlobService) or not isinstance(
        blobs.store, CloudObjectStore
    ):
        raise ConfigError(
            "gc over PostgreSQL path infos needs the blobs on object storage (objectstore+s3://…)"
        )
    store = blobs.store
    report = SharedGcReport(dry_run, keep_since)
    db = open_database(pathinfo_url)
    try:
        import psycopg

        with psycopg.connect(db.conninfo, autocommit=True) as lock_conn:
            row = lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (_GC_LOCK,)).fetchone()
            if not row or not row[0]:
                raise StorageUnavailable("another garbage collection of this store is running")
            mark = _Mark(grace, keep_since, progress)
            progress.stage("gc: mark", unit="paths")
            db.run("marking", mark.roots)
            progress.stage("gc: mark directories", unit="directories")
            db.run("marking directories", mark.directories)
            doomed_dirs, young = db.run("finding garbage directories", mark.old_directories)
            report.kept_young += young
            progress.stage("gc: list objects", unit="objects")
            doomed_objects = _objects(store, mark, report)
            report.paths = mark.paths
            report.kept_paths, report.pinned_paths = mark.paths - len(mark.doomed), mark.pinned
            report.deleted_paths = sorted(mark.doomed.values())
            report.live_directories, report.live_blobs = len(mark.dirs), len(mark.blobs)
            report.directories, report.objects = len(doomed_dirs), len(doomed_objects)
            if dry_run or not (doomed_dirs or doomed_objects or mark.doomed):
                return report
            sweep = uuid.uuid4().hex

            def begin(conn: psycopg.Connection[tuple[Any, ...]]) -> list[str]:
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SWEEP_LOCK,))
                busy = conn.execute(
                    "SELECT holder FROM leases WHERE expires > to_timestamp(%s)", (mark.started,)
                ).fetchall()
                if busy:
                    return [str(h) for (h,) in busy]
                conn.execute(
                    "INSERT INTO gc_sweeps (id, holder, expires)"
                    " VALUES (%s, %s, now() + make_interval(secs => %s))",
                    (sweep, f"{socket.gethostname()}:{os.getpid()}", SWEEP_TTL),
                )
                conn.execute("DELETE FROM leases WHERE expires < now() - interval '1 day'")
                # Path infos first (no writer since the mark began: none was put again).
                doomed_paths = list(mark.doomed)
                conn.execute(
                    "DELETE FROM pathinfo_references WHERE digest = ANY(%s)", (doomed_paths,)
                )
                conn.execute("DELETE FROM pathinfos WHERE digest = ANY(%s)", (doomed_paths,))
                return []

            report.deferred = db.run("starting the sweep", begin)
            if report.deferred:
                report.deleted_paths = []
                return report
            try:
                progress.stage(
                    "gc: sweep", unit="items", items=len(doomed_objects) + len(doomed_dirs)
                )
                _sweep(db, store, sweep, doomed_dirs, doomed_objects, progress)
            finally:

                def end(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
                    conn.execute("DELETE FROM gc_sweeps WHERE id = %s", (sweep,))

                db.run("ending the sweep", end)
    finally:
        db.release()
    return report


def _sweep(
    db: Database,
    store: CloudObjectStore,
    sweep: str,
    dirs: list[bytes],
    keys: list[str],
    progress: Progress,
) -> None:
    def renew(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        conn.execute(
            "UPDATE gc_sweeps SET expires = now() + make_interval(secs => %s) WHERE id = %s",
            (SWEEP_TTL, sweep),
        )

    for i in range(0, len(keys), _BATCH):
        db.run("renewing the sweep", renew)
        doomed = keys[i : i + _BATCH]
        store.delete_sync(doomed)
        progress.advance(len(doomed))
    for i in range(0, len(dirs), _BATCH):
        batch = dirs[i : i + _BATCH]

        def drop(conn: psycopg.Connection[tuple[Any, ...]], batch: list[bytes] = batch) -> None:
            conn.execute("DELETE FROM directory_edges WHERE parent = ANY(%s)", (batch,))
            conn.execute("DELETE FROM directories WHERE digest = ANY(%s)", (batch,))

        db.run("deleting directories", drop)
        progress.advance(len(batch))
