"""BLAKE3 digests, the keys of everything in castore (B §2.1).

A ``B3Digest`` is always exactly 32 bytes, so code holding one never
re-checks lengths; raw ``bytes`` from the wire become digests at the edge::

    >>> d = B3Digest.of(b"")
    >>> str(d)
    'b3:rxNJufX5oaagQE3qNtzJSZvLJcmtwRK3zJqTyuQfMmI='
    >>> B3Digest.parse(str(d)) == d
    True
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Final

import blake3

from tvix_castore.errors import InvalidDigest

__all__ = ["B3_DIGEST_LENGTH", "EMPTY_DIGEST", "B3Digest"]

B3_DIGEST_LENGTH: Final = 32
_PREFIX: Final = "b3:"
# Below this, spawning hashing threads costs more than it saves.
_THREADED_MIN: Final = 1 << 20
_hash_threads = blake3.blake3.AUTO


def hash_threads() -> int:
    """``max_threads`` for hashing large inputs: AUTO, or 1 in forked workers."""
    return _hash_threads


def after_fork_in_child() -> None:
    """Call first thing in a forked worker: hash on this thread only from now on.

    blake3's thread pool does not survive a fork: a worker whose parent had
    started it would wait forever for threads that do not exist in it.
    """
    global _hash_threads
    _hash_threads = 1


@dataclass(frozen=True, slots=True, order=True)
class B3Digest:
    """A 32-byte BLAKE3-256 digest; ordered bytewise, hashable, immutable."""

    raw: bytes
    """The 32 digest bytes."""

    def __post_init__(self) -> None:
        raw = self.raw
        if type(raw) is not bytes:
            raw = bytes(raw)
            object.__setattr__(self, "raw", raw)
        if len(raw) != B3_DIGEST_LENGTH:
            raise InvalidDigest(f"invalid digest length {len(raw)}", length=len(raw))

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> B3Digest:
        """Hash ``data`` (multi-threaded for large inputs)."""
        threads = _hash_threads if len(data) >= _THREADED_MIN else 1
        return cls(blake3.blake3(data, max_threads=threads).digest())

    @classmethod
    def from_hex(cls, text: str) -> B3Digest:
        """Parse 64 hex digits (either case)."""
        try:
            raw = bytes.fromhex(text)
        except ValueError as exc:
            raise InvalidDigest(f"invalid hex digest {text!r}") from exc
        return cls(raw)

    @classmethod
    def from_b64(cls, text: str) -> B3Digest:
        """Parse standard, padded base64 (as in ``b3:`` strings and proto JSON)."""
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidDigest(f"invalid base64 digest {text!r}") from exc
        return cls(raw)

    @classmethod
    def parse(cls, text: str) -> B3Digest:
        """Parse the display form ``b3:<base64>``."""
        if not text.startswith(_PREFIX):
            raise InvalidDigest(f"digest {text!r} does not start with {_PREFIX!r}")
        return cls.from_b64(text.removeprefix(_PREFIX))

    def hex(self) -> str:
        """Lowercase hex, as used in object-store keys."""
        return self.raw.hex()

    def b64(self) -> str:
        """Standard base64 with padding."""
        return base64.b64encode(self.raw).decode("ascii")

    def __reduce__(self) -> tuple[type[B3Digest], tuple[bytes]]:
        # The dataclass default (``__setstate__`` walking ``fields()``) made
        # unpickling forked workers' results a visible cost of an import.
        return (B3Digest, (self.raw,))

    def __bytes__(self) -> bytes:
        return self.raw

    # Digests are dict keys everywhere (closures, prefetch batches): hash and
    # compare the bytes directly (bytes cache their hash) instead of the
    # generated tuple-based methods.
    def __hash__(self) -> int:
        return hash(self.raw)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is B3Digest:
            return self.raw == other.raw
        return NotImplemented

    def __str__(self) -> str:
        return _PREFIX + self.b64()

    def __repr__(self) -> str:
        return f"B3Digest({str(self)!r})"


EMPTY_DIGEST: Final = B3Digest.of(b"")
"""Digest of the empty blob, which is also the digest of the empty Directory."""
