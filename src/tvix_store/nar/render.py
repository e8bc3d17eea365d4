"""Castore → NAR (B §4.3): a byte stream, exact, verified, never buffered whole.

The directory closure is fetched (and verified) before the first byte is
produced, so a missing directory fails before anything is sent. File sizes
are enforced against the blob: a blob shorter or longer than its FileNode
says is an error, not a silently different NAR.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Mapping

from nix_compat.errors import NarWriteError
from nix_compat.nar import NarWriter
from tvix_castore.blobservice.base import BlobService
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import CastoreError, DataCorruption
from tvix_castore.nodes import Directory, DirectoryNode, FileNode, Node, SymlinkNode

__all__ = ["NarRenderError", "calculate_nar", "fetch_closure", "render_nar"]

_READ = 1 << 20
_YIELD_AT = 1 << 20


class NarRenderError(DataCorruption):
    """The store cannot produce this NAR (missing or inconsistent content)."""


class _Collect:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes | bytearray, /) -> int:
        self.parts.append(bytes(data))
        self.size += len(data)
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        self.size = 0
        return out


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


async def render_nar(
    node: Node,
    blobs: BlobService,
    dirs: DirectoryService,
    *,
    closure: Mapping[B3Digest, Directory] | None = None,
) -> AsyncIterator[bytes]:
    """Yield the NAR of ``node`` in pieces of about 1 MiB.

    Raises:
        NarRenderError: a directory or blob is missing, or a blob's size
            differs from its FileNode. Directories are checked before the first
            piece is yielded; blobs as they are reached.
    """
    if closure is None:
        closure = await fetch_closure(node, dirs)
    out = _Collect()
    w = NarWriter(out, flush_at=_YIELD_AT)
    # Iterative DFS: a stack of entry iterators of open directories.
    stack: list[tuple[bytes, list[Node], int]] = []
    current: Node | None = node
    path = b""
    while True:
        if current is not None:
            try:
                if isinstance(current, SymlinkNode):
                    w.symlink(current.target)
                elif isinstance(current, FileNode):
                    w.regular(current.size, current.executable)
                    async for piece in _blob_pieces(current, path, blobs):
                        w.write(piece)
                        if out.size >= _YIELD_AT:
                            yield out.take()
                    w.end_regular()
                else:
                    directory = closure.get(current.digest)
                    if directory is None:
                        raise NarRenderError(f"failed rendering nar: {path!r}: directory missing")
                    w.directory()
                    stack.append((path, list(directory.nodes()), 0))
            except NarWriteError as exc:
                raise NarRenderError(f"failed rendering nar: {path!r}: {exc}") from exc
            current = None
        if out.size >= _YIELD_AT:
            yield out.take()
        if not stack:
            break
        dir_path, entries, i = stack[-1]
        if i == len(entries):
            stack.pop()
            w.end_directory()
            continue
        stack[-1] = (dir_path, entries, i + 1)
        current = entries[i]
        w.entry(current.name)
        path = dir_path + b"/" + current.name if dir_path else current.name
    w.close()
    if out.size:
        yield out.take()


async def _blob_pieces(node: FileNode, path: bytes, blobs: BlobService) -> AsyncIterator[bytes]:
    where = path.decode(errors="replace") or "<root>"
    try:
        reader = await blobs.open_read(node.digest)
    except CastoreError as exc:
        raise NarRenderError(f"failed rendering nar: {where}: {exc}") from exc
    if reader is None:
        raise NarRenderError(f"failed rendering nar: {where}: blob {node.digest} not found")
    left = node.size
    async with reader:
        try:
            while left:
                data = await reader.read(min(left, _READ))
                if not data:
                    raise NarRenderError(
                        f"failed rendering nar: {where}: unexpected EOF"
                        f" ({left} of {node.size} bytes missing)"
                    )
                left -= len(data)
                yield data
            if await reader.read(1):
                raise NarRenderError(
                    f"failed rendering nar: {where}: reader has more data than {node.size} bytes"
                )
        except NarRenderError:
            raise
        except CastoreError as exc:
            raise NarRenderError(f"failed rendering nar: {where}: {exc}") from exc


async def calculate_nar(
    node: Node, blobs: BlobService, dirs: DirectoryService
) -> tuple[int, bytes]:
    """NAR size and sha256 of ``node``, by rendering it (nothing is kept)."""
    h = hashlib.sha256()
    size = 0
    async for piece in render_nar(node, blobs, dirs):
        h.update(piece)
        size += len(piece)
    return size, h.digest()
