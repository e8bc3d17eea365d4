"""The BlobService contract: content-addressed byte streams keyed by BLAKE3.

A blob is identified by the BLAKE3 digest of its bytes, independent of how a
backend chunks it. Absent blobs give ``None``/``False``, never an exception.
Every reader verifies what it returns against the digest it was opened for
(whole blob or per chunk) and raises :class:`~tvix_castore.errors.ChecksumMismatch`
instead of handing out wrong bytes.
"""

from __future__ import annotations

import abc
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tvix_castore.digests import B3Digest
from tvix_castore.errors import ChecksumMismatch
from tvix_castore.lifecycle import AbortOnError, AsyncClosing

__all__ = [
    "Ask",
    "BlobReader",
    "BlobService",
    "BlobWriter",
    "BytesBlobReader",
    "ChunkMeta",
    "ForkedIngest",
    "checked",
    "read_file",
    "writev_all",
]

_IOV_MAX = 1000  # below the kernel's 1024


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """One chunk of a blob: its digest and length."""

    digest: B3Digest
    size: int


class BlobReader(AsyncClosing, abc.ABC):
    """An async, seekable reader over one blob."""

    @abc.abstractmethod
    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (the rest if ``n < 0``); ``b""`` at the end."""

    @abc.abstractmethod
    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move to ``offset``; seeking past the end raises ``ValueError``."""

    @abc.abstractmethod
    def tell(self) -> int:
        """Current position."""

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or fewer only at the end of the blob."""
        parts: list[bytes] = []
        while n > 0:
            chunk = await self.read(n)
            if not chunk:
                break
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    async def read_view(self, n: int) -> bytes | memoryview:
        """:meth:`readexactly`, possibly as a view of bytes the reader holds.

        The bytes behind a view are never changed (a reader may hand out
        slices of the verified chunks it keeps); a reader that keeps none
        returns :meth:`readexactly`'s bytes.
        """
        return await self.readexactly(n)


class BytesBlobReader(BlobReader):
    """A reader over bytes already in memory (and already verified)."""

    def __init__(self, data: bytes | memoryview) -> None:
        self._data = memoryview(data)
        self._pos = 0

    @property
    def size(self) -> int:
        return len(self._data)

    async def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else min(len(self._data), self._pos + n)
        out = bytes(self._data[self._pos : end])
        self._pos = max(self._pos, end)
        return out

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = _resolve_seek(self._pos, len(self._data), offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _resolve_seek(pos: int, size: int, offset: int, whence: int) -> int:
    if whence == io.SEEK_SET:
        new = offset
    elif whence == io.SEEK_CUR:
        new = pos + offset
    elif whence == io.SEEK_END:
        new = size + offset
    else:
        raise ValueError(f"invalid whence {whence}")
    if new < 0:
        raise ValueError("seek to a negative offset")
    if new > size:
        raise ValueError("seeked beyond EOF")
    return new


class BlobWriter(AbortOnError, abc.ABC):
    """Streams bytes in; :meth:`close` publishes the blob and returns its digest.

    Nothing becomes visible before ``close``; :meth:`abort` (or leaving an
    ``async with`` block by an exception) discards everything.
    """

    @abc.abstractmethod
    async def write(self, data: bytes | memoryview) -> None:
        """Append ``data``."""

    @abc.abstractmethod
    async def close(self) -> B3Digest:
        """Publish and return the digest of everything written."""


class Ask(Protocol):
    """In a forked ingestion worker: send a question to the parent, return its answer.

    With ``reply=False`` the parent answers nobody (``None`` is returned at
    once): a one-way message, handled in order with the worker's others.
    :meth:`later` sends a question now and returns a function that waits for
    its answer, so the worker can go on meanwhile.
    """

    def __call__(self, question: object, *, reply: bool = True) -> object: ...

    def later(self, question: object) -> Callable[[], object]: ...


class ForkedIngest(abc.ABC):
    """How a backend ingests files in forked worker processes (see ``ingest_tree``).

    The GIL serialises hashing and compressing in threads; processes do not
    share it. A worker must not use anything opened before the fork that is
    not fork-safe (SQLite connections above all): it sends such work to the
    parent through ``ask``, which the parent answers with :meth:`answer`.
    """

    @abc.abstractmethod
    def ingest_in_child(
        self, files: Sequence[tuple[str | bytes, int]], ask: Ask
    ) -> list[B3Digest | Exception]:
        """Runs in the worker: like :meth:`BlobService.ingest_files`, blocking."""

    def finish_in_child(self, ask: Ask) -> None:
        """Runs in the worker after its last batch, before it exits.

        For work a worker defers across batches (a segment it keeps
        filling): only one-way messages (``reply=False``) can be sent here.
        """

    def answer(self, question: object) -> object:
        """Runs in the parent: answer a worker's question."""
        raise ValueError(f"unexpected question from an ingestion worker: {question!r}")

    def finish(self) -> None:
        """Runs in the parent once every batch has come back: commit what was deferred."""


