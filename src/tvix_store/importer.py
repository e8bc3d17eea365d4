"""``tvix-store import``: a filesystem path → castore + a ``source`` CA PathInfo."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nix_compat.nar import nar_hash_path
from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from nix_compat.store_path import build_ca_path, validate_name
from tvix_castore.blobservice.base import BlobReader, BlobService, BlobWriter, ForkedIngest
from tvix_castore.digests import B3Digest
from tvix_castore.errors import IngestionError
from tvix_castore.ingest import (
    ScannedTree,
    ingest_tree,
    put_directories,
    scan_tree,
    upload_files,
)
from tvix_castore.nodes import Directory, Node
from tvix_castore.packstore.service import PackBlobService, PackTxn
from tvix_store.config import Store
from tvix_store.nar.dirplan import Hint
from tvix_store.nar.render import calculate_nar
from tvix_store.pathinfo import PathInfo
from tvix_store.progress import NULL, Progress

__all__ = ["IngestedTree", "base_name_of", "import_path", "ingest_and_hash", "record"]

_log = logging.getLogger(__name__)


def base_name_of(path: str) -> str:
    """The store-path name Nix gives ``path``: its last component, one trailing ``/`` ignored.

    Like Nix, no normalisation happens (``foo/.`` is named ``.``, ``foo//`` has no name).
    """
    end = len(path)
    if end > 1 and path.endswith("/"):
        end -= 1
    return path[path.rfind("/", 0, end) + 1 : end]


@dataclass(frozen=True, slots=True)
class IngestedTree:
    """A tree in castore, with the NAR size and sha256 that describe what was stored."""

    node: Node
    nar_size: int
    nar_sha256: bytes
    closure: dict[B3Digest, Directory]
    hints: Mapping[bytes, Hint] | None = None  # where its blobs were read back from


async def ingest_and_hash(
    path: str | os.PathLike[str], store: Store, progress: Progress = NULL
) -> IngestedTree:
    """Ingest the tree at ``path`` and hash its NAR, consistently.

    With the embedded store, the tree is read once: ingested into the packs in
    one transaction, then its NAR is hashed from what they hold (see
    :meth:`~tvix_store.nar.service.NarService.hash_uploaded`), so the NarHash
    describes exactly what was stored, whatever happened to the tree meanwhile.

    Elsewhere (stores without packs: rendering from castore would mean reading
    every blob back), the tree is read twice at once — ingested into castore,
    and hashed as a NAR (the second read hits the page cache) — after one scan
    recorded every entry's stat. Afterwards every entry is stat'ed again: if
    anything changed, this fails (``IngestionError``) instead of returning a
    NarHash that does not describe the stored content. If an entry changed
    within a second of the scan (too close for timestamps to tell), the
    NarHash is computed from castore instead.

    Once the tree is scanned, ``progress`` is told its files and bytes, then
    each batch of them uploaded.
    """
    closure: dict[B3Digest, Directory] = {}
    told = None if progress is NULL else progress
    if store.nar.reader is not None and isinstance(store.blobs, PackBlobService):
        tree = await asyncio.to_thread(scan_tree, path, fingerprints=False)
        return await _ingest_then_hash(tree, store, store.blobs, closure, told)
    tree = await asyncio.to_thread(scan_tree, path)
    node, (nar_size, nar_sha256) = await asyncio.gather(
        ingest_tree(tree, store.blobs, store.directories, collect=closure, progress=told),
        asyncio.to_thread(nar_hash_path, path),
    )
    changed = await asyncio.to_thread(tree.changed)
    if changed is not None:
        raise IngestionError(changed, "changed while it was being imported; nothing was recorded")
    if tree.racy:
        nar_size, nar_sha256 = await calculate_nar(
            node, store.blobs, store.directories, closure=closure
        )
    return IngestedTree(node, nar_size, nar_sha256, closure)


class _InTxn(BlobService):
    """The pack store's ingestion, into one explicit transaction (for ``upload_files``).

    Only ingestion is offered; a PackTxn is not for concurrent use, so batches
    that are not forked are ingested one at a time.
    """

    def __init__(self, blobs: PackBlobService, txn: PackTxn) -> None:
        self._blobs = blobs
        self._txn = txn
        self._lock = threading.Lock()

    def forked_ingest(self) -> ForkedIngest | None:
        return self._blobs.forked_ingest(self._txn)

    def _ingest(self, files: Sequence[tuple[str | bytes, int]]) -> list[B3Digest | Exception]:
        with self._lock:
            return self._blobs.ingest_files_sync(files, self._txn)

    async def ingest_files(
        self, files: Sequence[tuple[str | bytes, int]]
    ) -> list[B3Digest | Exception]:
        return await asyncio.to_thread(self._ingest, files)

    async def has(self, digest: B3Digest) -> bool:
        raise NotImplementedError("ingestion only")

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        raise NotImplementedError("ingestion only")

    def open_write(self) -> BlobWriter:
        raise NotImplementedError("ingestion only")


async def _ingest_then_hash(
    tree: ScannedTree,
    store: Store,
    blobs: PackBlobService,
    closure: dict[B3Digest, Directory],
    progress: Progress | None,
) -> IngestedTree:
    txn = blobs.transaction()
    try:
        await upload_files(tree, _InTxn(blobs, txn), progress=progress)
        await asyncio.to_thread(txn.commit)  # (one fsync; then the blobs are indexed)
    finally:
        if not txn.done:
            txn.abort()
    if not tree.is_directory:
        node = await put_directories(tree, store.directories, collect=closure)
        # A lone file or symlink: its NAR read back from castore.
        nar_size, sha = await calculate_nar(node, blobs, store.directories, closure=closure)
        return IngestedTree(node, nar_size, sha, closure)
    # The NAR is hashed from the packs (a large one by a forked child, started
    # before anything else runs here) while the Directories are built.
    job = await asyncio.to_thread(store.nar.start_hash_uploaded, tree)
    hashing = asyncio.ensure_future(asyncio.to_thread(job.result))
    try:
        node = await put_directories(tree, store.directories, collect=closure)
        uploaded = await hashing
    finally:
        if not hashing.done():
            with contextlib.suppress(BaseException):
                await hashing
        job.close()
    return IngestedTree(node, uploaded.nar_size, uploaded.nar_sha256, closure, uploaded.hints)


async def record(store: Store, tree: IngestedTree, info: PathInfo) -> PathInfo:
    """Put the PathInfo of an ingested tree, then its NAR plans (content first, plans last).

    The tree's NarHash was computed from what the store holds (verified), so a
    damage mark of the same content is cleared: ingesting stored anew every
    blob whose bytes were gone.
    """
    stored = await store.pathinfos.put(info)
    await store.nar.record(tree.node, tree.closure, tree.nar_size, tree.nar_sha256, tree.hints)
    await store.nar.clear_damage(tree.node)
    return stored


async def import_path(
    path: str | os.PathLike[str], store: Store, progress: Progress = NULL
) -> PathInfo:
    """Ingest ``path`` and record it under the store path ``nix-store --add`` gives.

    See :func:`ingest_and_hash` (also for ``progress``); the PathInfo is
    written only after all content is committed, so an interrupted import
    leaves no dangling path.
    """
    name = validate_name(base_name_of(os.fspath(path)))
    tree = await ingest_and_hash(path, store, progress)
    ca = CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, tree.nar_sha256))
    store_path = build_ca_path(name, ca)
    info = PathInfo(
        store_path=store_path,
        node=tree.node.with_name(store_path.basename.encode()),
        nar_size=tree.nar_size,
        nar_sha256=tree.nar_sha256,
        ca=ca,
    )
    return await record(store, tree, info)
