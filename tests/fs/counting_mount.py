"""A ``tvix-store mount`` whose services log every fetch (and can be held), for tests.

``python -m tests.fs.counting_mount LOG MOUNTPOINT [--gate FILE] [--list-root]``
mounts the embedded store at ``TVIX_STORE_HOME`` like the CLI does, through
wrappers that append one line per fetch to LOG: ``pathinfo <hash>``,
``directory <digest>``, ``blob <digest>`` (a small blob read whole) and
``chunk <digest>`` (one chunk of a chunked blob, as a remote chunk-aware
blob service would be asked). With ``--gate``, every blob or chunk fetch
waits until FILE exists: a reader blocked inside the mount, on demand.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from tvix_castore.blobservice.base import (
    BlobReader,
    BlobService,
    BlobWriter,
    BytesBlobReader,
    ChunkMeta,
)
from tvix_castore.blobservice.objectstore import ChunkedReader
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.nodes import Directory
from tvix_store.config import open_store
from tvix_store.mount import mount_store
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.base import PathInfoService


class _Log:
    def __init__(self, path: Path, gate: Path | None) -> None:
        self._f = path.open("a", buffering=1)
        self._gate = gate

    def line(self, text: str) -> None:
        self._f.write(text + "\n")

    async def hold(self) -> None:
        while self._gate is not None and not self._gate.exists():
            await asyncio.sleep(0.02)


class CountingBlobs(BlobService):
    def __init__(self, inner: BlobService, log: _Log) -> None:
        self._inner, self._log = inner, log

    async def has(self, digest: B3Digest) -> bool:
        return await self._inner.has(digest)

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return await self._inner.chunks(digest)

    async def _whole(self, digest: B3Digest, what: str) -> bytes | None:
        await self._log.hold()
        self._log.line(f"{what} {digest}")
        reader = await self._inner.open_read(digest)
        if reader is None:
            return None
        try:
            return await reader.read()
        finally:
            await reader.aclose()

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        chunks = await self._inner.chunks(digest)
        if chunks is None:
            return None
        if len(chunks) > 1:
            return ChunkedReader(chunks, lambda d, _size: self._whole(d, "chunk"))
        data = await self._whole(digest, "blob")
        return None if data is None else BytesBlobReader(data)

    def open_write(self) -> BlobWriter:
        raise NotImplementedError("read-only")


class CountingDirectories(DirectoryService):
    def __init__(self, inner: DirectoryService, log: _Log) -> None:
        self._inner, self._log = inner, log

    async def get(self, digest: B3Digest) -> Directory | None:
        self._log.line(f"directory {digest}")
        return await self._inner.get(digest)

    async def _commit(self, directories: Sequence[Directory]) -> None:
        raise NotImplementedError("read-only")


class CountingPathInfos(PathInfoService):
    def __init__(self, inner: PathInfoService, log: _Log) -> None:
        self._inner, self._log = inner, log

    async def get(self, digest: bytes) -> PathInfo | None:
        self._log.line(f"pathinfo {digest.hex()}")
        return await self._inner.get(digest)

    async def put(self, info: PathInfo) -> PathInfo:
        raise NotImplementedError("read-only")

    def list(self) -> AsyncIterator[PathInfo]:
        self._log.line("pathinfo list")
        return self._inner.list()


async def _main(args: argparse.Namespace) -> None:
    log = _Log(Path(args.log), Path(args.gate) if args.gate else None)
    store = await open_store()
    try:
        store.blobs = CountingBlobs(store.blobs, log)
        store.directories = CountingDirectories(store.directories, log)
        store.pathinfos = CountingPathInfos(store.pathinfos, log)
        await mount_store(store, Path(args.mountpoint), list_root=args.list_root)
    finally:
        await store.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("log")
    parser.add_argument("mountpoint")
    parser.add_argument("--gate")
    parser.add_argument("--list-root", action="store_true")
    asyncio.run(_main(parser.parse_args()))
