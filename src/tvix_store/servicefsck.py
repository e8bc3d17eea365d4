"""``tvix-store fsck`` of a store named by service URLs or a composition (S3 + PostgreSQL …).

Through the services' public interfaces only, so it checks what a client
would get, on any backend:

1. every PathInfo's root: each Directory of its closure is there and
   verifies (the directory services check digests and closures on read);
2. each file's blob is there with the file's size: a chunked blob's chunk
   list adds up and each chunk is present, a blob without one is read
   (which verifies it: the object store checks BLAKE3 after decompressing);
3. with ``--deep``, each path's NAR, rendered from Directories and blobs,
   has the recorded NarSize and NarHash.

A backend that cannot be reached stops the check (exit status of an error,
never "damaged"). Damage is reported, not marked: these stores have no
damage marks; a damaged path is repaired by uploading it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tvix_castore.digests import B3Digest
from tvix_castore.errors import CastoreError, StorageUnavailable
from tvix_castore.nodes import DirectoryNode, FileNode, Node
from tvix_store.config import Store
from tvix_store.nar.render import calculate_nar
from tvix_store.pathinfo import PathInfo
from tvix_store.progress import NULL, Progress

__all__ = ["ServicesFsckReport", "fsck_services"]


@dataclass
class ServicesFsckReport:
    """What :func:`fsck_services` found (``ok``: nothing damaged)."""

    store: str
    deep: bool
    paths: int = 0
    directories: int = 0
    files: int = 0
    blobs: int = 0
    damaged: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def as_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["ok"] = self.ok
        return out

    def summary(self) -> str:
        lines = [
            f"{self.store}: {self.paths} paths, {self.directories} directories,"
            f" {self.files} files ({self.blobs} distinct blobs) checked"
            f"{', NARs rendered and hashed' if self.deep else ''}"
        ]
        lines += [f"damaged: {d['path']}: {d['why']}" for d in self.damaged]
        lines.append("ok" if self.ok else f"{len(self.damaged)} damaged path(s)")
        return "\n".join(lines)


class _Checker:
    def __init__(self, store: Store, report: ServicesFsckReport) -> None:
        self.store = store
        self.report = report
        self.blob_problems: dict[tuple[B3Digest, int], str | None] = {}
        self.seen_dirs: set[B3Digest] = set()

    async def blob(self, digest: B3Digest, size: int) -> str | None:
        key = (digest, size)
        if key not in self.blob_problems:
            self.report.blobs += 1
            self.blob_problems[key] = await self._blob(digest, size)
        return self.blob_problems[key]

    async def _blob(self, digest: B3Digest, size: int) -> str | None:
        blobs = self.store.blobs
        chunks = await blobs.chunks(digest)
        if chunks is None:
            return f"blob {digest} is missing"
        if chunks:
            total = sum(c.size for c in chunks)
            if total != size:
                return f"blob {digest}: its chunks hold {total} bytes, the file {size}"
            for c in chunks:
                if not await blobs.has(c.digest):
                    return f"blob {digest}: chunk {c.digest} is missing"
            return None
        reader = await blobs.open_read(digest)
        if reader is None:
            return f"blob {digest} is missing"
        async with reader:
            length = 0
            while piece := await reader.read(1 << 20):
                length += len(piece)
        if length != size:
            return f"blob {digest} holds {length} bytes, the file {size}"
        return None

    async def node(self, node: Node) -> str | None:
        if isinstance(node, FileNode):
            self.report.files += 1
            return await self.blob(node.digest, node.size)
        if not isinstance(node, DirectoryNode):
            return None  # (a symlink: nothing stored)
        found = False
        async for directory in self.store.directories.get_recursive(node.digest):
            found = True
            digest = directory.digest
            if digest in self.seen_dirs:
                continue
            self.seen_dirs.add(digest)
            self.report.directories += 1
            for f in directory.files:
                self.report.files += 1
                problem = await self.blob(f.digest, f.size)
                if problem is not None:
                    return f"{problem} ({f.name.decode(errors='replace')})"
        if not found:
            return f"directory {node.digest} is missing"
        return None

    async def path(self, info: PathInfo, deep: bool) -> str | None:
        try:
            problem = await self.node(info.node)
            if problem is None and deep:
                size, sha = await calculate_nar(info.node, self.store.blobs, self.store.directories)
                if (size, sha) != (info.nar_size, info.nar_sha256):
                    problem = f"its NAR is not the recorded one ({size} bytes, not {info.nar_size})"
        except StorageUnavailable:
            raise  # (an outage is not damage)
        except CastoreError as exc:
            problem = str(exc)
        return problem


async def fsck_services(
    store: Store, *, deep: bool = False, progress: Progress = NULL
) -> ServicesFsckReport:
    """Check every path of ``store`` (see the module)."""
    report = ServicesFsckReport(store.description or "the store", deep)
    checker = _Checker(store, report)
    progress.stage("fsck: paths", unit="paths")
    async for info in store.pathinfos.list():
        report.paths += 1
        problem = await checker.path(info, deep)
        if problem is not None:
            report.damaged.append({"path": info.store_path.absolute, "why": problem})
        progress.advance(1)
    report.damaged.sort(key=lambda d: d["path"])
    return report
