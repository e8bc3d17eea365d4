"""A chunked blob read out of packs in windows, handed out as views of its verified frames.

A large blob's chunks are written one after another into the same frames,
so a run of them is one slice of a decoded (and verified) frame payload.
:class:`PackedChunkReader` loads a window of chunks (about 4 MiB) in one
worker thread: one index lookup for the window, each frame decoded once
(through the reader's shared cache), each chunk checked against its frame's
member table (key = the chunk's BLAKE3, computed when the frame was
verified) and the adjacent ones joined into one view. While a window is
read, the next ones are loaded. :meth:`read_view` returns a slice of those
views without copying, unless a read spans two segments (a frame boundary).

Chunks the packs cannot serve this way (a legacy layout, a damaged or moved
frame) are read through :meth:`PackReader.read_located`, which verifies
them and raises :class:`~tvix_castore.errors.DataCorruption` naming why.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tvix_castore.blobservice.base import BlobReader, ChunkMeta
from tvix_castore.digests import B3Digest
from tvix_castore.errors import DataCorruption, NotFound
from tvix_castore.packstore.reader import Chunked, DecodedFrame, FrameRef, Member, PackReader

if TYPE_CHECKING:
    import asyncio  # (at run time only where awaited: plain exports load no event loop)

__all__ = ["PackedChunkReader"]

_WINDOW = 4 << 20  # bytes of chunks loaded per worker-thread call
Segment = tuple[int, memoryview]
"""Blob offset of a run of verified bytes, and the bytes."""


def _windows(chunks: Sequence[ChunkMeta], window: int) -> list[int]:
    """Index of the first chunk of each window (each window ≥ ``window`` bytes, but the last)."""
    out: list[int] = []
    filled = window
    for i, c in enumerate(chunks):
        if filled >= window:
            out.append(i)
            filled = 0
        filled += c.size
    return out


class PackedChunkReader(BlobReader):
    """Seekable reader over a chunked blob in packs (see the module).

    Memory: the ``read_ahead + 1`` windows it holds (their frames).
    """

    def __init__(
        self,
        reader: PackReader,
        blob: B3Digest,
        chunks: Sequence[ChunkMeta],
        *,
        window: int = _WINDOW,
        read_ahead: int = 1,
    ) -> None:
        self._reader = reader
        self._blob = blob
        self._chunks = list(chunks)
        self._starts: list[int] = []
        total = 0
        for c in self._chunks:
            self._starts.append(total)
            total += c.size
        self.size = total
        self._first = _windows(self._chunks, window)  # chunk index of each window
        self._at = [self._starts[i] for i in self._first]  # blob offset of each window
        self._read_ahead = read_ahead
        self._pending: dict[int, asyncio.Future[list[Segment]]] = {}
        self._cur = -1
        self._segs: list[Segment] = []
        self._seg_at: list[int] = []
        self._pos = 0

    def tell(self) -> int:
        return self._pos

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            new = offset
        elif whence == io.SEEK_CUR:
            new = self._pos + offset
        elif whence == io.SEEK_END:
            new = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if new < 0:
            raise ValueError("seek to a negative offset")
        if new > self.size:
            raise ValueError("seeked beyond EOF")
        self._pos = new
        return new

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.size - self._pos
        return bytes(await self.read_view(n))

    async def read_view(self, n: int) -> bytes | memoryview:
        """Exactly ``min(n, size - tell())`` bytes: a view when they lie in one segment."""
        n = min(n, self.size - self._pos)
        if n <= 0:
            return b""
        first = await self._take(n)
        if len(first) == n:
            return first
        parts = [first]
        got = len(first)
        while got < n:
            part = await self._take(n - got)
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    async def _take(self, n: int) -> memoryview:
        """Up to ``n`` bytes at the position, from one segment; advances."""
        w = bisect.bisect_right(self._at, self._pos) - 1
        if w != self._cur:
            await self._enter(w)
        s = bisect.bisect_right(self._seg_at, self._pos) - 1
        at, view = self._segs[s]
        off = self._pos - at
        out = view[off : off + n]
        self._pos += len(out)
        return out

    async def _enter(self, w: int) -> None:
        """Make window ``w`` current; start loading the ones after it."""
        import asyncio

        for j in list(self._pending):  # (a seek elsewhere: drop what is not needed)
            if not w <= j <= w + self._read_ahead:
                _drop(self._pending.pop(j))
        task = self._pending.pop(w, None)
        for j in range(w + 1, min(w + 1 + self._read_ahead, len(self._first))):
            if j not in self._pending:
                self._pending[j] = asyncio.ensure_future(asyncio.to_thread(self._load, j))
        self._segs, self._cur = [], -1
        segs = await (task if task is not None else asyncio.to_thread(self._load, w))
        self._segs, self._seg_at, self._cur = segs, [at for at, _ in segs], w

    def _load(self, w: int) -> list[Segment]:
        """Window ``w``'s bytes, verified, as few segments as the frames allow (blocking)."""
        a = self._first[w]
        b = self._first[w + 1] if w + 1 < len(self._first) else len(self._chunks)
        chunks = self._chunks[a:b]
        try:
            return self._segments(self._starts[a], chunks)
        except DataCorruption as exc:
            raise DataCorruption(f"blob {self._blob}: chunk {exc}") from exc

    def _segments(self, pos: int, chunks: Sequence[ChunkMeta]) -> list[Segment]:
        reader = self._reader
        where = reader.locate([c.digest.raw for c in chunks])
        frames: dict[FrameRef, DecodedFrame | None] = {}
        segs: list[Segment] = []
        run: tuple[DecodedFrame, int, int] | None = None  # frame, payload start, end of the run
        run_at = pos
        for c in chunks:
            raw = c.digest.raw
            loc = where.get(raw)
            if loc is None:
                raise NotFound(f"blob {self._blob}: chunk {c.digest} not found")
            if isinstance(loc, Chunked):
                raise DataCorruption(f"{c.digest} is itself chunked")
            decoded = None
            if isinstance(loc, Member) and loc.size == c.size:
                if loc.frame not in frames:
                    frames[loc.frame] = reader.decoded(loc.frame)
                decoded = frames[loc.frame]
                m = None if decoded is None else decoded.offsets.get(loc.offset)
                if m is None or m.key != raw or m.size != c.size:
                    decoded = None  # (not where indexed: the slow path says why)
            if decoded is not None:
                assert isinstance(loc, Member)
                if run is not None and run[0] is decoded and run[2] == loc.offset:
                    run = (decoded, run[1], loc.offset + c.size)
                else:
                    if run is not None:
                        segs.append((run_at, run[0].payload[run[1] : run[2]]))
                    run, run_at = (decoded, loc.offset, loc.offset + c.size), pos
            else:  # (not a frame member this reader can slice: the checked slow path)
                if run is not None:
                    segs.append((run_at, run[0].payload[run[1] : run[2]]))
                    run = None
                data = reader.read_located(raw, loc)
                if len(data) != c.size:
                    raise DataCorruption(f"{c.digest} has {len(data)} bytes, index says {c.size}")
                segs.append((pos, memoryview(data)))
            pos += c.size
        if run is not None:
            segs.append((run_at, run[0].payload[run[1] : run[2]]))
        return segs

    async def aclose(self) -> None:
        for task in self._pending.values():
            _drop(task)
        self._pending.clear()
        self._segs, self._seg_at, self._cur = [], [], -1


def _drop(task: asyncio.Future[list[Segment]]) -> None:
    """Cancel a window load nobody will wait for (its failure, if it failed, is not an error)."""
    if task.done():
        if not task.cancelled():
            task.exception()
    else:
        task.cancel()
