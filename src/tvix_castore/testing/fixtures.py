"""The blob and directory fixtures of SPEC B §3.1–3.2, shared by all test suites.

Directory fixtures depend on the size mode (B §2.4): a parent's DirectoryNode
records its child's size, so non-empty children change the parent's digest::

    >>> directories("documented").complicated.digest.hex()[:8]
    '3f951a15'
    >>> directories("tvix-2024").complicated.digest.hex()[:8]
    '424a7f6c'
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final

from tvix_castore.digests import EMPTY_DIGEST, B3Digest
from tvix_castore.nodes import DEFAULT_SIZE_MODE, Directory, FileNode, SizeMode, SymlinkNode

__all__ = [
    "BLOB_A",
    "BLOB_B",
    "DUMMY_DATA_1",
    "DUMMY_DATA_2",
    "DUMMY_DIGEST",
    "DUMMY_DIGEST_2",
    "EMPTY_BLOB",
    "HELLOWORLD_BLOB",
    "DirectoryFixtures",
    "directories",
]

EMPTY_BLOB: Final = b""
HELLOWORLD_BLOB: Final = b"Hello World!"
BLOB_A: Final = b"\x00\x01"
BLOB_B: Final = bytes(range(255)) * 4096
DUMMY_DATA_1: Final = b"\x01\x02\x03"
DUMMY_DATA_2: Final = b"\x04\x05"
DUMMY_DIGEST: Final = B3Digest(bytes(32))
"""Not the hash of anything."""
DUMMY_DIGEST_2: Final = B3Digest(b"\x10" + bytes(31))
"""Not the hash of anything."""


@dataclass(frozen=True, slots=True)
class DirectoryFixtures:
    """The named directories of B §3.2 under one size mode."""

    with_keep: Directory
    """files ``[.keep -> EMPTY]``."""
    complicated: Directory
    """dirs ``[keep -> with_keep]``, files ``[.keep]``, symlinks ``[aa]``."""
    a: Directory
    """Empty."""
    b: Directory
    """dirs ``[a -> A]``."""
    c: Directory
    """dirs ``[a -> A, a' -> A]``."""
    d: Directory
    """dirs ``[a -> A, b -> B]``."""


@functools.cache
def directories(size_mode: SizeMode = DEFAULT_SIZE_MODE) -> DirectoryFixtures:
    """Build the directory fixtures with sizes counted by ``size_mode``."""
    keep = FileNode(b".keep", EMPTY_DIGEST, 0)
    with_keep = Directory(files=(keep,))
    complicated = Directory(
        directories=(with_keep.to_node(b"keep", size_mode),),
        files=(keep,),
        symlinks=(SymlinkNode(b"aa", b"/nix/store/somewhereelse"),),
    )
    a = Directory()
    b = Directory(directories=(a.to_node(b"a", size_mode),))
    c = Directory(directories=(a.to_node(b"a", size_mode), a.to_node(b"a'", size_mode)))
    d = Directory(directories=(a.to_node(b"a", size_mode), b.to_node(b"b", size_mode)))
    return DirectoryFixtures(with_keep, complicated, a, b, c, d)
