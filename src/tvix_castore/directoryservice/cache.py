"""Directory ``cache`` combinator: near first, else the closure from far, stored in near."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryPutter, DirectoryService
from tvix_castore.directoryservice.graph import ClosureVerifier
from tvix_castore.nodes import Directory

__all__ = ["CacheDirectoryService"]


class CacheDirectoryService(DirectoryService):
    """Reads hit ``near``; a miss copies the closure from ``far`` into ``near``.

    The closure arrives root → leaves, is verified as it arrives, and is
    committed to ``near`` in one putter. Writes go to ``near``.
    """

    def __init__(self, near: DirectoryService, far: DirectoryService) -> None:
        self.near = near
        self.far = far
        self.size_mode = near.size_mode

    async def _fill(self, root: B3Digest) -> bool:
        verifier = ClosureVerifier(root, self.size_mode)
        async for directory in self.far.get_recursive(root):
            verifier.add(directory)
        closure = verifier.finalize()
        if closure is None:
            return False
        async with self.near.put_multiple_start() as putter:
            for directory in closure.leaves_to_root():
                await putter.put(directory)
            await putter.close()
        return True

    async def get(self, digest: B3Digest) -> Directory | None:
        hit = await self.near.get(digest)
        if hit is not None or not await self._fill(digest):
            return hit
        return await self.near.get(digest)

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        if await self.near.get(root) is None and not await self._fill(root):
            return
        async for directory in self.near.get_recursive(root):
            yield directory

    async def _commit(self, directories: Sequence[Directory]) -> None:
        await self.near._commit(directories)

    def put_multiple_start(self) -> DirectoryPutter:
        return self.near.put_multiple_start()

    async def aclose(self) -> None:
        await self.near.aclose()
        await self.far.aclose()
