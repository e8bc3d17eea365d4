"""Checks that a PathInfo's content is really in this store (SPEC A3)."""

from __future__ import annotations

import asyncio

from tvix_castore.blobservice.base import BlobService
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import NotFound
from tvix_castore.nodes import DirectoryNode, FileNode, Node

__all__ = ["MissingContent", "check_content"]

_PARALLEL = 32


class MissingContent(NotFound):
    """A PathInfo refers to blobs or directories this store does not have."""


async def check_content(node: Node, blobs: BlobService, dirs: DirectoryService) -> None:
    """Raise :class:`MissingContent` unless ``node``'s whole closure is present."""
    files: list[FileNode] = []
    if isinstance(node, FileNode):
        files.append(node)
    elif isinstance(node, DirectoryNode):
        found = False
        async for directory in dirs.get_recursive(node.digest):
            found = True
            files.extend(directory.files)
        if not found:
            raise MissingContent(f"directory {node.digest} is not in the store")
    unique = list({f.digest: f for f in files}.values())
    for i in range(0, len(unique), _PARALLEL):
        batch = unique[i : i + _PARALLEL]
        present = await asyncio.gather(*(blobs.has(f.digest) for f in batch))
        for f, ok in zip(batch, present, strict=True):
            if not ok:
                raise MissingContent(f"blob {f.digest} (file {f.name!r}) is not in the store")
