"""Nix store paths: ``/nix/store/<nixbase32 digest20>-<name>``, and how Nix computes them.

>>> p = StorePath.from_basename("00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432")
>>> p.digest.hex(), p.name
('8a12321522fd91efbd60ebb2481af88580f61600', 'net-tools-1.60_p20170221182432')
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from nix_compat import nixbase32
from nix_compat.errors import Nixbase32Error, StorePathError
from nix_compat.nixhash import CAHash, CAKind, HashAlgo

__all__ = [
    "DIGEST_SIZE",
    "ENCODED_DIGEST_SIZE",
    "MAX_NAME_LEN",
    "STORE_DIR",
    "StorePath",
    "build_ca_path",
    "build_output_path",
    "build_text_path",
    "compress_hash",
    "placeholder",
    "validate_name",
]

STORE_DIR = "/nix/store"
DIGEST_SIZE = 20
ENCODED_DIGEST_SIZE = 32
MAX_NAME_LEN = 211
_NAME_RE = re.compile(r"[A-Za-z0-9+\-_?=.]+")


def validate_name(name: str | bytes) -> str:
    """Check a store-path name (1–211 chars of ``[A-Za-z0-9+-_?=.]``) and return it."""
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            raise StorePathError(f"store path name {name!r} is not ASCII") from None
    if not name:
        raise StorePathError("store path name is empty")
    if len(name) > MAX_NAME_LEN:
        raise StorePathError(f"store path name is {len(name)} bytes, longer than {MAX_NAME_LEN}")
    if not _NAME_RE.fullmatch(name):
        bad = next(c for c in name if not _NAME_RE.fullmatch(c))
        raise StorePathError(f"store path name {name!r} contains invalid character {bad!r}")
    return name


@dataclass(frozen=True, slots=True)
class StorePath:
    """A validated store path; orders like Nix (by the nixbase32 string)."""

    digest: bytes
    name: str

    def __post_init__(self) -> None:
        if len(self.digest) != DIGEST_SIZE:
            raise StorePathError(f"store path digest must be 20 bytes, got {len(self.digest)}")
        validate_name(self.name)

    @classmethod
    def from_basename(cls, basename: str | bytes) -> StorePath:
        """Parse ``<hash>-<name>`` with nothing before or after."""
        if isinstance(basename, bytes):
            try:
                basename = basename.decode("ascii")
            except UnicodeDecodeError:
                raise StorePathError(f"store path {basename!r} is not ASCII") from None
        if len(basename) < ENCODED_DIGEST_SIZE + 2:
            raise StorePathError(f"store path basename {basename!r} is too short")
        if basename[ENCODED_DIGEST_SIZE] != "-":
            raise StorePathError(f"store path basename {basename!r} lacks '-' after the hash")
        try:
            digest = nixbase32.decode(basename[:ENCODED_DIGEST_SIZE], DIGEST_SIZE)
        except Nixbase32Error as exc:
            raise StorePathError(f"store path basename {basename!r}: {exc}") from exc
        return cls(digest, validate_name(basename[ENCODED_DIGEST_SIZE + 1 :]))

    @classmethod
    def from_absolute_path(cls, path: str | bytes) -> StorePath:
        """Parse ``/nix/store/<hash>-<name>`` exactly."""
        if isinstance(path, bytes):
            path = path.decode("ascii", errors="replace")
        prefix = STORE_DIR + "/"
        if not path.startswith(prefix):
            raise StorePathError(f"{path!r} is not in {STORE_DIR}")
        return cls.from_basename(path[len(prefix) :])

    @classmethod
    def from_absolute_path_full(cls, path: str) -> tuple[StorePath, str]:
        """Split ``/nix/store/<hash>-<name>[/sub/path]`` into the path and its subpath."""
        prefix = STORE_DIR + "/"
        if not path.startswith(prefix):
            raise StorePathError(f"{path!r} is not in {STORE_DIR}")
        base, _, sub = path[len(prefix) :].partition("/")
        return cls.from_basename(base), sub.strip("/")

    @property
    def hash_part(self) -> str:
        """The 32-character nixbase32 digest."""
        return nixbase32.encode(self.digest)

    @property
    def basename(self) -> str:
        """``<hash>-<name>``."""
        return f"{self.hash_part}-{self.name}"

    @property
    def absolute(self) -> str:
        """``/nix/store/<hash>-<name>``."""
        return f"{STORE_DIR}/{self.basename}"

    def __str__(self) -> str:
        return self.absolute

    def _key(self) -> tuple[bytes, str]:
        return (self.digest[::-1], self.name)

    def __lt__(self, other: StorePath) -> bool:
        return self._key() < other._key()

    def __le__(self, other: StorePath) -> bool:
        return self._key() <= other._key()

    def __gt__(self, other: StorePath) -> bool:
        return self._key() > other._key()

    def __ge__(self, other: StorePath) -> bool:
        return self._key() >= other._key()


def compress_hash(data: bytes, size: int) -> bytes:
    """XOR-fold ``data`` into ``size`` bytes, as Nix does to shorten sha256."""
    out = bytearray(size)
    for i, b in enumerate(data):
        out[i % size] ^= b
    return bytes(out)


def _from_fingerprint(fingerprint: str, name: str) -> StorePath:
    digest = compress_hash(hashlib.sha256(fingerprint.encode()).digest(), DIGEST_SIZE)
    return StorePath(digest, validate_name(name))


def _refs(references: Iterable[StorePath]) -> str:
    return "".join(f":{r.absolute}" for r in references)


def build_text_path(
    name: str,
    content: bytes | None = None,
    references: Iterable[StorePath] = (),
    *,
    sha256: bytes | None = None,
) -> StorePath:
    """Path of a text file (``builtins.toFile``, ``.drv``) by content or its sha256."""
    if sha256 is None:
        if content is None:
            raise StorePathError("build_text_path needs content or sha256")
        sha256 = hashlib.sha256(content).digest()
    return _from_fingerprint(
        f"text{_refs(references)}:sha256:{sha256.hex()}:{STORE_DIR}:{name}", name
    )


def build_ca_path(
    name: str,
    ca: CAHash,
    references: Iterable[StorePath] = (),
    self_reference: bool = False,
) -> StorePath:
    """Path of a content-addressed object (``nix-store --add``, fixed outputs, text).

    References are allowed for text and NAR-sha256 ("source") addresses only;
    a self reference only for the latter.
    """
    refs = list(references)
    if ca.kind is CAKind.TEXT:
        if self_reference:
            raise StorePathError("text paths cannot refer to themselves")
        return build_text_path(name, references=refs, sha256=ca.hash.digest)
    if ca.kind is CAKind.NAR and ca.hash.algo is HashAlgo.SHA256:
        tail = ":self" if self_reference else ""
        return _from_fingerprint(
            f"source{_refs(refs)}{tail}:sha256:{ca.hash.digest.hex()}:{STORE_DIR}:{name}", name
        )
    if refs or self_reference:
        raise StorePathError("fixed-output paths other than NAR sha256 cannot have references")
    rec = "r:" if ca.kind is CAKind.NAR else ""
    inner = hashlib.sha256(
        f"fixed:out:{rec}{ca.hash.algo.value}:{ca.hash.digest.hex()}:".encode()
    ).digest()
    return _from_fingerprint(f"output:out:sha256:{inner.hex()}:{STORE_DIR}:{name}", name)


def build_output_path(drv_hash: bytes, output_name: str, name: str) -> StorePath:
    """Path of an input-addressed derivation output (``name`` already includes any ``-out``)."""
    return _from_fingerprint(
        f"output:{output_name}:sha256:{drv_hash.hex()}:{STORE_DIR}:{name}", name
    )


def placeholder(output_name: str) -> str:
    """The placeholder string Nix substitutes for an output's path."""
    return "/" + nixbase32.encode(hashlib.sha256(f"nix-output:{output_name}".encode()).digest())
