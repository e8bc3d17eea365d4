"""The mount process: how it ends (SIGINT, SIGTERM, an external unmount, kill -9), a reader blocked
in it, and the same filesystem over a remote daemon.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.compat.trees import TREES_BY_NAME, expected, materialize, snapshot
from tests.store.conftest import start_daemon

from .conftest import Mounts, import_path, mounted, run


def _one(home: Path, tmp_path: Path) -> str:
    src = tmp_path / "src"
    src.mkdir()
    (src / "file").write_bytes(b"some bytes\n" * 100_000)  # (1.1 MB: read through the reader)
    return import_path(home, src)


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "fusermount3 -u"])
def test_every_way_out_exits_0_with_the_mount_gone(
    how: str, tmp_path: Path, home: Path, mounts: Mounts
) -> None:
    base = _one(home, tmp_path)
    m = mounts.start(home)
    assert (m.at / base / "file").stat().st_size == 1_100_000
    if how == "fusermount3 -u":
        run(["fusermount3", "-u", m.at])
        rc = m.stop(0)  # (signal 0: only wait)
    else:
        rc = m.stop(getattr(signal, how))
    assert rc == 0, m.log()
    assert not mounted(m.at) and os.listdir(m.at) == []


def test_kill_9_leaves_nothing_fusermount_cannot_clear(
    tmp_path: Path, home: Path, mounts: Mounts
) -> None:
    base = _one(home, tmp_path)
    m = mounts.start(home)
    assert (m.at / base / "file").stat().st_size == 1_100_000
    m.proc.kill()
    m.proc.wait(timeout=30)
    with pytest.raises(OSError) as err:
        os.listdir(m.at / base)  # (not a stat: the kernel may answer that from its cache)
    assert err.value.errno == errno.ENOTCONN
    run(["fusermount3", "-u", m.at])
    assert not mounted(m.at) and os.listdir(m.at) == []
    again = mounts.start(home, at=m.at)  # (and the mountpoint can be used again)
    assert (again.at / base / "file").read_bytes() == b"some bytes\n" * 100_000
    assert again.stop() == 0


def test_unmount_while_a_reader_is_blocked_does_not_hang(
    tmp_path: Path, home: Path, mounts: Mounts
) -> None:
    base = _one(home, tmp_path)
    gate = tmp_path / "gate"  # (never created: every blob fetch waits)
    m = mounts.start(home, counting=True, gate=gate)
    reader = subprocess.Popen(["cat", m.at / base / "file"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not any(line.startswith("pathinfo") for line in m.fetched()):
        assert time.monotonic() < deadline and reader.poll() is None
        time.sleep(0.02)
    time.sleep(0.3)  # (cat is now waiting inside read())
    assert reader.poll() is None
    assert m.stop(signal.SIGTERM) == 0, m.log()
    assert reader.wait(timeout=30) != 0  # (its read failed: it did not get made-up bytes)
    assert not mounted(m.at)


def test_the_same_over_a_daemon(tmp_path: Path, home: Path, mounts: Mounts) -> None:
    for name in ("mixed", "name-bytes", "exec-bits", "large-64MiB"):
        materialize(TREES_BY_NAME[name].root, bytes(tmp_path / name))
    bases = {name: import_path(home, tmp_path / name) for name in ("mixed", "name-bytes")}
    bases |= {name: import_path(home, tmp_path / name) for name in ("exec-bits", "large-64MiB")}
    daemon = start_daemon(home, tmp_path / "daemon.log")
    try:
        url = daemon.url
        flags = ["--blob-service-addr", url, "--directory-service-addr", url]
        flags += ["--path-info-service-addr", url]
        m = mounts.start(tmp_path / "client-home", *flags)
        for name, base in bases.items():
            assert snapshot(bytes(m.at / base)) == expected(TREES_BY_NAME[name].root), name
            run(["diff", "-r", "--no-dereference", tmp_path / name, m.at / base])
        with pytest.raises(FileNotFoundError):
            (m.at / ("0" * 32 + "-nothing")).stat()
        assert m.stop() == 0
    finally:
        daemon.stop()
