"""Looking inside store paths: resolve ``sub/path`` to a node, list directories."""

from __future__ import annotations

import os
from typing import Any

from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import NotFound
from tvix_castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode

__all__ = ["describe", "listing", "resolve"]


async def resolve(root: Node, sub: str, dirs: DirectoryService) -> Node:
    """The node at ``sub`` (``a/b/c``) below ``root``; symlinks are not followed."""
    node = root
    walked: list[str] = []
    for part in [p for p in sub.split("/") if p]:
        if not isinstance(node, DirectoryNode):
            raise NotFound(f"{'/'.join(walked) or '<root>'} is not a directory")
        directory = await dirs.get(node.digest)
        if directory is None:
            raise NotFound(f"directory {node.digest} is missing from the store")
        child = directory.lookup(os.fsencode(part))
        walked.append(part)
        if child is None:
            raise NotFound(f"{'/'.join(walked)}: no such file or directory")
        node = child
    return node


async def listing(node: Node, dirs: DirectoryService) -> list[Node]:
    """Entries of a directory node (in name order), or the node itself."""
    if not isinstance(node, DirectoryNode):
        return [node]
    directory = await dirs.get(node.digest)
    if directory is None:
        raise NotFound(f"directory {node.digest} is missing from the store")
    return list(directory.nodes())


def describe(node: Node) -> dict[str, Any]:
    """A JSON-friendly description of one node."""
    name = node.name.decode(errors="backslashreplace")
    if isinstance(node, DirectoryNode):
        return {"type": "directory", "name": name, "mode": "dr-xr-xr-x", "size": node.size,
                "digest": str(node.digest)}  # fmt: skip
    if isinstance(node, FileNode):
        return {"type": "regular", "name": name, "executable": node.executable,
                "mode": "-r-xr-xr-x" if node.executable else "-r--r--r--", "size": node.size,
                "digest": str(node.digest)}  # fmt: skip
    assert isinstance(node, SymlinkNode)
    return {"type": "symlink", "name": name, "mode": "lrwxrwxrwx", "size": len(node.target),
            "target": node.target.decode(errors="backslashreplace")}  # fmt: skip
