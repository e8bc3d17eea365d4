"""Reading blobs out of packs: one lookup routine, verified frames, a small cache.

:meth:`PackReader.locate` is the only place that knows where blobs can be
(v2 frames, chunk lists, then the legacy layout); everything else (the blob
service, the NAR code in ``tvix_store``) reads through it. Frames are read
with ``pread`` (never mapped: a truncated mapped file is a SIGBUS), decoded
and checked whole, and the last few decoded frames are kept, so a reader
walking blobs in the order they were written decodes each frame once.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from tvix_castore.blobservice.base import ChunkMeta
from tvix_castore.digests import EMPTY_DIGEST, B3Digest
from tvix_castore.errors import DataCorruption, StorageError
from tvix_castore.packstore.format import PACK_LIMIT, Frame, FrameMember, decode_payload
from tvix_castore.packstore.index import BlobRow, FrameRef, PackIndex

if TYPE_CHECKING:
    from tvix_castore.packstore.legacy import LegacyStore

_log = logging.getLogger(__name__)

__all__ = [
    "Chunked",
    "DecodedFrame",
    "FrameRef",
    "Legacy",
    "LegacyObject",
    "Location",
    "Member",
    "PackReader",
    "decoded_frame",
]

_CACHE_FRAMES = 6  # decoded frames kept (6 × 4 MiB: room for frames decoded ahead)


class Member(NamedTuple):
    """A blob inside a frame: ``offset``/``size`` in the frame's decoded payload."""

    frame: FrameRef
    offset: int
    size: int


class Chunked(NamedTuple):
    """A large blob: its chunks, each a blob of its own (locate them in turn)."""

    size: int
    chunks: tuple[ChunkMeta, ...]


class Legacy(NamedTuple):
    """A blob's raw bytes in a v1 pack (today's ``main``), verified by hashing."""

    pack: str
    offset: int
    size: int


class LegacyObject(NamedTuple):
    """A blob (one chunk) in the legacy chunk store ``blobs/``."""

    size: int


Location = Member | Chunked | Legacy | LegacyObject


class _FrameGone(Exception):
    """The frame's pack is missing or shorter than the frame (compaction may have moved it)."""


class DecodedFrame(NamedTuple):
    """A frame decoded and verified (see :meth:`PackReader.decode`)."""

    ref: FrameRef
    frame: Frame
    payload: memoryview
    offsets: dict[int, FrameMember]  # member offset -> member


def decoded_frame(ref: FrameRef, head: Frame, payload: memoryview) -> DecodedFrame:
    """A :class:`DecodedFrame` of ``payload``, which :func:`decode_payload` verified."""
    offsets: dict[int, FrameMember] = {}
    at = 0
    for m in head.members:
        if m.size:  # (an empty member shares its offset with the next one)
            offsets[at] = m
        at += m.size
    return DecodedFrame(ref, head, payload, offsets)


