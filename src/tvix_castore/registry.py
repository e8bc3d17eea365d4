"""Service URLs → services: one registry per kind, keyed by URL scheme.

Each scheme maps to a factory that validates the whole URL (every host,
path and query parameter it does not use is rejected) and only then builds
the service. ``tvix_store`` and third parties add schemes with
:func:`register_blob_service` / :func:`register_directory_service`.

==============================================  ====  ====  =======================
URL                                             blob  dir   rules
==============================================  ====  ====  =======================
``memory://``                                   ✓     ✓     no host, no path, no query
``sqlite:///abs/path.sqlite``                   –     ✓     no host; absolute file path
``objectstore+file:///abs/dir``                 ✓     ✓     no host; absolute path;
                                                            ``?avg_chunk_size=N`` (blobs)
``objectstore+memory:///``                      ✓     ✓     no host; ``?avg_chunk_size=N`` (blobs)
``objectstore+s3://bucket/prefix``              ✓     ✓     ``?endpoint=&region=&allow_http=1``
                                                            …: :mod:`tvix_castore.cloudstore`
``objectstore+gs://bucket/prefix``              ✓     ✓     (as above)
``objectstore+azure://container/prefix``        ✓     ✓     ``?account_name=…`` (as above)
``postgresql://user@host:port/db``              –     ✓     libpq URI; ``?schema=name``
``grpc+http://host[:port]``, ``grpc+https://…`` ✓     ✓     empty path; ``?wait-connect=1``
``grpc+unix:///abs/socket``                     ✓     ✓     no host; ``?wait-connect=1``
==============================================  ====  ====  =======================

gRPC channels are bound to the event loop they are created on: build gRPC
services inside the loop that will use them. They connect on the first call,
or right away with ``?wait-connect=1`` (errors still surface on the first
call)::

    >>> svc = blob_service_from_url("objectstore+memory:///?avg_chunk_size=65536")
    >>> type(svc).__name__, svc.avg_size
    ('ObjectStoreBlobService', 65536)
    >>> blob_service_from_url("memory:///")
    Traceback (most recent call last):
    ...
    tvix_castore.errors.ConfigError: 'memory:///': memory:// takes no path
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from tvix_castore.errors import ConfigError, UnknownScheme

if TYPE_CHECKING:
    from tvix_castore.blobservice.base import BlobService
    from tvix_castore.directoryservice.base import DirectoryService
    from tvix_castore.objectstore import ObjectStore

__all__ = [
    "MAX_AVG_CHUNK_SIZE",
    "MIN_AVG_CHUNK_SIZE",
    "BlobServiceFactory",
    "DirectoryServiceFactory",
    "ServiceUrl",
    "blob_service_from_url",
    "blob_service_schemes",
    "directory_service_from_url",
    "directory_service_schemes",
    "register_blob_service",
    "register_directory_service",
]

MIN_AVG_CHUNK_SIZE = 512
"""Smallest ``avg_chunk_size``: FastCDC needs min = avg/2 ≥ 256 and max = 2·avg ≥ 1024."""
MAX_AVG_CHUNK_SIZE = 2 << 20
"""Largest ``avg_chunk_size``: FastCDC needs min = avg/2 ≤ 1 MiB."""

_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")


@dataclass(frozen=True, slots=True)
class ServiceUrl:
    """A parsed service URL, with the checks factories use to validate it.

    ``host`` is the raw authority (``[user@]host[:port]``), ``path`` is
    percent-decoded, ``params`` are the query pairs in order (repeats kept).
    Every check raises :class:`~tvix_castore.errors.ConfigError` naming the URL.
    """

    url: str
    scheme: str
    host: str
    path: str
    params: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, url: str) -> ServiceUrl:
        """Split ``url`` (``scheme://host/path?query``); fragments are refused."""
        if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in url):
            raise ConfigError(f"{url!r}: service URLs may not contain whitespace or controls")
        scheme, sep, _ = url.partition("://")
        if not sep or not _SCHEME.fullmatch(scheme.lower()):
            raise ConfigError(f"{url!r}: not a service URL (expected scheme://...)")
        try:
            parts = urlsplit(url)
            params = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
        except ValueError as exc:
            raise ConfigError(f"{url!r}: malformed URL: {exc}") from exc
        if parts.fragment or url.endswith("#"):
            raise ConfigError(f"{url!r}: service URLs take no #fragment")
        return cls(url, parts.scheme, parts.netloc, unquote(parts.path), tuple(params))

    def error(self, message: str) -> ConfigError:
        """A :class:`ConfigError` about this URL."""
        return ConfigError(f"{self.url!r}: {message}")

    def no_host(self) -> None:
        """Refuse any host (``scheme:///path`` is the only form)."""
        if self.host:
            raise self.error(f"{self.scheme}:// takes no host (got {self.host!r})")

    def no_path(self) -> None:
        """Refuse any path, even a lone ``/``."""
        if self.path:
            raise self.error(f"{self.scheme}:// takes no path")

    def absolute_path(self, what: str) -> str:
        """The path, which must be absolute, not ``/`` itself, and not end in ``/``."""
        if not self.path:
            raise self.error(f"{self.scheme}:// needs an absolute {what} path")
        if not self.path.startswith("/"):
            raise self.error(f"{what} path must be absolute")
        if self.path == "/" or self.path.endswith("/"):
            raise self.error(f"{what} path must name a {what}, not end in '/'")
        if "\0" in self.path:
            raise self.error(f"{what} path contains NUL")
        return self.path

    def host_port(self) -> tuple[str, int | None]:
        """A required ``host[:port]`` without user info; the port if given."""
        parts = urlsplit(self.url)
        if not self.host or not parts.hostname:
            raise self.error(f"{self.scheme}:// needs a host")
        if "@" in self.host:
            raise self.error("user info (user@host) is not supported")
        try:
            port = parts.port
        except ValueError as exc:
            raise self.error(f"invalid port: {exc}") from exc
        if port == 0:
            raise self.error("port 0 is not a port to connect to")
        return parts.hostname, port

    def check_query(self, *allowed: str) -> None:
        """Refuse query parameters other than ``allowed``."""
        unknown = sorted({k for k, _ in self.params if k not in allowed})
        if unknown:
            accepts = f"accepts only {', '.join(allowed)}" if allowed else "takes no query"
            raise self.error(
                f"unknown parameter(s) {', '.join(unknown)}; {self.scheme}:// {accepts}"
            )

    def get(self, name: str) -> str | None:
        """The single value of query parameter ``name``, ``None`` if absent."""
        values = self.get_all(name)
        if len(values) > 1:
            raise self.error(f"parameter {name} given {len(values)} times")
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        """Every value of query parameter ``name``, in order."""
        return [v for k, v in self.params if k == name]

    def get_int(self, name: str, low: int, high: int) -> int | None:
        """Query parameter ``name`` as a decimal integer in ``[low, high]``."""
        raw = self.get(name)
        if raw is None:
            return None
        if not raw.isascii() or not raw.isdigit():
            raise self.error(f"{name} must be a decimal integer, got {raw!r}")
        value = int(raw)
        if not low <= value <= high:
            raise self.error(f"{name}={value} is out of range [{low}, {high}]")
        return value

    def get_flag(self, name: str) -> bool:
        """Query parameter ``name`` as ``0``/``1`` (absent = false)."""
        raw = self.get(name)
        if raw is None or raw == "0":
            return False
        if raw == "1":
            return True
        raise self.error(f"{name} must be 0 or 1, got {raw!r}")


