"""S3 (moto) + PostgreSQL against the embedded default: import, requests, narinfo latency.

Input: a tree of ``--shared-files`` small files (1-8 KiB, pseudo-random, in
directories of 100) plus four 1 MiB files, built once under
``benchmarks/.work/shared/tree``.

Each run starts a throwaway PostgreSQL 15 (``fsync=off``, as in the tests)
and moto's S3 server in this process (every HTTP request it answers is
counted by method). Measured, wall clock and CPU seconds of the
``tvix-store import`` process:

* ``tvix-store import TREE`` into a fresh embedded store;
* the same into S3 + PostgreSQL (``--blob-service-addr objectstore+s3://…``,
  directories and path infos ``postgresql://…``), with the default upload
  concurrency and with ``max_concurrency=1`` (one request at a time, as
  without the batch uploader), and the S3 requests per imported file;
* ``--narinfo-requests`` sequential ``GET <hash>.narinfo`` over one
  keep-alive connection to a nar-bridge on each store: p50 / p99.

moto is a Python server on the same two vCPUs, far slower per request than
S3 or MinIO: the import ratios are an upper bound of what the client costs.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from pathlib import Path

from benchmarks.common import WORK, machine, timed_cpu

NAME = "shared"
TITLE = "S3 + PostgreSQL backends (issue 16)"

BASE = WORK / "shared"
TREE = BASE / "tree"
BIN = Path(sys.executable).parent
TVIX = str(BIN / "tvix-store")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shared-files", type=int, default=5000, help="small files in the shared-backend tree"
    )
    parser.add_argument(
        "--shared-narinfo-requests",
        type=int,
        default=2000,
        help="sequential narinfo GETs per store (shared-backend benchmark)",
    )


def build_tree(n: int) -> int:
    """The input tree (rebuilt if its size differs); its file count."""
    marker = BASE / f"tree-{n}.done"
    if marker.exists():
        return n + 4
    shutil.rmtree(BASE, ignore_errors=True)
    rng = random.Random(16)
    for i in range(n):
        d = TREE / f"d{i // 100:04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(rng.randbytes(rng.randint(1024, 8192)))
    for i in range(4):
        (TREE / f"big{i}").write_bytes(rng.randbytes(1 << 20))
    marker.touch()
    return n + 4


class _Counting(logging.Handler):
    """Counts the requests moto's werkzeug server logs, by method."""

    _LINE = re.compile(r'"(GET|PUT|HEAD|POST|DELETE) ')

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        m = self._LINE.search(record.getMessage())
        if m:
            self.counts[m.group(1)] += 1


def _import(env: dict[str, str], flags: list[str]) -> tuple[float, float, str]:
    wall, cpu, out = timed_cpu([TVIX, "import", *flags, str(TREE)], env)
    return wall, cpu, out.decode().split()[-1]


def _narinfo_latency(url: str, hash_part: str, n: int) -> tuple[float, float]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port)
    times = []
    for i in range(n + 100):
        start = time.perf_counter()
        conn.request("GET", f"/{hash_part}.narinfo")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise SystemExit(f"narinfo GET answered {resp.status}: {body[:200]!r}")
        if i >= 100:  # (warm-up)
            times.append(time.perf_counter() - start)
    conn.close()
    times.sort()
    return times[len(times) // 2] * 1e3, times[int(len(times) * 0.99)] * 1e3


def _bridge(env: dict[str, str], flags: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [TVIX, "nar-bridge", "-l", "127.0.0.1:0", *flags],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(rb"nar-bridge listening on (http://\S+)", line)
        if m:
            return proc, m.group(1).decode()
    raise SystemExit("nar-bridge did not start")


def run(args: argparse.Namespace) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.servers import start_postgres, start_s3

    files = build_tree(args.shared_files)
    counting = _Counting()
    logging.getLogger("werkzeug").addHandler(counting)
    pg, s3 = start_postgres(), start_s3()
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    rows: list[tuple[str, float, float, dict[str, int] | None]] = []
    try:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_SERVICE_ADDR")}
        home = BASE / "embedded-home"
        shutil.rmtree(home, ignore_errors=True)
        env_embedded = {**env, "TVIX_STORE_HOME": str(home)}
        e_wall, e_cpu, path = _import(env_embedded, [])
        rows.append(("embedded (default)", e_wall, e_cpu, None))
        flag_sets = {}
        for label, extra in (
            ("S3 + PostgreSQL", ""),
            ("S3 + PostgreSQL, 1 request at a time", "&max_concurrency=1"),
        ):
            meta = pg.fresh_url()
            flags = [
                "--blob-service-addr",
                s3.fresh_url() + extra,
                "--directory-service-addr",
                meta,
                "--path-info-service-addr",
                meta,
            ]
            env_shared = {**env, "TVIX_STORE_HOME": str(BASE / "unused-home")}
            counting.counts.clear()
            wall, cpu, shared_path = _import(env_shared, flags)
            if shared_path != path:
                raise SystemExit(f"imports disagree: {path} vs {shared_path}")
            rows.append((label, wall, cpu, dict(counting.counts)))
            flag_sets[label] = (env_shared, flags)
        hash_part = Path(path).name[:32]
        latency = []
        for label, (e, flags) in (
            ("embedded (default)", (env_embedded, [])),
            ("S3 + PostgreSQL", flag_sets["S3 + PostgreSQL"]),
        ):
            proc, url = _bridge(e, flags)
            try:
                latency.append(
                    (label, *_narinfo_latency(url, hash_part, args.shared_narinfo_requests))
                )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    finally:
        pg.close()
        s3.close()
    lines = [
        f"Machine: {machine()}; tree: {files} files ({args.shared_files} of 1-8 KiB, 4 of 1 MiB),"
        " moto S3 in the benchmark process, PostgreSQL 15 with fsync=off.",
        "",
        "| import into | wall | CPU s (tvix-store) | vs embedded | S3 requests | per file |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for label, wall, cpu, counts in rows:
        shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if counts else "–"
        per = f"{sum(counts.values()) / files:.2f}" if counts else "–"
        lines.append(
            f"| {label} | {wall:.2f} s | {cpu:.2f} | {wall / e_wall:.2f}× | {shown} | {per} |"
        )
    lines += [
        "",
        f"narinfo GET, {args.shared_narinfo_requests} sequential over one keep-alive connection:",
        "",
        "| store | p50 | p99 |",
        "|---|---:|---:|",
    ]
    lines += [f"| {label} | {p50:.2f} ms | {p99:.2f} ms |" for label, p50, p99 in latency]
    return "\n".join(lines)
