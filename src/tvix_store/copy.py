"""``tvix-store copy``: import a closure listed in JSON, verifying every path.

Accepts the ``exportReferencesGraph`` form (``{"closure": [...]}``, B §3.10)
and ``nix path-info --json --recursive`` output (a list, Nix 2.8). Paths are
imported dependencies first; each NAR hash and size is recomputed from the
files and must equal what the JSON claims, and a ``ca`` must fit its store
path and content (:mod:`tvix_store.verify`) — the JSON is never trusted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nix_compat.errors import NixCompatError
from nix_compat.nixhash import CAHash, HashAlgo, NixHash
from nix_compat.signing import Signature
from nix_compat.store_path import StorePath
from tvix_castore.errors import DataCorruption, ValidationError
from tvix_store.config import Store
from tvix_store.importer import ingest_and_hash, record
from tvix_store.pathinfo import PathInfo
from tvix_store.progress import NULL, Progress
from tvix_store.verify import check_ca, check_ca_content

__all__ = ["ClosureEntry", "copy_closure", "parse_closure"]


@dataclass(frozen=True, slots=True)
class ClosureEntry:
    """One path of the closure as the JSON describes it."""

    path: StorePath
    nar_sha256: bytes
    nar_size: int
    references: tuple[StorePath, ...]
    deriver: StorePath | None = None
    ca: CAHash | None = None
    signatures: tuple[Signature, ...] = ()


def _entry(obj: Any) -> ClosureEntry:
    if not isinstance(obj, dict):
        raise ValidationError("closure entries must be JSON objects")
    try:
        path = StorePath.from_absolute_path(obj["path"])
        nar_hash = NixHash.parse(obj["narHash"], HashAlgo.SHA256)
        size = obj["narSize"]
        if not isinstance(size, int) or size < 0:
            raise ValidationError(f"{path}: narSize must be a non-negative integer")
        refs = tuple(StorePath.from_absolute_path(r) for r in obj.get("references", []))
        deriver = None
        if obj.get("deriver"):
            drv = str(obj["deriver"])
            deriver = StorePath.from_absolute_path(drv.removesuffix(".drv"))
        ca = CAHash.parse(obj["ca"]) if obj.get("ca") else None
        sigs = tuple(Signature.parse(s) for s in obj.get("signatures", []))
    except KeyError as exc:
        raise ValidationError(f"closure entry lacks {exc.args[0]!r}") from exc
    except NixCompatError as exc:
        raise ValidationError(f"invalid closure entry: {exc}") from exc
    return ClosureEntry(path, nar_hash.digest, size, refs, deriver, ca, sigs)


def parse_closure(text: str | bytes) -> list[ClosureEntry]:
    """Parse either JSON form into entries (in file order)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"closure file is not JSON: {exc}") from exc
    if isinstance(data, dict):
        if "closure" not in data:
            raise ValidationError("closure file has no 'closure' array")
        data = data["closure"]
    if not isinstance(data, list):
        raise ValidationError("closure must be a JSON array")
    return [_entry(o) for o in data]


def _dependency_order(entries: list[ClosureEntry]) -> list[ClosureEntry]:
    by_path = {e.path: e for e in entries}
    done: set[StorePath] = set()
    out: list[ClosureEntry] = []
    for start in entries:
        stack: list[tuple[ClosureEntry, int]] = [(start, 0)]
        visiting = {start.path}
        while stack:
            entry, i = stack[-1]
            if entry.path in done:
                stack.pop()
                continue
            refs = [
                r for r in entry.references if r != entry.path and r in by_path and r not in done
            ]
            if i < len(refs):
                stack[-1] = (entry, i + 1)
                ref = refs[i]
                if ref in visiting:
                    raise ValidationError(f"reference cycle through {ref}")
                visiting.add(ref)
                stack.append((by_path[ref], 0))
                continue
            stack.pop()
            visiting.discard(entry.path)
            done.add(entry.path)
            out.append(entry)
    return out


async def copy_closure(
    entries: list[ClosureEntry],
    store: Store,
    *,
    root: str = "/",
    on_imported: Callable[[StorePath], None] | None = None,
    progress: Progress = NULL,
) -> list[StorePath]:
    """Import every entry not yet in ``store``, dependencies first; return what was imported.

    Files are read from ``<root>/nix/store/...`` (``root`` lets a chroot store
    be the source). ``progress`` is told the paths to import and their NAR
    bytes (as the closure claims them), then each path imported.
    """
    known = {e.path for e in entries}
    for e in entries:
        for ref in e.references:
            if ref not in known and await store.pathinfos.get(ref.digest) is None:
                raise ValidationError(f"{e.path} refers to {ref}, neither listed nor stored")
    imported: list[StorePath] = []
    todo = [
        e for e in _dependency_order(entries) if await store.pathinfos.get(e.path.digest) is None
    ]
    progress.total(items=len(todo), bytes=sum(e.nar_size for e in todo))
    for e in todo:
        fs_path = os.path.join(root, e.path.absolute.lstrip("/"))
        tree = await ingest_and_hash(fs_path, store)
        if tree.nar_size != e.nar_size or tree.nar_sha256 != e.nar_sha256:
            raise DataCorruption(
                f"{e.path}: the files on disk do not match the closure's narHash/narSize"
                f" (disk: {tree.nar_size} bytes)"
            )
        info = PathInfo(
            store_path=e.path,
            node=tree.node.with_name(e.path.basename.encode()),
            nar_size=tree.nar_size,
            nar_sha256=tree.nar_sha256,
            references=e.references,
            signatures=e.signatures,
            deriver=e.deriver,
            ca=e.ca,
        )
        check_ca(info)
        await check_ca_content(info, store.blobs, store.directories)
        await record(store, tree, info)
        imported.append(e.path)
        progress.advance(1, e.nar_size)
        if on_imported is not None:
            on_imported(e.path)
    return imported


def read_closure_file(path: str | Path) -> list[ClosureEntry]:
    """Read and parse a closure JSON file."""
    try:
        return parse_closure(Path(path).read_bytes())
    except OSError as exc:
        raise ValidationError(f"{path}: cannot read: {exc.strerror}") from exc
