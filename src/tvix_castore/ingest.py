"""Filesystem → castore: ``ingest_path`` (B §4.5).

The tree is walked without following symlinks (not even at the root). Files
are uploaded concurrently on a bounded number of workers; directories are
built leaves first once their children are known and sent through **one**
putter, committed only when everything succeeded, so a failure leaves no
directory referring to missing content.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field

from tvix_castore.blobservice.base import BlobService
from tvix_castore.digests import B3Digest
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import IngestionError
from tvix_castore.forked import run_forked, usable_cpus, want_fork
from tvix_castore.nodes import (
    Directory,
    DirectoryNode,
    FileNode,
    Node,
    SymlinkNode,
    check_directory_size,
)
from tvix_castore.progress import Progress

__all__ = [
    "DEFAULT_CONCURRENCY",
    "ScannedFile",
    "ScannedTree",
    "ingest_path",
    "ingest_tree",
    "put_directories",
    "scan_tree",
    "upload_files",
]

DEFAULT_CONCURRENCY = usable_cpus()  # more workers only contend for the cores
_SMALL_FILE = 1 << 20
_BATCH_FILES = 1024
_BATCH_BYTES = 8 << 20
_FORK_MIN = 32 << 20  # trees this large are ingested by forked workers, where supported
# A change within the filesystem's timestamp granularity may leave the stat
# unchanged: entries modified this close to the scan are "racy" (as in git).
_RACY_NS = 1_000_000_000


@dataclass(slots=True)
class _Dir:
    path: bytes
    name: bytes
    children: list[_Dir | ScannedFile | SymlinkNode] = field(default_factory=list)


@dataclass(slots=True)
class ScannedFile:
    """A regular file as scanned; its ``digest`` once uploaded."""

    path: bytes
    name: bytes
    size: int
    executable: bool
    digest: B3Digest | None = None

    def node(self) -> FileNode:
        assert self.digest is not None, "node() before upload_files()"
        return FileNode(self.name, self.digest, self.size, self.executable)


def _show(path: bytes) -> str:
    return os.fsdecode(path)


_Entry = _Dir | ScannedFile | SymlinkNode


def _fingerprint(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_mode, st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(slots=True)
class ScannedTree:
    """A tree as :func:`scan_tree` saw it: what to ingest, and each entry's stat.

    The stats let a caller that reads the tree twice (ingesting it, and
    hashing its NAR) check that nothing changed in between: see :meth:`changed`.
    """

    root: _Entry
    files: list[ScannedFile]
    dirs: list[_Dir]  # post-order
    stats: list[tuple[bytes, tuple[int, ...]]]
    started_ns: int

    @property
    def racy(self) -> bool:
        """Whether an entry changed so close to the scan that its stat cannot be trusted."""
        limit = self.started_ns - _RACY_NS
        return any(fp[5] >= limit for _, fp in self.stats)

    @property
    def is_directory(self) -> bool:
        return isinstance(self.root, _Dir)

    def walk(self) -> Iterator[tuple[bytes, ScannedFile | SymlinkNode | None]]:
        """The uploaded tree in pre-order, children by name: what a NAR lists, in its order.

        Yields ``(name, node)`` for files and symlinks, ``(name, None)`` on
        entering a directory and ``(b"", None)`` on leaving it (the root's
        name is ``b""``). Only after :func:`upload_files`.
        """
        root = self.root
        if not isinstance(root, _Dir):
            yield root.name, root
            return
        yield root.name, None
        stack = [iter(root.children)]
        while stack:
            for e in stack[-1]:  # (one flat generator: this runs per entry)
                if isinstance(e, _Dir):
                    yield e.name, None
                    stack.append(iter(e.children))
                    break
                yield e.name, e
            else:
                stack.pop()
                yield b"", None

    def changed(self) -> str | None:
        """The first entry whose stat differs from the scan's (blocking), or ``None``."""
        for path, fp in self.stats:
            try:
                now = _fingerprint(os.lstat(path))
            except OSError:
                return _show(path)
            if now != fp:
                return _show(path)
        return None


