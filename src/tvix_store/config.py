"""Opening the store: the embedded default, or services named by URLs.

Precedence is flag, then environment variable (``BLOB_SERVICE_ADDR``,
``DIRECTORY_SERVICE_ADDR``, ``PATH_INFO_SERVICE_ADDR``), then the embedded
default. The embedded default keeps everything in one data directory
(``$TVIX_STORE_HOME``, else ``$XDG_DATA_HOME/tvix-store``, else
``~/.local/share/tvix-store``):

* ``packs/``: blobs in compressed pack files (see :mod:`tvix_castore.packstore`),
  with every Directory and PathInfo journaled beside them,
* ``store.sqlite`` (WAL): the pack index, directories, path infos and NAR
  plans: all of it can be rebuilt from the packs.

Several processes (daemon, CLI, nar-bridge) may use it at once: SQLite WAL
serialises writers and each process appends to a pack of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nix_compat.errors import NixCompatError
from tvix_castore.blobservice.base import BlobService
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import ConfigError
from tvix_castore.lifecycle import AsyncClosing
from tvix_castore.nodes import Node
from tvix_castore.registry import ServiceUrl
from tvix_store.embedded import (
    EMBEDDED_SCHEME,
    STORE_DB,
    data_dir,
    embedded_blobs,
    embedded_home,
)
from tvix_store.nar.service import NarService
from tvix_store.narindex import MemoryNarIndex, NarIndex, SqliteNarIndex
from tvix_store.pathinfoservice.base import PathInfoService
from tvix_store.pathinfoservice.combinators import CachePathInfoService

if TYPE_CHECKING:
    from tvix_store.composition import Composition

__all__ = [
    "ENV_BLOB",
    "ENV_DIRECTORY",
    "ENV_PATH_INFO",
    "STORE_DB",
    "Store",
    "config_from_urls",
    "data_dir",
    "embedded_blobs",
    "open_store",
    "path_info_service_from_url",
    "register_path_info_service",
]

ENV_BLOB = "BLOB_SERVICE_ADDR"
ENV_DIRECTORY = "DIRECTORY_SERVICE_ADDR"
ENV_PATH_INFO = "PATH_INFO_SERVICE_ADDR"

PathInfoFactory = Callable[[ServiceUrl, BlobService, DirectoryService], PathInfoService]
"""Builds a PathInfoService from its URL; gets the store's blob and directory
services (``nix+http`` ingests into them)."""
_PATH_INFO_SERVICES: dict[str, PathInfoFactory] = {}


def register_path_info_service(scheme: str, factory: PathInfoFactory) -> None:
    """Make ``scheme://`` URLs build PathInfoServices with ``factory``."""
    _PATH_INFO_SERVICES[scheme] = factory


def _memory(url: ServiceUrl, blobs: BlobService, dirs: DirectoryService) -> PathInfoService:
    url.no_host()
    url.no_path()
    url.check_query()
    from tvix_store.pathinfoservice.memory import MemoryPathInfoService

    return MemoryPathInfoService()


def _sqlite(url: ServiceUrl, blobs: BlobService, dirs: DirectoryService) -> PathInfoService:
    url.no_host()
    url.check_query()
    from tvix_store.pathinfoservice.sqlite import SqlitePathInfoService

    return SqlitePathInfoService(url.absolute_path("database"))


def _grpc(url: ServiceUrl, blobs: BlobService, dirs: DirectoryService) -> PathInfoService:
    url.check_query("wait-connect")
    from tvix_store.pathinfoservice.grpc import GrpcPathInfoService

    return GrpcPathInfoService.from_url(url.url.split("?", 1)[0])