BlobServiceFactory = Callable[[ServiceUrl], "BlobService"]
"""Validates a :class:`ServiceUrl` completely, then builds the service."""
DirectoryServiceFactory = Callable[[ServiceUrl], "DirectoryService"]
"""Validates a :class:`ServiceUrl` completely, then builds the service."""

_F = TypeVar("_F")
_G = TypeVar("_G")
_BLOB_SERVICES: dict[str, BlobServiceFactory] = {}
_DIRECTORY_SERVICES: dict[str, DirectoryServiceFactory] = {}


def _register(registry: dict[str, _F], kind: str, scheme: str, factory: _F, replace: bool) -> None:
    if not _SCHEME.fullmatch(scheme):
        raise ConfigError(f"invalid URL scheme {scheme!r} (lowercase letters, digits, '+-.')")
    if scheme in registry and not replace:
        raise ConfigError(f"a {kind} service is already registered for {scheme}://")
    registry[scheme] = factory


def register_blob_service(
    scheme: str, factory: BlobServiceFactory, *, replace: bool = False
) -> None:
    """Serve ``scheme://…`` blob service URLs with ``factory``.

    Raises:
        ConfigError: ``scheme`` is malformed, or taken and ``replace`` is false.
    """
    _register(_BLOB_SERVICES, "blob", scheme, factory, replace)


