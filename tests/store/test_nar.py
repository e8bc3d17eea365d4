"""NAR ⇄ castore against the SPEC vectors, over real backends."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nix_compat.nar.wire import token
from tvix_castore.blobservice import BlobService, MemoryBlobService, ObjectStoreBlobService
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice import MemoryDirectoryService, SqliteDirectoryService
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.nodes import DirectoryNode, FileNode, SymlinkNode
from tvix_castore.objectstore import LocalObjectStore
from tvix_store.embedded import Embedded
from tvix_store.nar import NarRenderError, calculate_nar, ingest_nar, ingest_nar_file, render_nar
from tvix_store.nar.ingest import InvalidNar

DATA = Path(__file__).resolve().parent.parent / "data"

# name -> (size, sha256 hex, root digest hex (documented sizes) or None, size)
NARS = {
    "symlink.nar": (136, "097d397e9b5826384eaa16c457715d1c1a51670313ead0f58566e0b232539cf1"),
    "helloworld.nar": (128, "03e7f63be30b065d78bcf615f5473545fdb4eb69aa416f43495b4e05cdfb8040"),
    "complicated.nar": (840, "ebd52279a8df024c9fd5718de4103bf5e760dc7f2cf49044ee7dea87ab16911a"),
    "emptydirectory.nar": (96, "a50a5ab6d992f5598edd92105059fae9acfc192981e08bd88534c2167e92526a"),
    "onebyteregular.nar": (120, "730850a811259dbf3a68dc2ee87a79aa6cae9f71375edf396f9d7a91fbe9134d"),
    "onebyteexecutable.nar": (
        152,
        "fa0de8dccc3589bed965eee20dd776b232f90fee5f004a58e11898c8d371c7f4",
    ),
    "popdirectories.nar": (600, "88c73fb9141b358561b28f5185ea7ecc7397d3a09942f81269118129d06fb59e"),
    "net-tools.nar": (464152, "c6e155b3456e30b7612263ec095070811caf8abfd59faa72ab82a592efdeb253"),
}
HELLO = B3Digest.from_hex("5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c")
ONE = B3Digest.from_hex("48fc721fbbc172e0925fa27af1671de225ba927134802998b10a1568a188652b")


def root_of(name: str) -> object:
    return {
        "symlink.nar": SymlinkNode(b"", b"/nix/store/somewhereelse"),
        "helloworld.nar": FileNode(b"", HELLO, 12),
        "complicated.nar": DirectoryNode(
            b"",
            B3Digest.from_hex("3f951a15afd586fb3121ef4d13d582e811ce0e5a7f21c0497fd87490e9e2355a"),
            4,
        ),
        "emptydirectory.nar": DirectoryNode(
            b"",
            B3Digest.from_hex("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"),
            0,
        ),
        "onebyteregular.nar": FileNode(b"", ONE, 1),
        "onebyteexecutable.nar": FileNode(b"", ONE, 1, executable=True),
        "popdirectories.nar": DirectoryNode(
            b"",
            B3Digest.from_hex("c4be42fe5a2cb9d366e2f076d96c60b0a6cdf0c3b02c7b650bf6ec52c71a8932"),
            3,
        ),
        "net-tools.nar": DirectoryNode(
            b"",
            B3Digest.from_hex("189a4a0d0f964c950afabb8b83c7f8a5e3511c3c657368411a6d0ae8efd318db"),
            34,
        ),
    }[name]


@pytest.fixture(params=["memory", "embedded"])
async def services(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[BlobService, DirectoryService]]:
    if request.param == "memory":
        yield MemoryBlobService(), MemoryDirectoryService()
        return
    store = Embedded(tmp_path / "home")
    yield store.blobs(), store.directories()
    await store.aclose()


@pytest.mark.parametrize("name", sorted(NARS))
async def test_ingest_render_roundtrip(
    name: str, services: tuple[BlobService, DirectoryService]
) -> None:
    blobs, dirs = services
    data = (DATA / name).read_bytes()
    size, sha = NARS[name]
    result = await ingest_nar_file(DATA / name, blobs, dirs)
    assert result.nar_size == size and result.nar_sha256.hex() == sha
    assert result.node == root_of(name)
    rendered = b"".join([p async for p in render_nar(result.node, blobs, dirs)])
    assert rendered == data
    assert await calculate_nar(result.node, blobs, dirs) == (size, bytes.fromhex(sha))


async def test_render_size_mismatch() -> None:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    digest = await blobs.put(b"Hello World!")
    with pytest.raises(NarRenderError, match="unexpected EOF"):
        await calculate_nar(FileNode(b"", digest, 42), blobs, dirs)
    with pytest.raises(NarRenderError, match="reader has more data"):
        await calculate_nar(FileNode(b"", digest, 2), blobs, dirs)


async def test_render_missing_content_fails_before_first_byte() -> None:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    missing_dir = DirectoryNode(b"", B3Digest(bytes(32)), 0)
    stream = render_nar(missing_dir, blobs, dirs)
    with pytest.raises(NarRenderError, match="not found"):
        await anext(stream)
    with pytest.raises(NarRenderError, match="not found"):
        await calculate_nar(FileNode(b"", B3Digest(bytes(32)), 1), blobs, dirs)


async def test_large_nar_streams(tmp_path: Path) -> None:
    """A 40 MiB file inside a NAR goes through the streamed (large file) path."""
    payload = hashlib.shake_256(b"x").digest(40 << 20)
    nar = token(b"nix-archive-1", b"(", b"type", b"directory", b"entry", b"(", b"name", b"big",
                b"node", b"(", b"type", b"regular", b"contents", payload, b")", b")", b")")  # fmt: skip
    blobs = ObjectStoreBlobService(LocalObjectStore(tmp_path))
    dirs = MemoryDirectoryService()
    result = await ingest_nar_file(io.BytesIO(nar), blobs, dirs)
    assert result.nar_sha256 == hashlib.sha256(nar).digest()
    chunks = await blobs.chunks(B3Digest.of(payload))
    assert chunks is not None and len(chunks) > 10
    assert await calculate_nar(result.node, blobs, dirs) == (len(nar), hashlib.sha256(nar).digest())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b + b"\0" * 8, "trailing bytes"),
        (lambda b: b[:-8], "unexpected end"),
        (lambda b: b[:200] + b"\x01" + b[201:], "invalid NAR"),
        (lambda b: b"", "unexpected end"),
    ],
)
async def test_invalid_nar_commits_nothing(mutate: object, message: str, tmp_path: Path) -> None:
    data = mutate((DATA / "complicated.nar").read_bytes())  # type: ignore[operator]
    dirs = SqliteDirectoryService(tmp_path / "d.sqlite")
    with pytest.raises(InvalidNar, match=message):
        await ingest_nar_file(io.BytesIO(data), MemoryBlobService(), dirs)
    assert dirs._conn.execute("SELECT count(*) FROM directories").fetchone()[0] == 0
    await dirs.aclose()


async def test_source_error_propagates() -> None:
    async def read(n: int) -> bytes:
        raise ConnectionResetError("client went away")

    with pytest.raises((ConnectionResetError, InvalidNar)):
        await ingest_nar(read, MemoryBlobService(), MemoryDirectoryService())


def test_nar_ingestion_memory_stays_flat(tmp_path: Path) -> None:
    """A 256 MiB file inside a NAR, streamed into the embedded store (its chunks packed):
    the ingesting process never holds the file (peak RSS stays far below its size)."""
    import subprocess
    import sys

    script = r"""
