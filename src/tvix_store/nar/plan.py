"""NAR plans: a directory's NAR as literal bytes and blob locations, for fast export.

Rendering a NAR from castore means fetching and decoding every Directory of
the closure and looking up where each blob lies — per-entry Python work that
costs more than the bytes themselves (47k files: ~0.4 s before the first byte
is written). A plan does that work once, when a path is imported (or first
exported), and keeps the result next to the path infos: every byte that is not
file content (headers, names, padding) in one string, and for each file its
digest, size and location in a pack file.

Export then maps the pack files, verifies each blob's BLAKE3 on the mapped
bytes and hands header and content ranges to ``writev`` — no copies, no
per-entry lookups. Chunks of large blobs that zstd stored as raw blocks are
served from the mapped chunk file as well; others are decompressed. A large
NAR is verified by two processes (see :func:`write_plan`). Servers read with
``pread`` instead of mapping (a pack truncated under a map is a SIGBUS), check
that every pack and chunk file a NAR needs is there before sending headers
(:func:`content_problem`), and remember a NAR found damaged
(:func:`mark_damaged`) so they stop serving and vouching for it.

A plan is keyed by the root Directory's digest, so it describes exactly one
NAR; it records that NAR's size and sha256 as established when it was built
(by hashing the imported tree or a verified render), and a BLAKE3 checksum of
its own bytes. Since every blob is verified as it is written, a plan whose
recorded hash equals a PathInfo's NarHash produces exactly that NAR, without
hashing it again. A plan whose location is stale (a blob not where it says)
falls back to the blob service for that blob; a corrupt plan is ignored.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import mmap
import os
import queue
import signal
import sqlite3
import struct
import threading
from collections.abc import AsyncIterator, Callable, Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import blake3

from tvix_castore.blobservice.base import BlobService, ChunkMeta, writev_all
from tvix_castore.blobservice.packed import PackedBlobService
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.directoryservice.sqlite import connect, storage_error, write_one
from tvix_castore.errors import CastoreError, DataCorruption
from tvix_castore.forked import fork_child, want_fork
from tvix_castore.lazy import lazy_module
from tvix_castore.nodes import Directory, DirectoryNode, FileNode, Node
from tvix_store.nar.layout import NarLayout, build_layout, scanned_layout
from tvix_store.nar.render import NarRenderError, calculate_nar, fetch_closure

if TYPE_CHECKING:
    import asyncio

    from tvix_castore.ingest import ScannedFile, ScannedTree
else:
    asyncio = lazy_module("asyncio")  # not needed to write a NAR from its plan

__all__ = [
    "NarPlan",
    "Served",
    "SqliteNarPlans",
    "build_plan",
    "calculate_nar_planned",
    "clear_damage",
    "content_present",
    "content_problem",
    "damage_of",
    "mark_damaged",
    "PlanHasher",
    "scanned_plan",
    "planned_stream",
    "save_plan",
    "verify_planned",
    "vouching_plan",
    "write_plan",
    "write_vouched_sync",
    "write_planned",
]

_log = logging.getLogger(__name__)

_MAGIC = b"NARPLAN2"  # segments follow the entries
_MAGIC_V1 = b"NARPLAN1"  # no segments (still read)
# magic, NAR size, NAR sha256, length of the pack names, files, length of the literals
_HEAD = struct.Struct("<8sQ32sIIQ")
_ENTRY = struct.Struct("<Q32sQiQ")  # literal end, digest, size, pack index (-1: not packed), offset
_SEGMENT = struct.Struct("<iQQ32s")  # pack index, offset, length, BLAKE3 of those bytes
_NOT_PACKED = -1
_IOV_MAX = 1000  # below the kernel's 1024
_FLUSH_BYTES = 8 << 20
_FORK_MIN = 32 << 20  # NARs from this size are written by two processes
_CHILD_KEEP = 64 << 20  # decompressed chunk bytes the child holds between verifying and writing
# ... and bytes of views of mapped (raw) chunk files: file-backed, so this only
# bounds how many maps stay open (at least 128 KiB each: at most 8192)
_CHILD_MAPPED = 1 << 30
_WINDOW_MIN = 256 << 10  # reads from this size are kept for the next (see _Packs)
_AHEAD = 4  # pieces a server's plan writer may run ahead of the response
_SERVER_PIECE = 1 << 20  # ... each about this large (memory per download stays ~5 MiB)
_UNVOUCHED = bytes(32)  # the sha256 of a plan whose NAR nobody hashed

_Entry = tuple[int, bytes, int, int, int]  # as _ENTRY
_Segment = tuple[int, int, int, bytes]  # as _SEGMENT
_Pieces = list[bytes | memoryview]


@dataclass(frozen=True, slots=True)
class NarPlan:
    """One NAR: ``literals`` interleaved with the files of ``entries`` (see module doc)."""

    nar_size: int
    nar_sha256: bytes
    packs: tuple[str, ...]
    literals: bytes
    entries: tuple[_Entry, ...]  # one per file with content, in NAR order
    # Pack segments most of whose bytes are this NAR's: verified whole (see _Reader)
    segments: tuple[_Segment, ...] = ()

    def encode(self) -> bytes:
        names = "\n".join(self.packs).encode()
        head = _HEAD.pack(
            _MAGIC,
            self.nar_size,
            self.nar_sha256,
            len(names),
            len(self.entries),
            len(self.literals),
        )
        rows = b"".join([_ENTRY.pack(*e) for e in self.entries])
        segments = b"".join([_SEGMENT.pack(*s) for s in self.segments])
        return b"".join([head, names, self.literals, rows, segments])

    @classmethod
    def decode(cls, data: bytes) -> NarPlan:
        """Parse and check a plan (its sizes must add up to the NAR size)."""
        try:
            magic, nar_size, sha, names_len, n_files, lit_len = _HEAD.unpack_from(data)
        except struct.error as exc:
            raise DataCorruption(f"NAR plan is truncated: {exc}") from exc
        pos = _HEAD.size
        body = pos + names_len + lit_len + n_files * _ENTRY.size
        rest = len(data) - body
        if (
            rest < 0
            or (rest if magic == _MAGIC_V1 else rest % _SEGMENT.size)
            or (magic not in (_MAGIC, _MAGIC_V1))
        ):
            raise DataCorruption("NAR plan has a bad header")
        names = data[pos : pos + names_len].decode()
        pos += names_len
        literals = data[pos : pos + lit_len]
        entries = tuple(_ENTRY.iter_unpack(data[pos + lit_len : body]))
        segments = tuple(_SEGMENT.iter_unpack(data[body:]))
        packs = tuple(names.split("\n")) if names else ()
        if any(not 0 <= seg[0] < len(packs) for seg in segments):
            raise DataCorruption("NAR plan has an inconsistent segment")
        total = lit_len
        end = 0
        for lit_end, _, size, pack, _ in entries:
            if lit_end < end or lit_end > lit_len or pack >= len(packs) or pack < _NOT_PACKED:
                raise DataCorruption("NAR plan has an inconsistent entry")
            end = lit_end
            total += size
        if total != nar_size:
            raise DataCorruption(f"NAR plan adds up to {total} bytes, not {nar_size}")
        return cls(nar_size, sha, packs, literals, entries, segments)


def build_plan(
    node: DirectoryNode,
    closure: Mapping[B3Digest, Directory],
    blobs: PackedBlobService,
    nar_sha256: bytes,
) -> NarPlan:
    """The plan of ``node``'s NAR, whose sha256 the caller has established (blocking)."""
    layout = build_layout(node, closure)
    return _plan_of_segments(layout.segments, layout.size, blobs, nar_sha256)


