"""Running batches of file ingestion in forked worker processes.

Hashing, chunking and compressing hold the GIL (blake3 below 1 MiB, zstd's
one-shot calls, FastCDC), so threads barely scale: on two cores, two threads
ingest a tree about 1.1× faster than one, two processes about 1.4×. Workers
are forked (no interpreter start-up, the batches are inherited), take batch
numbers from the parent one at a time (so the load balances itself), and
report per-file results. Anything a worker must not do after a fork (use a
SQLite connection) it asks the parent to do: see
:class:`~tvix_castore.blobservice.base.ForkedIngest`.

Messages are pickles with a length prefix, over one pipe each way per
worker. A worker's question waits for the parent's answer (or is sent
ahead: ``ask.later``); a one-way message (``ask(..., reply=False)``, e.g.
index rows to record) waits for nothing, and the parent handles it in order
with that worker's other messages. A worker that dies or fails makes the
whole run fail with a ``StorageError``; the others stop after their
current batch.

Whether to fork at all is :func:`want_fork`'s decision: callers pass
``fork=True``/``False`` to force it (tests do, so that the path under test
runs whatever the machine), ``$TVIX_STORE_FORK`` (``always``/``never``)
forces it for a whole process (e.g. a CLI run), and by default large work
forks when more than one CPU is usable.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import logging
import os
import pickle
import selectors
import struct
import threading
from collections.abc import Callable, Sequence

from tvix_castore.blobservice.base import ForkedIngest
from tvix_castore.digests import B3Digest, after_fork_in_child
from tvix_castore.errors import StorageError, StorageFull

__all__ = [
    "FORK_ENV",
    "Cancelled",
    "fork_child",
    "recv",
    "run_forked",
    "send",
    "usable_cpus",
    "want_fork",
]

FORK_ENV = "TVIX_STORE_FORK"
_log = logging.getLogger(__name__)

Files = Sequence[tuple[str | bytes, int]]
Results = list[B3Digest | Exception]

_LEN = struct.Struct("<Q")
_AHEAD = 2  # batches queued per worker, so it never waits for the parent between them


def send(fd: int, obj: object) -> None:
    """Send ``obj`` to a forked process (or its parent): a pickle with a length prefix."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_LEN.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, n: int) -> bytes | None:
    parts = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def recv(fd: int) -> object | None:
    """The next message :func:`send` sent on ``fd``; ``None`` at end of file."""
    head = _read_exactly(fd, _LEN.size)
    if head is None:
        return None
    body = _read_exactly(fd, _LEN.unpack(head)[0])
    if body is None:
        return None
    msg: object = pickle.loads(body)  # our own forked worker's message
    return msg


def _child(forker: ForkedIngest, batches: Sequence[Files], tasks: int, results: int) -> int:
    """A worker's loop: batch numbers in, ("done", n, results) out.

    Batch numbers queued ahead share the pipe with answers; those that
    arrive while waiting for an answer are kept for later.
    """
    queued: collections.deque[int] = collections.deque()
    ask = _Asker(tasks, results, queued)

    while True:
        task = queued.popleft() if queued else recv(tasks)
        if task is None:
            forker.finish_in_child(ask)
            return 0
        assert isinstance(task, int)
        send(results, ("done", task, forker.ingest_in_child(batches[task], ask)))


class _Asker:
    """A worker's side of questions to the parent (see :class:`ForkedIngest`).

    Answers come back in the order of the questions; batch numbers queued
    ahead that arrive meanwhile are kept for later.
    """

    def __init__(self, tasks: int, results: int, queued: collections.deque[int]) -> None:
        self._tasks = tasks
        self._results = results
        self._queued = queued
        self._asked = 0
        self._answered = 0
        self._answers: dict[int, object] = {}

    def __call__(self, question: object, *, reply: bool = True) -> object:
        if not reply:
            send(self._results, ("tell", question))
            return None
        return self.later(question)()

    def later(self, question: object) -> Callable[[], object]:
        send(self._results, ("ask", question))
        n = self._asked
        self._asked += 1
        return lambda: self._answer(n)

    def _answer(self, n: int) -> object:
        while n not in self._answers:
            msg = recv(self._tasks)
            if isinstance(msg, int):
                self._queued.append(msg)
            elif isinstance(msg, tuple) and msg[0] == "answer":
                self._answers[self._answered] = msg[1]
                self._answered += 1
            else:
                raise StorageError(f"ingestion worker: unexpected reply {msg!r}")
        return self._answers.pop(n)


