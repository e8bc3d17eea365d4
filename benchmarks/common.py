"""Shared helpers: work directory, subprocess timing, results file."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"  # gitignored; inputs are built once and reused
RESULTS = HERE / "RESULTS.md"
RESULTS_HEADER = "# Benchmark results\n\nWritten by `make bench` (`python -m benchmarks`).\n"

MB = 1_000_000


@dataclass(frozen=True)
class Run:
    """One finished child process: its wall-clock time."""

    seconds: float
    returncode: int


def settle() -> None:
    """Before a timed command: write back what is dirty and trim the filesystem.

    Without ``sync``, a command pays for writing back what the one before it
    left dirty (``nix-store --add`` swung from 3 to 13 s). Without ``fstrim``,
    the discards this VM's disk (mounted with ``discard``) still owes for
    deleted trees slow later writes down: ``nix-store --add`` took 7-12 s
    after the castore benchmark had deleted its stores, 2.9 s right after an
    ``fstrim``. Trimming is best effort (not every filesystem or user can).
    """
    subprocess.run(["sync"], check=True)
    if shutil.which("fstrim"):
        subprocess.run(["fstrim", str(WORK)], check=False, capture_output=True)


def run_timed(argv: list[str], *, stdout: int | None = None) -> Run:
    """Run ``argv`` to completion and time it (wall clock, including startup)."""
    start = time.perf_counter()
    returncode = subprocess.run(argv, stdout=stdout, check=False).returncode
    return Run(time.perf_counter() - start, returncode)


def timed_cpu(
    argv: list[str], env: dict[str, str], stdout: int | None = None
) -> tuple[float, float, bytes]:
    """Wall time and CPU time (user + sys, its children included) of ``argv``, after
    :func:`settle` (untimed), and its stdout (unless ``stdout`` takes it)."""
    import resource

    settle()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=stdout or subprocess.PIPE, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout or b""


def checked(run: Run, what: str) -> Run:
    if run.returncode:
        raise SystemExit(f"{what} failed with exit status {run.returncode}")
    return run


def _vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return None  # exited (a zombie has no memory lines)


def peak_rss_kib(argv: list[str], *, stdout: int | None = None, interval: float = 0.001) -> int:
    """Peak resident set of the process ``argv`` runs as, in KiB (``VmHWM``, sampled).

    ``ru_maxrss`` of a child (``wait4`` / ``RUSAGE_CHILDREN``) is useless here:
    Linux seeds it with the RSS of the forking parent (this Python process) and
    keeps it across ``exec``. ``VmHWM`` belongs to the post-exec address space
    only; being a high-water mark, sampling it until exit loses at most what
    the child grows in its last ``interval``.
    """
    proc = subprocess.Popen(argv, stdout=stdout)
    peak = 0
    while proc.poll() is None:
        hwm = _vm_hwm_kib(proc.pid)
        if hwm is not None:
            peak = max(peak, hwm)
        time.sleep(interval)
    if proc.returncode:
        raise SystemExit(f"{argv[0]} failed with exit status {proc.returncode}")
    return peak


def python_snippet(code: str, *args: str) -> list[str]:
    """argv running ``code`` in a fresh interpreter of this venv."""
    return [sys.executable, "-c", code, *args]


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "not installed"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{tool_version(['nix-store', '--version'])}, {time.strftime('%Y-%m-%d')}"
    )


def update_results(title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of RESULTS.md, keeping the others."""
    text = RESULTS.read_text() if RESULTS.exists() else RESULTS_HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)
