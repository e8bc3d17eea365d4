"""The PathInfoService contract: PathInfo by the 20-byte store-path digest.

``get`` returns ``None`` when absent; ``put`` replaces any entry for the same
digest and returns what was stored (a signing wrapper may add signatures);
``list`` streams every entry in no particular order.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable

from tvix_castore.errors import DataCorruption, ValidationError
from tvix_castore.lifecycle import AsyncClosing
from tvix_store.pathinfo import PathInfo

__all__ = ["PathInfoService", "Page", "paged", "stored_pathinfo"]

Page = Callable[[bytes], list[tuple[bytes, bytes]]]
"""``page(after)``: the next (digest, encoded PathInfo) rows after ``after``, in digest
order (empty at the end); blocking."""


class PathInfoService(AsyncClosing, abc.ABC):
    """Stores PathInfos. Implementations must be safe for concurrent use."""

    @abc.abstractmethod
    async def get(self, digest: bytes) -> PathInfo | None:
        """The PathInfo whose store path has this 20-byte digest, or ``None``."""

    @abc.abstractmethod
    async def put(self, info: PathInfo) -> PathInfo:
        """Store ``info`` (last write wins); return the stored PathInfo."""

    @abc.abstractmethod
    def list(self) -> AsyncIterator[PathInfo]:
        """Every PathInfo."""


def stored_pathinfo(digest: bytes, data: bytes) -> PathInfo:
    """A PathInfo read back from storage, checked against the digest it was stored under."""
    try:
        info = PathInfo.from_bytes(data)
    except ValidationError as exc:
        raise DataCorruption(f"stored PathInfo {digest.hex()} is invalid: {exc}") from exc
    if info.digest != digest:
        raise DataCorruption(f"stored PathInfo {digest.hex()} is for another path")
    return info


async def paged(page: Page) -> AsyncIterator[PathInfo]:
    """Every PathInfo of a backend read a page at a time (each in a worker thread)."""
    import asyncio  # (here: the base is imported where no event loop runs)

    after = b""
    while rows := await asyncio.to_thread(page, after):
        for digest, data in rows:
            yield stored_pathinfo(digest, data)
        after = rows[-1][0]