class _Worker:
    def __init__(self, pid: int, tasks: int, results: int) -> None:
        self.pid = pid
        self.tasks = tasks
        self.results = results
        self.queued = 0

    def give(self, task: int | None) -> None:
        """Queue a batch; with ``None`` (no batches left), let it exit once it is idle."""
        if task is not None:
            send(self.tasks, task)
            self.queued += 1
        elif not self.queued:
            self.close()

    def close(self) -> None:
        if self.tasks >= 0:
            os.close(self.tasks)
            self.tasks = -1


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (``taskset``, cpusets).

    Not ``os.cpu_count()``, which counts the machine's CPUs even when the
    process is confined to one.
    """
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def want_fork(fork: bool | None, *, large: bool) -> bool:
    """Whether to fork: ``fork`` if given, else ``$TVIX_STORE_FORK``, else by size and CPUs.

    ``$TVIX_STORE_FORK`` is ``always`` or ``never`` (``auto``, unset or
    anything else: decide). Deciding, ``large`` work forks when more than
    one CPU is usable: on one, a second process only takes turns with this one.
    """
    if not hasattr(os, "fork"):  # pragma: no cover - not on Linux
        return False
    if fork is not None:
        return fork
    mode = os.environ.get(FORK_ENV, "auto")
    if mode in ("always", "never"):
        return mode == "always"
    if mode != "auto":
        _log.warning("ignoring %s=%r (not always, never or auto)", FORK_ENV, mode)
    return large and usable_cpus() > 1


def fork_child(
    main: Callable[[], int], report: Callable[[BaseException], object], close: Sequence[int]
) -> int:
    """Fork; the child closes ``close``, runs ``main`` and exits with its status.

    Returns the child's pid (in the parent). In the child, the garbage
    collector is off (no finalizer of the parent's objects may run there),
    hashing stays on its thread (see ``after_fork_in_child``), an exception
    goes to ``report`` and exit status 1, and ``os._exit`` skips every exit
    handler of the parent.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its outcome reaches the parent by pipe
        code = 1
        try:
            gc.disable()
            after_fork_in_child()
            for fd in close:
                os.close(fd)
            code = main()
        except BaseException as exc:
            with contextlib.suppress(BaseException):
                report(exc)
        finally:
            os._exit(code)
    return pid


def _full(exc: BaseException) -> str | None:
    """Where a worker ran out of space (``StorageFull.where``), else ``None``."""
    if isinstance(exc, StorageFull):
        return str(exc.where)
    return None


def _fork(forker: ForkedIngest, batches: Sequence[Files]) -> _Worker:
    task_r, task_w = os.pipe()
    result_r, result_w = os.pipe()
    pid = fork_child(
        lambda: _child(forker, batches, task_r, result_w),
        lambda exc: send(result_w, ("fail", f"{type(exc).__name__}: {exc}", _full(exc))),
        (task_w, result_r),
    )
    os.close(task_r)
    os.close(result_w)
    return _Worker(pid, task_w, result_r)


class Cancelled(Exception):
    """``run_forked`` was asked to stop."""


def run_forked(
    forker: ForkedIngest,
    batches: Sequence[Files],
    workers: int,
    cancel: threading.Event | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[Results]:
    """Ingest ``batches`` in ``workers`` forked processes (blocking); per batch its results.

    Setting ``cancel`` stops it within a fraction of a second (``Cancelled``):
    workers get no more batches and exit after the current one. ``on_done``
    is called (on this thread) with each batch's number as its results arrive.
    """
    out: list[Results | None] = [None] * len(batches)
    pool: list[_Worker] = []
    next_task = 0
    sel = selectors.DefaultSelector()

    def take() -> int | None:
        nonlocal next_task
        if next_task >= len(batches):
            return None
        next_task += 1
        return next_task - 1

    try:
        for _ in range(max(1, min(workers, len(batches)))):
            w = _fork(forker, batches)
            pool.append(w)
            sel.register(w.results, selectors.EVENT_READ, w)
            for _ in range(_AHEAD):
                w.give(take())
        live = len(pool)
        while live:
            if cancel is not None and cancel.is_set():
                raise Cancelled("ingestion cancelled")
            for key, _ in sel.select(timeout=0.2):
                w = key.data
                msg = recv(w.results)
                if msg is None:
                    sel.unregister(w.results)
                    live -= 1
                    if w.queued:
                        raise StorageError("an ingestion worker exited unexpectedly")
                    continue
                assert isinstance(msg, tuple)
                if msg[0] == "ask":
                    send(w.tasks, ("answer", forker.answer(msg[1])))
                elif msg[0] == "tell":
                    forker.answer(msg[1])
                elif msg[0] == "done":
                    out[msg[1]] = msg[2]
                    w.queued -= 1
                    w.give(take())
                    if on_done is not None:
                        on_done(msg[1])
                elif len(msg) > 2 and msg[2] is not None:  # out of space: say so, typed
                    raise StorageFull("", msg[2], message=f"ingestion worker failed: {msg[1]}")
                else:
                    raise StorageError(f"ingestion worker failed: {msg[1]}")
    finally:
        for w in pool:
            w.close()
        for w in pool:
            with contextlib.suppress(KeyError, OSError):
                sel.unregister(w.results)
            os.close(w.results)
            os.waitpid(w.pid, 0)
        sel.close()
    missing = [i for i, r in enumerate(out) if r is None]
    if missing:
        raise StorageError(f"ingestion workers returned no results for {len(missing)} batches")
    forker.finish()
    return [r for r in out if r is not None]
