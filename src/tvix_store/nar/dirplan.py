"""Directory plans: one Directory's NAR bytes, ready to be written without castore.

A NAR is mostly the same bytes for the same Directory: the body of a
directory node (everything between ``( type`` and its ``)``) depends only on the Directory,
never on its name or where it sits. So a plan is kept per Directory digest
(:class:`DirPlan`): its literal NAR bytes (tokens, names, sizes, padding,
symlink targets) and, between them, its files (digest, size and a location
hint: the pack frame and member offset the blob was found at) and its
subdirectories by reference (digest and body size). Two store paths sharing
most directories share most plans; a new release of a package adds plans only
for the directories that changed and their ancestors.

:func:`flatten` turns the plans of a closure into one NAR's pieces (literal
bytes and :class:`FileRef`), which :mod:`tvix_store.nar.planwrite` writes.
A row is a version byte and one zstd frame (with a checksum; the NAR tokens
are its dictionary, so each costs a few bits): the body size, the number of
items and the literals, then per item its distance from the previous one in
the literals, kind, size and (files) hint as varints, then the items' 32-byte
digests. A damaged row is a miss, never wrong bytes: the cache makes it
again from the Directory.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import zstandard

from nix_compat.nar import wire
from tvix_castore.digests import B3Digest
from tvix_castore.errors import DataCorruption
from tvix_castore.nodes import Directory, DirectoryNode, FileNode, SymlinkNode

__all__ = [
    "NAR_END",
    "NAR_START",
    "DirPlan",
    "DirRef",
    "FileRef",
    "Hint",
    "NO_HINT",
    "Piece",
    "closure_digests",
    "files_of",
    "flatten",
    "plan_of",
    "plans_of_closure",
]

NAR_START = wire.MAGIC + wire.OPEN_TYPE
"""The bytes before the root node's body."""
NAR_END = wire.CLOSE
"""The bytes after it (a node's closing token belongs to its parent's entry)."""

_VERSION = b"\x02"  # the row's first byte; then a zstd frame (the token dictionary)
_LEVEL = 6
_ZEROS = bytes(8)
_FILE, _DIR = 0, 1
# The NAR tokens every plan is made of: as a zstd dictionary, each costs a few bits.
_TOKENS = (
    wire.ENTRY_NAME
    + wire.NODE_OPEN_TYPE
    + wire.REGULAR
    + wire.CLOSE
    + wire.CLOSE
    + wire.EXECUTABLE
    + wire.SYMLINK
    + wire.DIRECTORY
    + wire.CLOSE * 2
    + wire.ENTRY_NAME
) * 4


