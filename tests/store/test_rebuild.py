"""The packs hold the whole embedded store: Directories and PathInfos are journaled into
them, so deleting ``store.sqlite`` loses nothing (real CLI, real Nix)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from tests.compat.oracle import DigestSink, Nix
from tvix_store.embedded import STORE_DB

from .conftest import ok, tvix


def _trees(root: Path) -> list[Path]:
    rng = random.Random(11)
    out = []
    for t in range(3):
        tree = root / f"tree{t}"
        for d in range(4):
            sub = tree / f"d{d}" / "inner"
            sub.mkdir(parents=True)
            for i in range(10):
                (sub / f"f{i}").write_bytes(f"{t} {d} {i}\n".encode() * rng.randrange(1, 300))
            (tree / f"d{d}" / "link").symlink_to("inner/f0")
        (tree / "shared.txt").write_bytes(b"the same in every tree\n" * 100)
        (tree / "large.bin").write_bytes(rng.randbytes(600 * 1024))  # chunked
        out.append(tree)
    lone = root / "lone-file"
    lone.write_bytes(b"a path that is one file\n")
    out.append(lone)
    return out


def _snapshot(home: Path, paths: list[str]) -> dict[str, tuple[str, dict[str, object]]]:
    out = {}
    for sp in paths:
        nar = ok(tvix(home, "export", sp))
        info = json.loads(ok(tvix(home, "info", "--json", sp)))
        out[sp] = (hashlib.sha256(nar).hexdigest(), info)
    return out


def test_deleting_store_sqlite_rebuilds_the_store(tmp_path: Path, home: Path, nix: Nix) -> None:
    trees = _trees(tmp_path / "src")
    paths = [ok(tvix(home, "import", t)).decode().strip() for t in trees]
    before = _snapshot(home, paths)
    for t, sp in zip(trees, paths, strict=True):
        want = DigestSink(keep=False)
        nix.dump(t, want)
        assert before[sp][0] == want.digest.hex()
    for name in os.listdir(home):
        if name.startswith(STORE_DB):  # the database and its -wal/-shm
            (home / name).unlink()
    assert _snapshot(home, paths) == before
    # ... and the rebuilt store takes new paths and exports them from plans again.
    extra = tmp_path / "extra"
    (extra / "x").mkdir(parents=True)
    (extra / "x" / "y").write_bytes(b"new after the rebuild\n")
    sp = ok(tvix(home, "import", extra)).decode().strip()
    want = DigestSink(keep=False)
    nix.dump(extra, want)
    assert _snapshot(home, [sp])[sp][0] == want.digest.hex()


def test_a_store_whose_index_is_behind_catches_up(tmp_path: Path, home: Path) -> None:
    """An older copy of ``store.sqlite`` (a backup, say): the paths added since come back."""
    trees = _trees(tmp_path / "src")
    first = ok(tvix(home, "import", trees[0])).decode().strip()
    ok(tvix(home, "info", first))  # (a checkpoint: the WAL is folded into the file)
    saved = {n: (home / n).read_bytes() for n in os.listdir(home) if n.startswith(STORE_DB)}
    later = [ok(tvix(home, "import", t)).decode().strip() for t in trees[1:]]
    before = _snapshot(home, [first, *later])
    for name in os.listdir(home):
        if name.startswith(STORE_DB):
            (home / name).unlink()
    for name, data in saved.items():
        (home / name).write_bytes(data)
    assert _snapshot(home, [first, *later]) == before
