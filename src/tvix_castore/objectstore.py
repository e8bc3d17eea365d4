"""A minimal key → bytes object store: local directory or memory.

Backends in B §7 layouts (blobs, chunks, directory closures) sit on this.
Writes are atomic: a key either holds a complete object or does not exist
(temp file in the same directory, then ``os.replace``), so a crash never
leaves a partial object visible and concurrent writers of the same
(content-addressed) key are harmless.
"""

from __future__ import annotations

import abc
import contextlib
import mmap
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tvix_castore.errors import StorageError, os_storage_error
from tvix_castore.lazy import lazy_module

if TYPE_CHECKING:
    import asyncio
else:
    asyncio = lazy_module("asyncio")  # not needed to write a NAR from its plan

__all__ = ["LocalObjectStore", "MemoryObjectStore", "ObjectStore"]


class ObjectStore(abc.ABC):
    """Keys are ``/``-separated relative paths; values are immutable bytes.

    The ``*_sync`` methods run on the caller's thread (use them from worker
    threads to batch many small operations); the async ones never block the loop.
    """

    cheap_exists = True
    """Whether asking if a key exists costs much less than writing a small object
    (false for cloud storage: there, content-addressed small objects are just put)."""
    upload_concurrency = 1
    """How many objects a batch upload writes at once (more where each is a round trip)."""

    @abc.abstractmethod
    def get_sync(self, key: str) -> bytes | None:
        """The object's bytes, or ``None``."""

    @abc.abstractmethod
    def put_sync(self, key: str, data: bytes) -> None:
        """Atomically store ``data`` under ``key`` (overwriting is allowed)."""

    @abc.abstractmethod
    def exists_sync(self, key: str) -> bool:
        """Whether ``key`` exists."""

    def put_pieces_sync(self, key: str, pieces: Iterable[bytes]) -> None:
        """Atomically store the concatenation of ``pieces`` under ``key``.

        For data produced as it is written (a compressor's output): a local
        store writes each piece as it comes, others join them first.
        """
        self.put_sync(key, b"".join(pieces))

    def view_sync(self, key: str) -> bytes | mmap.mmap | None:
        """The object's bytes without copying where possible (a read-only map of a file)."""
        return self.get_sync(key)

    def size_sync(self, key: str) -> int | None:
        """The object's size in bytes, or ``None`` if it does not exist."""
        data = self.get_sync(key)
        return None if data is None else len(data)

    async def get(self, key: str) -> bytes | None:
        """The object's bytes, or ``None``."""
        return await asyncio.to_thread(self.get_sync, key)

    async def put(self, key: str, data: bytes) -> None:
        """Atomically store ``data`` under ``key``."""
        await asyncio.to_thread(self.put_sync, key, data)

    async def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        return await asyncio.to_thread(self.exists_sync, key)


class MemoryObjectStore(ObjectStore):
    """Objects in a dict (``objectstore+memory:///``)."""

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}

    def get_sync(self, key: str) -> bytes | None:
        return self._objects.get(key)

    def put_sync(self, key: str, data: bytes) -> None:
        self._objects[key] = bytes(data)

    def exists_sync(self, key: str) -> bool:
        return key in self._objects

    async def get(self, key: str) -> bytes | None:
        return self._objects.get(key)

    async def put(self, key: str, data: bytes) -> None:
        self._objects[key] = bytes(data)

    async def exists(self, key: str) -> bool:
        return key in self._objects


class LocalObjectStore(ObjectStore):
    """Objects as files under ``root`` (``objectstore+file:///abs/dir``)."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.root = Path(root)
        self._root = os.fspath(root).rstrip("/") + "/"
        self._fsync = fsync
        self._made: set[str] = set()

    def _path(self, key: str) -> str:
        if key.startswith("/") or "/../" in f"/{key}/":
            raise StorageError(f"invalid object key {key!r}")
        return self._root + key

    def get_sync(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"reading object {key}: {exc}") from exc

    def view_sync(self, key: str) -> bytes | mmap.mmap | None:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"reading object {key}: {exc}") from exc
        try:
            if os.fstat(fd).st_size == 0:
                return b""
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise StorageError(f"reading object {key}: {exc}") from exc
        finally:
            os.close(fd)

    def size_sync(self, key: str) -> int | None:
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"reading object {key}: {exc}") from exc

    def put_sync(self, key: str, data: bytes) -> None:
        self.put_pieces_sync(key, (data,))

    def put_pieces_sync(self, key: str, pieces: Iterable[bytes]) -> None:
        path = self._path(key)
        parent = path.rpartition("/")[0]
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        try:
            if parent not in self._made:
                os.makedirs(parent, exist_ok=True)
                self._made.add(parent)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for piece in pieces:
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(fd, view) :]
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise os_storage_error(f"writing object {key}", exc, self.root) from exc
        except BaseException:  # (a failing producer of ``pieces``)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def exists_sync(self, key: str) -> bool:
        return os.path.exists(self._path(key))
