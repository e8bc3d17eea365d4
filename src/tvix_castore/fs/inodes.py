"""The mount's inode table: numbers derived from content, entries kept while the kernel holds them.

An inode number is a hash of what the entry *is*, so it is the same on every
lookup, after the kernel forgot it, and in the next mount:

* a file: its blob digest **and** its executable bit (the reference keys by
  digest alone, so an executable and a plain file with the same bytes share
  an inode and one of them shows the wrong mode);
* a symlink: its target;
* a directory: its digest *and where it is* (parent inode and name). Files
  and symlinks are shared like hard links; directories are not, because
  Linux keeps one dentry per directory inode: a directory reached under two
  names (every empty directory has the same digest) would make the kernel
  move the dentry back and forth, and fail lookups that race it.

An entry stays in the table while the kernel's lookup count (every lookup and
every readdir entry sent counts one; ``forget`` takes them back) or an open
handle holds it, so memory follows what the kernel caches, not everything
ever traversed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import blake3

from tvix_castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode

__all__ = ["ROOT_INODE", "Inode", "InodeTable", "key_of"]

ROOT_INODE = 1
_MASK = (1 << 63) - 1
_FILE = ord("f")

Key = bytes


def key_of(node: Node, parent: int, name: bytes) -> Key:
    """What identifies the inode of ``node`` (``parent`` and ``name`` matter for directories)."""
    if isinstance(node, FileNode):
        return b"f" + (b"x" if node.executable else b"-") + node.digest.raw
    if isinstance(node, SymlinkNode):
        return b"l" + node.target
    assert isinstance(node, DirectoryNode)
    return b"d" + node.digest.raw + struct.pack(">Q", parent) + name


@dataclass(slots=True)
class Inode:
    """A live entry: its number, node, and what holds it."""

    ino: int
    key: Key
    node: Node
    lookups: int = 0
    handles: int = 0


class InodeTable:
    """Inode number → entry for the entries the kernel holds (and the root)."""

    def __init__(self) -> None:
        self._by_ino: dict[int, Inode] = {}

    def __len__(self) -> int:
        return len(self._by_ino)

    def get(self, ino: int) -> Inode | None:
        """The live entry ``ino``, or ``None``."""
        return self._by_ino.get(ino)

    def number(self, key: Key) -> int:
        """The inode number of ``key`` (a live entry's, or the one it will get)."""
        if key[0] == _FILE:  # (a blob digest is a hash already: 8 of its bytes, the mode mixed in)
            ino = (int.from_bytes(key[2:10], "big") ^ key[1]) & _MASK
        else:
            ino = int.from_bytes(blake3.blake3(key).digest(length=8), "big") & _MASK
        while True:
            if ino <= ROOT_INODE:
                ino = ROOT_INODE + 1
            entry = self._by_ino.get(ino)
            if entry is None or entry.key == key:
                return ino
            ino = (ino + 1) & _MASK  # (a collision of 63-bit hashes: the next free number)

    def looked_up(self, node: Node, parent: int, name: bytes) -> Inode:
        """Count one kernel lookup of ``node`` (found as ``name`` in ``parent``)."""
        key = key_of(node, parent, name)
        return self.counted(self.number(key), key, node)

    def counted(self, ino: int, key: Key, node: Node) -> Inode:
        """Count one kernel lookup of ``node``, whose ``key`` has the number ``ino``."""
        entry = self._by_ino.get(ino)
        if entry is None:
            entry = self._by_ino[ino] = Inode(ino, key, node)
        entry.lookups += 1
        return entry

    def forget(self, ino: int, n: int) -> None:
        """The kernel dropped ``n`` lookups of ``ino``."""
        entry = self._by_ino.get(ino)
        if entry is None or ino == ROOT_INODE:
            return
        entry.lookups = max(0, entry.lookups - n)
        self._drop_if_unused(entry)

    def opened(self, entry: Inode) -> None:
        entry.handles += 1

    def released(self, entry: Inode) -> None:
        entry.handles = max(0, entry.handles - 1)
        self._drop_if_unused(entry)

    def _drop_if_unused(self, entry: Inode) -> None:
        if entry.lookups == 0 and entry.handles == 0 and entry.ino != ROOT_INODE:
            self._by_ino.pop(entry.ino, None)
