"""``tvix-store fsck --repair``: drop damaged content, fetch the damaged paths again.

A source is anything that can hand over a path's NAR:

* a Nix binary cache (``http(s)://…``, ``nix+http(s)://…``): its narinfo and
  NAR, as a substituter reads them;
* another tvix store: a daemon (``grpc+http(s)://…``, ``grpc+unix://…``) or
  another embedded store on this machine (``embedded:///dir``): its PathInfo,
  and the NAR rendered from its Directories and blobs.

Either way the trust anchor is the NarHash *this* store recorded: a source
whose PathInfo names another NarHash is skipped, and the NAR it gives is
ingested with that size and hash expected (nothing is committed if it
differs). No signature is needed, and a source that is itself damaged is
just a source that fails (the next one is tried).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Protocol

from nix_compat.store_path import StorePath
from tvix_castore.blobservice.base import BlobService
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import CastoreError, ConfigError
from tvix_store.config import Store, open_store
from tvix_store.embedded import EMBEDDED_SCHEME, Embedded, embedded_home
from tvix_store.fsck import FsckReport, closure_problem
from tvix_store.nar.ingest import ingest_nar
from tvix_store.nar.render import render_nar
from tvix_store.pathinfo import PathInfo

__all__ = ["open_source", "repair"]

_log = logging.getLogger(__name__)
_CACHE_SCHEMES = ("http://", "https://", "nix+http://", "nix+https://")
_STORE_SCHEMES = ("grpc+http://", "grpc+https://", "grpc+unix://", f"{EMBEDDED_SCHEME}://")


class Source(Protocol):
    """Where damaged paths are fetched from."""

    name: str

    async def fetch(self, ours: PathInfo) -> bool:
        """Ingest ``ours``'s content (with its NarHash) into the store; False if not there."""

    async def aclose(self) -> None: ...


class _Cache:
    """A Nix binary cache: its ``get`` ingests the NAR, checked against its narinfo."""

    def __init__(self, url: str, blobs: BlobService, dirs: DirectoryService) -> None:
        from tvix_store.pathinfoservice.nix_http import NixHttpPathInfoService

        self.name = url
        self._service = NixHttpPathInfoService(url.removeprefix("nix+"), blobs, dirs)

    async def fetch(self, ours: PathInfo) -> bool:
        # (a narinfo with another NarHash was still ingested, and verified against
        # it: content nothing refers to, for the next gc)
        theirs = await self._service.get(ours.store_path.digest)
        return theirs is not None and theirs.nar_sha256 == ours.nar_sha256

    async def aclose(self) -> None:
        await self._service.aclose()


class _OtherStore:
    """Another tvix store: the NAR rendered from its castore, ingested here."""

    def __init__(self, url: str, store: Store, blobs: BlobService, dirs: DirectoryService) -> None:
        self.name = url
        self._store = store
        self._blobs = blobs
        self._dirs = dirs

    async def fetch(self, ours: PathInfo) -> bool:
        theirs = await self._store.pathinfos.get(ours.store_path.digest)
        if theirs is None or theirs.nar_sha256 != ours.nar_sha256:
            return False
        pieces = render_nar(theirs.node, self._store.blobs, self._store.directories)
        await ingest_nar(
            _Reader(pieces).read,
            self._blobs,
            self._dirs,
            expect=(ours.nar_size, ours.nar_sha256),
        )
        return True

    async def aclose(self) -> None:
        await self._store.aclose()


class _Reader:
    """``read(n)`` over an iterator of byte pieces (what :func:`ingest_nar` reads)."""

    def __init__(self, pieces: AsyncIterator[bytes]) -> None:
        self._pieces = pieces
        self._buf = memoryview(b"")

    async def read(self, n: int) -> bytes:
        while not self._buf:
            piece = await anext(self._pieces, None)
            if piece is None:
                return b""
            self._buf = memoryview(piece)
        out = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        return out


async def open_source(url: str, store: Embedded) -> Source:
    """The repair source ``url`` names, writing into ``store``.

    Raises:
        ConfigError: an unknown form, or ``store`` itself.
    """
    blobs, dirs = store.blobs(), store.directories()
    if url.startswith(_CACHE_SCHEMES):
        return _Cache(url, blobs, dirs)
    if not url.startswith(_STORE_SCHEMES):
        known = ", ".join(f"{s}…" for s in _CACHE_SCHEMES + _STORE_SCHEMES)
        raise ConfigError(f"{url!r}: not a repair source (a binary cache or a store: {known})")
    if url.startswith(f"{EMBEDDED_SCHEME}:"):
        home = embedded_home(url)
        if _same(home, store.home):
            raise ConfigError(f"{url!r} is the store being repaired")
        if not (home / "store.sqlite").exists():
            raise ConfigError(f"{url!r}: no embedded store at {home}")
    other = await open_store(url, url, url)
    return _OtherStore(url, other, blobs, dirs)


def _same(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return a.resolve() == b.resolve()
    return False


async def repair(store: Embedded, report: FsckReport, sources: Sequence[Source]) -> None:
    """Repair what ``report`` found: drop the damaged content, fetch it again.

    First the index rows of damaged frames and unreadable blobs are dropped
    (one transaction), so the next upload or import of that content stores it
    anew instead of deduplicating against bytes that cannot be read. Then each
    damaged path is fetched from the first of ``sources`` that has it with the
    NarHash this store recorded, and its closure is checked again before its
    damage mark is cleared. ``report`` records what was repaired.
    """
    blobs = store.blobs()
    packs = report.packs
    if packs.damaged_frames or packs.bad:
        txn = blobs.index.transaction()
        txn.delete_frames([f.id for f in packs.damaged_frames])
        txn.delete_blobs(list(packs.bad))
        txn.commit()
        report.unindexed = len(packs.damaged_frames) + len(packs.bad)
    if not report.damaged_paths or not sources:
        return
    nar = store.nar(blobs, store.directories())
    pathinfos = store.pathinfos()
    blobs.begin_write()  # (a lease: a gc running now keeps what is ingested)
    for damaged in report.damaged_paths:
        path = StorePath.from_absolute_path(damaged.path)
        ours = await pathinfos.get(path.digest)
        if ours is None:
            continue
        for source in sources:
            try:
                found = await source.fetch(ours)
            except CastoreError as exc:
                _log.warning("repair of %s from %s failed: %s", path, source.name, exc)
                continue
            if not found:
                continue
            why = await asyncio.to_thread(closure_problem, store, ours.node)
            if why is None:
                await nar.clear_damage(ours.node)
                report.repaired[damaged.path] = source.name
                break
            _log.warning("repair of %s from %s left it damaged: %s", path, source.name, why)
