"""Garbage collection of a store with ≥ 100k blobs and ≥ 1,000 paths (issue 14).

A tree of 1,000 directories of 100 small unique files each (plus one file
shared by all) is imported as 1,000 store paths in one ``tvix-store import``;
half of them are pinned. Then, each on a copy of that store:

* ``tvix-store gc --dry-run`` (mark only);
* ``tvix-store gc --keep-since 0 --grace 0`` (mark, delete 500 paths, sweep
  50k blobs and 500 Directories, compact the packs), with its wall time, CPU
  time and peak RSS (``VmHWM``, sampled), and the disk before and after;
* ``tvix-store gc`` again on the collected store (nothing to do: the cost of
  a mark alone over 500 paths).

For scale, ``b3sum`` over the files of the tree (what hashing the content
once costs).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.common import WORK, peak_rss_kib, timed_cpu

NAME = "gc"
TITLE = "garbage collection of 100k blobs in 1,000 paths (issue 14)"

BIN = Path(sys.executable).parent
TVIX = str(BIN / "tvix-store")
PATHS = 1000
FILES = 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gc-paths", type=int, default=PATHS, help="store paths in the GC store")


def _tree(root: Path, paths: int) -> list[Path]:
    if (root / ".done").exists():
        return sorted(p for p in root.iterdir() if p.is_dir())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = random.Random(14)
    shared = rng.randbytes(4000)
    out = []
    for i in range(paths):
        d = root / f"p{i:04d}"
        d.mkdir()
        (d / "shared").write_bytes(shared)
        for j in range(FILES - 1):
            (d / f"f{j:03d}").write_bytes(rng.randbytes(rng.randrange(40, 400)))
        out.append(d)
    (root / ".done").write_text("")
    return out


def _du(home: Path) -> int:
    return sum(p.stat().st_size for p in home.rglob("*") if p.is_file())


def run(args: argparse.Namespace) -> str:
    n = int(getattr(args, "gc_paths", PATHS))
    tree = WORK / f"gc-tree-{n}"
    dirs = _tree(tree, n)
    base = WORK / f"gc-store-{n}"
    env = {**os.environ, "TVIX_STORE_HOME": str(base)}
    if not (base / ".done").exists():
        shutil.rmtree(base, ignore_errors=True)
        out = subprocess.run(
            [TVIX, "import", *map(str, dirs)], env=env, capture_output=True, check=True, text=True
        ).stdout.split()
        store_paths = [line for line in out if line.startswith("/nix/store/")]
        subprocess.run(
            [TVIX, "pin", "add", "half", *store_paths[::2]],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (base / ".done").write_text("")
    files = sum(1 for d in dirs for _ in d.iterdir())
    b3 = ["sh", "-c", f"find {tree} -type f -print0 | xargs -0 b3sum --no-names"]
    subprocess.run(b3, check=True, stdout=subprocess.DEVNULL)  # (untimed: warms the page cache)
    b3_wall, b3_cpu, _ = timed_cpu(b3, dict(os.environ), stdout=subprocess.DEVNULL)

    rows: list[tuple[str, float, float, int | None, int | None]] = []
    work = WORK / "gc-store-copy"

    def fresh() -> dict[str, str]:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(base, work)
        return {**os.environ, "TVIX_STORE_HOME": str(work)}

    e = fresh()
    wall, cpu, _ = timed_cpu([TVIX, "gc", "--dry-run"], e)
    rows.append(("`gc --dry-run` (mark)", wall, cpu, None, None))
    before = _du(work)
    wall, cpu, _ = timed_cpu([TVIX, "gc", "--keep-since", "0", "--grace", "0"], e)
    after = _du(work)
    rows.append(("`gc --keep-since 0 --grace 0`", wall, cpu, before, after))
    wall2, cpu2, _ = timed_cpu([TVIX, "gc", "--grace", "0"], e)
    rows.append(("`gc` again (nothing to sweep)", wall2, cpu2, None, None))
    e = fresh()
    os.environ["TVIX_STORE_HOME"] = str(work)
    try:
        rss = peak_rss_kib(
            [TVIX, "gc", "--keep-since", "0", "--grace", "0"], stdout=subprocess.DEVNULL
        )
    finally:
        os.environ.pop("TVIX_STORE_HOME", None)
    shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"{n} store paths of {FILES} files each ({n * (FILES - 1) + 1} distinct blobs), half of"
        " them pinned; each command on a fresh copy of that store, after `sync` + `fstrim`,"
        " page cache warm. `b3sum` over the same files for scale.",
        "",
        "| command | wall s | CPU s | ÷ b3sum wall | disk before → after |",
        "|---|---:|---:|---:|---|",
    ]
    for what, w, c, b, a in rows:
        disk = f"{b / 1e6:.1f} → {a / 1e6:.1f} MB" if b is not None and a is not None else ""
        lines.append(f"| {what} | {w:.2f} | {c:.2f} | {w / b3_wall:.1f}× | {disk} |")
    lines.append(f"| `b3sum` of the {files} files | {b3_wall:.2f} | {b3_cpu:.2f} | 1× | |")
    lines += ["", f"Peak RSS of `gc --keep-since 0 --grace 0`: {rss / 1024:.0f} MiB."]
    return "\n".join(lines)
