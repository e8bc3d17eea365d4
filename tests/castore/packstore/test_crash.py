"""kill -9 of a writing process at random points: every indexed blob still reads back.

A subprocess writes transactions in a loop (batches, streams, records,
aborts) and is killed at a random moment; the store is then opened (which
indexes what the dead writer left behind) and every blob the index names
must read back verified. Every few runs the index is deleted first, so the
rebuild from the packs alone is checked the same way.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tvix_castore.digests import B3Digest
from tvix_castore.packstore import PackBlobService

RUNS = 30
FORKED_RUNS = 10


def indexed(home: Path) -> list[bytes]:
    with contextlib.closing(sqlite3.connect(home / "store.sqlite")) as db:
        # in the order they lie (reads of one frame decode it once)
        rows = db.execute(
            "SELECT b.digest FROM pack_blobs b JOIN pack_frames f ON f.id = b.frame"
            " ORDER BY f.pack, f.offset, b.offset"
        ).fetchall()
        rows += db.execute("SELECT digest FROM pack_chunked").fetchall()
        return [bytes(r[0]) for r in rows]


def verify_all(home: Path) -> int:
    svc = PackBlobService(home)
    try:
        digests = indexed(home)
        for raw in digests:
            data = svc.reader.read(B3Digest(raw))
            assert data is not None and B3Digest.of(data).raw == raw
        assert svc.reader.problem(digests) is None
        return len(digests)
    finally:
        svc.close()


@pytest.mark.parametrize(
    ("run", "fork"), [(r, False) for r in range(RUNS)] + [(r, True) for r in range(FORKED_RUNS)]
)
def test_kill_9_while_writing(tmp_path: Path, run: int, fork: bool) -> None:
    home = tmp_path / "home"
    rng = random.Random(run)
    mode = ["fork"] if fork else []
    for _ in range(2 if run % 3 == 0 else 1):  # at times a second writer after a kill
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.castore.packstore.writer_script",
                str(home),
                str(run),
                *mode,
            ],
            stdout=subprocess.PIPE,
            start_new_session=True,  # (its forked workers die with it)
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            time.sleep(rng.uniform(0.02, 1.5 if fork else 0.5))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        count = verify_all(home)
        if run % 2 == 0:
            before = set(indexed(home))
            for suffix in ("", "-wal", "-shm"):
                Path(f"{home / 'store.sqlite'}{suffix}").unlink(missing_ok=True)
            assert verify_all(home) >= count
            assert set(indexed(home)) >= before
