"""``tvix-store fsck`` after content went missing from the index (real CLI, real files).

A chunk or a Directory whose index row is gone (what a lost pack or a bad
restore leaves) must be named, with the paths whose closures it breaks;
untouched paths must not be reported, and the plain text report must say
the same as ``--json``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tvix_castore.digests import B3Digest
from tvix_castore.packstore.reader import Chunked
from tvix_store.embedded import Embedded

from .conftest import ok, tvix
from .test_plan import MiB, import_tree, make_tree


def _chunks(home: Path, digest: B3Digest) -> list[bytes]:
    store = Embedded(home)
    try:
        loc = store.blobs().reader.locate([digest.raw])[digest.raw]
        assert isinstance(loc, Chunked)
        return [c.digest.raw for c in loc.chunks]
    finally:
        store.close()


def _unindex(home: Path, digest: bytes) -> None:
    with sqlite3.connect(home / "store.sqlite") as db:
        assert db.execute("DELETE FROM pack_blobs WHERE digest = ?", (digest,)).rowcount == 1


def _fsck(home: Path) -> tuple[int, dict[str, object], str]:
    as_json = tvix(home, "fsck", "--json")
    text = tvix(home, "fsck")
    assert as_json.returncode == text.returncode
    return as_json.returncode, json.loads(as_json.stdout), text.stdout.decode()


def test_missing_chunk_and_directory(tmp_path: Path, home: Path) -> None:
    import blake3

    a = make_tree(tmp_path / "a", big=3 * MiB)
    b = tmp_path / "b"
    b.mkdir()
    (b / "alone.txt").write_bytes(b"nothing shared\n" * 100)
    (b / "sub").mkdir()
    (b / "sub" / "x").write_bytes(b"x\n")
    path_a, path_b = import_tree(home, a), import_tree(home, b)
    code, report, _ = _fsck(home)
    assert code == 0 and report["ok"], report

    big = B3Digest(blake3.blake3((a / "big.bin").read_bytes()).digest())
    _unindex(home, _chunks(home, big)[1])
    code, report, text = _fsck(home)
    assert code == 1
    damaged = {d["path"]: d["why"] for d in report["damaged_paths"]}  # type: ignore[attr-defined]
    assert list(damaged) == [path_a], damaged
    assert "chunk" in damaged[path_a] and "missing" in damaged[path_a]
    assert f"damaged path: {path_a}" in text and path_b not in text

    info = json.loads(ok(tvix(home, "info", "--json", path_b)))
    root = B3Digest.parse(info["root"]["digest"])  # (b's root Directory: unindex b/sub's)
    store = Embedded(home)
    try:
        (directory,) = store.directories().get_many_sync([root]).values()
    finally:
        store.close()
    (child,) = directory.directories
    _unindex(home, child.digest.raw)
    code, report, _ = _fsck(home)
    damaged = {d["path"]: d["why"] for d in report["damaged_paths"]}  # type: ignore[attr-defined]
    assert set(damaged) == {path_a, path_b}
    assert f"directory {child.digest} is missing" in damaged[path_b]
