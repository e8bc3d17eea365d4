"""Mounting :class:`~tvix_castore.fs.ops.CastoreFs`: checks first, clean unmount on every way out.

pyfuse3 installs no signal handlers: SIGINT and SIGTERM end every backend
call in flight with EIO (:meth:`CastoreFs.interrupt`), then the loop
(``pyfuse3.terminate``), and unmount (lazily, so a reader blocked in the
mount gets an error instead of keeping it busy). An
external ``fusermount3 -u`` ends the loop too. A mount process killed with
SIGKILL leaves a dead mount ("Transport endpoint is not connected") that
``fusermount3 -u`` removes: nothing here can prevent that, and nothing more
is needed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
from pathlib import Path

import pyfuse3
import pyfuse3.asyncio

from tvix_castore.errors import ConfigError
from tvix_castore.fs.ops import CastoreFs

__all__ = ["check_mountpoint", "mount_device", "serve"]

_log = logging.getLogger(__name__)
_READ_AHEAD_KB = 1024  # (the kernel's default 128 KiB halves sequential reads through FUSE)


def check_mountpoint(path: Path) -> None:
    """Refuse a mountpoint that is missing, not a directory, already mounted or not empty."""
    if os.path.ismount(path):
        raise ConfigError(f"mountpoint {path} is already a mount point")
    try:
        entries = os.listdir(path)
    except FileNotFoundError:
        raise ConfigError(f"mountpoint {path} does not exist") from None
    except NotADirectoryError:
        raise ConfigError(f"mountpoint {path} is not a directory") from None
    except OSError as exc:  # (e.g. a dead FUSE mount: ENOTCONN)
        raise ConfigError(f"mountpoint {path}: {exc.strerror}") from exc
    if entries:
        raise ConfigError(f"mountpoint {path} is not empty")


def mount_device(path: Path) -> str | None:
    """``major:minor`` of the mount at ``path`` (``None``: none), from /proc/self/mountinfo.

    (Not ``os.stat``: before the loop runs, a stat of our own mount would wait
    for an answer only this process can give.)
    """
    want = str(path)  # (the caller resolves it: resolving it here could stat the mount)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        fields = line.split()
        if len(fields) > 4 and fields[4].encode().decode("unicode_escape") == want:
            found = fields[2]  # (the last one is the newest mount there)
    return found


def _raise_read_ahead(path: Path) -> None:
    """Best effort: larger kernel read-ahead for this mount (root only; harmless otherwise).

    Run in a thread once the loop serves: the kernel sets the read-ahead when
    it gets the answer to FUSE's INIT, so the stat (answered by the loop) waits
    for that first.
    """
    os.stat(path)
    device = mount_device(path)
    if device is None:
        return
    try:
        Path(f"/sys/class/bdi/{device}/read_ahead_kb").write_text(str(_READ_AHEAD_KB))
    except OSError as exc:
        _log.debug("cannot raise the read-ahead of %s: %s", path, exc)


async def serve(
    fs: CastoreFs,
    mountpoint: Path,
    *,
    allow_other: bool = False,
    max_tasks: int = 64,
) -> None:
    """Mount ``fs`` read-only at ``mountpoint`` and serve until a signal or an unmount."""
    import asyncio

    check_mountpoint(mountpoint)
    mountpoint = mountpoint.resolve()
    pyfuse3.asyncio.enable()
    options = {"fsname=tvix-store", "subtype=tvix-store", "ro", "default_permissions"}
    if allow_other:
        options.add("allow_other")
    try:
        pyfuse3.init(fs, str(mountpoint), options)
    except RuntimeError as exc:
        raise ConfigError(f"cannot mount at {mountpoint}: {exc}") from exc

    def stop() -> None:
        fs.interrupt()  # (first: a request waiting for a backend would keep main() running)
        pyfuse3.terminate()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    read_ahead = asyncio.ensure_future(asyncio.to_thread(_raise_read_ahead, mountpoint))
    # What exists now (modules, the opened store) lives as long as the mount:
    # out of the collector's full passes, which a tree walk's tens of
    # thousands of new entries would otherwise trigger over and over (a
    # third of a cold walk's CPU, measured).
    gc.freeze()
    try:
        _log.info("mounted at %s (read-only); unmount with Ctrl-C or fusermount3 -u", mountpoint)
        await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
    finally:
        read_ahead.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
        _log.info("unmounted %s", mountpoint)
