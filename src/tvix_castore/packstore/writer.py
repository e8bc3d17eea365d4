"""Appending frames: this process's pack file, segments of blobs, deduplication.

Blobs (whole small files, FastCDC chunks of large ones) go into segments in
the order they come (a NAR's order), so neighbours compress together; a
segment becomes a frame at ``SEGMENT_TARGET`` raw bytes. A large blob's chunk
list is written after the frame holding its last chunk. Before blobs enter a
segment, those already stored are dropped, a batch at a time (one indexed
query per batch; a forked worker asks the parent a batch ahead).

Each writing process appends to its own pack (``flock``ed, so rebuild and
compaction leave it alone); a failed append is cut back (``ftruncate``), so
later frames land where they are recorded.
"""

from __future__ import annotations

import fcntl
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import blake3

from tvix_castore import observe
from tvix_castore.blobservice.base import ChunkMeta, read_file, writev_all
from tvix_castore.digests import B3Digest, hash_threads
from tvix_castore.errors import StorageError, os_storage_error
from tvix_castore.packstore.format import (
    FILE_HEADER,
    MEMBER,
    PACK_LIMIT,
    SEGMENT_TARGET,
    Codec,
    FrameMember,
    Kind,
    build_frame,
)
from tvix_castore.packstore.index import NewFrame

__all__ = ["PACK_SUFFIX", "PackWriter", "SegmentBuilder", "Stager", "chunk_list", "read_files"]

PACK_SUFFIX = ".tvpack"
BATCH_BYTES = 8 << 20  # blob bytes read before their presence is asked (memory bound)
STREAM_BATCH_BYTES = 1 << 20  # the same for one upload stream (many run at once)

