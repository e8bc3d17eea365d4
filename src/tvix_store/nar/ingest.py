"""NAR → castore (B §4.4), streaming, with NarHash/NarSize computed on the way.

The NAR is parsed by :mod:`nix_compat.nar.reader` in a worker thread (the
parser and sha256 run off the event loop); the loop side uploads blobs — small
files concurrently with a bound on count and bytes in flight, large files
streamed — and sends all Directories of the NAR through **one** putter
(each as soon as its files are stored), committed only after the whole NAR
parsed, its size and hash checked, and every blob is stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Coroutine, MutableMapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from nix_compat.errors import NarError
from nix_compat.nar import NarDirectory, NarDirectoryEnd, NarFile, NarSymlink
from nix_compat.nar.reader import NarReader
from tvix_castore.blobservice.base import BlobService
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import DataCorruption, ValidationError
from tvix_castore.nodes import (
    Directory,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    check_directory_size,
)
from tvix_store.compression import TooLarge

__all__ = ["IngestedNar", "InvalidNar", "NarMismatch", "ingest_nar", "ingest_nar_file"]

_SMALL = 1 << 20  # files up to this are read whole and uploaded in batches
_BATCH_FILES = 256
_BATCH_UPLOAD_BYTES = 8 << 20
_MAX_BATCHES_IN_FLIGHT = 2  # bounds memory: ~2 × 8 MiB of small files being stored
_QUEUED = 8  # batches of operations (≤ 1 MiB each) between parser and loop
_BATCH_BYTES = 1 << 20
_BATCH_OPS = 256
_PIECE = 1 << 18  # bytes of NAR handed to the parser thread at a time

Read = Callable[[int], Coroutine[Any, Any, bytes]]


class InvalidNar(ValidationError):
    """The uploaded bytes are not a valid NAR (offset in the message)."""


class NarMismatch(DataCorruption):
    """A NAR's size or sha256 differs from what it was announced with."""


@dataclass(frozen=True, slots=True)
class IngestedNar:
    """What ingesting a NAR produced: the nameless root node, NAR size and sha256."""

    node: Node
    nar_size: int
    nar_sha256: bytes


# Operations sent from the parser thread to the loop.
@dataclass(slots=True)
class _SmallFile:
    name: bytes
    executable: bool
    data: bytes


@dataclass(slots=True)
class _BigStart:
    name: bytes
    executable: bool
    size: int


@dataclass(slots=True)
class _Chunk:
    data: bytes


@dataclass(slots=True)
class _BigEnd:
    pass


@dataclass(slots=True)
class _Link:
    name: bytes
    target: bytes


@dataclass(slots=True)
class _DirStart:
    name: bytes


@dataclass(slots=True)
class _DirEnd:
    pass


_Op = _SmallFile | _BigStart | _Chunk | _BigEnd | _Link | _DirStart | _DirEnd


@dataclass(slots=True, eq=False)
class _Frame:
    """A directory being parsed: its entries, some still uploading or unbuilt."""

    name: bytes
    entries: list[_Entry] = field(default_factory=list)
    pending: int = 0  # entries that are files still uploading
    node: DirectoryNode | None = None  # once built


@dataclass(slots=True, eq=False)
class _Slot:
    """A small file in an upload batch: its node once the batch is stored."""

    node: FileNode | None = None


_Entry = Node | _Slot | _Frame


class _Stop(Exception):
    """The loop side gave up; the parser thread should stop quietly."""


