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

import bisect
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import queue
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from tvix_castore.blobservice.base import writev_all
from tvix_castore.digests import B3Digest
from tvix_castore.errors import DataCorruption
from tvix_castore.forked import fork_child, usable_cpus, want_fork
from tvix_castore.lazy import lazy_module
from tvix_castore.packstore.forkdecode import ForkedDecoder
from tvix_castore.packstore.reader import (
    Chunked,
    DecodedFrame,
    FrameRef,
    Location,
    Member,
    PackReader,
)
from tvix_store.nar.dirplan import FileRef, Hint, Piece, files_of
from tvix_store.nar.render import NarRenderError

if TYPE_CHECKING:
    import asyncio
else:
    asyncio = lazy_module("asyncio")  # not needed to write a NAR from its plan

__all__ = [
    "Checked",
    "Sha256Job",
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
_AHEAD = 3  # frames decoded ahead of the writer
_AHEAD_FORKED = 4  # the same, decoded by forked children (two each)
_THREADS = 2  # helper threads decoding them (zstd and blake3 release the GIL)
_HOLD_FRAMES = 16  # frames a NAR writer holds decoded (~4 MiB each: 64 MiB)
_HOLD_FORKED = 32  # the same, in slots of shared memory (an import's workers' frames interleave)
_QUEUE = 4  # pieces a server's writer thread may run ahead of the response

_FORK_MIN = 32 << 20  # NARs this large are hashed in a forked child (see Sha256Job)
_FORK_DECODE_MIN = 32 << 20  # NARs this large have their frames decoded by forked children
_FORK_WORKERS = 2
_LATE_MAX = 1 << 20  # blobs read long after their frame, this small, are copied out early
_LATE_BUDGET = 64 << 20  # bytes of such copies per NAR
_LATE_GAP = 16 << 20  # "long after": this many bytes of other files read in between
_log = logging.getLogger(__name__)

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

    def __init__(self, sink: Sink, flush_bytes: int, flushed: Callable[[], None]) -> None:
        self._sink = sink
        self._flush_bytes = flush_bytes
        self._flushed = flushed
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
            self._flushed()
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

    def fresh_hints(self) -> dict[bytes, Hint]:
        """Hints for the files that had to be located (their hint was stale, or none)."""
        return hints_of(self._located)

    def all_in_frames(self) -> bool:
        """Whether every located blob (and chunk) is in a v2 frame (no legacy layout)."""
        return all(isinstance(loc, Member | Chunked) for loc in self._located.values())

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

    def frame_of(self, f: FileRef) -> FrameRef | None:
        """The frame a file is read from (``None``: chunked, or not in a v2 frame)."""
        ref = self._frames.get(f.hint.frame)
        if ref is not None:
            return ref
        loc = self._located.get(f.digest)
        return loc.frame if isinstance(loc, Member) else None

    def uses(self, files: Sequence[FileRef], late: _Late) -> list[FrameRef]:
        """The frames the files are read from, in reading order (repeats collapsed).

        The ``late`` files are left out: copies are read for them.
        """
        out: list[FrameRef] = []
        last: FrameRef | None = None
        skip = late.at
        for i, f in enumerate(files):
            if i in skip:
                continue  # (late: see _Late)
            ref = self._frames.get(f.hint.frame)
            refs: list[FrameRef] = []
            if ref is not None:
                refs.append(ref)
            else:
                loc = self._located.get(f.digest)
                if isinstance(loc, Member):
                    refs.append(loc.frame)
                elif isinstance(loc, Chunked):
                    for c in loc.chunks:
                        cloc = self._located.get(c.digest.raw)
                        if isinstance(cloc, Member):
                            refs.append(cloc.frame)
            for ref in refs:
                if ref != last:
                    out.append(ref)
                    last = ref
        return out

    def pieces(self, f: FileRef, frames: _Frames, is_late: bool) -> Iterator[bytes | memoryview]:
        """The file's verified bytes (a chunk at a time for a large one).

        ``is_late``: the file is one :class:`_Late` copies out.
        """
        late = frames.late
        if is_late:
            copy = late.take(f.digest)
            if copy is not None:
                yield copy
                return
        yield from self._pieces(f, frames)
        if late.by_frame:
            ref = self.frame_of(f)
            if ref is not None and ref in late.by_frame:
                decoded = frames.get(ref)
                late.copy_out(ref, lambda lf: self._copy(lf, ref, decoded))

    def _copy(self, f: FileRef, ref: FrameRef, decoded: DecodedFrame | None) -> bytes:
        """A late file's verified bytes, out of its frame."""
        offset = f.hint.offset if f.hint.frame == ref.id else None
        if offset is None:
            loc = self._located.get(f.digest)
            assert isinstance(loc, Member)
            offset = loc.offset
        return bytes(self._reader.member(f.digest, Member(ref, offset, f.size), decoded))

    def _pieces(self, f: FileRef, frames: _Frames) -> Iterator[bytes | memoryview]:
        reader = self._reader
        ref = self._frames.get(f.hint.frame)
        if ref is not None:
            hinted = Member(ref, f.hint.offset, f.size)
            try:
                yield reader.member(f.digest, hinted, frames.get(ref))
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
            yield from self._chunks(f.digest, loc, frames)
        elif isinstance(loc, Member):
            yield reader.member(f.digest, loc, frames.get(loc.frame))
        else:
            yield reader.read_located(f.digest, loc)

    def _chunks(self, digest: bytes, loc: Chunked, frames: _Frames) -> Iterator[bytes | memoryview]:
        for c in loc.chunks:
            cloc = self._located.get(c.digest.raw)
            if cloc is None:
                cloc = self._reader.locate([c.digest.raw]).get(c.digest.raw)
            if cloc is None or isinstance(cloc, Chunked) or cloc.size != c.size:
                raise NarRenderError(
                    f"failed rendering nar: blob {B3Digest(digest)}: chunk {c.digest} is missing"
                )
            if isinstance(cloc, Member):
                yield self._reader.member(c.digest.raw, cloc, frames.get(cloc.frame))
            else:
                yield self._reader.read_located(c.digest.raw, cloc)


class _Late:
    """Small blobs read long after their frame: copied out while it is decoded anyway.

    A frame's members are mostly read close together, but a tree holds files
    stored once and found all over it (licences, empty modules, test data),
    and an import's workers leave some segments open across far-apart parts
    of a NAR. Keeping such a frame decoded for a few late kilobytes, or
    decoding it again, stalls the writer; instead, the first time a frame is
    read, the members it will be asked for again only after ``_LATE_GAP``
    bytes of other files are copied (``_LATE_MAX`` each, ``_LATE_BUDGET`` in
    all per NAR), and those later reads take the copies.
    """

    def __init__(
        self, files: Sequence[FileRef], frame_of: Callable[[FileRef], FrameRef | None]
    ) -> None:
        self.by_frame: dict[FrameRef, list[FileRef]] = {}  # late files, to copy out
        self.reads: dict[bytes, int] = {}  # digest -> late reads left
        self.at: set[int] = set()  # the late files' positions in ``files``
        last: dict[FrameRef, int] = {}  # frame -> where (in file bytes) it was last read
        at = 0
        budget = _LATE_BUDGET
        for i, f in enumerate(files):
            at += f.size
            ref = frame_of(f)
            if ref is None:
                continue
            before = last.get(ref)
            if before is None or at - before <= _LATE_GAP or not 0 < f.size <= _LATE_MAX:
                last[ref] = at
                continue
            if f.digest in self.reads:
                self.reads[f.digest] += 1
                self.at.add(i)
            elif f.size <= budget:
                budget -= f.size
                self.reads[f.digest] = 1
                self.at.add(i)
                self.by_frame.setdefault(ref, []).append(f)
        self._copies: dict[bytes, bytes] = {}

    def take(self, digest: bytes) -> bytes | None:
        """The copy of a late blob (dropped after its last read); ``None`` if not copied."""
        data = self._copies.get(digest)
        if data is not None:
            self.reads[digest] -= 1
            if not self.reads[digest]:
                del self._copies[digest]
        return data

    def copy_out(self, ref: FrameRef, read: Callable[[FileRef], bytes]) -> None:
        """``ref`` is being read for the first time: copy its late members."""
        for f in self.by_frame.pop(ref, ()):
            if f.digest not in self._copies:
                self._copies[f.digest] = read(f)


class _Frames:
    """The frames a NAR reads, each decoded once, ahead, and held until its last use.

    One helper thread decodes the next frames while the writer writes; a frame
    is held until the plan says it is not read again, ``_HOLD_FRAMES`` at most.

    Imports interleave their forked workers' segments, so a NAR reads from
    several frames at once; a small shared cache would decode some many times.
    Past the budget, the held frame needed again last is dropped (and decoded
    again when it is: memory stays bounded whatever the order). A read that does
    not follow the plan (a stale hint) just gets no frame and goes through the
    reader.
    """

    def __init__(
        self, reader: PackReader, uses: list[FrameRef], late: _Late, *, fork: bool
    ) -> None:
        self._reader = reader
        self.late = late
        self._uses = uses
        self._at: dict[FrameRef, list[int]] = {}
        for i, ref in enumerate(uses):
            self._at.setdefault(ref, []).append(i)
        self._order = list(self._at)  # by first use
        self._rank = {ref: i for i, ref in enumerate(self._order)}
        self._next = 0  # of _order: the next to decode ahead
        self._reached = -1  # of _order: the last one read from so far
        self._pos = -1  # of uses
        self._held: dict[FrameRef, _Decoding] = {}
        self._forked: ForkedDecoder | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._ahead_frames = _AHEAD
        self._hold = _HOLD_FRAMES
        if fork and len(self._order) > 2:
            self._ahead_frames = _AHEAD_FORKED
            self._hold = _HOLD_FORKED
            self._forked = ForkedDecoder(
                reader,
                workers=max(1, min(_FORK_WORKERS, usable_cpus())),
                slots=_HOLD_FORKED + _AHEAD_FORKED + 4,  # (+ those released, not flushed)
            )
        elif len(self._order) > 1:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                _THREADS, thread_name_prefix="nar-frames"
            )
        self._ahead()

    def _next_use(self, ref: FrameRef) -> int:
        at = self._at[ref]
        i = bisect.bisect_left(at, self._pos)
        return at[i] if i < len(at) else -1

    def _submit(self, ref: FrameRef) -> None:
        if self._forked is not None and self._forked.submit(ref):
            self._held[ref] = _ForkDecoding(self._forked, self._reader, ref)
            return
        if self._pool is None:
            future: concurrent.futures.Future[DecodedFrame | None] = concurrent.futures.Future()
            future.set_result(self._reader.decode(ref))
        else:
            future = self._pool.submit(self._reader.decode, ref)
        self._held[ref] = future

    def _drop(self, ref: FrameRef) -> None:
        del self._held[ref]
        if self._forked is not None:
            self._forked.release(ref)

    def flushed(self) -> None:
        """The sink has consumed every piece handed to it (their frames' memory is free)."""
        if self._forked is not None:
            self._forked.flushed()

    def _ahead(self) -> None:
        """Decode ahead the ``_AHEAD`` frames first read after those read so far."""
        order = self._order
        while (
            self._next < len(order)
            and self._next <= self._reached + self._ahead_frames
            and len(self._held) < self._hold
        ):
            ref = order[self._next]
            if ref not in self._held:
                self._submit(ref)
            self._next += 1

    def get(self, ref: FrameRef) -> DecodedFrame | None:
        """The writer reads from ``ref`` now: its decoded frame (``None``: read it plainly)."""
        uses = self._uses
        pos = self._pos
        if not (0 <= pos < len(uses) and uses[pos] == ref):
            if pos + 1 < len(uses) and uses[pos + 1] == ref:
                pos = self._pos = pos + 1
                self._advanced(ref, pos)
            else:
                return None  # (off the plan)
        future = self._held.get(ref)
        if future is None:
            self._submit(ref)
            future = self._held[ref]
        return future.result()

    def _advanced(self, ref: FrameRef, pos: int) -> None:
        self._reached = max(self._reached, self._rank[ref])
        self._next = max(self._next, self._reached + 1)
        for other in [r for r in self._held if r != ref and self._at[r][-1] < pos]:
            self._drop(other)  # (not needed again)
        while len(self._held) > self._hold:  # (drop the one needed again last)
            uses = {r: self._next_use(r) for r in self._held if r != ref}
            drop = max(uses, key=lambda r: uses[r] if uses[r] >= 0 else len(self._uses))
            self._drop(drop)
        self._ahead()

    def close(self) -> None:
        if self._pool is not None:
            for future in self._held.values():
                future.cancel()
            self._pool.shutdown(wait=True)
        self._held.clear()
        if self._forked is not None:
            self._forked.close()


