"""``tvix-store mount`` against the same files on disk (issue 15).

A 1 GiB random file and a tree of 10,000 small files (100 directories of
100) are imported into an embedded store, which is mounted with the CLI.

* sequential read: ``cat FILE > /dev/null`` through a fresh mount (cold:
  every byte comes from the packs, decompressed and verified), again on the
  same mount (the kernel's page cache, which the mount lets keep the pages),
  and from disk with its page cache warm;
* tree walk: ``find DIR -printf '%s %m'`` (an ``lstat`` of every entry)
  through a fresh mount (cold: every Directory fetched), again (kernel
  caches), and on disk (warm).

The CPU seconds of the mount process are read from /proc around each pass.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import WORK
from tvix_castore.fs.mount import mount_device

NAME = "mount"
TITLE = "FUSE mount: sequential read and tree walk vs disk (issue 15)"

BIN = Path(sys.executable).parent
TVIX = str(BIN / "tvix-store")
GiB = 1 << 30


def _inputs() -> tuple[Path, Path, Path]:
    src = WORK / "mount-src"
    if not (src / ".done").exists():
        shutil.rmtree(src, ignore_errors=True)
        (src / "tree").mkdir(parents=True)
        rng = random.Random(15)
        with open(src / "big", "wb") as f:
            for _ in range(GiB // (16 << 20)):
                f.write(rng.randbytes(16 << 20))
        for d in range(100):
            sub = src / "tree" / f"d{d:02d}"
            sub.mkdir()
            for i in range(100):
                (sub / f"f{i:02d}").write_bytes(rng.randbytes(rng.randrange(50, 2000)))
        (src / ".done").write_text("")
    home = WORK / "mount-store"
    if not (home / ".done").exists():
        shutil.rmtree(home, ignore_errors=True)
        env = {**os.environ, "TVIX_STORE_HOME": str(home)}
        out = subprocess.run(
            [TVIX, "import", str(src / "big"), str(src / "tree")],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        (home / "paths").write_text("\n".join(Path(p).name for p in out))
        (home / ".done").write_text("")
    return src, home, home / "paths"


def _cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _timed(argv: list[str], pid: int | None = None) -> tuple[float, tuple[float, float]]:
    before = _cpu(pid) if pid else (0.0, 0.0)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = _cpu(pid) if pid else (0.0, 0.0)
    return wall, (after[0] - before[0], after[1] - before[1])


def _best(argv: list[str], pid: int | None = None, n: int = 3) -> tuple[float, tuple[float, float]]:
    """The fastest of ``n`` runs (warm passes: what is left is noise)."""
    return min(_timed(argv, pid) for _ in range(n))


class _Mount:
    def __init__(self, home: Path) -> None:
        self.at = (WORK / "mnt").resolve()  # (as mountinfo names it)
        if mount_device(self.at) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(self.at)], check=False)
        self.at.mkdir(exist_ok=True)
        env = {**os.environ, "TVIX_STORE_HOME": str(home)}
        self.proc = subprocess.Popen(
            [TVIX, "mount", str(self.at)], env=env, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 60
        while mount_device(self.at) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()  # (a mount left running would hold the caller's pipes)
                self.proc.wait()
                raise SystemExit("tvix-store mount did not start")
            time.sleep(0.05)
        os.stat(self.at)  # (the first answer: the mount is serving)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def run(args: argparse.Namespace) -> str:
    src, home, paths = _inputs()
    big_base, tree_base = paths.read_text().split()
    rows: list[tuple[str, float, tuple[float, float], str]] = []

    subprocess.run(["cat", str(src / "big")], check=True, stdout=subprocess.DEVNULL)  # (warm)
    disk_read, _ = _best(["cat", str(src / "big")])
    m = _Mount(home)
    try:
        cold, cold_cpu = _timed(["cat", str(m.at / big_base)], m.proc.pid)
        warm, warm_cpu = _best(["cat", str(m.at / big_base)], m.proc.pid)
    finally:
        m.stop()
    mb = GiB / 1e6
    rows.append(
        ("`cat` 1 GiB, disk (page cache warm)", disk_read, (0.0, 0.0), f"{mb / disk_read:.0f} MB/s")
    )
    for what, w, c in [("fresh mount", cold, cold_cpu), ("same mount again", warm, warm_cpu)]:
        rows.append(
            (f"`cat` 1 GiB, {what}", w, c, f"{mb / w:.0f} MB/s, {disk_read / w:.0%} of disk")
        )

    walk = ["find", "", "-printf", "%s %m\n"]
    walk[1] = str(src / "tree")
    subprocess.run(walk, check=True, stdout=subprocess.DEVNULL)  # (warm)
    disk_walk, _ = _best(walk)
    m = _Mount(home)
    try:
        walk[1] = str(m.at / tree_base)
        cold_w, cold_wc = _timed(walk, m.proc.pid)
        warm_w, warm_wc = _best(walk, m.proc.pid)
    finally:
        m.stop()
    rows.append(
        ("`find -printf '%s %m'` of 10,100 entries, disk (warm)", disk_walk, (0.0, 0.0), "1×")
    )
    for what, w, c in [("fresh mount", cold_w, cold_wc), ("same mount again", warm_w, warm_wc)]:
        rows.append((f"`find` of the tree, {what}", w, c, f"{w / disk_walk:.1f}× disk"))

    lines = [
        "A 1 GiB random file and 10,000 small files (100 directories) in an embedded store,"
        " mounted with `tvix-store mount`; the same files on disk. Fresh-mount passes run once;"
        " warm passes (disk, and the mount again) are the best of 3. CPU s: the mount process,"
        " user + system (system: mostly the kernel copying replies into the page cache).",
        "",
        "| what | wall s | mount CPU s | |",
        "|---|---:|---:|---|",
    ]
    lines += [
        f"| {what} | {w:.3f} | {u:.2f} + {s:.2f} | {note} |" for what, w, (u, s), note in rows
    ]
    return "\n".join(lines)
