"""Progress of long commands (import, copy, gc, fsck) on stderr, when it is a terminal.

Library code takes a :class:`Progress` (default :data:`NULL`, which does
nothing) and reports through three calls: :meth:`~Progress.stage` starts a
step, :meth:`~Progress.total` says how much there is once that is known,
:meth:`~Progress.advance` says how much more is done. So the library needs
no progress library and costs nothing when called from Python.

The CLI shows a bar (:func:`shown`; tqdm, imported only then) when stderr is
a terminal, ``TERM`` is not ``dumb``, logs are not JSON, and neither
``--no-progress`` nor ``TVIX_STORE_NO_PROGRESS`` turned it off. tqdm was
chosen over rich for how it shares the terminal: ``clear()`` around other
output lets results (stdout) and log lines (stderr) print between redraws,
and a bar is one line redrawn after a carriage return (no cursor movement, no colour, so
``NO_COLOR`` holds). Drawing is rate-limited (at most ~10 redraws a second,
plus one every half second from a timer so elapsed time and ETA move while
one large file is read); an :meth:`~Progress.advance` call costs a few
additions. stdout is never written by the bar: it is the same with or
without a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TextIO

__all__ = ["NO_PROGRESS_ENV", "NULL", "Progress", "no_progress_option", "shown", "wanted"]

NO_PROGRESS_ENV = "TVIX_STORE_NO_PROGRESS"
_REFRESH = 0.5  # seconds between timer redraws (updates redraw at most every 0.1 s)


class Progress:
    """Where long work reports how far it got. This base class shows nothing.

    ``items`` count what the step names in ``unit`` (files, paths, frames);
    ``bytes`` what was read or written. Calls may come from any one thread
    at a time.
    """

    def stage(
        self,
        label: str,
        *,
        unit: str = "files",
        items: int | None = None,
        bytes: int | None = None,
    ) -> None:
        """Start a step (ending the previous one), with its totals if known."""

    def total(self, *, items: int | None = None, bytes: int | None = None) -> None:
        """The current step's totals, once known (the ETA comes from them)."""

    def advance(self, items: int = 0, bytes: int = 0) -> None:
        """``items`` and ``bytes`` more are done."""

    def result(self, line: str) -> None:
        """Print a result line to stdout (around the bar, if one is shown)."""
        print(line, flush=True)


NULL = Progress()


def wanted(no_progress: bool = False, *, json_logs: bool = False) -> bool:
    """Whether the CLI shows progress: see the module."""
    if no_progress or json_logs:
        return False
    if os.environ.get(NO_PROGRESS_ENV, "") not in ("", "0"):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # (closed or replaced stderr)
        return False


def no_progress_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """The ``--no-progress`` flag of a command."""
    import click

    return click.option(
        "--no-progress",
        is_flag=True,
        help=f"Show no progress bar on stderr (env {NO_PROGRESS_ENV}=1); it is shown only"
        " when stderr is a terminal.",
    )(f)


@contextlib.contextmanager
def shown(no_progress: bool = False) -> Iterator[Progress]:
    """The CLI's progress: a bar on stderr if :func:`wanted`, else :data:`NULL`.

    The ``--json`` (JSON logs) of the top-level command counts, when run
    under click.
    """
    json_logs = False
    if "click" in sys.modules:
        import click

        ctx = click.get_current_context(silent=True)
        json_logs = bool(ctx is not None and ctx.find_root().params.get("json_logs"))
    if not wanted(no_progress, json_logs=json_logs):
        yield NULL
        return
    bar = _Bar(sys.stderr)
    try:
        with bar.around_logs():
            yield bar
    finally:
        bar.close()


