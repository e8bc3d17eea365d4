"""Checking every indexed frame of a pack store against its bytes (``tvix-store fsck``).

Each frame is read and decoded, its check and every member's BLAKE3 digest
verified, and every index row is matched against the member it names; every
chunk list must name indexed chunks whose sizes add up. Nothing is changed:
what is found is reported, blob by blob, for the store to say which paths it
damages. Large stores decode their frames in forked children
(:mod:`~tvix_castore.packstore.forkdecode`), as NAR writers do.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tvix_castore.digests import EMPTY_DIGEST
from tvix_castore.errors import DataCorruption
from tvix_castore.forked import usable_cpus, want_fork
from tvix_castore.packstore.forkdecode import ForkedDecoder
from tvix_castore.packstore.format import CONTENT_ADDRESSED
from tvix_castore.packstore.index import FrameRef, parse_chunk_list
from tvix_castore.packstore.reader import DecodedFrame, PackReader
from tvix_castore.progress import Progress

__all__ = ["DamagedFrame", "PackCheck", "check_packs"]

_AHEAD = 6
_FORK_MIN_FRAMES = 8


@dataclass(frozen=True)
class DamagedFrame:
    """A frame that does not decode or verify; ``blobs``: index rows it makes unreadable."""

    id: int  # its index row
    pack: str
    offset: int
    reason: str
    blobs: int  # indexed members that cannot be read because of it


@dataclass
class PackCheck:
    """What :func:`check_packs` found."""

    frames: int = 0
    verified_bytes: int = 0  # decoded bytes verified
    blobs: int = 0  # index rows checked (blobs, chunks, Directories)
    chunked: int = 0
    seconds: float = 0.0
    damaged_frames: list[DamagedFrame] = field(default_factory=list)
    bad: dict[bytes, str] = field(default_factory=dict)  # digest -> why it cannot be read
    legacy: int = 0  # blobs still in the layout of older releases (not checked here)


def _decoded(
    reader: PackReader, refs: list[FrameRef]
) -> Iterator[tuple[FrameRef, DecodedFrame | str]]:
    """Each frame decoded and verified, or why it could not be, in order."""
    forked = None
    if len(refs) >= _FORK_MIN_FRAMES and want_fork(None, large=True):
        forked = ForkedDecoder(reader, workers=max(1, min(2, usable_cpus())), slots=_AHEAD + 2)
    try:
        submitted = 0
        for i, ref in enumerate(refs):
            if forked is not None:
                while submitted < min(len(refs), i + _AHEAD) and forked.submit(refs[submitted]):
                    submitted += 1
            got = forked.result(ref) if forked is not None else None
            if got is None:
                try:
                    got = reader.verify(ref)
                except DataCorruption as exc:
                    yield ref, str(exc)
                    continue
            yield ref, got
            if forked is not None:
                forked.release(ref)
                forked.flushed()
    finally:
        if forked is not None:
            forked.close()


def check_packs(reader: PackReader, progress: Progress | None = None) -> PackCheck:
    """Verify every frame the index names and every index row (blocking, read-only).

    ``progress`` is told the frames and their bytes in the packs, then each frame checked.
    """
    start = time.monotonic()
    out = PackCheck()
    index = reader.index
    refs: list[FrameRef] = []
    kinds: dict[int, int] = {}
    for i, p, o, n, k in index.query(
        "SELECT id, pack, offset, length, kind FROM pack_frames ORDER BY pack, offset"
    ):
        refs.append(FrameRef(int(i), str(p), int(o), int(n)))
        kinds[int(i)] = int(k)
    members: dict[int, list[tuple[bytes, int, int]]] = {}
    for digest, frame, offset, size in index.query(
        "SELECT digest, frame, offset, size FROM pack_blobs"
    ):
        members.setdefault(int(frame), []).append((bytes(digest), int(offset), int(size)))
    indexed = {d for rows in members.values() for d, _, _ in rows}
    orphans = set(members) - set(kinds)
    for fid in orphans:  # (rows naming a frame the index does not have)
        for digest, _, _ in members.pop(fid):
            out.bad[digest] = f"its index row names frame {fid}, which is not indexed"
    if progress is not None:
        progress.total(items=len(refs), bytes=sum(r.length for r in refs))
    for ref, got in _decoded(reader, refs):
        out.frames += 1
        if progress is not None:
            progress.advance(1, ref.length)
        rows = members.get(ref.id, [])
        out.blobs += len(rows)
        if isinstance(got, str):
            out.damaged_frames.append(DamagedFrame(ref.id, ref.pack, ref.offset, got, len(rows)))
            for digest, _, _ in rows:
                out.bad[digest] = got
            continue
        out.verified_bytes += len(got.payload)
        if kinds.get(ref.id) not in CONTENT_ADDRESSED:
            continue
        for digest, offset, size in rows:
            if size == 0:  # (the empty blob or Directory: no bytes to hold)
                if digest != EMPTY_DIGEST.raw:
                    out.bad[digest] = f"indexed with size 0 in pack {ref.pack}"
                continue
            m = got.offsets.get(offset)
            if m is None or m.key != digest or m.size != size:
                out.bad[digest] = f"pack {ref.pack} at {ref.offset} does not hold it where indexed"
    for digest, size, chunks in index.query("SELECT digest, size, chunks FROM pack_chunked"):
        out.chunked += 1
        key = bytes(digest)
        try:
            meta = parse_chunk_list(key, bytes(chunks))
        except DataCorruption as exc:
            out.bad[key] = str(exc)
            continue
        for c in meta:
            why = out.bad.get(c.digest.raw)
            if why is not None:
                out.bad[key] = f"chunk {c.digest}: {why}"
                break
            if c.digest.raw not in indexed:
                out.bad[key] = f"chunk {c.digest} is missing"
                break
        else:
            if sum(c.size for c in meta) != int(size):
                out.bad[key] = f"its chunks add up to {sum(c.size for c in meta)}, not {size}"
    with contextlib.suppress(DataCorruption):
        for table in ("packed", "chunked"):
            if index.has_table(table):
                out.legacy += int(index.query(f"SELECT count(*) FROM {table}")[0][0])
    out.seconds = time.monotonic() - start
    return out
