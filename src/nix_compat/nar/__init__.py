"""The Nix ARchive format: a canonical, streaming serialisation of a file tree."""

from nix_compat.nar.reader import (
    NarDirectory,
    NarDirectoryEnd,
    NarEvent,
    NarFile,
    NarReader,
    NarSymlink,
    read_nar,
)
from nix_compat.nar.writer import NarWriter, dump_path, nar_hash_path

__all__ = [
    "NarDirectory",
    "NarDirectoryEnd",
    "NarEvent",
    "NarFile",
    "NarReader",
    "NarSymlink",
    "NarWriter",
    "dump_path",
    "nar_hash_path",
    "read_nar",
]