class BlobService(AsyncClosing, abc.ABC):
    """Stores blobs by BLAKE3 digest. Implementations must be safe for concurrent use."""

    def forked_ingest(self) -> ForkedIngest | None:
        """Support for ingesting in forked processes, or ``None`` (threads are used)."""
        return None

    def begin_write(self) -> None:
        """Called before a writer's first check or write (blocking, cheap).

        A store with a garbage collector takes a lease here, so that what the
        writer finds present (and so does not upload) stays until it has
        referred to it. Default: nothing to do.
        """

    @abc.abstractmethod
    async def has(self, digest: B3Digest) -> bool:
        """Whether the blob (or, for chunking backends, a chunk) is present."""

    @abc.abstractmethod
    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        """A verified, seekable reader, or ``None`` if the blob is absent."""

    @abc.abstractmethod
    def open_write(self) -> BlobWriter:
        """A writer for a new blob; its digest is known at ``close``."""

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        """The blob's chunk list: ``[]`` if it has no finer chunking, ``None`` if absent."""
        return [] if await self.has(digest) else None

    async def size(self, digest: B3Digest) -> int | None:
        """The blob's length, or ``None`` if absent (backends answer without reading it all)."""
        chunks = await self.chunks(digest)
        if chunks is None:
            return None
        if chunks:
            return sum(c.size for c in chunks)
        reader = await self.open_read(digest)
        if reader is None:
            return None
        async with reader:
            return await reader.seek(0, io.SEEK_END)

    async def put(self, data: bytes) -> B3Digest:
        """Store a blob held in memory (small blobs, tests)."""
        w = self.open_write()
        try:
            await w.write(data)
        except BaseException:
            await w.abort()
            raise
        return await w.close()

    async def ingest_file(self, path: str | bytes, size: int) -> B3Digest:
        """Store the regular file at ``path`` (``size`` bytes, per ``lstat``).

        Raises ``OSError`` if it cannot be read and ``ValueError`` if its size
        changed. Backends override this to do all the work in one thread.
        """
        import asyncio

        f = await asyncio.to_thread(open, path, "rb")
        w = self.open_write()
        try:
            total = 0
            while data := await asyncio.to_thread(f.read, 1 << 20):
                total += len(data)
                if total > size:
                    raise ValueError(f"file grew while reading (expected {size} bytes)")
                await w.write(data)
            if total != size:
                raise ValueError(f"file shrank while reading ({total} of {size} bytes)")
        except BaseException:
            await w.abort()
            raise
        finally:
            f.close()
        return await w.close()

    async def ingest_files(
        self, files: Sequence[tuple[str | bytes, int]]
    ) -> list[B3Digest | Exception]:
        """Store several (small) files; per file its digest or the ``OSError``/``ValueError``.

        Batching lets backends amortise thread hand-offs over many small files.
        """
        results: list[B3Digest | Exception] = []
        for path, size in files:
            try:
                results.append(await self.ingest_file(path, size))
            except (OSError, ValueError) as exc:
                results.append(exc)
        return results

    async def has_many(self, digests: Sequence[B3Digest]) -> set[B3Digest]:
        """Which of ``digests`` are present (backends answer in one round trip)."""
        import asyncio

        unique = list(dict.fromkeys(digests))
        found = await asyncio.gather(*(self.has(d) for d in unique))
        return {d for d, ok in zip(unique, found, strict=True) if ok}

    async def size_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, int]:
        """Sizes of the present ones among ``digests`` (absent ones are left out)."""
        import asyncio

        unique = list(dict.fromkeys(digests))
        out: dict[B3Digest, int] = {}
        for i in range(0, len(unique), 32):  # bounded concurrency
            batch = unique[i : i + 32]
            sizes = await asyncio.gather(*(self.size(d) for d in batch))
            out.update((d, n) for d, n in zip(batch, sizes, strict=True) if n is not None)
        return out

    async def put_many(self, blobs: Sequence[bytes]) -> list[B3Digest]:
        """Store several small blobs held in memory; their digests, in order."""
        import asyncio

        return list(await asyncio.gather(*(self.put(b) for b in blobs)))

    async def read_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, bytes]:
        """Several (small) blobs at once, verified; absent ones are left out.

        Readers of many small files (NAR rendering) use this to hide per-blob
        latency; backends answer from one query or with concurrent requests.
        """
        import asyncio

        unique = list(dict.fromkeys(digests))
        found = await asyncio.gather(*(self.read_all(d) for d in unique))
        return {d: data for d, data in zip(unique, found, strict=True) if data is not None}

    async def read_all(self, digest: B3Digest) -> bytes | None:
        """The whole blob in memory (small blobs, tests), or ``None``."""
        reader = await self.open_read(digest)
        if reader is None:
            return None
        async with reader:
            return await reader.read()


def checked(digest: B3Digest, data: bytes, what: str = "blob") -> bytes:
    """Return ``data`` if it hashes to ``digest``, else raise ChecksumMismatch."""
    actual = B3Digest.of(data)
    if actual != digest:
        raise ChecksumMismatch(f"{what} {digest} has wrong contents (hashes to {actual})")
    return data


def read_file(path: str | bytes, size: int) -> bytes:
    """The ``size`` bytes of a small file, read with bare syscalls (no ``io`` layers).

    Raises ``ValueError`` if the file no longer has ``size`` bytes.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, size + 1)
        if len(data) <= size:  # short reads only at EOF, but be exact
            parts = [data]
            got = len(data)
            while got <= size and (more := os.read(fd, size + 1 - got)):
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
    finally:
        os.close(fd)
    if len(data) != size:
        raise ValueError(f"file changed size while reading ({len(data)} != {size})")
    return data


def writev_all(fd: int, pieces: list[bytes | memoryview], total: int) -> None:
    """``writev`` every piece (``total`` bytes), in order, resuming after short writes.

    Any number of pieces (``IOV_MAX`` at a time). ``pieces`` is consumed.
    """
    i = 0
    while total:
        n = os.writev(fd, pieces[i : i + _IOV_MAX])
        total -= n
        while i < len(pieces) and n >= len(pieces[i]):
            n -= len(pieces[i])
            i += 1
        if n:  # a short write ended inside this piece
            pieces[i] = memoryview(pieces[i])[n:]