class _Decoding(Protocol):
    def result(self) -> DecodedFrame | None: ...

    def cancel(self) -> bool: ...


class _ForkDecoding:
    """A frame a forked child decodes; decoded here if it could not be (see ForkedDecoder)."""

    def __init__(self, forked: ForkedDecoder, reader: PackReader, ref: FrameRef) -> None:
        self._forked = forked
        self._reader = reader
        self._ref = ref
        self._done = False
        self._value: DecodedFrame | None = None

    def result(self) -> DecodedFrame | None:
        if not self._done:
            self._value = self._forked.result(self._ref)
            if self._value is None:
                self._value = self._reader.decode(self._ref)
            self._done = True
        return self._value

    def cancel(self) -> bool:
        return False


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
    fork: bool | None = None,
) -> None:
    """Write the NAR of ``pieces`` into ``sink`` (blocking).

    ``fork``: whether forked children decode the frames (see
    :mod:`tvix_castore.packstore.forkdecode`); by default a large NAR's are,
    when :func:`~tvix_castore.forked.want_fork` says so.

    Raises:
        NarRenderError: a blob is missing or of the wrong size.
        DataCorruption: a blob's bytes are damaged (naming the blob).
    """
    try:
        _write(reader, pieces, sink, flush_bytes, checked, fork)
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
    fork: bool | None,
) -> None:
    files = files_of(pieces)
    blobs = checked.blobs if checked is not None else _Blobs(reader, files)
    large = sum(f.size for f in files) >= _FORK_DECODE_MIN
    late = _Late(files, blobs.frame_of)
    frames = _Frames(reader, blobs.uses(files, late), late, fork=want_fork(fork, large=large))
    out = _Out(sink, flush_bytes, frames.flushed)
    try:
        add = out.add
        late_at = late.at
        i = -1
        for piece in pieces:
            if not isinstance(piece, FileRef):
                add(piece)
                continue
            i += 1
            for part in blobs.pieces(piece, frames, i in late_at):
                add(part)
        out.flush()
    finally:
        frames.close()


