"""``async with`` support shared by services, readers, writers and putters."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["AbortOnError", "AsyncClosing"]


class AsyncClosing:
    """Closes on leaving an ``async with`` block; subclasses override :meth:`aclose`."""

    async def aclose(self) -> None:
        """Release resources (default: nothing to release)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AbortOnError:
    """Aborts when an ``async with`` block is left by an exception.

    For writers whose successful end is an explicit ``close()`` that returns
    something (a digest, a root): leaving the block normally does nothing.
    """

    async def abort(self) -> None:
        """Discard what was written (default: nothing to clean up)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            await self.abort()