def _nix(url: ServiceUrl, blobs: BlobService, dirs: DirectoryService) -> PathInfoService:
    """``nix+https://host/prefix?trusted-public-keys=k1 k2`` (the key list may repeat)."""
    url.check_query("trusted-public-keys")
    from nix_compat.signing import VerifyingKey
    from tvix_store.pathinfoservice.nix_http import NixHttpPathInfoService

    keys = None
    if url.get_all("trusted-public-keys"):
        texts = [k for v in url.get_all("trusted-public-keys") for k in v.split()]
        try:
            keys = [VerifyingKey.parse(k) for k in texts]
        except NixCompatError as exc:
            raise url.error(f"invalid trusted public key: {exc}") from exc
        if not keys:
            raise url.error("trusted-public-keys is empty; give at least one key or omit it")
    if not url.host:
        raise url.error("nix+http(s):// needs a host")
    base = url.url.split("?", 1)[0].removeprefix("nix+")
    return NixHttpPathInfoService(base, blobs, dirs, keys)


def _postgres(url: ServiceUrl, blobs: BlobService, dirs: DirectoryService) -> PathInfoService:
    from tvix_store.pathinfoservice.postgres import PostgresPathInfoService

    return PostgresPathInfoService(url.url)


register_path_info_service("memory", _memory)
register_path_info_service("postgresql", _postgres)
register_path_info_service("postgres", _postgres)
register_path_info_service("nix+http", _nix)
register_path_info_service("nix+https", _nix)
register_path_info_service("sqlite", _sqlite)
for _scheme in ("grpc+http", "grpc+https", "grpc+unix"):
    register_path_info_service(_scheme, _grpc)


def path_info_service_from_url(
    url: str, blobs: BlobService, directories: DirectoryService
) -> PathInfoService:
    """Build a PathInfoService from its URL.

    Schemes: ``memory://``, ``sqlite:///…``, ``postgresql://…``, ``grpc+…``,
    ``nix+http(s)://…``;
    ``blobs``/``directories`` are where ``nix+http`` ingests.
    """
    parsed = ServiceUrl.parse(url)
    factory = _PATH_INFO_SERVICES.get(parsed.scheme)
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(_PATH_INFO_SERVICES))
        from tvix_castore.errors import UnknownScheme

        raise UnknownScheme(f"{url!r}: unknown path info service scheme (known: {known})")
    return factory(parsed, blobs, directories)


@dataclass
class Store(AsyncClosing):
    """The three services, their NAR index and NAR service, closed together."""

    blobs: BlobService
    directories: DirectoryService
    pathinfos: PathInfoService
    nar_index: NarIndex = field(default_factory=MemoryNarIndex)
    description: str = ""
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list, repr=False)
    nar_service: NarService | None = None

    @property
    def nar(self) -> NarService:
        """NARs of this store (plans in the embedded store: :mod:`tvix_store.nar.service`)."""
        if self.nar_service is None:
            self.nar_service = NarService(self.blobs, self.directories)
        return self.nar_service

    async def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        """NAR size and sha256 of ``node``: remotely if the path info service is gRPC."""
        from tvix_store.pathinfoservice.grpc import GrpcPathInfoService

        if isinstance(self.pathinfos, GrpcPathInfoService):
            return await self.pathinfos.calculate_nar(node)
        return await self.nar.calculate(node)

    async def aclose(self) -> None:
        """Close every service (once)."""
        closers, self._closers = self._closers, []
        for close in reversed(closers):
            await close()


def _nar_index_for(pathinfos: PathInfoService) -> NarIndex:
    """A persistent NAR index next to SQLite path infos (also inside a cache), else memory."""
    from tvix_store.pathinfoservice.sqlite import SqlitePathInfoService

    while isinstance(pathinfos, CachePathInfoService):
        pathinfos = pathinfos.near
    if isinstance(pathinfos, SqlitePathInfoService):
        return SqliteNarIndex(pathinfos.path)
    from tvix_store.pathinfoservice.postgres import PostgresPathInfoService  # (no psycopg yet)

    if isinstance(pathinfos, PostgresPathInfoService):
        return pathinfos.nar_index()
    return MemoryNarIndex()