def write_to_fd(
    reader: PackReader, pieces: Sequence[Piece], fd: int, checked: Checked | None = None
) -> None:
    """:func:`write_pieces` into a file descriptor (``checked``: located already)."""
    write_pieces(reader, pieces, lambda iov, total: writev_all(fd, iov, total), checked=checked)


def sha256_of(reader: PackReader, pieces: Sequence[Piece]) -> bytes:
    """The sha256 of the NAR of ``pieces``, read (and verified) from the packs."""
    return _sha256(reader, pieces, None, None)


def _sha256(
    reader: PackReader, pieces: Sequence[Piece], checked: Checked | None, fork: bool | None
) -> bytes:
    sha = hashlib.sha256()
    update = sha.update

    def sink(iov: list[bytes | memoryview], total: int) -> None:
        # One update per batch: hashlib releases the GIL for it (not for the
        # small updates that tens of thousands of small files would make).
        update(iov[0] if len(iov) == 1 else b"".join(iov))

    write_pieces(reader, pieces, sink, checked=checked, fork=fork)
    return sha.digest()


class _NoIndex:
    """A forked hasher's index: none (a SQLite connection must not cross a fork)."""

    def __getattr__(self, name: str) -> object:
        raise DataCorruption("a blob not where located (not looked up again in a forked hasher)")


