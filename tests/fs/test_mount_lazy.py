"""Nothing is fetched that is not touched, the top level, and every failure is EIO on its operation.

A counting mount (:mod:`tests.fs.counting_mount`) logs each PathInfo,
Directory, blob and chunk fetch: a stat of a store path asks one PathInfo
and nothing else, a lookup deep inside fetches only the Directories on the
way, listing a directory reads its own subdirectories ahead (not deeper),
``open`` and ``ls -l`` fetch no blob, and a small read in the middle
of a multi-chunk file fetches the chunk it needs and the few read ahead,
not the file. Errors: missing blob, damaged bytes, missing Directory → EIO
with a log line, the mount staying up; bad names → ENOENT; bad mountpoints
refused.
"""

from __future__ import annotations

import errno
import os
import random
import sqlite3
from pathlib import Path

import blake3
import pytest

from tests.store.packs import damage_frame, frame_of
from tvix_castore.digests import B3Digest

from .conftest import Mounts, import_path, mounted, ok, run, tvix

MiB = 1 << 20


def _tree(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "x").write_bytes(b"x\n")
    (root / "other").mkdir()
    (root / "other" / "y").write_bytes(b"y\n")
    for i in range(20):
        (root / f"f{i}").write_bytes(f"{i}\n".encode())
    (root / "big").write_bytes(random.Random(3).randbytes(8 * MiB))
    return root


def _kinds(lines: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in lines:
        kind = line.split()[0]
        out[kind] = out.get(kind, 0) + 1
    return out


def test_only_what_is_touched_is_fetched(tmp_path: Path, mounts: Mounts) -> None:
    home = tmp_path / "home"
    a = import_path(home, _tree(tmp_path / "a"))
    import_path(home, _tree(tmp_path / "b-unrelated"))
    m = mounts.start(home, counting=True)
    (m.at / a).stat()
    assert _kinds(m.fetched()) == {"pathinfo": 1}
    (m.at / a / "sub" / "deeper" / "x").stat()
    assert _kinds(m.fetched()) == {"pathinfo": 1, "directory": 3}  # (a, sub, deeper)
    run(["ls", "-l", m.at / a])  # (listing a reads its subdirectories ahead: other, not deeper)
    assert _kinds(m.fetched()) == {"pathinfo": 1, "directory": 4}
    with open(m.at / a / "f1", "rb"):
        pass
    assert _kinds(m.fetched()) == {"pathinfo": 1, "directory": 4}  # (no blob: nothing read)
    assert (m.at / a / "f1").read_bytes() == b"1\n"
    assert _kinds(m.fetched())["blob"] == 1
    with open(m.at / a / "big", "rb", buffering=0) as f:
        assert (
            os.pread(f.fileno(), 10, 5 * MiB)
            == (tmp_path / "a" / "big").read_bytes()[5 * MiB : 5 * MiB + 10]
        )
    chunks = _kinds(m.fetched()).get("chunk", 0)
    assert 1 <= chunks <= 8, m.fetched()  # (of about 32: the one read, read-ahead, no more)
    assert m.stop() == 0


def test_top_level_names(tmp_path: Path, mounts: Mounts) -> None:
    home = tmp_path / "home"
    base = import_path(home, _tree(tmp_path / "a"))
    m = mounts.start(home)
    assert (m.at / base).is_dir()
    digest_part = base.split("-", 1)[0]
    for name in [f"{digest_part}-not-its-name", "x", "0" * 32, f"{digest_part}", ".."]:
        with pytest.raises(FileNotFoundError):
            (m.at / name / "f1").stat()
    with pytest.raises(PermissionError):
        os.listdir(m.at)
    assert m.stop() == 0


def test_list_root_loses_no_entry(tmp_path: Path, mounts: Mounts) -> None:
    home, src = tmp_path / "home", tmp_path / "many"
    src.mkdir()
    paths = []
    for i in range(300):  # (long names: the kernel's reply buffer fills many times)
        p = src / (f"{i:04d}-" + "n" * 150)
        p.write_bytes(str(i).encode())
        paths.append(p)
    out = ok(tvix(home, "import", *paths)).decode().split()
    m = mounts.start(home, "--list-root")
    assert sorted(os.listdir(m.at)) == sorted(Path(p).name for p in out)
    assert m.stop() == 0


def _unindex(home: Path, digest: bytes) -> None:
    with sqlite3.connect(home / "store.sqlite") as db:
        assert db.execute("DELETE FROM pack_blobs WHERE digest = ?", (digest,)).rowcount == 1


def test_failures_are_eio_and_the_mount_stays_up(tmp_path: Path, mounts: Mounts) -> None:
    home = tmp_path / "home"
    a = import_path(home, _tree(tmp_path / "a"))
    _unindex(home, blake3.blake3(b"3\n").digest())  # (a blob gone)
    damage_frame(frame_of(home, B3Digest(blake3.blake3(b"7\n").digest())))  # (bytes damaged)
    (tmp_path / "c").write_bytes(b"stored whole, in a later pack\n")
    c = import_path(home, tmp_path / "c")
    m = mounts.start(home)
    for name in ("f3", "f7"):
        with pytest.raises(OSError) as err:
            (m.at / a / name).read_bytes()
        assert err.value.errno == errno.EIO, name
    assert "mount: blob" in m.log()
    # The mount is still up and serves what is whole.
    assert (m.at / c).read_bytes() == b"stored whole, in a later pack\n"
    assert m.proc.poll() is None
    assert m.stop() == 0


def test_missing_directory_is_eio(tmp_path: Path, mounts: Mounts) -> None:
    import json

    from tvix_store.embedded import Embedded

    home = tmp_path / "home"
    a = import_path(home, _tree(tmp_path / "a"))
    root = json.loads(ok(tvix(home, "info", "--json", f"/nix/store/{a}")))["root"]["digest"]
    store = Embedded(home)
    try:
        (directory,) = store.directories().get_many_sync([B3Digest.parse(root)]).values()
    finally:
        store.close()
    (sub,) = [d for d in directory.directories if d.name == b"sub"]
    _unindex(home, sub.digest.raw)
    m = mounts.start(home)
    with pytest.raises(OSError) as err:
        os.listdir(m.at / a / "sub")
    assert err.value.errno == errno.EIO
    assert f"directory {sub.digest}" in m.log()
    assert sorted(os.listdir(m.at / a / "other")) == ["y"]
    assert m.stop() == 0


def test_bad_mountpoints_are_refused(tmp_path: Path, mounts: Mounts) -> None:
    home = tmp_path / "home"
    import_path(home, _tree(tmp_path / "a"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_bytes(b"")
    m = mounts.start(home)
    for where, message in [
        (tmp_path / "nowhere", "does not exist"),
        (full, "is not empty"),
        (full / "x", "is a file"),
        (m.at, "already a mount point"),
    ]:
        proc = tvix(home, "mount", where)
        assert proc.returncode != 0 and message in proc.stderr.decode(), (where, proc.stderr)
    assert mounted(m.at) and m.stop() == 0
