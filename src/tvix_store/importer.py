"""``tvix-store import``: a filesystem path → castore + a ``source`` CA PathInfo."""

from __future__ import annotations

import asyncio
import os

from nix_compat.nar import nar_hash_path
from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from nix_compat.store_path import build_ca_path, validate_name
from tvix_castore.ingest import ingest_path
from tvix_store.config import Store
from tvix_store.pathinfo import PathInfo

__all__ = ["base_name_of", "import_path"]


def base_name_of(path: str) -> str:
    """The store-path name Nix gives ``path``: its last component, one trailing ``/`` ignored.

    Like Nix, no normalisation happens (``foo/.`` is named ``.``, ``foo//`` has no name).
    """
    end = len(path)
    if end > 1 and path.endswith("/"):
        end -= 1
    return path[path.rfind("/", 0, end) + 1 : end]


async def import_path(path: str | os.PathLike[str], store: Store) -> PathInfo:
    """Ingest ``path`` and record it under the store path ``nix-store --add`` gives.

    The NAR hash is computed from the same tree while it is ingested (the
    second read hits the page cache); the PathInfo is written only after all
    content is committed, so an interrupted import leaves no dangling path.
    """
    name = validate_name(base_name_of(os.fspath(path)))
    node, (nar_size, nar_sha256) = await asyncio.gather(
        ingest_path(path, store.blobs, store.directories),
        asyncio.to_thread(nar_hash_path, path),
    )
    ca = CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, nar_sha256))
    store_path = build_ca_path(name, ca)
    info = PathInfo(
        store_path=store_path,
        node=node.with_name(store_path.basename.encode()),
        nar_size=nar_size,
        nar_sha256=nar_sha256,
        ca=ca,
    )
    return await store.pathinfos.put(info)
