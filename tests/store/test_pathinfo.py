from __future__ import annotations

from pathlib import Path

import pytest

from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from nix_compat.signing import SigningKey
from nix_compat.store_path import StorePath
from tvix_castore.digests import B3Digest
from tvix_castore.nodes import DirectoryNode, FileNode
from tvix_store.pathinfo import InvalidPathInfo, PathInfo, ca_from_proto, ca_to_proto
from tvix_store.protos import pathinfo_pb2 as pb

SPEC = Path(__file__).resolve().parents[3] / "shared" / "SPEC.md"
FIXTURE_HEX = (
    "0a4c0a4a0a2630303030303030303030303030303030303030303030303030303030303030302d64756d6d79"
    "1220000000000000000000000000000000000000000000000000000000000000000012140000000000000000"
    "0000000000000000000000001a6e122000000000000000000000000000000000000000000000000000000000"
    "00000000222630303030303030303030303030303030303030303030303030303030303030302d64756d6d79"
    "322212200000000000000000000000000000000000000000000000000000000000000000"
)
DUMMY = StorePath(bytes(20), "dummy")
SK_B = "do.not.use:sGPzxuK5WvWPraytx+6sjtaff866sYlfvErE6x0hFEhy5eqe7OVZ8ZMqZ/ME/HaRdKGNGvJkyGKXYTaeA6lR3A=="


def fixture() -> PathInfo:
    return PathInfo(
        store_path=DUMMY,
        node=DirectoryNode(DUMMY.basename.encode(), B3Digest(bytes(32)), 0),
        nar_size=0,
        nar_sha256=bytes(32),
        references=(DUMMY,),
        ca=CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, bytes(32))),
    )


def test_fixture_encoding_byte_exact() -> None:
    assert fixture().encode().hex() == FIXTURE_HEX
    assert PathInfo.from_bytes(bytes.fromhex(FIXTURE_HEX)) == fixture()


def test_fixture_fingerprint_and_signature() -> None:
    info = fixture()
    assert info.fingerprint() == (
        "1;/nix/store/00000000000000000000000000000000-dummy;"
        "sha256:0000000000000000000000000000000000000000000000000000;0;"
        "/nix/store/00000000000000000000000000000000-dummy"
    )
    signed = info.signed(SigningKey.parse(SK_B))
    assert signed.signatures[0].render() == (
        "do.not.use:xl4q2L5wQMou13ZQ9/YPqK1z/DSIYycTtndVNfp2ybT8Cpg+yPv1sCQN8VVWppnq5BXTuMhjaq7K/ebYN4LYBg=="
    )
    assert PathInfo.from_proto(signed.to_proto()) == signed


def proto() -> pb.PathInfo:
    return fixture().to_proto()


def _bad_reference_length(m: pb.PathInfo) -> None:
    m.references[0] = b"\x00" * 19


def _count_mismatch(m: pb.PathInfo) -> None:
    m.narinfo.reference_names.append(DUMMY.basename)


def _bad_reference_name(m: pb.PathInfo) -> None:
    m.narinfo.reference_names[0] = "/nix/store/" + DUMMY.basename


def _reference_digest_mismatch(m: pb.PathInfo) -> None:
    m.narinfo.reference_names[0] = "00000000000000000000000000000001-dummy"


def _no_node(m: pb.PathInfo) -> None:
    m.ClearField("node")


def _node_bad_digest(m: pb.PathInfo) -> None:
    m.node.directory.digest = b"\x00" * 31


def _node_unset(m: pb.PathInfo) -> None:
    m.node.ClearField("directory")


def _node_name_not_store_path(m: pb.PathInfo) -> None:
    m.node.directory.name = b"dummy"


def _bad_nar_sha(m: pb.PathInfo) -> None:
    m.narinfo.nar_sha256 = b"\x00" * 31


def _bad_deriver(m: pb.PathInfo) -> None:
    m.narinfo.deriver.CopyFrom(pb.StorePath(name="foo bar", digest=bytes(20)))


def _bad_deriver_digest(m: pb.PathInfo) -> None:
    m.narinfo.deriver.CopyFrom(pb.StorePath(name="foo", digest=bytes(19)))


def _bad_signature(m: pb.PathInfo) -> None:
    m.narinfo.signatures.append(pb.NARInfo.Signature(name="k", data=bytes(63)))


