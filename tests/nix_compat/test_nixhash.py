import pytest

from nix_compat.errors import NixHashError
from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash

SHA256_EMPTY = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")


@pytest.mark.parametrize(
    "text",
    [
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
        "sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
        "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
        "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",  # SRI without padding
        "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=trailing",
    ],
)
def test_parse_forms(text: str) -> None:
    h = NixHash.parse(text)
    assert h == NixHash(HashAlgo.SHA256, SHA256_EMPTY)


def test_render_forms() -> None:
    h = NixHash(HashAlgo.SHA256, SHA256_EMPTY)
    assert h.nix32() == "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
    assert h.hex() == "sha256:" + SHA256_EMPTY.hex()
    assert h.base64() == "sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    assert h.sri() == "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    for form in (h.nix32(), h.hex(), h.base64(), h.sri()):
        assert NixHash.parse(form) == h


def test_bare_digest_needs_algo() -> None:
    with pytest.raises(NixHashError):
        NixHash.parse(SHA256_EMPTY.hex())
    assert NixHash.parse(SHA256_EMPTY.hex(), HashAlgo.SHA256).digest == SHA256_EMPTY
    with pytest.raises(NixHashError, match="expected a sha1"):
        NixHash.parse("sha256:" + SHA256_EMPTY.hex(), HashAlgo.SHA1)


@pytest.mark.parametrize(
    "bad",
    [
        "sha256:abc",
        "sha257:" + "0" * 64,
        "md5:" + "0" * 64,
        "sha256:" + "g" * 64,
        "sha256:" + "e" * 52,
        "sha256-!!!!",
        "",
    ],
)
def test_invalid(bad: str) -> None:
    with pytest.raises(NixHashError):
        NixHash.parse(bad)


@pytest.mark.parametrize(
    ("text", "kind", "algo", "hexdigest"),
    [
        ("fixed:r:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw", CAKind.NAR, HashAlgo.SHA1,
         "5cba3c77236ae4f9650270a27fbad375551fa60a"),
        ("fixed:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw", CAKind.FLAT, HashAlgo.SHA1,
         "5cba3c77236ae4f9650270a27fbad375551fa60a"),
        ("text:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73", CAKind.TEXT,
         HashAlgo.SHA256, SHA256_EMPTY.hex()),
        ("fixed:r:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73", CAKind.NAR,
         HashAlgo.SHA256, SHA256_EMPTY.hex()),
    ],
)  # fmt: skip
def test_ca_parse(text: str, kind: CAKind, algo: HashAlgo, hexdigest: str) -> None:
    ca = CAHash.parse(text)
    assert (ca.kind, ca.hash.algo, ca.hash.digest.hex()) == (kind, algo, hexdigest)
    assert ca.render() == text


@pytest.mark.parametrize(
    "bad",
    [
        "fixed:r:sha256:" + SHA256_EMPTY.hex(),  # CA accepts nixbase32 only
        "text:sha1:1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw",
        "fixed:r:sha256",
        "nar:sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
        "fixed:blake3:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
    ],
)
def test_ca_invalid(bad: str) -> None:
    with pytest.raises(NixHashError):
        CAHash.parse(bad)