def _plan_of_segments(
    segments: Sequence[bytes | FileNode | ScannedFile],
    nar_size: int,
    blobs: PackedBlobService,
    nar_sha256: bytes,
) -> NarPlan:
    raws: list[bytes] = []
    for seg in segments:
        if not isinstance(seg, bytes):
            if seg.digest is None:
                raise ValueError("a NAR plan of files not uploaded")
            raws.append(seg.digest.raw)
    located = blobs.locate_many(raws)
    # Blobs stored as packed chunks become one entry per chunk (a chunk is a
    # blob of its own, verified alone), with nothing literal between them.
    chunked = blobs.chunked_many([raw for raw in raws if raw not in located])
    if chunked:
        located.update(blobs.locate_many([c.digest.raw for cs in chunked.values() for c in cs]))
    pack_index: dict[str, int] = {}
    literals = bytearray()
    entries: list[_Entry] = []
    add = entries.append
    raw_of = iter(raws)
    for seg in segments:  # (runs per file of trees of tens of thousands)
        if isinstance(seg, bytes):
            literals += seg
            continue
        raw, size = next(raw_of), seg.size
        loc = located.get(raw)
        if loc is not None and loc[2] == size:  # a packed blob: the common case
            pack = pack_index.get(loc[0])
            if pack is None:
                pack = pack_index[loc[0]] = len(pack_index)
            add((len(literals), raw, size, pack, loc[1]))
            continue
        pieces = [(raw, size)]
        chunks = chunked.get(raw)
        if chunks is not None and sum(c.size for c in chunks) == size:
            pieces = [(c.digest.raw, c.size) for c in chunks]
            if any(located.get(r, ("", 0, -1))[2] != n for r, n in pieces):
                pieces = [(raw, size)]  # a chunk not where it should be: the slow way
        for raw, size in pieces:
            loc = located.get(raw)
            if loc is None or loc[2] != size:
                pack, offset = _NOT_PACKED, 0
            else:
                pack = pack_index.setdefault(loc[0], len(pack_index))
                offset = loc[1]
            add((len(literals), raw, size, pack, offset))
    packs = tuple(pack_index)
    return NarPlan(
        nar_size,
        nar_sha256,
        packs,
        bytes(literals),
        tuple(entries),
        _covering_segments(entries, packs, blobs),
    )


def scanned_plan(tree: ScannedTree, blobs: PackedBlobService) -> NarPlan:
    """The plan of a just uploaded tree's NAR, vouching for nothing yet (blocking).

    The layout comes from the scan, so no Directory is needed: the NAR can
    be hashed (see :class:`PlanHasher`) while they are built and put.
    """
    return _plan_of_segments(*scanned_layout(tree), blobs, _UNVOUCHED)


def _verify(plan: NarPlan, blobs: PackedBlobService, skip: Container[bytes]) -> None:
    """Check every blob of ``plan`` is where it says, except those in ``skip`` (blocking).

    Raises ``NarRenderError`` for the first that is not (missing, misplaced or corrupt).
    """
    reader = _Reader(blobs, plan, fallback=False)
    try:
        for entry in plan.entries:
            if entry[1] not in skip and reader.packed(entry) is None:
                for _ in reader.unpacked(entry):
                    pass
    finally:
        reader.close()


def _sha256_of(plan: NarPlan, blobs: PackedBlobService, *, fallback: bool, verify: bool) -> bytes:
    sha = hashlib.sha256()
    update = sha.update

    def sink(iov: list[bytes | memoryview], total: int) -> None:
        for piece in iov:
            update(piece)

    _write(plan, blobs, sink, None, fallback=fallback, verify=verify)
    return sha.digest()