class _Codec(threading.local):
    """A compressor and decompressor per thread (zstd contexts are not thread-safe)."""

    def __init__(self) -> None:
        tokens = zstandard.ZstdCompressionDict(_TOKENS, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        tokens.precompute_compress(level=_LEVEL)
        self.compress = zstandard.ZstdCompressor(
            dict_data=tokens, write_checksum=True, write_dict_id=False
        ).compress
        self.decompress = zstandard.ZstdDecompressor(dict_data=tokens).decompress


_codec = _Codec()


def _uvarint(n: int, out: bytearray) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


class Hint(NamedTuple):
    """Where a blob was found: a pack frame's index id and the member's offset in it.

    ``frame == 0``: no hint (a chunked or legacy blob: located at read time).
    """

    frame: int
    offset: int


NO_HINT = Hint(0, 0)


class FileRef(NamedTuple):
    """A file's content in a plan: its blob, its size, and where it was seen."""

    digest: bytes
    size: int
    hint: Hint


class DirRef(NamedTuple):
    """A subdirectory in a plan: its digest and the size of its node body."""

    digest: bytes
    size: int


Piece = bytes | memoryview | FileRef
"""Literal NAR bytes, or a file's content."""


@dataclass(frozen=True, slots=True)
class DirPlan:
    """One directory node's body: ``literals`` with ``items`` at ``ends`` (see module doc)."""

    literals: bytes
    ends: tuple[int, ...]  # literal bytes before each item
    items: tuple[FileRef | DirRef, ...]
    size: int  # bytes of the body: literals, file contents and subdirectory bodies

    def encode(self) -> bytes:
        """The compressed row: sizes and hints as varints, then the digests (see module doc)."""
        out = bytearray()
        for n in (self.size, len(self.items), len(self.literals)):
            _uvarint(n, out)
        out += self.literals
        last = 0
        for end, item in zip(self.ends, self.items, strict=True):
            _uvarint(end - last, out)
            last = end
            if isinstance(item, FileRef):
                out.append(_FILE)
                _uvarint(item.size, out)
                _uvarint(item.hint.frame, out)
                _uvarint(item.hint.offset, out)
            else:
                out.append(_DIR)
                _uvarint(item.size, out)
        for item in self.items:
            out += item.digest
        return _VERSION + _codec.compress(bytes(out))

    @classmethod
    def decode(cls, data: bytes, what: str) -> DirPlan:
        """Parse and check a row; ``DataCorruption`` naming ``what`` if it is damaged."""
        try:
            if data[:1] != _VERSION:
                raise ValueError("unknown version")
            raw = _codec.decompress(data[1:])
            size, pos = _read_uvarint(raw, 0)
            n, pos = _read_uvarint(raw, pos)
            lit_len, pos = _read_uvarint(raw, pos)
            literals = raw[pos : pos + lit_len]
            pos += lit_len
            digests = len(raw) - 32 * n
            if len(literals) != lit_len or digests < pos:
                raise ValueError("truncated")
            ends: list[int] = []
            items: list[FileRef | DirRef] = []
            total = lit_len
            end = 0
            at = digests
            for _ in range(n):
                step, pos = _read_uvarint(raw, pos)
                end += step
                kind = raw[pos]
                isize, pos = _read_uvarint(raw, pos + 1)
                digest = raw[at : at + 32]
                at += 32
                if kind == _FILE:
                    frame, pos = _read_uvarint(raw, pos)
                    offset, pos = _read_uvarint(raw, pos)
                    items.append(FileRef(digest, isize, Hint(frame, offset)))
                elif kind == _DIR:
                    items.append(DirRef(digest, isize))
                else:
                    raise ValueError("unknown entry kind")
                ends.append(end)
                total += isize
            if pos != digests or end > lit_len:
                raise ValueError("inconsistent entries")
        except (zstandard.ZstdError, ValueError, IndexError) as exc:
            raise DataCorruption(f"{what}: damaged NAR plan: {exc}") from exc
        if total != size:
            raise DataCorruption(f"{what}: NAR plan adds up to {total} bytes, not {size}")
        return cls(literals, tuple(ends), tuple(items), size)

    @property
    def files(self) -> list[FileRef]:
        """Its files (not those of subdirectories)."""
        return [i for i in self.items if isinstance(i, FileRef)]

    @property
    def children(self) -> list[DirRef]:
        """Its subdirectories."""
        return [i for i in self.items if isinstance(i, DirRef)]


def _str(data: bytes) -> bytes:
    n = len(data)
    return wire.U64.pack(n) + data + _ZEROS[: -n % 8]


def plan_of(
    directory: Directory,
    body_size: Callable[[DirectoryNode], int],
    hints: Mapping[bytes, Hint],
) -> DirPlan:
    """The plan of ``directory``, given its subdirectories' body sizes and blob hints.

    ``body_size`` gives a subdirectory's body size (from its own plan); a
    blob without a hint in ``hints`` gets none.
    """
    lit = bytearray(wire.DIRECTORY)
    ends: list[int] = []
    items: list[FileRef | DirRef] = []
    total = 0
    entry_open, entry_close, node_open = (
        wire.ENTRY_NAME,
        wire.CLOSE + wire.CLOSE,
        wire.NODE_OPEN_TYPE,
    )
    for node in directory.nodes():
        lit += entry_open + _str(node.name) + node_open
        if isinstance(node, SymlinkNode):
            lit += wire.SYMLINK + _str(node.target)
        elif isinstance(node, FileNode):
            lit += (wire.EXECUTABLE if node.executable else wire.REGULAR) + wire.U64.pack(node.size)
            if node.size:
                ends.append(len(lit))
                raw = node.digest.raw
                items.append(FileRef(raw, node.size, hints.get(raw, NO_HINT)))
                total += node.size
                lit += _ZEROS[: -node.size % 8]
        else:
            assert isinstance(node, DirectoryNode)
            size = body_size(node)
            ends.append(len(lit))
            items.append(DirRef(node.digest.raw, size))
            total += size
        lit += entry_close  # (closes the entry's node and the entry)
    return DirPlan(bytes(lit), tuple(ends), tuple(items), total + len(lit))


def plans_of_closure(
    root: B3Digest,
    closure: Mapping[B3Digest, Directory],
    hints: Mapping[bytes, Hint],
    known: Mapping[bytes, DirPlan] | None = None,
) -> dict[bytes, DirPlan]:
    """Plans of every Directory under ``root`` (leaves first), reusing those in ``known``.

    Raises ``KeyError`` if the closure misses a Directory.
    """
    known = known or {}
    out: dict[bytes, DirPlan] = {}

    def body_size(node: DirectoryNode) -> int:
        return out[node.digest.raw].size

    # Depth first, each Directory once, its plan made after its children's (a
    # Directory may appear under several parents).
    stack: list[tuple[B3Digest, bool]] = [(root, False)]
    while stack:
        digest, children_done = stack.pop()
        raw = digest.raw
        if raw in out:
            continue
        if raw in known:
            out[raw] = known[raw]
            continue
        directory = closure[digest]
        if children_done:
            out[raw] = plan_of(directory, body_size, hints)
            continue
        stack.append((digest, True))
        for child in directory.directories:
            if child.digest.raw not in out:
                stack.append((child.digest, False))
    return out


def flatten(root: bytes, plans: Mapping[bytes, DirPlan]) -> tuple[list[Piece], int]:
    """The pieces of the NAR of the directory ``root``, and its size.

    Raises ``KeyError`` if a plan is missing.
    """
    pieces: list[Piece] = [NAR_START]
    add = pieces.append
    # Each frame of the stack: a plan, its literals as a view, the next item, where its
    # literal stands.
    stack: list[tuple[DirPlan, memoryview, int, int]] = []
    top = plans[root]
    stack.append((top, memoryview(top.literals), 0, 0))
    while stack:
        plan, lit, i, pos = stack.pop()
        items, ends = plan.items, plan.ends
        n = len(items)
        while i < n:
            end = ends[i]
            if end > pos:
                add(lit[pos:end])
                pos = end
            item = items[i]
            i += 1
            if isinstance(item, FileRef):
                add(item)
            else:
                stack.append((plan, lit, i, pos))
                child = plans[item.digest]
                if child.size != item.size:
                    raise DataCorruption(
                        f"NAR plan of {B3Digest(item.digest)} does not have the size its parent's"
                    )
                plan, lit, i, pos = child, memoryview(child.literals), 0, 0
                items, ends, n = plan.items, plan.ends, len(plan.items)
        if pos < len(lit):
            add(lit[pos:])
    add(NAR_END)
    return pieces, len(NAR_START) + top.size + len(NAR_END)


def closure_digests(root: bytes, plans: Mapping[bytes, DirPlan]) -> list[bytes]:
    """Digests of the Directories under ``root`` that ``plans`` has (root first)."""
    out = [root]
    seen = {root}
    i = 0
    while i < len(out):
        plan = plans.get(out[i])
        i += 1
        if plan is None:
            continue
        for child in plan.children:
            if child.digest not in seen:
                seen.add(child.digest)
                out.append(child.digest)
    return out


def files_of(pieces: Sequence[Piece]) -> list[FileRef]:
    """The file pieces."""
    return [p for p in pieces if isinstance(p, FileRef)]