def _lease_writers(
    pathinfos: PathInfoService,
    blobs: BlobService,
    directories: DirectoryService,
    closers: list[Callable[[], Awaitable[None]]],
) -> None:
    """On a shared (PostgreSQL) store, writers of blobs and Directories hold a lease.

    (So that a collector never sweeps what a writer found present and relies on:
    :mod:`tvix_store.sharedgc`.)
    """
    from tvix_store.pathinfoservice.postgres import PostgresPathInfoService

    if not isinstance(pathinfos, PostgresPathInfoService):
        return
    import asyncio

    from tvix_castore.blobservice.objectstore import ObjectStoreBlobService
    from tvix_castore.directoryservice.postgres import PostgresDirectoryService
    from tvix_store.sharedgc import PgLease

    lease = PgLease(pathinfos.database)
    if isinstance(blobs, ObjectStoreBlobService) and blobs.on_write is None:
        blobs.on_write = lease.touch
    if isinstance(directories, PostgresDirectoryService) and directories.on_write is None:
        directories.on_write = lease.touch

    async def release() -> None:
        await asyncio.to_thread(lease.release)

    closers.insert(0, release)  # (closed last: after the services it serves)


def config_from_urls(
    blob_url: str | None, directory_url: str | None, path_info_url: str | None, home: Path
) -> dict[str, dict[str, dict[str, str]]]:
    """The composition that the three service URLs (flags, env vars) stand for.

    A missing URL is the embedded store at ``home``, ``embedded:///dir`` the
    one at ``/dir`` (as ``type = "embedded"``, ``path = "/dir"``); a substituter
    (``nix+http(s)://``) is cached in the embedded store's path infos, as a
    substituter alone would download again on every get.
    """
    embedded = {"type": "embedded", "path": str(home)}

    def entry(url: str | None) -> dict[str, str]:
        if not url:
            return dict(embedded)
        if url.startswith(f"{EMBEDDED_SCHEME}:"):
            return {"type": "embedded", "path": str(embedded_home(url))}
        return {"type": "url", "url": url}

    pathinfos = {"default": entry(path_info_url)}
    if path_info_url and path_info_url.startswith("nix+"):
        pathinfos = {
            "default": {"type": "cache", "near": "local", "far": path_info_url},
            "local": dict(embedded),
        }
    return {
        "blobservices": {"default": entry(blob_url)},
        "directoryservices": {"default": entry(directory_url)},
        "pathinfoservices": pathinfos,
    }


async def open_composition(path: str | Path) -> Store:
    """Open the store described by a composition file (its ``default`` entries)."""
    from tvix_store.composition import load_composition

    return await _build(load_composition(path), f"composition {path}")


async def _build(comp: Composition, description: str) -> Store:
    """The one build of a store: its ``default`` services, NAR index and NAR plans."""
    closers = comp.closers
    try:
        blobs = comp.build("blobservices", "default")
        directories = comp.build("directoryservices", "default")
        pathinfos = comp.build("pathinfoservices", "default")
        nar_index = _nar_index_for(pathinfos)
        closers.append(nar_index.aclose)
        _lease_writers(pathinfos, blobs, directories, closers)
        embedded = comp.embedded_of(blobs)
        nar = NarService(blobs, directories)
        if embedded is not None:  # (its plans are closed with the embedded store)
            nar = embedded.nar(blobs, directories)
    except BaseException:
        for close in reversed(closers):
            with contextlib.suppress(Exception):
                await close()
        raise
    return Store(blobs, directories, pathinfos, nar_index, description, list(closers), nar)


async def open_store(
    blob_url: str | None = None,
    directory_url: str | None = None,
    path_info_url: str | None = None,
    *,
    home: Path | None = None,
    composition: str | Path | None = None,
) -> Store:
    """Open the store: a composition file, or each service from its URL, else the embedded default.

    A composition file replaces the three URLs (giving both is an error). The
    URLs become a composition too (:func:`config_from_urls`), built the same way.
    """
    from tvix_store.composition import Composition

    if composition is not None:
        if blob_url or directory_url or path_info_url:
            raise ConfigError("give either a store composition file or service URLs, not both")
        return await open_composition(composition)
    home = home or data_dir()
    parts = [
        f"{what}={url or f'embedded:{home}'}"
        for what, url in (
            ("blobs", blob_url),
            ("directories", directory_url),
            ("pathinfos", path_info_url),
        )
    ]
    config = config_from_urls(blob_url, directory_url, path_info_url, home)
    return await _build(Composition(config, "service URLs"), ", ".join(parts))
