"""What a cache is, seen from a request: the one read interface of the web pages.

A :class:`CacheView` is one cache served by the bridge: its URL prefix, its
keys, and the store paths it holds. Today there is only the default cache
(the whole store, at ``/``); named caches will be views over the same store,
mounted at ``/<name>``, so the pages only ever read through a view and build
every link from :attr:`CacheView.prefix`.

Example::

    view = view_of(request)
    info = await view.get(digest20)
    async for info in view.paths():
        ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from nix_compat.signing import SigningKey
from tvix_store.config import Store
from tvix_store.nar_bridge.app import CONFIG_KEY, STORE_KEY
from tvix_store.pathinfo import PathInfo

__all__ = ["CacheView", "view_of"]


@dataclass(frozen=True)
class CacheView:
    """One cache of the bridge, as its pages see it."""

    name: str
    """``""`` for the default cache."""
    prefix: str
    """URL path prefix of the cache: ``""`` or ``"/<name>"``."""
    priority: int
    """The priority ``/nix-cache-info`` advertises."""
    signing_keys: tuple[SigningKey, ...]
    """Keys narinfos are signed with on the fly."""
    public: bool
    """Readable without a token."""
    store: Store
    """The (shared, deduplicated) store the cache lives in."""

    async def get(self, digest: bytes) -> PathInfo | None:
        """The path of this cache with this 20-byte store path digest, or ``None``."""
        return await self.store.pathinfos.get(digest)

    async def paths(self) -> AsyncIterator[PathInfo]:
        """Every path of this cache (in no particular order)."""
        async for info in self.store.pathinfos.list():
            yield info


def view_of(request: web.Request) -> CacheView:
    """The cache ``request`` addresses (today always the default cache)."""
    app = request.app
    config = app[CONFIG_KEY]
    return CacheView(
        name="",
        prefix="",
        priority=config.priority,
        signing_keys=tuple(config.signing_keys),
        public=True,
        store=app[STORE_KEY],
    )