import asyncio, hashlib, sys
from pathlib import Path
from nix_compat.nar.wire import U64, token
from tvix_store.config import open_store
from tvix_store.nar import ingest_nar

SIZE = 256 << 20
head = token(b"nix-archive-1", b"(", b"type", b"directory", b"entry", b"(", b"name", b"big",
             b"node", b"(", b"type", b"regular", b"contents") + U64.pack(SIZE)
tail = token(b")", b")", b")")

def pieces():
    yield head
    for i in range(SIZE >> 20):
        yield hashlib.shake_256(i.to_bytes(8, "little")).digest(1 << 20)
    yield tail

async def main() -> None:
    stream = pieces()
    pending = b""
    sha = hashlib.sha256()

    async def read(n: int) -> bytes:
        nonlocal pending
        while len(pending) < n:
            more = next(stream, b"")
            if not more:
                break
            pending += more
        out, pending = pending[:n], pending[n:]
        sha.update(out)
        return out

    store = await open_store(home=Path(sys.argv[1]))
    async with store:
        result = await ingest_nar(read, store.blobs, store.directories)
    assert result.nar_sha256 == sha.digest(), "NarHash"
    assert result.nar_size == len(head) + SIZE + len(tail), "NarSize"
    # VmHWM, not ru_maxrss: that one keeps the forking pytest process's peak across exec
    with open("/proc/self/status") as f:
        print(next(line.split()[1] for line in f if line.startswith("VmHWM:")))

asyncio.run(main())
"""
    home = tmp_path / "home"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(home)],
        capture_output=True,
        timeout=300,
        check=False,
        env={"TVIX_STORE_CHUNK_ZSTD": "none", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    peak_mib = int(proc.stdout.decode().strip()) // 1024
    assert peak_mib < 150, f"peak RSS {peak_mib} MiB for a 256 MiB file"
    packs = sum(p.stat().st_size for p in (home / "packs").iterdir())
    assert packs >= 256 << 20  # the chunks went into the packs
    assert not any(p.is_file() for p in (home / "blobs").rglob("*"))  # no chunk files
