"""NAR dump: ``nix_compat.nar.dump_path`` versus ``nix-store --dump``.

Inputs (built once under ``benchmarks/.work/nar-dump``):

* ``tree``: the Python standard library (without site-packages), parts of
  ``/usr/share`` and three large random files (32, 64 and 128 MiB);
* ``one-1GiB.bin``: a single 1 GiB random file.

Both dumpers run as fresh processes writing to ``/dev/null``, so process
startup counts for both; rounds alternate nix/ours and the best of
``--rounds`` wall-clock times is kept. The outputs are checked to be
identical (sha256) once per input. Peak RSS is the dumping process's
``VmHWM``, sampled in separate untimed runs (see ``common.peak_rss_kib``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    MB,
    WORK,
    Run,
    checked,
    machine,
    peak_rss_kib,
    python_snippet,
    run_timed,
)

NAME = "nar_dump"
TITLE = "NAR dump (issue 2)"

BASE = WORK / "nar-dump"
TREE = BASE / "tree"
TREE_META = BASE / "tree.json"
ONE_GIB = BASE / "one-1GiB.bin"
USR_SHARE_PARTS = ["doc", "man", "perl", "vim", "i18n", "zoneinfo", "mime", "cmake-3.25", "icons"]
LARGE_FILES = {"large-32MiB.bin": 32, "large-64MiB.bin": 64, "large-128MiB.exe": 128}
MiB = 1 << 20

OUR_DUMP = (
    "import sys\n"
    "from nix_compat.nar import dump_path\n"
    "dump_path(sys.argv[1], sys.stdout.buffer)\n"
    "sys.stdout.buffer.flush()\n"
)
# Interpreter plus imports; lingers so the sampler sees its final high-water mark.
OUR_BASELINE = "import time\nimport nix_compat.nar\ntime.sleep(0.1)\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per dumper")


# -- inputs ---------------------------------------------------------------------
def _random_file(path: Path, size: int, executable: bool = False) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n
    os.chmod(path, 0o755 if executable else 0o644)


def _ignore_special(directory: str, names: list[str]) -> set[str]:
    """Skip what a NAR cannot hold (sockets, devices, fifos) and site-packages."""
    skip = set()
    for name in names:
        mode = os.lstat(os.path.join(directory, name)).st_mode
        nar_type = stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)
        if not nar_type or name in ("site-packages", "dist-packages"):
            skip.add(name)
    return skip


def _count(root: Path) -> dict[str, int]:
    files = dirs = links = size = 0
    for _dirpath, dirnames, filenames in os.walk(root):
        dirs += 1
        for name in filenames + dirnames:
            p = os.path.join(_dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                links += 1
            elif stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return {"files": files, "directories": dirs, "symlinks": links, "bytes": size}


def build_tree() -> dict[str, int]:
    """Build (once) the benchmark tree; its stats are cached in tree.json."""
    if TREE_META.exists() and TREE.is_dir():
        meta: dict[str, int] = json.loads(TREE_META.read_text())
        return meta
    tmp = BASE / "tree.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"building {TREE} (once) ...", file=sys.stderr)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(stdlib, tmp / "python-stdlib", symlinks=True, ignore=_ignore_special)
    for part in USR_SHARE_PARTS:
        src = Path("/usr/share") / part
        if src.is_dir():
            shutil.copytree(src, tmp / "usr-share" / part, symlinks=True, ignore=_ignore_special)
    for name, mib in LARGE_FILES.items():
        _random_file(tmp / name, mib * MiB + 5, executable=name.endswith(".exe"))
    shutil.rmtree(TREE, ignore_errors=True)
    tmp.rename(TREE)
    meta = _count(TREE)
    TREE_META.write_text(json.dumps(meta))
    return meta


def build_one_gib() -> None:
    if not ONE_GIB.exists() or ONE_GIB.stat().st_size != 1 << 30:
        print(f"building {ONE_GIB} (once) ...", file=sys.stderr)
        BASE.mkdir(parents=True, exist_ok=True)
        tmp = ONE_GIB.with_suffix(".tmp")
        _random_file(tmp, 1 << 30)
        tmp.rename(ONE_GIB)


# -- measuring --------------------------------------------------------------------
def nix_argv(path: Path) -> list[str]:
    return ["nix-store", "--dump", str(path)]


def our_argv(path: Path) -> list[str]:
    return python_snippet(OUR_DUMP, str(path))


def nar_digest(argv: list[str]) -> tuple[int, str]:
    """Size and sha256 of what ``argv`` writes to stdout."""
    h = hashlib.sha256()
    size = 0
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with proc.stdout:
        while chunk := proc.stdout.read(MiB):
            h.update(chunk)
            size += len(chunk)
    if proc.wait():
        raise SystemExit(f"{argv[0]} failed with exit status {proc.returncode}")
    return size, h.hexdigest()


@dataclass(frozen=True)
class Result:
    label: str
    nar_size: int
    nix: list[Run]
    ours: list[Run]
    nix_rss_kib: int
    our_rss_kib: int

    @staticmethod
    def best(runs: list[Run]) -> float:
        return min(r.seconds for r in runs)

    def row(self) -> str:
        nix, ours = self.best(self.nix), self.best(self.ours)
        mb = self.nar_size / MB
        return (
            f"| {self.label} | {mb:,.0f} | {nix:.3f} | {mb / nix:,.0f} | "
            f"{ours:.3f} | {mb / ours:,.0f} | **{ours / nix:.2f}×** |"
        )


def measure(label: str, path: Path, rounds: int) -> Result:
    # Also warms the page cache for both.
    theirs = nar_digest(nix_argv(path))
    ours = nar_digest(our_argv(path))
    if theirs != ours:
        raise SystemExit(f"{label}: NARs differ: nix {theirs} vs ours {ours}")
    nix_runs: list[Run] = []
    our_runs: list[Run] = []
    with open(os.devnull, "wb") as null:
        for i in range(rounds):
            nix_runs.append(checked(run_timed(nix_argv(path), stdout=null.fileno()), "nix"))
            our_runs.append(checked(run_timed(our_argv(path), stdout=null.fileno()), "ours"))
            print(
                f"  {label} round {i + 1}: nix {nix_runs[-1].seconds:.3f}s "
                f"ours {our_runs[-1].seconds:.3f}s",
                file=sys.stderr,
            )
        # Separate, untimed runs: sampling memory costs CPU.
        nix_rss = peak_rss_kib(nix_argv(path), stdout=null.fileno())
        our_rss = peak_rss_kib(our_argv(path), stdout=null.fileno())
    return Result(label, theirs[0], nix_runs, our_runs, nix_rss, our_rss)


def run(args: argparse.Namespace) -> str:
    assert shutil.which("nix-store"), "nix-store not on PATH: run `make system-deps`"
    meta = build_tree()
    build_one_gib()
    tree_label = f"tree ({meta['files']:,} files, {meta['symlinks']:,} symlinks)"
    results = [
        measure(tree_label, TREE, args.rounds),
        measure("single 1 GiB file", ONE_GIB, args.rounds),
    ]
    baseline = peak_rss_kib(python_snippet(OUR_BASELINE))

    lines = [
        f"Machine: {machine()}.",
        "",
        "Input tree: Python stdlib (no site-packages), "
        f"`/usr/share/{{{','.join(USR_SHARE_PARTS)}}}`"
        f" and files of {', '.join(f'{m} MiB' for m in LARGE_FILES.values())}: "
        f"{meta['bytes'] / MB:,.0f} MB in {meta['files']:,} files, "
        f"{meta['directories']:,} directories, {meta['symlinks']:,} symlinks.",
        "",
        f"Each dumper is a fresh process writing to `/dev/null` (ours: `python -c` running "
        f"`dump_path(path, sys.stdout.buffer)`); best of {args.rounds} alternating wall-clock "
        "runs; page cache warm. Both NARs were checked identical (sha256). MB = 10^6 bytes of NAR.",
        "",
        "| input | NAR MB | nix-store --dump s | nix MB/s | ours s | ours MB/s | ours/nix |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(r.row() for r in results),
        "",
        "Peak RSS (`VmHWM` of the dumping process, sampled every ms until it exits):",
        "",
        "| input | nix-store --dump | ours | ours, interpreter + import only |",
        "|---|---:|---:|---:|",
        *(
            f"| {r.label} | {r.nix_rss_kib / 1024:.1f} MiB | "
            f"{r.our_rss_kib / 1024:.1f} MiB | {baseline / 1024:.1f} MiB |"
            for r in results
        ),
    ]
    return "\n".join(lines)
