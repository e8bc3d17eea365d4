"""Directory/Node validation rules of SPEC B §2.3 and the vectors of B §3.2."""

import pytest

from tvix_castore import (
    EMPTY_DIGEST,
    U64_MAX,
    Directory,
    DirectoryError,
    DirectoryErrorKind,
    DirectoryNode,
    FileNode,
    InvalidDigest,
    NodeError,
    SymlinkNode,
    ValidationError,
)
from tvix_castore.protos import castore_pb2 as pb

K = DirectoryErrorKind
DIGEST = EMPTY_DIGEST.raw


def pb_dir(name: bytes, digest: bytes = DIGEST, size: int = 0) -> pb.DirectoryNode:
    return pb.DirectoryNode(name=name, digest=digest, size=size)


def pb_file(name: bytes, digest: bytes = DIGEST) -> pb.FileNode:
    return pb.FileNode(name=name, digest=digest, size=0)


def pb_link(name: bytes, target: bytes = b"/x") -> pb.SymlinkNode:
    return pb.SymlinkNode(name=name, target=target)


REJECTED = [
    ("dir name NUL", pb.Directory(directories=[pb_dir(b"\0")]), K.INVALID_NAME, b"\0"),
    ("dir name .", pb.Directory(directories=[pb_dir(b".")]), K.INVALID_NAME, b"."),
    ("file name ..", pb.Directory(files=[pb_file(b"..")]), K.INVALID_NAME, b".."),
    ("empty file name", pb.Directory(files=[pb_file(b"")]), K.INVALID_NAME, b""),
    ("symlink name NUL", pb.Directory(symlinks=[pb_link(b"\0")]), K.INVALID_NAME, b"\0"),
    ("symlink name /", pb.Directory(symlinks=[pb_link(b"foo/bar")]), K.INVALID_NAME, b"foo/bar"),
    ("name 500 bytes", pb.Directory(symlinks=[pb_link(b"X" * 500)]), K.NAME_TOO_LONG, b"X" * 500),
    (
        "dir digest 2 bytes",
        pb.Directory(directories=[pb_dir(b"a", b"\0\0")]),
        K.INVALID_DIGEST,
        b"a",
    ),
    (
        "file digest 33 bytes",
        pb.Directory(files=[pb_file(b"a", bytes(33))]),
        K.INVALID_DIGEST,
        b"a",
    ),
    ("file digest empty", pb.Directory(files=[pb_file(b"a", b"")]), K.INVALID_DIGEST, b"a"),
    (
        "dirs [b, a]",
        pb.Directory(directories=[pb_dir(b"b"), pb_dir(b"a")]),
        K.WRONG_SORTING,
        b"a",
    ),
    ("files [b, a]", pb.Directory(files=[pb_file(b"b"), pb_file(b"a")]), K.WRONG_SORTING, b"a"),
    (
        "dirs [a, a]",
        pb.Directory(directories=[pb_dir(b"a"), pb_dir(b"a")]),
        K.DUPLICATE_NAME,
        b"a",
    ),
    (
        "dir a + symlink a",
        pb.Directory(directories=[pb_dir(b"a")], symlinks=[pb_link(b"a")]),
        K.DUPLICATE_NAME,
        b"a",
    ),
    (
        "file a + symlink a",
        pb.Directory(files=[pb_file(b"a")], symlinks=[pb_link(b"a")]),
        K.DUPLICATE_NAME,
        b"a",
    ),
    ("target empty", pb.Directory(symlinks=[pb_link(b"a", b"")]), K.INVALID_SYMLINK_TARGET, b"a"),
    (
        "target NUL",
        pb.Directory(symlinks=[pb_link(b"a", b"foo\0")]),
        K.INVALID_SYMLINK_TARGET,
        b"a",
    ),
    (
        "target 5000 bytes",
        pb.Directory(symlinks=[pb_link(b"a", b"t" * 5000)]),
        K.SYMLINK_TARGET_TOO_LONG,
        b"a",
    ),
    (
        "size overflow",
        pb.Directory(directories=[pb_dir(b"a", size=U64_MAX)]),
        K.SIZE_OVERFLOW,
        b"a",
    ),
    (
        "size overflow on a later entry",
        pb.Directory(directories=[pb_dir(b"a", size=U64_MAX - 1)], files=[pb_file(b"b")]),
        K.SIZE_OVERFLOW,
        b"b",
    ),
]


@pytest.mark.parametrize(
    ("label", "msg", "kind", "name"), REJECTED, ids=[row[0] for row in REJECTED]
)
def test_rejected(label: str, msg: pb.Directory, kind: DirectoryErrorKind, name: bytes) -> None:
    with pytest.raises(DirectoryError) as info:
        Directory.from_proto(msg)
    assert info.value.kind is kind
    assert info.value.name == name
    assert repr(name)[1:] in str(info.value)
    assert isinstance(info.value, ValidationError)


def test_invalid_digest_cause_carries_length() -> None:
    with pytest.raises(NodeError) as info:
        Directory.from_proto(pb.Directory(directories=[pb_dir(b"a", b"\0\0")]))
    cause = info.value.__cause__
    assert isinstance(cause, InvalidDigest)
    assert cause.length == 2
    assert "invalid digest length 2" in str(info.value)


def test_sorting_is_checked_before_node_validity() -> None:
    # HEAD order: rule 1 for all lists first, so [b, a] wins over the bad digest.
    msg = pb.Directory(directories=[pb_dir(b"b", b"\0"), pb_dir(b"a")])
    with pytest.raises(DirectoryError) as info:
        Directory.from_proto(msg)
    assert info.value.kind is K.WRONG_SORTING


