"""Directory services and the graph checks every backend and client shares."""

from tvix_castore.directoryservice.graph import Closure, ClosureVerifier, DirectoryGraph

__all__ = ["Closure", "ClosureVerifier", "DirectoryGraph"]