class PackReader:
    """Locates and reads blobs; thread-safe. Shared by castore and the NAR code."""

    def __init__(self, index: PackIndex, pack_dir: Path, legacy: LegacyStore | None = None) -> None:
        self.index = index
        self.pack_dir = pack_dir
        self.legacy = legacy
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._cache: collections.OrderedDict[FrameRef, DecodedFrame] = collections.OrderedDict()
        self._busy: dict[FrameRef, threading.Event] = {}  # frames being decoded

    # -- where --------------------------------------------------------------
    def locate(self, digests: Sequence[bytes]) -> dict[bytes, Location]:
        """Where each stored blob among ``digests`` is; absent ones are left out."""
        out = self._indexed(digests)
        if self.legacy is not None and len(out) < len(digests):
            missing = [d for d in dict.fromkeys(digests) if d not in out]
            out.update(self.legacy.locate(missing))
            if len(out) < len(digests):
                # Compaction may have converted some (and dropped their v1 rows)
                # between the two lookups: ask the index once more for those.
                out.update(self._indexed([d for d in missing if d not in out]))
        return out

    def _indexed(self, digests: Sequence[bytes]) -> dict[bytes, Location]:
        out: dict[bytes, Location] = {}
        for raw, row in self.index.lookup(digests).items():
            if isinstance(row, BlobRow):
                out[raw] = Member(row.frame, row.offset, row.size)
            else:
                out[raw] = Chunked(row.size, row.chunks)
        return out

    def frame_by_id(self, ids: Sequence[int]) -> dict[int, FrameRef]:
        """Frames by index id (for location hints kept elsewhere, e.g. NAR plans)."""
        return {i: row.ref for i, row in self.index.frames(ids).items()}

    def pack_path(self, pack: str) -> Path:
        if "/" in pack or pack.startswith(".") or not pack:
            raise DataCorruption(f"invalid pack name {pack!r} in the index")
        return self.pack_dir / pack

    def _pack_size(self, pack: str, sizes: dict[str, int]) -> int:
        if pack not in sizes:
            try:
                sizes[pack] = os.stat(self.pack_path(pack)).st_size
            except (OSError, DataCorruption):
                sizes[pack] = -1
        return sizes[pack]

    def intact(self, located: dict[bytes, Location]) -> dict[bytes, Location]:
        """Those of ``located`` whose pack is there and long enough (one stat per pack)."""
        sizes: dict[str, int] = {}
        out: dict[bytes, Location] = {}
        for raw, loc in located.items():
            if isinstance(loc, Member):
                end, pack = loc.frame.offset + loc.frame.length, loc.frame.pack
            elif isinstance(loc, Legacy):
                end, pack = loc.offset + loc.size, loc.pack
            else:
                out[raw] = loc
                continue
            if self._pack_size(pack, sizes) >= end:
                out[raw] = loc
        return out

    def problem(self, digests: Sequence[bytes]) -> str | None:
        """Why one of ``digests`` cannot be read, without reading (``None``: all look fine).

        Checks that each blob (each chunk of a large one) is indexed and its
        pack is there and long enough; what the bytes hash to is for a read.
        """
        todo = [d for d in dict.fromkeys(digests) if d != EMPTY_DIGEST.raw]
        located = self.locate(todo)
        sizes: dict[str, int] = {}
        seen: set[bytes] = set()
        while todo:
            nested: list[bytes] = []
            for raw in todo:
                seen.add(raw)
                loc = located.get(raw)
                if loc is None:
                    return f"blob {B3Digest(raw)} is not in the store"
                if isinstance(loc, Chunked):
                    nested += [c.digest.raw for c in loc.chunks]
                    continue
                if isinstance(loc, LegacyObject):
                    assert self.legacy is not None
                    if (why := self.legacy.problem(raw)) is not None:
                        return why
                    continue
                if isinstance(loc, Member):
                    pack, end = loc.frame.pack, loc.frame.offset + loc.frame.length
                else:
                    pack, end = loc.pack, loc.offset + loc.size
                size = self._pack_size(pack, sizes)
                if size < 0:
                    return f"blob {B3Digest(raw)}: pack file {pack} is missing"
                if size < end:
                    return f"blob {B3Digest(raw)}: pack file {pack} is truncated"
            todo = [c for c in dict.fromkeys(nested) if c not in seen]
            located.update(self.locate([c for c in todo if c not in located]))
        return None

    # -- bytes ----------------------------------------------------------------
    def _fd(self, pack: str) -> int:
        with self._lock:
            fd = self._fds.get(pack)
            if fd is None:
                fd = self._fds[pack] = os.open(self.pack_path(pack), os.O_RDONLY | os.O_CLOEXEC)
            return fd

    def _decoded(self, frame: FrameRef) -> DecodedFrame:
        """The frame decoded and checked: from the cache, or by this thread.

        A frame another thread is decoding (a read-ahead) is waited for, not
        decoded twice.
        """
        while True:
            with self._lock:
                hit = self._cache.get(frame)
                if hit is not None:
                    self._cache.move_to_end(frame)
                    return hit
                busy = self._busy.get(frame)
                if busy is None:
                    busy = self._busy[frame] = threading.Event()
                    break
            busy.wait()  # (then from the cache, or decoded here if that failed)
        try:
            decoded = self._decode(frame)
            with self._lock:
                self._cache[frame] = decoded
                while len(self._cache) > _CACHE_FRAMES:
                    self._cache.popitem(last=False)
            return decoded
        finally:
            with self._lock:
                self._busy.pop(frame, None)
            busy.set()

    def decoded(self, frame: FrameRef) -> DecodedFrame | None:
        """``frame`` decoded and verified, through the shared cache (``None``: damaged or gone).

        Unlike :meth:`decode`, a frame decoded here is kept for the next
        reader; a damaged one is unindexed, as by any read. A caller that
        gets ``None`` reads through :meth:`member` or :meth:`read_located`,
        which say why (or find a blob that compaction moved).
        """
        try:
            return self._decoded(frame)
        except (_FrameGone, DataCorruption):
            return None

    def decode(self, frame: FrameRef) -> DecodedFrame | None:
        """``frame`` decoded and verified, bypassing the shared cache.

        For a caller that holds frames itself (a NAR writer knows which ones it
        needs again). ``None`` if it cannot be (damaged, or gone): :meth:`member`
        without it then says why (or finds the blob where compaction moved it).
        Thread-safe.
        """
        with self._lock:
            hit = self._cache.get(frame)
        if hit is not None:
            return hit
        try:
            return self._decode(frame)
        except (_FrameGone, DataCorruption):
            return None

    def _forget_damaged(self, frame: FrameRef) -> None:
        """Unindex a frame whose bytes fail their check: its members are then absent.

        So storing them again (a re-upload or re-import of the same content)
        writes them anew instead of deduplicating against bytes that cannot be
        read; compaction then drops the damaged frame. (Only a failed check
        does this, never an I/O error, which may pass.) A failure to write is
        logged: the read fails either way.
        """
        try:
            txn = self.index.transaction()
            txn.delete_frames([frame.id])
            txn.commit()
        except StorageError as exc:
            _log.warning("cannot unindex the damaged frame %s: %s", frame, exc)
        else:
            _log.warning("unindexed a damaged frame: pack %s at %d", frame.pack, frame.offset)
        with self._lock:
            self._cache.pop(frame, None)

    def _read_frame(self, frame: FrameRef) -> tuple[bytes, str]:
        """A frame's stored bytes and where it is (``_FrameGone``: the pack is gone or short)."""
        where = f"pack {frame.pack} at {frame.offset}"
        if not 0 < frame.length <= PACK_LIMIT or frame.offset < 0:
            raise DataCorruption(f"{where}: impossible frame length {frame.length} in the index")
        try:
            data = os.pread(self._fd(frame.pack), frame.length, frame.offset)
        except FileNotFoundError as exc:
            raise _FrameGone(where) from exc
        except OSError as exc:
            raise DataCorruption(f"{where}: cannot read: {exc}") from exc
        if len(data) != frame.length:
            raise _FrameGone(where)
        return data, where

    def _decode(self, frame: FrameRef) -> DecodedFrame:
        data, where = self._read_frame(frame)
        try:
            head, payload = decode_payload(data, where, frame.offset)
        except DataCorruption:
            self._forget_damaged(frame)
            raise
        return decoded_frame(frame, head, payload)

    def verify(self, frame: FrameRef) -> DecodedFrame:
        """``frame`` read, decoded and verified, changing nothing (for fsck).

        Unlike a read, a damaged frame stays indexed; DataCorruption says why.
        """
        try:
            data, where = self._read_frame(frame)
        except _FrameGone as exc:
            raise DataCorruption(f"{exc}: the pack is missing or truncated") from exc
        head, payload = decode_payload(data, where, frame.offset)
        return decoded_frame(frame, head, payload)

    def payload(self, frame: FrameRef) -> memoryview:
        """A frame's decoded and verified payload (DataCorruption if damaged or gone)."""
        try:
            return self._decoded(frame).payload
        except _FrameGone as exc:
            raise DataCorruption(f"{exc}: the frame is missing (pack gone or truncated)") from exc

    def member(self, digest: bytes, loc: Member, decoded: DecodedFrame | None = None) -> memoryview:
        """The blob ``digest`` at ``loc``: a slice of its verified frame.

        ``decoded``: that frame, decoded already (see :meth:`decode`), if the caller has it.
        """
        if decoded is not None and decoded.ref == loc.frame and loc.size:
            m = decoded.offsets.get(loc.offset)
            if m is not None and m.key == digest and m.size == loc.size:
                return decoded.payload[loc.offset : loc.offset + loc.size]
        try:
            return self._member(digest, loc)
        except DataCorruption as exc:
            raise DataCorruption(f"blob {B3Digest(digest)}: {exc}") from exc
        except _FrameGone:
            again = self.locate([digest]).get(digest)  # (compaction moved it: once)
            if isinstance(again, Member) and again != loc:
                try:
                    return self._member(digest, again)
                except (_FrameGone, DataCorruption) as exc:
                    raise DataCorruption(f"blob {B3Digest(digest)}: {exc}") from exc
            where = f"pack {loc.frame.pack} at {loc.frame.offset}"
            raise DataCorruption(
                f"blob {B3Digest(digest)}: {where} is missing (pack gone or truncated)"
            ) from None

    def _member(self, digest: bytes, loc: Member) -> memoryview:
        if loc.size == 0:  # (the empty Directory: its bytes are no bytes)
            if digest != EMPTY_DIGEST.raw:
                raise DataCorruption(f"indexed with size 0 in pack {loc.frame.pack}")
            return memoryview(b"")
        decoded = self._decoded(loc.frame)
        m = decoded.offsets.get(loc.offset)
        if m is None or m.key != digest or m.size != loc.size:
            raise DataCorruption(
                f"pack {loc.frame.pack} at {loc.frame.offset} does not hold it where indexed"
            )
        return decoded.payload[loc.offset : loc.offset + loc.size]

    def read_located(self, digest: bytes, loc: Location) -> bytes:
        """A located blob's whole, verified bytes (chunked ones joined)."""
        if isinstance(loc, Member):
            return bytes(self.member(digest, loc))
        if isinstance(loc, Chunked):
            return b"".join(self.chunk_bytes(digest, loc))
        assert self.legacy is not None
        try:
            return self.legacy.read(digest, loc)
        except DataCorruption:
            # Compaction may have converted it (and deleted the v1 file) since it
            # was located: locate it again, once, as v2 reads do.
            again = self.locate([digest]).get(digest)
            if again is None or isinstance(again, Legacy | LegacyObject):
                raise
            return self.read_located(digest, again)

    def chunk_bytes(self, digest: bytes, loc: Chunked) -> list[bytes]:
        """The chunks of a large blob, each verified; DataCorruption names the blob."""
        where = self.locate([c.digest.raw for c in loc.chunks])
        parts: list[bytes] = []
        for c in loc.chunks:
            cloc = where.get(c.digest.raw)
            if cloc is None or isinstance(cloc, Chunked):
                raise DataCorruption(f"blob {B3Digest(digest)}: chunk {c.digest} is missing")
            try:
                part = self.read_located(c.digest.raw, cloc)
            except DataCorruption as exc:
                raise DataCorruption(f"blob {B3Digest(digest)}: chunk {exc}") from exc
            if len(part) != c.size:
                raise DataCorruption(f"blob {B3Digest(digest)}: chunk {c.digest} has wrong size")
            parts.append(part)
        return parts

    def read(self, digest: B3Digest) -> bytes | None:
        """A whole blob, verified, or ``None`` if it is not stored."""
        if digest == EMPTY_DIGEST:
            return b""
        loc = self.locate([digest.raw]).get(digest.raw)
        if loc is None:
            return None
        return self.read_located(digest.raw, loc)

    def forget(self, packs: Sequence[str]) -> None:
        """Close descriptors of ``packs`` (deleted by compaction)."""
        with self._lock:
            for pack in packs:
                fd = self._fds.pop(pack, None)
                if fd is not None:
                    os.close(fd)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._cache.clear()
        if self.legacy is not None:
            self.legacy.close()
