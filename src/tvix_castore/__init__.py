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

from tvix_castore.digests import B3_DIGEST_LENGTH, EMPTY_DIGEST, B3Digest
from tvix_castore.directoryservice.graph import Closure, ClosureVerifier, DirectoryGraph
from tvix_castore.errors import (
    CastoreError,
    ChecksumMismatch,
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
    StorageUnavailable,
    UnknownScheme,
    ValidationError,
)
from tvix_castore.nodes import (
    DEFAULT_SIZE_MODE,
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
    node_from_proto,
    node_to_proto,
    validate_name,
)

__all__ = [
    "B3_DIGEST_LENGTH",
    "DEFAULT_SIZE_MODE",
    "EMPTY_DIGEST",
    "MAX_NAME_LENGTH",
    "MAX_SYMLINK_TARGET_LENGTH",
    "U64_MAX",
    "B3Digest",
    "CastoreError",
    "ChecksumMismatch",
    "Closure",
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
    "StorageUnavailable",
    "SymlinkNode",
    "UnknownScheme",
    "ValidationError",
    "node_from_proto",
    "node_to_proto",
    "validate_name",
]
