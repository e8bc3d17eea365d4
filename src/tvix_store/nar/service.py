"""The NAR service: the one owner of NAR plans (calculate, export, serve, record).

Rendering a NAR from castore means fetching and decoding every Directory of
the closure and looking up where each blob lies: per-entry Python work that
costs more than the bytes themselves. In the embedded store the NAR service
keeps that work done, as plans per Directory (:mod:`tvix_store.nar.dirplan`,
cached by :mod:`tvix_store.nar.plancache`), and reads blob contents through
the pack store's shared :class:`~tvix_castore.packstore.reader.PackReader`.

* :meth:`NarService.record`: after a NAR's size and sha256 were established
  (an import hashed what it stored, an upload hashed what it ingested, an
  export rendered and checked), the plans of its Directories are kept and the
  root is vouched for.
* :meth:`NarService.export` / :meth:`export_sync`: a NAR whose root is vouched
  for (with the NarHash asked for) is written from its plans, without hashing.
  Nothing is written if some content is missing (the caller renders, and
  reports what is missing before writing); a blob found corrupt marks the NAR
  damaged; a NAR written whole clears a mark.
* :meth:`NarService.serve`: a server's NAR from plans, content checked first.
* :meth:`NarService.calculate`: NAR size and sha256, from a vouched root when
  its content is there, else rendered (and recorded).

Without plans (other blob services, or not a directory) every call falls back
to rendering from castore, so callers need not care which store they have.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tvix_castore.blobservice.base import BlobService
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import CastoreError, DataCorruption
from tvix_castore.lazy import lazy_module
from tvix_castore.nodes import Directory, DirectoryNode, FileNode, Node
from tvix_store.nar.dirplan import (
    NAR_END,
    NAR_START,
    DirPlan,
    FileRef,
    Hint,
    Piece,
    files_of,
    flatten,
    plans_of_closure,
)
from tvix_store.nar.layout import NarLayout
from tvix_store.nar.plancache import PlanCache
from tvix_store.nar.planwrite import (
    Checked,
    Sha256Job,
    hints_of,
    pieces_stream,
    problem_of,
    sha256_of,
    write_to_fd,
)
from tvix_store.nar.render import NarRenderError, calculate_nar, fetch_closure

if TYPE_CHECKING:
    import asyncio

    from tvix_castore.ingest import ScannedTree
    from tvix_castore.packstore.reader import PackReader
else:
    asyncio = lazy_module("asyncio")  # not needed to write a NAR from its plan

__all__ = ["NarService", "Served", "UploadHash", "Uploaded"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Served:
    """A NAR a server can send from its plans (its content was found present)."""

    reader: PackReader
    parts: tuple[Piece, ...]
    nar_size: int

    def pieces(self) -> AsyncIterator[bytes]:
        """The whole NAR, written by a thread; an error is raised after the bytes before it."""
        return pieces_stream(self.reader, self.parts)

    def layout(self) -> NarLayout:
        """The NAR's layout (for ranges), without fetching a Directory."""
        segments: list[bytes | FileNode] = []
        for piece in self.parts:
            if isinstance(piece, FileRef):
                segments.append(FileNode(b"", B3Digest(piece.digest), piece.size))
            else:
                segments.append(bytes(piece))
        return NarLayout.of(segments)


@dataclass(frozen=True, slots=True)
class Uploaded:
    """A just uploaded tree's NAR, hashed from what the packs hold."""

    nar_size: int
    nar_sha256: bytes
    hints: Mapping[bytes, Hint]


class UploadHash:
    """A just uploaded tree's NAR being hashed (see :meth:`NarService.start_hash_uploaded`)."""

    def __init__(self, nar_size: int, job: Sha256Job, hints: Mapping[bytes, Hint]) -> None:
        self._size = nar_size
        self._job = job
        self._hints = hints

    def result(self) -> Uploaded:
        """Blocking; ``NarRenderError`` / ``DataCorruption`` for missing or damaged content."""
        return Uploaded(self._size, self._job.result(), self._hints)

    def close(self) -> None:
        self._job.close()


def _what(node: Node) -> str:
    return str(node.digest) if isinstance(node, (DirectoryNode, FileNode)) else "a symlink"


