"""Compaction: rewrite packs that are mostly garbage, and convert the legacy (v1) layout.

A v2 pack is rewritten when the bytes nothing indexes (blob members without
a ``pack_blobs`` row naming them there, chunk lists without a
``pack_chunked`` row, frames without an index row, a torn tail after the
last frame) are at least ``min_garbage`` of it (every pack with
``recompress``). All legacy data is converted: blobs of ``packs/*.pack``
(``packed`` rows), chunk lists (``chunked`` rows) and the chunk store
``blobs/`` (B §7.1 objects), each verified by its BLAKE3 digest as it is
read, recompressed into new frames at the store's level.

Order, so a crash (``kill -9``, power cut) at any point loses nothing:

1. the live members are read (every frame decoded and checked, every blob
   verified) and appended as new frames to this process's pack;
2. that pack is ``fsync``ed, and so is the ``packs/`` directory (the new
   pack's name is on disk before rows name it);
3. one index transaction adds the new frames' rows and drops the old
   pack's rows (or the converted legacy rows);
4. only then is the old file deleted (and the directory synced again).

A crash before 3 leaves new frames nothing indexes: garbage the next
compaction drops (or that a rebuild indexes next to the old copies, which
is harmless). A crash between 3 and 4 leaves an old file nothing indexes,
which the next open indexes again (no blob rows move: existing rows win)
and the next compaction deletes.

Concurrency: compactions of one store are serialised by ``flock`` on
``<home>/compact.lock``. A pack is only touched while this process holds its
``flock`` (a live writer holds it while appending, so its pack is skipped,
and so is a pack with frames the index has not taken in yet: a writer may
have rotated past it before its transaction commits; the next open indexes
them). Readers keep working: they find the new rows, and a read that
located a frame just before it vanished locates it again once (see
:class:`PackReader`); a process that still has the old file open keeps
reading it until it lets it go.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from tvix_castore.blobservice.objectstore import blob_key, chunk_key
from tvix_castore.digests import B3Digest
from tvix_castore.errors import DataCorruption, StorageError, os_storage_error
from tvix_castore.packstore.format import (
    FILE_HEADER,
    SEGMENT_TARGET,
    Frame,
    FrameMember,
    Kind,
    scan,
)
from tvix_castore.packstore.index import ChunkedRow, FrameRow, parse_chunk_list
from tvix_castore.packstore.reader import Legacy, Member
from tvix_castore.packstore.writer import PACK_SUFFIX, chunk_list
from tvix_castore.progress import Progress

if TYPE_CHECKING:
    import sqlite3

    from tvix_castore.packstore.service import PackBlobService, PackTxn

__all__ = ["LEGACY_SUFFIX", "CompactStats", "LiveRecords", "compact", "store_bytes"]

LEGACY_SUFFIX = ".pack"
LOCK_NAME = "compact.lock"
_LEGACY_TABLES = ("packed", "chunked", "pack_segments")
_TXN_BYTES = 256 << 20  # raw bytes moved per transaction of legacy chunk objects
_UNINDEXED_GRACE = 600.0  # a pack no index row names may be one a writer is just creating
_HEX = frozenset("0123456789abcdef")
_log = logging.getLogger(__name__)

LiveRecords = Callable[[Kind, Sequence[bytes]], set[bytes]]
"""Which of these record keys (Directories, PathInfos) the store layer still wants."""


@dataclass
class CompactStats:
    """What a compaction did (bytes: pack files plus legacy chunk objects)."""

    bytes_before: int = 0
    bytes_after: int = 0
    packs_examined: int = 0
    packs_rewritten: int = 0  # v2 packs whose live frames were copied, then deleted
    packs_written: int = 0  # new pack files the live data went to
    packs_skipped_locked: int = 0  # a live writer (or another reader of its lock) holds it
    packs_skipped_behind: int = 0  # holds frames the index has not taken in yet
    garbage_bytes: int = 0  # in the packs rewritten
    blobs_copied: int = 0
    frames_written: int = 0
    legacy_packs_converted: int = 0  # v1 ``.pack`` files deleted after conversion
    legacy_rows_converted: int = 0  # ``packed`` and ``chunked`` rows
    legacy_objects_converted: int = 0  # chunk store files deleted after conversion
    legacy_left: int = 0  # legacy files still there (damaged, or in use)
    damaged: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)  # names of the v2 packs rewritten
    seconds: float = 0.0

    def summary(self) -> str:
        """A few lines for an operator."""
        saved = self.bytes_before - self.bytes_after
        pct = 100.0 * saved / self.bytes_before if self.bytes_before else 0.0
        lines = [
            f"bytes before: {self.bytes_before}",
            f"bytes after:  {self.bytes_after} ({saved} freed, {pct:.1f}%)",
            f"packs: {self.packs_examined} examined, {self.packs_rewritten} rewritten"
            f" ({self.garbage_bytes} bytes of garbage), {self.packs_written} written,"
            f" {self.packs_skipped_locked} skipped (locked by a writer),"
            f" {self.packs_skipped_behind} skipped (not indexed yet)",
            f"blobs copied: {self.blobs_copied} in {self.frames_written} frames",
            f"legacy: {self.legacy_packs_converted} packs, {self.legacy_rows_converted} index"
            f" rows, {self.legacy_objects_converted} chunk store objects converted;"
            f" {self.legacy_left} legacy files left",
            f"time: {self.seconds:.2f} s",
        ]
        lines += [f"damaged (left as it was): {d}" for d in self.damaged]
        return "\n".join(lines)


def store_bytes(home: Path) -> int:
    """Bytes of a store's data files: v2 and v1 packs and the legacy chunk store."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(home / "packs"):
            if entry.name.endswith((PACK_SUFFIX, LEGACY_SUFFIX)):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat(follow_symlinks=False).st_size
    for path in _files_under(home / "blobs"):
        with contextlib.suppress(FileNotFoundError):
            total += path.lstat().st_size
    return total