class PlanHasher:
    """The sha256 of a plan's NAR, read back from the packs.

    For a tree just ingested, this is the NarHash of exactly what was stored,
    without reading the source tree again (or whatever happened to it
    meanwhile). A large NAR is hashed by a forked child, so the caller's
    Python work (building Directories) runs beside it: a thread would
    contend for the GIL on every one of tens of thousands of small updates.
    The child only hashes; :meth:`result` verifies the BLAKE3 of every blob
    that was already stored (in this process, while the child hashes the
    same pack bytes: packs are append-only). Blobs this import appended are
    not hashed again: their bytes were written from the very buffers their
    digests were computed from (export verifies them all, as ever). If a
    blob is not where the plan says, or the child fails, :meth:`result`
    hashes here instead, looking blobs up and verifying each. ``fork``
    forces the child (``True``) or its absence (``False``).
    """

    def __init__(
        self, plan: NarPlan, blobs: PackedBlobService, *, fork: bool | None = None
    ) -> None:
        self._plan = plan
        self._blobs = blobs
        self._pid = 0
        self._pipe = -1
        if want_fork(fork, large=plan.nar_size >= _FORK_MIN):  # see tvix_castore.forked
            r, w = os.pipe()

            def main() -> int:
                os.write(w, _sha256_of(plan, blobs, fallback=False, verify=False))
                return 0

            self._pid = fork_child(main, lambda exc: None, (r,))
            os.close(w)
            self._pipe = r

    def result(self) -> bytes:
        """The sha256 (blocking). Raises ``NarRenderError`` for missing or corrupt content.

        The child's sha256 counts only if every blob is where the plan says
        (it read them from there, unverified); otherwise this process hashes
        the NAR itself, looking misplaced blobs up.
        """
        if self._pid:
            data = b""
            try:
                with contextlib.suppress(NarRenderError):  # then: the slow way, below
                    _verify(self._plan, self._blobs, skip=self._blobs.appended)
                    while len(data) < 32 and (more := os.read(self._pipe, 32 - len(data))):
                        data += more
            finally:
                self.close()
            if len(data) == 32:
                return data
            _log.debug("hashing the NAR in this process (the child failed, or a blob moved)")
        return _sha256_of(self._plan, self._blobs, fallback=True, verify=True)

    def close(self) -> None:
        """Stop the child, if any (blocking)."""
        if self._pid:
            pid, self._pid = self._pid, 0
            os.close(self._pipe)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _covering_segments(
    entries: Sequence[_Entry], packs: tuple[str, ...], blobs: PackedBlobService
) -> tuple[_Segment, ...]:
    """The pack segments at least half of whose bytes are blobs of these entries.

    Verifying such a segment whole costs at most twice what verifying its
    blobs would, and hashing megabytes at once is ~3× faster than 5 KB at a
    time; a segment this NAR barely uses is left to per-blob checks. The
    reader trusts every entry inside a listed segment, so a segment is listed
    only if each entry inside it is in the segment's own (checksummed) member
    list, with its digest and size at its offset: an index row pointing at
    the wrong bytes is then still caught by the per-blob check.
    """
    if not packs:
        return ()
    known = blobs.segments(packs)
    per_pack = [known.get(name, []) for name in packs]
    starts = [[seg[0] for seg in segs] for segs in per_pack]
    covered: dict[tuple[int, int], int] = {}
    seen: set[tuple[int, int]] = set()
    for _, raw, size, pack, offset in entries:
        if pack == _NOT_PACKED or (pack, offset) in seen:
            continue
        seen.add((pack, offset))
        k = bisect.bisect_right(starts[pack], offset) - 1
        if k < 0:
            continue
        start, length, _, members = per_pack[pack][k]
        if members.get(offset) == (raw, size):
            covered[pack, k] = covered.get((pack, k), 0) + size
        elif offset < start + length:
            covered[pack, k] = -(1 << 62)  # an entry the segment does not list
    return tuple(
        (pack, *per_pack[pack][k][:3])
        for (pack, k), n in sorted(covered.items())
        if 2 * n >= per_pack[pack][k][1]
    )


class SqliteNarPlans:
    """Plans in a ``nar_plans`` table of the embedded store's database."""

    def __init__(self, path: str | Path) -> None:
        self._conn = connect(path)
        self._lock = threading.Lock()
        try:
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS nar_plans ("
                " root BLOB PRIMARY KEY, plan BLOB NOT NULL, checksum BLOB NOT NULL"
                ") WITHOUT ROWID"
            )
            if not getattr(self._conn, "read_only", False):  # a store opened on a full disk
                self._conn.execute(
                    "CREATE TABLE IF NOT EXISTS nar_damage ("
                    " root BLOB PRIMARY KEY, reason TEXT NOT NULL"
                    ") WITHOUT ROWID"
                )
        except sqlite3.Error as exc:
            self._conn.close()
            raise storage_error("creating the nar_plans table", exc, path) from exc

    def get_sync(self, root: B3Digest) -> NarPlan | None:
        """The plan of the Directory ``root``; ``DataCorruption`` if it fails its checks."""
        with self._lock:
            try:
                row = self._conn.execute(
                    "SELECT plan, checksum FROM nar_plans WHERE root = ?", (root.raw,)
                ).fetchone()
            except sqlite3.Error as exc:
                raise storage_error("reading a NAR plan", exc) from exc
        if row is None:
            return None
        data = bytes(row[0])
        if blake3.blake3(data).digest() != bytes(row[1]):
            raise DataCorruption(f"NAR plan of {root} does not match its checksum")
        return NarPlan.decode(data)

    def put_sync(self, root: B3Digest, plan: NarPlan) -> None:
        data = plan.encode()
        with self._lock:
            write_one(
                self._conn,
                "INSERT OR REPLACE INTO nar_plans (root, plan, checksum) VALUES (?, ?, ?)",
                (root.raw, data, blake3.blake3(data).digest()),
                "writing a NAR plan",
            )

    async def get(self, root: B3Digest) -> NarPlan | None:
        return await asyncio.to_thread(self.get_sync, root)

    # -- damage marks (see :func:`mark_damaged`) --------------------------
    def damage_sync(self, node: Node) -> str | None:
        """Why ``node``'s NAR was found damaged, or ``None`` if it is not marked."""
        key = _damage_key(node)
        if key is None:
            return None
        with self._lock:
            try:
                row = self._conn.execute(
                    "SELECT reason FROM nar_damage WHERE root = ?", (key,)
                ).fetchone()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):  # read-only, created by no release yet
                    return None
                raise storage_error("reading a damage mark", exc) from exc
            except sqlite3.Error as exc:
                raise storage_error("reading a damage mark", exc) from exc
        return None if row is None else str(row[0])

    def mark_damaged_sync(self, node: Node, reason: str) -> None:
        key = _damage_key(node)
        if key is None:
            return
        with self._lock:
            write_one(
                self._conn,
                "INSERT OR REPLACE INTO nar_damage (root, reason) VALUES (?, ?)",
                (key, reason[:1000]),
                "writing a damage mark",
            )

    def clear_damage_sync(self, node: Node) -> bool:
        """Remove ``node``'s mark; whether there was one (no write if not)."""
        if self.damage_sync(node) is None:
            return False
        with self._lock:
            write_one(
                self._conn,
                "DELETE FROM nar_damage WHERE root = ?",
                (_damage_key(node),),
                "clearing a damage mark",
            )
        return True

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    async def aclose(self) -> None:
        self.close()


