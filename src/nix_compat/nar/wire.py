"""Byte-level building blocks shared by the NAR reader and writer."""

from __future__ import annotations

import struct

__all__ = [
    "MAX_NAME_LEN",
    "MAX_TARGET_LEN",
    "check_name",
    "check_target",
    "padding",
    "token",
]

MAX_NAME_LEN = 255
MAX_TARGET_LEN = 4095
_U64 = struct.Struct("<Q")


def padding(n: int) -> int:
    """Zero bytes that follow ``n`` bytes of string data."""
    return -n % 8


def token(*parts: bytes) -> bytes:
    """Encode a sequence of NAR strings (length, bytes, zero padding)."""
    out = bytearray()
    for p in parts:
        out += _U64.pack(len(p))
        out += p
        out += b"\0" * padding(len(p))
    return bytes(out)


def check_name(name: bytes) -> str | None:
    """Why ``name`` is not a valid directory entry name, or None if it is."""
    if not name:
        return "empty entry name"
    if len(name) > MAX_NAME_LEN:
        return f"entry name longer than {MAX_NAME_LEN} bytes"
    if name in (b".", b".."):
        return f"entry name {name!r} is not allowed"
    if b"/" in name or b"\0" in name:
        return f"entry name {name!r} contains '/' or NUL"
    return None


def check_target(target: bytes) -> str | None:
    """Why ``target`` is not a valid symlink target, or None if it is."""
    if not target:
        return "empty symlink target"
    if len(target) > MAX_TARGET_LEN:
        return f"symlink target longer than {MAX_TARGET_LEN} bytes"
    if b"\0" in target:
        return "symlink target contains NUL"
    return None


MAGIC = token(b"nix-archive-1")
OPEN_TYPE = token(b"(", b"type")
CLOSE = token(b")")
SYMLINK = token(b"symlink", b"target")
REGULAR = token(b"regular", b"contents")
EXECUTABLE = token(b"regular", b"executable", b"", b"contents")
DIRECTORY = token(b"directory")
ENTRY_NAME = token(b"entry", b"(", b"name")
NODE_OPEN_TYPE = token(b"node", b"(", b"type")
U64 = _U64
