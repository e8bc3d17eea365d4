"""Garbage collection of the embedded store: mark from the roots, sweep, compact.

Roots: every pin's closure; every path put or served within ``keep_since``
(every path, without it) and its closure; NARs uploaded within the grace
period whose narinfo may still come (``nar_index`` rows younger than it).
A dependency of a kept path is kept whatever its age. Marking follows
PathInfo references, root nodes, Directories, files and chunk lists.

Safety against writers running at the same time (see :mod:`tvix_store.leases`):

* a writer takes a lease row before its first check or write, so what it
  finds present stays until it refers to it: the sweep is deferred while
  another process holds a live lease;
* every PathInfo put, delete and pin change bumps the store's generation, and
  the paths to delete and the content to sweep are dropped in transactions
  that check it is still the one the mark saw (else the mark starts over);
* a PathInfo naming a reference the collector deleted is refused
  (:class:`~tvix_store.pathinfoservice.sqlite.DeletedReference`);
* content in packs written within ``grace`` is kept (and what a kept
  Directory there names), for writers of older releases that take no lease.

Then the packs are compacted, so the space comes back; packs holding content
or PathInfo records of paths removed by ``tvix-store delete`` are rewritten
whatever their garbage share (the bytes leave the disk), and the database is
vacuumed. A collector killed at any point leaves a consistent store: each
step is one transaction, and the next run does what is left.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from nix_compat.store_path import StorePath
from tvix_castore.directoryservice.sqlite import connect, storage_error, write_one
from tvix_castore.errors import (
    CastoreError,
    NotFound,
    StorageError,
    StorageUnavailable,
    ValidationError,
    os_storage_error,
)
from tvix_castore.nodes import DirectoryNode, FileNode, Node, node_from_proto, node_to_proto
from tvix_castore.packstore.compact import compact, store_bytes
from tvix_castore.packstore.format import Kind, scan
from tvix_castore.packstore.index import parse_chunk_list
from tvix_castore.packstore.reader import Member
from tvix_castore.protos import castore_pb2
from tvix_store.embedded import Embedded
from tvix_store.leases import live_leases
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.sqlite import GenerationChanged
from tvix_store.pins import Pins
from tvix_store.progress import NULL, Progress

__all__ = ["GC_GRACE", "GcBusy", "GcReport", "Referenced", "collect", "delete_paths"]

GC_GRACE = 3600.0
LOCK_NAME = "gc.lock"
_MARK_ATTEMPTS = 5
_BATCH = 500
_PURGE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS gc_purge (digest BLOB PRIMARY KEY, path TEXT NOT NULL,"
    " node BLOB NOT NULL) WITHOUT ROWID"
)
_LEGACY_TABLES = ("packed", "chunked", "pack_segments", "directories")
_EMPTY = blake3.blake3(b"").digest()


class GcBusy(StorageUnavailable):
    """Another garbage collection of this store is running."""


class Referenced(ValidationError):
    """A path to delete is referred to by a path that stays (or is pinned)."""


class _Changed(Exception):
    """The store changed (or a lease appeared) inside the sweep: mark again / defer."""

    def __init__(self, leased: list[str]) -> None:
        super().__init__("changed")
        self.leased = leased


@dataclass
class GcReport:
    """What :func:`collect` removed (or, with ``dry_run``, would remove)."""

    dry_run: bool
    keep_since: float | None
    grace: float
    paths: int = 0
    kept_paths: int = 0
    pinned_paths: int = 0
    deleted_paths: list[str] = field(default_factory=list)
    expired_members: list[str] = field(default_factory=list)  # "cache: path" past retention
    directories: int = 0
    blobs: int = 0
    chunked_blobs: int = 0
    content_bytes: int = 0  # raw bytes of the blobs and Directories swept
    kept_by_grace: int = 0
    nar_uploads_dropped: int = 0
    incomplete: list[str] = field(default_factory=list)  # kept paths whose root is missing
    deferred: str | None = None
    purge_pending: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    marks: int = 0
    mark_seconds: float = 0.0
    sweep_seconds: float = 0.0
    compact_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def reclaimed(self) -> int:
        return max(0, self.bytes_before - self.bytes_after)

    def as_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out["reclaimed"] = self.reclaimed
        return out

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [
            f"paths: {self.paths} ({self.kept_paths} kept, {self.pinned_paths} pinned);"
            f" {verb} {len(self.deleted_paths)}",
        ]
        lines += [f"  {verb}: {p}" for p in self.deleted_paths]
        ends = "would leave" if self.dry_run else "left"
        lines += [f"  past its cache's retention, {ends} cache {m}" for m in self.expired_members]
        lines.append(
            f"content: {verb} {self.directories} directories, {self.blobs} blobs,"
            f" {self.chunked_blobs} chunk lists ({self.content_bytes} bytes uncompressed);"
            f" {self.kept_by_grace} kept as younger than the grace period"
        )
        if self.nar_uploads_dropped:
            lines.append(f"NAR uploads never named by a narinfo: {self.nar_uploads_dropped}")
        if self.deferred:
            lines.append(f"sweep deferred: {self.deferred}")
        if not self.dry_run:
            lines.append(
                f"disk: {self.bytes_before} -> {self.bytes_after} bytes"
                f" ({self.reclaimed} reclaimed)"
            )
        lines += [f"kept, but its root node is missing (see fsck): {p}" for p in self.incomplete]
        lines += [
            f"purge pending (a writer holds pack {p}; run gc again later)"
            for p in self.purge_pending
        ]
        lines.append(f"time: {self.seconds:.2f} s ({self.marks} mark(s))")
        return "\n".join(lines)


def _open_lock(home: os.PathLike[str] | str, name: str) -> int:
    path = os.path.join(home, name)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise os_storage_error("opening the GC lock", exc, path) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise GcBusy(
            "another garbage collection of this store is running; try again later"
        ) from exc
    return fd


def _cache_members(
    home: os.PathLike[str] | str, now: float, dry_run: bool
) -> tuple[set[bytes], list[str]]:
    """Members of named caches within retention, and "cache: path" of those past it.

    Past retention, a membership ends (unless ``dry_run``): the path is no
    longer a root because of that cache, and no longer served by it.
    """
    from tvix_store.caches import CacheRegistry

    registry = CacheRegistry(Path(home))
    try:
        expired = registry.expired(now)
        if expired and not dry_run:
            registry.expire(expired, now)
        return registry.all_members(now), [f"{c}: {p}" for c, _, p in expired]
    finally:
        registry.close()


def _closure(roots: Iterable[bytes], infos: dict[bytes, PathInfo]) -> set[bytes]:
    """Digests of ``roots`` and everything they refer to (present paths only)."""
    seen: set[bytes] = set()
    todo = [r for r in roots if r in infos]
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        todo += [r.digest for r in infos[d].references if r.digest in infos]
    return seen


class _Content:
    """The indexed content of the store, and marking through it."""

    def __init__(
        self, store: Embedded, now: float, grace: float, progress: Progress = NULL
    ) -> None:
        self.progress = progress  # told each batch of Directories marked
        blobs = store.blobs()
        self.reader = blobs.reader
        index = blobs.index
        self.rows: dict[bytes, tuple[int, str, int]] = {}  # digest -> (size, pack, kind)
        for digest, size, pack, kind in index.query(
            "SELECT b.digest, b.size, f.pack, f.kind FROM pack_blobs b"
            " JOIN pack_frames f ON f.id = b.frame"
        ):
            self.rows[bytes(digest)] = (int(size), str(pack), int(kind))
        self.chunked: dict[bytes, tuple[int, list[bytes]]] = {}
        for digest, size, chunks in index.query("SELECT digest, size, chunks FROM pack_chunked"):
            key = bytes(digest)
            meta = parse_chunk_list(key, bytes(chunks))
            self.chunked[key] = (int(size), [c.digest.raw for c in meta])
        self.fresh: set[str] = set()
        for pack in {p for _, p, _ in self.rows.values()}:
            try:
                mtime = os.stat(self.reader.pack_path(pack)).st_mtime
            except (OSError, CastoreError):
                continue
            if mtime >= now - grace:
                self.fresh.add(pack)
        self.marked: set[bytes] = set()
        self.missing: set[bytes] = set()

    def unmarked(self) -> _Content:
        """The same tables without marks (to ask what some nodes reach)."""
        probe = copy.copy(self)
        probe.marked, probe.missing, probe.progress = set(), set(), NULL
        return probe

    def is_directory(self, digest: bytes) -> bool:
        row = self.rows.get(digest)
        return row is not None and row[2] == Kind.DIRECTORIES

    def _file(self, digest: bytes) -> None:
        if digest in self.marked:
            return
        self.marked.add(digest)
        if digest == _EMPTY:
            return  # (never stored: every store has it)
        if digest not in self.rows and digest not in self.chunked:
            self.missing.add(digest)
        for c in self.chunked.get(digest, (0, []))[1]:
            self.marked.add(c)

    def mark(self, nodes: Iterable[Node]) -> None:
        """Mark ``nodes`` and everything below them."""
        level: list[bytes] = []
        for node in nodes:
            if isinstance(node, FileNode):
                self._file(node.digest.raw)
            elif isinstance(node, DirectoryNode):
                level.append(node.digest.raw)
        self.mark_directories(level)

    def mark_directories(self, digests: Iterable[bytes]) -> None:
        level = [d for d in dict.fromkeys(digests) if d not in self.marked]
        while level:
            below: list[bytes] = []
            for i in range(0, len(level), _BATCH):
                batch = level[i : i + _BATCH]
                self.marked.update(batch)
                where = self.reader.locate(batch)
                for raw in batch:
                    loc = where.get(raw)
                    if not isinstance(loc, Member):
                        self.missing.add(raw)
                        continue
                    try:
                        msg = castore_pb2.Directory.FromString(bytes(self.reader.member(raw, loc)))
                    except (CastoreError, Exception):
                        self.missing.add(raw)
                        continue
                    for f in msg.files:
                        self._file(bytes(f.digest))
                    below += [bytes(d.digest) for d in msg.directories]
                self.progress.advance(len(batch))
            level = [d for d in dict.fromkeys(below) if d not in self.marked]

    def protect_fresh(self) -> int:
        """Keep unmarked content in packs younger than the grace period; how many items."""
        fresh_dirs = [
            d
            for d, (_, pack, kind) in self.rows.items()
            if d not in self.marked and pack in self.fresh and kind == Kind.DIRECTORIES
        ]
        self.mark_directories(fresh_dirs)
        count = len(fresh_dirs)
        for d, (_, pack, _) in self.rows.items():
            if d not in self.marked and pack in self.fresh:
                self.marked.add(d)
                count += 1
        for d, (_, chunks) in self.chunked.items():
            if d not in self.marked and any(
                c in self.rows and self.rows[c][1] in self.fresh for c in chunks
            ):
                self._file(d)
                count += 1
        return count

    def doomed(self) -> list[bytes]:
        out = [d for d in self.rows if d not in self.marked]
        out += [d for d in self.chunked if d not in self.marked]
        return out


def _generation(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM store_meta WHERE key = 'generation'").fetchone()
    return int(row[0]) if row else 0


def _nar_uploads(conn: sqlite3.Connection) -> list[tuple[bytes, Node, float]]:
    try:
        rows = conn.execute("SELECT nar_sha256, node, added FROM nar_index").fetchall()
    except sqlite3.OperationalError:
        return []  # (no NAR was ever uploaded)
    out = []
    for sha, raw, added in rows:
        msg = castore_pb2.Node()
        try:
            msg.ParseFromString(bytes(raw))
            out.append((bytes(sha), node_from_proto(msg), float(added)))
        except Exception:
            continue
    return out


def _node_content(node: Node) -> bytes | None:
    return node.digest.raw if isinstance(node, DirectoryNode | FileNode) else None


class _Collector:
    def __init__(
        self, store: Embedded, report: GcReport, now: float, progress: Progress = NULL
    ) -> None:
        self.progress = progress
        self.store = store
        self.report = report
        self.now = now
        self.db = connect(store.db)
        self.db.execute(_PURGE_SCHEMA)
        self.pins = Pins(store.db)

    def close(self) -> None:
        self.pins.close()
        self.db.close()

    def check_legacy(self) -> None:
        index = self.store.blobs().index
        for table in _LEGACY_TABLES:
            if index.has_table(table) and index.query(f"SELECT 1 FROM {table} LIMIT 1"):
                raise StorageError(
                    f"this store still has data in the layout of an older release (table"
                    f" {table}); run `tvix-store compact` first"
                )

    def mark(self) -> tuple[int, list[bytes], _Content, list[bytes], dict[bytes, bytes]]:
        """(generation, paths to delete, content marked, NAR uploads to drop, purges)."""
        r = self.report
        pathinfos = self.store.pathinfos()
        gen = pathinfos.generation()
        infos = {pi.digest: pi for pi in pathinfos.list_sync()}
        pinned = set(self.pins.pinned_digests())
        # Every member of a named cache is a root too (tvix_store.caches).
        members, r.expired_members = _cache_members(self.store.home, self.now, r.dry_run)
        pinned |= members
        roots = set(pinned)
        if r.keep_since is None:
            roots |= set(infos)
        else:
            access = pathinfos.access_times()
            horizon = self.now - r.keep_since
            # A path without an access row (an older release's, or rebuilt from the
            # packs) counts as accessed now, and from now on ages like the others.
            unseen = [(d, self.now) for d in infos if d not in access]
            if unseen and not r.dry_run:
                self.db.executemany(
                    "INSERT OR IGNORE INTO path_access (digest, at) VALUES (?, ?)", unseen
                )
            roots |= {d for d in infos if access.get(d, self.now) >= horizon}
        kept = _closure(roots, infos)
        r.paths, r.kept_paths = len(infos), len(kept)
        r.pinned_paths = len(_closure(pinned, infos))
        doomed_paths = sorted(set(infos) - kept)
        r.deleted_paths = sorted(infos[d].store_path.absolute for d in doomed_paths)
        content = _Content(self.store, self.now, r.grace, self.progress)
        content.mark(infos[d].node for d in kept)
        drop_uploads: list[bytes] = []
        late: list[Node] = []
        for sha, node, added in _nar_uploads(self.db):
            if added >= self.now - r.grace:
                late.append(node)
            else:
                key = _node_content(node)
                if key is not None and key not in content.marked:
                    drop_uploads.append(sha)
        content.mark(late)
        r.incomplete = sorted(
            infos[d].store_path.absolute
            for d in kept
            if _node_content(infos[d].node) in content.missing
        )
        r.kept_by_grace = content.protect_fresh()
        purges = {
            bytes(d): bytes(n) for d, n in self.db.execute("SELECT digest, node FROM gc_purge")
        }
        return gen, doomed_paths, content, drop_uploads, purges

    def sweep(
        self, gen: int, content: _Content, doomed: list[bytes], drop_uploads: list[bytes]
    ) -> None:
        """Drop the index rows of ``doomed`` content, in one transaction checking ``gen``."""
        blobs = self.store.blobs()
        own = self.store.lease.id
        dirs = [d for d in doomed if content.is_directory(d)]

        def check(conn: sqlite3.Connection) -> None:
            leased = [
                f"{x.holder} until {time.ctime(x.expires)}"
                for x in live_leases(conn)
                if x.id != own
            ]
            if leased or _generation(conn) != gen:
                raise _Changed(leased)
            with contextlib.suppress(sqlite3.OperationalError):  # (tables made on first use)
                conn.executemany(
                    "DELETE FROM nar_index WHERE nar_sha256 = ?", [(s,) for s in drop_uploads]
                )
            with contextlib.suppress(sqlite3.OperationalError):
                conn.executemany(
                    "DELETE FROM nar_dirplans WHERE id = ? AND digest = ?",
                    [(int.from_bytes(d[:8], "big", signed=True), d) for d in dirs],
                )

        txn = blobs.index.transaction()
        txn.delete_blobs(doomed)
        txn.on_commit(check)
        txn.commit()

    def purge_packs(self, content: _Content, purges: dict[bytes, bytes]) -> set[str]:
        """Packs holding content or PathInfo records of deleted paths (rewritten whatever)."""
        must: set[str] = set()
        nodes = []
        for raw in purges.values():
            msg = castore_pb2.Node()
            with contextlib.suppress(Exception):
                msg.ParseFromString(raw)
                nodes.append(node_from_proto(msg))
        probe = content.unmarked()
        probe.mark(nodes)
        for d in probe.marked:
            if d not in content.marked and d in content.rows:
                must.add(content.rows[d][1])
        if purges:
            digests = set(purges)
            pathinfos = self.store.pathinfos()
            index = self.store.blobs().index
            packs = [
                str(p)
                for (p,) in index.query(
                    "SELECT DISTINCT pack FROM pack_frames WHERE kind = ?", (int(Kind.PATHINFOS),)
                )
            ]
            for pack in packs:
                try:
                    keys = [
                        m.key
                        for f in scan(content.reader.pack_path(pack))
                        if f.kind == Kind.PATHINFOS
                        for m in f.members
                        if m.key[:20] in digests
                    ]
                except (OSError, CastoreError):
                    continue
                if keys and set(keys) - pathinfos.live_records(keys):
                    must.add(pack)
        return must


def collect(
    store: Embedded,
    *,
    keep_since: float | None = None,
    grace: float = GC_GRACE,
    dry_run: bool = False,
    wait: float = 0.0,
    min_garbage: float = 0.2,
    progress: Progress = NULL,
) -> GcReport:
    """Collect the garbage of ``store`` (blocking; see the module).

    ``progress`` shows the steps: the Directories marked (how many is not
    known before), the content swept (one transaction), the packs compacted.
    """
    start = time.monotonic()
    now = time.time()
    report = GcReport(dry_run=dry_run, keep_since=keep_since, grace=grace)
    fd = _open_lock(store.home, LOCK_NAME)
    c = _Collector(store, report, now, progress)
    try:
        c.check_legacy()
        report.bytes_before = report.bytes_after = store_bytes(store.home)
        deadline = time.monotonic() + wait
        removed: list[str] = []
        while True:
            report.marks += 1
            progress.stage(
                "gc: mark" if report.marks == 1 else "gc: mark again", unit="directories"
            )
            t = time.monotonic()
            gen, doomed_paths, content, drop_uploads, purges = c.mark()
            doomed = content.doomed()
            report.mark_seconds += time.monotonic() - t
            report.directories = sum(1 for d in doomed if content.is_directory(d))
            report.chunked_blobs = sum(1 for d in doomed if d in content.chunked)
            report.blobs = len(doomed) - report.directories - report.chunked_blobs
            report.content_bytes = sum(content.rows[d][0] for d in doomed if d in content.rows)
            report.nar_uploads_dropped = len(drop_uploads)
            if dry_run:
                break
            t = time.monotonic()
            progress.stage(
                "gc: sweep", unit="items", items=len(doomed), bytes=report.content_bytes or None
            )
            try:
                if doomed_paths:
                    store.pathinfos().delete_sync(doomed_paths, expect_generation=gen)
                    removed += report.deleted_paths
                    gen += 1
                c.sweep(gen, content, doomed, drop_uploads)
                progress.advance(len(doomed), report.content_bytes)
            except (GenerationChanged, _Changed) as exc:
                leased = exc.leased if isinstance(exc, _Changed) else []
                report.sweep_seconds += time.monotonic() - t
                if report.marks >= _MARK_ATTEMPTS or (leased and time.monotonic() >= deadline):
                    report.deferred = (
                        f"{len(leased)} writer(s) hold a lease ({'; '.join(leased)})"
                        if leased
                        else "the store kept changing while it was marked"
                    )
                    break
                if leased:
                    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            report.sweep_seconds += time.monotonic() - t
            t = time.monotonic()
            must = c.purge_packs(content, purges)
            progress.stage("gc: compact", unit="packs")
            stats = compact(
                store.blobs(),
                min_garbage=min_garbage,
                live_records=store.live_records,
                must=must,
                progress=None if progress is NULL else progress,
            )
            report.purge_pending = sorted(must - set(stats.rewritten))
            if not report.purge_pending and purges:
                for digest in purges:  # (not rows a delete added meanwhile)
                    write_one(
                        c.db, "DELETE FROM gc_purge WHERE digest = ?", (digest,), "clearing purges"
                    )
            if purges or doomed_paths:
                with contextlib.suppress(sqlite3.Error):
                    c.db.execute("VACUUM")  # (deleted rows' bytes leave the database file)
            with contextlib.suppress(sqlite3.Error):
                c.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            report.compact_seconds = time.monotonic() - t
            break
        if not dry_run:
            report.deleted_paths = sorted(removed)
        report.bytes_after = store_bytes(store.home)
    finally:
        c.close()
        os.close(fd)
    report.seconds = time.monotonic() - start
    if not dry_run:
        from tvix_store.telemetry.store import record_gc

        record_gc(store.home, "embedded", report.seconds, report.reclaimed, bool(report.deferred))
    return report


def delete_paths(
    store: Embedded, paths: Sequence[StorePath], *, with_referrers: bool = False
) -> list[str]:
    """Delete these paths' PathInfos; the store paths deleted, sorted.

    With ``with_referrers``, every path referring to them goes too
    (transitively). Their content goes at the next :func:`collect`, whose
    compaction rewrites the packs holding it.

    Raises:
        NotFound: a path is not in the store.
        Referenced: a path that stays refers to one (without ``with_referrers``), or a
            pin holds one.
    """
    # (no GC lock: a collection marking meanwhile sees the generation move and marks again)
    c = _Collector(store, GcReport(dry_run=False, keep_since=None, grace=0.0), time.time())
    try:
        for attempt in range(_MARK_ATTEMPTS):
            try:
                return _delete(store, c, paths, with_referrers)
            except GenerationChanged:
                if attempt == _MARK_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")
    finally:
        c.close()


def _delete(
    store: Embedded, c: _Collector, paths: Sequence[StorePath], with_referrers: bool
) -> list[str]:
    """One attempt of :func:`delete_paths` (GenerationChanged if a path came meanwhile)."""
    pathinfos = store.pathinfos()
    gen = pathinfos.generation()
    infos = {pi.digest: pi for pi in pathinfos.list_sync()}
    targets = set()
    for p in paths:
        if p.digest not in infos or infos[p.digest].store_path != p:
            raise NotFound(f"{p.absolute}: not in this store")
        targets.add(p.digest)
    referrers: dict[bytes, set[bytes]] = {}
    for d, pi in infos.items():
        for ref in pi.references:
            if ref.digest != d:
                referrers.setdefault(ref.digest, set()).add(d)
    if with_referrers:
        todo = list(targets)
        while todo:
            for r in referrers.get(todo.pop(), ()):
                if r not in targets:
                    targets.add(r)
                    todo.append(r)
    else:
        for d in sorted(targets):
            outside = sorted(
                infos[r].store_path.absolute for r in referrers.get(d, set()) - targets
            )
            if outside:
                raise Referenced(
                    f"{infos[d].store_path.absolute} is referred to by {', '.join(outside[:5])}"
                    f"{' …' if len(outside) > 5 else ''}; --with-referrers deletes those too"
                )
    pinned = c.pins.pinned_digests()
    for d in sorted(targets):
        if d in pinned:
            raise Referenced(
                f"{infos[d].store_path.absolute} is pinned by {', '.join(sorted(pinned[d]))};"
                " `tvix-store pin rm` it first"
            )
    rows = [
        (d, infos[d].store_path.absolute, node_to_proto(infos[d].node).SerializeToString())
        for d in sorted(targets)
    ]
    try:
        c.db.executemany(
            "INSERT OR REPLACE INTO gc_purge (digest, path, node) VALUES (?, ?, ?)", rows
        )
    except sqlite3.Error as exc:
        raise storage_error("recording paths to purge", exc, store.db) from exc
    # (a referrer put since the listing would be left naming a deleted path)
    pathinfos.delete_sync(sorted(targets), expect_generation=gen)
    return sorted(infos[d].store_path.absolute for d in targets)
