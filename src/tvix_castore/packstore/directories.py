"""Directories kept in the packs: DIRECTORIES frames, indexed like blobs.

A Directory's digest is the BLAKE3 of its encoding, so it is stored exactly
as a blob is: a member of a (zstd-compressed) frame, found through the one
lookup (:meth:`PackReader.locate`), verified by hashing on every read.
Keeping them in the packs instead of a SQLite table of their own stores each
Directory once (a journal beside a table kept them twice: for an unpacked
Django wheel, 2,454 Directories took 0.5 MB of table plus 0.3 MB of journal),
and the index can be rebuilt from the packs alone.

Since both are content-addressed by BLAKE3, Directories and blobs share one
namespace: the bytes stored under a digest are the bytes that hash to it.
A digest that names a blob which does not decode as a Directory is, for this
service, absent.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService, closure_by_levels
from tvix_castore.directoryservice.sqlite import SqliteDirectoryService
from tvix_castore.errors import ValidationError
from tvix_castore.lazy import lazy_module
from tvix_castore.nodes import Directory
from tvix_castore.packstore.format import Kind
from tvix_castore.packstore.reader import Member
from tvix_castore.packstore.service import PackBlobService

if TYPE_CHECKING:
    import asyncio
else:
    asyncio = lazy_module("asyncio")  # not needed to write a NAR from its plans

__all__ = ["PackDirectoryService"]

_log = logging.getLogger(__name__)


class PackDirectoryService(DirectoryService):
    """Directories as members of DIRECTORIES frames of a :class:`PackBlobService`.

    Closing it closes the blob service only if it ``owns`` it.
    """

    def __init__(
        self,
        blobs: PackBlobService,
        *,
        owns: bool = False,
        legacy: SqliteDirectoryService | None = None,
    ) -> None:
        self.blobs = blobs
        self._owns = owns
        # Where older releases kept Directories (a SQLite table): read until
        # compaction has moved them into the packs; never written.
        self.legacy = legacy

    def get_many_sync(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        """The stored Directories among ``digests``, each verified (blocking)."""
        reader = self.blobs.reader
        out: dict[B3Digest, Directory] = {}
        for raw, loc in reader.locate([d.raw for d in digests]).items():
            if not isinstance(loc, Member):
                continue  # (a large blob, never a Directory: those are ≤ 4 MiB members)
            data = bytes(reader.member(raw, loc))  # (hashed: it is what the digest names)
            try:
                out[B3Digest(raw)] = Directory.from_bytes(data)
            except ValidationError:
                _log.debug("%s names a blob that is not a Directory", B3Digest(raw))
        return out

    async def _get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        found = await asyncio.to_thread(self.get_many_sync, digests)
        if self.legacy is not None and len(found) < len(set(digests)):
            for digest in dict.fromkeys(digests):
                if digest not in found and (old := await self.legacy.get(digest)) is not None:
                    found[digest] = old
        return found

    async def get(self, digest: B3Digest) -> Directory | None:
        return (await self._get_many([digest])).get(digest)

    async def get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        return await self._get_many(list(dict.fromkeys(digests)))

    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        async for directory in closure_by_levels(root, self._get_many):
            yield directory

    def commit_sync(self, directories: Sequence[Directory]) -> None:
        """Store validated Directories (leaves first) in one transaction (blocking)."""
        rows = {d.digest.raw: d.encode() for d in directories}
        if not rows:
            return
        present = self.blobs.reader.intact(self.blobs.reader.locate(list(rows)))
        new = [(raw, data) for raw, data in rows.items() if raw not in present]
        if new:
            with self.blobs.transaction() as txn:
                txn.records(Kind.DIRECTORIES, new)

    async def _commit(self, directories: Sequence[Directory]) -> None:
        await asyncio.to_thread(self.commit_sync, directories)

    def close(self) -> None:
        """Nothing of its own to release; the blob service if it owns it (blocking)."""
        if self.legacy is not None:
            self.legacy.close()
        if self._owns:
            self.blobs.close()

    async def aclose(self) -> None:
        self.close()
