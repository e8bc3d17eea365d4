"""Real FUSE mounts of ``tvix-store mount`` (tests run as root), started and always removed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from tests.store.conftest import TVIX, ok, tvix, tvix_env
from tvix_castore.fs.mount import mount_device

__all__ = ["Mount", "Mounts", "import_path", "ok", "tvix"]


def import_path(home: Path, path: Path) -> str:
    """``tvix-store import PATH``: the store path's basename."""
    return Path(ok(tvix(home, "import", path)).decode().strip()).name


@dataclass
class Mount:
    """A running mount process and its mountpoint."""

    proc: subprocess.Popen[bytes]
    at: Path
    log_path: Path
    fetches: Path | None = None  # (a counting mount's fetch log)
    _log: IO[bytes] | None = field(default=None, repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def fetched(self) -> list[str]:
        """The fetch lines so far (counting mounts only)."""
        assert self.fetches is not None
        return self.fetches.read_text().splitlines() if self.fetches.exists() else []

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the mount; its exit status (it must exit, and the mount must be gone)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=30)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
        return rc

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        if mounted(self.at):
            subprocess.run(["fusermount3", "-u", "-z", str(self.at)], check=False)
        if self._log is not None:
            self._log.close()


def mounted(path: Path) -> bool:
    """Whether ``path`` is a mount point (from mountinfo: never stats the mount itself)."""
    return mount_device(path.resolve(strict=False)) is not None


class Mounts:
    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._all: list[Mount] = []

    def start(
        self,
        home: Path,
        *args: str,
        at: Path | None = None,
        counting: bool = False,
        gate: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Mount:
        """Mount the store at ``home`` (``tvix-store mount ARGS``, or the counting mount)."""
        n = len(self._all)
        at = at or self._tmp / f"mnt{n}"
        at.mkdir(exist_ok=True)
        log_path = self._tmp / f"mount{n}.log"
        log = log_path.open("wb")
        fetches = None
        if counting:
            fetches = self._tmp / f"fetches{n}.log"
            argv = [sys.executable, "-m", "tests.fs.counting_mount", str(fetches), str(at), *args]
            if gate is not None:
                argv += ["--gate", str(gate)]
        else:
            argv = [TVIX, "mount", str(at), *args]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=tvix_env(home, env),
            cwd=Path(__file__).resolve().parents[2],
        )
        m = Mount(proc, at, log_path, fetches, log)
        self._all.append(m)
        deadline = time.monotonic() + 60
        while not mounted(at):  # (then requests queue until the loop serves them)
            if proc.poll() is not None or time.monotonic() > deadline:
                m.cleanup()
                raise AssertionError(f"mount did not start:\n{m.log()}")
            time.sleep(0.02)
        return m

    def cleanup(self) -> None:
        for m in self._all:
            m.cleanup()


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    m = Mounts(tmp_path)
    try:
        yield m
    finally:
        m.cleanup()


def run(argv: Sequence[str | os.PathLike[str]], timeout: float = 60) -> bytes:
    """Run a command on the mount (bounded: a hang fails the test instead of the suite)."""
    proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    assert proc.returncode == 0, (argv, proc.stderr.decode(errors="replace"))
    return proc.stdout


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """This test's own ``TVIX_STORE_HOME``."""
    return tmp_path / "tvix-home"