class _Packs:
    """Read-only maps of pack files, opened on first use, remapped if a pack grew.

    Without ``mapped`` (servers), bytes are read with ``pread`` instead: a
    pack truncated while mapped would kill the process with SIGBUS on the
    next access, and a server copies what it sends anyway. The last large
    read of each pack (a segment verified whole) is kept, so the blobs after
    it are slices of it, not read again (uploads are packed in NAR order).
    """

    def __init__(self, blobs: PackedBlobService, names: Sequence[str], mapped: bool = True) -> None:
        self._blobs = blobs
        self._names = names
        self._mapped = mapped
        self._maps: list[tuple[mmap.mmap, memoryview] | None] = [None] * len(names)
        self._old: list[tuple[mmap.mmap, memoryview]] = []  # replaced maps, views may be queued
        self._fds: dict[int, int] = {}
        self._windows: dict[int, tuple[int, memoryview]] = {}  # per pack: offset, bytes

    def view(self, index: int, offset: int, size: int) -> memoryview | None:
        """The mapped bytes, or ``None`` if the pack is missing or too short."""
        if not self._mapped:
            return self._read(index, offset, size)
        entry = self._maps[index]
        if entry is None or offset + size > len(entry[1]):
            entry = self._map(index)
            if entry is None or offset + size > len(entry[1]):
                return None
        return entry[1][offset : offset + size]

    def _read(self, index: int, offset: int, size: int) -> memoryview | None:
        window = self._windows.get(index)
        if window is not None:
            start = offset - window[0]
            if start >= 0 and start + size <= len(window[1]):
                return window[1][start : start + size]
        fd = self._fds.get(index)
        try:
            if fd is None:
                path = self._blobs.pack_path(self._names[index])
                fd = self._fds[index] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(fd, size, offset)
        except (OSError, DataCorruption):
            return None
        if len(data) != size:
            return None
        view = memoryview(data)
        if size >= _WINDOW_MIN:
            self._windows[index] = (offset, view)
        return view

    def _map(self, index: int) -> tuple[mmap.mmap, memoryview] | None:
        try:
            path = self._blobs.pack_path(self._names[index])
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, DataCorruption):
            return None
        try:
            if os.fstat(fd).st_size == 0:
                return None
            m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        old = self._maps[index]
        if old is not None:
            self._old.append(old)
        entry = (m, memoryview(m))
        self._maps[index] = entry
        return entry

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._windows.clear()
        for entry in [*self._maps, *self._old]:
            if entry is not None:
                entry[1].release()
                with contextlib.suppress(BufferError):  # a caller still holds a view
                    entry[0].close()


class _Reader:
    """Verified blob contents for plan entries, zero-copy where the bytes allow.

    Packed blobs are views of the mapped pack file; incompressible chunks are
    views of the mapped chunk file; other chunks are decompressed. Everything
    is BLAKE3-verified before it is returned (packed blobs not, with
    ``verify=False``: for a caller that verifies them apart). With
    ``fallback``, a blob not where the plan says is looked up through the blob
    service (parent process only: the SQLite connection must not be used
    after a fork).
    """

    def __init__(
        self,
        blobs: PackedBlobService,
        plan: NarPlan,
        *,
        fallback: bool,
        verify: bool = True,
        mapped: bool = True,
    ) -> None:
        self._blobs = blobs
        self._mapped = mapped
        self._packs = _Packs(blobs, plan.packs, mapped)
        self._fallback = fallback
        self._verify = verify
        # Per pack: its plan segments (start, end, digest), their starts, and
        # whether each was checked (0: not yet, 1: intact, 2: not intact).
        self._segments: list[list[tuple[int, int, bytes]]] = [[] for _ in plan.packs]
        for pack, offset, length, b3 in plan.segments:
            self._segments[pack].append((offset, offset + length, b3))
        self._starts = [[seg[0] for seg in segs] for segs in self._segments]
        self._checked = [bytearray(len(segs)) for segs in self._segments]

    def packed(self, entry: _Entry) -> memoryview | None:
        """A packed blob's verified bytes where the plan says they are (the common case).

        Inside an intact segment it needs no hashing of its own; the first blob
        of a segment verifies the whole segment. Elsewhere, or if the segment
        is damaged, the blob is verified alone.
        """
        _, raw, size, pack, offset = entry
        if pack == _NOT_PACKED:
            return None
        view = self._packs.view(pack, offset, size)
        if view is None or not self._verify:
            return view
        k = bisect.bisect_right(self._starts[pack], offset) - 1
        if k >= 0:
            start, end, b3 = self._segments[pack][k]
            if offset + size <= end:
                checked = self._checked[pack]
                if not checked[k]:
                    whole = self._packs.view(pack, start, end - start)
                    intact = whole is not None and blake3.blake3(whole).digest() == b3
                    checked[k] = 1 if intact else 2
                if checked[k] == 1:
                    return view
        if blake3.blake3(view).digest() == raw:
            return view
        return None

    def unpacked(self, entry: _Entry) -> Iterator[bytes | memoryview]:
        """The blob's verified bytes where :meth:`packed` gave none, a chunk at a time.

        Chunked blobs are read chunk by chunk (memory stays bounded); a packed
        blob not where the plan says is looked up (with ``fallback``).
        """
        _, raw, size, pack, _ = entry
        digest = B3Digest(raw)
        try:
            chunks = self._blobs.large.chunks_sync(digest) if pack == _NOT_PACKED else None
            if chunks is not None:
                yield from self._chunks(digest, size, chunks or [ChunkMeta(digest, size)])
                return
            if self._fallback:
                packed = self._blobs.chunked_sync(digest)
                if packed is not None:
                    yield from self._packed_chunks(digest, size, packed)
                    return
                yield _fallback(self._blobs, digest, size)
                return
        except NarRenderError:
            raise
        except (CastoreError, ValueError) as exc:
            raise NarRenderError(f"failed rendering nar: blob {digest}: {exc}") from exc
        raise NarRenderError(f"failed rendering nar: blob {digest} is not where its plan says")

    def _chunks(
        self, digest: B3Digest, size: int, chunks: list[ChunkMeta]
    ) -> Iterator[bytes | memoryview]:
        """Each chunk loaded, verified and handed out before the next is read."""
        large = self._blobs.large
        total = sum(c.size for c in chunks)
        if total != size:
            raise NarRenderError(
                f"failed rendering nar: blob {digest} has {total} bytes, expected {size}"
            )
        for c in chunks:  # a one-chunk blob is its chunk
            got = large.load_chunk_pieces_sync(c.digest, c.size, mapped=self._mapped)
            if got is None:
                raise NarRenderError(
                    f"failed rendering nar: blob {digest}: chunk {c.digest} missing"
                )
            if sum(len(p) for p in got) != c.size:
                raise DataCorruption(f"chunk {c.digest} does not have the {c.size} bytes indexed")
            yield from got

    def _packed_chunks(
        self, digest: B3Digest, size: int, chunks: list[ChunkMeta]
    ) -> Iterator[bytes | memoryview]:
        """A blob stored as packed chunks, looked up chunk by chunk (parent process only)."""
        if sum(c.size for c in chunks) != size:
            raise NarRenderError(f"failed rendering nar: blob {digest} does not have {size} bytes")
        for c in chunks:
            yield _fallback(self._blobs, c.digest, c.size)

    def close(self) -> None:
        self._packs.close()