class Sha256Job:
    """The sha256 of the NAR of ``pieces``, read (and verified) from the packs, started now.

    A large NAR is hashed by a forked child (``fork``: see
    :func:`~tvix_castore.forked.want_fork`), so the caller's Python work (building
    Directories) runs beside it: threads would contend for the GIL on tens of
    thousands of small reads. The blobs are located here, before the fork; the
    child decodes and verifies every frame as this process would, and only
    hashes. If anything is off the plan (a blob not where located, damage, the
    child failing), :meth:`result` hashes here instead, which locates again and
    raises what a NAR writer raises.
    """

    def __init__(
        self, reader: PackReader, pieces: Sequence[Piece], *, fork: bool | None = None
    ) -> None:
        self._reader = reader
        self._pieces = pieces
        self._pid = 0
        self._pipe = -1
        size = sum(len(p) if not isinstance(p, FileRef) else p.size for p in pieces)
        if not want_fork(fork, large=size >= _FORK_MIN):
            return
        checked = Checked(reader, files_of(pieces))
        if checked.problem is not None or not checked.blobs.all_in_frames():
            return
        r, w = os.pipe()

        def main() -> int:
            reader.index = _NoIndex()  # type: ignore[assignment]
            reader.legacy = None
            os.write(w, _sha256(reader, pieces, checked, False))  # (no grandchildren)
            return 0

        self._pid = fork_child(main, lambda exc: None, (r,))
        os.close(w)
        self._pipe = r

    def result(self) -> bytes:
        """The sha256 (blocking); ``NarRenderError``/``DataCorruption`` as :func:`sha256_of`."""
        if self._pid:
            data = b""
            try:
                while len(data) < 32 and (more := os.read(self._pipe, 32 - len(data))):
                    data += more
            finally:
                self.close()
            if len(data) == 32:
                return data
            _log.debug("hashing the NAR in this process (the forked hasher failed)")
        return sha256_of(self._reader, self._pieces)

    def close(self) -> None:
        """Stop the child, if any (blocking)."""
        if self._pid:
            pid, self._pid = self._pid, 0
            os.close(self._pipe)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


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
