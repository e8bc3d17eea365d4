"""Indexing packs the index is missing or behind on (rule 3 of PACKSTORE.md).

The index is a cache of the packs. A pack not in ``pack_files``, or longer
than its ``indexed``, whose lock no live writer holds, is scanned from
``indexed`` on; each complete frame is decoded and checked (a frame that
fails its check is left out, and the scan stops at a torn tail). Records
(Directories, PathInfos) go to the store layer's callback first; then, in
one transaction, the frames' rows and the packs' new ``indexed`` commit.
So a crash at any point leaves the work to be redone (idempotently), never
an index row naming bytes that are not there.

A chunk list is indexed only if each of its chunks is (a forked worker's
list can name chunks another worker was still holding when the run died);
one that is not stays behind ``indexed`` and is retried on the next open.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from tvix_castore.errors import DataCorruption
from tvix_castore.packstore.format import FILE_HEADER, Kind, decode_payload, scan
from tvix_castore.packstore.index import NewFrame, PackIndex, parse_chunk_list

if TYPE_CHECKING:
    from tvix_castore.packstore.reader import PackReader

__all__ = ["OnRecord", "RebuildStats", "catch_up"]

OnRecord = Callable[[Kind, bytes, memoryview], None]
"""Gets each record (kind, key, bytes) of a PATHINFOS frame indexed anew (Directories are
indexed like blobs: they need no callback)."""

_PACK_SUFFIX = ".tvpack"
_log = logging.getLogger(__name__)


class RebuildStats(NamedTuple):
    """What a rebuild did."""

    packs: int  # packs scanned
    frames: int  # frames indexed
    blobs: int
    chunked: int
    records: int  # delivered to on_record
    skipped: int  # packs locked by a live writer
    damaged: int  # frames failing their check (left out)


class _Pack(NamedTuple):
    name: str
    frames: list[NewFrame]
    indexed: int  # where the next scan of it starts
    lists: list[NewFrame]  # chunk lists, indexed if their chunks are


def _scan_pack(
    path: Path, name: str, start: int, on_record: OnRecord | None, counts: dict[str, int]
) -> _Pack:
    frames: list[NewFrame] = []
    lists: list[NewFrame] = []
    end = start
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for frame in scan(path, start):
            end = frame.offset + frame.length
            data = os.pread(fd, frame.length, frame.offset)
            where = f"pack {name} at {frame.offset}"
            try:
                head, payload = decode_payload(data, where, frame.offset)
            except DataCorruption as exc:
                _log.warning("not indexing a damaged frame: %s", exc)
                counts["damaged"] += 1
                continue
            chunks = b""
            if head.kind == Kind.CHUNK_LIST:
                chunks = bytes(payload)
            elif head.kind == Kind.PATHINFOS and on_record is not None:
                at = 0
                for m in head.members:
                    on_record(Kind(head.kind), m.key, payload[at : at + m.size])
                    at += m.size
                    counts["records"] += 1
            new = NewFrame(name, frame.offset, frame.length, head.kind, head.members, chunks)
            (lists if head.kind == Kind.CHUNK_LIST else frames).append(new)
    finally:
        os.close(fd)
    return _Pack(name, frames, end, lists)


def catch_up(
    index: PackIndex,
    reader: PackReader,
    pack_dir: Path,
    own: set[str],
    on_record: OnRecord | None,
) -> RebuildStats:
    """Index every pack in ``pack_dir`` that is missing or behind (see the module doc).

    A pack whose chunk list names chunks of a pack scanned after it is
    scanned again from there once the others are done (while that helps).
    """
    counts = dict.fromkeys(
        ("packs", "frames", "blobs", "chunked", "records", "skipped", "damaged"), 0
    )
    try:
        names = sorted(n for n in os.listdir(pack_dir) if n.endswith(_PACK_SUFFIX))
    except FileNotFoundError:
        names = []
    deferred = _pass(index, reader, pack_dir, names, own, on_record, counts)
    while deferred:  # (chunk lists naming chunks of packs indexed after them)
        chunked, skipped = counts["chunked"], counts["skipped"]
        again = _pass(index, reader, pack_dir, deferred, own, on_record, counts)
        counts["skipped"] = skipped
        if counts["chunked"] == chunked:
            break
        deferred = again
    return RebuildStats(**counts)


def _pass(
    index: PackIndex,
    reader: PackReader,
    pack_dir: Path,
    names: list[str],
    own: set[str],
    on_record: OnRecord | None,
    counts: dict[str, int],
) -> list[str]:
    """One pass over ``names``; those left behind on a chunk list."""
    deferred = []
    known = index.pack_files()
    for name in names:
        if name in own:
            continue
        path = pack_dir / name
        try:
            size = os.stat(path).st_size
        except OSError:
            continue
        start = known.get(name, len(FILE_HEADER))
        if size <= start or size < len(FILE_HEADER):
            continue
        try:
            lock = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                counts["skipped"] += 1
                continue
            start = index.pack_files().get(name, len(FILE_HEADER))  # (another may have done it)
            if os.fstat(lock).st_size <= start:
                continue
            if not _index_pack(index, reader, path, name, start, on_record, counts):
                deferred.append(name)
        finally:
            os.close(lock)
    return deferred


def _index_pack(
    index: PackIndex,
    reader: PackReader,
    path: Path,
    name: str,
    start: int,
    on_record: OnRecord | None,
    counts: dict[str, int],
) -> bool:
    """Scan one locked pack from ``start`` and commit its rows; whether all of them."""
    pack = _scan_pack(path, name, start, on_record, counts)
    counts["packs"] += 1
    new_blobs = {m.key for f in pack.frames if f.kind == Kind.BLOBS for m in f.members}
    indexed = pack.indexed
    good: list[NewFrame] = []
    for lst in pack.lists:
        chunks = parse_chunk_list(lst.members[0].key, lst.chunks) if lst.members else ()
        want = [c.digest.raw for c in chunks if c.digest.raw not in new_blobs]
        found = reader.locate(want) if want else {}
        if lst.members and len(found) == len(set(want)):
            good.append(lst)
        else:
            _log.warning("pack %s: a chunk list at %d names missing chunks", name, lst.offset)
            indexed = min(indexed, lst.offset)
    with index.transaction(replace=False) as txn:
        for frame in [*pack.frames, *good]:
            txn.add_frame(frame)
        txn.packs[name] = indexed  # (add_frame marked more; never past a retry)
    counts["frames"] += len(pack.frames) + len(good)
    counts["blobs"] += len(new_blobs)
    counts["chunked"] += len(good)
    return indexed == pack.indexed
