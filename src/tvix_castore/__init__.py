"""The content-addressed core: blobs, directories and their services.

Knows nothing of Nix: store paths, NARs and narinfos live in ``nix_compat`` and
``tvix_store``. The value types here are validated and immutable; protobuf
messages (``tvix_castore.protos``) are converted at the edges only::

    >>> from tvix_castore import Directory, FileNode, B3Digest
    >>> blob = B3Digest.of(b"Hello World!")
    >>> d = Directory(files=(FileNode(b"hello.txt", blob, 12),))
    >>> [node.name for node in d.nodes()]
    [b'hello.txt']
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tvix_castore.lazy import lazy_attributes

if TYPE_CHECKING:
    from tvix_castore.digests import B3_DIGEST_LENGTH, EMPTY_DIGEST, B3Digest
    from tvix_castore.directoryservice.graph import Closure, ClosureVerifier, DirectoryGraph
    from tvix_castore.errors import (
        CastoreError,
        ChecksumMismatch,
        ClosureRequired,
        CompositionError,
        ConfigError,
        DataCorruption,
        DirectoryError,
        DirectoryErrorKind,
        DirectoryGraphError,
        IngestionError,
        InvalidDigest,
        NodeError,
        NotFound,
        StorageError,
        StorageFull,
        StorageUnavailable,
        UnknownScheme,
        ValidationError,
        os_storage_error,
    )
    from tvix_castore.nodes import (
        DEFAULT_SIZE_MODE,
        MAX_DIRECTORY_BYTES,
        MAX_NAME_LENGTH,
        MAX_SYMLINK_TARGET_LENGTH,
        U64_MAX,
        Directory,
        DirectoryNode,
        FileNode,
        NameRule,
        Node,
        SizeMode,
        SymlinkNode,
        check_directory_size,
        node_from_proto,
        node_to_proto,
        validate_name,
    )

# Names are resolved on first use, so importing one submodule (digests, errors)
# does not load them all (the CLI's start-up time counts).
_LAZY = {
    "B3_DIGEST_LENGTH": "tvix_castore.digests",
    "EMPTY_DIGEST": "tvix_castore.digests",
    "B3Digest": "tvix_castore.digests",
    "Closure": "tvix_castore.directoryservice.graph",
    "ClosureVerifier": "tvix_castore.directoryservice.graph",
    "DirectoryGraph": "tvix_castore.directoryservice.graph",
    "CastoreError": "tvix_castore.errors",
    "ChecksumMismatch": "tvix_castore.errors",
    "ClosureRequired": "tvix_castore.errors",
    "CompositionError": "tvix_castore.errors",
    "ConfigError": "tvix_castore.errors",
    "DataCorruption": "tvix_castore.errors",
    "DirectoryError": "tvix_castore.errors",
    "DirectoryErrorKind": "tvix_castore.errors",
    "DirectoryGraphError": "tvix_castore.errors",
    "IngestionError": "tvix_castore.errors",
    "InvalidDigest": "tvix_castore.errors",
    "NodeError": "tvix_castore.errors",
    "NotFound": "tvix_castore.errors",
    "StorageError": "tvix_castore.errors",
    "StorageFull": "tvix_castore.errors",
    "StorageUnavailable": "tvix_castore.errors",
    "os_storage_error": "tvix_castore.errors",
    "UnknownScheme": "tvix_castore.errors",
    "ValidationError": "tvix_castore.errors",
    "DEFAULT_SIZE_MODE": "tvix_castore.nodes",
    "MAX_DIRECTORY_BYTES": "tvix_castore.nodes",
    "MAX_NAME_LENGTH": "tvix_castore.nodes",
    "MAX_SYMLINK_TARGET_LENGTH": "tvix_castore.nodes",
    "U64_MAX": "tvix_castore.nodes",
    "Directory": "tvix_castore.nodes",
    "DirectoryNode": "tvix_castore.nodes",
    "FileNode": "tvix_castore.nodes",
    "NameRule": "tvix_castore.nodes",
    "Node": "tvix_castore.nodes",
    "SizeMode": "tvix_castore.nodes",
    "SymlinkNode": "tvix_castore.nodes",
    "check_directory_size": "tvix_castore.nodes",
    "node_from_proto": "tvix_castore.nodes",
    "node_to_proto": "tvix_castore.nodes",
    "validate_name": "tvix_castore.nodes",
}

__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "B3_DIGEST_LENGTH",
    "DEFAULT_SIZE_MODE",
    "EMPTY_DIGEST",
    "MAX_DIRECTORY_BYTES",
    "MAX_NAME_LENGTH",
    "MAX_SYMLINK_TARGET_LENGTH",
    "U64_MAX",
    "B3Digest",
    "CastoreError",
    "ChecksumMismatch",
    "Closure",
    "ClosureRequired",
    "ClosureVerifier",
    "CompositionError",
    "ConfigError",
    "DataCorruption",
    "Directory",
    "DirectoryError",
    "DirectoryErrorKind",
    "DirectoryGraph",
    "DirectoryGraphError",
    "DirectoryNode",
    "FileNode",
    "IngestionError",
    "InvalidDigest",
    "NameRule",
    "Node",
    "NodeError",
    "NotFound",
    "SizeMode",
    "StorageError",
    "StorageFull",
    "StorageUnavailable",
    "SymlinkNode",
    "UnknownScheme",
    "ValidationError",
    "check_directory_size",
    "node_from_proto",
    "node_to_proto",
    "os_storage_error",
    "validate_name",
]
