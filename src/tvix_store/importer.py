"""``tvix-store import``: a filesystem path → castore + a ``source`` CA PathInfo."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from dataclasses import dataclass

from nix_compat.nar import nar_hash_path
from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from nix_compat.store_path import build_ca_path, validate_name
from tvix_castore.blobservice.packed import PackedBlobService
from tvix_castore.digests import B3Digest
from tvix_castore.errors import CastoreError, IngestionError
from tvix_castore.ingest import (
    ScannedTree,
    ingest_tree,
    put_directories,
    scan_tree,
    upload_files,
)
from tvix_castore.nodes import Directory, DirectoryNode, Node
from tvix_store.config import Store
from tvix_store.nar.plan import NarPlan, PlanHasher, clear_damage, save_plan, scanned_plan
from tvix_store.nar.render import calculate_nar
from tvix_store.pathinfo import PathInfo

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
    plan: NarPlan | None = None  # vouching for nar_sha256, still to be recorded


async def ingest_and_hash(path: str | os.PathLike[str], store: Store) -> IngestedTree:
    """Ingest the tree at ``path`` and hash its NAR, consistently.

    With the embedded store, the tree is read once: ingested into the packs,
    then its NAR is hashed from what they hold (see
    :class:`~tvix_store.nar.plan.PlanHasher`), so the NarHash describes
    exactly what was stored, whatever happened to the tree meanwhile.

    Elsewhere (stores without packs: rendering from castore would mean reading
    every blob back), the tree is read twice at once — ingested into castore,
    and hashed as a NAR (the second read hits the page cache) — after one scan
    recorded every entry's stat. Afterwards every entry is stat'ed again: if
    anything changed, this fails (``IngestionError``) instead of returning a
    NarHash that does not describe the stored content. If an entry changed
    within a second of the scan (too close for timestamps to tell), the
    NarHash is computed from castore instead.
    """
    closure: dict[B3Digest, Directory] = {}
    if store.plans is not None and isinstance(store.blobs, PackedBlobService):
        tree = await asyncio.to_thread(scan_tree, path, fingerprints=False)
        return await _ingest_then_hash(tree, store, store.blobs, closure)
    tree = await asyncio.to_thread(scan_tree, path)
    node, (nar_size, nar_sha256) = await asyncio.gather(
        ingest_tree(tree, store.blobs, store.directories, collect=closure),
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


async def _ingest_then_hash(
    tree: ScannedTree, store: Store, blobs: PackedBlobService, closure: dict[B3Digest, Directory]
) -> IngestedTree:
    with blobs.staged_index() as commit_index:
        await upload_files(tree, blobs)
        if not tree.is_directory:
            await asyncio.to_thread(commit_index)
            node = await put_directories(tree, store.directories, collect=closure)
            # A lone file or symlink: its NAR read back from castore.
            nar_size, sha = await calculate_nar(node, blobs, store.directories, closure=closure)
            return IngestedTree(node, nar_size, sha, closure)
        plan = await asyncio.to_thread(scanned_plan, tree, blobs)
        # The NAR is hashed (by a forked child, if large) while the blob index is
        # committed (before any Directory refers to its blobs) and the Directories
        # are built; this process then verifies the blobs that were already stored.
        hasher = PlanHasher(plan, blobs)
        try:
            await asyncio.to_thread(commit_index)
            node = await put_directories(tree, store.directories, collect=closure)
            sha = await asyncio.to_thread(hasher.result)
        finally:
            hasher.close()
    plan = dataclasses.replace(plan, nar_sha256=sha)
    return IngestedTree(node, plan.nar_size, plan.nar_sha256, closure, plan)


async def record(store: Store, tree: IngestedTree, info: PathInfo) -> PathInfo:
    """Put the PathInfo of an ingested tree, then its NAR plan (content first, plan last).

    The tree's NarHash was computed from what the store holds (verified), so a
    damage mark of the same content is cleared: ingesting stored anew every
    blob whose bytes were gone.
    """
    stored = await store.pathinfos.put(info)
    if tree.plan is not None and store.plans is not None:
        assert isinstance(tree.node, DirectoryNode)
        try:
            await asyncio.to_thread(store.plans.put_sync, tree.node.digest, tree.plan)
        except CastoreError as exc:  # a plan is a cache: export renders without one
            _log.warning("no NAR plan recorded for %s: %s", tree.node.digest, exc)
    else:
        await save_plan(
            store.plans, store.blobs, tree.node, tree.closure, tree.nar_size, tree.nar_sha256
        )
    await clear_damage(store.plans, tree.node)
    return stored


async def import_path(path: str | os.PathLike[str], store: Store) -> PathInfo:
    """Ingest ``path`` and record it under the store path ``nix-store --add`` gives.

    See :func:`ingest_and_hash`; the PathInfo is written only after all content
    is committed, so an interrupted import leaves no dangling path.
    """
    name = validate_name(base_name_of(os.fspath(path)))
    tree = await ingest_and_hash(path, store)
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
