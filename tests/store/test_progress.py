"""Progress bars: real ``tvix-store`` processes with stderr a pseudo-terminal, or a pipe.

The same command runs on identically prepared stores once with stderr a
pipe and once with stderr a pty (stdout is a pipe both times): stdout must
be the same (and right), a pipe gets no redrawing (no carriage return
without a newline, no escape sequence), a pty gets it, and the bar's last
drawing shows the work done; switched off, a pty gets none either.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import random
import re
import struct
import subprocess
import termios
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.compat.oracle import Nix
from tests.servers import S3, Postgres
from tvix_castore.registry import blob_service_from_url

from .conftest import TVIX, ok, tvix, tvix_env
from .test_cli import nix_add_raw

# A terminal that can redraw, whatever the environment running the tests says.
TTY_ENV = {"TERM": "xterm", "TVIX_STORE_NO_PROGRESS": ""}
REDRAW = re.compile(rb"\r(?!\n)")  # (a pty turns each "\n" into "\r\n")
FILES = 1200
DIRS = 12


def make_tree(root: Path, files: int = FILES, dirs: int = DIRS, seed: int = 17) -> Path:
    """``files`` files of distinct random content (1 B - 3 kB) in ``dirs`` directories."""
    rng = random.Random(seed)
    for i in range(files):
        d = root / f"d{i % dirs:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:05d}").write_bytes(rng.randbytes(rng.randrange(1, 3000)))
    return root


def on_pty(
    home: Path, *args: str | os.PathLike[str], extra_env: dict[str, str] | None = None
) -> tuple[bytes, bytes]:
    """``tvix-store ARGS`` with stderr a pty (160 columns): (stdout, everything on the pty)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    screen: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # (EIO: every writer closed its end)
                return
            if not data:
                return
            screen.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.Popen(
            [TVIX, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
            env=tvix_env(home, {**TTY_ENV, **(extra_env or {})}),
        )
    finally:
        os.close(slave)
    out, _ = proc.communicate(timeout=120)
    reader.join(timeout=60)
    assert not reader.is_alive()
    os.close(master)
    err = b"".join(screen)
    assert proc.returncode == 0, f"{args!r} exited {proc.returncode}:\n{err.decode()}"
    return out, err


def on_pipe(
    home: Path, *args: str | os.PathLike[str], extra_env: dict[str, str] | None = None
) -> tuple[bytes, bytes]:
    proc = tvix(home, *args, extra_env={**TTY_ENV, **(extra_env or {})})
    return ok(proc), proc.stderr


def assert_no_bar(err: bytes) -> None:
    assert not REDRAW.search(err), err
    assert b"\x1b" not in err, err


def last_count(err: bytes, label: bytes, unit: bytes) -> tuple[int, int]:
    """The ``done/total UNIT`` of the last drawing of the bar ``label``."""
    drawings = [d for d in re.split(rb"\r\n|\r|\n", err) if d.startswith(label + b":")]
    assert drawings, f"no drawing of {label!r} in {err!r}"
    m = re.search(rb"(\d+)/(\d+) " + unit, drawings[-1])
    assert m, drawings[-1]
    return int(m[1]), int(m[2])


def without_times(text: bytes) -> bytes:
    """A text report with its durations (which differ between any two runs) blanked."""
    return re.sub(rb"\d+\.\d+ s\b", b"T s", text)


def without_seconds(report: bytes) -> Any:
    data = json.loads(report)
    data.pop("seconds", None)
    return data


@pytest.mark.parametrize("fork", ["never", "always"])
def test_import(tmp_path: Path, nix: Nix, fork: str) -> None:
    tree = make_tree(tmp_path / "tree")
    env = {"TVIX_STORE_FORK": fork}  # threads, or forked workers reporting by pipe
    piped, piped_err = on_pipe(tmp_path / "a", "import", tree, extra_env=env)
    shown, screen = on_pty(tmp_path / "b", "import", tree, extra_env=env)
    off, off_screen = on_pty(tmp_path / "c", "import", "--no-progress", tree, extra_env=env)
    assert piped == shown == off == nix_add_raw(nix, tree)
    assert_no_bar(piped_err)
    assert_no_bar(off_screen)
    assert REDRAW.search(screen)
    assert last_count(screen, b"import tree", b"files") == (FILES, FILES)


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["import", "--no-progress"], {}),
        (["import"], {"TVIX_STORE_NO_PROGRESS": "1"}),
        (["import"], {"TERM": "dumb"}),
        (["--json", "import"], {}),  # JSON logs: stderr is for a program
    ],
    ids=["flag", "env", "dumb-terminal", "json-logs"],
)
def test_switched_off(tmp_path: Path, nix: Nix, args: list[str], env: dict[str, str]) -> None:
    tree = make_tree(tmp_path / "tree", files=40, dirs=2)
    out, screen = on_pty(tmp_path / "home", *args, tree, extra_env=env)
    assert out == nix_add_raw(nix, tree)
    assert_no_bar(screen)


