"""``tvix-store fsck``: find damaged content in the embedded store, and say which paths it breaks.

Three layers, each trusting nothing of the one above:

1. the packs (:func:`tvix_castore.packstore.verify.check_packs`): every indexed
   frame decodes and verifies, every index row names the member it claims,
   every chunk list is whole;
2. every PathInfo's closure: each Directory is there, parses and is
   canonical (its encoding hashes to its digest), and each file's blob is
   indexed, readable by (1) and of the file's size;
3. with ``--deep``, each path's NAR, rendered from Directories and blobs
   (not from NAR plans), has the recorded NarSize and NarHash.

A damaged path is marked (:meth:`NarService.mark_damaged`): nar-bridge then
answers its narinfo 404 and refuses its NAR, until an upload or import of the
same content stores it again, or :mod:`tvix_store.repair` fetches it. Nothing
else is changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tvix_castore.digests import B3Digest
from tvix_castore.errors import CastoreError
from tvix_castore.nodes import Directory, DirectoryNode, FileNode, Node
from tvix_castore.packstore.reader import Chunked, Member
from tvix_castore.packstore.verify import PackCheck, check_packs
from tvix_store.embedded import Embedded
from tvix_store.nar.render import calculate_nar
from tvix_store.pathinfo import PathInfo
from tvix_store.progress import NULL, Progress

__all__ = ["DamagedPath", "FsckReport", "closure_problem", "fsck"]

_BATCH = 500
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DamagedPath:
    """A store path whose NAR cannot be produced, and why."""

    path: str
    why: str


@dataclass
class FsckReport:
    """What :func:`fsck` found (``ok``: nothing damaged)."""

    packs: PackCheck
    paths: int = 0
    directories: int = 0
    files: int = 0
    deep: bool = False
    seconds: float = 0.0
    damaged_paths: list[DamagedPath] = field(default_factory=list)
    repaired: dict[str, str] = field(default_factory=dict)  # path -> where from
    unindexed: int = 0  # index rows of damaged content dropped by --repair
    cleared: list[str] = field(default_factory=list)  # marked damaged, found whole

    @property
    def ok(self) -> bool:
        """Nothing damaged (or, after a repair, every damaged path repaired)."""
        if self.repaired or self.unindexed:
            return all(d.path in self.repaired for d in self.damaged_paths)
        return not (self.damaged_paths or self.packs.damaged_frames or self.packs.bad)

    def as_json(self) -> dict[str, Any]:
        p = self.packs
        return {
            "ok": self.ok,
            "frames": p.frames,
            "bytes_verified": p.verified_bytes,
            "index_rows": p.blobs,
            "chunked_blobs": p.chunked,
            "legacy_blobs_not_checked": p.legacy,
            "damaged_frames": [
                {"pack": d.pack, "offset": d.offset, "reason": d.reason, "blobs": d.blobs}
                for d in p.damaged_frames
            ],
            "unreadable_blobs": {str(B3Digest(k)): v for k, v in sorted(p.bad.items())},
            "paths": self.paths,
            "directories": self.directories,
            "files": self.files,
            "deep": self.deep,
            "damaged_paths": [{"path": d.path, "why": d.why} for d in self.damaged_paths],
            "repaired": dict(sorted(self.repaired.items())),
            "unindexed": self.unindexed,
            "cleared": self.cleared,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        p = self.packs
        lines = [
            f"packs: {p.frames} frames, {p.verified_bytes / 1e6:.1f} MB verified,"
            f" {p.blobs} index rows, {p.chunked} chunked blobs:"
            f" {len(p.damaged_frames)} damaged frames, {len(p.bad)} unreadable blobs",
            f"paths: {self.paths} checked ({self.directories} directories, {self.files} files"
            f"{', NARs rendered and hashed' if self.deep else ''}):"
            f" {len(self.damaged_paths)} damaged",
        ]
        if p.legacy:
            lines.append(
                f"note: {p.legacy} blobs are still in the layout of an older release and were"
                " not checked here (tvix-store compact converts them, verifying each)"
            )
        lines += [
            f"damaged frame: pack {d.pack} at {d.offset}: {d.reason}" for d in p.damaged_frames
        ]
        lines += [f"damaged path: {d.path}: {d.why}" for d in self.damaged_paths]
        if self.unindexed:
            lines.append(f"repair: dropped {self.unindexed} index rows of damaged content")
        lines += [f"repaired: {path} from {src}" for path, src in sorted(self.repaired.items())]
        lines += [f"no longer damaged (found whole): {path}" for path in self.cleared]
        lines.append(
            f"fsck: {'no damage found' if self.ok else 'DAMAGE FOUND'} ({self.seconds:.1f} s)"
        )
        return "\n".join(lines)


class _Closures:
    """Closure checks shared across paths (a Directory or blob is checked once)."""

    def __init__(self, store: Embedded, bad: dict[bytes, str]) -> None:
        self._dirs = store.directories()
        self._reader = store.blobs().reader
        self._bad = bad
        self._dir_why: dict[bytes, str | None] = {}  # Directory -> why its closure is broken
        self._subdirs: dict[bytes, list[bytes]] = {}
        self._files: dict[bytes, list[tuple[bytes, int]]] = {}
        self._blob_why: dict[tuple[bytes, int], str | None] = {}
        self.directories = 0
        self.files = 0

    def _blobs(self, files: Sequence[tuple[bytes, int]]) -> None:
        todo = [f for f in dict.fromkeys(files) if f not in self._blob_why]
        for i in range(0, len(todo), _BATCH):
            batch = todo[i : i + _BATCH]
            where = self._reader.locate([d for d, _ in batch])
            for digest, size in batch:
                self.files += 1
                loc = where.get(digest)
                why = self._bad.get(digest)
                if why is not None:
                    pass
                elif size == 0:
                    why = None
                elif loc is None:
                    why = "is missing"
                elif isinstance(loc, Member | Chunked) and loc.size != size:
                    why = f"has {loc.size} bytes, the file {size}"
                self._blob_why[(digest, size)] = why

    def _directories(self, roots: Sequence[bytes]) -> None:
        """Fetch and check every Directory under ``roots`` not checked yet (level by level)."""
        level = [d for d in dict.fromkeys(roots) if d not in self._dir_why]
        while level:
            found: dict[B3Digest, Directory] = {}
            for i in range(0, len(level), _BATCH):
                batch = [B3Digest(d) for d in level[i : i + _BATCH]]
                try:
                    found.update(self._dirs.get_many_sync(batch))
                except CastoreError as exc:  # (a damaged frame, found by the read)
                    for b in batch:
                        self._dir_why.setdefault(b.raw, str(exc))
            files: list[tuple[bytes, int]] = []
            below: list[bytes] = []
            for raw in level:
                if raw in self._dir_why:
                    continue
                self.directories += 1
                d = found.get(B3Digest(raw))
                if d is None:
                    why = self._bad.get(raw)
                    self._dir_why[raw] = f"directory {B3Digest(raw)} " + (
                        f"cannot be read: {why}" if why else "is missing"
                    )
                    continue
                if d.digest.raw != raw:
                    self._dir_why[raw] = f"directory {B3Digest(raw)} is not canonical"
                    continue
                self._dir_why[raw] = None
                self._subdirs[raw] = [c.digest.raw for c in d.directories]
                self._files[raw] = [(f.digest.raw, f.size) for f in d.files]
                files += self._files[raw]
                below += self._subdirs[raw]
            self._blobs(files)
            level = [c for c in dict.fromkeys(below) if c not in self._dir_why]

    def why(self, node: Node) -> str | None:
        """Why ``node``'s content is not whole, or ``None``."""
        if isinstance(node, FileNode):
            self._blobs([(node.digest.raw, node.size)])
            why = self._blob_why[(node.digest.raw, node.size)]
            return None if why is None else f"blob {node.digest} {why}"
        if not isinstance(node, DirectoryNode):
            return None
        self._directories([node.digest.raw])
        seen: set[bytes] = set()
        todo = [node.digest.raw]
        while todo:
            raw = todo.pop()
            if raw in seen:
                continue
            seen.add(raw)
            why = self._dir_why.get(raw)
            if why is not None:
                return why
            for key in self._files.get(raw, ()):
                bwhy = self._blob_why.get(key)
                if bwhy is not None:
                    return f"blob {B3Digest(key[0])} {bwhy}"
            todo += self._subdirs.get(raw, ())
        return None


