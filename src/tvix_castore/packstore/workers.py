"""Forked ingestion into packs: workers read, hash, compress and append; the parent indexes.

A SQLite connection must not cross a fork, so a worker asks the parent
which blobs are stored (a batch ahead, while it reads the next) and tells
it which new ones it took on ("claims"), so other workers skip them too.
Each worker appends to a pack of its own and keeps its segment open across
batches (segments of a few files compress badly); after its last batch it
writes the rest, ``fsync``s once and sends the parent its frames, which the
parent indexes once every worker is done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from tvix_castore.blobservice.base import Ask, ForkedIngest
from tvix_castore.digests import B3Digest
from tvix_castore.errors import StorageError
from tvix_castore.packstore.index import NewFrame
from tvix_castore.packstore.writer import PackWriter, SegmentBuilder, Stager, read_files

if TYPE_CHECKING:
    from tvix_castore.packstore.service import PackBlobService, PackTxn

__all__ = ["ForkedPackIngest"]


class ForkedPackIngest(ForkedIngest):
    """See the module docstring; one per ingestion run."""

    def __init__(self, svc: PackBlobService, txn: PackTxn | None) -> None:
        self._svc = svc
        self._txn = txn
        # the worker's
        self._writer: PackWriter | None = None
        self._stager: Stager | None = None
        self._frames: list[NewFrame] = []
        # the parent's
        self._claimed: set[bytes] = set()
        self._pending: list[NewFrame] = []

    def _worker_stager(self, ask: Ask) -> Stager:
        if self._stager is None:
            svc = self._svc
            self._writer = PackWriter(svc.pack_dir, fsync=svc.writer.fsync)
            builder = SegmentBuilder(self._writer, svc.level, self._frames.append)

            def present(raws: list[bytes]) -> Callable[[], set[bytes]]:
                answer = ask.later(("present", raws))
                return lambda: cast(set[bytes], answer())

            def claim(raws: list[bytes]) -> None:
                ask(("claim", raws), reply=False)

            self._stager = Stager(builder, present, claim=claim)
        return self._stager

    def ingest_in_child(
        self, files: Sequence[tuple[str | bytes, int]], ask: Ask
    ) -> list[B3Digest | Exception]:
        stager = self._worker_stager(ask)
        out = read_files(files, self._svc.threshold, self._svc.chunker, stager)
        stager.flush()  # (answers are due before the next batch number is read)
        return out

    def finish_in_child(self, ask: Ask) -> None:
        if self._stager is None or self._writer is None:
            return
        self._stager.builder.flush()
        if self._frames:
            self._writer.sync([f.pack for f in self._frames])
            ask(("frames", self._frames), reply=False)
        self._writer.close()

    def answer(self, question: object) -> object:
        match question:
            case ("present", list(raws)):
                claimed = self._claimed
                out = {r for r in raws if r in claimed}
                out |= self._svc._present([r for r in raws if r not in claimed])
                return out
            case ("claim", list(raws)):
                self._claimed.update(raws)
                return None
            case ("frames", list(frames)):
                self._pending += frames
                return None
        return super().answer(question)

    def finish(self) -> None:
        """Index the workers' frames (their bytes are fsynced already)."""
        frames, self._pending = self._pending, []
        claimed, self._claimed = self._claimed, set()
        written = {m.key for f in frames for m in f.members}
        if not claimed <= written:  # (e.g. a wrapper that does not pass finish_in_child on)
            missing = len(claimed - written)
            raise StorageError(f"ingestion workers did not hand over {missing} blobs they took on")
        if self._txn is not None:
            self._txn.add_frames(frames)
            return
        if frames:
            with self._svc.index.transaction() as txn:
                for frame in frames:
                    txn.add_frame(frame)
