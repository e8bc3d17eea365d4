"""Directory closures checked as graphs, in both directions of travel.

Uploads arrive leaves → root (B §2.6) and are checked by ``DirectoryGraph``;
nothing may be persisted until ``finalize()`` succeeded, so an invalid stream
leaves no trace. Downloads arrive root → leaves (B §2.7) and are checked by
``ClosureVerifier`` as they stream in, so a peer cannot slip in directories
nobody asked for. Both check every ``DirectoryNode.size`` edge against the
child's actual size under one ``SizeMode``::

    >>> from tvix_castore.nodes import Directory
    >>> leaf = Directory()
    >>> parent = Directory(directories=(leaf.to_node(b"a"),))
    >>> graph = DirectoryGraph()
    >>> graph.add(leaf)
    >>> graph.add(parent)
    >>> graph.finalize().root == parent.digest
    True
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from tvix_castore.digests import B3Digest
from tvix_castore.errors import DataCorruption, DirectoryGraphError, show_name
from tvix_castore.nodes import DEFAULT_SIZE_MODE, Directory, SizeMode, check_directory_size

__all__ = ["Closure", "ClosureVerifier", "DirectoryGraph"]


@dataclass(frozen=True, slots=True, eq=False)
class Closure:
    """A validated, complete Directory closure: every child is present."""

    root: B3Digest
    """Digest of the one Directory no other Directory refers to."""
    directories: Mapping[B3Digest, Directory]
    """Every Directory of the closure, by digest, each once."""

    def root_to_leaves(self) -> list[Directory]:
        """Breadth-first from the root, each Directory once (the order of ``Get``)."""
        seen = {self.root}
        queue = collections.deque([self.root])
        out: list[Directory] = []
        while queue:
            directory = self.directories[queue.popleft()]
            out.append(directory)
            for child in directory.directories:
                if child.digest not in seen:
                    seen.add(child.digest)
                    queue.append(child.digest)
        return out

    def leaves_to_root(self) -> list[Directory]:
        """Post-order depth-first from the root: children always before parents.

        The order to persist in (and to ``Put``), so that a crash never leaves
        a stored Directory pointing at a missing child.
        """
        out: list[Directory] = []
        expanded: set[B3Digest] = set()
        stack: list[tuple[B3Digest, bool]] = [(self.root, False)]
        while stack:
            digest, children_done = stack.pop()
            directory = self.directories[digest]
            if children_done:
                out.append(directory)
                continue
            if digest in expanded:
                continue
            expanded.add(digest)
            stack.append((digest, True))
            for child in reversed(directory.directories):
                if child.digest not in expanded:
                    stack.append((child.digest, False))
        return out


def _wrong_size(name: bytes, specified: int, recorded: int) -> str:
    return f"{show_name(name)} has wrong size, specified {specified}, recorded {recorded}"


class DirectoryGraph:
    """Validates a closure uploaded leaves → root (B §2.6, tvix HEAD rules).

    Every child must have been added earlier (to this graph, not merely be in
    some store), re-sent duplicates are ignored, and at the end exactly one
    Directory may be unreferenced: the root. Errors are ``DirectoryGraphError``.
    """

    def __init__(self, size_mode: SizeMode = DEFAULT_SIZE_MODE) -> None:
        self._size_mode: SizeMode = size_mode
        self._directories: dict[B3Digest, Directory] = {}
        self._sizes: dict[B3Digest, int] = {}
        self._referenced: set[B3Digest] = set()

    def add(self, directory: Directory) -> None:
        """Add the next Directory of the stream; raise if it breaks the graph (or is too large)."""
        check_directory_size(directory)
        known_sizes: list[int] = []
        for child in directory.directories:
            size = self._sizes.get(child.digest)
            if size is None:
                raise DirectoryGraphError(
                    f"{show_name(child.name)}: unknown directory {child.digest} was referenced"
                )
            known_sizes.append(size)
        digest = directory.digest
        if digest in self._directories:
            return
        for child, recorded in zip(directory.directories, known_sizes, strict=True):
            if child.size != recorded:
                raise DirectoryGraphError(_wrong_size(child.name, child.size, recorded))
        self._sizes[digest] = directory.size(self._size_mode)
        self._directories[digest] = directory
        self._referenced.update(child.digest for child in directory.directories)

    def finalize(self) -> Closure:
        """Check the end-of-stream rules and return the closure."""
        if not self._directories:
            raise DirectoryGraphError("got no directories")
        roots = self._directories.keys() - self._referenced
        if len(roots) != 1:
            listed = ", ".join(sorted(str(d) for d in roots))
            raise DirectoryGraphError(f"graph has disconnected roots: {listed}")
        missing = self._referenced - self._directories.keys()
        if missing:  # unreachable: add() refuses unknown children
            raise DirectoryGraphError(f"graph is incomplete: {len(missing)} missing")
        (root,) = roots
        return Closure(root, MappingProxyType(dict(self._directories)))


class ClosureVerifier:
    """Verifies a closure received root → leaves (B §2.7), as it streams in.

    Each Directory must have been announced by the root request or by a
    DirectoryNode of one received before it, and arrive at most once; its
    size must match every edge pointing at it. Violations mean the sender is
    broken or lying, so errors are ``DataCorruption``.
    """

    def __init__(self, root: B3Digest, size_mode: SizeMode = DEFAULT_SIZE_MODE) -> None:
        self._root = root
        self._size_mode: SizeMode = size_mode
        self._expected: set[B3Digest] = {root}
        self._directories: dict[B3Digest, Directory] = {}
        self._sizes: dict[B3Digest, int] = {}
        # Edges to children not received yet: digest -> [(name, stated size)].
        self._pending: dict[B3Digest, list[tuple[bytes, int]]] = {}

    def add(self, directory: Directory) -> None:
        """Accept the next received Directory; raise if it was not expected."""
        digest = directory.digest
        if digest not in self._expected:
            if digest in self._directories:
                raise DataCorruption(f"received directory {digest} twice")
            raise DataCorruption(f"received unexpected directory {digest}")
        self._expected.remove(digest)
        size = directory.size(self._size_mode)
        for name, stated in self._pending.pop(digest, ()):
            if stated != size:
                raise DataCorruption(_wrong_size(name, stated, size))
        self._directories[digest] = directory
        self._sizes[digest] = size
        for child in directory.directories:
            recorded = self._sizes.get(child.digest)
            if recorded is not None:
                if child.size != recorded:
                    raise DataCorruption(_wrong_size(child.name, child.size, recorded))
                continue
            self._pending.setdefault(child.digest, []).append((child.name, child.size))
            self._expected.add(child.digest)

    def finalize(self) -> Closure | None:
        """End of stream: the closure, or ``None`` if nothing at all was received."""
        if not self._directories:
            return None
        if self._expected:
            listed = ", ".join(sorted(str(d) for d in self._expected))
            raise DataCorruption(f"premature end of stream: never received {listed}")
        return Closure(self._root, MappingProxyType(dict(self._directories)))
