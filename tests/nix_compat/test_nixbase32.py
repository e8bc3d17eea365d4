import hashlib

import pytest

from nix_compat import nixbase32
from nix_compat.errors import Nixbase32Error

VECTORS = [
    ("", ""),
    ("1f", "0z"),
    ("8a12321522fd91efbd60ebb2481af88580f61600", "00bgd045z0d4icpbc2yyz4gx48ak44la"),
    (
        "b3a24de97a8fdbc835b9833169501030b8977031bcb54b3b3ac13740f846ab30",
        "0c5b8vw40dy178xlpddw65q9gf1h2186jcc3p4swinwggbllv8mk",
    ),
    ("00" * 20, "0" * 32),
    ("00" * 32, "0" * 52),
    (hashlib.sha256(b"").hexdigest(), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"),
    (
        "13a8cf7ca57f68a9f1752acee36a72a55187d3a954443c112818926f26109d91",
        "14cx20k6z4hq508kqi2lm79qfld5f9mf7kiafpqsjs3zlmycza0k",
    ),
    ("5cba3c77236ae4f9650270a27fbad375551fa60a", "1ak1ymbmsfx7z8kh09jzkr3a4dvkrfjw"),
]


@pytest.mark.parametrize(("hexdata", "text"), VECTORS)
def test_vectors(hexdata: str, text: str) -> None:
    assert nixbase32.encode(bytes.fromhex(hexdata)) == text
    assert nixbase32.decode(text).hex() == hexdata
    assert nixbase32.decode(text.encode()).hex() == hexdata


@pytest.mark.parametrize("bad", ["zz", "c0", "0", "0zz", "e0", "0u", "00\xe9"])
def test_invalid(bad: str) -> None:
    with pytest.raises(Nixbase32Error):
        nixbase32.decode(bad)
    assert not nixbase32.is_valid(bad)


@pytest.mark.parametrize(("n", "length"), [(0, 0), (20, 32), (32, 52), (1, 2), (64, 103)])
def test_encode_len(n: int, length: int) -> None:
    assert nixbase32.encode_len(n) == length


@pytest.mark.parametrize(
    ("length", "n"), [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (5, 3), (32, 20)]
)
def test_decode_len(length: int, n: int) -> None:
    assert nixbase32.decode_len(length) == n


def test_length_mismatch() -> None:
    with pytest.raises(Nixbase32Error, match="expected 32"):
        nixbase32.decode("00", 32)
    with pytest.raises(Nixbase32Error):
        nixbase32.decode(b"\xff\xff")


def test_roundtrip_all_lengths() -> None:
    for n in range(70):
        data = hashlib.sha512(bytes([n])).digest()[: n % 65]
        assert nixbase32.decode(nixbase32.encode(data)) == data
