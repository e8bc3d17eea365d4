"""What the progress bars cost (issue 17).

* ``tvix-store import`` of a tree of 5,000 files (44 MB: forked workers) and of
  one of 2,000 small files (5 MB: threads) into a fresh embedded store, with
  stderr a pipe (no bar), a pseudo-terminal (bar) and a pseudo-terminal with
  ``--no-progress``: wall and CPU time (user + sys, children included), rounds
  alternating;
* start-up: ``tvix-store import --help`` and a one-file import, on a pty with
  and without the bar;
* the import cost of the two candidate libraries in the CLI's process (tqdm,
  rich.progress): ``import X`` timed after ``tvix_store.cli`` is loaded.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import WORK, machine

NAME = "progress"
TITLE = "progress bars: import with and without (issue 17)"

BIN = Path(sys.executable).parent
TVIX = str(BIN / "tvix-store")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress-rounds", type=int, default=5, help="rounds per mode")


def _tree(root: Path, files: int, big: int) -> Path:
    if (root / ".done").exists():
        return root / "tree"
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(17)
    tree = root / "tree"
    for i in range(files):
        d = tree / f"d{i // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        size = rng.randrange(100, big)
        (d / f"f{i:05d}").write_bytes(rng.randbytes(size))
    (root / ".done").write_text("")
    return tree


def _run(argv: list[str], env: dict[str, str], pty: bool) -> tuple[float, float]:
    """Wall and CPU seconds of ``argv``, stdout a pipe, stderr a pty (drained) or a pipe."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    if pty:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        drained: list[bytes] = []

        def drain() -> None:
            while True:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:
                    return
                if not data:
                    return
                drained.append(data)

        reader = threading.Thread(target=drain)
        reader.start()
        proc = subprocess.run(
            argv, env=env, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL
        )
        os.close(slave)
        reader.join()
        os.close(master)
    else:
        proc = subprocess.run(argv, env=env, capture_output=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{argv} failed: {proc.stderr.decode(errors='replace')}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


_MODES: dict[str, tuple[bool, list[str]]] = {
    "stderr a pipe (no bar)": (False, []),
    "stderr a pty, bar shown": (True, []),
    "stderr a pty, --no-progress": (True, ["--no-progress"]),
}


def _imports(tree: Path, rounds: int) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {m: [] for m in _MODES}
    for _ in range(rounds):
        for mode, (pty, flags) in _MODES.items():
            home = WORK / "progress" / "home"
            shutil.rmtree(home, ignore_errors=True)
            env = {**os.environ, "TVIX_STORE_HOME": str(home), "TERM": "xterm"}
            env.pop(  # (a developer's own switch must not decide the measurement)
                "TVIX_STORE_NO_PROGRESS", None
            )
            subprocess.run(["sync"], check=True)
            out[mode].append(_run([TVIX, "import", *flags, str(tree)], env, pty))
    return out


def _best(f: Callable[[], float], n: int) -> float:
    return min(f() for _ in range(n))


def _lib_import(module: str) -> float:
    code = (
        "import time, tvix_store.cli, tvix_store.importer\n"
        f"t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def run(args: argparse.Namespace) -> str:
    rounds = args.progress_rounds
    base = WORK / "progress"
    big = _tree(base / "big", 5000, 17_500)
    small = _tree(base / "small", 2000, 5000)
    one = base / "one"
    one.write_bytes(b"one small file\n")
    size = sum(f.stat().st_size for f in big.rglob("*") if f.is_file())
    small_size = sum(f.stat().st_size for f in small.rglob("*") if f.is_file())
    lines = [
        f"Machine: {machine()}; load average {os.getloadavg()[0]:.2f} when the run started"
        " (other work shares the 2 CPUs).",
        "",
        "Each run is a fresh `tvix-store import TREE` into a fresh embedded store, stdout a"
        " pipe; stderr a pipe, or a pseudo-terminal (120 columns) drained by the benchmark."
        f" {rounds} rounds, modes alternating; median (min). CPU = user + sys of the process and"
        " its forked workers.",
        "",
        "| tree | stderr | wall s | CPU s |",
        "|---|---|---:|---:|",
    ]
    for label, tree in (
        (f"5,000 files, {size / 1e6:.0f} MB (forked workers)", big),
        (f"2,000 files, {small_size / 1e6:.1f} MB (threads)", small),
    ):
        for mode, runs in _imports(tree, rounds).items():
            walls = [w for w, _ in runs]
            cpus = [c for _, c in runs]
            lines.append(
                f"| {label} | {mode} | {statistics.median(walls):.2f} ({min(walls):.2f}) |"
                f" {statistics.median(cpus):.2f} ({min(cpus):.2f}) |"
            )
    env = {**os.environ, "TVIX_STORE_HOME": str(base / "home1"), "TERM": "xterm"}
    env.pop("TVIX_STORE_NO_PROGRESS", None)
    help_wall = _best(lambda: _run([TVIX, "import", "--help"], env, True)[0], 15)
    one_on = _best(lambda: _run([TVIX, "import", str(one)], env, True)[0], 15)
    one_off = _best(lambda: _run([TVIX, "import", "--no-progress", str(one)], env, True)[0], 15)
    tqdm_s = _best(lambda: _lib_import("tqdm"), 10)
    rich_s = _best(lambda: _lib_import("rich.progress"), 10)
    lines += [
        "",
        "Start-up, best of 15 (stderr a pty):",
        "",
        "| command | wall s |",
        "|---|---:|",
        f"| `tvix-store import --help` (no bar module loaded) | {help_wall:.3f} |",
        f"| `tvix-store import ONE_FILE`, bar shown | {one_on:.3f} |",
        f"| `tvix-store import --no-progress ONE_FILE` | {one_off:.3f} |",
        "",
        "Importing the bar library in the CLI's process (after `tvix_store.cli` and"
        " `tvix_store.importer`), best of 10:"
        f" tqdm 4.70.1 {tqdm_s * 1000:.1f} ms, rich 15.0.0 `rich.progress` {rich_s * 1000:.1f} ms."
        " Either is imported only when a bar is shown.",
    ]
    return "\n".join(lines)