async def fsck(store: Embedded, *, deep: bool = False, progress: Progress = NULL) -> FsckReport:
    """Check the embedded store ``store`` (see the module) and mark damaged paths.

    ``progress`` shows two steps: the pack frames, then the paths (with
    ``deep``, weighed by their NarSize).
    """
    import asyncio

    start = time.monotonic()
    blobs = store.blobs()
    progress.stage("fsck: packs", unit="frames")
    packs = await asyncio.to_thread(
        check_packs, blobs.reader, None if progress is NULL else progress
    )
    report = FsckReport(packs, deep=deep)
    closures = _Closures(store, packs.bad)
    directories = store.directories()
    nar = store.nar(blobs, directories)
    progress.stage("fsck: paths", unit="paths")
    infos: list[PathInfo] = [pi async for pi in store.pathinfos().list()]
    progress.total(items=len(infos), bytes=sum(pi.nar_size for pi in infos) if deep else None)
    for pi in infos:
        report.paths += 1
        why = await asyncio.to_thread(closures.why, pi.node)
        if why is None and deep:
            try:
                size, sha = await calculate_nar(pi.node, blobs, directories)
            except CastoreError as exc:
                why = f"its NAR cannot be rendered: {exc}"
            else:
                if size != pi.nar_size or sha != pi.nar_sha256:
                    why = "its NAR does not match the recorded NarSize/NarHash"
        if why is not None:
            report.damaged_paths.append(DamagedPath(pi.store_path.absolute, why))
            await nar.mark_damaged(pi.node, why)
        elif await nar.damage(pi.node) is not None:
            # Marked by an earlier read (or a repair killed before it cleared the
            # mark), but every frame and its whole closure verified just now.
            await nar.clear_damage(pi.node)
            report.cleared.append(pi.store_path.absolute)
        progress.advance(1, pi.nar_size if deep else 0)
    report.directories, report.files = closures.directories, closures.files
    report.seconds = time.monotonic() - start
    return report


def closure_problem(store: Embedded, node: Node) -> str | None:
    """Why ``node``'s closure is not whole in ``store`` now (a fresh check), or ``None``."""
    return _Closures(store, {}).why(node)
