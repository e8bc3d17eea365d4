from pathlib import Path

import pytest
import zstandard

from nix_compat.errors import NarInfoError
from nix_compat.narinfo import NarInfo, NarInfoFlag, fingerprint
from nix_compat.nixhash import CAKind, HashAlgo
from nix_compat.signing import SigningKey, VerifyingKey
from nix_compat.store_path import StorePath

CACHE_KEY = VerifyingKey.parse("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=")


def corpus() -> list[str]:
    raw = (Path(__file__).parent.parent / "data" / "narinfo.zst").read_bytes()
    text = zstandard.ZstdDecompressor().decompressobj().decompress(raw).decode()
    return [e + "\n" for e in text.split("\n\n") if e]


CORPUS = corpus()

BASE = """StorePath: /nix/store/0a3yijp35sygmy51cnrrz11vimwapz7c-dbus-conf
URL: nar/0i1dmr7f1pliycq471wfgifwrkbii2ky9gb35zsvv46ld1rl2m2c.nar.xz
Compression: xz
FileHash: sha256:0i1dmr7f1pliycq471wfgifwrkbii2ky9gb35zsvv46ld1rl2m2c
FileSize: 3020
NarHash: sha256:1bb3srw3x77mnck1gk0cbnf1a9915fdrqdjb27y7rxmmlrb3dzjw
NarSize: 11408
References: 0a3yijp35sygmy51cnrrz11vimwapz7c-dbus-conf
"""


def test_corpus_size() -> None:
    assert len(CORPUS) == 978


def test_corpus_roundtrip_byte_exact() -> None:
    for entry in CORPUS:
        assert NarInfo.parse(entry).render() == entry


def test_corpus_signatures_verify() -> None:
    for entry in CORPUS:
        info = NarInfo.parse(entry)
        assert info.verify([CACHE_KEY]), info.store_path


def test_corpus_signature_fails_when_tampered() -> None:
    info = NarInfo.parse(CORPUS[0])
    from dataclasses import replace

    assert not replace(info, nar_size=info.nar_size + 1).verify([CACHE_KEY])


def test_fields() -> None:
    info = NarInfo.parse(CORPUS[0])
    assert info.store_path.name == "dbus-conf"
    assert info.compression == "xz"
    assert info.deriver is not None and info.deriver.name == "dbus-conf"
    assert info.flags == NarInfoFlag.NONE


def test_ca_sha1() -> None:
    info = NarInfo.parse(BASE + "CA: fixed:r:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw\n")
    assert info.ca is not None
    assert info.ca.kind is CAKind.NAR and info.ca.hash.algo is HashAlgo.SHA1
    assert info.ca.hash.digest.hex() == "5cba3c77236ae4f9650270a27fbad375551fa60a"


def test_hex_nar_hash() -> None:
    text = BASE.replace(
        "NarHash: sha256:1bb3srw3x77mnck1gk0cbnf1a9915fdrqdjb27y7rxmmlrb3dzjw",
        "NarHash: sha256:60adfd293a4d81ad7cd7e47263cbb3fc846309ef91b154a08ba672b558f94ff3",
    )
    info = NarInfo.parse(text)
    assert NarInfoFlag.NAR_HASH_HEX in info.flags
    assert "NarHash: sha256:1wsgz5cbawm6ifh59ccixw4n717wng5n6wp4sxyav0ad78lzvbb0\n" in info.render()


def test_missing_compression_means_bzip2() -> None:
    info = NarInfo.parse(BASE.replace("Compression: xz\n", ""))
    assert NarInfoFlag.COMPRESSION_DEFAULT in info.flags
    assert info.effective_compression == "bzip2"
    assert info.compression is None


def test_compression_none_roundtrips() -> None:
    text = BASE.replace("Compression: xz", "Compression: none")
    assert NarInfo.parse(text).render() == text


def test_references_out_of_order_kept() -> None:
    text = BASE.replace(
        "References: 0a3yijp35sygmy51cnrrz11vimwapz7c-dbus-conf",
        "References: a8922c0h87iilxzzvwn2hmv8x210aqb9-glibc-2.7"
        " 7w2acjgalb0cm7b3bg8yswza4l7iil9y-binutils-2.18",
    )
    info = NarInfo.parse(text)
    assert NarInfoFlag.REFERENCES_OUT_OF_ORDER in info.flags
    assert [r.name for r in info.references] == ["glibc-2.7", "binutils-2.18"]
    assert info.render() == text


def test_crlf_and_unknown_fields() -> None:
    info = NarInfo.parse(BASE.replace("\n", "\r\n") + "Foo: bar\r\n")
    assert NarInfoFlag.UNKNOWN_FIELD in info.flags
    assert info.nar_size == 11408


def test_empty_references() -> None:
    text = BASE.replace("References: 0a3yijp35sygmy51cnrrz11vimwapz7c-dbus-conf", "References: ")
    info = NarInfo.parse(text)
    assert info.references == ()
    assert info.render() == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "\n", "empty line"),
        ("\n" + BASE, "empty line"),
        (BASE + "NarSize: 1\n", "duplicate"),
        (BASE.replace("NarSize: 11408\n", ""), "missing required key 'NarSize'"),
        (BASE.replace("URL: nar/", "URL:nar/"), "expected 'Key: value'"),
        (BASE.replace("StorePath: /nix/store/", "StorePath: /nix/stor/"), "not in /nix/store"),
        (BASE.replace("NarSize: 11408", "NarSize: -1"), "not a decimal"),
        (BASE.replace("NarSize: 11408", "NarSize: 18446744073709551616"), "64 bits"),
        (BASE.replace("NarHash: sha256:", "NarHash: md5:"), "not a sha256"),
        (BASE.replace("FileHash: sha256:0i1d", "FileHash: sha256:0e1d"), "invalid digest"),
        (BASE + "Deriver: lzydd5cyykz34jpbchk6psv23kgmx1f2-dbus-conf\n", ".drv"),
        (BASE + "Sig: foo\n", "Sig"),
        (BASE + "CA: fixed:r:sha257:x\n", "algorithm"),
        (BASE.replace("Compression: xz", "Compression: "), "Compression is empty"),
        (BASE.replace("URL: nar/0i1dmr7f1pliycq471wfgifwrkbii2ky9gb35zsvv46ld1rl2m2c.nar.xz",
                      "URL: "), "URL is empty"),
        (b"\xff" + BASE.encode(), "UTF-8"),
        (BASE.encode() + b"X: " + b"x" * (2 << 20), "larger than"),
    ],
)  # fmt: skip
def test_rejects(text: str | bytes, message: str) -> None:
    with pytest.raises(NarInfoError, match=message):
        NarInfo.parse(text)


def test_fingerprint_of_path_info_fixture() -> None:
    dummy = StorePath(bytes(20), "dummy")
    assert fingerprint(dummy, bytes(32), 0, [dummy]) == (
        "1;/nix/store/00000000000000000000000000000000-dummy;"
        "sha256:0000000000000000000000000000000000000000000000000000;0;"
        "/nix/store/00000000000000000000000000000000-dummy"
    )


def test_sign_keeps_existing_signatures() -> None:
    info = NarInfo.parse(CORPUS[1])
    key = SigningKey.generate("ours-1")
    signed = info.signed(key)
    assert signed.signatures[:-1] == info.signatures
    assert signed.verify([key.verifying_key()])
    assert signed.verify([CACHE_KEY])
    assert not info.verify([key.verifying_key()])
