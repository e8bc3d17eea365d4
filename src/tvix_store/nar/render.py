"""Castore → NAR (B §4.3): a byte stream, exact, verified, never buffered whole.

The directory closure is fetched (and verified) before the first byte is
produced, so a missing directory fails before anything is sent. File sizes
are enforced against the blob: a blob shorter or longer than its FileNode
says is an error, not a silently different NAR.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING

from nix_compat.nar import wire
from tvix_castore.blobservice.base import BlobService
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import CastoreError, DataCorruption
from tvix_castore.lazy import lazy_module
from tvix_castore.nodes import Directory, DirectoryNode, FileNode, Node, SymlinkNode

if TYPE_CHECKING:
    import asyncio
else:
    asyncio = lazy_module("asyncio")  # not needed to write a NAR from its plan

__all__ = ["NarRenderError", "blob_range", "calculate_nar", "fetch_closure", "render_nar"]

_READ = 1 << 20
_YIELD_AT = 1 << 20
_SMALL = 1 << 20  # files up to this are fetched in batches, ahead of time
_BATCH_FILES = 512
_BATCH_BYTES = 8 << 20
_AHEAD = 3  # batches requested ahead of the one being written
_ZEROS = b"\0" * 8


class NarRenderError(DataCorruption):
    """The store cannot produce this NAR (missing or inconsistent content)."""


async def fetch_closure(node: Node, dirs: DirectoryService) -> dict[B3Digest, Directory]:
    """All Directories under ``node`` (empty for files/symlinks); raise if incomplete."""
    if not isinstance(node, DirectoryNode):
        return {}
    try:
        closure = {d.digest: d async for d in dirs.get_recursive(node.digest)}
    except CastoreError as exc:
        raise NarRenderError(f"failed rendering nar: {exc}") from exc
    if node.digest not in closure:
        raise NarRenderError(f"failed rendering nar: directory {node.digest} not found")
    return closure


def _walk_files(node: Node, closure: Mapping[B3Digest, Directory]) -> list[FileNode]:
    """File nodes in NAR order (depth first, names ascending)."""
    out: list[FileNode] = []
    stack: list[Node] = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, FileNode):
            out.append(n)
        elif isinstance(n, DirectoryNode):
            directory = closure.get(n.digest)
            if directory is not None:
                stack.extend(reversed(list(directory.nodes())))
    return out


class _Prefetcher:
    """Fetches small blobs in batches, one batch ahead of the renderer.

    The renderer asks for files in NAR order, which is the order batches are
    cut in, so per-blob round trips (SQLite queries, gRPC calls) are replaced
    by one request per batch, overlapped with writing the previous one.
    """

    def __init__(self, files: list[FileNode], blobs: BlobService) -> None:
        self._blobs = blobs
        self._batches: list[list[FileNode]] = []
        current: list[FileNode] = []
        size = 0
        for f in files:
            if f.size > _SMALL:
                continue
            current.append(f)
            size += f.size
            if len(current) >= _BATCH_FILES or size >= _BATCH_BYTES:
                self._batches.append(current)
                current, size = [], 0
        if current:
            self._batches.append(current)
        self._loaded = -1
        self._data: dict[B3Digest, bytes] = {}
        self._pos = 0  # index within the loaded batch
        self._pending: collections.deque[asyncio.Task[dict[B3Digest, bytes]]] = collections.deque()
        for i in range(min(_AHEAD, len(self._batches))):
            self._pending.append(self._start(i))

    def _start(self, i: int) -> asyncio.Task[dict[B3Digest, bytes]]:
        return asyncio.ensure_future(self._blobs.read_many([f.digest for f in self._batches[i]]))

    async def take(self, node: FileNode) -> bytes | None:
        """The contents of ``node`` (the next small file in order), ``None`` if absent."""
        if self._loaded < 0 or self._pos >= len(self._batches[self._loaded]):
            self._data = await self._pending.popleft()
            self._loaded += 1
            self._pos = 0
            ahead = self._loaded + len(self._pending) + 1
            if ahead < len(self._batches):
                self._pending.append(self._start(ahead))
        expected = self._batches[self._loaded][self._pos]
        assert expected is node or expected == node
        self._pos += 1
        return self._data.get(node.digest)

    def cancel(self) -> None:
        for task in self._pending:
            task.cancel()


def _str(data: bytes) -> bytes:
    return wire.U64.pack(len(data)) + data + _ZEROS[: -len(data) % 8]


async def render_nar(
    node: Node,
    blobs: BlobService,
    dirs: DirectoryService,
    *,
    closure: Mapping[B3Digest, Directory] | None = None,
) -> AsyncIterator[bytes]:
    """Yield the NAR of ``node`` in pieces of about 1 MiB.

    Names and targets come from validated Directories, so the bytes are
    assembled directly from the wire tokens (no per-entry re-validation);
    file sizes are still enforced against the blobs.

    Raises:
        NarRenderError: a directory or blob is missing, or a blob's size
            differs from its FileNode. Directories are checked before the first
            piece is yielded; blobs as they are reached.
    """
    if closure is None:
        closure = await fetch_closure(node, dirs)
    prefetch = _Prefetcher(_walk_files(node, closure), blobs)
    pack = wire.U64.pack
    buf = bytearray(wire.MAGIC + wire.OPEN_TYPE)
    close, close_entry = wire.CLOSE, wire.CLOSE + wire.CLOSE
    entry_head, node_head = wire.ENTRY_NAME, wire.NODE_OPEN_TYPE
    # Open directories: (path, entries in name order, next index).
    stack: list[tuple[bytes, list[Node], int]] = []
    current: Node = node
    path = b""
    try:
        while True:
            # Emit ``current``'s body; directories are pushed and closed later.
            if isinstance(current, FileNode):
                buf += wire.EXECUTABLE if current.executable else wire.REGULAR
                buf += pack(current.size)
                if current.size <= _SMALL:
                    buf += await _small(current, path, prefetch)
                else:
                    yield bytes(buf)
                    buf = bytearray()
                    async for piece in blob_range(blobs, current, where=path):
                        yield piece
                buf += _ZEROS[: -current.size % 8]
                buf += close_entry if stack else close
            elif isinstance(current, SymlinkNode):
                buf += wire.SYMLINK + _str(current.target)
                buf += close_entry if stack else close
            else:
                directory = closure.get(current.digest)
                if directory is None:
                    raise NarRenderError(f"failed rendering nar: {path!r}: directory missing")
                buf += wire.DIRECTORY
                stack.append((path, list(directory.nodes()), 0))
            if len(buf) >= _YIELD_AT:
                yield bytes(buf)
                buf = bytearray()
            # Next node: the next entry of the innermost unfinished directory.
            while stack:
                dir_path, entries, i = stack[-1]
                if i < len(entries):
                    stack[-1] = (dir_path, entries, i + 1)
                    current = entries[i]
                    buf += entry_head + _str(current.name) + node_head
                    path = dir_path + b"/" + current.name if dir_path else current.name
                    break
                stack.pop()
                buf += close_entry if stack else close
            else:
                break
    finally:
        prefetch.cancel()
    if buf:
        yield bytes(buf)


async def _small(node: FileNode, path: bytes, prefetch: _Prefetcher) -> bytes:
    where = path.decode(errors="replace") or "<root>"
    try:
        data = await prefetch.take(node)
    except CastoreError as exc:
        raise NarRenderError(f"failed rendering nar: {where}: {exc}") from exc
    if data is None:
        raise NarRenderError(f"failed rendering nar: {where}: blob {node.digest} not found")
    if len(data) < node.size:
        raise NarRenderError(
            f"failed rendering nar: {where}: unexpected EOF"
            f" ({node.size - len(data)} of {node.size} bytes missing)"
        )
    if len(data) > node.size:
        raise NarRenderError(
            f"failed rendering nar: {where}: reader has more data than {node.size} bytes"
        )
    return data


async def blob_range(
    blobs: BlobService,
    node: FileNode,
    offset: int = 0,
    length: int | None = None,
    where: bytes = b"",
) -> AsyncIterator[bytes]:
    """Bytes ``[offset, offset + length)`` of ``node``'s blob (all of it by default).

    The blob must hold exactly ``node.size`` bytes: shorter is "unexpected
    EOF"; longer is "reader has more data" (checked when the range reaches the
    end). ``where`` names the file in error messages.
    """
    name = where.decode(errors="replace") or "<root>"
    left = node.size - offset if length is None else length
    try:
        reader = await blobs.open_read(node.digest)
        if reader is None:
            raise NarRenderError(f"failed rendering nar: {name}: blob {node.digest} not found")
        async with reader:
            if offset:
                await reader.seek(offset)
            end = offset + left
            while left:
                data = await reader.read(min(left, _READ))
                if not data:
                    raise NarRenderError(
                        f"failed rendering nar: {name}: unexpected EOF"
                        f" ({left} of {node.size} bytes missing)"
                    )
                left -= len(data)
                yield data
            if end == node.size and await reader.read(1):
                raise NarRenderError(
                    f"failed rendering nar: {name}: reader has more data than {node.size} bytes"
                )
    except NarRenderError:
        raise
    except (CastoreError, ValueError) as exc:
        raise NarRenderError(f"failed rendering nar: {name}: {exc}") from exc


async def calculate_nar(
    node: Node,
    blobs: BlobService,
    dirs: DirectoryService,
    *,
    closure: Mapping[B3Digest, Directory] | None = None,
) -> tuple[int, bytes]:
    """NAR size and sha256 of ``node``, by rendering it (nothing is kept)."""
    h = hashlib.sha256()
    size = 0
    async for piece in render_nar(node, blobs, dirs, closure=closure):
        h.update(piece)
        size += len(piece)
    return size, h.digest()
