"""Pull-through for named caches with an upstream (:mod:`tvix_store.caches`).

A narinfo request for a path that is not a member of such a cache asks the
upstream binary cache. Its narinfo must be signed by one of the cache's
upstream keys and its CA must fit the path; its NAR is then ingested into
the shared store (checked against NarSize and NarHash before anything refers
to it) and the path becomes a member, served signed by the cache's own keys
as well. A path the store already holds with the same NarHash (pushed to
another cache, say) is not downloaded again: only the upstream's narinfo is
fetched, which is what proves the path is the upstream's to serve here.

Concurrent requests for one path share one fetch; misses are remembered for
a minute, as Nix remembers them for an hour, so a client probing for many
absent paths does not send each probe on to the upstream twice in a row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from nix_compat import nixbase32
from nix_compat.narinfo import NarInfo
from tvix_castore.errors import DataCorruption
from tvix_store.caches import Cache, CacheRegistry
from tvix_store.config import Store
from tvix_store.pathinfoservice.nix_http import NixHttpPathInfoService

__all__ = ["BadUpstream", "PullThrough"]

log = logging.getLogger(__name__)
_MISS_TTL = 60.0
_MAX_MISSES = 65536


class BadUpstream(DataCorruption):
    """The upstream answered with something this cache must not serve (HTTP 502)."""


class PullThrough:
    """The upstream clients of one nar-bridge, and its fetches in flight."""

    def __init__(self, store: Store, miss_ttl: float = _MISS_TTL) -> None:
        self._store = store
        self._miss_ttl = miss_ttl
        self._clients: dict[str, NixHttpPathInfoService] = {}
        self._inflight: dict[tuple[str, bytes], asyncio.Future[bool]] = {}
        self._misses: OrderedDict[tuple[str, bytes], float] = OrderedDict()

    async def pull(self, cache: Cache, registry: CacheRegistry, digest: bytes) -> bool:
        """Whether ``digest`` is a member of ``cache`` now, pulled from its upstream if need be."""
        key = (cache.name, digest)
        missed = self._misses.get(key)
        if missed is not None:
            if time.monotonic() - missed < self._miss_ttl:
                return False
            del self._misses[key]
        task = self._inflight.get(key)
        if task is None:
            # A task of its own: a client that goes away does not cancel it for the others.
            task = asyncio.ensure_future(self._pull(cache, registry, digest))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    def _client(self, cache: Cache) -> NixHttpPathInfoService:
        assert cache.upstream is not None
        ident = "\n".join([cache.name, cache.upstream, *map(str, cache.upstream_keys)])
        client = self._clients.get(ident)
        if client is None:  # (a reconfigured cache gets a new client; the old one stays idle)
            client = NixHttpPathInfoService(
                cache.upstream,
                self._store.blobs,
                self._store.directories,
                list(cache.upstream_keys),
            )
            self._clients[ident] = client
        return client

    async def _pull(self, cache: Cache, registry: CacheRegistry, digest: bytes) -> bool:
        client = self._client(cache)
        hash_part = nixbase32.encode(digest)
        try:
            info = await client.narinfo(digest)
        except DataCorruption as exc:
            raise BadUpstream(f"upstream {cache.upstream} of cache {cache.name!r}: {exc}") from exc
        if info is None:
            self._miss(cache.name, digest)
            return False
        store = self._store
        local = await store.pathinfos.get(digest)
        if local is not None:
            if (local.nar_sha256, local.nar_size) != (info.nar_hash, info.nar_size):
                log.warning(
                    "cache %s: %s is stored with another NAR than upstream %s has;"
                    " not pulling it through",
                    cache.name,
                    info.store_path,
                    cache.upstream,
                )
                self._miss(cache.name, digest)
                return False
        else:
            await self._fetch(cache, client, info)
        registry.add(cache.name, digest, info.store_path.absolute)
        registry.received(cache.name, info.nar_hash)
        log.info("cache %s: pulled %s through from %s", cache.name, hash_part, cache.upstream)
        return True

    async def _fetch(self, cache: Cache, client: NixHttpPathInfoService, info: NarInfo) -> None:
        store = self._store
        # (a lease first: what the ingest finds present stays until the PathInfo refers to it)
        await asyncio.to_thread(store.blobs.begin_write)
        try:
            pathinfo = await client.fetch(info)
        except DataCorruption as exc:
            raise BadUpstream(f"upstream {cache.upstream} of cache {cache.name!r}: {exc}") from exc
        await store.pathinfos.put(pathinfo)
        await store.nar_index.put(info.nar_hash, pathinfo.node, info.nar_size)

    def _miss(self, name: str, digest: bytes) -> None:
        self._misses[(name, digest)] = time.monotonic()
        while len(self._misses) > _MAX_MISSES:
            self._misses.popitem(last=False)

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            await client.aclose()
