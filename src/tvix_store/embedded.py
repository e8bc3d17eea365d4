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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nix_compat.store_path import StorePath
from tvix_castore.blobservice.base import BlobService
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import ConfigError
from tvix_castore.packstore.format import Kind
from tvix_castore.packstore.service import PackBlobService

if TYPE_CHECKING:
    from tvix_castore.packstore.directories import PackDirectoryService
    from tvix_store.leases import ProcessLease
    from tvix_store.nar.plancache import PlanCache
    from tvix_store.nar.service import NarService
    from tvix_store.pathinfoservice.sqlite import SqlitePathInfoService

__all__ = [
    "EMBEDDED_SCHEME",
    "STORE_DB",
    "Embedded",
    "data_dir",
    "embedded_blobs",
    "embedded_home",
    "export_planned",
]

STORE_DB = "store.sqlite"


class Embedded:
    """The embedded store in ``home``: each part built once, on first use, and shared.

    The blob, directory and path info services and the NAR plans all live in
    ``home`` (``store.sqlite`` and ``packs/``). Directories and PathInfos are
    journaled into the packs before their rows commit, so the packs alone hold
    the whole store: opening a store whose ``store.sqlite`` is gone (or behind
    the packs) puts them back (:meth:`_restore`, called by the pack store's
    rebuild). :meth:`close` closes what was built.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.db = home / STORE_DB
        self._lock = threading.RLock()  # (a rebuild in blobs() restores through the others)
        self._blobs: PackBlobService | None = None
        self._directories: PackDirectoryService | None = None
        self._pathinfos: SqlitePathInfoService | None = None
        self._plans: PlanCache | None = None
        self._lease: ProcessLease | None = None

    @property
    def lease(self) -> ProcessLease:
        """The write lease of this process on the store (see :mod:`tvix_store.leases`)."""
        from tvix_store.leases import ProcessLease

        with self._lock:
            if self._lease is None:
                self._lease = ProcessLease(self.db)
            return self._lease

    def _hold(self) -> None:
        self.lease.hold()

    def _make_home(self) -> None:
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the data directory {self.home}: {exc}") from exc

    def blobs(self) -> PackBlobService:
        """The blob service: compressed packs (and the layout of older releases, read)."""
        with self._lock:
            if self._blobs is None:
                self._make_home()
                self._blobs = PackBlobService(
                    self.home, on_record=self._restore, on_write=self._hold
                )
            return self._blobs

    def _restore(self, kind: Kind, key: bytes, data: memoryview) -> None:
        """A PathInfo found in the packs the index is behind on: put back.

        (Directories need nothing: they live in the packs, indexed like blobs.)
        """
        if kind == Kind.PATHINFOS:
            self.pathinfos().restore_sync(key, data)

    def _journal_pathinfo(self, records: Sequence[tuple[bytes, int, bytes]]) -> None:
        from tvix_store.pathinfoservice.sqlite import journal_key

        self.blobs().add_records(Kind.PATHINFOS, [(journal_key(d, n), r) for d, n, r in records])

    def live_records(self, kind: Kind, keys: Sequence[bytes]) -> set[bytes]:
        """Records compaction keeps: every Directory, each path's latest PathInfo record."""
        if kind != Kind.PATHINFOS:
            return set(keys)
        return self.pathinfos().live_records(keys)

    def has_blobs(self, blobs: object) -> bool:
        """Whether ``blobs`` is this store's blob service (built already)."""
        return blobs is not None and blobs is self._blobs

    def owns(self, service: object) -> bool:
        """Whether ``service`` is one of this store's parts (closed by :meth:`close`)."""
        parts = (self._blobs, self._directories, self._pathinfos, self._plans)
        return service is not None and any(service is part for part in parts)

    def directories(self) -> PackDirectoryService:
        """The directory service: Directories in the packs, stored once, compressed.

        A store of an older release also has them in a ``directories`` table
        of ``store.sqlite``: read there until ``tvix-store compact`` moves them.
        """
        from tvix_castore.directoryservice.sqlite import SqliteDirectoryService
        from tvix_castore.packstore.directories import PackDirectoryService

        with self._lock:
            if self._directories is None:
                blobs = self.blobs()
                legacy = None
                if blobs.index.has_table("directories"):
                    legacy = SqliteDirectoryService(self.db)
                self._directories = PackDirectoryService(blobs, legacy=legacy)
            return self._directories

    def pathinfos(self) -> SqlitePathInfoService:
        """The path info service (``store.sqlite``; PathInfos journaled in the packs)."""
        from tvix_store.pathinfoservice.sqlite import SqlitePathInfoService

        with self._lock:
            if self._pathinfos is None:
                self._make_home()
                self._pathinfos = SqlitePathInfoService(self.db, journal=self._journal_pathinfo)
            return self._pathinfos

    def plans(self) -> PlanCache:
        """The NAR plan cache (``store.sqlite``)."""
        from tvix_store.nar.plancache import PlanCache

        with self._lock:
            if self._plans is None:
                self._make_home()
                self._plans = PlanCache(self.db)
            return self._plans

    def nar(self, blobs: BlobService, directories: DirectoryService) -> NarService:
        """The NAR service of a store whose blobs are these (plans read through the packs)."""
        from tvix_store.nar.service import NarService

        own = self.blobs()
        if blobs is not own:
            return NarService(blobs, directories)
        return NarService(blobs, directories, self.plans(), own.reader)

    def close(self) -> None:
        """Close every part built (blocking)."""
        with self._lock:
            plans, self._plans = self._plans, None
            pathinfos, self._pathinfos = self._pathinfos, None
            directories, self._directories = self._directories, None
            blobs, self._blobs = self._blobs, None
            lease, self._lease = self._lease, None
        if plans is not None:
            plans.close()
        if pathinfos is not None:
            pathinfos.close()
        if directories is not None:
            directories.close()
        if blobs is not None:
            blobs.close()
        if lease is not None:
            lease.release()

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


def embedded_blobs(home: Path) -> PackBlobService:
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
    """Write ``store_path``'s NAR to ``fd`` from plans vouching for its NarHash (blocking).

    ``False``, having written nothing, when that is not possible (no such
    path or plan, not a directory, no store at all): the caller then goes the
    general way, which also reports what is missing.

    Raises:
        DataCorruption: a blob is missing or corrupt (after the bytes before it).
        OSError: writing to ``fd`` failed.
    """
    store = Embedded(home)
    if not store.db.is_file():
        return False
    try:
        info = store.pathinfos().get_sync(store_path.digest)
        if info is None or info.store_path != store_path:
            return False
        nar = store.nar(store.blobs(), store.directories())
        return nar.export_sync(info.node, info.nar_size, info.nar_sha256, fd)
    finally:
        store.close()
