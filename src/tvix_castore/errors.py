"""Every error tvix_castore raises, under one root.

Callers tell misuse from storage failure by class, and the gRPC/HTTP edges map
classes to status codes in one table each::

    CastoreError
    ├── ValidationError            input breaks a rule         -> INVALID_ARGUMENT
    │   ├── InvalidDigest          digest of the wrong length or encoding
    │   ├── DirectoryError         a Directory breaks B §2.3 (carries kind, name)
    │   │   └── NodeError          a single (root) node is invalid
    │   └── DirectoryGraphError    an uploaded closure is not a valid graph
    │       └── ClosureRequired    a Directory with subdirectories put alone, where
    │                              only whole closures can be stored
    ├── NotFound                   something required is absent -> NOT_FOUND
    ├── IngestionError             a local tree cannot be ingested (names the path)
    ├── StorageError               a backend failed            -> INTERNAL
    │   ├── DataCorruption         bytes don't match their key -> DATA_LOSS
    │   │   └── ChecksumMismatch   ... detected by re-hashing
    │   ├── StorageUnavailable     backend unreachable         -> UNAVAILABLE
    │   └── StorageFull            no space left on device     -> RESOURCE_EXHAUSTED
    └── ConfigError                bad service URL or composition
        ├── UnknownScheme          no backend registered for a URL scheme
        └── CompositionError       bad or cyclic composition graph

Lookups of absent data return ``None`` rather than raising ``NotFound``;
``NotFound`` is for absences that make an operation fail (a missing chunk in
the middle of a blob, a missing child during a closure walk).
"""

from __future__ import annotations

import enum
import errno
from pathlib import Path

__all__ = [
    "CastoreError",
    "ChecksumMismatch",
    "ClosureRequired",
    "CompositionError",
    "ConfigError",
    "DataCorruption",
    "DirectoryError",
    "DirectoryErrorKind",
    "DirectoryGraphError",
    "IngestionError",
    "InvalidDigest",
    "NodeError",
    "NotFound",
    "StorageError",
    "StorageFull",
    "StorageUnavailable",
    "UnknownScheme",
    "ValidationError",
    "os_storage_error",
    "show_name",
]


class CastoreError(Exception):
    """Root of every error raised by tvix_castore."""


class ValidationError(CastoreError):
    """Input (from a caller or the wire) breaks a rule; nothing was changed."""


class InvalidDigest(ValidationError):
    """A digest has the wrong length (or cannot be decoded at all)."""

    def __init__(self, message: str, *, length: int | None = None) -> None:
        super().__init__(message)
        #: Length in bytes of the rejected digest, when it decoded at all.
        self.length = length


class DirectoryErrorKind(enum.Enum):
    """Which rule of B §2.3 was broken; the value is the human wording."""

    WRONG_SORTING = "wrong sorting"
    DUPLICATE_NAME = "duplicate name"
    INVALID_NAME = "invalid name"
    NAME_TOO_LONG = "name too long"
    INVALID_DIGEST = "invalid digest"
    INVALID_SIZE = "invalid size"
    INVALID_SYMLINK_TARGET = "invalid symlink target"
    SYMLINK_TARGET_TOO_LONG = "symlink target too long"
    SIZE_OVERFLOW = "size overflow"
    NO_NODE_SET = "no node set"
    UNEXPECTED_NAME = "root node must not have a name"
    TOO_LARGE = "directory too large"


def show_name(name: bytes) -> str:
    """Render a raw name for messages: quoted, with non-printables escaped."""
    return repr(name)[1:]


class DirectoryError(ValidationError):
    """A Directory (or one of its entries) is invalid.

    ``kind`` says which rule, ``name`` which entry (``None`` when the problem
    is not tied to one entry).
    """

    def __init__(self, kind: DirectoryErrorKind, name: bytes | None, detail: str = "") -> None:
        self.kind = kind
        self.name = name
        self.detail = detail
        message = kind.value if name is None else f"{show_name(name)}: {kind.value}"
        super().__init__(f"{message}: {detail}" if detail else message)


class NodeError(DirectoryError):
    """A node is invalid on its own (outside of, or before, any Directory rule)."""


class DirectoryGraphError(ValidationError):
    """A Directory closure upload is not a connected, consistent graph (B §2.6)."""


class ClosureRequired(DirectoryGraphError):
    """A Directory with subdirectories was put alone where only whole closures are stored.

    (The object store's B §7.3 layout keeps closures by their root.) Upload it
    with its closure, through ``put_multiple_start()``.
    """


class NotFound(CastoreError):
    """Something an operation needs does not exist."""


class IngestionError(CastoreError):
    """A filesystem tree cannot be ingested (special file, unreadable, changed)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class StorageError(CastoreError):
    """A storage backend failed; the cause is chained (``raise ... from exc``)."""


class DataCorruption(StorageError):
    """Stored or received data does not match what was asked for."""


class ChecksumMismatch(DataCorruption):
    """Bytes re-hashed to a different digest than the one requested."""


class StorageUnavailable(StorageError):
    """A backend could not be reached; retrying later may help."""


class StorageFull(StorageError):
    """The filesystem (or quota) holding the store is full; nothing was written.

    Reads of what is stored keep working; writes can succeed again once space
    is freed.
    """

    def __init__(self, what: str, where: str | Path | None, *, message: str | None = None) -> None:
        where_text = f": {where}" if where is not None else ""
        super().__init__(message or f"{what}: no space left on device{where_text}")
        #: The store file or directory that could not grow.
        self.where = where


_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def os_storage_error(what: str, exc: OSError, where: str | Path | None) -> StorageError:
    """Our error for a failed filesystem write: :class:`StorageFull` if out of space."""
    if exc.errno in _NO_SPACE:
        return StorageFull(what, where)
    return StorageError(f"{what}: {exc}")


class ConfigError(CastoreError):
    """A service address or composition is invalid."""


class UnknownScheme(ConfigError):
    """No backend is registered for a URL scheme."""


class CompositionError(ConfigError):
    """A composition graph is invalid (unknown reference, cycle, wrong kind)."""
