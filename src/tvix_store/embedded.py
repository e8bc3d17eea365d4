"""The embedded default store's pieces that need no event loop.

Where its data directory is, how its blob service is built, and the fast path
of ``tvix-store export``: a NAR written straight from its plan, which is most
of what an export does. Importing this module (unlike :mod:`tvix_store.config`)
loads no asyncio, no service registry and no network code: start-up is a
large part of a half-second export.
"""

from __future__ import annotations

import os
from pathlib import Path

from nix_compat.store_path import StorePath
from tvix_castore.blobservice.base import BlobService
from tvix_castore.blobservice.objectstore import ObjectStoreBlobService
from tvix_castore.blobservice.packed import PackedBlobService
from tvix_castore.errors import ConfigError
from tvix_castore.objectstore import LocalObjectStore

__all__ = [
    "ENV_CHUNK_ZSTD",
    "STORE_DB",
    "data_dir",
    "embedded_blobs",
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


def embedded_blobs(home: Path) -> BlobService:
    """The embedded blob service in ``home`` (small blobs in packs, large as chunks)."""
    level = embedded_zstd_level()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the data directory {home}: {exc}") from exc
    return PackedBlobService(
        home / STORE_DB,
        ObjectStoreBlobService(LocalObjectStore(home / "blobs"), zstd_level=level),
    )


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
    from tvix_store.nar.plan import SqliteNarPlans, write_vouched_sync
    from tvix_store.pathinfoservice.sqlite import SqlitePathInfoService

    db = home / STORE_DB
    if not db.is_file():
        return False
    pathinfos = SqlitePathInfoService(db)
    try:
        info = pathinfos.get_sync(store_path.digest)
    finally:
        pathinfos.close()
    if info is None or info.store_path != store_path:
        return False
    blobs = embedded_blobs(home)
    assert isinstance(blobs, PackedBlobService)
    plans = SqliteNarPlans(db)
    try:
        return write_vouched_sync(plans, blobs, info.node, info.nar_size, info.nar_sha256, fd)
    finally:
        plans.close()
        blobs.close()
