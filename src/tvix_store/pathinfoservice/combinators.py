"""PathInfoService combinators: ``cache`` (near/far), ``lru`` and ``signing``.

Each wraps other services and is itself a PathInfoService, so they compose.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator

from nix_compat.signing import SigningKey
from tvix_castore.errors import ConfigError
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.base import PathInfoService

__all__ = ["CachePathInfoService", "LruPathInfoService", "SigningPathInfoService"]


class CachePathInfoService(PathInfoService):
    """Read-through cache: ``near`` first, else ``far``, whose answer is stored in ``near``.

    Concurrent ``get``s of the same path share one fetch from ``far``.
    ``put`` writes to ``near``; ``list`` lists ``near`` (what is cached).
    """

    def __init__(self, near: PathInfoService, far: PathInfoService) -> None:
        self.near = near
        self.far = far
        self._inflight: dict[bytes, asyncio.Future[PathInfo | None]] = {}

    async def get(self, digest: bytes) -> PathInfo | None:
        hit = await self.near.get(digest)
        if hit is not None:
            return hit
        task = self._inflight.get(digest)
        if task is None:
            # The fetch is a task of its own: cancelling one waiter (even the
            # first) does not cancel it for the others.
            task = asyncio.ensure_future(self._fetch(digest))
            self._inflight[digest] = task
            task.add_done_callback(lambda _: self._inflight.pop(digest, None))
        return await asyncio.shield(task)

    async def _fetch(self, digest: bytes) -> PathInfo | None:
        info = await self.far.get(digest)
        if info is not None:
            info = await self.near.put(info)
        return info

    async def put(self, info: PathInfo) -> PathInfo:
        return await self.near.put(info)

    def list(self) -> AsyncIterator[PathInfo]:
        return self.near.list()

    async def aclose(self) -> None:
        await self.near.aclose()
        await self.far.aclose()


class LruPathInfoService(PathInfoService):
    """An in-memory LRU of at most ``capacity`` PathInfos (a fast ``near``)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ConfigError("lru capacity must be positive")
        self.capacity = capacity
        self._entries: OrderedDict[bytes, PathInfo] = OrderedDict()

    async def get(self, digest: bytes) -> PathInfo | None:
        info = self._entries.get(digest)
        if info is not None:
            self._entries.move_to_end(digest)
        return info

    async def put(self, info: PathInfo) -> PathInfo:
        self._entries[info.digest] = info
        self._entries.move_to_end(info.digest)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return info

    async def list(self) -> AsyncIterator[PathInfo]:
        for info in list(self._entries.values()):
            yield info


class SigningPathInfoService(PathInfoService):
    """Adds a signature by ``key`` to every PathInfo put (existing ones kept)."""

    def __init__(self, inner: PathInfoService, key: SigningKey) -> None:
        self.inner = inner
        self.key = key

    async def get(self, digest: bytes) -> PathInfo | None:
        return await self.inner.get(digest)

    async def put(self, info: PathInfo) -> PathInfo:
        if not any(s.name == self.key.name for s in info.signatures):
            info = info.signed(self.key)
        return await self.inner.put(info)

    def list(self) -> AsyncIterator[PathInfo]:
        return self.inner.list()

    async def aclose(self) -> None:
        await self.inner.aclose()