def register_directory_service(
    scheme: str, factory: DirectoryServiceFactory, *, replace: bool = False
) -> None:
    """Serve ``scheme://…`` directory service URLs with ``factory``.

    Raises:
        ConfigError: ``scheme`` is malformed, or taken and ``replace`` is false.
    """
    _register(_DIRECTORY_SERVICES, "directory", scheme, factory, replace)


def blob_service_schemes() -> list[str]:
    """The registered blob service schemes, sorted."""
    return sorted(_BLOB_SERVICES)


def directory_service_schemes() -> list[str]:
    """The registered directory service schemes, sorted."""
    return sorted(_DIRECTORY_SERVICES)


def _lookup(
    registry: dict[str, _F], kind: str, url: str, other: dict[str, _G], other_kind: str
) -> tuple[_F, ServiceUrl]:
    parsed = ServiceUrl.parse(url)
    factory = registry.get(parsed.scheme)
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(registry))
        hint = f"; {parsed.scheme}:// is a {other_kind} service" if parsed.scheme in other else ""
        raise UnknownScheme(
            f"{url!r}: no {kind} service for scheme {parsed.scheme!r}{hint} (known: {known})"
        )
    return factory, parsed


def blob_service_from_url(url: str) -> BlobService:
    """Build the blob service ``url`` describes (see the module table).

    Raises:
        UnknownScheme: no blob service is registered for the URL's scheme.
        ConfigError: the URL is malformed or has parts its scheme does not use.
    """
    factory, parsed = _lookup(_BLOB_SERVICES, "blob", url, _DIRECTORY_SERVICES, "directory")
    return factory(parsed)


def directory_service_from_url(url: str) -> DirectoryService:
    """Build the directory service ``url`` describes (see the module table).

    Raises:
        UnknownScheme: no directory service is registered for the URL's scheme.
        ConfigError: the URL is malformed or has parts its scheme does not use.
    """
    factory, parsed = _lookup(_DIRECTORY_SERVICES, "directory", url, _BLOB_SERVICES, "blob")
    return factory(parsed)


# -- built-in backends --------------------------------------------------------------------------
# Backends are imported inside their factory: gRPC in particular costs start-up time.


def _memory_url(url: ServiceUrl) -> None:
    url.no_host()
    url.no_path()
    url.check_query()


def _memory_blobs(url: ServiceUrl) -> BlobService:
    _memory_url(url)
    from tvix_castore.blobservice.memory import MemoryBlobService

    return MemoryBlobService()


def _memory_directories(url: ServiceUrl) -> DirectoryService:
    _memory_url(url)
    from tvix_castore.directoryservice.memory import MemoryDirectoryService

    return MemoryDirectoryService()


def _sqlite_directories(url: ServiceUrl) -> DirectoryService:
    url.no_host()
    path = url.absolute_path("database file")
    url.check_query()
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise url.error(f"directory {parent} does not exist")
    from tvix_castore.directoryservice.sqlite import SqliteDirectoryService

    return SqliteDirectoryService(path)


def _avg_chunk_size(url: ServiceUrl) -> int:
    from tvix_castore.blobservice.objectstore import DEFAULT_AVG_CHUNK_SIZE

    url.check_query("avg_chunk_size")
    value = url.get_int("avg_chunk_size", MIN_AVG_CHUNK_SIZE, MAX_AVG_CHUNK_SIZE)
    return DEFAULT_AVG_CHUNK_SIZE if value is None else value


