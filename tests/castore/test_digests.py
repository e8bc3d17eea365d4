"""B3Digest and the blob vectors of SPEC B §3.1."""

import base64

import pytest

from tvix_castore import EMPTY_DIGEST, B3Digest, CastoreError, InvalidDigest, ValidationError
from tvix_castore.testing import fixtures as fx

BLOB_VECTORS = [
    ("EMPTY", fx.EMPTY_BLOB, "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"),
    (
        "HELLOWORLD",
        fx.HELLOWORLD_BLOB,
        "5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c",
    ),
    ("BLOB_A", fx.BLOB_A, "7b7015bb92cf0b318037702a6cdd81dee41224f734684c2c122cd6359cb1ee63"),
    ("BLOB_B", fx.BLOB_B, "a82c5154a7a0c262c6fdb929a317585646f8fbcf80326d0a7b8747edaf2d99d2"),
    (
        "DUMMY_DATA_1",
        fx.DUMMY_DATA_1,
        "b177ec1bf26dfb3b7010d473e6d44713b29b765b99c6e60ecbfae742de496543",
    ),
    (
        "DUMMY_DATA_2",
        fx.DUMMY_DATA_2,
        "5f805527aa94f2a9a3a782cad8cc18b63cf6017e7bc65ca96aeada8392d4c525",
    ),
    ("one byte", b"\x01", "48fc721fbbc172e0925fa27af1671de225ba927134802998b10a1568a188652b"),
]


@pytest.mark.parametrize(("label", "data", "hex_digest"), BLOB_VECTORS)
def test_blob_digest(label: str, data: bytes, hex_digest: str) -> None:
    assert B3Digest.of(data).hex() == hex_digest


def test_blob_b_shape() -> None:
    assert len(fx.BLOB_B) == 1_044_480


@pytest.mark.parametrize(
    ("data", "b64"),
    [
        (b"", "rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI="),
        (b"Hello World!", "XKeBWty0hOmhNsEe/mnB1TAXbVSbXRjQOOtSgLSzRww="),
        (b"x86_64-linux", "KOM3/IHEx7YfInAnlJpAElYezq0Sxn9fRz7xuClwNfA="),
    ],
)
def test_b64_and_display(data: bytes, b64: str) -> None:
    digest = B3Digest.of(data)
    assert digest.b64() == b64
    assert str(digest) == "b3:" + b64
    assert B3Digest.from_b64(b64) == digest
    assert B3Digest.parse("b3:" + b64) == digest
    assert repr(digest) == f"B3Digest('b3:{b64}')"


def test_empty_digest_constant() -> None:
    assert B3Digest.of(b"") == EMPTY_DIGEST
    assert str(EMPTY_DIGEST) == "b3:rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI="


def test_hash_of_bytes_like() -> None:
    assert B3Digest.of(bytearray(b"Hello World!")) == B3Digest.of(memoryview(b"Hello World!"))


def test_dummy_digests() -> None:
    assert fx.DUMMY_DIGEST.raw == bytes(32)
    assert fx.DUMMY_DIGEST_2.raw == b"\x10" + bytes(31)
    assert fx.DUMMY_DIGEST < fx.DUMMY_DIGEST_2


@pytest.mark.parametrize("length", [0, 1, 2, 20, 31, 33, 64])
def test_wrong_length_rejected(length: int) -> None:
    with pytest.raises(InvalidDigest) as info:
        B3Digest(b"\x00" * length)
    assert info.value.length == length
    assert str(info.value) == f"invalid digest length {length}"
    assert isinstance(info.value, ValidationError)
    assert isinstance(info.value, CastoreError)


def test_bytes_like_normalised_to_bytes() -> None:
    digest = B3Digest(bytearray(32))  # type: ignore[arg-type]
    assert type(digest.raw) is bytes
    assert digest == B3Digest(bytes(32))


def test_hex_roundtrip() -> None:
    digest = B3Digest.of(b"abc")
    assert B3Digest.from_hex(digest.hex()) == digest
    assert B3Digest.from_hex(digest.hex().upper()) == digest
    assert bytes(digest) == digest.raw


@pytest.mark.parametrize(
    "text",
    [
        "zz" * 32,  # not hex
        "ab" * 31,  # too short
    ],
)
def test_from_hex_rejects(text: str) -> None:
    with pytest.raises(InvalidDigest):
        B3Digest.from_hex(text)


@pytest.mark.parametrize(
    "text",
    [
        "rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI=",  # missing prefix
        "b3:not base64!",
        "b3:" + base64.b64encode(bytes(20)).decode(),  # wrong length
        "sha256:rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI=",
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidDigest):
        B3Digest.parse(text)


def test_immutable_and_hashable() -> None:
    digest = B3Digest.of(b"a")
    with pytest.raises(AttributeError):
        digest.raw = bytes(32)  # type: ignore[misc]
    assert {digest: 1}[B3Digest.of(b"a")] == 1
    assert digest != digest.raw