def _bad_ca_digest(m: pb.PathInfo) -> None:
    m.narinfo.ca.digest = bytes(20)


def _bad_ca_type(m: pb.PathInfo) -> None:
    m.narinfo.ca.type = 42  # type: ignore[assignment]


def _no_narinfo(m: pb.PathInfo) -> None:
    m.ClearField("narinfo")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_no_narinfo, "The narinfo field is missing"),
        (_bad_reference_length, "Invalid length of digest at position 0"),
        (_count_mismatch, "Inconsistent Number of References: 1 (references) vs 2 (narinfo)"),
        (_bad_reference_name, "Invalid reference_name at position 0"),
        (_reference_digest_mismatch, "digest in reference_name at position 0 does not match"),
        (_no_node, "No node present"),
        (_node_bad_digest, "Invalid root node"),
        (_node_unset, "Invalid root node"),
        (_node_name_not_store_path, "Failed to parse"),
        (_bad_nar_sha, "Invalid narinfo.nar_sha256 length"),
        (_bad_deriver, "deriver field is invalid"),
        (_bad_deriver_digest, "deriver field is invalid"),
        (_bad_signature, "The signature at position 0 is invalid"),
        (_bad_ca_digest, "The ca field is invalid"),
        (_bad_ca_type, "The ca field is invalid"),
    ],
)
def test_validation_rules(mutate: object, message: str) -> None:
    m = proto()
    mutate(m)  # type: ignore[operator]
    with pytest.raises(InvalidPathInfo, match=message.replace("(", r"\(").replace(")", r"\)")):
        PathInfo.from_proto(m)


def test_leading_dot_name_is_valid() -> None:
    sp = StorePath.from_basename("fli4bwscgna7lpm7v5xgnjxrxh0yc7ra-.gitignore")
    info = PathInfo(sp, FileNode(sp.basename.encode(), B3Digest(bytes(32)), 0), 0, bytes(32))
    assert PathInfo.from_proto(info.to_proto()) == info


@pytest.mark.parametrize(
    "ca",
    [
        "fixed:r:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
        "fixed:r:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw",
        "fixed:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw",
        "text:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
        "fixed:md5:" + "0" * 26,
        "fixed:r:md5:" + "0" * 26,
        "fixed:sha512:" + "0" * 103,
        "fixed:r:sha512:" + "0" * 103,
        "fixed:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
    ],
)
def test_ca_roundtrip(ca: str) -> None:
    parsed = CAHash.parse(ca)
    msg = ca_to_proto(parsed)
    assert msg.digest == parsed.hash.digest  # raw bytes, not the text form
    assert ca_from_proto(msg) == parsed


def test_nar_sha256_ca_omits_type() -> None:
    msg = ca_to_proto(CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, bytes(32))))
    assert not msg.SerializeToString().startswith(b"\x08")


def test_narinfo_rendering() -> None:
    sp = StorePath.from_basename("bwrpi2jjp97ik4h6im8rpr0v421ac87x-foo")
    sha = bytes.fromhex("ebd52279a8df024c9fd5718de4103bf5e760dc7f2cf49044ee7dea87ab16911a")
    info = PathInfo(
        sp,
        DirectoryNode(sp.basename.encode(), B3Digest(bytes(32)), 4),
        840,
        sha,
        ca=CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, sha)),
    )
    text = info.to_narinfo("nar/x.nar").render()
    assert text == (
        "StorePath: /nix/store/bwrpi2jjp97ik4h6im8rpr0v421ac87x-foo\n"
        "URL: nar/x.nar\n"
        "Compression: none\n"
        "NarHash: sha256:06li2smqgskxxr291x1cgzf61rzm7c8f93bisnglq0nzm1wj5mgb\n"
        "NarSize: 840\n"
        "References: \n"
        "CA: fixed:r:sha256:06li2smqgskxxr291x1cgzf61rzm7c8f93bisnglq0nzm1wj5mgb\n"
    )


def test_root_node_must_carry_store_path_name() -> None:
    with pytest.raises(InvalidPathInfo, match="root node name"):
        PathInfo(DUMMY, FileNode(b"other", B3Digest(bytes(32)), 0), 0, bytes(32))
