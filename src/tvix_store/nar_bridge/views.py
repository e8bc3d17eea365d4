"""What a cache is, seen from a request: the one read interface of the web pages.

A :class:`CacheView` is one cache served by the bridge: its URL prefix, its
keys, and the store paths it holds: the default cache is the whole store, at
``/``; a named cache (:mod:`tvix_store.caches`) is its members, at
``/<name>``. The pages only ever read through a view and build every link
from :attr:`CacheView.prefix`.

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
from tvix_store.caches import CacheRegistry
from tvix_store.config import Store
from tvix_store.nar_bridge.app import CONFIG_KEY, STORE_KEY, cache_of
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
    registry: CacheRegistry | None = None
    """Where a named cache's members are recorded (``None`` for the default cache)."""

    async def get(self, digest: bytes) -> PathInfo | None:
        """The path of this cache with this 20-byte store path digest, or ``None``."""
        if self.registry is not None and not self.registry.has(self.name, digest):
            return None
        return await self.store.pathinfos.get(digest)

    async def paths(self) -> AsyncIterator[PathInfo]:
        """Every path of this cache (in no particular order)."""
        if self.registry is None:
            async for info in self.store.pathinfos.list():
                yield info
            return
        for digest in self.registry.members(self.name):
            member = await self.store.pathinfos.get(digest)
            if member is not None:
                yield member


def view_of(request: web.Request) -> CacheView:
    """The cache ``request`` addresses (404 for a cache that does not exist)."""
    app = request.app
    config = app[CONFIG_KEY]
    cache = cache_of(request)
    if cache is not None:
        return CacheView(
            name=cache.name,
            prefix=f"/{cache.name}",
            priority=cache.priority,
            signing_keys=cache.signing_keys,
            public=cache.public,
            store=app[STORE_KEY],
            registry=config.caches,
        )
    return CacheView(
        name="",
        prefix="",
        priority=config.priority,
        signing_keys=tuple(config.signing_keys),
        public=not config.private,
        store=app[STORE_KEY],
    )
