"""Directory services: the contract, its backends, and the graph checks they share.

``GrpcDirectoryService`` is imported on first use, so that importing the
package does not load gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tvix_castore.directoryservice.base import DirectoryPutter, DirectoryService
from tvix_castore.directoryservice.graph import Closure, ClosureVerifier, DirectoryGraph
from tvix_castore.directoryservice.memory import MemoryDirectoryService
from tvix_castore.directoryservice.sqlite import SqliteDirectoryService

if TYPE_CHECKING:
    from tvix_castore.directoryservice.grpc import GrpcDirectoryService

__all__ = [
    "Closure",
    "ClosureVerifier",
    "DirectoryGraph",
    "DirectoryPutter",
    "DirectoryService",
    "GrpcDirectoryService",
    "MemoryDirectoryService",
    "SqliteDirectoryService",
]


def __getattr__(name: str) -> Any:
    if name == "GrpcDirectoryService":
        from tvix_castore.directoryservice.grpc import GrpcDirectoryService

        return GrpcDirectoryService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