class _Bar(Progress):
    """A tqdm bar per stage: bytes drive it when their total is known, else items."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.RLock()
        self._bar: Any = None
        self._label = ""
        self._unit = "files"
        self._items = self._bytes = 0
        self._items_total: int | None = None
        self._bytes_total: int | None = None
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None
        self._stdout_tty = _isatty(sys.stdout)
        _watch_forks(self)

    # -- Progress --------------------------------------------------------------
    def stage(
        self,
        label: str,
        *,
        unit: str = "files",
        items: int | None = None,
        bytes: int | None = None,
    ) -> None:
        with self._lock:
            self._end()
            self._label, self._unit = label, unit
            self._items = self._bytes = 0
            self._items_total, self._bytes_total = items, bytes
            self._bar = self._new_tqdm()
            if self._timer is None:
                self._timer = threading.Thread(target=self._tick, name="progress", daemon=True)
                self._timer.start()

    def total(self, *, items: int | None = None, bytes: int | None = None) -> None:
        with self._lock:
            if self._bar is None:
                return
            if items is not None:
                self._items_total = items
            if bytes is not None:
                self._bytes_total = bytes
            bar = self._bar
            by_bytes = self.by_bytes
            bar.unit = "B" if by_bytes else self._unit
            bar.unit_scale = by_bytes
            bar.bar_format = _format(by_bytes, self.shown_total)
            started = bar.start_t
            bar.reset(total=self.shown_total)  # (the rate starts anew: the count may change unit)
            bar.start_t = started
            bar.update(self._bytes if by_bytes else self._items)

    def advance(self, items: int = 0, bytes: int = 0) -> None:
        with self._lock:
            self._items += items
            self._bytes += bytes
            if self._bar is not None:
                self._bar.update(bytes if self.by_bytes else items)

    def result(self, line: str) -> None:
        with self._lock:
            if self._bar is None or not self._stdout_tty:
                print(line, flush=True)
                return
            self._bar.clear(nolock=False)
            print(line, flush=True)
            self._bar.refresh()

    # -- rendering --------------------------------------------------------------
    @property
    def by_bytes(self) -> bool:
        return bool(self._bytes_total)

    @property
    def shown_total(self) -> int | None:
        return self._bytes_total if self.by_bytes else self._items_total

    def extra(self) -> str:
        """The count the bar does not show itself (items when bytes drive it)."""
        if self.by_bytes:
            of = f"/{self._items_total}" if self._items_total is not None else ""
            return f"{self._items}{of} {self._unit}"
        return _size(self._bytes) if self._bytes else ""

    def _new_tqdm(self) -> Any:
        by_bytes = self.by_bytes
        total = self.shown_total
        return _tqdm_class()(
            owner=self,
            total=total,
            desc=self._label,
            unit="B" if by_bytes else self._unit,
            unit_scale=by_bytes,
            file=self._stream,
            leave=True,
            mininterval=0.1,
            ncols=79,
            nrows=20,
            bar_format=_format(by_bytes, total),
        )

    def forked(self) -> None:
        """In a forked child: draw nothing (the parent does), take no lock held at the fork."""
        self._lock = threading.RLock()
        self._bar = None
        self._stop.set()

    def _tick(self) -> None:
        while not self._stop.wait(_REFRESH):
            with self._lock:
                if self._bar is not None:
                    self._bar.refresh()

    def _end(self) -> None:
        if self._bar is not None:
            self._bar.close()  # (drawn once more: the final counts, past the rate limit)
            self._bar = None

    def close(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join()
        with self._lock:
            self._end()

    @contextlib.contextmanager
    def around_logs(self) -> Iterator[None]:
        """Log lines to this terminal clear the bar first, and redraw it after."""
        swapped = []
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self._stream:
                swapped.append((handler, handler.setStream(_Around(self, self._stream))))
        try:
            yield
        finally:
            for handler, old in swapped:
                handler.setStream(old)

    def write_around(self, stream: TextIO, text: str) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.clear(nolock=False)
            stream.write(text)
            stream.flush()
            if self._bar is not None and text.endswith("\n"):
                self._bar.refresh()


class _Around:
    """A stream for a log handler: writes clear and redraw the bar around them."""

    def __init__(self, bar: _Bar, stream: TextIO) -> None:
        self._bar = bar
        self._stream = stream

    def write(self, text: str) -> int:
        self._bar.write_around(self._stream, text)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def _format(by_bytes: bool, total: int | None) -> str:
    if not total:
        return "{desc}: {n_fmt} {unit}{extra} [{elapsed}, {rate_fmt}]"
    count = "{n_fmt}B/{total_fmt}B" if by_bytes else "{n_fmt}/{total_fmt} {unit}"
    return (
        "{desc}: {percentage:3.0f}%|{bar}| " + count + "{extra} [{elapsed}<{remaining}, {rate_fmt}]"
    )


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _width(stream: Any) -> int:
    """Columns for the bar: the terminal's less one (79 if it has no size, as a new pty)."""
    try:
        cols = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        cols = 0
    return cols - 1 if cols > 1 else 79


_LIVE: weakref.WeakSet[_Bar] = weakref.WeakSet()
_TqdmClass: Any = None
_hooked = False


def _watch_forks(bar: _Bar) -> None:
    """Make ``bar`` inert in forked children (ingestion workers that may log)."""
    global _hooked
    if not _hooked and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hooked = True
    _LIVE.add(bar)


def _after_fork_in_child() -> None:
    for bar in list(_LIVE):
        bar.forked()


def _tqdm_class() -> Any:
    """tqdm, adapted (imported here, on first use)."""
    global _TqdmClass
    if _TqdmClass is None:
        from tqdm import tqdm

        class _Tqdm(tqdm):  # type: ignore[misc]
            monitor_interval = 0  # (no monitor thread: ingestion forks workers meanwhile)

            def __init__(self, *args: Any, owner: _Bar, **kw: Any) -> None:
                self.owner = owner
                super().__init__(*args, **kw)

            def display(self, msg: str | None = None, pos: int | None = None) -> Any:
                self.nrows = 20  # (one bar, at the top: a height never matters, nor a pty's 0)
                return super().display(msg, pos)

            @property
            def format_dict(self) -> dict[str, Any]:
                self.ncols = _width(self.fp)  # (each redraw: the terminal may be resized)
                d: dict[str, Any] = super().format_dict
                extra = self.owner.extra()
                d["extra"] = f" · {extra}" if extra else ""
                return d

        # A thread lock: tqdm's default adds a multiprocessing one (a semaphore, and
        # the multiprocessing import), for bars shared across processes, which these are not.
        _Tqdm.set_lock(threading.RLock())
        _TqdmClass = _Tqdm
    return _TqdmClass
