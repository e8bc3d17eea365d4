"""Filesystem ingestion into real backends (objectstore on disk + SQLite, memory)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from tvix_castore.blobservice import BlobService, MemoryBlobService, ObjectStoreBlobService
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.directoryservice.memory import MemoryDirectoryService
from tvix_castore.directoryservice.sqlite import SqliteDirectoryService
from tvix_castore.errors import IngestionError
from tvix_castore.ingest import ingest_path
from tvix_castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix_castore.objectstore import LocalObjectStore


def make_tree(root: Path) -> None:
    (root / "empty-dir").mkdir(parents=True)
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "deep.txt").write_bytes(b"deep\n")
    (root / "empty").write_bytes(b"")
    (root / "exec.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "exec.sh").chmod(0o755)
    (root / "big.bin").write_bytes(blake3.blake3(b"big").digest(length=3_000_000))
    os.symlink("/nix/store/somewhereelse", root / "abs-link")
    os.symlink("a/b", root / "rel-link")
    os.symlink("does-not-exist", root / "dangling")
    (root / os.fsdecode(b"non-utf8-\xff")).write_bytes(b"x")
    (root / "Z").write_bytes(b"upper")
    (root / "é").write_bytes(b"unicode")
    (root / "same1").write_bytes(b"dup")
    (root / "same2").write_bytes(b"dup")


async def restore(node: Node, dest: Path, blobs: BlobService, dirs: DirectoryService) -> None:
    """Write a castore tree back to disk (the test's own oracle)."""
    if isinstance(node, SymlinkNode):
        os.symlink(node.target, dest)
    elif isinstance(node, FileNode):
        data = await blobs.read_all(node.digest)
        assert data is not None and len(data) == node.size
        dest.write_bytes(data)
        dest.chmod(0o755 if node.executable else 0o644)
    else:
        directory = await dirs.get(node.digest)
        assert directory is not None
        assert directory.size(dirs.size_mode) == node.size
        dest.mkdir()
        for child in directory.nodes():
            await restore(
                child, Path(os.fsdecode(os.fsencode(dest) + b"/" + child.name)), blobs, dirs
            )


@pytest.fixture(params=["memory", "objectstore+sqlite"])
def services(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[BlobService, DirectoryService]:
    if request.param == "memory":
        return MemoryBlobService(), MemoryDirectoryService()
    return (
        ObjectStoreBlobService(LocalObjectStore(tmp_path / "blobs")),
        SqliteDirectoryService(tmp_path / "dirs.sqlite"),
    )


async def test_ingest_and_restore(
    tmp_path: Path, services: tuple[BlobService, DirectoryService]
) -> None:
    blobs, dirs = services
    src = tmp_path / "src"
    make_tree(src)
    node = await ingest_path(src, blobs, dirs)
    assert isinstance(node, DirectoryNode) and node.name == b""
    out = tmp_path / "out"
    await restore(node, out, blobs, dirs)
    result = subprocess.run(
        ["diff", "-r", "--no-dereference", str(src), str(out)], capture_output=True
    )
    assert result.returncode == 0, result.stdout
    assert os.access(out / "exec.sh", os.X_OK) and not os.access(out / "empty", os.X_OK)
    # closure: root first, every directory once
    closure = [d async for d in dirs.get_recursive(node.digest)]
    assert closure[0].digest == node.digest
    assert len({d.digest for d in closure}) == len(closure)
    # ingesting again gives the same root
    assert await ingest_path(src, blobs, dirs) == node


async def test_lone_file_symlink_and_empty_dir(tmp_path: Path) -> None:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    (tmp_path / "f").write_bytes(b"Hello World!")
    (tmp_path / "f").chmod(0o700)
    node = await ingest_path(tmp_path / "f", blobs, dirs)
    assert node == FileNode(
        b"",
        await blobs.put(b"Hello World!"),
        12,
        executable=True,
    )
    os.symlink("/nix/store/somewhereelse", tmp_path / "l")
    assert await ingest_path(tmp_path / "l", blobs, dirs) == SymlinkNode(
        b"", b"/nix/store/somewhereelse"
    )
    os.symlink("f", tmp_path / "link-to-file")  # not followed, even at the root
    assert isinstance(await ingest_path(tmp_path / "link-to-file", blobs, dirs), SymlinkNode)
    (tmp_path / "e").mkdir()
    empty = await ingest_path(tmp_path / "e", blobs, dirs)
    assert isinstance(empty, DirectoryNode) and empty.size == 0
    assert empty.digest.hex() == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"


async def test_complicated_fixture_digest(tmp_path: Path) -> None:
    root = tmp_path / "c"
    (root / "keep").mkdir(parents=True)
    (root / ".keep").write_bytes(b"")
    (root / "keep" / ".keep").write_bytes(b"")
    os.symlink("/nix/store/somewhereelse", root / "aa")
    node = await ingest_path(root, MemoryBlobService(), MemoryDirectoryService())
    assert isinstance(node, DirectoryNode)
    assert node.digest.hex() == "3f951a15afd586fb3121ef4d13d582e811ce0e5a7f21c0497fd87490e9e2355a"
    assert node.size == 4


async def test_special_file_is_refused_and_nothing_committed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "ok").write_bytes(b"ok")
    os.mkfifo(src / "sub" / "fifo")
    dirs = SqliteDirectoryService(tmp_path / "d.sqlite")
    with pytest.raises(IngestionError, match=r"sub/fifo: unsupported file type") as exc:
        await ingest_path(src, MemoryBlobService(), dirs)
    assert exc.value.path.endswith("sub/fifo")
    count = dirs._conn.execute("SELECT count(*) FROM directories").fetchone()[0]
    assert count == 0


async def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(IngestionError, match="cannot stat"):
        await ingest_path(tmp_path / "nope", MemoryBlobService(), MemoryDirectoryService())


@pytest.fixture
def world_tmp() -> Iterator[Path]:
    """A temp dir that `nobody` can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="tvix-ingest-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_unreadable_file_as_unprivileged_user(world_tmp: Path) -> None:
    """Run the ingestion as `nobody` (tests run as root, who can read anything)."""
    tmp_path = world_tmp
    src = tmp_path / "src"
    src.mkdir()
    (src / "public").write_bytes(b"ok")
    (src / "secret").write_bytes(b"secret")
    (src / "secret").chmod(0o000)
    src.chmod(0o755)
    db = tmp_path / "db"
    db.mkdir()
    db.chmod(0o777)
    script = (
        "import asyncio, sys\n"
        "from tvix_castore.ingest import ingest_path\n"
        "from tvix_castore.blobservice import MemoryBlobService\n"
        "from tvix_castore.directoryservice.sqlite import SqliteDirectoryService\n"
        f"d = SqliteDirectoryService({str(db / 'd.sqlite')!r})\n"
        "try:\n"
        f"    asyncio.run(ingest_path({str(src)!r}, MemoryBlobService(), d))\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, e)\n"
        "print(d._conn.execute('SELECT count(*) FROM directories').fetchone()[0])\n"
    )
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"IngestionError {src / 'secret'}: cannot read: Permission denied"
    assert lines[1] == "0"  # no directory committed


async def test_scanned_tree_walk_and_fingerprints(tmp_path: Path) -> None:
    """``walk`` lists an uploaded tree in NAR order (pre-order, children by name);
    a scan without fingerprints keeps no stats, so it cannot tell a change."""
    from tvix_castore.ingest import ScannedFile, scan_tree, upload_files

    root = tmp_path / "t"
    (root / "b" / "c").mkdir(parents=True)
    (root / "a").write_bytes(b"x")
    (root / "b" / "c" / "d").write_bytes(b"")
    (root / "b" / "l").symlink_to("c")
    (root / "e").mkdir()
    tree = scan_tree(root)
    await upload_files(tree, MemoryBlobService())
    events = []
    for name, node in tree.walk():
        kind = "dir" if node is None else "link" if isinstance(node, SymlinkNode) else "file"
        events.append((name, kind))
        if isinstance(node, ScannedFile):
            data = b"x" if name == b"a" else b""
            assert node.node() == FileNode(name, B3Digest.of(data), len(data))
    assert events == [
        (b"", "dir"),
        (b"a", "file"),
        (b"b", "dir"),
        (b"c", "dir"),
        (b"d", "file"),
        (b"", "dir"),  # leaving c
        (b"l", "link"),
        (b"", "dir"),  # leaving b
        (b"e", "dir"),
        (b"", "dir"),  # leaving e
        (b"", "dir"),  # leaving the root
    ]
    assert tree.stats and tree.changed() is None
    (root / "a").write_bytes(b"xy")
    assert tree.changed() == str(root / "a")
    bare = scan_tree(root, fingerprints=False)
    assert bare.stats == [] and bare.changed() is None
