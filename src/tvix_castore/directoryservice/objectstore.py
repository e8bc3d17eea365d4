"""``objectstore+…`` Directories: one object per closure root (B §7.3).

A closure is stored as one object, ``dirs/b3/<hex[0:4]>/<hex of the root>``,
holding ``zstd( frame ‖ frame ‖ … )`` where each frame is a ``u32``
big-endian length followed by one canonical Directory encoding. The frames
come in breadth-first order from the root (the order ``get_recursive``
yields), each Directory once. The object is written only if absent, in one
atomic put, so a reader sees the whole closure or nothing, and concurrent
writers of one closure are harmless (their objects are identical).

Consequences of the layout (as in tvix):

* Only closure **roots** can be looked up. ``get`` and ``get_recursive`` of
  a Directory that was stored only inside another closure find nothing
  (``None`` / an empty closure, NOT_FOUND over gRPC). A Directory that was
  uploaded as a root of its own is found, whatever else contains it.
* ``put`` of a single Directory with subdirectories is refused with
  :class:`~tvix_castore.errors.ClosureRequired` (INVALID_ARGUMENT); leaves
  can be put alone. Whole closures go through ``put_multiple_start()``.

Reading streams: the object is decompressed as frames are consumed, and each
frame must be the root or a child announced by a frame read before it, with
the size its parent states (:class:`ClosureVerifier`). Damaged, truncated,
non-canonical or foreign bytes raise
:class:`~tvix_castore.errors.DataCorruption` (DATA_LOSS), never a wrong
Directory. Writing compresses frame by frame (a local store writes the
compressed output to its temporary file as it is produced).
"""

from __future__ import annotations

import io
import mmap
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Final, TypeVar, cast

from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.directoryservice.graph import Closure, ClosureVerifier
from tvix_castore.errors import (
    ClosureRequired,
    DataCorruption,
    DirectoryGraphError,
    ValidationError,
)
from tvix_castore.lazy import lazy_module
from tvix_castore.nodes import Directory, check_directory_size
from tvix_castore.objectstore import MemoryObjectStore, ObjectStore

if TYPE_CHECKING:
    import asyncio

    import zstandard
else:
    asyncio = lazy_module("asyncio")
    zstandard = lazy_module("zstandard")

__all__ = [
    "MAX_FRAME_LENGTH",
    "ObjectStoreDirectoryService",
    "closure_key",
    "decode_frames",
    "encode_frames",
]

MAX_FRAME_LENGTH: Final = 1_048_576_000
"""Largest frame a reader accepts (tvix's constant; its comment says 1 MiB, the value is ~1000 MiB).
Our writers never produce frames near it: a Directory must encode to under 4 MiB."""
_T = TypeVar("_T")
_LENGTH = struct.Struct(">I")
_ZSTD_LEVEL = 3
_BATCH_BYTES = 1 << 20  # frames decoded per trip to a worker thread (at most about this much)


def closure_key(root: B3Digest) -> str:
    """Object key of the closure whose root is ``root``."""
    h = root.hex()
    return f"dirs/b3/{h[:4]}/{h}"


def encode_frames(directories: Sequence[Directory]) -> Iterator[bytes]:
    """The compressed object for ``directories`` (root first, breadth-first), in pieces.

    Each Directory is encoded only when its frame is compressed, so the
    uncompressed closure is never held as one buffer.
    """
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compressobj()
    for directory in directories:
        data = directory.encode()
        piece = compressor.compress(_LENGTH.pack(len(data))) + compressor.compress(data)
        if piece:
            yield piece
    yield compressor.flush()


