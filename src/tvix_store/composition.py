"""Store composition: named services per kind, wired by name, from a TOML file.

Modelled on tvix's composition (B §6.2). Three tables, ``blobservices``,
``directoryservices`` and ``pathinfoservices``, each holding named entries;
every entry has a ``type`` and typed fields (unknown fields are errors).
Fields that refer to other services take an entry name of the right kind, or
an anonymous URL (anything containing ``://``). The entries named
``default`` are what commands use. Each entry is built at most once and
shared; reference cycles and unknown names are reported with the path that
led to them::

    [blobservices.default]
    type = "embedded"            # the embedded store's packs (as with no flags)
    path = "/var/lib/tvix-store"

    [directoryservices.default]
    type = "embedded"
    path = "/var/lib/tvix-store"

    [pathinfoservices.local]
    type = "embedded"
    path = "/var/lib/tvix-store"

    [pathinfoservices.upstream]
    type = "nix"
    base_url = "https://cache.nixos.org"
    public_keys = ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]

    [pathinfoservices.default]
    type = "cache"
    near = "local"
    far = "upstream"

Entries of ``type = "embedded"`` with the same ``path`` are parts of one
:class:`~tvix_store.embedded.Embedded` store (so the store gets its NAR
plans, exactly as with no flags at all); ``type = "url"`` takes any service
URL the command-line flags take. The flags and environment variables are
turned into such a composition too (:func:`tvix_store.config.open_store`):
every way of opening a store runs the same build.
"""

from __future__ import annotations

import tomllib
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from nix_compat.errors import NixCompatError
from nix_compat.signing import SigningKey, VerifyingKey
from tvix_castore.blobservice.base import BlobService
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import CompositionError, ConfigError
from tvix_store.embedded import Embedded
from tvix_store.pathinfoservice.base import PathInfoService

__all__ = ["Composition", "load_composition"]

KINDS = {
    "blobservices": "blob service",
    "directoryservices": "directory service",
    "pathinfoservices": "path info service",
}

# kind -> type -> {field: (python type, required)}
_FIELDS: dict[str, dict[str, dict[str, tuple[type, bool]]]] = {
    "blobservices": {
        "memory": {},
        "embedded": {"path": (str, True)},
        "url": {"url": (str, True)},
        "objectstore": {
            "object_store_url": (str, True),
            "object_store_options": (dict, False),
            "avg_chunk_size": (int, False),
        },
        "grpc": {"url": (str, True)},
        "combined": {"local": (str, True), "remote": (str, True)},
    },
    "directoryservices": {
        "memory": {},
        "embedded": {"path": (str, True)},
        "url": {"url": (str, True)},
        "sqlite": {"path": (str, True)},
        "objectstore": {"object_store_url": (str, True), "object_store_options": (dict, False)},
        "grpc": {"url": (str, True)},
        "cache": {"near": (str, True), "far": (str, True)},
    },
    "pathinfoservices": {
        "memory": {},
        "embedded": {"path": (str, True)},
        "url": {"url": (str, True)},
        "sqlite": {"path": (str, True)},
        "grpc": {"url": (str, True)},
        "nix": {
            "base_url": (str, True),
            "public_keys": (list, False),
            "blob_service": (str, False),
            "directory_service": (str, False),
        },
        "cache": {"near": (str, True), "far": (str, True)},
        "lru": {"capacity": (int, True)},
        "keyfile-signing": {"inner": (str, True), "keyfile": (str, True)},
    },
}


