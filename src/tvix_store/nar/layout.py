"""A NAR as a list of segments, for exact sizes and random access (HTTP Range).

Literal bytes (headers, names, padding) alternate with references to file
blobs. Built from a verified directory closure, so its size is exact before
anything is read, and any byte range can be served by seeking into blobs.
"""

from __future__ import annotations

import bisect
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nix_compat.nar import wire
from tvix_castore.blobservice.base import BlobService
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.nodes import Directory, DirectoryNode, FileNode, Node, SymlinkNode
from tvix_store.nar.render import NarRenderError, blob_range, fetch_closure

if TYPE_CHECKING:  # (not imported at run time: ingest loads asyncio, export must not)
    from tvix_castore.ingest import ScannedFile, ScannedTree

__all__ = ["NarLayout", "build_layout", "nar_layout", "scanned_layout"]

_READ = 1 << 20


def _str(data: bytes) -> bytes:
    return wire.U64.pack(len(data)) + data + b"\0" * wire.padding(len(data))


@dataclass(frozen=True, slots=True)
class NarLayout:
    """Segments of one NAR: ``starts[i]`` is where ``segments[i]`` begins."""

    segments: tuple[bytes | FileNode, ...]
    starts: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, segments: list[bytes | FileNode]) -> NarLayout:
        """The layout of ``segments`` (their starts and total size computed)."""
        starts: list[int] = []
        total = 0
        for seg in segments:
            starts.append(total)
            total += len(seg) if isinstance(seg, bytes) else seg.size
        return cls(tuple(segments), tuple(starts), total)

    @property
    def files(self) -> list[FileNode]:
        """Every file segment (to check blobs exist before serving)."""
        return [s for s in self.segments if isinstance(s, FileNode)]

    async def read(
        self, blobs: BlobService, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of the NAR, read from ``blobs`` as needed."""
        end = self.size if end is None else min(end, self.size)
        if start >= end:
            return
        i = bisect.bisect_right(self.starts, start) - 1
        pos = start
        while pos < end:
            seg, seg_start = self.segments[i], self.starts[i]
            off = pos - seg_start
            if isinstance(seg, bytes):
                piece = seg[off : off + (end - pos)]
                yield piece
                pos += len(piece)
            else:
                want = min(seg.size - off, end - pos)
                async for piece in blob_range(blobs, seg, off, want):
                    yield piece
                pos += want
            i += 1


def build_layout(node: Node, closure: Mapping[B3Digest, Directory]) -> NarLayout:
    """The layout of ``node``'s NAR from its (verified) directory closure."""
    segments: list[bytes | FileNode] = []
    lit = bytearray(wire.MAGIC + wire.OPEN_TYPE)

    def body(n: Node) -> Directory | None:
        nonlocal lit
        if isinstance(n, SymlinkNode):
            lit += wire.SYMLINK + _str(n.target)
            return None
        if isinstance(n, FileNode):
            lit += (wire.EXECUTABLE if n.executable else wire.REGULAR) + wire.U64.pack(n.size)
            if n.size:
                segments.append(bytes(lit))
                segments.append(n)
                lit = bytearray()
            lit += b"\0" * wire.padding(n.size)
            return None
        assert isinstance(n, DirectoryNode)
        directory = closure.get(n.digest)
        if directory is None:
            raise NarRenderError(f"failed rendering nar: directory {n.digest} missing")
        lit += wire.DIRECTORY
        return directory

    stack: list[tuple[list[Node], int]] = []
    opened = body(node)
    if opened is None:
        lit += wire.CLOSE
    else:
        stack.append((list(opened.nodes()), 0))
    while stack:
        entries, i = stack[-1]
        if i == len(entries):
            stack.pop()
            lit += wire.CLOSE + wire.CLOSE if stack else wire.CLOSE
            continue
        stack[-1] = (entries, i + 1)
        child = entries[i]
        lit += wire.ENTRY_NAME + _str(child.name) + wire.NODE_OPEN_TYPE
        opened = body(child)
        if opened is None:
            lit += wire.CLOSE + wire.CLOSE
        else:
            stack.append((list(opened.nodes()), 0))
    if lit:
        segments.append(bytes(lit))
    return NarLayout.of(segments)


def scanned_layout(tree: ScannedTree) -> tuple[list[bytes | ScannedFile], int]:
    """An uploaded tree's NAR from its scan (as from its Directories): segments, and size.

    Runs once per entry of trees of tens of thousands: the wire pieces are
    bound to locals and entries without content stay in the literal.
    """
    segments: list[bytes | ScannedFile] = []
    lit = bytearray(wire.MAGIC + wire.OPEN_TYPE)
    u64 = wire.U64.pack
    entry_open, entry_close = wire.ENTRY_NAME, wire.CLOSE + wire.CLOSE
    node_open, directory = wire.NODE_OPEN_TYPE, wire.DIRECTORY
    symlink, regular, executable = wire.SYMLINK, wire.REGULAR, wire.EXECUTABLE
    zeros = bytes(8)
    depth = 0
    size = 0
    for name, node in tree.walk():
        if node is None and not name and depth:  # leaving a directory
            depth -= 1
            lit += entry_close if depth else wire.CLOSE
            continue
        if depth:
            n = len(name)
            lit += entry_open + u64(n) + name + zeros[: -n % 8] + node_open
        if node is None:
            lit += directory
            depth += 1
            continue
        if isinstance(node, SymlinkNode):
            n = len(node.target)
            lit += symlink + u64(n) + node.target + zeros[: -n % 8]
        else:
            n = node.size
            lit += (executable if node.executable else regular) + u64(n)
            if n:
                size += len(lit) + n
                segments.append(bytes(lit))
                segments.append(node)
                lit = bytearray(zeros[: -n % 8])
        lit += entry_close if depth else wire.CLOSE
    segments.append(bytes(lit))
    return segments, size + len(lit)


async def nar_layout(
    node: Node, dirs: DirectoryService, closure: Mapping[B3Digest, Directory] | None = None
) -> NarLayout:
    """The layout of ``node``'s NAR (fetches and verifies its closure unless given)."""
    if closure is None:
        closure = await fetch_closure(node, dirs)
    return build_layout(node, closure)
