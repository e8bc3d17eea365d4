"""The FUSE operations (pyfuse3, inode level) over a BlobService, a DirectoryService and roots.

Lazy throughout: a root is asked for when it is looked up, a Directory is
fetched on the first lookup or listing inside it, and a file's blob is opened
on its first ``read`` (not at ``open``: ``ls -l``, ``file`` and ``test -x``
cost nothing). Small files (≤ 1 MiB) are read whole and checked against
their BLAKE3 digest before a byte is handed out; larger ones through the
blob service's seekable reader, which verifies each chunk before returning
it, fetches only the chunks a read touches and reads ahead while reads are
sequential (a forward seek does not reopen the blob).

Every failure of a backend (missing content, a digest mismatch, an
unreachable service, a call that takes longer than ``timeout``) is EIO on
that one operation, with a log line saying why; the mount stays up.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import itertools
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias, TypeVar

import blake3
import pyfuse3

from tvix_castore.blobservice.base import BlobReader, BlobService
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import CastoreError
from tvix_castore.fs.inodes import ROOT_INODE, Inode, InodeTable, Key, key_of
from tvix_castore.nodes import Directory, DirectoryNode, FileNode, Node, SymlinkNode

__all__ = ["BLOB_XATTR", "DIRECTORY_XATTR", "CastoreFs", "MountOptions", "Roots"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

BLOB_XATTR = b"user.tvix.castore.blob.digest"
DIRECTORY_XATTR = b"user.tvix.castore.directory.digest"
_FOREVER = 365 * 86400.0  # (content never changes: the kernel may cache it as long as it likes)
_SMALL = 1 << 20  # files up to this size are read whole and verified before serving
_DIRECTORIES_CACHED = 4096
_ROWS_CACHED = 65536  # readdir rows kept (about 300 bytes each)
_READ_AHEAD_DIRS = 512  # subdirectories of a listed directory fetched ahead, at most
_MTIME_NS = 1_000_000_000  # 1 s after the epoch, as in a Nix store


class Roots(Protocol):
    """The top level of the mount: names and their root nodes (a store's paths)."""

    async def get(self, name: bytes) -> Node | None:
        """The root node called ``name``, or ``None``."""

    def list(self) -> AsyncIterator[tuple[bytes, Node]]:
        """Every root, as it is found (streamed)."""


@dataclass(frozen=True)
class MountOptions:
    """What the mount shows: the root listing, xattrs; how long a backend call may take."""

    list_root: bool = False
    show_xattr: bool = True
    timeout: float = 120.0
    root_timeout: float = 60.0  # how long the kernel may cache a top-level name


_Row: TypeAlias = tuple[bytes, Key, Node, int, pyfuse3.EntryAttributes]
"""A readdir entry ready to send: name, inode key, node, inode number, attributes."""


@dataclass
class _File:
    entry: Inode
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    data: bytes | None = None  # a small file, verified
    reader: BlobReader | None = None


@dataclass
class _Dir:
    entry: Inode | None  # None: the root
    rows: tuple[_Row, ...] = ()
    roots: AsyncIterator[tuple[bytes, Node]] | None = None  # the root listing, streamed
    at: int = 0  # index of the next root entry
    pending: tuple[bytes, Node] | None = None  # a root entry the kernel had no room for


class CastoreFs(pyfuse3.Operations):
    """A read-only filesystem of castore nodes (see the module)."""

    def __init__(
        self,
        roots: Roots,
        blobs: BlobService,
        directories: DirectoryService,
        options: MountOptions | None = None,
    ) -> None:
        super().__init__()
        self._roots = roots
        self._blobs = blobs
        self._dirs = directories
        self.options = options or MountOptions()
        self.inodes = InodeTable()
        self._cache: collections.OrderedDict[B3Digest, Directory] = collections.OrderedDict()
        # Listings ready to send, by the listed directory's inode key (its
        # subdirectories' keys name it), bounded by their number of rows.
        self._rows: collections.OrderedDict[Key, tuple[_Row, ...]] = collections.OrderedDict()
        self._rows_cached = 0
        self._handles: dict[int, _File | _Dir] = {}
        self._next_fh = itertools.count(1)
        self._inflight: set[asyncio.Task[object]] = set()
        # Subdirectories being read ahead (their Directories, once fetched).
        self._ahead: dict[B3Digest, asyncio.Future[Directory | None]] = {}
        self._ahead_tasks: set[asyncio.Future[None]] = set()
        self._stopping = False

    # -- helpers ---------------------------------------------------------------
    async def _backend(self, what: str, call: Awaitable[_T]) -> _T:
        """``await call`` with the timeout; any failure is EIO, logged with ``what``.

        :meth:`interrupt` ends every call waiting here with EIO too, so that
        an unmount never waits for a backend that does not answer.
        """
        task = asyncio.current_task()
        if self._stopping or task is None:
            raise pyfuse3.FUSEError(errno.EIO)
        self._inflight.add(task)
        try:
            async with asyncio.timeout(self.options.timeout):
                return await call
        except (CastoreError, OSError, ValueError) as exc:
            _log.warning("mount: %s: %s", what, exc)
        except TimeoutError:
            _log.warning("mount: %s: no answer after %.0f s", what, self.options.timeout)
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            task.uncancel()
            _log.warning("mount: %s: interrupted by the unmount", what)
        finally:
            self._inflight.discard(task)
        raise pyfuse3.FUSEError(errno.EIO)

    def interrupt(self) -> None:
        """Fail every backend call in flight (and any later one) with EIO: the mount is ending."""
        self._stopping = True
        for task in list(self._inflight):
            task.cancel()

    async def _children(self, node: DirectoryNode) -> Directory:
        """``node``'s Directory (fetched once, cached; or waited for, if being read ahead)."""
        cached = self._cache.get(node.digest)
        if cached is not None:
            self._cache.move_to_end(node.digest)
            return cached
        ahead = self._ahead.get(node.digest)
        if ahead is not None and (found := await asyncio.shield(ahead)) is not None:
            return found
        what = f"directory {node.digest}"
        directory: Directory | None = await self._backend(what, self._dirs.get(node.digest))
        if directory is None:
            _log.warning("mount: %s is missing", what)
            raise pyfuse3.FUSEError(errno.EIO)
        self._keep(node.digest, directory)
        return directory

    def _keep(self, digest: B3Digest, directory: Directory) -> None:
        self._cache[digest] = directory
        while len(self._cache) > _DIRECTORIES_CACHED:
            self._cache.popitem(last=False)

    async def _listing_rows(self, entry: Inode, node: DirectoryNode) -> tuple[_Row, ...]:
        """The readdir rows of the directory ``entry`` (built once, cached).

        Listing is what a tree walk does most: the rows keep each entry's
        inode number and attributes so that listing it again only sends them.
        """
        rows = self._rows.get(entry.key)
        if rows is not None:
            self._rows.move_to_end(entry.key)
            return rows
        return self._build_rows(entry.key, entry.ino, await self._children(node))

    def _build_rows(self, key: Key, parent: int, directory: Directory) -> tuple[_Row, ...]:
        """Build and cache the rows of ``directory``, whose inode is ``parent`` (with ``key``)."""
        number, attr = self.inodes.number, self._attr
        built: list[_Row] = []
        for child in directory.nodes():  # (name order: readdir offsets index the rows)
            child_key = key_of(child, parent, child.name)
            ino = number(child_key)
            built.append((child.name, child_key, child, ino, attr(child, ino)))
        rows = tuple(built)
        self._rows[key] = rows
        self._rows_cached += len(rows)
        while self._rows_cached > _ROWS_CACHED and len(self._rows) > 1:
            self._rows_cached -= len(self._rows.popitem(last=False)[1])
        return rows

    def _read_ahead(self, rows: tuple[_Row, ...]) -> None:
        """A directory is being listed: fetch its subdirectories (one batch) and their rows.

        A tree walk opens them next; what is fetched here is what the walk
        would wait for, one Directory at a time, while the kernel is busy
        with the listing. Only the listed directory's own subdirectories
        (not deeper), at most ``_READ_AHEAD_DIRS`` of them.
        """
        todo: list[tuple[Key, int, DirectoryNode]] = []
        for _name, key, node, ino, _attr in rows:
            if (
                isinstance(node, DirectoryNode)
                and key not in self._rows
                and node.digest not in self._cache
                and node.digest not in self._ahead
            ):
                todo.append((key, ino, node))
                if len(todo) == _READ_AHEAD_DIRS:
                    break
        if not todo or self._stopping:
            return
        loop = asyncio.get_running_loop()
        waiting = {node.digest: loop.create_future() for _k, _i, node in todo}
        self._ahead.update(waiting)
        task = asyncio.ensure_future(self._fetch_ahead(todo, waiting))
        self._ahead_tasks.add(task)
        task.add_done_callback(self._ahead_tasks.discard)

    async def _fetch_ahead(
        self,
        todo: list[tuple[Key, int, DirectoryNode]],
        waiting: dict[B3Digest, asyncio.Future[Directory | None]],
    ) -> None:
        """Fetch ``todo`` in growing batches (the first ones opened wait least), then their rows."""
        try:
            at, n = 0, 4
            while at < len(todo):
                batch = todo[at : at + n]
                at, n = at + n, n * 4
                digests = [node.digest for _k, _i, node in batch]
                what = f"reading ahead {len(digests)} directories"
                try:
                    found = await self._backend(what, self._dirs.get_many(digests))
                except pyfuse3.FUSEError:
                    return  # (logged; each is fetched, and its failure reported, when opened)
                for _key, _ino, node in batch:
                    directory = found.get(node.digest)
                    if directory is not None:
                        self._keep(node.digest, directory)
                    self._settle(waiting, node.digest, directory)
                for key, ino, node in batch:  # (one at a time: requests are served in between)
                    directory = found.get(node.digest)
                    if directory is not None and key not in self._rows:
                        if self.inodes.number(key) == ino:
                            self._build_rows(key, ino, directory)
                        await asyncio.sleep(0)
        finally:
            for digest in list(waiting):  # (None: the opener fetches it itself)
                self._settle(waiting, digest, None)

    def _settle(
        self,
        waiting: dict[B3Digest, asyncio.Future[Directory | None]],
        digest: B3Digest,
        directory: Directory | None,
    ) -> None:
        fut = waiting.pop(digest, None)
        if fut is not None:
            if self._ahead.get(digest) is fut:
                del self._ahead[digest]
            if not fut.done():
                fut.set_result(directory)

    def _attr(
        self, node: Node | None, ino: int, timeout: float = _FOREVER
    ) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.entry_timeout = a.attr_timeout = timeout
        a.st_blksize = 1 << 20
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = _MTIME_NS
        if node is None:
            a.st_ino = pyfuse3.InodeT(ino)
            a.st_mode = pyfuse3.ModeT(_DIR_MODE)
        else:
            _fill(a, node, ino)
        return a

    def _entry(self, ino: int) -> Inode:
        entry = self.inodes.get(ino)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    def _timeout(self, parent: int) -> float:
        return self.options.root_timeout if parent == ROOT_INODE else _FOREVER

    # -- lookups and attributes --------------------------------------------------
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name == b".":
            return await self.getattr(parent_inode, ctx)
        if parent_inode == ROOT_INODE:
            node = await self._backend(f"root {name!r}", self._roots.get(name))
        else:
            parent = self._entry(parent_inode).node
            if not isinstance(parent, DirectoryNode):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            node = (await self._children(parent)).lookup(name)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        entry = self.inodes.looked_up(node, parent_inode, name)
        return self._attr(node, entry.ino, self._timeout(parent_inode))

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, n in inode_list:
            self.inodes.forget(ino, n)

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return self._attr(None, ROOT_INODE)
        return self._attr(self._entry(inode).node, inode)

    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        node = None if inode == ROOT_INODE else self._entry(inode).node
        if not isinstance(node, SymlinkNode):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    # -- directories ---------------------------------------------------------------
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        if inode == ROOT_INODE:
            if not self.options.list_root:
                raise pyfuse3.FUSEError(errno.EPERM)
            handle = _Dir(None)
        else:
            entry = self._entry(inode)
            if not isinstance(entry.node, DirectoryNode):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            handle = _Dir(entry, await self._listing_rows(entry, entry.node))
            self.inodes.opened(entry)
            self._read_ahead(handle.rows)
        fh = next(self._next_fh)
        self._handles[fh] = handle
        return pyfuse3.FileHandleT(fh)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        handle = self._handles.get(fh)
        if not isinstance(handle, _Dir):
            raise pyfuse3.FUSEError(errno.EBADF)
        if handle.entry is None:
            await self._readdir_root(handle, start_id, token)
            return
        rows, live, counted = handle.rows, self.inodes.get, self.inodes.counted
        reply = pyfuse3.readdir_reply
        for i in range(start_id, len(rows)):
            name, key, node, ino, attr = rows[i]
            taken = live(ino)
            if taken is not None and taken.key != key:  # (a 63-bit collision since: renumber)
                ino = self.inodes.number(key)
                attr = self._attr(node, ino)
            if not reply(token, name, attr, i + 1):
                return  # (the kernel's buffer is full: it asks again from i)
            counted(ino, key, node)

    async def _readdir_root(self, handle: _Dir, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Stream the roots; an entry that does not fit waits for the next call (none is lost)."""
        if handle.roots is None or start_id != handle.at:  # (opened, or rewound)
            if handle.roots is not None:
                await _aclose(handle.roots)
            handle.roots, handle.at, handle.pending = self._roots.list(), 0, None
            for _ in range(start_id):
                if await self._next_root(handle) is None:
                    return
                handle.at += 1
        while True:
            item = handle.pending or await self._next_root(handle)
            handle.pending = None
            if item is None:
                return
            name, node = item
            key = key_of(node, ROOT_INODE, name)
            ino = self.inodes.number(key)
            attr = self._attr(node, ino, self.options.root_timeout)
            if not pyfuse3.readdir_reply(token, name, attr, handle.at + 1):
                handle.pending = item
                return
            handle.at += 1
            self.inodes.counted(ino, key, node)

    async def _next_root(self, handle: _Dir) -> tuple[bytes, Node] | None:
        assert handle.roots is not None
        return await self._backend("listing the roots", anext(handle.roots, None))

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, _Dir):
            if handle.roots is not None:
                await _aclose(handle.roots)
            if handle.entry is not None:
                self.inodes.released(handle.entry)

    # -- files ---------------------------------------------------------------------
    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        if inode == ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        entry = self._entry(inode)
        if isinstance(entry.node, DirectoryNode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if not isinstance(entry.node, FileNode):
            raise pyfuse3.FUSEError(errno.ELOOP)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        fh = next(self._next_fh)
        self._handles[fh] = _File(entry)
        self.inodes.opened(entry)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True)

    async def read(  # type: ignore[override]  # (pyfuse3 replies with any contiguous buffer)
        self, fh: pyfuse3.FileHandleT, off: int, size: int
    ) -> bytes | memoryview:
        handle = self._handles.get(fh)
        if not isinstance(handle, _File):
            raise pyfuse3.FUSEError(errno.EBADF)
        node = handle.entry.node
        assert isinstance(node, FileNode)
        if off >= node.size or size <= 0:
            return b""
        async with handle.lock:
            if node.size <= _SMALL:
                if handle.data is None:
                    handle.data = await self._backend(f"blob {node.digest}", self._small(node))
                return handle.data[off : off + size]
            what = f"blob {node.digest} at {off}"
            return await self._backend(what, self._large(handle, node, off, size))

    async def _small(self, node: FileNode) -> bytes:
        reader = await self._blobs.open_read(node.digest)
        if reader is None:
            raise CastoreError("is missing")
        try:
            data = await reader.read()
        finally:
            await reader.aclose()
        if len(data) != node.size:
            raise CastoreError(f"has {len(data)} bytes, the file {node.size}")
        if blake3.blake3(data).digest() != node.digest.raw:
            raise CastoreError("its bytes do not match its digest")
        return data

    async def _large(
        self, handle: _File, node: FileNode, off: int, size: int
    ) -> bytes | memoryview:
        if handle.reader is None:
            handle.reader = await self._blobs.open_read(node.digest)
            if handle.reader is None:
                raise CastoreError("is missing")
        if handle.reader.tell() != off:
            await handle.reader.seek(off)
        data = await handle.reader.read_view(min(size, node.size - off))
        if len(data) != min(size, node.size - off):
            raise CastoreError(f"ends at {off + len(data)}, the file at {node.size}")
        return data

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, _File):
            if handle.reader is not None:
                await handle.reader.aclose()
            self.inodes.released(handle.entry)

    # -- xattrs --------------------------------------------------------------------
    def _xattr(self, inode: int) -> tuple[bytes, bytes] | None:
        if not self.options.show_xattr:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if inode == ROOT_INODE:
            return None
        node = self._entry(inode).node
        if isinstance(node, FileNode):
            return BLOB_XATTR, str(node.digest).encode()
        if isinstance(node, DirectoryNode):
            return DIRECTORY_XATTR, str(node.digest).encode()
        return None

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        found = self._xattr(inode)
        if found is None or found[0] != name:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return found[1]

    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        found = self._xattr(inode)
        return [] if found is None else [pyfuse3.XAttrNameT(found[0])]


_DIR_MODE = stat.S_IFDIR | 0o555
_FILE_MODE = stat.S_IFREG | 0o444
_EXEC_MODE = stat.S_IFREG | 0o555
_LINK_MODE = stat.S_IFLNK | 0o444


def _fill(a: pyfuse3.EntryAttributes, node: Node, ino: int) -> None:
    """Set what differs between entries: inode, mode, size and blocks (B §8.3)."""
    a.st_ino = pyfuse3.InodeT(ino)
    if isinstance(node, FileNode):
        a.st_mode = pyfuse3.ModeT(_EXEC_MODE if node.executable else _FILE_MODE)
        size = node.size
    elif isinstance(node, DirectoryNode):
        a.st_mode = pyfuse3.ModeT(_DIR_MODE)
        size = node.size
    else:
        a.st_mode = pyfuse3.ModeT(_LINK_MODE)
        size = len(node.target)
    a.st_size = size
    a.st_blocks = (size + 511) // 512


async def _aclose(it: AsyncIterator[object]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception as exc:  # (closing a listing that failed: nothing more to say)
            _log.debug("closing a root listing: %s", exc)