_Sink = Callable[[list[bytes | memoryview], int], None]
"""Takes a batch of pieces and their total length."""


class _Out:
    """Gathers pieces and hands them to ``sink`` in large batches."""

    def __init__(self, sink: _Sink, flush_bytes: int = _FLUSH_BYTES) -> None:
        self._sink = sink
        self._flush_bytes = flush_bytes
        self._iov: list[bytes | memoryview] = []
        self._bytes = 0

    def add(self, piece: bytes | memoryview) -> None:
        self._iov.append(piece)
        self._bytes += len(piece)
        if len(self._iov) >= _IOV_MAX or self._bytes >= self._flush_bytes:
            self.flush()

    def flush(self) -> None:
        if self._iov:
            self._sink(self._iov, self._bytes)
        self._iov, self._bytes = [], 0


def _fd_sink(fd: int) -> _Sink:
    return lambda iov, total: writev_all(fd, iov, total)


def write_plan(
    plan: NarPlan, blobs: PackedBlobService, fd: int, *, fork: bool | None = None
) -> None:
    """Write the NAR of ``plan`` to ``fd`` (blocking), verifying every blob first.

    A large NAR is verified by two processes (threads would not help: hashing
    and decompressing chunks of this size hold the GIL). This one verifies and
    writes entries from the front; a forked child verifies from the back. Where
    they meet, this one stops and the child writes the rest. Memory stays
    bounded: verified bytes are views of mapped files, and the child keeps at
    most ``_CHILD_KEEP`` bytes of decompressed chunks, decompressing (and
    verifying) the others again when it writes them.

    For commands, not servers: a forked copy of a server would hold its
    sockets (servers use :func:`planned_stream`, which does not fork).
    ``fork`` forces the child (``True``, for NARs of more than one entry) or
    its absence (``False``); by default see :func:`~tvix_castore.forked.want_fork`.

    Raises:
        NarRenderError: a blob is missing, corrupt, or of the wrong size (the
            bytes before it have been written).
    """
    _write(plan, blobs, _fd_sink(fd), fd, fork=fork)


def _write(
    plan: NarPlan,
    blobs: PackedBlobService,
    sink: _Sink,
    fork_fd: int | None,
    *,
    fallback: bool = True,
    verify: bool = True,
    mapped: bool = True,
    fork: bool | None = None,
) -> None:
    """Write ``plan`` into ``sink``; with ``fork_fd``, a large one with a forked child.

    Without ``fallback`` (in a forked process), a blob not where the plan
    says is an error rather than looked up; without ``verify``, packed blobs
    are not hashed (the caller verifies them apart: see :class:`PlanHasher`).
    """
    entries = plan.entries
    literals = memoryview(plan.literals)
    child = None
    large = plan.nar_size >= _FORK_MIN
    if fork_fd is not None and len(entries) > 1 and want_fork(fork, large=large):
        child = _Child.start(plan, blobs, fork_fd, entries)
    reader = _Reader(blobs, plan, fallback=fallback, verify=verify, mapped=mapped)
    out = _Out(sink, _FLUSH_BYTES if fork_fd is not None else _SERVER_PIECE)
    stop = len(entries)
    try:
        pos = 0
        add, packed = out.add, reader.packed  # the loop runs once per file: kept tight
        for i, entry in enumerate(entries):
            if child is not None and child.verified_from(i) <= i:
                stop = i
                break
            lit_end = entry[0]
            if lit_end > pos:
                add(literals[pos:lit_end])
                pos = lit_end
            view = packed(entry)
            if view is not None:
                add(view)
            else:
                for piece in reader.unpacked(entry):
                    add(piece)
        if child is None:
            out.add(literals[pos:])
        out.flush()
    except BaseException:
        if child is not None:
            child.abort()
        raise
    finally:
        del out
        reader.close()
    if child is not None:
        child.finish(stop)


# Words of the page shared with the child: where this process is, and the
# lowest entry the child has verified (all entries from there on are). Each is
# one aligned 64-bit word, read and written whole through a memoryview:
# ``struct.pack_into`` zero-fills before writing, so the other process could
# read a torn 0 (it once made the parent stop early).
_PARENT_AT, _CHILD_FROM = 0, 1
_WORD = struct.Struct("<I")  # the start entry, sent through the "go" pipe


