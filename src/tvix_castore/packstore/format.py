"""Pack file v2: self-describing, checksummed frames (see PACKSTORE.md, README).

A pack is a 16-byte header followed by frames. Each frame carries its own
member table and two BLAKE3 checks, so the index can be rebuilt from the
packs alone and a torn tail (a crash mid-append) is recognised by a scan:
the head check covers the lengths a scan must trust before skipping ahead,
the frame check covers the decoded payload (for content-addressed kinds, the
digests of its members, which decoding computes), so a read never returns bytes
the writer did not hash.

All integers are little-endian.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator, Sequence
from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple

import blake3

from tvix_castore.digests import hash_threads
from tvix_castore.errors import DataCorruption
from tvix_castore.lazy import lazy_module

if TYPE_CHECKING:
    import zstandard
else:
    zstandard = lazy_module("zstandard")

__all__ = [
    "CONTENT_ADDRESSED",
    "DEFAULT_LEVEL",
    "FILE_HEADER",
    "HEAD_SIZE",
    "MEMBER",
    "PACK_LIMIT",
    "SEGMENT_TARGET",
    "SIZE_ONLY",
    "Codec",
    "EncodedFrame",
    "Frame",
    "FrameMember",
    "Kind",
    "build_frame",
    "decode_payload",
    "encode_frame",
    "parse_head",
    "scan",
]

SEGMENT_TARGET = 4 << 20  # raw bytes per BLOBS frame (measured: see PACKSTORE.md)
DEFAULT_LEVEL = 5
PACK_LIMIT = 1 << 30  # a writer starts a new pack beyond this

MAGIC = b"TVIXPACK"
VERSION = 2
FILE_HEADER = struct.pack("<8sII", MAGIC, VERSION, 0)
_HEAD = struct.Struct("<4sBBHIQQ")
HEAD_SIZE = _HEAD.size  # 28
MEMBER = struct.Struct("<32sQ")
SIZE_ONLY = struct.Struct("<I")  # a member of a content-addressed kind: its key is its BLAKE3
_FRAME_MAGIC = b"TVSG"
_HEAD_CHECK = 8
_CHECK = 32
_MAX_MEMBERS = 1 << 24  # more members than any sane frame: a damaged head
_MAX_RAW = 1 << 32  # a decoded payload larger than this is refused
_SAMPLE = 64 << 10  # compressed at level 1 first, to skip incompressible data cheaply
_MIN_GAIN = 0.03  # zstd output must be at least this much smaller, else stored raw


class Kind(IntEnum):
    """What a frame's members are."""

    BLOBS = 0
    CHUNK_LIST = 1
    DIRECTORIES = 2
    PATHINFOS = 3


class Codec(IntEnum):
    """How a frame's payload is stored."""

    RAW = 0
    ZSTD = 1


CONTENT_ADDRESSED = frozenset({0, 2})  # Kind.BLOBS, Kind.DIRECTORIES
"""Kinds whose member keys are the BLAKE3 of the members' bytes: the member
table lists sizes only (4 bytes, not 40: the digests would otherwise be kept
twice, in the pack and in the index, a few percent of a compressed store), and
the frame check covers the members' digests instead of the payload, so
decoding hashes every byte once (which yields the keys) and a writer that
hashed its blobs already does not hash them again."""


def _table_size(kind: int, count: int) -> int:
    return count * (SIZE_ONLY.size if kind in CONTENT_ADDRESSED else MEMBER.size)


class FrameMember(NamedTuple):
    """One entry of a frame's member table (kind-specific meaning)."""

    key: bytes
    size: int


class Frame(NamedTuple):
    """A frame as found in a pack: where it is and what its head says."""

    offset: int
    length: int  # whole frame, head to check
    kind: int  # a Kind, or an unknown (newer) kind readers skip
    codec: Codec
    members: tuple[FrameMember, ...]
    raw: int  # decoded payload bytes


class EncodedFrame(NamedTuple):
    """A frame built to be appended."""

    pieces: list[bytes | memoryview]  # for one writev
    length: int
    codec: Codec
    members: tuple[FrameMember, ...]


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """One compressor per thread and level (a context per frame is costly)."""
    cache: dict[tuple[int, int], zstandard.ZstdCompressor] | None = getattr(_local, "c", None)
    if cache is None:
        cache = _local.c = {}
    key = (os.getpid(), level)  # (not one inherited across a fork)
    cctx = cache.get(key)
    if cctx is None:
        cctx = cache[key] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cctx


