"""Writing a NAR from its plans: blob contents read through the shared PackReader.

The pieces of a NAR (:func:`tvix_store.nar.dirplan.flatten`) are literal bytes
and files. A file's location hint (frame id and member offset) saves an index
query per file: all hinted frames are looked up in one query, and only blobs
without a usable hint are located. A hint gone stale (compaction moved the
blob, or its frame id now names another frame) is noticed by the reader's
member check and falls back to :meth:`PackReader.locate`. Every byte comes
from a decoded frame whose checksum was verified, so a damaged frame is an
error naming the blob, never wrong bytes.

Uploads and imports are packed in NAR order, so a NAR reads its frames one
after the other: a helper thread decodes the next frames while this one
writes, and the reader's cache hands them over.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from tvix_castore.blobservice.base import writev_all
from tvix_castore.digests import B3Digest
from tvix_castore.errors import CastoreError, DataCorruption
from tvix_castore.lazy import lazy_module
from tvix_castore.packstore.reader import Chunked, FrameRef, Location, Member, PackReader
from tvix_store.nar.dirplan import FileRef, Hint, Piece, files_of
from tvix_store.nar.render import NarRenderError

if TYPE_CHECKING:
    import asyncio
else:
    asyncio = lazy_module("asyncio")  # not needed to write a NAR from its plan

__all__ = [
    "Checked",
    "Sink",
    "hints_of",
    "pieces_stream",
    "problem_of",
    "sha256_of",
    "write_pieces",
    "write_to_fd",
]

_IOV_MAX = 1000  # below the kernel's 1024
_FLUSH_BYTES = 8 << 20
_SERVER_PIECE = 1 << 20  # a server's pieces (memory per download stays a few MiB)
_AHEAD = 2  # frames decoded ahead of the writer (the reader keeps the last 4)
_QUEUE = 4  # pieces a server's writer thread may run ahead of the response

Sink = Callable[[list[bytes | memoryview], int], None]
"""Takes a batch of pieces and their total length."""


def hints_of(located: dict[bytes, Location]) -> dict[bytes, Hint]:
    """Location hints of the blobs located inside v2 frames (the others get none)."""
    return {
        raw: Hint(loc.frame.id, loc.offset)
        for raw, loc in located.items()
        if isinstance(loc, Member)
    }


class _Out:
    """Gathers pieces and hands them to ``sink`` in large batches."""

    def __init__(self, sink: Sink, flush_bytes: int) -> None:
        self._sink = sink
        self._flush_bytes = flush_bytes
        self._iov: list[bytes | memoryview] = []
        self._bytes = 0

    def add(self, piece: bytes | memoryview) -> None:
        self._iov.append(piece)
        self._bytes += len(piece)
        if len(self._iov) >= _IOV_MAX or self._bytes >= self._flush_bytes:
            self.flush()

    def flush(self) -> None:
        if self._iov:
            self._sink(self._iov, self._bytes)
        self._iov, self._bytes = [], 0


class _Blobs:
    """Where the files of one NAR are: hints checked in one query, the rest located."""

    def __init__(self, reader: PackReader, files: Sequence[FileRef]) -> None:
        self._reader = reader
        ids = {f.hint.frame for f in files if f.hint.frame}
        self._frames: dict[int, FrameRef] = reader.frame_by_id(list(ids)) if ids else {}
        need = [f.digest for f in files if f.hint.frame not in self._frames]
        self._located: dict[bytes, Location] = reader.locate(need) if need else {}
        chunks = [
            c.digest.raw
            for loc in self._located.values()
            if isinstance(loc, Chunked)
            for c in loc.chunks
        ]
        if chunks:
            self._located.update(reader.locate([c for c in chunks if c not in self._located]))

    def problem(self, files: Sequence[FileRef]) -> str | None:
        """Why some file cannot be read, without reading (see :meth:`PackReader.problem`)."""
        reader = self._reader
        hinted: dict[bytes, Location] = {}
        other: list[bytes] = []
        for f in files:
            ref = self._frames.get(f.hint.frame)
            if ref is not None:
                hinted[f.digest] = Member(ref, f.hint.offset, f.size)
                continue
            loc = self._located.get(f.digest)
            if loc is None:
                return f"blob {B3Digest(f.digest)} is not in the store"
            if loc.size != f.size:
                return f"blob {B3Digest(f.digest)} has {loc.size} bytes, the NAR has {f.size}"
            if isinstance(loc, Member):
                hinted[f.digest] = loc
            else:
                other.append(f.digest)
        intact = reader.intact(hinted)
        for raw, loc in hinted.items():
            if raw not in intact:
                assert isinstance(loc, Member)
                return f"blob {B3Digest(raw)}: pack file {loc.frame.pack} is missing or truncated"
        return reader.problem(other) if other else None

    def frame_order(self, files: Sequence[FileRef]) -> list[FrameRef]:
        """The frames the files are read from, in the order first read."""
        seen: dict[FrameRef, None] = {}
        for f in files:
            ref = self._frames.get(f.hint.frame)
            if ref is None:
                loc = self._located.get(f.digest)
                ref = loc.frame if isinstance(loc, Member) else None
            if ref is not None:
                seen.setdefault(ref)
        return list(seen)

    def frame_of(self, f: FileRef) -> FrameRef | None:
        ref = self._frames.get(f.hint.frame)
        if ref is not None:
            return ref
        loc = self._located.get(f.digest)
        return loc.frame if isinstance(loc, Member) else None

    def pieces(self, f: FileRef) -> Iterator[bytes | memoryview]:
        """The file's verified bytes (a chunk at a time for a large one)."""
        reader = self._reader
        ref = self._frames.get(f.hint.frame)
        if ref is not None:
            hinted = Member(ref, f.hint.offset, f.size)
            try:
                yield reader.member(f.digest, hinted)
                return
            except DataCorruption:  # a stale hint, or damage: the index says which
                loc = reader.locate([f.digest]).get(f.digest)
                if loc is None or loc == hinted:
                    raise
                self._located[f.digest] = loc
        loc = self._located.get(f.digest)
        if loc is None:
            raise NarRenderError(f"failed rendering nar: blob {B3Digest(f.digest)} not found")
        if loc.size != f.size:
            raise NarRenderError(
                f"failed rendering nar: blob {B3Digest(f.digest)} has {loc.size} bytes,"
                f" expected {f.size}"
            )
        if isinstance(loc, Chunked):
            yield from self._chunks(f.digest, loc)
        elif isinstance(loc, Member):
            yield reader.member(f.digest, loc)
        else:
            yield reader.read_located(f.digest, loc)

    def _chunks(self, digest: bytes, loc: Chunked) -> Iterator[bytes | memoryview]:
        for c in loc.chunks:
            cloc = self._located.get(c.digest.raw)
            if cloc is None:
                cloc = self._reader.locate([c.digest.raw]).get(c.digest.raw)
            if cloc is None or isinstance(cloc, Chunked) or cloc.size != c.size:
                raise NarRenderError(
                    f"failed rendering nar: blob {B3Digest(digest)}: chunk {c.digest} is missing"
                )
            if isinstance(cloc, Member):
                yield self._reader.member(c.digest.raw, cloc)
            else:
                yield self._reader.read_located(c.digest.raw, cloc)


