"""Embedded store disk use and peak memory versus a zstd Nix binary cache (issue 13).

Disk, measured with ``du -sb`` (apparent bytes of every file, as the issue
states it) right after the import, with no further command:

* ours: ``tvix-store import TREE`` into a fresh ``TVIX_STORE_HOME``, the whole
  home directory (packs, ``store.sqlite`` and any ``-wal``/``-shm`` left);
* Nix: ``nix-store --store CHROOT --add TREE`` then ``nix copy --from CHROOT
  --to 'file://DIR?compression=zstd' PATH``, the whole ``DIR``.

Inputs: the running interpreter's stdlib directory (``sysconfig`` ``stdlib``,
site-packages included), snapshotted once under ``benchmarks/.work/disk`` as
hard links so that ``.pyc`` files written meanwhile do not change it; and the
unpacked wheels of two consecutive Django patch releases, downloaded once
with ``pip download --no-deps`` into ``~/.cache/tvix-store-bench/wheels`` (later
runs work offline). The second Django release is imported into the same
store, and copied into the same binary cache, as the first: its added disk is
reported as a share of the first one's.

Peak memory: ``VmHWM`` of every process of the tree (ours forks workers),
sampled every few ms, for ``tvix-store import`` of one 4 GiB pseudo-random
file (BLAKE3 XOF output: incompressible, no repeated chunk) and for a plain
HTTP ``PUT /nar/<narhash>.nar`` of that file's 4 GiB NAR (streamed from
``nix-store --dump``) to a ``tvix-store nar-bridge`` on a fresh store. The
big file and both stores live in ``/tmp`` and are deleted afterwards.

Import and export speed (against ``nix-store --add``/``--dump`` and ``b3sum``)
are in the store benchmark, the nar-bridge fill time in the nar-bridge one.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from benchmarks.common import MB, WORK, machine, settle, timed_cpu

NAME = "disk"
TITLE = "embedded store disk and memory vs a zstd binary cache (issue 13)"

BASE = WORK / "disk"
SCRATCH = BASE / "scratch"
STDLIB_SRC = Path(sysconfig.get_paths()["stdlib"])
STDLIB = BASE / STDLIB_SRC.name  # the store path's name is the directory's
STDLIB_META = BASE / "stdlib.json"
WHEELS = Path.home() / ".cache" / "tvix-store-bench" / "wheels"
DJANGO = ("5.2.7", "5.2.8")
BIG_DIR_PARENT = Path("/tmp")
BIG_SIZE = 4 << 30
MiB = 1 << 20

BIN = Path(sys.executable).parent
TVIX = str(BIN / "tvix-store")
ENV = {**os.environ, "NIX_CONFIG": "experimental-features = nix-command"}

DISK_TARGET = 1.0  # ours / nix cache
UPDATE_TARGET = 0.02  # second release's added disk / first's
RSS_TARGET_MIB = 200


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--disk-skip-memory",
        action="store_true",
        help="disk benchmark: skip the 4 GiB peak-memory runs",
    )


# -- inputs -----------------------------------------------------------------------
def _ignore_special(directory: str, names: list[str]) -> set[str]:
    """What a NAR cannot hold (sockets, devices, fifos)."""
    skip = set()
    for name in names:
        mode = os.lstat(os.path.join(directory, name)).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
            skip.add(name)
    return skip


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def stdlib_tree() -> Path:
    """A hard-link snapshot of the stdlib directory (once); ``STDLIB``."""
    if (
        STDLIB_META.exists()
        and STDLIB.is_dir()
        and json.loads(STDLIB_META.read_text()).get("source") == str(STDLIB_SRC)
    ):
        return STDLIB
    print(f"snapshotting {STDLIB_SRC} into {STDLIB} (once) ...", file=sys.stderr)
    STDLIB_META.unlink(missing_ok=True)
    shutil.rmtree(STDLIB, ignore_errors=True)
    BASE.mkdir(parents=True, exist_ok=True)
    tmp = BASE / "stdlib.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(
        STDLIB_SRC, tmp, symlinks=True, ignore=_ignore_special, copy_function=_link_or_copy
    )
    tmp.rename(STDLIB)
    STDLIB_META.write_text(json.dumps({"source": str(STDLIB_SRC)}))
    return STDLIB


def _count(root: Path) -> tuple[int, int]:
    """(entries, bytes of regular files) under ``root``."""
    entries = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        entries += len(dirnames) + len(filenames)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
    return entries, size


def wheel(version: str) -> Path:
    """Django ``version``'s wheel, downloaded once into ``WHEELS``."""
    found = sorted(WHEELS.glob(f"[Dd]jango-{version}-*.whl"))
    if found:
        return found[0]
    WHEELS.mkdir(parents=True, exist_ok=True)
    print(f"downloading Django {version} into {WHEELS} ...", file=sys.stderr)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            f"django=={version}",
            "-d",
            str(WHEELS),
        ],
        check=True,
    )
    found = sorted(WHEELS.glob(f"[Dd]jango-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip download django=={version} left no wheel in {WHEELS}")
    return found[0]


def django_tree(version: str) -> Path:
    """The unpacked wheel (once), executable bits as the zip records them."""
    tree = BASE / f"django-{version}"
    if tree.is_dir():
        return tree
    tmp = BASE / f"django-{version}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel(version)) as zf:
        for info in zf.infolist():
            target = Path(zf.extract(info, tmp))
            if not info.is_dir() and (info.external_attr >> 16) & 0o111:
                target.chmod(0o755)
    tmp.rename(tree)
    return tree


# -- measuring disk ---------------------------------------------------------------
def _run(argv: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout.strip()


def du_sb(path: Path) -> int:
    """``du -sb``: apparent bytes (directories included, hard links once)."""
    return int(_run(["du", "-sb", str(path)], ENV).split()[0])


def du_alloc(path: Path) -> int:
    """Bytes allocated on disk (``du -s --block-size=1``)."""
    return int(_run(["du", "-s", "--block-size=1", str(path)], ENV).split()[0])


@dataclass
class Stores:
    """One of our stores and one Nix binary cache, filled side by side."""

    name: str
    home: Path = field(init=False)
    chroot: Path = field(init=False)
    cache: Path = field(init=False)
    xdg: Path = field(init=False)

    def __post_init__(self) -> None:
        self.home = SCRATCH / f"{self.name}-tvix-home"
        self.chroot = SCRATCH / f"{self.name}-nix-chroot"
        self.cache = SCRATCH / f"{self.name}-nix-cache"
        self.xdg = SCRATCH / f"{self.name}-xdg"

    def add(self, tree: Path) -> tuple[float, float]:
        """Import ``tree`` both ways; wall seconds of ours and of Nix (add + copy)."""
        settle()
        start = time.perf_counter()
        ours = _run([TVIX, "import", str(tree)], {**ENV, "TVIX_STORE_HOME": str(self.home)})
        t_ours = time.perf_counter() - start
        settle()
        start = time.perf_counter()
        path = _run(["nix-store", "--store", str(self.chroot), "--add", str(tree)], ENV)
        _run(
            [
                "nix",
                "copy",
                "--from",
                str(self.chroot),
                "--to",
                f"file://{self.cache}?compression=zstd",
                path,
            ],
            {**ENV, "XDG_CACHE_HOME": str(self.xdg)},
        )
        t_nix = time.perf_counter() - start
        if ours != path:
            raise SystemExit(f"store paths differ: {ours} vs {path}")
        return t_ours, t_nix

    def row(self, label: str, tree: Path, times: tuple[float, float]) -> DiskRow:
        """The disk both stores take now, after :meth:`add` of ``tree`` took ``times``."""
        return DiskRow(
            label,
            *_count(tree),
            du_sb(self.home),
            du_sb(self.cache),
            du_alloc(self.home),
            du_alloc(self.cache),
            *times,
        )


@dataclass(frozen=True)
class DiskRow:
    label: str
    entries: int
    tree_bytes: int
    ours: int
    nix: int
    ours_alloc: int
    nix_alloc: int
    ours_s: float
    nix_s: float


def breakdown(home: Path) -> list[tuple[str, int, int]]:
    """(top-level entry of the store's home, files in it, ``du -sb`` bytes)."""
    rows = []
    for entry in sorted(home.iterdir()):
        files = 1 if not entry.is_dir() else sum(len(f) for _, _, f in os.walk(entry))
        rows.append((entry.name + ("/" if entry.is_dir() else ""), files, du_sb(entry)))
    return rows


def sqlite_tables(db: Path) -> list[tuple[str, int]]:
    """Bytes per table and index of ``db`` (its ``dbstat``), largest first."""
    if not db.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
        try:
            rows = conn.execute(
                "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:  # no dbstat in this SQLite build
        return []
    return [(str(name), int(size)) for name, size in rows]


@dataclass
class DiskResults:
    rows: list[DiskRow]
    update_ours: int  # second Django release: bytes added
    update_nix: int
    django_breakdown: list[tuple[str, int, int]]
    django_tables: list[tuple[str, int]]
    stdlib_breakdown: list[tuple[str, int, int]]
    stdlib_tables: list[tuple[str, int]]
    fsck: list[tuple[str, float, float]]  # (what, wall s, CPU s) on the stdlib store


def measure_fsck(home: Path, tree: Path) -> list[tuple[str, float, float]]:
    """``tvix-store fsck`` (and ``--deep``) of ``home`` against ``b3sum`` over ``tree``."""
    from benchmarks.castore import b3sum_argv

    env = {**ENV, "TVIX_STORE_HOME": str(home)}
    runs = [
        ("`b3sum` over every file of the tree", b3sum_argv(tree), ENV),
        ("`tvix-store fsck`", [TVIX, "fsck"], env),
        ("`tvix-store fsck --deep`", [TVIX, "fsck", "--deep"], env),
    ]
    return [(what, *timed_cpu(argv, e, subprocess.DEVNULL)[:2]) for what, argv, e in runs]


def measure_disk() -> DiskResults:
    shutil.rmtree(SCRATCH, ignore_errors=True)
    SCRATCH.mkdir(parents=True)
    try:
        rows = []
        stdlib = stdlib_tree()
        s = Stores("stdlib")
        rows.append(s.row(f"stdlib tree (`{STDLIB_SRC}`)", stdlib, s.add(stdlib)))
        stdlib_parts, stdlib_tables = breakdown(s.home), sqlite_tables(s.home / "store.sqlite")
        fsck = measure_fsck(s.home, stdlib)
        print(f"  stdlib: ours {rows[-1].ours:,} B, nix {rows[-1].nix:,} B", file=sys.stderr)

        first, second = (django_tree(v) for v in DJANGO)
        d = Stores("django")
        rows.append(d.row(f"Django {DJANGO[0]}, unpacked wheel", first, d.add(first)))
        before_ours, before_nix = rows[-1].ours, rows[-1].nix
        label = f"then Django {DJANGO[1]} into the same store (both versions)"
        rows.append(d.row(label, second, d.add(second)))
        after_ours, after_nix = rows[-1].ours, rows[-1].nix
        print(
            f"  django: ours {before_ours:,} -> {after_ours:,} B,"
            f" nix {before_nix:,} -> {after_nix:,} B",
            file=sys.stderr,
        )
        return DiskResults(
            rows,
            after_ours - before_ours,
            after_nix - before_nix,
            breakdown(d.home),
            sqlite_tables(d.home / "store.sqlite"),
            stdlib_parts,
            stdlib_tables,
            fsck,
        )
    finally:
        for p in SCRATCH.glob("*-nix-chroot"):  # Nix makes its store read-only
            subprocess.run(["chmod", "-R", "u+w", str(p)], check=False)
        shutil.rmtree(SCRATCH, ignore_errors=True)


# -- measuring memory -------------------------------------------------------------
def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"VmHWM:", b"VmRSS:")):
                    key, value = line.split()[:2]
                    out[key.decode().rstrip(":")] = int(value)
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids.extend(int(k) for k in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return kids


@dataclass
class TreePeak:
    """High-water marks of a process and its descendants, in KiB."""

    root: int = 0
    child: int = 0  # largest VmHWM of any descendant
    summed: int = 0  # largest sum of VmRSS over the tree at one sample
    processes: int = 1

    @property
    def largest(self) -> int:
        return max(self.root, self.child)


class TreeSampler:
    """Samples the VmHWM/VmRSS of ``pid`` and its descendants in a thread."""

    def __init__(self, pid: int, interval: float = 0.002) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = TreePeak()
        self._seen: set[int] = {pid}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        pids, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo.extend(_children(pid))
        total = 0
        for pid in pids:
            st = _status(pid)
            if not st:
                continue  # exited, or a zombie
            self._seen.add(pid)
            total += st.get("VmRSS", 0)
            if pid == self.pid:
                self.peak.root = max(self.peak.root, st.get("VmHWM", 0))
            else:
                self.peak.child = max(self.peak.child, st.get("VmHWM", 0))
        self.peak.summed = max(self.peak.summed, total)
        self.peak.processes = len(self._seen)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)


def _write_big_file(path: Path, size: int) -> None:
    """``size`` pseudo-random bytes (BLAKE3 XOF of a fixed key: never repeats a chunk)."""
    xof = blake3.blake3(b"tvix-store-bench 4 GiB")
    with open(path, "wb") as f:
        for offset in range(0, size, 16 * MiB):
            f.write(xof.digest(length=min(16 * MiB, size - offset), seek=offset))


def _nar_hash(path: Path) -> tuple[int, bytes]:
    """NarSize and NarHash (sha256) of ``nix-store --dump path``."""
    h = hashlib.sha256()
    size = 0
    with subprocess.Popen(["nix-store", "--dump", str(path)], stdout=subprocess.PIPE) as p:
        assert p.stdout is not None
        while chunk := p.stdout.read(MiB):
            h.update(chunk)
            size += len(chunk)
    if p.returncode:
        raise SystemExit(f"nix-store --dump {path} failed")
    return size, h.digest()


def _put_nar(url: str, path: Path, nar_size: int, nar_hash: bytes) -> None:
    """PUT the NAR of ``path`` (streamed from ``nix-store --dump``) as ``/nar/<hash>.nar``."""
    from nix_compat import nixbase32

    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    try:
        conn.putrequest("PUT", f"/nar/{nixbase32.encode(nar_hash)}.nar")
        conn.putheader("Content-Length", str(nar_size))
        conn.putheader("Content-Type", "application/x-nix-nar")
        conn.endheaders()
        assert conn.sock is not None
        sent = 0
        with subprocess.Popen(["nix-store", "--dump", str(path)], stdout=subprocess.PIPE) as p:
            assert p.stdout is not None
            while chunk := p.stdout.read(MiB):
                conn.sock.sendall(chunk)
                sent += len(chunk)
        if p.returncode or sent != nar_size:
            raise SystemExit(f"nix-store --dump {path}: {sent} bytes, status {p.returncode}")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise SystemExit(f"PUT NAR: HTTP {resp.status}: {body[:500]!r}")
    finally:
        conn.close()


@dataclass
class MemoryResults:
    import_peak: TreePeak
    import_s: float
    upload_peak: TreePeak
    upload_idle_kib: int
    upload_s: float
    nar_size: int


def measure_memory() -> MemoryResults:
    from benchmarks.nar_bridge import bridge_server

    big_dir = Path(tempfile.mkdtemp(prefix="tvix-bench-4GiB-", dir=BIG_DIR_PARENT))
    try:
        big = big_dir / "big.bin"
        print(
            f"  writing {BIG_SIZE >> 30} GiB of pseudo-random bytes to {big} ...", file=sys.stderr
        )
        _write_big_file(big, BIG_SIZE)

        home = big_dir / "import-home"
        settle()
        start = time.perf_counter()
        proc = subprocess.Popen(
            [TVIX, "import", str(big)],
            env={**ENV, "TVIX_STORE_HOME": str(home)},
            stdout=subprocess.DEVNULL,
        )
        with TreeSampler(proc.pid) as sampler:
            proc.wait()
            sampler.sample()
        import_s = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"tvix-store import {big} failed ({proc.returncode})")
        import_peak = sampler.peak
        print(
            f"  import: {import_s:.1f} s, peak {import_peak.largest / 1024:.0f} MiB",
            file=sys.stderr,
        )
        shutil.rmtree(home, ignore_errors=True)

        nar_size, nar_hash = _nar_hash(big)
        settle()
        with bridge_server(big_dir / "bridge-home") as bridge:
            idle = _status(bridge.proc.pid).get("VmHWM", 0)
            with TreeSampler(bridge.proc.pid) as sampler:
                start = time.perf_counter()
                _put_nar(bridge.url, big, nar_size, nar_hash)
                upload_s = time.perf_counter() - start
                sampler.sample()
        upload_peak = sampler.peak
        print(
            f"  NAR PUT: {upload_s:.1f} s, peak {upload_peak.largest / 1024:.0f} MiB",
            file=sys.stderr,
        )
        return MemoryResults(import_peak, import_s, upload_peak, idle, upload_s, nar_size)
    finally:
        shutil.rmtree(big_dir, ignore_errors=True)
        subprocess.run(["sync"], check=False)