class Composition:
    """A validated composition; :meth:`build` instantiates entries on demand."""

    def __init__(self, config: Mapping[str, Any], source: str = "<composition>") -> None:
        self.source = source
        self._config: dict[str, dict[str, dict[str, Any]]] = {}
        for kind in config:
            if kind not in KINDS:
                raise CompositionError(
                    f"{source}: unknown section [{kind}] (use {', '.join(KINDS)})"
                )
        for kind in KINDS:
            entries = config.get(kind, {})
            if not isinstance(entries, dict):
                raise CompositionError(f"{source}: [{kind}] must be a table of named services")
            for name, entry in entries.items():
                self._check(kind, name, entry)
            self._config[kind] = dict(entries)
        self._built: dict[tuple[str, str], Any] = {}
        self._building: list[tuple[str, str]] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._embedded: dict[Path, Embedded] = {}

    def config(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The validated entries (kind → name → entry), as written."""
        return {
            kind: {n: dict(e) for n, e in entries.items()} for kind, entries in self._config.items()
        }

    def service_urls(self) -> list[str]:
        """Every service URL its entries name (``type = "url"`` and the like), in order."""
        return [
            e["url"]
            for kind in KINDS
            for e in self._config[kind].values()
            if isinstance(e.get("url"), str)
        ]

    def embedded(self, path: str | Path) -> Embedded:
        """The embedded store at ``path`` (one per path, shared by its entries)."""
        home = Path(path)
        found = self._embedded.get(home)
        if found is None:
            found = self._embedded[home] = Embedded(home)
            self._closers.append(found.aclose)  # its parts are closed with it, once
        return found

    def embedded_of(self, blobs: BlobService) -> Embedded | None:
        """The embedded store whose blob service ``blobs`` is, if any."""
        for store in self._embedded.values():
            if store.has_blobs(blobs):
                return store
        return None

    def _check(self, kind: str, name: str, entry: Any) -> None:
        where = f"{self.source}: {kind}.{name}"
        if not isinstance(entry, dict):
            raise CompositionError(f"{where} must be a table")
        typ = entry.get("type")
        types = _FIELDS[kind]
        if typ not in types:
            raise CompositionError(f"{where}: unknown type {typ!r} (known: {', '.join(types)})")
        fields = types[typ]
        for key, value in entry.items():
            if key == "type":
                continue
            if key not in fields:
                raise CompositionError(
                    f"{where}: unknown field {key!r} for type {typ!r}"
                    f" (fields: {', '.join(fields) or 'none'})"
                )
            want, _ = fields[key]
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise CompositionError(f"{where}.{key} must be a {want.__name__}")
        for key, (_, required) in fields.items():
            if required and key not in entry:
                raise CompositionError(f"{where}: missing field {key!r}")

    @property
    def closers(self) -> list[Callable[[], Awaitable[None]]]:
        """Close functions of everything built, in build order."""
        return self._closers

    def _ref(self, kind: str, ref: str) -> Any:
        if "://" in ref:
            return self._from_url(kind, ref)
        return self.build(kind, ref)

    def _from_url(self, kind: str, url: str) -> Any:
        from tvix_castore.registry import blob_service_from_url, directory_service_from_url
        from tvix_store.config import path_info_service_from_url
        from tvix_store.embedded import EMBEDDED_SCHEME, embedded_home

        if url.startswith(f"{EMBEDDED_SCHEME}:"):  # the same store as type = "embedded"
            store = self.embedded(embedded_home(url))
            if kind == "blobservices":
                return store.blobs()
            return store.directories() if kind == "directoryservices" else store.pathinfos()
        if kind == "blobservices":
            svc: Any = blob_service_from_url(url)
        elif kind == "directoryservices":
            svc = directory_service_from_url(url)
        elif url.startswith("nix+"):  # substituters ingest into the default services
            svc = path_info_service_from_url(
                url,
                self.build("blobservices", "default"),
                self.build("directoryservices", "default"),
            )
        else:
            from tvix_castore.blobservice.memory import MemoryBlobService
            from tvix_castore.directoryservice.memory import MemoryDirectoryService

            svc = path_info_service_from_url(url, MemoryBlobService(), MemoryDirectoryService())
        self._closers.append(svc.aclose)
        return svc

    def build(self, kind: str, name: str) -> Any:
        """The service ``name`` of ``kind`` (built once, then shared)."""
        key = (kind, name)
        if key in self._built:
            return self._built[key]
        if key in self._building:
            chain = " -> ".join(f"{k}.{n}" for k, n in [*self._building, key])
            raise CompositionError(f"{self.source}: reference cycle: {chain}")
        entry = self._config[kind].get(name)
        if entry is None:
            via = (
                f" (referenced by {self._building[-1][0]}.{self._building[-1][1]})"
                if self._building
                else ""
            )
            raise CompositionError(f"{self.source}: {KINDS[kind]} {name!r} not found{via}")
        self._building.append(key)
        try:
            svc = self._make(kind, name, entry)
        finally:
            self._building.pop()
        self._built[key] = svc
        if not any(store.owns(svc) for store in self._embedded.values()):
            self._closers.append(svc.aclose)
        return svc

    def _make(self, kind: str, name: str, e: dict[str, Any]) -> Any:
        typ = e["type"]
        where = f"{self.source}: {kind}.{name}"
        try:
            return self._make_inner(kind, typ, e)
        except (ConfigError, NixCompatError, OSError) as exc:
            if isinstance(exc, CompositionError) or (typ == "url" and isinstance(exc, ConfigError)):
                raise  # (a URL's error names the URL and the rule it breaks)
            raise CompositionError(f"{where}: {exc}") from exc

    def _make_inner(self, kind: str, typ: str, e: dict[str, Any]) -> Any:
        from tvix_castore.blobservice.memory import MemoryBlobService
        from tvix_castore.blobservice.objectstore import ObjectStoreBlobService
        from tvix_castore.directoryservice.memory import MemoryDirectoryService
        from tvix_castore.directoryservice.sqlite import SqliteDirectoryService
        from tvix_store.pathinfoservice.memory import MemoryPathInfoService
        from tvix_store.pathinfoservice.sqlite import SqlitePathInfoService

        if typ in ("grpc", "url"):
            return self._from_url(kind, e["url"])
        if kind == "blobservices":
            if typ == "memory":
                return MemoryBlobService()
            if typ == "embedded":
                return self.embedded(e["path"]).blobs()
            if typ == "objectstore":
                from tvix_castore.registry import blob_service_from_url

                svc = blob_service_from_url(_objectstore_url(e))
                assert isinstance(svc, ObjectStoreBlobService)
                return svc
            from tvix_castore.blobservice.combined import CombinedBlobService

            return CombinedBlobService(self._ref(kind, e["local"]), self._ref(kind, e["remote"]))
        if kind == "directoryservices":
            if typ == "memory":
                return MemoryDirectoryService()
            if typ == "embedded":
                return self.embedded(e["path"]).directories()
            if typ == "sqlite":
                return SqliteDirectoryService(Path(e["path"]))
            if typ == "objectstore":  # (the URL factory is the one definition of it)
                from tvix_castore.registry import directory_service_from_url

                return directory_service_from_url(_objectstore_url(e))
            from tvix_castore.directoryservice.cache import CacheDirectoryService

            return CacheDirectoryService(self._ref(kind, e["near"]), self._ref(kind, e["far"]))
        # path info services
        from tvix_store.pathinfoservice import combinators

        if typ == "memory":
            return MemoryPathInfoService()
        if typ == "embedded":
            return self.embedded(e["path"]).pathinfos()
        if typ == "sqlite":
            return SqlitePathInfoService(Path(e["path"]))
        if typ == "nix":
            from tvix_store.pathinfoservice.nix_http import NixHttpPathInfoService

            keys = None
            if "public_keys" in e:
                keys = [VerifyingKey.parse(str(k)) for k in e["public_keys"]]
            blobs: BlobService = self._ref("blobservices", e.get("blob_service", "default"))
            dirs: DirectoryService = self._ref(
                "directoryservices", e.get("directory_service", "default")
            )
            return NixHttpPathInfoService(e["base_url"], blobs, dirs, keys)
        if typ == "cache":
            near: PathInfoService = self._ref(kind, e["near"])
            far: PathInfoService = self._ref(kind, e["far"])
            return combinators.CachePathInfoService(near, far)
        if typ == "lru":
            return combinators.LruPathInfoService(e["capacity"])
        inner: PathInfoService = self._ref(kind, e["inner"])
        return combinators.SigningPathInfoService(inner, SigningKey.from_file(e["keyfile"]))


def _objectstore_url(e: dict[str, Any]) -> str:
    """The ``objectstore+…`` URL of a ``type = "objectstore"`` entry (blobs or directories).

    ``object_store_url`` is ``file:///…``, ``memory:///``, ``s3://bucket/prefix``,
    ``gs://…`` or ``az://container/prefix`` (as in tvix); ``object_store_options``
    (credentials, endpoint, region …) become the URL's query, so a secret can
    stay out of the URL itself.
    """
    from urllib.parse import quote

    base = str(e["object_store_url"])
    for alias, scheme in (("az://", "azure://"), ("azure://", "azure://")):
        if base.startswith(alias):
            base = scheme + base[len(alias) :]
    params: list[tuple[str, str]] = []
    for key, value in e.get("object_store_options", {}).items():
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, str | int):
            raise CompositionError(f"object_store_options.{key} must be a string, integer or bool")
        params.append((key, str(value)))
    if "avg_chunk_size" in e:
        params.append(("avg_chunk_size", str(e["avg_chunk_size"])))
    query = "&".join(f"{k}={quote(v, safe='/:')}" for k, v in params)
    sep = "&" if "?" in base else "?"
    return "objectstore+" + base + (sep + query if query else "")


def load_composition(path: str | Path) -> Composition:
    """Read and validate a composition TOML file."""
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except OSError as exc:
        raise CompositionError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CompositionError(f"{path}: invalid TOML: {exc}") from exc
    return Composition(config, str(path))