class _Ahead:
    """Decodes the frames a NAR reads next in helper threads (the reader caches them)."""

    def __init__(self, reader: PackReader, order: list[FrameRef]) -> None:
        self._reader = reader
        self._order = order
        self._next = 0
        self._futures: dict[FrameRef, concurrent.futures.Future[object]] = {}
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(_AHEAD, thread_name_prefix="nar-frames")
            if len(order) > 1
            else None
        )
        self._fill(0)

    def _decode(self, ref: FrameRef) -> object:
        with contextlib.suppress(CastoreError):  # the writer meets (and reports) it itself
            self._reader.payload(ref)
        return None

    def _fill(self, at: int) -> None:
        if self._pool is None:
            return
        while self._next < len(self._order) and self._next <= at + _AHEAD:
            ref = self._order[self._next]
            self._futures[ref] = self._pool.submit(self._decode, ref)
            self._next += 1

    def reached(self, ref: FrameRef) -> None:
        """The writer is about to read ``ref``: wait for its decoding, start the next ones."""
        future = self._futures.pop(ref, None)
        if future is None:
            return
        future.result()
        with contextlib.suppress(ValueError):
            self._fill(self._order.index(ref))

    def close(self) -> None:
        if self._pool is not None:
            for future in self._futures.values():
                future.cancel()
            self._pool.shutdown(wait=True)