class _Child:
    """The forked verifier and writer of a plan's tail (see :func:`write_plan`)."""

    def __init__(self, pid: int, go: int, err: int, shared: mmap.mmap) -> None:
        self._pid = pid
        self._go = go
        self._err = err
        self._shared = shared
        self._words = memoryview(shared).cast("Q")

    @classmethod
    def start(
        cls, plan: NarPlan, blobs: PackedBlobService, fd: int, entries: Sequence[_Entry]
    ) -> _Child:
        shared = mmap.mmap(-1, mmap.PAGESIZE)  # anonymous and shared across fork
        with memoryview(shared).cast("Q") as words:
            words[_CHILD_FROM] = len(entries)
        go_r, go_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = fork_child(
            lambda: _child_main(plan, blobs, fd, entries, shared, go_r),
            lambda exc: os.write(err_w, str(exc).encode(errors="replace")[:4000]),
            (go_w, err_r),
        )
        os.close(go_r)
        os.close(err_w)
        return cls(pid, go_w, err_r, shared)

    def verified_from(self, at: int) -> int:
        """Publish that this process is at entry ``at``; the child's verified start."""
        words = self._words
        words[_PARENT_AT] = at
        return int(words[_CHILD_FROM])

    def abort(self) -> None:
        """Stop the child without letting it write (the front part failed).

        It only reads, so it is killed rather than left to finish verifying.
        """
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)
        os.close(self._go)
        os.close(self._err)
        os.waitpid(self._pid, 0)
        self._words.release()
        self._shared.close()

    def finish(self, start: int) -> None:
        """Let the child write entries from ``start`` on; raise what it reports."""
        with contextlib.suppress(OSError):  # it has already exited: its status tells why
            os.write(self._go, _WORD.pack(start))
        os.close(self._go)
        message = b""
        while chunk := os.read(self._err, 4096):
            message += chunk
        os.close(self._err)
        _, status = os.waitpid(self._pid, 0)
        self._words.release()
        self._shared.close()
        if status != 0:
            text = message.decode(errors="replace") or f"wait status {status}"
            if text.startswith("failed rendering nar"):
                raise NarRenderError(text)
            raise NarRenderError(f"failed rendering nar: {text}")


def _child_main(
    plan: NarPlan,
    blobs: PackedBlobService,
    fd: int,
    entries: Sequence[_Entry],
    shared: mmap.mmap,
    go: int,
) -> int:  # pragma: no cover - runs in the forked child
    """Verify entries from the back until meeting the parent; then write from where it stopped.

    What it will write is gathered while verifying (in reverse), so writing
    is a few ``writev`` calls. Pieces of chunked blobs beyond ``_CHILD_KEEP``
    bytes decompressed (or ``_CHILD_MAPPED`` bytes of mapped chunk files) are
    not kept: their entry stands in the list and is read (and verified)
    again when written.
    """
    reader = _Reader(blobs, plan, fallback=False)
    literals = memoryview(plan.literals)
    n = len(entries)
    backwards: list[bytes | memoryview | _Entry] = [literals[entries[-1][0] :]]
    marks = [1]  # marks[n - j]: length of ``backwards`` covering entries[j:] and the tail
    add = backwards.append
    kept = mapped = 0  # bytes of chunks held: decompressed; views of mapped chunk files
    i = n
    words = memoryview(shared).cast("Q")
    while i > 0 and i - 1 > words[_PARENT_AT]:
        i -= 1
        entry = entries[i]
        view = reader.packed(entry)  # views of the few pack maps: free to hold
        if view is not None:
            add(view)
        else:
            held: _Pieces | None = []
            for piece in reader.unpacked(entry):
                if held is not None:
                    if isinstance(piece, memoryview):
                        mapped += len(piece)
                        over = mapped > _CHILD_MAPPED
                    else:
                        kept += len(piece)
                        over = kept > _CHILD_KEEP
                    if over:
                        held = None
                        continue
                    held.append(piece)
            if held is None:
                add(entry)
            else:
                backwards.extend(reversed(held))
            del held
        add(literals[entries[i - 1][0] if i else 0 : entry[0]])
        marks.append(len(backwards))
        words[_CHILD_FROM] = i
    message = os.read(go, _WORD.size)
    if len(message) != _WORD.size:
        return 2  # the front part failed: write nothing
    (start,) = _WORD.unpack(message)
    out = _Out(_fd_sink(fd))
    for item in reversed(backwards[: marks[n - start]]):
        if isinstance(item, tuple):
            for piece in reader.unpacked(item):
                out.add(piece)
        else:
            out.add(item)
    out.flush()
    return 0


def _fallback(blobs: PackedBlobService, digest: B3Digest, size: int) -> bytes:
    """A blob not where the plan says: ask the blob service (which verifies it)."""
    data = blobs.read_packed_sync(digest)
    if data is None:
        raise NarRenderError(f"failed rendering nar: blob {digest} not found")
    if len(data) != size:
        raise NarRenderError(
            f"failed rendering nar: blob {digest} has {len(data)} bytes, expected {size}"
        )
    return data


def _planned(
    plans: SqliteNarPlans | None, blobs: BlobService, node: Node
) -> tuple[SqliteNarPlans, PackedBlobService, DirectoryNode] | None:
    """The three, narrowed, if ``node`` can have a plan: a directory, in a store with packs."""
    if plans is None or not isinstance(node, DirectoryNode):
        return None
    if not isinstance(blobs, PackedBlobService):
        return None
    return plans, blobs, node


