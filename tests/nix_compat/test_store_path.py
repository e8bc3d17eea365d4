import pytest

from nix_compat.errors import StorePathError
from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from nix_compat.store_path import (
    StorePath,
    build_ca_path,
    build_output_path,
    build_text_path,
    compress_hash,
    placeholder,
)


def test_parse_basename() -> None:
    p = StorePath.from_basename("00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432")
    assert p.digest.hex() == "8a12321522fd91efbd60ebb2481af88580f61600"
    assert p.name == "net-tools-1.60_p20170221182432"
    assert p.basename == "00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432"
    assert str(p) == "/nix/store/" + p.basename
    assert StorePath.from_absolute_path(p.absolute) == p
    assert StorePath.from_basename(p.basename.encode()) == p


def test_leading_dot_allowed() -> None:
    assert (
        StorePath.from_basename("fli4bwscgna7lpm7v5xgnjxrxh0yc7ra-.gitignore").name == ".gitignore"
    )


@pytest.mark.parametrize(
    "bad",
    [
        "00bgd045z0d4icpbc2yy-",
        "00bgd045z0d4icpbc2yy-net-tools",  # 20-char hash
        "00bgd045z0d4icpbc2yyz4gx48aku4la-net-tools",  # 'u' is not nixbase32
        "00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools/bin/arp",
        "00bgd045z0d4icpbc2yyz4gx48ak44lanet-tools",
        "00bgd045z0d4icpbc2yyz4gx48ak44la-" + "a" * 212,
        "00bgd045z0d4icpbc2yyz4gx48ak44la-",
        "00bgd045z0d4icpbc2yyz4gx48ak44la-white space",
        "00bgd045z0d4icpbc2yyz4gx48ak44la-caf\xe9",
    ],
)
def test_invalid_basenames(bad: str) -> None:
    with pytest.raises(StorePathError):
        StorePath.from_basename(bad)


def test_name_limit() -> None:
    ok = "00bgd045z0d4icpbc2yyz4gx48ak44la-" + "a" * 211
    assert len(StorePath.from_basename(ok).name) == 211


def test_absolute_paths() -> None:
    with pytest.raises(StorePathError):
        StorePath.from_absolute_path("/nix/stor/00bgd045z0d4icpbc2yyz4gx48ak44la-x")
    p, sub = StorePath.from_absolute_path_full(
        "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-x/bin/arp"
    )
    assert (p.name, sub) == ("x", "bin/arp")


def test_ordering_matches_nixbase32_text() -> None:
    names = [
        "00bgd045z0d4icpbc2yyz4gx48ak44la-a",
        "1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw-b",
        "0z000000000000000000000000000000-c",
        "zz000000000000000000000000000001-c",
        "vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo",
    ]
    paths = [StorePath.from_basename(n) for n in names]
    assert [p.basename for p in sorted(paths)] == sorted(names)


def test_compress_hash() -> None:
    assert compress_hash(bytes(range(32)), 20) == bytes(
        (i ^ (i + 20)) if i < 12 else i for i in range(20)
    )


def test_text_paths() -> None:
    foo = build_text_path("foo", b"bar")
    assert foo.absolute == "/nix/store/vxjiwkjkn7x4079qvh1jkl5pn05j2aw0-foo"
    baz = build_text_path("baz", foo.absolute.encode(), [foo])
    assert baz.absolute == "/nix/store/5xd714cbfnkz02h2vbsj4fm03x3f15nf-baz"


def test_fixed_output_sha1() -> None:
    ca = CAHash(CAKind.NAR, NixHash.parse("sha1:0beec7b5ea3f0fdbc95d0dd47f3c5bc275da8a33"))
    assert build_ca_path("bar", ca).absolute == "/nix/store/mp57d33657rf34lzvlbpfa1gjfv5gmpg-bar"
    with pytest.raises(StorePathError):
        build_ca_path("bar", ca, [build_text_path("foo", b"bar")])


def test_source_path_with_references() -> None:
    ca = CAHash(
        CAKind.NAR,
        NixHash.parse("sha256:1xqkzcb3909fp07qngljr4wcdnrh1gdam1m2n29i6hhrxlmkgkv1"),
    )
    ref = StorePath.from_absolute_path("/nix/store/dxwkwjzdaq7ka55pkk252gh32bgpmql4-foo")
    assert (
        build_ca_path("baz", ca, [ref]).absolute
        == "/nix/store/s89y431zzhmdn3k8r96rvakryddkpv2v-baz"
    )
    # self references are allowed for NAR-sha256 addresses and change the path
    assert build_ca_path("baz", ca, [ref], self_reference=True) != build_ca_path("baz", ca, [ref])


def test_flat_and_text_ca() -> None:
    flat = CAHash(CAKind.FLAT, NixHash(HashAlgo.SHA256, bytes(32)))
    nar = CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, bytes(32)))
    assert build_ca_path("x", flat) != build_ca_path("x", nar)
    text = CAHash.parse("text:sha256:" + "0" * 52)
    assert build_ca_path("foo", text) == build_text_path("foo", sha256=bytes(32))
    with pytest.raises(StorePathError):
        build_ca_path("foo", text, self_reference=True)


@pytest.mark.parametrize(
    ("nar", "name", "expected"),
    [
        ("symlink.nar", "foo", "y7j0h1s346m08pya3s42nhmx0j0mqidh-foo"),
        ("helloworld.nar", "foo", "bppn0r6splkj24pphgcaqj4l44gsbqs3-foo"),
        ("complicated.nar", "foo", "bwrpi2jjp97ik4h6im8rpr0v421ac87x-foo"),
    ],
)
def test_import_paths_of_test_nars(nar: str, name: str, expected: str) -> None:
    import hashlib
    from pathlib import Path

    data = (Path(__file__).parent.parent / "data" / nar).read_bytes()
    ca = CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, hashlib.sha256(data).digest()))
    assert build_ca_path(name, ca).basename == expected


def test_output_path_and_placeholder() -> None:
    p = build_output_path(bytes(32), "out", "hello-1.0")
    assert p.name == "hello-1.0"
    assert placeholder("out") == "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"