def scan_tree(path: str | bytes | os.PathLike[str], *, fingerprints: bool = True) -> ScannedTree:
    """Scan the tree at ``path`` (blocking), without following symlinks.

    Without ``fingerprints``, no entry's stat is kept (nor can
    :meth:`ScannedTree.changed` tell anything): for callers that never read
    the tree twice.

    Raises:
        IngestionError: a special file, or an entry that cannot be listed or read.
    """
    root = os.fsencode(path)
    started = time.time_ns()
    files: list[ScannedFile] = []
    dirs: list[_Dir] = []
    stats: list[tuple[bytes, tuple[int, ...]]] = []

    def entry(path: bytes, name: bytes, st: os.stat_result) -> _Entry:
        mode = st.st_mode
        if fingerprints:
            stats.append((path, _fingerprint(st)))
        if stat.S_ISREG(mode):
            f = ScannedFile(path, name, st.st_size, bool(mode & stat.S_IXUSR))
            files.append(f)
            return f
        if stat.S_ISLNK(mode):
            try:
                return SymlinkNode(name, os.readlink(path))
            except OSError as exc:
                raise IngestionError(_show(path), f"cannot read symlink: {exc.strerror}") from exc
        if stat.S_ISDIR(mode):
            d = _Dir(path, name)
            try:
                with os.scandir(path) as it:
                    listing = sorted((e.name, e.path) for e in it)
            except OSError as exc:
                raise IngestionError(_show(path), f"cannot list directory: {exc.strerror}") from exc
            for child_name, child_path in listing:
                try:
                    child_st = os.lstat(child_path)
                except OSError as exc:
                    raise IngestionError(_show(child_path), f"cannot stat: {exc.strerror}") from exc
                d.children.append(entry(child_path, child_name, child_st))
            dirs.append(d)  # after its children: post-order
            return d
        raise IngestionError(_show(path), f"unsupported file type ({stat.filemode(mode)[0]!r})")

    try:
        st = os.lstat(root)
    except OSError as exc:
        raise IngestionError(_show(root), f"cannot stat: {exc.strerror}") from exc
    return ScannedTree(entry(root, b"", st), files, dirs, stats, started)


async def _in_threads(
    batches: list[list[ScannedFile]],
    upload: Callable[[list[ScannedFile]], Awaitable[None]],
    concurrency: int,
) -> None:
    """Upload batches on ``concurrency`` thread-backed workers, in order of the list."""
    index = 0

    async def worker() -> None:
        nonlocal index
        while index < len(batches):
            batch = batches[index]
            index += 1
            await upload(batch)

    n_workers = max(1, min(concurrency, len(batches)))
    workers = [asyncio.ensure_future(worker()) for _ in range(n_workers)]
    try:
        await asyncio.gather(*workers)
    except BaseException:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise


async def ingest_path(
    path: str | bytes | os.PathLike[str],
    blobs: BlobService,
    directories: DirectoryService,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    fork: bool | None = None,
) -> Node:
    """Ingest the tree at ``path``; return its root node (with an empty name).

    ``concurrency`` workers hash and upload files: forked processes if the
    blob service supports it and :func:`~tvix_castore.forked.want_fork`
    says so (by default: trees of ``_FORK_MIN`` bytes or more, with more than
    one CPU usable; ``fork=True`` forks whatever the size and CPUs, pass
    ``fork=False`` in a process that must not fork, e.g. one with gRPC
    threads), else threads.

    Raises:
        IngestionError: a special file, an unreadable file or directory, or a
            file that changed size while being read (nothing is committed).
    """
    tree = await asyncio.to_thread(scan_tree, path)
    return await ingest_tree(tree, blobs, directories, concurrency=concurrency, fork=fork)


async def ingest_tree(
    tree: ScannedTree,
    blobs: BlobService,
    directories: DirectoryService,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    fork: bool | None = None,
    collect: MutableMapping[B3Digest, Directory] | None = None,
    progress: Progress | None = None,
) -> Node:
    """Ingest a scanned tree (see :func:`ingest_path`); ``collect`` receives its Directories.

    ``progress`` is as :func:`upload_files`'s.
    """
    await upload_files(tree, blobs, concurrency=concurrency, fork=fork, progress=progress)
    return await put_directories(tree, directories, collect=collect)


