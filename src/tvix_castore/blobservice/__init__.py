"""Blob services: the contract and its backends."""

from tvix_castore.blobservice.base import (
    BlobReader,
    BlobService,
    BlobWriter,
    BytesBlobReader,
    ChunkMeta,
)
from tvix_castore.blobservice.memory import MemoryBlobService
from tvix_castore.blobservice.objectstore import ChunkedReader, ObjectStoreBlobService

__all__ = [
    "BlobReader",
    "BlobService",
    "BlobWriter",
    "BytesBlobReader",
    "ChunkMeta",
    "ChunkedReader",
    "MemoryBlobService",
    "ObjectStoreBlobService",
]