Present = Callable[[list[bytes]], Callable[[], set[bytes]]]
"""Ask which digests are stored; the answer is awaited by calling the result."""


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _PackFile:
    """One pack being appended to, ``flock``ed for as long as it is open."""

    def __init__(self, pack_dir: Path, fsync: bool) -> None:
        made = not pack_dir.is_dir()
        pack_dir.mkdir(parents=True, exist_ok=True)
        self.name = f"{uuid.uuid4().hex}{PACK_SUFFIX}"
        self.path = pack_dir / self.name
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        self.fd = os.open(self.path, flags, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.size = 0
            self.append([FILE_HEADER], len(FILE_HEADER))
            if fsync:  # (the new name must survive a power cut, as its bytes will)
                _sync_dir(pack_dir)
                if made:
                    _sync_dir(pack_dir.parent)
        except BaseException:
            os.close(self.fd)
            self.path.unlink(missing_ok=True)
            raise
        self.dirty = True

    def append(self, pieces: list[bytes | memoryview], length: int) -> int:
        offset = self.size
        try:
            writev_all(self.fd, pieces, length)
        except BaseException:
            self.cut_back(offset)
            raise
        self.size += length
        self.dirty = True
        return offset

    def cut_back(self, size: int) -> None:
        """Drop bytes past ``size`` (a failed append, an aborted transaction)."""
        try:
            os.ftruncate(self.fd, size)
            self.size = size
        except OSError:  # then never append to this pack again
            self.size = PACK_LIMIT + 1

    def sync(self) -> None:
        if self.dirty:
            os.fsync(self.fd)
            self.dirty = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PackWriter:
    """Appends of this process: one pack at a time, a new one past ``PACK_LIMIT``.

    Thread-safe. Owned by the process that made it: a forked worker makes its own.
    """

    def __init__(self, pack_dir: Path, *, fsync: bool = True) -> None:
        self.pack_dir = pack_dir
        self.fsync = fsync
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._file: _PackFile | None = None

    def append(self, pieces: list[bytes | memoryview], length: int) -> tuple[str, int]:
        """Append one frame (``pieces``, consumed) in one ``writev``; (pack, offset)."""
        if os.getpid() != self._pid:
            raise StorageError("a pack writer used after a fork")
        with self._lock:
            try:
                f = self._file
                if f is None or f.size + length > PACK_LIMIT:
                    if f is not None:  # (fsynced now: its descriptor is gone at commit)
                        if self.fsync:
                            f.sync()
                        f.close()
                    f = self._file = None
                    f = self._file = _PackFile(self.pack_dir, self.fsync)
                return f.name, f.append(pieces, length)
            except OSError as exc:
                raise os_storage_error("appending to a pack file", exc, self.pack_dir) from exc

    def sync(self, packs: Sequence[str]) -> None:
        """``fsync`` the packs named (those still open; rotated ones already were)."""
        if not self.fsync:
            return
        with self._lock:
            f = self._file
            if f is not None and f.name in packs:
                try:
                    f.sync()
                except OSError as exc:
                    raise os_storage_error("syncing a pack file", exc, f.path) from exc

    def cut_back(self, pack: str, start: int, end: int) -> bool:
        """Remove ``pack``'s bytes from ``start`` if nothing was appended after ``end``."""
        with self._lock:
            f = self._file
            if f is None or f.name != pack or f.size != end:
                return False
            f.cut_back(start)
            return True

    @property
    def current(self) -> str | None:
        """The pack being appended to (locked by this process), if any."""
        f = self._file
        return None if f is None else f.name

    def close(self) -> None:
        with self._lock:
            if self._file is not None and os.getpid() == self._pid:
                self._file.close()
            self._file = None


def chunk_list(chunks: Sequence[ChunkMeta]) -> bytes:
    """A CHUNK_LIST payload: each chunk's digest and size, in order."""
    return b"".join([MEMBER.pack(c.digest.raw, c.size) for c in chunks])


class SegmentBuilder:
    """Blobs and records gathered into frames; each frame goes to ``on_frame``.

    Not thread-safe: one per transaction (or forked worker).
    """

    def __init__(
        self, writer: PackWriter, level: int, on_frame: Callable[[NewFrame], None]
    ) -> None:
        self._writer = writer
        self._level = level
        self._on_frame = on_frame
        self._blobs: list[tuple[bytes, bytes]] = []
        self._raw = 0
        self._lists: list[tuple[bytes, int, bytes]] = []  # after the blobs pending
        self._records: dict[int, list[tuple[bytes, bytes]]] = {}
        self._record_bytes: dict[int, int] = {}

    def add(self, digest: bytes, data: bytes) -> None:
        self._blobs.append((digest, data))
        self._raw += len(data)
        if self._raw >= SEGMENT_TARGET:
            self.flush_blobs()

    def add_chunk_list(self, digest: bytes, size: int, payload: bytes) -> None:
        """A large blob's chunk list: written once its chunks (added before) are."""
        if self._blobs:
            self._lists.append((digest, size, payload))
        else:
            self._write(Kind.CHUNK_LIST, [FrameMember(digest, size)], [payload], 0, payload)

    def add_records(self, kind: int, records: Sequence[tuple[bytes, bytes]], *, hold: bool) -> None:
        """Records (key, bytes) of ``kind``; with ``hold``, kept until :meth:`flush`."""
        pending = self._records.setdefault(kind, [])
        pending += records
        self._record_bytes[kind] = self._record_bytes.get(kind, 0) + sum(len(r) for _, r in records)
        if not hold and self._record_bytes[kind] >= SEGMENT_TARGET:
            self._flush_records(kind)

    def _flush_records(self, kind: int) -> None:
        records = self._records.pop(kind, [])
        self._record_bytes.pop(kind, None)
        if records:
            members = [FrameMember(k, len(r)) for k, r in records]
            self._write(kind, members, [r for _, r in records], self._level)

    def flush_blobs(self) -> None:
        blobs, self._blobs, self._raw = self._blobs, [], 0
        if blobs:
            members = [FrameMember(d, len(b)) for d, b in blobs]
            self._write(Kind.BLOBS, members, [b for _, b in blobs], self._level)
        lists, self._lists = self._lists, []
        for digest, size, payload in lists:
            self._write(Kind.CHUNK_LIST, [FrameMember(digest, size)], [payload], 0, payload)

    def flush(self) -> None:
        """Write everything pending: blobs, chunk lists, then records."""
        self.flush_blobs()
        for kind in sorted(self._records):
            self._flush_records(kind)

    def _write(
        self,
        kind: int,
        members: list[FrameMember],
        pieces: list[bytes],
        level: int,
        chunks: bytes = b"",
    ) -> Codec:
        frame = build_frame(kind, members, pieces, level)
        pack, offset = self._writer.append(frame.pieces, frame.length)
        self._on_frame(NewFrame(pack, offset, frame.length, kind, frame.members, chunks))
        return frame.codec


class Stager:
    """Blobs and chunk lists on their way into a builder, deduplicated a batch at a time.

    Presence is asked for a batch when it is full and awaited only when the
    next one is (so a forked worker reads and hashes meanwhile).
    """

    def __init__(
        self,
        builder: SegmentBuilder,
        present: Present,
        batch_bytes: int = BATCH_BYTES,
        claim: Callable[[list[bytes]], None] | None = None,
    ) -> None:
        self.builder = builder
        self._present = present
        self._claim = claim
        self._batch_bytes = batch_bytes
        self._items: list[tuple[bytes, bytes | None, int, bytes]] = []  # digest, blob | list
        self._held = 0
        self._waiting: list[
            tuple[list[tuple[bytes, bytes | None, int, bytes]], Callable[[], set[bytes]]]
        ] = []
        self.mine: set[bytes] = set()  # digests this stager sent to its builder

    def add_blob(self, digest: bytes, data: bytes) -> None:
        if data:
            self._items.append((digest, data, len(data), b""))
            self._held += len(data)
            if self._held >= self._batch_bytes:
                self.submit()

    def add_chunk_list(self, digest: bytes, size: int, payload: bytes) -> None:
        self._items.append((digest, None, size, payload))

    def submit(self) -> None:
        """Ask about the batch so far; feed the previous one, whose answer is due."""
        items, self._items, self._held = self._items, [], 0
        if items:
            raws = [d for d, *_ in items if d not in self.mine]
            self._waiting.append((items, self._present(raws) if raws else set))
        while len(self._waiting) > 1:
            self._feed(*self._waiting.pop(0))

    def flush(self) -> None:
        """Feed every batch to the builder (it still holds the last segment)."""
        self.submit()
        while self._waiting:
            self._feed(*self._waiting.pop(0))

    def _feed(
        self,
        items: list[tuple[bytes, bytes | None, int, bytes]],
        answer: Callable[[], set[bytes]],
    ) -> None:
        present = answer()
        new: list[bytes] = []
        received = stored = 0
        for digest, data, size, payload in items:
            if data is not None:
                received += size
            if digest in present or digest in self.mine:
                continue
            self.mine.add(digest)
            new.append(digest)
            if data is None:
                self.builder.add_chunk_list(digest, size, payload)
            else:
                stored += size
                self.builder.add(digest, data)
        if new and self._claim is not None:
            self._claim(new)
        observe.blobs_written(received, stored)


def _add_chunk(data: bytes | memoryview, chunks: list[ChunkMeta], stager: Stager) -> bytes:
    chunk = bytes(data)  # (a cutter's view is only valid until its next chunk)
    digest = blake3.blake3(chunk).digest()
    chunks.append(ChunkMeta(B3Digest(digest), len(chunk)))
    stager.add_blob(digest, chunk)
    return chunk


def cut_file(
    chunker: object, path: str | bytes, size: int, stager: Stager
) -> tuple[B3Digest, list[ChunkMeta]]:
    """Cut a large file as the chunk store would (FastCDC), staging each chunk."""
    hasher = blake3.blake3(max_threads=hash_threads())
    chunks: list[ChunkMeta] = []
    total = 0
    with open(path, "rb") as f:
        for c in chunker.cut_stream(f):  # type: ignore[attr-defined]
            chunk = _add_chunk(c.data, chunks, stager)
            hasher.update(chunk)
            total += len(chunk)
    if total != size:
        raise ValueError(f"file changed size while reading ({total} != {size})")
    return B3Digest(hasher.digest()), chunks


def read_files(
    files: Sequence[tuple[str | bytes, int]], threshold: int, chunker: object, stager: Stager
) -> list[B3Digest | Exception]:
    """Read and hash files (those above ``threshold`` cut into chunks) into ``stager``.

    Per file its digest or the ``OSError``/``ValueError``. The caller
    flushes the stager.
    """
    out: list[B3Digest | Exception] = []
    for path, size in files:
        try:
            if size > threshold:
                digest, chunks = cut_file(chunker, path, size, stager)
                if len(chunks) > 1:  # (a one-chunk blob is its chunk)
                    stager.add_chunk_list(digest.raw, size, chunk_list(chunks))
                out.append(digest)
                continue
            data = read_file(path, size)
            digest = B3Digest(blake3.blake3(data).digest())
            stager.add_blob(digest.raw, data)
            out.append(digest)
        except (OSError, ValueError) as exc:
            out.append(exc)
    return out