def test_import_several_paths_stdout_on_the_same_terminal(tmp_path: Path, nix: Nix) -> None:
    """Results between the bars' drawings: each line whole on stdout, in argument order."""
    trees = [make_tree(tmp_path / n, files=30, dirs=3, seed=i) for i, n in enumerate("xyz")]
    out, screen = on_pty(tmp_path / "home", "import", *trees)
    assert out == b"".join(nix_add_raw(nix, t) for t in trees)
    for name in (b"x", b"y", b"z"):
        assert last_count(screen, b"import " + name, b"files") == (30, 30)


def test_copy(tmp_path: Path, nix: Nix) -> None:
    paths = [
        nix.add(make_tree(tmp_path / f"src{i}", files=50 + i, dirs=3, seed=i)) for i in range(3)
    ]
    (tmp_path / "single").write_bytes(b"one file\n")
    paths.append(nix.add(tmp_path / "single"))
    closure = tmp_path / "closure.json"
    closure.write_bytes(
        nix.run("nix", "path-info", *nix.store_args, "--json", "--recursive", *paths)
    )
    args = ("copy", "--root", str(nix.store), str(closure))
    piped, piped_err = on_pipe(tmp_path / "a", *args)
    shown, screen = on_pty(tmp_path / "b", *args)
    assert piped == shown
    assert sorted(piped.decode().split()) == sorted(paths)
    assert_no_bar(piped_err)
    assert REDRAW.search(screen)
    assert last_count(screen, b"copy", b"paths") == (4, 4)
    # Everything present: nothing to copy, nothing printed, and --no-progress draws nothing.
    again, again_screen = on_pty(tmp_path / "b", *args, "--no-progress")
    assert again == b""
    assert_no_bar(again_screen)


def _garbage(home: Path, tree: Path) -> None:
    """A store holding only garbage: ``tree`` imported, then its path deleted."""
    (store_path,) = ok(tvix(home, "import", tree)).decode().split()
    ok(tvix(home, "delete", store_path))


def test_gc(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    for name in ("a", "b"):
        _garbage(tmp_path / name, tree)
    piped, piped_err = on_pipe(tmp_path / "a", "gc", "--grace", "0")
    shown, screen = on_pty(tmp_path / "b", "gc", "--grace", "0")
    assert without_times(piped) == without_times(shown)
    dirs = DIRS + 1  # (and the root)
    assert f"removed {dirs} directories, {FILES} blobs".encode() in piped
    assert_no_bar(piped_err)
    assert REDRAW.search(screen)
    assert last_count(screen, b"gc: sweep", b"items") == (FILES + dirs, FILES + dirs)
    assert b"gc: compact:" in screen
    # Nothing left to collect; switched off, nothing drawn.
    _, off_screen = on_pty(tmp_path / "b", "gc", "--grace", "0", "--no-progress")
    assert_no_bar(off_screen)


def test_fsck(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    for name in ("a", "b"):
        ok(tvix(tmp_path / name, "import", tree))
    piped, piped_err = on_pipe(tmp_path / "a", "fsck", "--deep", "--json")
    shown, screen = on_pty(tmp_path / "b", "fsck", "--deep", "--json")
    report = without_seconds(piped)
    assert report == without_seconds(shown)
    assert report["ok"] and report["paths"] == 1 and report["files"] == FILES
    assert_no_bar(piped_err)
    assert REDRAW.search(screen)
    assert last_count(screen, b"fsck: packs", b"frames") == (report["frames"],) * 2
    assert last_count(screen, b"fsck: paths", b"paths") == (1, 1)
    text, text_screen = on_pty(tmp_path / "b", "fsck", "--no-progress")
    assert b"fsck: no damage found" in text
    assert_no_bar(text_screen)


def _shared_store(s3: S3, postgres: Postgres, tree: Path, garbage: int) -> tuple[str, str]:
    """An S3 + PostgreSQL store holding ``tree`` (imported) and ``garbage`` unreferenced blobs."""
    blob_url, meta = s3.fresh_url(), postgres.fresh_url()
    flags = ("--blob-service-addr", blob_url, "--directory-service-addr", meta)
    ok(tvix(Path("/nonexistent"), "import", *flags, "--path-info-service-addr", meta, tree))
    blobs = blob_service_from_url(blob_url)
    for i in range(garbage):
        asyncio.run(blobs.put(f"garbage {i}".encode()))
    return blob_url, meta


def test_gc_of_a_shared_store(tmp_path: Path, s3: S3, postgres: Postgres) -> None:
    tree = make_tree(tmp_path / "tree", files=60, dirs=4)
    runs = []
    for run in (on_pipe, on_pty):
        blob_url, meta = _shared_store(s3, postgres, tree, garbage=25)
        flags = ("--blob-service-addr", blob_url, "--path-info-service-addr", meta)
        runs.append(run(tmp_path / "unused", "gc", "--grace", "0", *flags))
    (piped, piped_err), (shown, screen) = runs
    assert piped == shown
    assert b"removed 0 directories and 25 objects" in piped
    assert_no_bar(piped_err)
    assert REDRAW.search(screen)
    assert last_count(screen, b"gc: mark directories", b"directories") == (5, 5)
    assert last_count(screen, b"gc: sweep", b"items") == (25, 25)