async def upload_files(
    tree: ScannedTree,
    blobs: BlobService,
    *,
    concurrency: int = DEFAULT_CONCURRENCY,
    fork: bool | None = None,
    progress: Progress | None = None,
) -> None:
    """The first half of :func:`ingest_tree`: every file's blob, its node kept in ``tree``.

    ``progress`` is told the tree's files and bytes, then after each batch
    (up to ``_BATCH_FILES`` small files, or one large one) what it held.
    """
    files = tree.files

    def fail(f: ScannedFile, exc: Exception) -> IngestionError:
        if isinstance(exc, OSError):
            return IngestionError(_show(f.path), f"cannot read: {exc.strerror or exc}")
        return IngestionError(_show(f.path), str(exc))

    def record(batch: list[ScannedFile], results: Sequence[B3Digest | Exception]) -> None:
        for f, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                raise fail(f, result) from result
            f.digest = result

    async def upload(batch: list[ScannedFile]) -> None:
        record(batch, await blobs.ingest_files([(f.path, f.size) for f in batch]))
        if progress is not None:
            progress.advance(len(batch), sum(f.size for f in batch))

    # Large files first, largest first (keeps both cores busy to the end), one
    # batch each; then small files in batches (one thread hand-off each), in
    # the tree's (NAR) order: neighbours compress together in a packed store.
    batches: list[list[ScannedFile]] = [
        [f] for f in sorted(files, key=lambda f: f.size, reverse=True) if f.size >= _SMALL_FILE
    ]
    current: list[ScannedFile] = []
    current_bytes = 0
    for f in files:
        if f.size >= _SMALL_FILE:
            continue
        current.append(f)
        current_bytes += f.size
        if len(current) >= _BATCH_FILES or current_bytes >= _BATCH_BYTES:
            batches.append(current)
            current, current_bytes = [], 0
    if current:
        batches.append(current)
    size = sum(f.size for f in files)
    if progress is not None:
        progress.total(items=len(files), bytes=size)
    large = concurrency > 1 and len(batches) > 1 and size >= _FORK_MIN
    forker = blobs.forked_ingest() if batches and want_fork(fork, large=large) else None
    if forker is not None:
        jobs = [[(f.path, f.size) for f in batch] for batch in batches]
        cancel = threading.Event()
        try:
            told = None if progress is None else _per_batch(progress, batches)
            done = await asyncio.to_thread(run_forked, forker, jobs, concurrency, cancel, told)
        except asyncio.CancelledError:
            cancel.set()  # the thread stops its workers and returns soon
            raise
        for batch, results in zip(batches, done, strict=True):
            record(batch, results)
    else:
        await _in_threads(batches, upload, concurrency)


def _per_batch(progress: Progress, batches: list[list[ScannedFile]]) -> Callable[[int], None]:
    """Tell ``progress`` of a batch's files and bytes, given its number."""
    return lambda n: progress.advance(len(batches[n]), sum(f.size for f in batches[n]))


async def put_directories(
    tree: ScannedTree,
    directories: DirectoryService,
    *,
    collect: MutableMapping[B3Digest, Directory] | None = None,
) -> Node:
    """The second half of :func:`ingest_tree`: the Directories, through one putter; the root."""
    root, dirs = tree.root, tree.dirs
    if isinstance(root, SymlinkNode):
        return root
    if isinstance(root, ScannedFile):
        return root.node()

    built: dict[int, DirectoryNode] = {}
    async with directories.put_multiple_start() as putter:
        root_node: DirectoryNode | None = None
        for d in dirs:
            nodes: list[Node] = []
            for child in d.children:
                if isinstance(child, ScannedFile):
                    nodes.append(child.node())
                elif isinstance(child, _Dir):
                    nodes.append(built.pop(id(child)))
                else:
                    nodes.append(child)
            directory = Directory.from_nodes(nodes)
            check_directory_size(directory, d.name or b"<root>")
            await putter.put(directory)
            if collect is not None:
                collect[directory.digest] = directory
            root_node = directory.to_node(d.name, directories.size_mode)
            built[id(d)] = root_node
        await putter.close()
    assert root_node is not None
    return root_node
