"""Nix signing keys and narinfo signatures (ed25519, strict verification).

Text forms: a signature or public key is ``<name>:<base64>``; a secret key (as
made by ``nix-store --generate-binary-cache-key``) is ``<name>:<base64(seed ‖
public key)>``.

>>> key = SigningKey.generate("test-1")
>>> sig = key.sign("1;/nix/store/...")
>>> key.verifying_key().verify("1;/nix/store/...", sig)
True
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass

from nix_compat.errors import SigningError

# pynacl (libsodium) is imported where keys are used: most commands never
# sign or verify, and start-up time counts for every CLI call.

__all__ = ["Signature", "SigningKey", "VerifyingKey", "validate_key_name"]


def validate_key_name(name: str) -> str:
    """Check a key name: non-empty, alphanumeric, ``-`` or ``.`` only."""
    if not name or not all(c.isalnum() or c in "-." for c in name):
        raise SigningError(f"invalid key name {name!r}")
    return name


def _split(text: str, raw_len: int, what: str) -> tuple[str, bytes]:
    name, sep, body = text.partition(":")
    if not sep:
        raise SigningError(f"{what} {text!r} lacks 'name:'")
    validate_key_name(name)
    want = (raw_len + 2) // 3 * 4
    if len(body) != want:
        raise SigningError(f"{what} for {name!r} must be {want} base64 characters, got {len(body)}")
    try:
        raw = base64.b64decode(body, validate=True)
    except binascii.Error as exc:
        raise SigningError(f"{what} for {name!r} is not valid base64") from exc
    if len(raw) != raw_len:
        raise SigningError(f"{what} for {name!r} must be {raw_len} bytes")
    return name, raw


@dataclass(frozen=True, slots=True)
class Signature:
    """A named ed25519 signature, as in a narinfo ``Sig:`` line."""

    name: str
    data: bytes

    def __post_init__(self) -> None:
        validate_key_name(self.name)
        if len(self.data) != 64:
            raise SigningError(f"signature must be 64 bytes, got {len(self.data)}")

    @classmethod
    def parse(cls, text: str) -> Signature:
        """Parse ``<name>:<base64 of 64 bytes>``."""
        return cls(*_split(text, 64, "signature"))

    def render(self) -> str:
        """The ``<name>:<base64>`` text form."""
        return f"{self.name}:{base64.b64encode(self.data).decode()}"

    def __str__(self) -> str:
        return self.render()


@dataclass(frozen=True, slots=True)
class VerifyingKey:
    """A trusted public key (``trusted-public-keys`` entry)."""

    name: str
    key: bytes

    def __post_init__(self) -> None:
        import nacl.bindings

        validate_key_name(self.name)
        if len(self.key) != 32:
            raise SigningError("public key must be 32 bytes")
        if not nacl.bindings.crypto_core_ed25519_is_valid_point(self.key):
            raise SigningError(f"public key {self.name!r} is not a valid ed25519 point")

    @classmethod
    def parse(cls, text: str) -> VerifyingKey:
        """Parse ``<name>:<base64 of 32 bytes>`` (surrounding whitespace ignored)."""
        return cls(*_split(text.strip(), 32, "public key"))

    def render(self) -> str:
        """The ``<name>:<base64>`` text form."""
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def __str__(self) -> str:
        return self.render()

    def verify_raw(self, message: str | bytes, signature: bytes) -> bool:
        """Strict ed25519 check of ``signature`` over ``message``, ignoring names."""
        import nacl.exceptions
        import nacl.signing

        if isinstance(message, str):
            message = message.encode()
        try:
            nacl.signing.VerifyKey(self.key).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            return False
        return True

    def verify(self, message: str | bytes, signature: Signature) -> bool:
        """Whether ``signature`` is by this key: same name and a valid signature."""
        return signature.name == self.name and self.verify_raw(message, signature.data)


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A Nix secret key: 32-byte seed followed by its 32-byte public key."""

    name: str
    secret: bytes

    def __post_init__(self) -> None:
        import nacl.signing

        validate_key_name(self.name)
        if len(self.secret) != 64:
            raise SigningError("secret key must be 64 bytes")
        derived = bytes(nacl.signing.SigningKey(self.secret[:32]).verify_key)
        if derived != self.secret[32:]:
            raise SigningError(f"secret key {self.name!r}: public half does not match the seed")

    @classmethod
    def parse(cls, text: str) -> SigningKey:
        """Parse ``<name>:<base64 of 64 bytes>`` (surrounding whitespace ignored)."""
        return cls(*_split(text.strip(), 64, "secret key"))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SigningKey:
        """Read a key file written by ``nix-store --generate-binary-cache-key``."""
        with open(path, encoding="utf-8") as f:
            return cls.parse(f.read())

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        """A fresh random key."""
        import nacl.signing

        sk = nacl.signing.SigningKey.generate()
        return cls(name, bytes(sk) + bytes(sk.verify_key))

    def render(self) -> str:
        """The ``<name>:<base64>`` secret-key text form."""
        return f"{self.name}:{base64.b64encode(self.secret).decode()}"

    def verifying_key(self) -> VerifyingKey:
        """The public half."""
        return VerifyingKey(self.name, self.secret[32:])

    def sign(self, message: str | bytes) -> Signature:
        """Sign ``message`` (a narinfo fingerprint)."""
        import nacl.signing

        if isinstance(message, str):
            message = message.encode()
        sig = nacl.signing.SigningKey(self.secret[:32]).sign(message).signature
        return Signature(self.name, bytes(sig))
