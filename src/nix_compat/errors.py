"""Errors raised by the Nix format layer.

Tree::

    NixCompatError
    ├── Nixbase32Error          invalid nixbase32 text
    ├── StorePathError          invalid store path / name
    ├── NixHashError            invalid hash or CA string
    ├── NarError                invalid NAR stream (carries the byte offset)
    ├── NarWriteError           a tree that cannot be written as a NAR
    ├── NarInfoError            invalid narinfo text (carries the line)
    └── SigningError            invalid key or signature text
"""

from __future__ import annotations

__all__ = [
    "NarError",
    "NarInfoError",
    "NarWriteError",
    "NixCompatError",
    "NixHashError",
    "Nixbase32Error",
    "SigningError",
    "StorePathError",
]


class NixCompatError(ValueError):
    """Root of every error raised by ``nix_compat``."""


class Nixbase32Error(NixCompatError):
    """Text that is not valid nixbase32 for the expected length."""


class StorePathError(NixCompatError):
    """A store path, basename or name that Nix would reject."""


class NixHashError(NixCompatError):
    """A Nix hash, SRI or content-address string that does not parse."""


class NarError(NixCompatError):
    """A NAR stream that violates the format; ``offset`` is where it went wrong."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at byte {offset})")
        self.offset = offset


class NarWriteError(NixCompatError):
    """A filesystem object or entry that a NAR cannot represent."""


class NarInfoError(NixCompatError):
    """A narinfo document that does not parse."""


class SigningError(NixCompatError):
    """A key, signature or signature line that does not parse."""
