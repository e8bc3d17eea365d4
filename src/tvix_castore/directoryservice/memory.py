"""``memory://``: Directories in a process-local dict."""

from __future__ import annotations

from collections.abc import Sequence

from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.nodes import Directory

__all__ = ["MemoryDirectoryService"]


class MemoryDirectoryService(DirectoryService):
    """Directories held in memory (already validated, so stored as objects)."""

    def __init__(self) -> None:
        self._dirs: dict[B3Digest, Directory] = {}

    async def get(self, digest: B3Digest) -> Directory | None:
        return self._dirs.get(digest)

    async def _commit(self, directories: Sequence[Directory]) -> None:
        for d in directories:
            self._dirs.setdefault(d.digest, d)
