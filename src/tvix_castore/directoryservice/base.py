"""The DirectoryService contract: Directories by digest, closures as graphs.

``get`` returns ``None`` for absent directories. ``get_recursive`` yields a
closure root first, breadth-first, each Directory once (nothing if the root
is absent). Uploads of closures go through a :class:`DirectoryPutter`: leaves
first, validated as a graph, and committed atomically at ``close()`` —
nothing is persisted if any part is invalid.
"""

from __future__ import annotations

import abc
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.graph import DirectoryGraph
from tvix_castore.errors import (
    ChecksumMismatch,
    DataCorruption,
    DirectoryGraphError,
    ValidationError,
)
from tvix_castore.lifecycle import AbortOnError, AsyncClosing
from tvix_castore.nodes import DEFAULT_SIZE_MODE, Directory, SizeMode, check_directory_size

__all__ = [
    "DirectoryPutter",
    "DirectoryService",
    "GraphPutter",
    "ThreadedDirectoryService",
    "closure_by_levels",
    "stored_directory",
]


class DirectoryPutter(AbortOnError, abc.ABC):
    """Receives one closure leaves → root; ``close()`` commits it and returns the root."""

    @abc.abstractmethod
    async def put(self, directory: Directory) -> None:
        """Add the next Directory (children before parents)."""

    @abc.abstractmethod
    async def close(self) -> B3Digest:
        """Validate the whole closure, commit it, and return the root digest."""


class DirectoryService(AsyncClosing, abc.ABC):
    """Stores Directories by digest. Implementations must be safe for concurrent use."""

    size_mode: SizeMode = DEFAULT_SIZE_MODE

    @abc.abstractmethod
    async def get(self, digest: B3Digest) -> Directory | None:
        """The Directory, verified against ``digest``, or ``None``."""

    async def get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        """The stored ones of ``digests``, each verified (absent ones left out).

        One call for many (a mount reading a directory's subdirectories
        ahead). This default runs up to 16 :meth:`get` calls at a time (a
        remote service: that many requests in flight); backends that fetch
        a batch at once override it.
        """
        import asyncio

        unique = list(dict.fromkeys(digests))
        out: dict[B3Digest, Directory] = {}
        for i in range(0, len(unique), 16):
            batch = unique[i : i + 16]
            for digest, found in zip(
                batch, await asyncio.gather(*map(self.get, batch)), strict=True
            ):
                if found is not None:
                    out[digest] = found
        return out

    @abc.abstractmethod
    async def _commit(self, directories: Sequence[Directory]) -> None:
        """Persist already-validated directories, leaves first, atomically."""

    async def put(self, directory: Directory) -> B3Digest:
        """Store one Directory whose children are already in this service."""
        check_directory_size(directory)
        for child in directory.directories:
            stored = await self.get(child.digest)
            if stored is None:
                raise DirectoryGraphError(
                    f"directory {directory.digest} refers to unknown directory {child.digest}"
                )
            if stored.size(self.size_mode) != child.size:
                raise DirectoryGraphError(
                    f"child {child.digest} has size {stored.size(self.size_mode)},"
                    f" referred with {child.size}"
                )
        await self._commit([directory])
        return directory.digest

    def put_multiple_start(self) -> DirectoryPutter:
        """A putter for one closure (leaves → root)."""
        return GraphPutter(self)

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        """The closure of ``root``: root first, breadth-first, each once."""
        first = await self.get(root)
        if first is None:
            return
        seen = {root}
        queue: deque[Directory] = deque([first])
        while queue:
            directory = queue.popleft()
            yield directory
            for child in directory.directories:
                if child.digest in seen:
                    continue
                seen.add(child.digest)
                found = await self.get(child.digest)
                if found is None:
                    raise DataCorruption(f"directory {child.digest} missing from closure of {root}")
                queue.append(found)


def stored_directory(digest: B3Digest, data: bytes) -> Directory:
    """A Directory read back from storage, checked against the digest it was stored under."""
    if B3Digest.of(data) != digest:
        raise ChecksumMismatch(f"stored directory {digest} does not match its digest")
    try:
        return Directory.from_bytes(data)
    except ValidationError as exc:
        raise DataCorruption(f"stored directory {digest} is invalid: {exc}") from exc


class ThreadedDirectoryService(DirectoryService):
    """A backend with blocking batch reads and writes (a database), run in worker threads."""

    @abc.abstractmethod
    def _get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        """The stored ones of ``digests`` (blocking)."""

    @abc.abstractmethod
    def _commit_sync(self, directories: Sequence[Directory]) -> None:
        """:meth:`_commit`, blocking."""

    async def get(self, digest: B3Digest) -> Directory | None:
        import asyncio

        found = await asyncio.to_thread(self._get_many, [digest])
        return found.get(digest)

    async def get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        import asyncio

        return await asyncio.to_thread(self._get_many, list(dict.fromkeys(digests)))

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        import asyncio

        async for directory in closure_by_levels(
            root, lambda level: asyncio.to_thread(self._get_many, level)
        ):
            yield directory

    async def _commit(self, directories: Sequence[Directory]) -> None:
        import asyncio

        await asyncio.to_thread(self._commit_sync, directories)


async def closure_by_levels(
    root: B3Digest,
    get_many: Callable[[list[B3Digest]], Awaitable[dict[B3Digest, Directory]]],
) -> AsyncIterator[Directory]:
    """``get_recursive`` for a backend that fetches many Directories at once.

    One ``get_many`` per tree level; the closure root first, breadth-first,
    each Directory once (nothing if the root is absent).
    """
    level = [root]
    seen = {root}
    first = True
    while level:
        found = await get_many(level)
        if first and root not in found:
            return
        first = False
        nxt: list[B3Digest] = []
        for digest in level:
            directory = found.get(digest)
            if directory is None:
                raise DataCorruption(f"directory {digest} missing from closure of {root}")
            yield directory
            for child in directory.directories:
                if child.digest not in seen:
                    seen.add(child.digest)
                    nxt.append(child.digest)
        level = nxt


class GraphPutter(DirectoryPutter):
    """Collects a closure in a :class:`DirectoryGraph`, commits it on ``close``."""

    def __init__(self, service: DirectoryService) -> None:
        self._service = service
        self._graph: DirectoryGraph | None = DirectoryGraph(service.size_mode)

    async def put(self, directory: Directory) -> None:
        if self._graph is None:
            raise DirectoryGraphError("putter already closed")
        self._graph.add(directory)

    async def close(self) -> B3Digest:
        if self._graph is None:
            raise DirectoryGraphError("putter already closed")
        graph, self._graph = self._graph, None
        closure = graph.finalize()
        await self._service._commit(closure.leaves_to_root())
        return closure.root

    async def abort(self) -> None:
        self._graph = None