class _FrameReader:
    """Frames of one stored closure, decompressed as they are read."""

    def __init__(self, key: str, data: bytes | mmap.mmap) -> None:
        self._key = key
        self._data = data
        # (a map of the object's file is read like a file: it has read())
        source = io.BytesIO(data) if isinstance(data, bytes) else cast("IO[bytes]", data)
        self._reader = zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
        # (held while decoding in a worker thread: a cancelled reader is closed after it)
        self._lock = threading.Lock()

    def _damaged(self, why: str) -> DataCorruption:
        return DataCorruption(f"directory closure {self._key} is damaged: {why}")

    def _read(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        try:
            while got < n:
                chunk = self._reader.read(n - got)
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
        except zstandard.ZstdError as exc:
            raise self._damaged(f"not valid zstd: {exc}") from exc
        return b"".join(parts)

    def frame(self) -> bytes | None:
        """The next frame's bytes, ``None`` at the end of the object."""
        head = self._read(_LENGTH.size)
        if not head:
            return None
        if len(head) < _LENGTH.size:
            raise self._damaged("it ends inside a frame's length")
        (length,) = _LENGTH.unpack(head)
        if length > MAX_FRAME_LENGTH:
            raise self._damaged(f"a frame of {length} bytes is over {MAX_FRAME_LENGTH}")
        body = self._read(length)
        if len(body) < length:
            raise self._damaged(f"it ends inside a frame ({len(body)} of {length} bytes)")
        return body

    def directories(self, budget: int | None = _BATCH_BYTES) -> tuple[list[Directory], bool]:
        """The next frames (about ``budget`` bytes of them, or all) decoded; whether it ended."""
        with self._lock:
            return self._directories(budget)

    def _directories(self, budget: int | None) -> tuple[list[Directory], bool]:
        out: list[Directory] = []
        used = 0
        while budget is None or used < budget:
            frame = self.frame()
            if frame is None:
                return out, True
            out.append(self.decode(frame))
            used += len(frame) + _LENGTH.size
        return out, False

    def decode(self, frame: bytes) -> Directory:
        """One frame as a Directory; its bytes must be the canonical encoding."""
        try:
            directory = Directory.from_bytes(frame)
        except ValidationError as exc:
            raise self._damaged(f"a frame is not a valid Directory: {exc}") from exc
        if directory.encode() != frame:
            raise self._damaged(f"frame of {directory.digest} is not its canonical encoding")
        return directory

    def close(self) -> None:
        """Release the decompressor (and the map of the object's file)."""
        with self._lock:
            self._reader.close()  # type: ignore[no-untyped-call]
            if isinstance(self._data, mmap.mmap):
                self._data.close()


def decode_frames(key: str, data: bytes) -> list[Directory]:
    """Every Directory of a stored closure object, in stored order (no graph checks).

    For tools and tests that look at an object by hand; the service itself
    reads incrementally and verifies the graph.
    """
    reader = _FrameReader(key, data)
    try:
        found, _ = reader.directories(budget=None)
        return found
    finally:
        reader.close()


def _breadth_first(directories: Sequence[Directory]) -> list[Directory]:
    """A validated closure given leaves → root (the root last), root first breadth-first.

    Raises:
        DirectoryGraphError: a child is missing, or some Directory is not
            reachable from the root (callers pass whole, validated closures).
    """
    by_digest = {d.digest: d for d in directories}
    for directory in by_digest.values():
        for child in directory.directories:
            if child.digest not in by_digest:
                raise DirectoryGraphError(
                    f"directory {directory.digest} refers to {child.digest}, not in the closure"
                )
    order = Closure(directories[-1].digest, by_digest).root_to_leaves()
    if len(order) != len(by_digest):
        raise DirectoryGraphError(
            f"{len(by_digest) - len(order)} directories are not reachable from the root"
        )
    return order


class ObjectStoreDirectoryService(DirectoryService):
    """Directory closures as objects in an :class:`ObjectStore` (local, memory or cloud).

    Example::

        >>> import asyncio
        >>> from tvix_castore.nodes import Directory
        >>> svc = ObjectStoreDirectoryService(MemoryObjectStore())
        >>> leaf = Directory()
        >>> root = Directory(directories=(leaf.to_node(b"a"),))
        >>> async def demo():
        ...     async with svc.put_multiple_start() as putter:
        ...         await putter.put(leaf)
        ...         await putter.put(root)
        ...         await putter.close()
        ...     return [d async for d in svc.get_recursive(root.digest)]
        >>> asyncio.run(demo()) == [root, leaf]
        True
    """

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        # (a memory store answers at once: no worker threads)
        self._inline = isinstance(store, MemoryObjectStore)

    async def _run(self, fn: Callable[..., _T], *args: object) -> _T:
        if self._inline:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    def _open_sync(self, root: B3Digest) -> _FrameReader | None:
        key = closure_key(root)
        data = self.store.view_sync(key)
        return None if data is None else _FrameReader(key, data)

    async def get(self, digest: B3Digest) -> Directory | None:
        """The closure root ``digest``; ``None`` for unknown and for non-root Directories."""
        reader = await self._run(self._open_sync, digest)
        if reader is None:
            return None
        try:
            found, _ = await self._run(reader.directories, 1)  # (the first frame only)
        finally:
            reader.close()
        if not found:
            raise reader._damaged("it holds no directories")
        if found[0].digest != digest:
            raise reader._damaged(f"its first frame is {found[0].digest}, not the root")
        return found[0]

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        """The closure stored under ``root``, in its stored (breadth-first) order, verified."""
        reader = await self._run(self._open_sync, root)
        if reader is None:
            return
        verifier = ClosureVerifier(root, self.size_mode)
        try:
            done = False
            while not done:
                batch, done = await self._run(reader.directories)
                for directory in batch:
                    try:
                        verifier.add(directory)
                    except DataCorruption as exc:
                        raise reader._damaged(str(exc)) from exc
                    yield directory
            try:
                complete = verifier.finalize()
            except DataCorruption as exc:
                raise reader._damaged(str(exc)) from exc
            if complete is None:
                raise reader._damaged("it holds no directories")
        finally:
            reader.close()

    async def put(self, directory: Directory) -> B3Digest:
        """Store a leaf Directory as a closure of its own.

        Raises:
            ClosureRequired: ``directory`` has subdirectories (upload its closure
                through :meth:`put_multiple_start` instead).
        """
        if directory.directories:
            raise ClosureRequired(
                f"directory {directory.digest} has subdirectories: this store keeps"
                " whole closures by their root, so upload it with its closure"
            )
        check_directory_size(directory)
        await self._commit([directory])
        return directory.digest

    async def _commit(self, directories: Sequence[Directory]) -> None:
        if not directories:
            return
        order = _breadth_first(directories)
        key = closure_key(order[0].digest)
        await self._run(self._write_sync, key, order)

    def _write_sync(self, key: str, order: list[Directory]) -> None:
        if self.store.exists_sync(key):  # written only if absent (B §7.3)
            return
        self.store.put_pieces_sync(key, encode_frames(order))
