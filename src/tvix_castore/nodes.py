"""Validated, immutable castore nodes and directories (B §2.2–2.5).

Protobuf messages are converted here and nowhere else, so a ``Directory`` or
node held by the rest of the code is always valid::

    >>> from tvix_castore.digests import EMPTY_DIGEST
    >>> keep = Directory(files=(FileNode(b".keep", EMPTY_DIGEST, 0),))
    >>> keep.digest.hex()[:16], keep.size()
    ('8b5b5d642b646bb8', 1)

Names are raw bytes. A node's own constructor allows an empty name, because
root nodes (B §2.3) are often nameless; inside a ``Directory`` names must be
non-empty.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import heapq
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Final, Literal, TypeAlias, TypeVar, cast

from google.protobuf.message import DecodeError

from tvix_castore.digests import B3Digest
from tvix_castore.errors import (
    DirectoryError,
    DirectoryErrorKind,
    InvalidDigest,
    NodeError,
    ValidationError,
)
from tvix_castore.protos import castore_pb2 as pb

__all__ = [
    "DEFAULT_SIZE_MODE",
    "MAX_DIRECTORY_BYTES",
    "MAX_NAME_LENGTH",
    "MAX_SYMLINK_TARGET_LENGTH",
    "U64_MAX",
    "Directory",
    "DirectoryNode",
    "FileNode",
    "NameRule",
    "Node",
    "SizeMode",
    "SymlinkNode",
    "check_directory_size",
    "node_from_proto",
    "node_to_proto",
    "validate_name",
]

MAX_NAME_LENGTH: Final = 255
MAX_SYMLINK_TARGET_LENGTH: Final = 4095
MAX_DIRECTORY_BYTES: Final = 4 << 20
"""A stored Directory encodes to fewer bytes than this (4 MiB, about 14,000
entries with 255-byte names or 40,000-60,000 with typical ones).

It is the gRPC message limit every tvix client has by default (tonic's as
well as ours), so whatever a store accepts can be fetched by any client.
Every putter (NAR and filesystem ingest, gRPC Put) enforces it.
"""
U64_MAX: Final = 2**64 - 1

SizeMode: TypeAlias = Literal["documented", "tvix-2024"]
"""How a Directory's ``size`` is counted (B §2.4).