def _object_store(url: ServiceUrl, *, blobs: bool) -> tuple[ObjectStore, int]:
    """The store of an ``objectstore+{file,memory,s3,gs,azure}://`` URL, and its chunk size.

    One definition for both kinds, so one URL can name both services' place
    (their keys, ``chunks/``, ``blobs/`` and ``dirs/``, never collide). Only
    blob services take ``avg_chunk_size``.
    """
    from tvix_castore.blobservice.objectstore import DEFAULT_AVG_CHUNK_SIZE
    from tvix_castore.objectstore import LocalObjectStore, MemoryObjectStore

    if not blobs and url.get("avg_chunk_size") is not None:
        raise url.error("avg_chunk_size is a blob service parameter, not a directory one")
    if url.scheme not in ("objectstore+file", "objectstore+memory"):
        from tvix_castore.cloudstore import cloud_store_from_url

        cloud, avg = cloud_store_from_url(url)
        return cloud, avg or DEFAULT_AVG_CHUNK_SIZE
    url.no_host()
    store: ObjectStore
    if url.scheme == "objectstore+file":
        root = url.absolute_path("directory")
        avg = _avg_chunk_size(url)
        if os.path.exists(root) and not os.path.isdir(root):
            raise url.error(f"{root} exists and is not a directory")
        store = LocalObjectStore(root)
    else:
        if url.path not in ("", "/"):
            raise url.error("objectstore+memory:// takes no path (use objectstore+memory:///)")
        avg = _avg_chunk_size(url)
        store = MemoryObjectStore()
    return store, avg


def _objectstore_blobs(url: ServiceUrl) -> BlobService:
    from tvix_castore.blobservice.objectstore import ObjectStoreBlobService

    store, avg = _object_store(url, blobs=True)
    return ObjectStoreBlobService(store, avg)


def _objectstore_directories(url: ServiceUrl) -> DirectoryService:
    from tvix_castore.directoryservice.objectstore import ObjectStoreDirectoryService

    store, _ = _object_store(url, blobs=False)
    return ObjectStoreDirectoryService(store)


def _postgres_directories(url: ServiceUrl) -> DirectoryService:
    from tvix_castore.directoryservice.postgres import PostgresDirectoryService

    return PostgresDirectoryService(url.url)


def _grpc_url(url: ServiceUrl) -> bool:
    """Validate a gRPC URL; whether to connect eagerly."""
    if url.scheme == "grpc+unix":
        url.no_host()
        url.absolute_path("socket")
    else:
        url.host_port()
        if url.path:
            raise url.error(f"{url.scheme}:// takes no path (got {url.path!r})")
    url.check_query("wait-connect")
    return url.get_flag("wait-connect")


def _grpc_blobs(url: ServiceUrl) -> BlobService:
    eager = _grpc_url(url)
    from tvix_castore.blobservice.grpc import GrpcBlobService
    from tvix_castore.rpc.channel import open_channel

    channel = open_channel(url.url)
    if eager:
        channel.get_state(try_to_connect=True)
    return GrpcBlobService(channel)


def _grpc_directories(url: ServiceUrl) -> DirectoryService:
    eager = _grpc_url(url)
    from tvix_castore.directoryservice.grpc import GrpcDirectoryService
    from tvix_castore.rpc.channel import open_channel

    channel = open_channel(url.url)
    if eager:
        channel.get_state(try_to_connect=True)
    return GrpcDirectoryService(channel)


register_blob_service("memory", _memory_blobs)
for _scheme in (
    "objectstore+file",
    "objectstore+memory",
    "objectstore+s3",
    "objectstore+gs",
    "objectstore+azure",
):
    register_blob_service(_scheme, _objectstore_blobs)
    register_directory_service(_scheme, _objectstore_directories)
register_directory_service("memory", _memory_directories)
register_directory_service("postgresql", _postgres_directories)
register_directory_service("postgres", _postgres_directories)
register_directory_service("sqlite", _sqlite_directories)
for _scheme in ("grpc+http", "grpc+https", "grpc+unix"):
    register_blob_service(_scheme, _grpc_blobs)
    register_directory_service(_scheme, _grpc_directories)
del _scheme
