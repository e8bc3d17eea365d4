"""Checks that a PathInfo's content is really in this store (SPEC A3)."""

from __future__ import annotations

from tvix_castore.blobservice.base import BlobService
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import NotFound, ValidationError
from tvix_castore.nodes import DirectoryNode, FileNode, Node

__all__ = ["MissingContent", "check_content"]


class MissingContent(NotFound):
    """A PathInfo refers to blobs or directories this store does not have."""


async def check_content(node: Node, blobs: BlobService, dirs: DirectoryService) -> None:
    """Raise unless ``node``'s whole closure is present and consistent.

    Every blob must exist with the size its FileNode states, and a root
    DirectoryNode must state its directory's size: a PathInfo passing this
    can always be rendered.

    Raises:
        MissingContent: a directory or blob is absent.
        ValidationError: a stated size does not match the stored content.
    """
    files: list[FileNode] = []
    if isinstance(node, FileNode):
        files.append(node)
    elif isinstance(node, DirectoryNode):
        root = None
        async for directory in dirs.get_recursive(node.digest):
            root = root or directory
            files.extend(directory.files)
        if root is None:
            raise MissingContent(f"directory {node.digest} is not in the store")
        actual = root.size(dirs.size_mode)
        if actual != node.size:
            raise ValidationError(f"root directory has size {actual}, the node states {node.size}")
    unique = list({(f.digest, f.size): f for f in files}.values())
    sizes = await blobs.size_many([f.digest for f in unique])
    for f in unique:
        size = sizes.get(f.digest)
        if size is None:
            raise MissingContent(f"blob {f.digest} (file {f.name!r}) is not in the store")
        if size != f.size:
            raise ValidationError(
                f"file {f.name!r}: blob {f.digest} has {size} bytes, the node states {f.size}"
            )