``"documented"``: ``N + Σ child.size`` (proto comment, tvix 2023, A1.3).
``"tvix-2024"``: ``2·N + Σ child.size``, what tvix HEAD computes; only for
interoperating with HEAD-made closures.
"""

DEFAULT_SIZE_MODE: Final[SizeMode] = "documented"

_K = DirectoryErrorKind


def validate_name(name: bytes, *, allow_empty: bool = False) -> None:
    """Check a node name against B §2.3 rules 3–6; raise ``NodeError`` if bad."""
    if not name:
        if allow_empty:
            return
        raise NodeError(_K.INVALID_NAME, name, "empty")
    if name in (b".", b".."):
        raise NodeError(_K.INVALID_NAME, name)
    if b"/" in name or b"\0" in name:
        raise NodeError(_K.INVALID_NAME, name, "contains '/' or NUL")
    if len(name) > MAX_NAME_LENGTH:
        raise NodeError(_K.NAME_TOO_LONG, name, f"{len(name)} > {MAX_NAME_LENGTH} bytes")


def _check_common(name: bytes, digest: B3Digest | None = None, size: int | None = None) -> None:
    if type(name) is not bytes:
        raise TypeError(f"node name must be bytes, not {type(name).__name__}")
    validate_name(name, allow_empty=True)
    if digest is not None and not isinstance(digest, B3Digest):
        raise TypeError(f"node digest must be a B3Digest, not {type(digest).__name__}")
    if size is not None and (type(size) is not int or not 0 <= size <= U64_MAX):
        raise NodeError(_K.INVALID_SIZE, name, f"{size!r} is not a u64")


def _plainly_valid(name: object, digest: object, size: object) -> bool:
    """The common case of :func:`_check_common`, in one expression without calls.

    Nodes are built by the tens of thousands. ``False`` means: let
    ``_check_common`` decide (and raise the precise error).
    """
    return (
        type(name) is bytes
        and len(name) <= MAX_NAME_LENGTH
        and b"/" not in name
        and b"\0" not in name
        and name != b"."
        and name != b".."
        and type(digest) is B3Digest
        and type(size) is int
        and 0 <= size <= U64_MAX
    )


def _digest_from_wire(name: bytes, raw: bytes) -> B3Digest:
    """Convert a wire digest; a bad name is still reported first (HEAD's order)."""
    try:
        return B3Digest(raw)
    except InvalidDigest as exc:
        validate_name(name, allow_empty=True)
        raise NodeError(_K.INVALID_DIGEST, name, str(exc)) from exc


@dataclass(frozen=True, slots=True)
class DirectoryNode:
    """A reference to a child Directory."""

    name: bytes
    digest: B3Digest
    """Digest of the child Directory."""
    size: int
    """The child's ``Directory.size()``, as stated by the parent (checked per graph)."""

    def __post_init__(self) -> None:
        if not _plainly_valid(self.name, self.digest, self.size):
            _check_common(self.name, self.digest, self.size)

    @classmethod
    def from_proto(cls, msg: pb.DirectoryNode) -> DirectoryNode:
        """Validate a wire node; raises ``NodeError`` naming the node."""
        return cls(msg.name, _digest_from_wire(msg.name, msg.digest), msg.size)

    def to_proto(self) -> pb.DirectoryNode:
        return pb.DirectoryNode(name=self.name, digest=self.digest.raw, size=self.size)

    def with_name(self, name: bytes) -> DirectoryNode:
        """The same node under another name."""
        return dataclasses.replace(self, name=name)


@dataclass(frozen=True, slots=True)
class FileNode:
    """A regular file: its content's digest and length."""

    name: bytes
    digest: B3Digest
    """BLAKE3 of the contents."""
    size: int
    """Content length in bytes."""
    executable: bool = False

    def __post_init__(self) -> None:
        if not _plainly_valid(self.name, self.digest, self.size):
            _check_common(self.name, self.digest, self.size)
        if type(self.executable) is not bool:
            raise TypeError("executable must be a bool")

    @classmethod
    def from_proto(cls, msg: pb.FileNode) -> FileNode:
        """Validate a wire node; raises ``NodeError`` naming the node."""
        return cls(msg.name, _digest_from_wire(msg.name, msg.digest), msg.size, msg.executable)

    def to_proto(self) -> pb.FileNode:
        return pb.FileNode(
            name=self.name, digest=self.digest.raw, size=self.size, executable=self.executable
        )

    def with_name(self, name: bytes) -> FileNode:
        """The same node under another name."""
        return dataclasses.replace(self, name=name)


@dataclass(frozen=True, slots=True)
class SymlinkNode:
    """A symbolic link; the target is raw bytes, never resolved."""

    name: bytes
    target: bytes

    def __post_init__(self) -> None:
        _check_common(self.name)
        target = self.target
        if type(target) is not bytes:
            raise TypeError(f"symlink target must be bytes, not {type(target).__name__}")
        if not target or b"\0" in target:
            raise NodeError(_K.INVALID_SYMLINK_TARGET, self.name, f"{target!r}")
        if len(target) > MAX_SYMLINK_TARGET_LENGTH:
            raise NodeError(
                _K.SYMLINK_TARGET_TOO_LONG,
                self.name,
                f"{len(target)} > {MAX_SYMLINK_TARGET_LENGTH} bytes",
            )

    @classmethod
    def from_proto(cls, msg: pb.SymlinkNode) -> SymlinkNode:
        """Validate a wire node; raises ``NodeError`` naming the node."""
        return cls(msg.name, msg.target)

    def to_proto(self) -> pb.SymlinkNode:
        return pb.SymlinkNode(name=self.name, target=self.target)

    def with_name(self, name: bytes) -> SymlinkNode:
        """The same node under another name."""
        return dataclasses.replace(self, name=name)


Node: TypeAlias = DirectoryNode | FileNode | SymlinkNode
"""Any entry of a Directory, or a root node."""


class NameRule(enum.Enum):
    """What a root node's name must look like, by context (B §2.3)."""

    ANY = "any"
    """Empty or a valid node name."""
    EMPTY = "empty"
    """Must be empty: ``CalculateNAR`` requests, nar-bridge URLs."""
    REQUIRED = "required"
    """Must be a valid, non-empty name: ``PathInfo.node`` (whose store-path
    syntax the store layer checks on top)."""


def node_from_proto(msg: pb.Node, *, name_rule: NameRule = NameRule.ANY) -> Node:
    """Validate a root ``Node`` message; raises ``NodeError``."""
    which = msg.WhichOneof("node")
    node: Node
    if which == "directory":
        node = DirectoryNode.from_proto(msg.directory)
    elif which == "file":
        node = FileNode.from_proto(msg.file)
    elif which == "symlink":
        node = SymlinkNode.from_proto(msg.symlink)
    else:
        raise NodeError(_K.NO_NODE_SET, None)
    if name_rule is NameRule.EMPTY and node.name:
        raise NodeError(_K.UNEXPECTED_NAME, node.name)
    if name_rule is NameRule.REQUIRED:
        validate_name(node.name)
    return node


def node_to_proto(node: Node) -> pb.Node:
    """Wrap a node in the root ``Node`` message."""
    if isinstance(node, DirectoryNode):
        return pb.Node(directory=node.to_proto())
    if isinstance(node, FileNode):
        return pb.Node(file=node.to_proto())
    return pb.Node(symlink=node.to_proto())


def _check_sorted(names: Iterable[bytes]) -> None:
    """B §2.3 rule 1: strictly increasing bytewise within one list."""
    previous: bytes | None = None
    for name in names:
        if previous is not None and name <= previous:
            kind = _K.DUPLICATE_NAME if name == previous else _K.WRONG_SORTING
            raise DirectoryError(kind, name)
        previous = name


_N = TypeVar("_N", DirectoryNode, FileNode, SymlinkNode)
_W = TypeVar("_W", pb.DirectoryNode, pb.FileNode, pb.SymlinkNode)


class _Entries:
    """Running state of rules 2, 3 and 10 while a Directory's nodes are added."""

    __slots__ = ("names", "size")

    def __init__(self) -> None:
        self.names: set[bytes] = set()
        self.size = 0

    def added(self, node: _N) -> _N:
        """Account for ``node``; return it unchanged."""
        self.add(node)
        return node

    def add(self, node: Node) -> None:
        """Account for ``node``: non-empty, unique name; size still a u64."""
        name = node.name
        if not name:
            raise DirectoryError(_K.INVALID_NAME, name, "empty")
        if name in self.names:
            raise DirectoryError(_K.DUPLICATE_NAME, name)
        self.names.add(name)
        self.size += 1 + node.size if isinstance(node, DirectoryNode) else 1
        if self.size > U64_MAX:
            raise DirectoryError(_K.SIZE_OVERFLOW, name)


def _named(msg: _W) -> _W:
    """Reject an empty entry name before anything else about the entry (HEAD order)."""
    if not msg.name:
        raise DirectoryError(_K.INVALID_NAME, b"", "empty")
    return msg


_new = object.__new__
_set_name = DirectoryNode.__dict__["name"].__set__  # (the slots: frozen's __setattr__ bypassed)
_set_dir_digest = DirectoryNode.__dict__["digest"].__set__
_set_dir_size = DirectoryNode.__dict__["size"].__set__
_set_file_name = FileNode.__dict__["name"].__set__
_set_file_digest = FileNode.__dict__["digest"].__set__
_set_file_size = FileNode.__dict__["size"].__set__
_set_file_executable = FileNode.__dict__["executable"].__set__
_set_link_name = SymlinkNode.__dict__["name"].__set__
_set_link_target = SymlinkNode.__dict__["target"].__set__
_set_raw = B3Digest.__dict__["raw"].__set__


def _plain_name(previous: bytes, name: bytes) -> bool:
    """Non-empty, after ``previous`` (rule 1), and valid (rules 3-6)."""
    return (
        previous < name
        and len(name) <= MAX_NAME_LENGTH
        and b"/" not in name
        and b"\0" not in name
        and name != b"."
        and name != b".."
    )


def _digest(raw: bytes) -> B3Digest:
    digest: B3Digest = _new(B3Digest)
    _set_raw(digest, raw)
    return digest


def _valid_from_proto(msg: pb.Directory) -> Directory | None:
    """:meth:`Directory.from_proto` when every rule holds, built without per-node checks.

    Directories are decoded by the hundred thousand (NAR export, the mount,
    gRPC), and the checked constructors cost 2 µs a node, most of it the
    frozen dataclasses' ``__init__``. This applies the same rules in one
    pass per list; ``None`` means some rule failed, and the checked path
    then reports the first failure in HEAD's order.
    """
    size = 0
    previous = b""
    dirs: list[DirectoryNode] = []
    for m in msg.directories:
        name, raw, n = m.name, m.digest, m.size
        if not (_plain_name(previous, name) and len(raw) == 32):
            return None
        node: DirectoryNode = _new(DirectoryNode)
        _set_name(node, name)
        _set_dir_digest(node, _digest(raw))
        _set_dir_size(node, n)
        dirs.append(node)
        size += 1 + n
        previous = name
    previous = b""
    files: list[FileNode] = []
    for f in msg.files:
        name, raw = f.name, f.digest
        if not (_plain_name(previous, name) and len(raw) == 32):
            return None
        file: FileNode = _new(FileNode)
        _set_file_name(file, name)
        _set_file_digest(file, _digest(raw))
        _set_file_size(file, f.size)
        _set_file_executable(file, f.executable)
        files.append(file)
        previous = name
    previous = b""
    links: list[SymlinkNode] = []
    for s in msg.symlinks:
        name, target = s.name, s.target
        if not (
            _plain_name(previous, name)
            and target
            and b"\0" not in target
            and len(target) <= MAX_SYMLINK_TARGET_LENGTH
        ):
            return None
        link: SymlinkNode = _new(SymlinkNode)
        _set_link_name(link, name)
        _set_link_target(link, target)
        links.append(link)
        previous = name
    count = len(dirs) + len(files) + len(links)
    size += len(files) + len(links)
    if size > U64_MAX:
        return None
    if count != len({*(d.name for d in dirs), *(f.name for f in files), *(s.name for s in links)}):
        return None  # (a name in two lists)
    self: Directory = _new(Directory)
    object.__setattr__(self, "directories", tuple(dirs))
    object.__setattr__(self, "files", tuple(files))
    object.__setattr__(self, "symlinks", tuple(links))
    object.__setattr__(self, "_size", size)
    object.__setattr__(self, "_digest", None)
    object.__setattr__(self, "_encoded", None)
    return self


_LISTS: Final = (("directories", DirectoryNode), ("files", FileNode), ("symlinks", SymlinkNode))


def _by_name(nodes: Iterable[Node]) -> list[Node]:
    return sorted(nodes, key=attrgetter("name"))


@dataclass(frozen=True, slots=True)
class Directory:
    """A directory listing: three name-sorted lists with names unique across them.

    Validated on construction (B §2.3). Equality and hashing follow the
    contents, so equal directories have equal digests.
    """

    directories: tuple[DirectoryNode, ...] = ()
    files: tuple[FileNode, ...] = ()
    symlinks: tuple[SymlinkNode, ...] = ()
    _size: int = field(default=0, init=False, repr=False, compare=False)
    _digest: B3Digest | None = field(default=None, init=False, repr=False, compare=False)
    _encoded: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lists: list[tuple[Node, ...]] = []
        for attr, kind in _LISTS:
            nodes: tuple[Node, ...] = tuple(getattr(self, attr))
            object.__setattr__(self, attr, nodes)  # any sequence in, a tuple stored
            for node in nodes:
                if type(node) is not kind:
                    raise TypeError(f"{attr} must hold {kind.__name__}, not {type(node).__name__}")
            _check_sorted(node.name for node in nodes)
            lists.append(nodes)
        entries = _Entries()
        for node in itertools.chain.from_iterable(lists):
            entries.add(node)
        object.__setattr__(self, "_size", entries.size)

    @classmethod
    def from_nodes(cls, nodes: Iterable[Node]) -> Directory:
        """Build from entries in any order (they are sorted into the three lists)."""
        ordered = _by_name(nodes)
        return cls(
            tuple(n for n in ordered if isinstance(n, DirectoryNode)),
            tuple(n for n in ordered if isinstance(n, FileNode)),
            tuple(n for n in ordered if isinstance(n, SymlinkNode)),
        )

    @classmethod
    def from_proto(cls, msg: pb.Directory) -> Directory:
        """Validate a wire Directory, checking rules in tvix HEAD's order.

        Unknown fields of ``msg`` are dropped: the digest is always that of the
        canonical re-encoding of the known fields (A1.2).
        """
        quick = _valid_from_proto(msg)
        if quick is not None:
            return quick
        for wire_nodes in (msg.directories, msg.files, msg.symlinks):
            _check_sorted(n.name for n in wire_nodes)
        entries = _Entries()
        dirs = tuple(entries.added(DirectoryNode.from_proto(_named(m))) for m in msg.directories)
        files = tuple(entries.added(FileNode.from_proto(_named(m))) for m in msg.files)
        symlinks = tuple(entries.added(SymlinkNode.from_proto(_named(m))) for m in msg.symlinks)
        self = object.__new__(cls)
        for attr, value in (
            ("directories", dirs),
            ("files", files),
            ("symlinks", symlinks),
            ("_size", entries.size),
            ("_digest", None),
            ("_encoded", None),
        ):
            object.__setattr__(self, attr, value)
        return self

    @classmethod
    def from_bytes(cls, data: bytes) -> Directory:
        """Decode and validate one encoded Directory message."""
        msg = pb.Directory()
        try:
            msg.ParseFromString(data)
        except DecodeError as exc:
            raise ValidationError(f"undecodable Directory: {exc}") from exc
        return cls.from_proto(msg)

    def to_proto(self) -> pb.Directory:
        """A fresh message (so it carries no unknown fields).

        Entries are added in place: building each node's message and copying
        it into the list took twice as long.
        """
        msg = pb.Directory()
        add_dir = msg.directories.add
        for d in self.directories:
            add_dir(name=d.name, digest=d.digest.raw, size=d.size)
        add_file = msg.files.add
        for f in self.files:
            add_file(name=f.name, digest=f.digest.raw, size=f.size, executable=f.executable)
        add_link = msg.symlinks.add
        for link in self.symlinks:
            add_link(name=link.name, target=link.target)
        return msg

    def encode(self) -> bytes:
        """The canonical encoding (B §2.2): what is hashed and stored; computed once.

        (A stored closure is encoded for its digests and again for its rows:
        building protobuf messages is most of the cost of either.)
        """
        encoded = self._encoded
        if encoded is None:
            encoded = self.to_proto().SerializeToString(deterministic=True)
            object.__setattr__(self, "_encoded", encoded)
        return encoded

    @property
    def digest(self) -> B3Digest:
        """BLAKE3 of ``encode()``; computed once."""
        digest = self._digest
        if digest is None:
            digest = B3Digest.of(self.encode())
            object.__setattr__(self, "_digest", digest)
        return digest

    def size(self, mode: SizeMode = DEFAULT_SIZE_MODE) -> int:
        """The ``size`` a parent's DirectoryNode must state for this Directory (B §2.4)."""
        if mode == "documented":
            return self._size
        if mode == "tvix-2024":
            size = self._size + len(self.directories) + len(self.files) + len(self.symlinks)
            if size > U64_MAX:
                raise DirectoryError(_K.SIZE_OVERFLOW, None, "tvix-2024 size exceeds u64")
            return size
        raise ValueError(f"unknown size mode {mode!r}")

    def to_node(self, name: bytes, mode: SizeMode = DEFAULT_SIZE_MODE) -> DirectoryNode:
        """A DirectoryNode referring to this Directory under ``name``."""
        return DirectoryNode(name, self.digest, self.size(mode))

    def nodes(self) -> Iterator[Node]:
        """All entries in bytewise name order across the three lists (B §2.5)."""
        return heapq.merge(
            cast(Iterable[Node], self.directories),
            cast(Iterable[Node], self.files),
            cast(Iterable[Node], self.symlinks),
            key=attrgetter("name"),
        )

    def lookup(self, name: bytes) -> Node | None:
        """The entry called ``name``, or ``None`` (binary search)."""
        for nodes in (self.directories, self.files, self.symlinks):
            index = bisect.bisect_left(nodes, name, key=attrgetter("name"))
            if index < len(nodes) and nodes[index].name == name:
                return nodes[index]
        return None


def check_directory_size(directory: Directory, name: bytes | None = None) -> None:
    """Raise ``DirectoryError`` (TOO_LARGE) if ``directory`` is over :data:`MAX_DIRECTORY_BYTES`.

    ``name`` is where the directory was found (for the message), if known.
    """
    size = len(directory.encode())
    if size >= MAX_DIRECTORY_BYTES:
        entries = len(directory.directories) + len(directory.files) + len(directory.symlinks)
        raise DirectoryError(
            DirectoryErrorKind.TOO_LARGE,
            name,
            f"directory {directory.digest} has {entries} entries, encoding to {size} bytes;"
            f" a Directory must encode to less than {MAX_DIRECTORY_BYTES} bytes",
        )