class NarService:
    """NARs of one store: from plans where it has them (see module doc), else rendered."""

    def __init__(
        self,
        blobs: BlobService,
        directories: DirectoryService,
        plans: PlanCache | None = None,
        reader: PackReader | None = None,
    ) -> None:
        self.blobs = blobs
        self.directories = directories
        self.plans = plans if reader is not None else None
        self.reader = reader

    # -- plans -------------------------------------------------------------
    def _root(self, node: Node) -> tuple[PlanCache, PackReader, bytes] | None:
        if self.plans is None or self.reader is None or not isinstance(node, DirectoryNode):
            return None
        return self.plans, self.reader, node.digest.raw

    def _pieces(self, node: Node) -> tuple[list[Piece], int] | None:
        """The NAR's pieces from plans, if every Directory under ``node`` has one."""
        found = self._root(node)
        if found is None:
            return None
        plans, _, root = found
        closure = plans.closure(root)
        if closure is None:
            return None
        try:
            return flatten(root, closure)
        except (KeyError, DataCorruption) as exc:
            _log.warning("ignoring the NAR plans of %s: %s", _what(node), exc)
            return None

    def _vouched_pieces(self, node: Node, nar_size: int, nar_sha256: bytes) -> list[Piece] | None:
        found = self._root(node)
        if found is None:
            return None
        plans, _, root = found
        vouched = plans.vouched(root)
        if vouched is None:
            _log.debug("no NAR plan vouches for %s: rendering from castore", _what(node))
            return None
        if vouched != (nar_size, nar_sha256):
            _log.debug("the NAR plan of %s vouches for another NAR: rendering", _what(node))
            return None
        got = self._pieces(node)
        if got is None or got[1] != nar_size:
            _log.debug("the NAR plans of %s are incomplete: rendering", _what(node))
            return None
        return got[0]

    # -- export -----------------------------------------------------------------
    def export_sync(self, node: Node, nar_size: int, nar_sha256: bytes, fd: int) -> bool:
        """Write ``node``'s NAR to ``fd`` from plans vouching for this size and sha256.

        ``False`` (having written nothing) when there are none, or some content
        cannot be read (the caller renders, which reports it before writing).

        Raises:
            DataCorruption: a blob is damaged (after the bytes before it; the NAR
                is marked damaged).
            OSError: writing to ``fd`` failed.
        """
        pieces = self._vouched_pieces(node, nar_size, nar_sha256)
        if pieces is None or self.reader is None or self.plans is None:
            return False
        checked = Checked(self.reader, files_of(pieces))
        if checked.problem is not None:
            _log.debug(
                "the NAR plan of %s cannot be read (%s): rendering", _what(node), checked.problem
            )
            return False
        _log.debug("writing the NAR of %s from its plans", _what(node))
        try:
            write_to_fd(self.reader, pieces, fd, checked)
        except DataCorruption as exc:
            with contextlib.suppress(CastoreError):
                _log.warning("marking the NAR of %s damaged: %s", _what(node), exc)
                self.plans.mark_damaged(node, str(exc))
            raise
        with contextlib.suppress(CastoreError):
            self.plans.clear_damage(node)
        fresh = checked.blobs.fresh_hints()
        if fresh:
            self._refresh_hints(node, fresh)
        return True

    def _refresh_hints(self, node: Node, fresh: Mapping[bytes, Hint]) -> None:
        """Rewrite the plans whose file hints were stale (compaction moved the blobs).

        Otherwise every later export would locate those blobs again, one
        index query per batch, forever. A cache: failing to write is logged.
        """
        found = self._root(node)
        if found is None:
            return
        plans, _, root = found
        closure = plans.closure(root)
        if closure is None:
            return
        changed: dict[bytes, DirPlan] = {}
        for digest, plan in closure.items():
            items = tuple(
                FileRef(i.digest, i.size, fresh[i.digest])
                if isinstance(i, FileRef) and i.digest in fresh and i.hint != fresh[i.digest]
                else i
                for i in plan.items
            )
            if items != plan.items:
                changed[digest] = DirPlan(plan.literals, plan.ends, items, plan.size)
        if changed:
            _log.debug("refreshing the location hints of %d NAR plans", len(changed))
            try:
                plans.put_many(changed)
            except CastoreError as exc:
                _log.warning("cannot refresh NAR plans: %s", exc)

    async def export(self, node: Node, nar_size: int, nar_sha256: bytes, fd: int) -> bool:
        """:meth:`export_sync` in a thread."""
        return await asyncio.to_thread(self.export_sync, node, nar_size, nar_sha256, fd)

    # -- serve ------------------------------------------------------------------
    def _served(self, node: Node) -> Served | None:
        got = self._pieces(node)
        if got is None or self.reader is None:
            return None
        pieces, size = got
        if problem_of(self.reader, files_of(pieces)) is not None:
            return None
        return Served(self.reader, tuple(pieces), size)

    async def serve(self, node: Node) -> Served | None:
        """``node``'s NAR from plans, for a server's response.

        ``None`` if there are no usable plans or some content is missing (checked
        before anything is produced).
        """
        return await asyncio.to_thread(self._served, node)

    # -- record ------------------------------------------------------------------
    def record_sync(
        self,
        node: Node,
        closure: Mapping[B3Digest, Directory],
        nar_size: int | None,
        nar_sha256: bytes | None,
        hints: Mapping[bytes, Hint] | None = None,
    ) -> None:
        """:meth:`record`, blocking; raises what fails (``CastoreError``)."""
        found = self._root(node)
        if found is None:
            return
        plans, reader, root = found
        assert isinstance(node, DirectoryNode)
        known = plans.get_many([d.raw for d in closure])
        if hints is None:
            digests = [
                f.digest.raw
                for digest, directory in closure.items()
                if digest.raw not in known
                for f in directory.files
            ]
            hints = hints_of(reader.locate(list(dict.fromkeys(digests)))) if digests else {}
        try:
            made = plans_of_closure(node.digest, closure, hints, known)
        except KeyError as exc:
            (missing,) = exc.args
            raise NarRenderError(f"failed rendering nar: directory {missing} missing") from exc
        size = made[root].size + len(NAR_START) + len(NAR_END)
        if nar_size is not None and size != nar_size:
            raise DataCorruption(f"plan of {node.digest}: {size} bytes, not {nar_size}")
        plans.put_many({raw: plan for raw, plan in made.items() if raw not in known})
        if nar_sha256 is not None:
            plans.vouch(root, size, nar_sha256)

    async def record(
        self,
        node: Node,
        closure: Mapping[B3Digest, Directory],
        nar_size: int | None,
        nar_sha256: bytes | None,
        hints: Mapping[bytes, Hint] | None = None,
    ) -> None:
        """Keep the plans of ``node``'s NAR, whose size and sha256 the caller established.

        With ``nar_sha256=None`` (a server that streamed the NAR without hashing
        it) the plans serve the NAR but vouch for no NarHash: ``export`` then
        renders once and vouches. Only for directories in a store with plans;
        plans are a cache, so failing to write them is logged, not raised.
        """
        if self._root(node) is None:
            return
        try:
            await asyncio.to_thread(self.record_sync, node, closure, nar_size, nar_sha256, hints)
        except (CastoreError, ValueError) as exc:
            _log.warning("no NAR plan recorded for %s: %s", _what(node), exc)
        else:
            _log.debug("recorded the NAR plans of %s", _what(node))

    async def has_plans(self, node: Node) -> bool:
        """Whether ``node``'s root is vouched for (it was stored whole once)."""
        found = self._root(node)
        if found is None:
            return False
        return await asyncio.to_thread(found[0].vouched, found[2]) is not None

    # -- hashing ------------------------------------------------------------------
    def hash_uploaded(self, tree: ScannedTree) -> Uploaded:
        """The NAR of a just uploaded tree, hashed from what the packs hold (blocking).

        The layout comes from the scan (no Directory is needed: they can be built
        meanwhile); every blob is read back verified, so the NarHash describes
        exactly what was stored, whatever happened to the tree since. Raises
        ``NarRenderError`` / ``DataCorruption`` for missing or damaged content.
        """
        job = self.start_hash_uploaded(tree)
        try:
            return job.result()
        finally:
            job.close()

    def start_hash_uploaded(self, tree: ScannedTree, *, fork: bool | None = None) -> UploadHash:
        """:meth:`hash_uploaded`, started (blocking: it locates the blobs).

        A large NAR is hashed by a forked child (see
        :class:`~tvix_store.nar.planwrite.Sha256Job`) while the caller builds
        Directories; call ``result`` and then ``close``.
        """
        from tvix_store.nar.layout import scanned_layout

        assert self.reader is not None
        segments, size = scanned_layout(tree)
        digests = []
        for seg in segments:
            if not isinstance(seg, bytes):
                if seg.digest is None:
                    raise ValueError("the NAR of files not uploaded")
                digests.append(seg.digest.raw)
        hints = hints_of(self.reader.locate(list(dict.fromkeys(digests))))
        pieces: list[Piece] = []
        for seg in segments:
            if isinstance(seg, bytes):
                pieces.append(seg)
            else:
                assert seg.digest is not None
                raw = seg.digest.raw
                pieces.append(FileRef(raw, seg.size, hints.get(raw, Hint(0, 0))))
        return UploadHash(size, Sha256Job(self.reader, pieces, fork=fork), hints)

    # -- calculate / verify ---------------------------------------------------------
    async def calculate(self, node: Node) -> tuple[int, bytes]:
        """NAR size and sha256 of ``node``: from a vouched root if its content is there.

        Otherwise the NAR is rendered and hashed (failing on missing or corrupt
        content), and its plans recorded: the server-side NAR cache the
        protocol's ``CalculateNAR`` asks for.
        """
        reason = await self.damage(node)
        if reason is not None:  # a read found it damaged: no more vouching (see mark_damaged)
            raise NarRenderError(f"this NAR is damaged in the store: {reason}")
        found = self._root(node)
        vouched = None
        if found is not None:
            plans, reader, root = found

            def check() -> tuple[int, bytes] | None:
                v = plans.vouched(root)
                if v is None:
                    return None
                got = self._pieces(node)
                if got is None or problem_of(reader, files_of(got[0])) is not None:
                    return None
                return v.size, v.sha256

            vouched = await asyncio.to_thread(check)
            if vouched is not None:
                return vouched
        closure = await fetch_closure(node, self.directories) if found is not None else None
        try:
            size, sha = await calculate_nar(node, self.blobs, self.directories, closure=closure)
        except DataCorruption as exc:
            if await self.has_plans(node):  # it was whole once: damaged since
                await self.mark_damaged(node, str(exc))
            raise
        if closure is not None:
            await self.record(node, closure, size, sha)
        return size, sha

    async def verify(self, node: Node, nar_sha256: bytes) -> str | None:
        """Read and verify ``node``'s whole NAR from plans: the problem, or ``None`` if intact.

        ``None`` also if there are no plans to read (nothing to say).
        """
        got = await asyncio.to_thread(self._pieces, node)
        if got is None or self.reader is None:
            return None
        try:
            sha = await asyncio.to_thread(sha256_of, self.reader, got[0])
        except CastoreError as exc:
            return str(exc)
        return None if sha == nar_sha256 else "its NAR does not hash to the recorded NarHash"

    # -- damage marks ---------------------------------------------------------------
    async def damage(self, node: Node) -> str | None:
        """Why ``node``'s NAR is marked damaged, or ``None`` (also without plans)."""
        if self.plans is None:
            return None
        return await asyncio.to_thread(self.plans.damage, node)

    async def mark_damaged(self, node: Node, reason: str) -> None:
        """Remember that ``node``'s NAR cannot be produced (a read found ``reason``).

        Servers then refuse it before sending headers, and stop vouching for it
        (narinfo, ``CalculateNAR``) until the mark is cleared: by a successful
        upload or import of the same content, or a successful ``tvix-store
        export`` (each reads and verifies every blob). Failing to write a mark
        is logged.
        """
        if self.plans is None or not isinstance(node, (DirectoryNode, FileNode)):
            return
        _log.warning("marking the NAR of %s damaged: %s", node.digest, reason)
        try:
            await asyncio.to_thread(self.plans.mark_damaged, node, reason)
        except CastoreError as exc:
            _log.warning("cannot mark the NAR of %s damaged: %s", node.digest, exc)

    async def clear_damage(self, node: Node) -> None:
        """Drop ``node``'s damage mark after its content was stored and verified again."""
        if self.plans is None or not isinstance(node, (DirectoryNode, FileNode)):
            return
        try:
            if await asyncio.to_thread(self.plans.clear_damage, node):
                _log.info("the NAR of %s is no longer marked damaged", node.digest)
        except CastoreError as exc:
            _log.warning("cannot clear the damage mark of %s: %s", node.digest, exc)

    async def unreadable(self, digests: Sequence[B3Digest]) -> str | None:
        """Why one of ``digests`` (all indexed) cannot be read; ``None`` if all can.

        Only the pack store can tell without reading; other services are trusted.
        """
        if self.reader is None:
            return None
        return await asyncio.to_thread(self.reader.problem, [d.raw for d in digests])