class _ThreadSource:
    """Blocking ``read`` for the parser thread, fed by the loop; hashes what passes.

    The loop gathers the source's pieces (a network body comes in 64–256 KiB)
    into pieces of about ``_PIECE`` bytes, one thread hop each, and reads one
    piece ahead while the parser works on the last: receiving overlaps
    parsing, and at most two pieces are held. (1 MiB pieces were no faster and
    raised the peak RSS of a 834 MB upload by ~20 MiB: heap fragmentation.)
    """

    def __init__(self, read: Read, loop: asyncio.AbstractEventLoop, stop: threading.Event) -> None:
        self._read = read
        self._loop = loop
        self._stop = stop
        self._ahead: concurrent.futures.Future[bytes] | None = None
        self._eof = False
        self._closed = False  # (loop side)
        self._task: asyncio.Task[Any] | None = None  # the gathering read, if any
        self.hasher = hashlib.sha256()
        self.size = 0

    async def _gather(self) -> bytes:
        if self._closed:
            return b""
        self._task = asyncio.current_task()
        parts: list[bytes] = []
        size = 0
        while size < _PIECE:
            part = await self._read(_PIECE - size)
            if not part:
                break
            parts.append(part)
            size += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read(self, n: int = -1, /) -> bytes:
        if self._stop.is_set():
            raise _Stop
        if self._eof:
            return b""
        ahead = self._ahead
        if ahead is None:
            ahead = asyncio.run_coroutine_threadsafe(self._gather(), self._loop)
        try:
            data = ahead.result()  # (the source's errors propagate)
        except concurrent.futures.CancelledError:
            raise _Stop from None
        if self._stop.is_set():
            raise _Stop
        if data:
            self._ahead = asyncio.run_coroutine_threadsafe(self._gather(), self._loop)
        else:
            self._ahead, self._eof = None, True
        self.hasher.update(data)
        self.size += len(data)
        return data

    async def aclose(self) -> None:
        """Stop reading ahead (on the loop): no read of the source is left running."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _name(path: bytes) -> bytes:
    return path.rpartition(b"/")[2]


def _parse(source: _ThreadSource, emit: Callable[[list[_Op]], None], max_size: int | None) -> None:
    """Parser thread: turn NAR events into batches of operations."""
    batch: list[_Op] = []
    batch_bytes = 0

    def push(op: _Op, nbytes: int = 0) -> None:
        nonlocal batch, batch_bytes
        batch.append(op)
        batch_bytes += nbytes
        if batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_OPS:
            emit(batch)
            batch, batch_bytes = [], 0

    nar = NarReader(source)
    for ev in nar:
        if isinstance(ev, NarFile):
            if max_size is not None and nar.offset + ev.size > max_size:
                # Refused on the header's word: no need to read gigabytes first.
                raise TooLarge(
                    f"NAR declares a file of {ev.size} bytes at offset {nar.offset},"
                    f" beyond the {max_size}-byte limit"
                )
            if ev.size <= _SMALL:
                push(_SmallFile(_name(ev.path), ev.executable, ev.contents.read()), ev.size)
            else:
                push(_BigStart(_name(ev.path), ev.executable, ev.size))
                for chunk in ev.contents.chunks(1 << 20):
                    push(_Chunk(chunk), len(chunk))
                push(_BigEnd())
        elif isinstance(ev, NarSymlink):
            push(_Link(_name(ev.path), ev.target))
        elif isinstance(ev, NarDirectory):
            push(_DirStart(_name(ev.path)))
        elif isinstance(ev, NarDirectoryEnd):
            push(_DirEnd())
    if batch:
        emit(batch)


async def ingest_nar(
    read: Read,
    blobs: BlobService,
    dirs: DirectoryService,
    *,
    expect: tuple[int, bytes] | None = None,
    collect: MutableMapping[B3Digest, Directory] | None = None,
    max_size: int | None = None,
) -> IngestedNar:
    """Ingest the NAR produced by ``await read(n)`` (b"" at its end).

    With ``expect=(nar_size, nar_sha256)`` the NAR must match them, checked
    before its directories are committed. ``collect`` receives the
    Directories (its closure, for a directory NAR). ``max_size`` refuses a
    NAR as soon as a file header says it will be longer.

    Raises:
        InvalidNar: the bytes are not a valid NAR (nothing is committed).
        NarMismatch: the NAR differs from ``expect`` (nothing is committed).
        TooLarge: a file would take the NAR beyond ``max_size``.
    """
    loop = asyncio.get_running_loop()
    # Batches of operations from the parser; at most _QUEUED of them waiting
    # (the parser takes a slot before it hands one over, without a round trip).
    queue: asyncio.Queue[list[_Op] | BaseException | None] = asyncio.Queue()
    slots = threading.Semaphore(_QUEUED)
    stop = threading.Event()
    source = _ThreadSource(read, loop, stop)

    def emit(batch: list[_Op]) -> None:
        slots.acquire()
        if stop.is_set():
            raise _Stop
        loop.call_soon_threadsafe(queue.put_nowait, batch)

    def run() -> None:
        try:
            _parse(source, emit, max_size)
            result: BaseException | None = None
        except _Stop:
            return
        except BaseException as exc:  # delivered to the loop side
            result = exc
        if stop.is_set():  # the loop side gave up: nobody waits for the outcome
            return
        with contextlib.suppress(RuntimeError):  # the loop may be closing
            loop.call_soon_threadsafe(queue.put_nowait, result)

    thread = threading.Thread(target=run, name="nar-parser", daemon=True)
    thread.start()
    inflight = asyncio.Semaphore(_MAX_BATCHES_IN_FLIGHT)
    tasks: deque[asyncio.Task[None]] = deque()
    batch: list[tuple[_SmallFile, _Slot, _Frame | None]] = []
    batch_bytes = 0
    putter = dirs.put_multiple_start()
    stack: list[_Frame] = []
    # Directories parsed to their end, in post-order (children before parents);
    # each is built and put as soon as its files are stored.
    finished: deque[_Frame] = deque()
    root: _Entry | None = None
    big_writer = None
    big: _BigStart | None = None

    async def upload(items: list[tuple[_SmallFile, _Slot, _Frame | None]]) -> None:
        try:
            digests = await blobs.put_many([op.data for op, _, _ in items])
            for (op, slot, frame), digest in zip(items, digests, strict=True):
                slot.node = FileNode(op.name, digest, len(op.data), op.executable)
                if frame is not None:
                    frame.pending -= 1
        finally:
            inflight.release()

    async def flush() -> None:
        nonlocal batch, batch_bytes
        if not batch:
            return
        items, batch, batch_bytes = batch, [], 0
        await inflight.acquire()
        tasks.append(asyncio.ensure_future(upload(items)))

    def place(entry: _Entry) -> None:
        nonlocal root
        if stack:
            stack[-1].entries.append(entry)
        else:
            root = entry

    def resolve(entry: _Entry) -> Node:
        if isinstance(entry, (_Frame, _Slot)):
            assert entry.node is not None
            return entry.node
        return entry

    async def build() -> None:
        """Put the directories whose files are stored; raise the error of a failed upload."""
        while tasks and tasks[0].done():
            tasks.popleft().result()
        while finished and not finished[0].pending:
            frame = finished.popleft()
            directory = Directory.from_nodes([resolve(e) for e in frame.entries])
            check_directory_size(directory, frame.name or b"<root>")
            await putter.put(directory)
            if collect is not None:
                collect[directory.digest] = directory
            frame.node = directory.to_node(frame.name, dirs.size_mode)
            frame.entries = []

    try:
        while True:
            item = await queue.get()
            slots.release()
            if item is None:
                break
            if isinstance(item, BaseException):
                if isinstance(item, NarError):
                    raise InvalidNar(f"invalid NAR: {item}") from item
                raise item
            for op in item:
                if isinstance(op, _SmallFile):
                    slot = _Slot()
                    frame = stack[-1] if stack else None
                    if frame is not None:
                        frame.pending += 1
                    batch.append((op, slot, frame))
                    batch_bytes += len(op.data)
                    place(slot)
                    if len(batch) >= _BATCH_FILES or batch_bytes >= _BATCH_UPLOAD_BYTES:
                        await flush()
                elif isinstance(op, _BigStart):
                    big, big_writer = op, blobs.open_write()
                elif isinstance(op, _Chunk):
                    assert big_writer is not None
                    await big_writer.write(op.data)
                elif isinstance(op, _BigEnd):
                    assert big is not None and big_writer is not None
                    digest = await big_writer.close()
                    place(FileNode(big.name, digest, big.size, big.executable))
                    big, big_writer = None, None
                elif isinstance(op, _Link):
                    place(SymlinkNode(op.name, op.target))
                elif isinstance(op, _DirStart):
                    stack.append(_Frame(op.name))
                else:
                    frame = stack.pop()
                    finished.append(frame)
                    place(frame)
            await build()
        await asyncio.to_thread(thread.join)
        await flush()
        await asyncio.gather(*tasks)
        await build()
        if root is None or stack or finished or big_writer is not None:  # pragma: no cover
            raise InvalidNar("NAR ended inside a node")
        if expect is not None:
            if source.size != expect[0]:
                raise NarMismatch(f"NarSize mismatch: got {source.size}, expected {expect[0]}")
            if source.hasher.digest() != expect[1]:
                raise NarMismatch("NarHash mismatch: the NAR does not hash to the expected sha256")
        # Every blob and directory is stored (the directories, in the putter):
        # they become visible, all at once, only now.
        node = resolve(root)
        if isinstance(node, DirectoryNode):
            await putter.close()
        else:
            await putter.abort()  # a lone file or symlink: no directories
        return IngestedNar(node, source.size, source.hasher.digest())
    except BaseException:
        stop.set()
        for _ in range(_QUEUED):  # a parser waiting for a slot sees the stop
            slots.release()
        await source.aclose()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if big_writer is not None:
            await big_writer.abort()
        await putter.abort()
        raise


async def ingest_nar_file(
    f: BinaryIO | str | os.PathLike[str], blobs: BlobService, dirs: DirectoryService
) -> IngestedNar:
    """Ingest a NAR from a binary file object or path (reads happen off the loop)."""
    if isinstance(f, (str, os.PathLike)):
        with open(f, "rb") as fh:
            return await ingest_nar_file(fh, blobs, dirs)

    async def read(n: int) -> bytes:
        return await asyncio.to_thread(f.read, n)

    return await ingest_nar(read, blobs, dirs)
