"""``memory://``: PathInfos in a process-local dict."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.base import PathInfoService

__all__ = ["MemoryPathInfoService"]


class MemoryPathInfoService(PathInfoService):
    """PathInfos held in memory."""

    def __init__(self) -> None:
        self._infos: dict[bytes, PathInfo] = {}

    async def get(self, digest: bytes) -> PathInfo | None:
        return self._infos.get(digest)

    async def put(self, info: PathInfo) -> PathInfo:
        self._infos[info.digest] = info
        return info

    async def list(self) -> AsyncIterator[PathInfo]:
        for info in list(self._infos.values()):
            yield info