class Checked:
    """The files of a NAR, located (hints checked in one query) and found readable."""

    def __init__(self, reader: PackReader, files: Sequence[FileRef]) -> None:
        self.blobs = _Blobs(reader, files)
        self.problem = self.blobs.problem(files)


def problem_of(reader: PackReader, files: Sequence[FileRef]) -> str | None:
    """Why some of ``files`` cannot be read, or ``None`` (blocking; reads nothing).

    What a server checks before it sends headers: each blob is indexed (or its
    hint names a frame the index has), and its pack is there and long enough.
    The bytes themselves are verified as they are written.
    """
    return Checked(reader, files).problem


def write_pieces(
    reader: PackReader,
    pieces: Sequence[Piece],
    sink: Sink,
    *,
    flush_bytes: int = _FLUSH_BYTES,
    checked: Checked | None = None,
) -> None:
    """Write the NAR of ``pieces`` into ``sink`` (blocking).

    Raises:
        NarRenderError: a blob is missing or of the wrong size.
        DataCorruption: a blob's bytes are damaged (naming the blob).
    """
    try:
        _write(reader, pieces, sink, flush_bytes, checked)
    except NarRenderError:
        raise
    except DataCorruption as exc:  # (as a render reports it)
        raise NarRenderError(f"failed rendering nar: {exc}") from exc


def _write(
    reader: PackReader,
    pieces: Sequence[Piece],
    sink: Sink,
    flush_bytes: int,
    checked: Checked | None,
) -> None:
    files = files_of(pieces)
    blobs = checked.blobs if checked is not None else _Blobs(reader, files)
    ahead = _Ahead(reader, blobs.frame_order(files))
    out = _Out(sink, flush_bytes)
    current: FrameRef | None = None
    try:
        add = out.add
        for piece in pieces:
            if not isinstance(piece, FileRef):
                add(piece)
                continue
            ref = blobs.frame_of(piece)
            if ref is not None and ref != current:
                current = ref
                ahead.reached(ref)
            for part in blobs.pieces(piece):
                add(part)
        out.flush()
    finally:
        ahead.close()


def write_to_fd(
    reader: PackReader, pieces: Sequence[Piece], fd: int, checked: Checked | None = None
) -> None:
    """:func:`write_pieces` into a file descriptor (``checked``: located already)."""
    write_pieces(reader, pieces, lambda iov, total: writev_all(fd, iov, total), checked=checked)


def sha256_of(reader: PackReader, pieces: Sequence[Piece]) -> bytes:
    """The sha256 of the NAR of ``pieces``, read (and verified) from the packs."""
    sha = hashlib.sha256()
    update = sha.update

    def sink(iov: list[bytes | memoryview], total: int) -> None:
        for part in iov:
            update(part)

    write_pieces(reader, pieces, sink)
    return sha.digest()


class _Stopped(Exception):
    """The consumer of a planned stream went away."""


async def pieces_stream(reader: PackReader, pieces: Sequence[Piece]) -> AsyncIterator[bytes]:
    """The NAR written by a thread in pieces of about 1 MiB, a few ahead of the response.

    An error there is raised by the iterator, after the bytes before it.
    """
    out: queue.Queue[bytes | BaseException | None] = queue.Queue(_QUEUE)
    stop = threading.Event()

    def sink(iov: list[bytes | memoryview], total: int) -> None:
        piece = b"".join(iov)
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                out.put(piece, timeout=0.1)
                return
        raise _Stopped

    def write() -> None:
        try:
            write_pieces(reader, pieces, sink, flush_bytes=_SERVER_PIECE)
        except _Stopped:
            return
        except BaseException as exc:  # raised on the loop side
            out.put(exc)
            return
        out.put(None)

    writer = asyncio.ensure_future(asyncio.to_thread(write))
    try:
        while (piece := await asyncio.to_thread(out.get)) is not None:
            if isinstance(piece, BaseException):
                raise piece
            yield piece
    finally:
        stop.set()  # a writer still running stops at its next piece
        await writer
