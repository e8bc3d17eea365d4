"""Nix hash strings (``sha256:…``, SRI) and content-address (CA) descriptions.

>>> h = NixHash.parse("sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73")
>>> h.sri()
'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
from dataclasses import dataclass

from nix_compat import nixbase32
from nix_compat.errors import Nixbase32Error, NixHashError

__all__ = ["CAHash", "CAKind", "HashAlgo", "NixHash"]


class HashAlgo(enum.Enum):
    """A hash algorithm Nix knows, valued by its name."""

    MD5 = "md5"
    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA512 = "sha512"

    @property
    def digest_size(self) -> int:
        """Length of a digest in bytes."""
        return _DIGEST_SIZE[self]

    @classmethod
    def from_name(cls, name: str) -> HashAlgo:
        """Parse an algorithm name such as ``sha256``."""
        try:
            return cls(name)
        except ValueError:
            raise NixHashError(f"unknown hash algorithm {name!r}") from None

    def new(self) -> hashlib._Hash:
        """A fresh hashlib object for this algorithm."""
        return hashlib.new(self.value)


_DIGEST_SIZE = {HashAlgo.MD5: 16, HashAlgo.SHA1: 20, HashAlgo.SHA256: 32, HashAlgo.SHA512: 64}


def _decode_digest(algo: HashAlgo, text: str) -> bytes:
    """Decode a digest by its length: hex, then nixbase32, then padded base64."""
    size = algo.digest_size
    try:
        if len(text) == size * 2:
            return bytes.fromhex(text)
        if len(text) == nixbase32.encode_len(size):
            return nixbase32.decode(text, size)
        if len(text) == (size + 2) // 3 * 4:
            raw = base64.b64decode(text, validate=True)
            if len(raw) == size:
                return raw
    except (ValueError, binascii.Error, Nixbase32Error) as exc:
        raise NixHashError(f"invalid {algo.value} digest {text!r}: {exc}") from exc
    raise NixHashError(f"invalid {algo.value} digest {text!r}: wrong length {len(text)}")


@dataclass(frozen=True, slots=True)
class NixHash:
    """A digest together with its algorithm."""

    algo: HashAlgo
    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != self.algo.digest_size:
            raise NixHashError(
                f"{self.algo.value} digest must be {self.algo.digest_size} bytes,"
                f" got {len(self.digest)}"
            )

    @classmethod
    def parse(cls, text: str, algo: HashAlgo | None = None) -> NixHash:
        """Parse ``algo:digest`` (hex/nixbase32/base64), SRI, or a bare digest.

        A bare digest needs ``algo``; with a prefix, ``algo`` (if given) must agree.
        """
        if ":" in text:
            name, _, rest = text.partition(":")
            parsed = HashAlgo.from_name(name)
            result = cls(parsed, _decode_digest(parsed, rest))
        elif "-" in text and text.partition("-")[0] in {a.value for a in HashAlgo}:
            result = cls._parse_sri(text)
        elif algo is not None:
            result = cls(algo, _decode_digest(algo, text))
        else:
            raise NixHashError(f"hash {text!r} has no algorithm")
        if algo is not None and result.algo is not algo:
            raise NixHashError(f"expected a {algo.value} hash, got {result.algo.value}")
        return result

    @classmethod
    def _parse_sri(cls, text: str) -> NixHash:
        name, _, body = text.partition("-")
        algo = HashAlgo.from_name(name)
        want = (algo.digest_size + 2) // 3 * 4
        body = body[:want]
        body += "=" * (-len(body) % 4)
        try:
            raw = base64.b64decode(body, validate=True)
        except binascii.Error as exc:
            raise NixHashError(f"invalid SRI hash {text!r}") from exc
        return cls(algo, raw)

    def nix32(self) -> str:
        """Render as ``algo:<nixbase32>``, the form narinfos use."""
        return f"{self.algo.value}:{nixbase32.encode(self.digest)}"

    def hex(self) -> str:
        """Render as ``algo:<hex>``."""
        return f"{self.algo.value}:{self.digest.hex()}"

    def base64(self) -> str:
        """Render as ``algo:<base64>``."""
        return f"{self.algo.value}:{base64.b64encode(self.digest).decode()}"

    def sri(self) -> str:
        """Render as SRI: ``algo-<base64>``."""
        return f"{self.algo.value}-{base64.b64encode(self.digest).decode()}"

    def __str__(self) -> str:
        return self.nix32()


class CAKind(enum.Enum):
    """How a content-addressed path was hashed."""

    NAR = "fixed:r"  # recursive (NAR serialisation)
    FLAT = "fixed"  # the file's bytes
    TEXT = "text"  # text file with references (sha256 only)


@dataclass(frozen=True, slots=True)
class CAHash:
    """A content address as in the narinfo ``CA:`` field."""

    kind: CAKind
    hash: NixHash

    def __post_init__(self) -> None:
        if self.kind is CAKind.TEXT and self.hash.algo is not HashAlgo.SHA256:
            raise NixHashError("text content addresses must use sha256")

    @classmethod
    def parse(cls, text: str) -> CAHash:
        """Parse ``fixed:r:<algo>:<nb32>``, ``fixed:<algo>:<nb32>`` or ``text:sha256:<nb32>``."""
        if text.startswith("fixed:r:"):
            kind, rest = CAKind.NAR, text[len("fixed:r:") :]
        elif text.startswith("fixed:"):
            kind, rest = CAKind.FLAT, text[len("fixed:") :]
        elif text.startswith("text:"):
            kind, rest = CAKind.TEXT, text[len("text:") :]
        else:
            raise NixHashError(f"unknown content address {text!r}")
        name, sep, digest = rest.partition(":")
        if not sep:
            raise NixHashError(f"content address {text!r} lacks a digest")
        algo = HashAlgo.from_name(name)
        try:
            raw = nixbase32.decode(digest, algo.digest_size)
        except Nixbase32Error as exc:
            raise NixHashError(f"content address {text!r}: {exc}") from exc
        return cls(kind, NixHash(algo, raw))

    def render(self) -> str:
        """The ``CA:`` text form (digest in nixbase32)."""
        return f"{self.kind.value}:{self.hash.nix32()}"

    def __str__(self) -> str:
        return self.render()
