"""``tvix-store mount`` over the embedded store: every tree kind through a real FUSE mount.

The suite's edge-case trees (long and non-UTF-8 names, symlinks, empty files
and directories, executables, a 64 MiB multi-chunk file) are imported, then
compared through the mount with the originals: ``diff -r --no-dereference``,
a snapshot of kinds, sizes, executable bits and sha256, exact modes, the
digest xattrs; random-offset reads of the multi-chunk file, and concurrent
readers in threads and processes. Inodes: shared by (digest, executable),
never between a plain file and an executable, never between directories, and
stable once the kernel forgot them.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import os
import random
import stat
import subprocess
from pathlib import Path

import blake3
import pytest

from tests.compat.trees import TREES, expected, materialize, snapshot
from tvix_castore.digests import B3Digest

from .conftest import Mounts, import_path, ok, run, tvix

BLOB_XATTR = "user.tvix.castore.blob.digest"
DIR_XATTR = "user.tvix.castore.directory.digest"


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """Every tree of the corpus, on disk and imported into one store: (src, home, name → basename)."""
    work = tmp_path_factory.mktemp("trees")
    src, home = work / "src", work / "home"
    src.mkdir()
    for tree in TREES:
        materialize(tree.root, bytes(src / tree.name))
    out = ok(tvix(home, "import", *(src / t.name for t in TREES))).decode().split()
    names = {Path(p).name.split("-", 1)[1]: Path(p).name for p in out}
    assert sorted(names) == sorted(t.name for t in TREES)
    return src, home, names


def _digest_of(path: Path) -> str:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return str(B3Digest(h.digest()))


def test_every_tree_reads_back_exactly(
    trees: tuple[Path, Path, dict[str, str]], mounts: Mounts
) -> None:
    src, home, names = trees
    m = mounts.start(home)
    for tree in TREES:
        there = m.at / names[tree.name]
        assert snapshot(bytes(there)) == expected(tree.root), tree.name
        run(["diff", "-r", "--no-dereference", src / tree.name, there])
        for dirpath, dirnames, filenames in os.walk(there):
            for name in dirnames + filenames + [""]:
                p = Path(dirpath, name) if name else Path(dirpath)
                st = p.lstat()
                if stat.S_ISDIR(st.st_mode):
                    assert stat.S_IMODE(st.st_mode) == 0o555
                    assert os.getxattr(p, DIR_XATTR, follow_symlinks=False).startswith(b"b3:")
                elif stat.S_ISREG(st.st_mode):
                    orig = src / tree.name / p.relative_to(there)
                    executable = bool(orig.lstat().st_mode & stat.S_IXUSR)
                    assert stat.S_IMODE(st.st_mode) == (0o555 if executable else 0o444), p
                    assert st.st_size == orig.lstat().st_size
                    if st.st_size <= 4 << 20:
                        got = os.getxattr(p, BLOB_XATTR).decode()
                        assert got == _digest_of(orig), p
                        assert os.listxattr(p) == [BLOB_XATTR]
                else:
                    assert stat.S_ISLNK(st.st_mode)
    assert m.proc.poll() is None
    assert m.stop() == 0


def test_xattr_errors(trees: tuple[Path, Path, dict[str, str]], mounts: Mounts) -> None:
    _, home, names = trees
    m = mounts.start(home)
    f = m.at / names["lone-file"]
    with pytest.raises(OSError) as err:
        os.getxattr(f, DIR_XATTR)
    assert err.value.errno == errno.ENODATA
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(8)
    n = libc.getxattr(bytes(f), BLOB_XATTR.encode(), buf, ctypes.c_size_t(8))
    assert n == -1 and ctypes.get_errno() == errno.ERANGE  # ("b3:" + 44 characters)
    assert libc.getxattr(bytes(f), BLOB_XATTR.encode(), None, ctypes.c_size_t(0)) == 47
    m.stop()
    m = mounts.start(home, "--no-show-xattr")
    with pytest.raises(OSError) as err:
        os.getxattr(m.at / names["lone-file"], BLOB_XATTR)
    assert err.value.errno in (errno.ENOTSUP, errno.ENOSYS)


def test_random_and_concurrent_reads_of_a_multi_chunk_file(
    trees: tuple[Path, Path, dict[str, str]], mounts: Mounts
) -> None:
    src, home, names = trees
    m = mounts.start(home)
    big, orig = m.at / names["large-64MiB"] / "big.bin", src / "large-64MiB" / "big.bin"
    size = orig.stat().st_size
    rng = random.Random(15)
    spans = [(rng.randrange(size), rng.choice([1, 4095, 65536, 300_000])) for _ in range(200)]
    spans += [(size - 10, 100), (0, 1), (size, 10)]
    with open(big, "rb") as fm, open(orig, "rb") as fo:
        for off, n in spans:
            assert os.pread(fm.fileno(), n, off) == os.pread(fo.fileno(), n, off), (off, n)

    def reader(seed: int) -> bool:
        r = random.Random(seed)
        with open(big, "rb", buffering=0) as fm, open(orig, "rb", buffering=0) as fo:
            for _ in range(40):
                off, n = r.randrange(size), r.randrange(1, 1 << 20)
                if os.pread(fm.fileno(), n, off) != os.pread(fo.fileno(), n, off):
                    return False
        return True

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(reader, range(8)))
    want = run(["b3sum", "--no-names", orig])
    procs = [
        subprocess.Popen(["b3sum", "--no-names", big], stdout=subprocess.PIPE) for _ in range(4)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and out == want
    assert m.stop() == 0


def test_inodes_are_shared_by_content_and_executable_bit(tmp_path: Path, mounts: Mounts) -> None:
    home, src = tmp_path / "home", tmp_path / "inodes"
    (src / "a" / "empty").mkdir(parents=True)
    (src / "b" / "empty").mkdir(parents=True)
    for d in ("a", "b"):
        (src / d / "same").write_bytes(b"the same bytes\n")
    (src / "a" / "exe").write_bytes(b"the same bytes\n")
    (src / "a" / "exe").chmod(0o755)
    (src / "a" / "ln").symlink_to("same")
    (src / "b" / "ln").symlink_to("same")
    base = import_path(home, src)
    m = mounts.start(home)
    root = m.at / base
    ino = {p: (root / p).lstat().st_ino for p in ("a/same", "b/same", "a/exe", "a/ln", "b/ln")}
    assert ino["a/same"] == ino["b/same"] and ino["a/ln"] == ino["b/ln"]
    assert ino["a/exe"] != ino["a/same"]
    assert stat.S_IMODE((root / "a/exe").stat().st_mode) == 0o555
    assert stat.S_IMODE((root / "a/same").stat().st_mode) == 0o444
    empties = {(root / d / "empty").stat().st_ino for d in ("a", "b")}
    assert len(empties) == 2  # (same digest, but directories are never shared)
    Path("/proc/sys/vm/drop_caches").write_text("2")  # (the kernel forgets the inodes)
    again = {p: (root / p).lstat().st_ino for p in ino}
    assert again == ino
    assert m.stop() == 0