async def save_plan(
    plans: SqliteNarPlans | None,
    blobs: BlobService,
    node: Node,
    closure: Mapping[B3Digest, Directory],
    nar_size: int | None,
    nar_sha256: bytes | None,
) -> None:
    """Record the plan of ``node``'s NAR, whose size and sha256 the caller established.

    With ``nar_sha256=None`` (a server that streamed the NAR without hashing
    it) the plan serves the NAR but vouches for no NarHash: ``export`` then
    renders once more and replaces it. Only for directories in a store with
    packed blobs; a plan is a cache, so failing to write one is logged, not
    raised.
    """
    target = _planned(plans, blobs, node)
    if target is None:
        return
    store, packed, root = target

    def work() -> None:
        plan = build_plan(root, closure, packed, nar_sha256 or _UNVOUCHED)
        if nar_size is not None and plan.nar_size != nar_size:
            raise DataCorruption(f"plan of {root.digest}: {plan.nar_size} bytes, not {nar_size}")
        store.put_sync(root.digest, plan)

    try:
        await asyncio.to_thread(work)
    except (CastoreError, NarRenderError) as exc:
        _log.warning("no NAR plan recorded for %s: %s", root.digest, exc)
    else:
        _log.debug("recorded the NAR plan of %s", root.digest)


def vouching_plan(
    plans: SqliteNarPlans | None,
    blobs: BlobService,
    node: Node,
    nar_size: int,
    nar_sha256: bytes,
) -> tuple[NarPlan, PackedBlobService] | None:
    """``node``'s plan if one vouches for this NAR size and sha256 (blocking), else ``None``."""
    if not isinstance(node, DirectoryNode):
        return None
    found = _plan_of_sync(plans, blobs, node)
    if found is None or found[0].nar_sha256 == _UNVOUCHED:
        _log.debug("no NAR plan vouches for %s: rendering from castore", node.digest)
        return None
    if (found[0].nar_size, found[0].nar_sha256) != (nar_size, nar_sha256):
        _log.debug("the NAR plan of %s vouches for another NAR: rendering", node.digest)
        return None
    _log.debug("writing the NAR of %s from its plan", node.digest)
    return found


async def write_planned(
    plans: SqliteNarPlans | None,
    blobs: BlobService,
    node: Node,
    nar_size: int,
    nar_sha256: bytes,
    fd: int,
) -> bool:
    """Write ``node``'s NAR to ``fd`` from its plan, if one vouches for this size and sha256.

    Returns ``False`` (having written nothing) when there is no such plan.
    """
    return await asyncio.to_thread(write_vouched_sync, plans, blobs, node, nar_size, nar_sha256, fd)


def write_vouched_sync(
    plans: SqliteNarPlans | None,
    blobs: BlobService,
    node: Node,
    nar_size: int,
    nar_sha256: bytes,
    fd: int,
) -> bool:
    """:func:`write_planned`, blocking (for a command that runs no event loop).

    Nothing is written (``False``) if a pack the plan reads is missing or
    short: the caller renders from castore, which finds the blob elsewhere or
    reports it before writing. A blob found corrupt while writing marks the
    NAR damaged (see :func:`mark_damaged`); a NAR written whole clears a mark.
    """
    found = vouching_plan(plans, blobs, node, nar_size, nar_sha256)
    if found is None or plans is None or not isinstance(node, DirectoryNode):
        return False
    problem = content_problem(*found)
    if problem is not None:
        _log.debug("the NAR plan of %s cannot be read (%s): rendering", node.digest, problem)
        return False
    try:
        write_plan(*found, fd)
    except DataCorruption as exc:
        with contextlib.suppress(CastoreError):
            _log.warning("marking the NAR of %s damaged: %s", node.digest, exc)
            plans.mark_damaged_sync(node, str(exc))
        raise
    with contextlib.suppress(CastoreError):
        plans.clear_damage_sync(node)
    return True


def _plan_of_sync(
    plans: SqliteNarPlans | None, blobs: BlobService, node: Node
) -> tuple[NarPlan, PackedBlobService] | None:
    """The plan of ``node`` if plans apply and one is stored intact (a corrupt one is logged)."""
    target = _planned(plans, blobs, node)
    if target is None:
        return None
    store, packed, root = target
    try:
        plan = store.get_sync(root.digest)
    except DataCorruption as exc:
        _log.warning("ignoring the NAR plan of %s: %s", root.digest, exc)
        return None
    return None if plan is None else (plan, packed)


async def _plan_of(
    plans: SqliteNarPlans | None, blobs: BlobService, node: Node
) -> tuple[NarPlan, PackedBlobService] | None:
    return await asyncio.to_thread(_plan_of_sync, plans, blobs, node)


def content_problem(plan: NarPlan, blobs: PackedBlobService) -> str | None:
    """Why some blob of ``plan`` cannot be read, or ``None`` (blocking).

    What a server checks before it sends headers: every pack the plan reads
    exists and is long enough for each range, every other blob's chunks are
    listed and their files exist. The bytes themselves are verified as they
    are written.
    """
    ends: dict[int, int] = {}
    unpacked: list[B3Digest] = []
    for _, raw, size, pack, offset in plan.entries:
        if pack == _NOT_PACKED:
            unpacked.append(B3Digest(raw))
        else:
            ends[pack] = max(ends.get(pack, 0), offset + size)
    for pack, end in ends.items():
        name = plan.packs[pack]
        try:
            have = os.stat(blobs.pack_path(name)).st_size
        except (OSError, DataCorruption) as exc:
            return f"pack file {name} is missing: {exc}"
        if have < end:
            return f"pack file {name} is truncated ({have} bytes, the NAR reads up to {end})"
    return blobs.unreadable_sync(unpacked) if unpacked else None


def content_present(plan: NarPlan, blobs: PackedBlobService) -> bool:
    """Whether every blob of ``plan`` can be read (see :func:`content_problem`); blocking."""
    return content_problem(plan, blobs) is None


def _damage_key(node: Node) -> bytes | None:
    """The key of ``node``'s damage mark: kind, digest and size (symlinks cannot be damaged).

    With the size, a node URL a client made up with a wrong size (which fails
    to render) marks only itself, not the path whose node has the real one.
    """
    if isinstance(node, DirectoryNode):
        return b"d" + node.digest.raw + node.size.to_bytes(8, "little")
    if isinstance(node, FileNode):
        return b"f" + node.digest.raw + node.size.to_bytes(8, "little")
    return None


