"""Root Node encodings (SPEC B §3.3) and root-node name contexts (B §2.3)."""

import base64

import pytest

from tvix_castore import (
    EMPTY_DIGEST,
    B3Digest,
    DirectoryErrorKind,
    FileNode,
    NameRule,
    Node,
    NodeError,
    SymlinkNode,
    node_from_proto,
    node_to_proto,
)
from tvix_castore.protos import castore_pb2 as pb
from tvix_castore.testing.fixtures import HELLOWORLD_BLOB, directories


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


VECTORS: list[tuple[str, Node, str, str | None]] = [
    (
        "file HELLOWORLD",
        FileNode(b"", B3Digest.of(HELLOWORLD_BLOB), 12),
        "122412205ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c180c",
        None,
    ),
    (
        "symlink",
        SymlinkNode(b"", b"/nix/store/somewhereelse"),
        "1a1a12182f6e69782f73746f72652f736f6d657768657265656c7365",
        "GhoSGC9uaXgvc3RvcmUvc29tZXdoZXJlZWxzZQ",
    ),
    (
        "dir COMPLICATED (documented)",
        directories("documented").complicated.to_node(b""),
        "0a2412203f951a15afd586fb3121ef4d13d582e811ce0e5a7f21c0497fd87490e9e2355a1804",
        "CiQSID-VGhWv1Yb7MSHvTRPVgugRzg5afyHASX_YdJDp4jVaGAQ",
    ),
    (
        "dir COMPLICATED (HEAD)",
        directories("tvix-2024").complicated.to_node(b"", "tvix-2024"),
        "0a241220424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb1808",
        "CiQSIEJKf2zgjYBdFbQoBi-q6WKZoWddcIw6OSYa_jjN0E_rGAg",
    ),
    (
        "file, empty blob",
        FileNode(b"", EMPTY_DIGEST, 0),
        "12221220af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
        None,
    ),
]


@pytest.mark.parametrize(
    ("label", "node", "hex_proto", "url"), VECTORS, ids=[v[0] for v in VECTORS]
)
def test_node_encoding(label: str, node: Node, hex_proto: str, url: str | None) -> None:
    encoded = node_to_proto(node).SerializeToString()
    assert encoded.hex() == hex_proto
    if url is not None:
        assert b64url(encoded) == url
    decoded = node_from_proto(pb.Node.FromString(encoded), name_rule=NameRule.EMPTY)
    assert decoded == node


def test_no_node_set() -> None:
    with pytest.raises(NodeError) as info:
        node_from_proto(pb.Node())
    assert info.value.kind is DirectoryErrorKind.NO_NODE_SET
    assert info.value.name is None


def test_empty_rule_rejects_names() -> None:
    msg = node_to_proto(FileNode(b"foo", EMPTY_DIGEST, 0))
    with pytest.raises(NodeError) as info:
        node_from_proto(msg, name_rule=NameRule.EMPTY)
    assert (info.value.kind, info.value.name) == (DirectoryErrorKind.UNEXPECTED_NAME, b"foo")


def test_required_rule_rejects_empty_name() -> None:
    msg = node_to_proto(SymlinkNode(b"", b"t"))
    with pytest.raises(NodeError) as info:
        node_from_proto(msg, name_rule=NameRule.REQUIRED)
    assert info.value.kind is DirectoryErrorKind.INVALID_NAME


def test_required_rule_allows_leading_dot() -> None:
    msg = node_to_proto(SymlinkNode(b".dotfile", b"t"))
    assert node_from_proto(msg, name_rule=NameRule.REQUIRED).name == b".dotfile"


@pytest.mark.parametrize("rule", list(NameRule))
def test_any_rule_still_validates_nodes(rule: NameRule) -> None:
    bad_digest = pb.Node(file=pb.FileNode(name=b"", digest=b"\x01" * 31))
    with pytest.raises(NodeError) as info:
        node_from_proto(bad_digest, name_rule=rule)
    assert info.value.kind in (DirectoryErrorKind.INVALID_DIGEST, DirectoryErrorKind.INVALID_NAME)
    bad_target = pb.Node(symlink=pb.SymlinkNode(name=b"x", target=b""))
    with pytest.raises(NodeError):
        node_from_proto(bad_target, name_rule=rule)
    bad_name = pb.Node(directory=pb.DirectoryNode(name=b"a/b", digest=EMPTY_DIGEST.raw))
    with pytest.raises(NodeError):
        node_from_proto(bad_name, name_rule=rule)


def test_any_rule_accepts_both() -> None:
    assert node_from_proto(node_to_proto(FileNode(b"", EMPTY_DIGEST, 0))).name == b""
    assert node_from_proto(node_to_proto(FileNode(b"x", EMPTY_DIGEST, 0))).name == b"x"
