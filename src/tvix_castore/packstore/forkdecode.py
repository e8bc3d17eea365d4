"""Decoding a known run of frames in forked children, into shared memory.

zstd releases the GIL while it decompresses, but blake3 keeps it for inputs
below 1 MiB, and every member of a frame is hashed on its own to check it:
in one process, verifying a NAR's frames and writing the NAR take turns on
one core (measured on the stdlib tree: 1.5 core-s to decode and verify
779 MB, 0.8 s of Python writing the NAR). Here forked children decode and
verify frames beside the writer, each into a slot of an anonymous shared
mapping made before the fork; the parent gets the verified member keys by
pipe and hands out views of the slot, never copying the payload.

A slot is reused only once the writer says the views it handed out are
consumed (:meth:`ForkedDecoder.flushed`). Anything off the happy path (no
free slot, a frame larger than a slot, a damaged frame, a child gone) makes
:meth:`ForkedDecoder.result` return ``None``, and the caller decodes the
frame itself, which reports damage as it always does: the children only
ever save work.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
from collections import deque
from typing import NamedTuple

from tvix_castore.errors import DataCorruption
from tvix_castore.forked import fork_child, recv, send
from tvix_castore.packstore.format import decode_payload
from tvix_castore.packstore.reader import DecodedFrame, FrameRef, PackReader, decoded_frame

__all__ = ["ForkedDecoder", "SLOT_BYTES"]

SLOT_BYTES = 8 << 20  # a BLOBS frame holds ~4 MiB (SEGMENT_TARGET) plus its last blob
_log = logging.getLogger(__name__)


def _child(reader: PackReader, shm: mmap.mmap, slot_bytes: int, tasks: int, out: int) -> int:
    """A child's loop: ``(slot, ref)`` in, ``("ok", frame head)`` or ``("no", why)`` out."""
    fds: dict[str, int] = {}
    while (task := recv(tasks)) is not None:
        assert isinstance(task, tuple)
        slot, ref = task
        assert isinstance(slot, int) and isinstance(ref, FrameRef)
        where = f"pack {ref.pack} at {ref.offset}"
        try:
            fd = fds.get(ref.pack)
            if fd is None:
                fd = fds[ref.pack] = os.open(reader.pack_path(ref.pack), os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(fd, ref.length, ref.offset)
            head, payload = decode_payload(data, where, ref.offset)
        except (OSError, DataCorruption) as exc:
            send(out, ("no", f"{type(exc).__name__}: {exc}"))
            continue
        if len(payload) > slot_bytes:
            send(out, ("no", f"{where}: {len(payload)} bytes, more than a slot"))
            continue
        at = slot * slot_bytes
        shm[at : at + len(payload)] = payload
        send(out, ("ok", head))
    return 0


class _Worker(NamedTuple):
    pid: int
    tasks: int  # parent -> child
    results: int  # child -> parent


class _Pending(NamedTuple):
    worker: int
    slot: int


class ForkedDecoder:
    """Decodes frames in ``workers`` forked children; for one NAR writer (not thread-safe).

    :meth:`submit` frames in the order they will be asked for (each child
    answers in order), :meth:`result` each, :meth:`release` it when no view of
    it is handed out any more, :meth:`flushed` when those handed out are
    consumed, and :meth:`close` at the end.
    """

    def __init__(
        self, reader: PackReader, *, workers: int, slots: int, slot_bytes: int = SLOT_BYTES
    ) -> None:
        self._reader = reader
        self._slot_bytes = slot_bytes
        self._shm = mmap.mmap(-1, slots * slot_bytes)  # MAP_SHARED | MAP_ANONYMOUS
        self._view = memoryview(self._shm)
        self._free = list(range(slots))
        self._releasing: list[int] = []  # slots whose views may still be unconsumed
        self._pending: dict[FrameRef, _Pending] = {}
        self._queued: list[deque[FrameRef]] = [deque() for _ in range(workers)]
        self._answers: dict[FrameRef, object] = {}
        self._slot_of: dict[FrameRef, int] = {}  # results handed out, until released
        self._workers: list[_Worker | None] = []
        self._next = 0
        for _ in range(workers):
            self._workers.append(self._fork())

    def _fork(self) -> _Worker:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        pid = fork_child(
            lambda: _child(self._reader, self._shm, self._slot_bytes, task_r, result_w),
            lambda exc: None,
            (task_w, result_r),
        )
        os.close(task_r)
        os.close(result_w)
        return _Worker(pid, task_w, result_r)

    def submit(self, ref: FrameRef) -> bool:
        """Have a child decode ``ref``; ``False`` if none can now (decode it yourself)."""
        if ref in self._pending or ref in self._slot_of:
            return True
        alive = [i for i, w in enumerate(self._workers) if w is not None]
        if not self._free or not alive:
            return False
        # (round robin: frames take about as long as each other)
        i = alive[self._next % len(alive)]
        self._next += 1
        worker = self._workers[i]
        assert worker is not None
        slot = self._free.pop()
        try:
            send(worker.tasks, (slot, ref))
        except OSError:
            self._free.append(slot)
            self._lost(i)
            return False
        self._pending[ref] = _Pending(i, slot)
        self._queued[i].append(ref)
        return True

    def result(self, ref: FrameRef) -> DecodedFrame | None:
        """``ref`` decoded and verified by a child; ``None`` if it was not (see the module)."""
        pending = self._pending.get(ref)
        if pending is None:
            slot = self._slot_of.get(ref)
            if slot is None:
                return None
            answer = self._answers.get(ref)
        else:
            while ref not in self._answers:
                if not self._receive(pending.worker):
                    break
            answer = self._answers.get(ref)
            del self._pending[ref]
            slot = pending.slot
            if not isinstance(answer, tuple) or answer[0] != "ok":
                if isinstance(answer, tuple):
                    _log.debug("a forked frame decoder did not decode %s: %s", ref, answer[1])
                self._answers.pop(ref, None)
                self._free.append(slot)
                return None
            self._slot_of[ref] = slot
        assert isinstance(answer, tuple)
        head = answer[1]
        at = slot * self._slot_bytes
        return decoded_frame(ref, head, self._view[at : at + head.raw])

    def _receive(self, i: int) -> bool:
        """One answer from worker ``i``; ``False`` if it is gone."""
        worker = self._workers[i]
        if worker is None or not self._queued[i]:
            return False
        msg = recv(worker.results)
        if msg is None:
            self._lost(i)
            return False
        self._answers[self._queued[i].popleft()] = msg
        return True

    def _lost(self, i: int) -> None:
        worker = self._workers[i]
        if worker is None:
            return
        self._workers[i] = None
        _log.debug("a forked frame decoder went away; decoding its frames here")
        self._stop(worker)
        for ref in self._queued[i]:  # (answered None: decoded by the caller)
            self._answers.pop(ref, None)
        self._queued[i].clear()

    def release(self, ref: FrameRef) -> None:
        """No more views of ``ref`` are handed out (their slot is reused after :meth:`flushed`)."""
        slot = self._slot_of.pop(ref, None)
        self._answers.pop(ref, None)
        if slot is not None:
            self._releasing.append(slot)

    def flushed(self) -> None:
        """Every view handed out so far has been consumed."""
        self._free.extend(self._releasing)
        self._releasing.clear()

    @staticmethod
    def _stop(worker: _Worker) -> None:
        for fd in (worker.tasks, worker.results):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(worker.pid, 0)

    def close(self) -> None:
        """Stop the children (blocking). Views handed out must not be used after this."""
        for i, worker in enumerate(self._workers):
            if worker is not None:
                self._workers[i] = None
                self._stop(worker)
        self._pending.clear()
        self._slot_of.clear()
        self._answers.clear()
        with contextlib.suppress(BufferError):  # (a view still exported: freed with it)
            self._view.release()
            self._shm.close()