async def damage_of(plans: SqliteNarPlans | None, node: Node) -> str | None:
    """Why ``node``'s NAR is marked damaged, or ``None`` (also without a plan store)."""
    if plans is None:
        return None
    return await asyncio.to_thread(plans.damage_sync, node)


async def mark_damaged(plans: SqliteNarPlans | None, node: Node, reason: str) -> None:
    """Remember that ``node``'s NAR cannot be produced (a read found ``reason``).

    Servers then refuse it before sending headers, and stop vouching for it
    (narinfo, ``CalculateNAR``) until the mark is cleared: by a successful
    upload or import of the same content, or a successful ``tvix-store
    export`` (each reads and verifies every blob). Marks live next to the
    plans (the embedded store); failing to write one is logged.
    """
    if plans is None or not isinstance(node, (DirectoryNode, FileNode)):
        return
    _log.warning("marking the NAR of %s damaged: %s", node.digest, reason)
    try:
        await asyncio.to_thread(plans.mark_damaged_sync, node, reason)
    except CastoreError as exc:
        _log.warning("cannot mark the NAR of %s damaged: %s", node.digest, exc)


async def clear_damage(plans: SqliteNarPlans | None, node: Node) -> None:
    """Drop ``node``'s damage mark after its content was stored and verified again."""
    if plans is None or not isinstance(node, (DirectoryNode, FileNode)):
        return
    try:
        if await asyncio.to_thread(plans.clear_damage_sync, node):
            _log.info("the NAR of %s is no longer marked damaged", node.digest)
    except CastoreError as exc:
        _log.warning("cannot clear the damage mark of %s: %s", node.digest, exc)


async def verify_planned(
    plans: SqliteNarPlans | None, blobs: BlobService, node: Node, nar_sha256: bytes
) -> str | None:
    """Read and verify ``node``'s whole NAR from its plan: the problem, or ``None`` if intact.

    ``None`` also if there is no plan to read (nothing to say).
    """
    found = await _plan_of(plans, blobs, node)
    if found is None:
        return None
    try:
        sha = await asyncio.to_thread(_sha256_of, *found, fallback=True, verify=True)
    except CastoreError as exc:
        return str(exc)
    return None if sha == nar_sha256 else "its NAR does not hash to the recorded NarHash"


@dataclass(frozen=True, slots=True)
class Served:
    """A NAR a server can send from its plan (its content was found present)."""

    plan: NarPlan
    blobs: PackedBlobService

    def pieces(self) -> AsyncIterator[bytes]:
        """The whole NAR, written by a thread (without forking).

        An error there is raised by the iterator, after the bytes before it.
        """
        return _pieces(self.plan, self.blobs)

    def layout(self) -> NarLayout:
        """The NAR's layout (for ranges), without fetching a Directory."""
        plan = self.plan
        segments: list[bytes | FileNode] = []
        pos = 0
        for lit_end, raw, size, _, _ in plan.entries:
            if lit_end > pos:
                segments.append(plan.literals[pos:lit_end])
                pos = lit_end
            segments.append(FileNode(b"", B3Digest(raw), size))
        if pos < len(plan.literals):
            segments.append(plan.literals[pos:])
        return NarLayout.of(segments)


async def planned_stream(
    plans: SqliteNarPlans | None, blobs: BlobService, node: Node
) -> Served | None:
    """``node``'s NAR from its plan, for a server's response.

    ``None`` if there is no usable plan or some content is missing (checked
    before anything is produced).
    """
    found = await _plan_of(plans, blobs, node)
    if found is None or not await asyncio.to_thread(content_present, *found):
        return None
    return Served(*found)


async def _pieces(plan: NarPlan, blobs: PackedBlobService) -> AsyncIterator[bytes]:
    """The plan written by a thread in pieces of about ``_SERVER_PIECE``, ``_AHEAD`` ahead."""
    pieces: queue.Queue[bytes | BaseException | None] = queue.Queue(_AHEAD)
    stop = threading.Event()

    def sink(iov: list[bytes | memoryview], total: int) -> None:
        piece = b"".join(iov)
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                pieces.put(piece, timeout=0.1)
                return
        raise _Stopped

    def write() -> None:
        try:
            _write(plan, blobs, sink, None, mapped=False)  # no SIGBUS for a server
        except _Stopped:
            return
        except BaseException as exc:  # raised on the loop side
            pieces.put(exc)
            return
        pieces.put(None)

    writer = asyncio.ensure_future(asyncio.to_thread(write))
    try:
        while (piece := await asyncio.to_thread(pieces.get)) is not None:
            if isinstance(piece, BaseException):
                raise piece
            yield piece
    finally:
        stop.set()  # a writer still running stops at its next piece
        await writer


class _Stopped(Exception):
    """The consumer of a planned stream went away."""


async def calculate_nar_planned(
    plans: SqliteNarPlans | None, blobs: BlobService, dirs: DirectoryService, node: Node
) -> tuple[int, bytes]:
    """NAR size and sha256 of ``node``: from a vouching plan if its content is there.

    Otherwise the NAR is rendered and hashed (failing on missing or corrupt
    content), and — for a directory in a store with plans — a plan vouching
    for the result is recorded: the server-side NAR cache the protocol's
    ``CalculateNAR`` asks for.
    """
    reason = await damage_of(plans, node)
    if reason is not None:  # a read found it damaged: no more vouching (see mark_damaged)
        raise NarRenderError(f"this NAR is damaged in the store: {reason}")
    found = await _plan_of(plans, blobs, node)
    vouched = found is not None and found[0].nar_sha256 != _UNVOUCHED
    if vouched and found is not None and await asyncio.to_thread(content_present, *found):
        return found[0].nar_size, found[0].nar_sha256
    closure = None
    if _planned(plans, blobs, node) is not None:
        closure = await fetch_closure(node, dirs)
    try:
        size, sha = await calculate_nar(node, blobs, dirs, closure=closure)
    except DataCorruption as exc:
        if found is not None:  # it had a plan, so it was whole once: damaged since
            await mark_damaged(plans, node, str(exc))
        raise
    if closure is not None:
        await save_plan(plans, blobs, node, closure, size, sha)
    return size, sha
