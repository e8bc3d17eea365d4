"""Nix's base32: alphabet without ``e o u t``, least-significant group last.

>>> encode(bytes.fromhex("1f"))
'0z'
>>> decode("0z").hex()
'1f'
"""

from __future__ import annotations

from nix_compat.errors import Nixbase32Error

__all__ = ["ALPHABET", "decode", "decode_len", "encode", "encode_len", "is_valid"]

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_VALUE = {c: i for i, c in enumerate(ALPHABET)}


def encode_len(n: int) -> int:
    """Characters needed for ``n`` bytes: ``ceil(8n/5)``."""
    return (n * 8 + 4) // 5


def decode_len(length: int) -> int:
    """Bytes held by ``length`` characters: ``floor(5l/8)``."""
    return length * 5 // 8


def encode(data: bytes) -> str:
    """Encode bytes as nixbase32.

    The input is read as one little-endian integer; groups of five bits are
    written most significant first.
    """
    n = int.from_bytes(data, "little")
    length = encode_len(len(data))
    out = [""] * length
    for k in range(length - 1, -1, -1):
        out[k] = ALPHABET[n & 31]
        n >>= 5
    return "".join(out)


def decode(text: str | bytes, expected_len: int | None = None) -> bytes:
    """Decode nixbase32 text; ``expected_len`` pins the output length.

    Raises:
        Nixbase32Error: bad character, impossible length, or bits set beyond
            the last byte.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError as exc:
            raise Nixbase32Error("nixbase32 must be ASCII") from exc
    out_len = decode_len(len(text))
    if encode_len(out_len) != len(text):
        raise Nixbase32Error(f"invalid nixbase32 length {len(text)}")
    if expected_len is not None and out_len != expected_len:
        raise Nixbase32Error(
            f"nixbase32 of length {len(text)} holds {out_len} bytes, expected {expected_len}"
        )
    n = 0
    for c in text:
        v = _VALUE.get(c)
        if v is None:
            raise Nixbase32Error(f"invalid nixbase32 character {c!r}")
        n = (n << 5) | v
    if n >> (out_len * 8):
        raise Nixbase32Error("nixbase32 has non-zero bits beyond the last byte")
    return n.to_bytes(out_len, "little")


def is_valid(text: str, expected_len: int | None = None) -> bool:
    """Whether ``text`` decodes (to ``expected_len`` bytes, if given)."""
    try:
        decode(text, expected_len)
    except Nixbase32Error:
        return False
    return True