def _files_under(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for name in sorted(files):
            yield Path(dirpath) / name


def _lock(path: Path) -> int | None:
    """An fd holding ``flock(LOCK_EX)`` on ``path``, or ``None`` (locked elsewhere, gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Out:
    """Live data on its way into new frames through one transaction.

    Blobs are gathered into segments of ``SEGMENT_TARGET`` raw bytes (in the
    order they come, which is the order they were first written: a NAR's);
    a chunk list is written after the segment holding its last chunk, and
    PathInfos last, after everything they might name.
    """

    def __init__(self, svc: PackBlobService, stats: CompactStats) -> None:
        self.svc = svc
        self.stats = stats
        self.txn: PackTxn = svc.transaction()
        self._blobs: list[tuple[bytes, bytes]] = []
        self._raw = 0
        self._lists: list[tuple[bytes, int, bytes]] = []
        self._records: dict[int, list[tuple[bytes, bytes]]] = {}
        self._record_raw: dict[int, int] = {}
        self.packs: set[str] = set()
        self.raw = 0  # blob bytes taken in

    def _append(
        self, kind: int, members: list[FrameMember], pieces: Sequence[bytes | memoryview]
    ) -> None:
        new = self.txn.append_frame(kind, members, pieces)
        self.packs.add(new.pack)
        self.stats.frames_written += 1

    def blob(self, digest: bytes, data: bytes) -> None:
        self._blobs.append((digest, data))
        self._raw += len(data)
        self.raw += len(data)
        self.stats.blobs_copied += 1
        if self._raw >= SEGMENT_TARGET:
            self.flush_blobs()

    def chunk_list(self, digest: bytes, size: int, payload: bytes) -> None:
        if self._blobs:
            self._lists.append((digest, size, payload))
        else:
            self._append(Kind.CHUNK_LIST, [FrameMember(digest, size)], [payload])

    def record(self, kind: int, key: bytes, data: bytes) -> None:
        self._records.setdefault(kind, []).append((key, data))
        self._record_raw[kind] = self._record_raw.get(kind, 0) + len(data)
        if kind != Kind.PATHINFOS and self._record_raw[kind] >= SEGMENT_TARGET:
            self._flush_records(kind)

    def _flush_records(self, kind: int) -> None:
        records = self._records.pop(kind, [])
        self._record_raw.pop(kind, None)
        if records:
            self._append(
                kind, [FrameMember(k, len(r)) for k, r in records], [r for _, r in records]
            )

    def flush_blobs(self) -> None:
        blobs, self._blobs, self._raw = self._blobs, [], 0
        if blobs:
            self._append(
                Kind.BLOBS, [FrameMember(d, len(b)) for d, b in blobs], [b for _, b in blobs]
            )
        lists, self._lists = self._lists, []
        for digest, size, payload in lists:
            self._append(Kind.CHUNK_LIST, [FrameMember(digest, size)], [payload])

    def commit(self) -> None:
        """Write what is pending; fsync the packs and their directory; commit the rows."""
        self.flush_blobs()
        for kind in sorted(k for k in self._records if k != Kind.PATHINFOS):
            self._flush_records(kind)
        self._flush_records(Kind.PATHINFOS)
        if self.packs:
            # (PackTxn.commit fsyncs the pack; the name must be durable as well)
            _sync_dir(self.svc.pack_dir)
        self.txn.commit()

    def abort(self) -> None:
        self.txn.abort()


def _sizes(pack_dir: Path, names: Sequence[str]) -> dict[str, int]:
    """Each pack's size on disk (for progress; a pack gone meanwhile counts 0)."""
    out = {}
    for name in names:
        with contextlib.suppress(OSError):
            out[name] = os.stat(pack_dir / name).st_size
    return out


class _Compactor:
    def __init__(
        self,
        svc: PackBlobService,
        min_garbage: float,
        recompress: bool,
        live_records: LiveRecords | None,
        grace: float,
        stats: CompactStats,
        must: Collection[str] = (),
        progress: Progress | None = None,
    ) -> None:
        self.must = frozenset(must)
        self.progress = progress
        self.svc = svc
        self.index = svc.index
        self.reader = svc.reader
        self.pack_dir = svc.pack_dir
        self.min_garbage = min_garbage
        self.recompress = recompress
        self.live_records = live_records
        self.grace = grace
        self.stats = stats
        self.written: set[bytes] = set()  # digests copied by this run
        self.created: set[str] = set()  # packs this run appended to

    # -- v2 packs ---------------------------------------------------------------
    def v2_packs(self) -> None:
        try:
            names = sorted(n for n in os.listdir(self.pack_dir) if n.endswith(PACK_SUFFIX))
        except FileNotFoundError:
            return
        sizes = _sizes(self.pack_dir, names) if self.progress is not None else {}
        if self.progress is not None:
            self.progress.total(items=len(names), bytes=sum(sizes.values()))
        for name in names:
            self._examine(name)
            if self.progress is not None:
                self.progress.advance(1, sizes.get(name, 0))

    def _examine(self, name: str) -> None:
        if name == self.svc.writer.current or name in self.created:
            return
        self.stats.packs_examined += 1
        fd = _lock(self.pack_dir / name)
        if fd is None:
            self.stats.packs_skipped_locked += 1
            return
        try:
            self._v2_pack(name, fd)
        finally:
            os.close(fd)

    def _live_chunk_lists(self, keys: list[bytes]) -> set[bytes]:
        found = self.index.lookup(keys)
        return {k for k, row in found.items() if isinstance(row, ChunkedRow)}

    def _v2_pack(self, name: str, fd: int) -> None:
        path = self.pack_dir / name
        st = os.fstat(fd)
        size = st.st_size
        indexed = self.index.pack_files().get(name)
        scanned = {f.offset: f for f in scan(path)}
        rows = self.index.frames_of(name)
        mark = len(FILE_HEADER) if indexed is None else indexed
        if any(off >= mark for off in scanned):
            self.stats.packs_skipped_behind += 1  # (a writer may still commit them)
            return
        if indexed is None and time.time() - st.st_mtime < self.grace:
            self.stats.packs_skipped_behind += 1  # (a writer may be creating it)
            return
        plan: list[tuple[FrameRow, Frame, dict[bytes, tuple[int, int]] | None]] = []
        for row in rows:
            frame = scanned.get(row.offset)
            if frame is None or frame.length != row.length or frame.kind != row.kind:
                self.stats.damaged.append(
                    f"pack {name}: index row of the frame at {row.offset} does not match the file"
                )
                return
            plan.append((row, frame, None))
        live = 0.0
        lists = self._live_chunk_lists(
            [f.members[0].key for _, f, _ in plan if f.kind == Kind.CHUNK_LIST and f.members]
        )
        keep: list[tuple[FrameRow, Frame, dict[bytes, tuple[int, int]] | None]] = []
        indexed_members = self.index.live_members(name)
        for row, frame, _ in plan:
            if frame.kind in (Kind.BLOBS, Kind.DIRECTORIES):  # (members indexed one by one)
                members = indexed_members.get(row.id)
                if members:
                    share = sum(n for _, n in members.values()) / max(frame.raw, 1)
                    live += frame.length * share
                    keep.append((row, frame, members))
            elif frame.kind == Kind.CHUNK_LIST:
                if frame.members and frame.members[0].key in lists:
                    live += frame.length
                    keep.append((row, frame, None))
            else:
                live += frame.length
                keep.append((row, frame, None))
        body = size - len(FILE_HEADER)
        garbage = max(0, round(body - live))
        forced = self.recompress or name in self.must
        if not (forced or (garbage > 0 and garbage >= self.min_garbage * body)):
            return
        out = _Out(self.svc, self.stats)
        try:
            for row, frame, live_members in keep:
                self._copy_frame(out, row, frame, live_members)
            out.txn.delete_pack(name)
            out.commit()
        except DataCorruption as exc:
            out.abort()
            self.stats.damaged.append(str(exc))
            return
        except BaseException:
            out.abort()
            raise
        self.created |= out.packs
        self.stats.packs_rewritten += 1
        self.stats.rewritten.append(name)
        self.stats.garbage_bytes += garbage
        self._delete([path])
        self.reader.forget([name])

    def _copy_frame(
        self,
        out: _Out,
        row: FrameRow,
        frame: Frame,
        members: dict[bytes, tuple[int, int]] | None,
    ) -> None:
        payload = self.reader.payload(row.ref)  # (decoded and checked)
        if frame.kind in (Kind.BLOBS, Kind.DIRECTORIES):
            assert members is not None
            by_offset = sorted((off, n, d) for d, (off, n) in members.items())
            for off, n, digest in by_offset:  # (always copied: its row is to move)
                view = self.reader.member(digest, Member(row.ref, off, n))
                if frame.kind == Kind.BLOBS:
                    out.blob(digest, bytes(view))
                else:
                    out.record(Kind.DIRECTORIES, digest, bytes(view))
                self.written.add(digest)
            return
        if frame.kind == Kind.CHUNK_LIST:
            m = frame.members[0]
            parse_chunk_list(m.key, payload)  # (well formed)
            out.chunk_list(m.key, m.size, bytes(payload))
            return
        at = 0
        records = list(frame.members)
        wanted: set[bytes] | None = None
        if self.live_records is not None and frame.kind == Kind.PATHINFOS:
            wanted = self.live_records(Kind(frame.kind), [m.key for m in records])
        if frame.kind == Kind.PATHINFOS:
            for m in records:
                if wanted is None or m.key in wanted:
                    out.record(frame.kind, m.key, bytes(payload[at : at + m.size]))
                at += m.size
            return
        # A kind this version does not know: kept as it is (forward compatible).
        out.flush_blobs()
        out._append(frame.kind, list(records), [bytes(payload)])

    # -- legacy (v1) ------------------------------------------------------------
    def legacy(self) -> None:
        if self.reader.legacy is not None:
            if self.index.has_table("packed"):
                packs = [str(p) for (p,) in self.index.query("SELECT DISTINCT pack FROM packed")]
                for pack in sorted(packs):
                    self._legacy_pack(pack)
            if self.index.has_table("chunked"):
                self._legacy_chunked()
            self._legacy_objects()
        if self.index.has_table("directories"):
            self._legacy_directories()
        self._legacy_leftovers()

    def _legacy_directories(self) -> None:
        """Directories of older releases (a ``directories`` table): into DIRECTORIES frames."""
        rows = [
            (bytes(d), bytes(b))
            for d, b in self.index.query("SELECT digest, CAST(data AS BLOB) FROM directories")
        ]
        if not rows:
            return
        present = self._v2_has([d for d, _ in rows])
        out = _Out(self.svc, self.stats)
        converted: list[bytes] = []
        try:
            for digest, data in rows:
                if blake3.blake3(data).digest() != digest:
                    self.stats.damaged.append(
                        f"directory {B3Digest(digest)}: its legacy row does not match its digest"
                    )
                    continue
                if digest not in present:
                    out.record(Kind.DIRECTORIES, digest, data)
                    self.written.add(digest)
                converted.append(digest)

            def drop(conn: sqlite3.Connection) -> None:
                conn.executemany(
                    "DELETE FROM directories WHERE digest = ?", [(d,) for d in converted]
                )

            out.txn.on_commit(drop)
            out.commit()
        except BaseException:
            out.abort()
            raise
        self.created |= out.packs
        self.stats.legacy_rows_converted += len(converted)

    def _v2_has(self, digests: Sequence[bytes]) -> set[bytes]:
        return set(self.index.lookup(digests)) | (self.written & set(digests))

    def _legacy_pack(self, pack: str) -> None:
        legacy = self.reader.legacy
        assert legacy is not None
        rows = [
            (bytes(d), int(o), int(n))
            for d, o, n in self.index.query(
                "SELECT digest, offset, length FROM packed WHERE pack = ? ORDER BY offset", (pack,)
            )
        ]
        present = self._v2_has([d for d, _, _ in rows])
        out = _Out(self.svc, self.stats)
        converted: list[bytes] = []
        damaged = False
        try:
            for digest, off, n in rows:
                if digest not in present and digest not in self.written:
                    try:
                        data = legacy.read(digest, Legacy(pack, off, n))
                    except DataCorruption as exc:
                        self.stats.damaged.append(str(exc))
                        damaged = True
                        continue
                    out.blob(digest, data)
                    self.written.add(digest)
                converted.append(digest)

            def drop(conn: sqlite3.Connection) -> None:
                conn.executemany(
                    "DELETE FROM packed WHERE digest = ? AND pack = ?",
                    [(d, pack) for d in converted],
                )
                if not damaged:
                    conn.execute("DELETE FROM pack_segments WHERE pack = ?", (pack,))

            out.txn.on_commit(drop)
            out.commit()
        except BaseException:
            out.abort()
            raise
        self.created |= out.packs
        self.stats.legacy_rows_converted += len(converted)

    def _legacy_chunked(self) -> None:
        rows = [
            (bytes(d), bytes(c))
            for d, c in self.index.query("SELECT digest, CAST(chunks AS BLOB) FROM chunked")
        ]
        if not rows:
            return
        present = {
            k
            for k, row in self.index.lookup([d for d, _ in rows]).items()
            if isinstance(row, ChunkedRow)
        }
        out = _Out(self.svc, self.stats)
        converted: list[bytes] = []
        try:
            for digest, raw in rows:
                try:
                    chunks = parse_chunk_list(digest, raw)
                except DataCorruption as exc:
                    self.stats.damaged.append(str(exc))
                    continue
                want = [c.digest.raw for c in chunks]
                if len(self._v2_has(want)) < len(set(want)):
                    self.stats.damaged.append(
                        f"blob {B3Digest(digest)}: a chunk of its legacy chunk list is missing"
                    )
                    continue
                if digest not in present:
                    out.chunk_list(digest, sum(c.size for c in chunks), chunk_list(chunks))
                converted.append(digest)

            def drop(conn: sqlite3.Connection) -> None:
                conn.executemany("DELETE FROM chunked WHERE digest = ?", [(d,) for d in converted])

            out.txn.on_commit(drop)
            out.commit()
        except BaseException:
            out.abort()
            raise
        self.created |= out.packs
        self.stats.legacy_rows_converted += len(converted)

    def _legacy_objects(self) -> None:
        """The chunk store ``blobs/``: chunked blobs (chunks in order), then lone chunks."""
        legacy = self.reader.legacy
        root = self.svc.home / "blobs"
        if legacy is None or legacy.objects is None or not root.is_dir():
            return
        objects = legacy.objects
        indexes = sorted(_hex_names(root / "blobs" / "b3"))
        lone = sorted(_hex_names(root / "chunks" / "b3"))
        out = _Out(self.svc, self.stats)
        handled: list[Path] = []
        bad_chunks: set[bytes] = set()

        def commit() -> None:
            nonlocal out, handled
            out.commit()
            self.created.update(out.packs)
            self._delete(handled)
            self.stats.legacy_objects_converted += len(handled)
            out, handled = _Out(self.svc, self.stats), []

        def take_chunk(raw: bytes, size: int | None) -> bool:
            """Copy one chunk object (if v2 lacks it); whether its bytes are now in v2."""
            if raw in self.written or raw in self.index.lookup([raw]):
                return True
            if raw in bad_chunks:
                return False
            digest = B3Digest(raw)
            try:
                pieces = objects.load_chunk_pieces_sync(digest, size or (1 << 26), mapped=False)
            except (DataCorruption, StorageError) as exc:
                self.stats.damaged.append(str(exc))
                bad_chunks.add(raw)
                return False
            if pieces is None:
                return False
            out.blob(raw, b"".join(bytes(p) for p in pieces))
            self.written.add(raw)
            return True

        try:
            for raw in indexes:
                digest = B3Digest(raw)
                try:
                    chunks = objects.chunks_sync(digest) or []
                except (DataCorruption, StorageError) as exc:
                    self.stats.damaged.append(str(exc))
                    continue
                if not chunks:
                    continue
                if all([take_chunk(c.digest.raw, c.size) for c in chunks]):
                    existing = self.index.lookup([raw]).get(raw)
                    if not isinstance(existing, ChunkedRow):
                        out.chunk_list(raw, sum(c.size for c in chunks), chunk_list(chunks))
                    handled.append(root / blob_key(digest))
                    handled += [root / chunk_key(c.digest) for c in chunks]
                if out.raw >= _TXN_BYTES:
                    commit()
            for raw in lone:
                path = root / chunk_key(B3Digest(raw))
                if path in handled:
                    continue
                if take_chunk(raw, None):
                    handled.append(path)
                if out.raw >= _TXN_BYTES:
                    commit()
            commit()
        except BaseException:
            out.abort()
            raise

    def _legacy_leftovers(self) -> None:
        """Delete v1 files nothing indexes any more; count the ones still needed."""
        legacy_rows: set[str] = set()
        if self.index.has_table("packed"):
            legacy_rows = {str(p) for (p,) in self.index.query("SELECT DISTINCT pack FROM packed")}
        doomed: list[Path] = []
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(self.pack_dir)):
                if name.endswith(LEGACY_SUFFIX):
                    if name in legacy_rows:
                        self.stats.legacy_left += 1
                    else:
                        doomed.append(self.pack_dir / name)
        self._delete(doomed)
        self.reader.forget([p.name for p in doomed])
        self.stats.legacy_packs_converted += len(doomed)
        root = self.svc.home / "blobs"
        if not root.is_dir():
            return
        # Chunk store files left: damaged ones (kept) and temporary files of
        # interrupted v1 writes (garbage).
        for path in list(_files_under(root)):
            if len(path.name) == 64 and set(path.name) <= _HEX:
                self.stats.legacy_left += 1
            else:
                path.unlink(missing_ok=True)
        for dirpath, _dirs, _files in os.walk(root, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)  # (only empty ones)

    def _delete(self, paths: Sequence[Path]) -> None:
        """Remove files whose contents the index no longer names (after its commit)."""
        if not paths:
            return
        dirs = set()
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise os_storage_error("deleting a compacted file", exc, path) from exc
            dirs.add(path.parent)
        for d in dirs:
            with contextlib.suppress(OSError):
                _sync_dir(d)


def _hex_names(shards: Path) -> Iterator[bytes]:
    """Digests of the objects under ``shards/<4 hex>/<64 hex>``."""
    with contextlib.suppress(FileNotFoundError):
        for shard in os.scandir(shards):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(shard.path):
                name = entry.name
                if len(name) == 64 and set(name) <= _HEX and name.startswith(shard.name):
                    yield bytes.fromhex(name)


def compact(
    svc: PackBlobService,
    *,
    min_garbage: float = 0.2,
    recompress: bool = False,
    live_records: LiveRecords | None = None,
    grace: float = _UNINDEXED_GRACE,
    must: Collection[str] = (),
    progress: Progress | None = None,
) -> CompactStats:
    """Rewrite packs that are at least ``min_garbage`` garbage; convert all legacy data.

    Blocking. With ``recompress`` every v2 pack is rewritten (at the store's
    level). See the module doc for the guarantees.

    ``live_records`` lets the store layer drop Directories/PathInfos it no
    longer wants (default: every record is kept). ``grace`` is how old (in
    seconds) a pack that no index row names must be before it is touched.
    Packs named in ``must`` are rewritten whatever their garbage (the garbage
    collector purging a deleted path's bytes); :attr:`CompactStats.rewritten`
    says which were. ``progress`` is told the packs (and their bytes) to
    examine, then each one as it is examined (the legacy layouts' conversion
    is not counted).
    Raises ``StorageFull``/``StorageError`` (nothing is lost: what was not
    committed stays where it was); damaged data is left as it was and listed
    in :attr:`CompactStats.damaged`.
    """
    if not 0.0 <= min_garbage <= 1.0:
        raise ValueError(f"min_garbage must be within [0, 1], not {min_garbage}")
    start = time.monotonic()
    stats = CompactStats(bytes_before=store_bytes(svc.home))
    lock_path = svc.home / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise os_storage_error("opening the compaction lock", exc, lock_path) from exc
    c = _Compactor(svc, min_garbage, recompress, live_records, grace, stats, must, progress)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # (one compaction of a store at a time)
        c.legacy()
        c.v2_packs()
    finally:
        os.close(fd)
        stats.packs_written = len(c.created)
    stats.bytes_after = store_bytes(svc.home)
    stats.seconds = time.monotonic() - start
    _log.debug("compacted %s:\n%s", svc.home, stats.summary())
    return stats
