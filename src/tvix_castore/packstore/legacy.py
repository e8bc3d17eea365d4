"""Reading a store written by the v1 layout (``PackedBlobService`` of today's ``main``).

v1 kept raw blob bytes in ``packs/*.pack`` with their locations only in
SQLite (tables ``packed``, ``chunked``), and large blobs possibly in the
chunk store ``blobs/`` (B §7.1 layout, zstd or raw frames). Those stay
readable through :meth:`PackReader.locate` until compaction converts them:
every legacy read is verified by hashing (v1 had no frame checks).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tvix_castore.blobservice.base import checked
from tvix_castore.blobservice.objectstore import ObjectStoreBlobService, chunk_key
from tvix_castore.digests import B3Digest
from tvix_castore.errors import DataCorruption, StorageError
from tvix_castore.lazy import lazy_module
from tvix_castore.objectstore import LocalObjectStore
from tvix_castore.packstore.index import PackIndex, parse_chunk_list
from tvix_castore.packstore.reader import Chunked, Legacy, LegacyObject, Location

if TYPE_CHECKING:
    import zstandard
else:
    zstandard = lazy_module("zstandard")

__all__ = ["LegacyStore", "open_legacy"]

_QUERY_BATCH = 500


class LegacyStore:
    """The v1 tables, packs and chunk store of one home (read only)."""

    def __init__(self, index: PackIndex, pack_dir: Path, objects: Path | None) -> None:
        self._index = index
        self._pack_dir = pack_dir
        self._packed = index.has_table("packed")
        self._chunked = index.has_table("chunked")
        self._objects_dir = objects
        self.objects = (
            None if objects is None else ObjectStoreBlobService(LocalObjectStore(objects))
        )
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}

    def locate(self, digests: Sequence[bytes]) -> dict[bytes, Location]:
        out: dict[bytes, Location] = {}
        for i in range(0, len(digests), _QUERY_BATCH):
            batch = list(digests[i : i + _QUERY_BATCH])
            marks = ",".join("?" * len(batch))
            if self._packed:
                for raw, pack, off, n in self._index.query(
                    f"SELECT digest, pack, offset, length FROM packed WHERE digest IN ({marks})",
                    batch,
                ):
                    out[bytes(raw)] = Legacy(str(pack), int(off), int(n))
            rest = [d for d in batch if d not in out]
            if self._chunked and rest:
                marks = ",".join("?" * len(rest))
                for raw, chunks in self._index.query(
                    f"SELECT digest, CAST(chunks AS BLOB) FROM chunked WHERE digest IN ({marks})",
                    rest,
                ):
                    meta = parse_chunk_list(bytes(raw), bytes(chunks))
                    out[bytes(raw)] = Chunked(sum(c.size for c in meta), meta)
        if self.objects is not None:
            for raw in digests:
                if raw not in out and (loc := self._object(raw)) is not None:
                    out[raw] = loc
        return out

    def _object(self, raw: bytes) -> Location | None:
        """A blob in the chunk store: its chunk list, or its one chunk's size."""
        assert self.objects is not None and self._objects_dir is not None
        digest = B3Digest(raw)
        try:
            chunks = self.objects.chunks_sync(digest)
        except StorageError:
            return None
        if chunks is None:
            return None
        if chunks:
            return Chunked(sum(c.size for c in chunks), tuple(chunks))
        try:
            with open(self._objects_dir / chunk_key(digest), "rb") as f:
                head = f.read(18)
            size = zstandard.frame_content_size(head)
        except (OSError, zstandard.ZstdError):
            size = -1
        if size < 0:  # (not in the frame header: decode it to know)
            data = self.objects.load_chunk_pieces_sync(digest, 1 << 26, mapped=False)
            size = -1 if data is None else sum(len(p) for p in data)
        return LegacyObject(size) if size >= 0 else None

    def read(self, digest: bytes, loc: Location) -> bytes:
        d = B3Digest(digest)
        if isinstance(loc, Legacy):
            return checked(d, self._pread(d, loc))
        if isinstance(loc, LegacyObject) and self.objects is not None:
            pieces = self.objects.load_chunk_pieces_sync(d, max(loc.size, 1), mapped=False)
            if pieces is None:
                raise DataCorruption(f"blob {d}: its chunk file vanished")
            return b"".join(pieces)
        raise DataCorruption(f"blob {d}: no legacy location {loc!r}")

    def _pread(self, digest: B3Digest, loc: Legacy) -> bytes:
        if "/" in loc.pack or loc.pack.startswith(".") or not loc.pack:
            raise DataCorruption(f"blob {digest}: invalid pack name {loc.pack!r} in the index")
        try:
            with self._lock:
                fd = self._fds.get(loc.pack)
                if fd is None:
                    fd = os.open(self._pack_dir / loc.pack, os.O_RDONLY | os.O_CLOEXEC)
                    self._fds[loc.pack] = fd
            data = os.pread(fd, loc.size, loc.offset)
        except OSError as exc:
            raise DataCorruption(f"blob {digest}: cannot read pack {loc.pack}: {exc}") from exc
        if len(data) != loc.size:
            raise DataCorruption(f"blob {digest}: pack {loc.pack} is truncated")
        return data

    def problem(self, digest: bytes) -> str | None:
        if self.objects is None:
            return f"blob {B3Digest(digest)} is not in the store"
        return self.objects.unreadable_sync(B3Digest(digest))

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def open_legacy(index: PackIndex, home: Path) -> LegacyStore | None:
    """The legacy layout in ``home``, if any part of it is there."""
    objects = home / "blobs"
    has_objects = objects.is_dir()
    if not (has_objects or index.has_table("packed") or index.has_table("chunked")):
        return None
    return LegacyStore(index, home / "packs", objects if has_objects else None)
