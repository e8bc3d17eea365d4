"""Canonicalisation (B §2.2), iteration order (B §2.5) and Directory helpers."""

import pytest

from tvix_castore import (
    EMPTY_DIGEST,
    Directory,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    ValidationError,
)
from tvix_castore.protos import castore_pb2 as pb
from tvix_castore.testing.fixtures import directories

WITH_KEEP = directories().with_keep
COMPLICATED = directories().complicated


def test_unknown_fields_do_not_change_the_digest() -> None:
    # Directory field 4 (unknown) appended to the canonical WITH_KEEP bytes.
    wire = WITH_KEEP.encode() + bytes.fromhex("2203616263")
    msg = pb.Directory.FromString(wire)
    # The Python runtime keeps and re-emits unknown fields (the pitfall) ...
    assert msg.SerializeToString() == wire
    # ... the validated Directory does not.
    directory = Directory.from_proto(msg)
    assert directory.encode() == WITH_KEEP.encode()
    assert directory.digest == WITH_KEEP.digest


def test_unknown_fields_inside_nodes_are_dropped() -> None:
    msg = WITH_KEEP.to_proto()
    inner = pb.FileNode.FromString(msg.files[0].SerializeToString() + bytes.fromhex("2801"))
    assert inner.SerializeToString() != msg.files[0].SerializeToString()  # unknown field 5
    wire = pb.Directory(files=[inner]).SerializeToString()
    assert Directory.from_bytes(wire).digest == WITH_KEEP.digest


def test_non_canonical_field_order_is_normalised() -> None:
    canonical = COMPLICATED.encode()
    msg = COMPLICATED.to_proto()
    # symlinks, then files, then directories: legal protobuf, not canonical.
    shuffled = b"".join(
        pb.Directory(**{field: getattr(msg, field)}).SerializeToString()
        for field in ("symlinks", "files", "directories")
    )
    assert shuffled != canonical
    directory = Directory.from_bytes(shuffled)
    assert directory.encode() == canonical
    assert directory.digest == COMPLICATED.digest


def test_duplicate_scalars_last_wins() -> None:
    node = FileNode(b"f", EMPTY_DIGEST, 5)
    wire = pb.Directory(files=[node.to_proto()]).SerializeToString()
    # Re-encode the FileNode with its size field given twice: 1, then 5.
    body = node.to_proto().SerializeToString()
    twice = body.replace(b"\x18\x05", b"\x18\x01\x18\x05")
    noisy = b"\x12" + bytes([len(twice)]) + twice
    assert Directory.from_bytes(noisy).encode() == wire


def test_from_bytes_rejects_garbage() -> None:
    with pytest.raises(ValidationError, match="undecodable"):
        Directory.from_bytes(b"\x0a\xff")


def test_iteration_order_merges_lists() -> None:
    # The 2023 vector: dirs c,d,h,l; files b,e,g,j; symlinks a,f,i,k.
    directory = Directory(
        directories=tuple(DirectoryNode(n, EMPTY_DIGEST, 0) for n in (b"c", b"d", b"h", b"l")),
        files=tuple(FileNode(n, EMPTY_DIGEST, 0) for n in (b"b", b"e", b"g", b"j")),
        symlinks=tuple(SymlinkNode(n, b"t") for n in (b"a", b"f", b"i", b"k")),
    )
    assert b"".join(node.name for node in directory.nodes()) == b"abcdefghijkl"


def test_from_nodes_sorts_into_lists() -> None:
    nodes: list[Node] = [
        SymlinkNode(b"z", b"t"),
        FileNode(b"b", EMPTY_DIGEST, 0, executable=True),
        DirectoryNode(b"c", EMPTY_DIGEST, 0),
        FileNode(b"a", EMPTY_DIGEST, 0),
    ]
    directory = Directory.from_nodes(nodes)
    assert [n.name for n in directory.files] == [b"a", b"b"]
    assert [n.name for n in directory.nodes()] == [b"a", b"b", b"c", b"z"]
    assert directory == Directory.from_nodes(reversed(nodes))


def test_from_nodes_rejects_duplicates() -> None:
    with pytest.raises(ValidationError):
        Directory.from_nodes([FileNode(b"a", EMPTY_DIGEST, 0), SymlinkNode(b"a", b"t")])


def test_lookup() -> None:
    assert COMPLICATED.lookup(b"keep") == WITH_KEEP.to_node(b"keep")
    assert COMPLICATED.lookup(b".keep") == FileNode(b".keep", EMPTY_DIGEST, 0)
    assert COMPLICATED.lookup(b"aa") == SymlinkNode(b"aa", b"/nix/store/somewhereelse")
    assert COMPLICATED.lookup(b"a") is None
    assert COMPLICATED.lookup(b"zz") is None
    assert Directory().lookup(b"x") is None


def test_lists_become_tuples() -> None:
    directory = Directory(files=[FileNode(b"a", EMPTY_DIGEST, 0)])  # type: ignore[arg-type]
    assert isinstance(directory.files, tuple)
    assert hash(directory) == hash(Directory(files=(FileNode(b"a", EMPTY_DIGEST, 0),)))


def test_to_node_and_with_name() -> None:
    node = WITH_KEEP.to_node(b"keep")
    assert node == DirectoryNode(b"keep", WITH_KEEP.digest, 1)
    assert WITH_KEEP.to_node(b"keep", "tvix-2024").size == 2
    assert node.with_name(b"other").name == b"other"
    assert FileNode(b"a", EMPTY_DIGEST, 1).with_name(b"").name == b""
    assert SymlinkNode(b"a", b"t").with_name(b"b") == SymlinkNode(b"b", b"t")


def test_executable_flag_is_encoded() -> None:
    plain = Directory(files=(FileNode(b"a", EMPTY_DIGEST, 0),))
    executable = Directory(files=(FileNode(b"a", EMPTY_DIGEST, 0, executable=True),))
    assert plain.digest != executable.digest
    assert executable.encode().endswith(b"\x20\x01")
    assert Directory.from_bytes(executable.encode()) == executable