# -- report -----------------------------------------------------------------------
def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.0f} MiB"


def run(args: argparse.Namespace) -> str:
    assert shutil.which("nix") and shutil.which("du"), "needs nix and du: `make system-deps`"
    load = os.getloadavg()[0]
    disk = measure_disk()
    mem = None if args.disk_skip_memory else measure_memory()

    def disk_row(r: DiskRow) -> str:
        ratio = r.ours / r.nix
        return (
            f"| {r.label} | {r.entries:,} | {r.tree_bytes / MB:,.1f} | {r.ours / MB:,.2f} |"
            f" {r.nix / MB:,.2f} | **{ratio:.2f}×** | {r.ours_alloc / MB:,.2f} |"
            f" {r.nix_alloc / MB:,.2f} | {r.ours_s:.2f} | {r.nix_s:.2f} |"
        )

    stdlib_row, django_row, _both = disk.rows
    up_ours = disk.update_ours / django_row.ours
    up_nix = disk.update_nix / django_row.nix

    def parts(rows: list[tuple[str, int, int]]) -> str:
        return ", ".join(f"`{n}` {b:,} B ({f:,} file{'s' if f != 1 else ''})" for n, f, b in rows)

    def tables(rows: list[tuple[str, int]]) -> str:
        return ", ".join(f"`{n}` {b / MB:,.2f} MB" for n, b in rows if b > 4096) or "–"

    lines = [
        f"Machine: {machine()}; load average {load:.2f} when the run started"
        " (other work shares the 2 CPUs).",
        "",
        "Disk right after the import, no further command: ours = `du -sb` of the fresh"
        " `TVIX_STORE_HOME` after `tvix-store import TREE`; Nix = `du -sb` of the directory"
        " of `nix copy --to 'file://DIR?compression=zstd'` of the same path (from a chroot"
        " store filled by `nix-store --add`). Store paths checked equal. The stdlib tree is a"
        f" hard-link snapshot of `{STDLIB_SRC}` (site-packages included); Django wheels from"
        " `pip download --no-deps`, unpacked. MB = 10^6 bytes. Allocated = `du -s"
        " --block-size=1`. Times: one run each, `sync` + `fstrim` before (Nix: add + copy).",
        "",
        "| tree | entries | file MB | ours MB | Nix zstd cache MB | ours/Nix | ours alloc."
        " MB | Nix alloc. MB | ours s | Nix s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(disk_row(r) for r in disk.rows),
        "",
        "| goal | ours | Nix zstd cache | target |",
        "|---|---:|---:|---|",
        f"| disk, stdlib tree | {stdlib_row.ours / stdlib_row.nix:.2f}× | 1.00× |"
        f" ≤ {DISK_TARGET}×: {_met(stdlib_row.ours <= DISK_TARGET * stdlib_row.nix)} |",
        f"| disk, Django {DJANGO[0]} | {django_row.ours / django_row.nix:.2f}× | 1.00× |"
        f" ≤ {DISK_TARGET}×: {_met(django_row.ours <= DISK_TARGET * django_row.nix)} |",
        f"| Django {DJANGO[1]} added to the same store, share of {DJANGO[0]}'s disk |"
        f" +{disk.update_ours / MB:,.2f} MB (**{up_ours:.1%}**) |"
        f" +{disk.update_nix / MB:,.2f} MB ({up_nix:.1%}) |"
        f" ≤ {UPDATE_TARGET:.0%}: {_met(up_ours <= UPDATE_TARGET)} |",
        "",
        f"What our stores hold (`du -sb` per top-level entry): stdlib tree:"
        f" {parts(disk.stdlib_breakdown)}; Django, both versions: {parts(disk.django_breakdown)}.",
        "",
        f"`store.sqlite` by table and index (SQLite `dbstat`, > 4 KiB): stdlib tree:"
        f" {tables(disk.stdlib_tables)}; Django, both versions: {tables(disk.django_tables)}.",
        "",
        "fsck of the stdlib store (issue 14), one run each after `sync` + `fstrim`, page cache"
        " warm: `fsck` decodes and verifies every frame and checks every closure; `--deep`"
        " also renders the NAR from Directories and blobs and hashes it. Throughput = file"
        " bytes of the tree per second.",
        "",
        "| run | wall s | CPU s | MB/s | ÷ b3sum (wall) |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {what} | {wall:.2f} | {cpu:.2f} | {stdlib_row.tree_bytes / MB / wall:,.0f} |"
            f" {wall / disk.fsck[0][1]:.2f}× |"
            for what, wall, cpu in disk.fsck
        ),
    ]
    if mem is not None:

        def mem_row(label: str, p: TreePeak, seconds: float) -> str:
            return (
                f"| {label} | {seconds:.1f} | {_mib(p.root)} |"
                f" {_mib(p.child) if p.processes > 1 else '–'} |"
                f" {_mib(p.summed)} | {p.processes} |"
                f" < {RSS_TARGET_MIB} MiB: {_met(p.largest < RSS_TARGET_MIB * 1024)} |"
            )

        lines += [
            "",
            f"Peak memory, {BIG_SIZE >> 30} GiB of pseudo-random data (BLAKE3 XOF, no"
            f" repeated chunk; NAR {mem.nar_size / MB:,.0f} MB): `VmHWM` of the process and"
            " of its largest descendant, and the largest sum of `VmRSS` over the process tree"
            " at one sample (pages shared after fork counted once per process), sampled every"
            " 2 ms. The NAR is a plain `PUT /nar/<narhash>.nar` (Content-Length, streamed from"
            " `nix-store --dump`) to `tvix-store nar-bridge` on a fresh store; the bridge's"
            f" high-water mark before the upload was {_mib(mem.upload_idle_kib)}. The target"
            " applies to each process.",
            "",
            "| run | s | process | largest child | tree sum | processes | target |",
            "|---|---:|---:|---:|---:|---:|---|",
            mem_row("`tvix-store import` of one 4 GiB file", mem.import_peak, mem.import_s),
            mem_row("4 GiB NAR `PUT` to nar-bridge", mem.upload_peak, mem.upload_s),
        ]
    lines += [
        "",
        "Import/export speed against `nix-store --add`/`--dump` and `b3sum` (stdlib tree"
        " included): the store section; the time to fill nar-bridge against `nix copy --to"
        " file://…?compression=zstd`: the nar-bridge section.",
    ]
    return "\n".join(lines)