def _worth_compressing(pieces: Sequence[bytes | memoryview], raw: int) -> bool:
    """Whether a level-1 sample of the payload shrinks enough (cheap: 64 KiB).

    The sample is taken from four places, so one incompressible file at the
    start of a segment does not decide for the whole of it.
    """
    if raw < 256:
        return False
    part = _SAMPLE // 4
    starts = [raw * i // 4 for i in range(4)]
    sample = bytearray()
    at = 0
    for piece in pieces:
        n = len(piece)
        for start in starts:
            lo, hi = max(start, at), min(start + part, at + n)
            if lo < hi:
                sample += memoryview(piece)[lo - at : hi - at]
        at += n
    out = _compressor(1).compress(bytes(sample))
    return len(out) <= len(sample) * (1 - _MIN_GAIN)


def _compress(pieces: Sequence[bytes | memoryview], raw: int, level: int) -> bytes | None:
    """The payload as one zstd frame, or ``None`` if it does not shrink enough."""
    cobj = _compressor(level).compressobj(size=raw)
    out = [cobj.compress(piece) for piece in pieces]
    out.append(cobj.flush())
    data = b"".join(out)
    return data if len(data) <= raw * (1 - _MIN_GAIN) else None


def build_frame(
    kind: int,
    members: Sequence[FrameMember],
    payload_pieces: Sequence[bytes | memoryview],
    level: int,
    *,
    sample: bool = True,
) -> EncodedFrame:
    """A frame ready to append: zstd at ``level`` (0: raw) when it pays.

    ``sample=False`` skips the level-1 sample (the caller knows the data compresses).
    """
    raw = sum(len(p) for p in payload_pieces)
    members = tuple(members)
    implicit = kind in CONTENT_ADDRESSED
    if implicit:
        table = b"".join([SIZE_ONLY.pack(m.size) for m in members])
    else:
        table = b"".join([MEMBER.pack(m.key, m.size) for m in members])
    stored: bytes | None = None
    if level > 0 and (not sample or _worth_compressing(payload_pieces, raw)):
        stored = _compress(payload_pieces, raw, level)
    codec = Codec.RAW if stored is None else Codec.ZSTD
    size = raw if stored is None else len(stored)
    head = _HEAD.pack(_FRAME_MAGIC, codec, kind, 0, len(members), size, raw)
    hasher = blake3.blake3(head, max_threads=hash_threads())
    hasher.update(table)
    head_check = hasher.copy().digest()[:_HEAD_CHECK]
    if implicit:  # (the caller hashed each member: its key)
        hasher.update(b"".join([m.key for m in members]))
    else:
        for piece in payload_pieces:
            hasher.update(piece)
    pieces: list[bytes | memoryview] = [head, table, head_check]
    if stored is None:
        pieces += payload_pieces
    else:
        pieces.append(stored)
    pieces.append(hasher.digest())
    length = HEAD_SIZE + len(table) + _HEAD_CHECK + size + _CHECK
    return EncodedFrame(pieces, length, codec, members)


def encode_frame(
    kind: int,
    members: Sequence[FrameMember],
    payload_pieces: Sequence[bytes | memoryview],
    level: int,
) -> list[bytes | memoryview]:
    """The frame's bytes as ``writev`` pieces (see :func:`build_frame`)."""
    return build_frame(kind, members, payload_pieces, level).pieces


class _Head(NamedTuple):
    codec: int
    kind: int
    n_members: int
    stored: int
    raw: int


def _parse(head: bytes, where: str) -> _Head:
    magic, codec, kind, zero, count, stored, raw = _HEAD.unpack_from(head)
    if magic != _FRAME_MAGIC:
        raise DataCorruption(f"{where}: not a frame (bad magic)")
    if zero or count > _MAX_MEMBERS or raw > _MAX_RAW or codec not in (0, 1):
        raise DataCorruption(f"{where}: damaged frame head")
    if codec == Codec.RAW and stored != raw:
        raise DataCorruption(f"{where}: damaged frame head (raw sizes differ)")
    return _Head(codec, kind, count, stored, raw)


def _table_end(kind: int, count: int) -> int:
    return HEAD_SIZE + _table_size(kind, count) + _HEAD_CHECK


def parse_head(data: bytes | memoryview, offset: int, where: str) -> Frame:
    """The frame whose head, member table and head check ``data`` starts with.

    Raises DataCorruption if the head check fails or ``data`` is too short
    for them (the payload need not be there).
    """
    view = memoryview(data)
    if len(view) < HEAD_SIZE:
        raise DataCorruption(f"{where}: frame head cut short")
    head = _parse(bytes(view[:HEAD_SIZE]), where)
    end = _table_end(head.kind, head.n_members)
    if len(view) < end:
        raise DataCorruption(f"{where}: frame member table cut short")
    table = view[HEAD_SIZE : end - _HEAD_CHECK]
    hasher = blake3.blake3(view[:HEAD_SIZE])
    hasher.update(table)
    if hasher.digest()[:_HEAD_CHECK] != view[end - _HEAD_CHECK : end]:
        raise DataCorruption(f"{where}: frame head check failed")
    if head.kind in CONTENT_ADDRESSED:  # keys: known once the payload is decoded
        members = tuple(FrameMember(b"", n) for (n,) in SIZE_ONLY.iter_unpack(table))
    else:
        members = tuple(FrameMember(k, n) for k, n in MEMBER.iter_unpack(table))
    length = end + head.stored + _CHECK
    return Frame(offset, length, head.kind, Codec(head.codec), members, head.raw)


def decode_payload(
    frame_bytes: bytes | memoryview, where: str, offset: int = 0
) -> tuple[Frame, memoryview]:
    """Parse a whole frame, decode its payload and verify its check.

    ``where`` names it in errors (pack and offset). Raises DataCorruption
    on any mismatch; the payload never exceeds the head's ``raw``.
    """
    view = memoryview(frame_bytes)
    frame = parse_head(view, offset, where)
    if len(view) != frame.length:
        raise DataCorruption(f"{where}: frame is {len(view)} bytes, its head says {frame.length}")
    start = _table_end(frame.kind, len(frame.members))
    stored = view[start : frame.length - _CHECK]
    if frame.codec == Codec.RAW:
        payload = stored
    else:
        try:
            out = zstandard.ZstdDecompressor().decompress(stored, max_output_size=frame.raw)
        except zstandard.ZstdError as exc:
            raise DataCorruption(f"{where}: payload is not valid zstd: {exc}") from exc
        payload = memoryview(out)
    if len(payload) != frame.raw:
        raise DataCorruption(f"{where}: payload decodes to {len(payload)} bytes, not {frame.raw}")
    total = sum(m.size for m in frame.members)
    if frame.kind in CONTENT_ADDRESSED and total != frame.raw:
        raise DataCorruption(f"{where}: members do not add up to the payload")
    if total > frame.raw and frame.kind == Kind.PATHINFOS:
        raise DataCorruption(f"{where}: members are larger than the payload")
    hasher = blake3.blake3(view[: start - _HEAD_CHECK])
    if frame.kind in CONTENT_ADDRESSED:
        keyed = []
        at = 0
        for m in frame.members:
            keyed.append(FrameMember(blake3.blake3(payload[at : at + m.size]).digest(), m.size))
            at += m.size
        hasher.update(b"".join([m.key for m in keyed]))
        frame = frame._replace(members=tuple(keyed))
    else:
        hasher.update(payload)
    if hasher.digest() != view[frame.length - _CHECK :]:
        raise DataCorruption(f"{where}: frame check failed (damaged bytes)")
    return frame, payload


def read_header(fd: int, where: str) -> None:
    """Check a pack's file header (DataCorruption if it is not a v2 pack)."""
    head = os.pread(fd, len(FILE_HEADER), 0)
    magic, version, _flags = struct.unpack("<8sII", head.ljust(16, b"\0"))
    if magic != MAGIC or len(head) < 16:
        raise DataCorruption(f"{where}: not a v2 pack file")
    if version != VERSION:
        raise DataCorruption(f"{where}: pack version {version}, this reads {VERSION}")


def scan(path: str | os.PathLike[str], start: int = len(FILE_HEADER)) -> Iterator[Frame]:
    """The frames of a pack from ``start`` on, stopping at the first torn or invalid one.

    Only heads and member tables are read (and their head checks verified);
    payloads are for :func:`decode_payload`. Frames are yielded only when
    complete (the file holds all their bytes).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        try:
            read_header(fd, str(path))
        except DataCorruption:
            return
        offset = start
        while offset + HEAD_SIZE <= size:
            where = f"{path}@{offset}"
            head = os.pread(fd, HEAD_SIZE, offset)
            try:
                parsed = _parse(head, where)
                table_end = _table_end(parsed.kind, parsed.n_members)
                data = head + os.pread(fd, table_end - HEAD_SIZE, offset + HEAD_SIZE)
                frame = parse_head(data, offset, where)
            except DataCorruption:
                return
            if offset + frame.length > size:
                return
            yield frame
            offset += frame.length
    finally:
        os.close(fd)
