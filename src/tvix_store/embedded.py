"""The embedded default store: one data directory, assembled in one place.

:class:`Embedded` is the store at one home: its blob service, directory and
path info services, and the NAR service that owns the NAR plans. Every way of
opening it (no flags, env vars, a TOML composition with ``type =
"embedded"``, the export fast path) asks :class:`Embedded` for its parts, so
they cannot drift apart (see :mod:`tvix_store.config`). Importing this module
(unlike :mod:`tvix_store.config`) loads no asyncio, no service registry and no
network code: start-up is a large part of a half-second export.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from nix_compat.store_path import StorePath
from tvix_castore.blobservice.objectstore import ObjectStoreBlobService
from tvix_castore.blobservice.packed import PackedBlobService
from tvix_castore.errors import ConfigError
from tvix_castore.objectstore import LocalObjectStore

if TYPE_CHECKING:
    from tvix_castore.directoryservice.sqlite import SqliteDirectoryService
    from tvix_store.nar.plan import SqliteNarPlans
    from tvix_store.pathinfoservice.sqlite import SqlitePathInfoService

__all__ = [
    "EMBEDDED_SCHEME",
    "ENV_CHUNK_ZSTD",
    "STORE_DB",
    "Embedded",
    "data_dir",
    "embedded_blobs",
    "embedded_home",
    "embedded_zstd_level",
    "export_planned",
]

STORE_DB = "store.sqlite"


ENV_CHUNK_ZSTD = "TVIX_STORE_CHUNK_ZSTD"


def embedded_zstd_level() -> int | None:
    """The zstd level of the embedded store's new chunks; ``None`` (the default): raw frames.

    Like ``/nix/store``, the embedded store keeps file contents uncompressed by
    default (small blobs always were): compressing and decompressing cost more
    CPU than anything else an import or export does. Chunks stay zstd frames
    (raw blocks), so any level can be chosen later and old chunks stay readable.
    """
    text = os.environ.get(ENV_CHUNK_ZSTD, "").strip().lower()
    if text in ("", "none", "0"):
        return None
    try:
        level = int(text)
    except ValueError:
        level = 0
    if not 1 <= level <= 22:
        raise ConfigError(f"{ENV_CHUNK_ZSTD}={text!r}: expected 'none' or a zstd level 1-22")
    return level


class Embedded:
    """The embedded store in ``home``: each part built once, on first use, and shared.

    The blob, directory and path info services and the NAR plans all live in
    ``home`` (``store.sqlite`` and the pack files beside it). :meth:`close`
    closes what was built (the services' own ``aclose`` does the same for
    each, so either way works).
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.db = home / STORE_DB
        self._lock = threading.Lock()
        self._blobs: PackedBlobService | None = None
        self._directories: SqliteDirectoryService | None = None
        self._pathinfos: SqlitePathInfoService | None = None
        self._plans: SqliteNarPlans | None = None

    def _make_home(self) -> None:
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the data directory {self.home}: {exc}") from exc

    def blobs(self) -> PackedBlobService:
        """The blob service (small blobs in packs, large as chunks)."""
        with self._lock:
            if self._blobs is None:
                level = embedded_zstd_level()
                self._make_home()
                self._blobs = PackedBlobService(
                    self.db,
                    ObjectStoreBlobService(LocalObjectStore(self.home / "blobs"), zstd_level=level),
                )
            return self._blobs

    def has_blobs(self, blobs: object) -> bool:
        """Whether ``blobs`` is this store's blob service (built already)."""
        return blobs is not None and blobs is self._blobs

    def owns(self, service: object) -> bool:
        """Whether ``service`` is one of this store's parts (closed by :meth:`close`)."""
        parts = (self._blobs, self._directories, self._pathinfos, self._plans)
        return service is not None and any(service is part for part in parts)

    def directories(self) -> SqliteDirectoryService:
        """The directory service (``store.sqlite``)."""
        from tvix_castore.directoryservice.sqlite import SqliteDirectoryService

        with self._lock:
            if self._directories is None:
                self._make_home()
                self._directories = SqliteDirectoryService(self.db)
            return self._directories

    def pathinfos(self) -> SqlitePathInfoService:
        """The path info service (``store.sqlite``)."""
        from tvix_store.pathinfoservice.sqlite import SqlitePathInfoService

        with self._lock:
            if self._pathinfos is None:
                self._make_home()
                self._pathinfos = SqlitePathInfoService(self.db)
            return self._pathinfos

    def plans(self) -> SqliteNarPlans:
        """The NAR plans (``store.sqlite``), for a store whose blobs are these."""
        from tvix_store.nar.plan import SqliteNarPlans

        with self._lock:
            if self._plans is None:
                self._make_home()
                self._plans = SqliteNarPlans(self.db)
            return self._plans

    def close(self) -> None:
        """Close every part built (blocking)."""
        with self._lock:
            plans, self._plans = self._plans, None
            pathinfos, self._pathinfos = self._pathinfos, None
            directories, self._directories = self._directories, None
            blobs, self._blobs = self._blobs, None
        if plans is not None:
            plans.close()
        if pathinfos is not None:
            pathinfos.close()
        if directories is not None:
            directories.close()
        if blobs is not None:
            blobs.close()

    async def aclose(self) -> None:
        """:meth:`close` (the parts close without blocking for long)."""
        self.close()


EMBEDDED_SCHEME = "embedded"


def embedded_home(url: str) -> Path:
    """The home of an ``embedded:///abs/dir`` URL (the embedded store as a service URL).

    The same URL works for each of the three services, so flags and env vars
    can name the store a composition's ``type = "embedded"`` entries name.
    """
    from tvix_castore.registry import ServiceUrl

    parsed = ServiceUrl.parse(url)
    if parsed.scheme != EMBEDDED_SCHEME:
        raise parsed.error("not an embedded:// URL")
    parsed.no_host()
    parsed.check_query()
    return Path(parsed.absolute_path("data directory"))


def embedded_blobs(home: Path) -> PackedBlobService:
    """The embedded blob service in ``home`` (see :meth:`Embedded.blobs`)."""
    return Embedded(home).blobs()


def data_dir() -> Path:
    """Where the embedded store lives."""
    home = os.environ.get("TVIX_STORE_HOME")
    if home:
        return Path(home)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "tvix-store"


def export_planned(home: Path, store_path: StorePath, fd: int) -> bool:
    """Write ``store_path``'s NAR to ``fd`` from a plan vouching for its NarHash (blocking).

    ``False``, having written nothing, when that is not possible (no such
    path or plan, not a directory, no store at all): the caller then goes the
    general way, which also reports what is missing.

    Raises:
        NarRenderError: a blob is missing or corrupt (after the bytes before it).
        OSError: writing to ``fd`` failed.
    """
    from tvix_store.nar.plan import write_vouched_sync

    store = Embedded(home)
    if not store.db.is_file():
        return False
    try:
        info = store.pathinfos().get_sync(store_path.digest)
        if info is None or info.store_path != store_path:
            return False
        return write_vouched_sync(
            store.plans(), store.blobs(), info.node, info.nar_size, info.nar_sha256, fd
        )
    finally:
        store.close()