def test_sorting_is_bytewise() -> None:
    # b"B" (0x42) < b"a" (0x61) < b"\xc3" (non-ASCII): memcmp order, not locale or str.
    ok = pb.Directory(files=[pb_file(b"B"), pb_file(b"a"), pb_file(b"\xc3\xa4")])
    assert [n.name for n in Directory.from_proto(ok).files] == [b"B", b"a", b"\xc3\xa4"]
    with pytest.raises(DirectoryError):
        Directory.from_proto(pb.Directory(files=[pb_file(b"a"), pb_file(b"B")]))


ACCEPTED = [
    pb.Directory(),
    pb.Directory(directories=[pb_dir(b"a"), pb_dir(b"b")]),
    pb.Directory(directories=[pb_dir(b"b"), pb_dir(b"c")], symlinks=[pb_link(b"a")]),
    pb.Directory(files=[pb_file(b".hidden"), pb_file(b"new\nline"), pb_file(b"with space")]),
    pb.Directory(files=[pb_file(b"\xff\xfe")]),  # not UTF-8
    pb.Directory(files=[pb_file(b"n" * 255)]),
    pb.Directory(files=[pb_file(b"...")]),
]


@pytest.mark.parametrize("msg", ACCEPTED)
def test_accepted(msg: pb.Directory) -> None:
    directory = Directory.from_proto(msg)
    assert directory.to_proto() == msg


@pytest.mark.parametrize(
    "target", [b"aa", b".", b"./..", b"..", b"a/b", b"/a/b", b"\xc5\xc4\xd6", b"t" * 4095]
)
def test_accepted_symlink_targets(target: bytes) -> None:
    directory = Directory.from_proto(pb.Directory(symlinks=[pb_link(b"l", target)]))
    assert directory.symlinks[0].target == target


def test_size_limit_documented() -> None:
    # 1 + (2^64 - 2) is exactly u64::MAX: still fine under the documented rule.
    directory = Directory.from_proto(pb.Directory(directories=[pb_dir(b"a", size=U64_MAX - 1)]))
    assert directory.size() == U64_MAX
    # ... but HEAD's 2N + sum overflows.
    with pytest.raises(DirectoryError) as info:
        directory.size("tvix-2024")
    assert info.value.kind is K.SIZE_OVERFLOW


def test_unknown_size_mode() -> None:
    with pytest.raises(ValueError, match="unknown size mode"):
        Directory().size("bogus")  # type: ignore[arg-type]


# The same rules hold for directories built in Python.


def test_python_construction_rejects_bad_sorting() -> None:
    with pytest.raises(DirectoryError) as info:
        Directory(files=(FileNode(b"b", EMPTY_DIGEST, 0), FileNode(b"a", EMPTY_DIGEST, 0)))
    assert (info.value.kind, info.value.name) == (K.WRONG_SORTING, b"a")


def test_python_construction_rejects_cross_list_duplicates() -> None:
    with pytest.raises(DirectoryError) as info:
        Directory(
            directories=(DirectoryNode(b"x", EMPTY_DIGEST, 0),),
            symlinks=(SymlinkNode(b"x", b"t"),),
        )
    assert (info.value.kind, info.value.name) == (K.DUPLICATE_NAME, b"x")


def test_python_construction_rejects_empty_name() -> None:
    with pytest.raises(DirectoryError) as info:
        Directory(files=(FileNode(b"", EMPTY_DIGEST, 0),))
    assert info.value.kind is K.INVALID_NAME


def test_python_construction_rejects_overflow() -> None:
    with pytest.raises(DirectoryError) as info:
        Directory(directories=(DirectoryNode(b"a", EMPTY_DIGEST, U64_MAX),))
    assert info.value.kind is K.SIZE_OVERFLOW


@pytest.mark.parametrize(
    ("build", "kind"),
    [
        (lambda: FileNode(b"a/b", EMPTY_DIGEST, 0), K.INVALID_NAME),
        (lambda: DirectoryNode(b"..", EMPTY_DIGEST, 0), K.INVALID_NAME),
        (lambda: SymlinkNode(b"x" * 256, b"t"), K.NAME_TOO_LONG),
        (lambda: SymlinkNode(b"a", b""), K.INVALID_SYMLINK_TARGET),
        (lambda: SymlinkNode(b"a", b"x" * 4096), K.SYMLINK_TARGET_TOO_LONG),
        (lambda: FileNode(b"a", EMPTY_DIGEST, -1), K.INVALID_SIZE),
        (lambda: DirectoryNode(b"a", EMPTY_DIGEST, U64_MAX + 1), K.INVALID_SIZE),
    ],
)
def test_node_constructors_validate(build: object, kind: DirectoryErrorKind) -> None:
    assert callable(build)
    with pytest.raises(NodeError) as info:
        build()
    assert info.value.kind is kind


def test_node_constructors_check_types() -> None:
    with pytest.raises(TypeError):
        FileNode("a", EMPTY_DIGEST, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        FileNode(b"a", EMPTY_DIGEST.raw, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        SymlinkNode(b"a", "target")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Directory(files=(SymlinkNode(b"a", b"t"),))  # type: ignore[arg-type]


def test_nodes_are_immutable() -> None:
    node = FileNode(b"a", EMPTY_DIGEST, 0)
    with pytest.raises(AttributeError):
        node.name = b"b"  # type: ignore[misc]
    directory = Directory(files=(node,))
    with pytest.raises(AttributeError):
        directory.files = ()  # type: ignore[misc]


def test_bad_name_reported_before_bad_digest() -> None:
    with pytest.raises(NodeError) as info:
        Directory.from_proto(pb.Directory(files=[pb_file(b"a/b", b"\0\0")]))
    assert (info.value.kind, info.value.name) == (K.INVALID_NAME, b"a/b")
