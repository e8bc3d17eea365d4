"""Streaming NAR writer, and a dumper that matches ``nix-store --dump``.

The writer keeps no file contents: callers push them in pieces (or hand over a
file descriptor) and the writer checks the declared size, entry order and
names as it goes.

>>> import io
>>> out = io.BytesIO()
>>> w = NarWriter(out)
>>> w.symlink(b"/nix/store/somewhereelse")
>>> w.close()
>>> len(out.getvalue())
136
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from typing import Protocol

from nix_compat.errors import NarWriteError
from nix_compat.nar import wire

__all__ = ["NarWriter", "Sink", "dump_path", "nar_hash_path"]

_FLUSH_AT = 1 << 20
_READ_CHUNK = 1 << 20


class Sink(Protocol):
    """Anything with a binary ``write``."""

    def write(self, data: bytes | bytearray, /) -> object: ...


class _HashSink:
    """Counts and sha256-hashes what is written (for ``nar_hash_path``)."""

    def __init__(self) -> None:
        self.hasher = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray, /) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return len(data)


class NarWriter:
    """Emit one NAR, node by node, in canonical order.

    Nodes are written depth first: a directory is opened with
    :meth:`directory`, each child is introduced with :meth:`entry` (names
    strictly ascending as bytes) and followed by exactly one node, and the
    directory is closed with :meth:`end_directory`. A regular file is started
    with :meth:`regular`, fed with :meth:`write` (exactly ``size`` bytes), and
    finished with :meth:`end_regular`. :meth:`close` flushes and checks that
    the root node is complete.
    """

    def __init__(self, sink: Sink, *, flush_at: int = _FLUSH_AT) -> None:
        self._sink = sink
        self._buf = bytearray(wire.MAGIC)
        self._flush_at = flush_at
        # One entry per open directory: the last entry name written in it.
        self._dirs: list[bytes | None] = []
        self._expect_node = True  # a node may be written now
        self._file_left: int | None = None  # bytes still owed to an open file
        self._done = False

    # -- plumbing ---------------------------------------------------------
    def _emit(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= self._flush_at:
            self.flush()

    def flush(self) -> None:
        """Hand buffered bytes to the sink."""
        if self._buf:
            self._sink.write(bytes(self._buf))
            self._buf.clear()

    def _start_node(self) -> None:
        if not self._expect_node or self._file_left is not None:
            raise NarWriteError("a node cannot be written here")
        self._expect_node = False
        if self._dirs:
            self._emit(wire.NODE_OPEN_TYPE)
        else:
            self._emit(wire.OPEN_TYPE)

    def _end_node(self) -> None:
        self._emit(wire.CLOSE)
        if self._dirs:
            self._emit(wire.CLOSE)  # closes the "entry ("
        else:
            self._done = True

    # -- nodes ------------------------------------------------------------
    def symlink(self, target: bytes) -> None:
        """Write a symlink node."""
        why = wire.check_target(target)
        if why:
            raise NarWriteError(why)
        self._start_node()
        self._emit(wire.SYMLINK + wire.token(target))
        self._end_node()

    def regular(self, size: int, executable: bool = False) -> None:
        """Start a regular file of ``size`` bytes; feed it with :meth:`write`."""
        self._start_node()
        self._emit((wire.EXECUTABLE if executable else wire.REGULAR) + wire.U64.pack(size))
        self._file_left = size
        self._file_size = size

    def write(self, data: bytes | memoryview) -> None:
        """Append contents to the open regular file."""
        if self._file_left is None:
            raise NarWriteError("no regular file is open")
        if len(data) > self._file_left:
            raise NarWriteError("file contents exceed the declared size")
        self._file_left -= len(data)
        if len(data) >= self._flush_at:
            self.flush()
            self._sink.write(bytes(data))
        else:
            self._emit(bytes(data))

    def write_fd(self, fd: int, size: int) -> None:
        """Append ``size`` bytes read from ``fd`` to the open regular file."""
        left = size
        while left:
            chunk = os.read(fd, min(left, _READ_CHUNK))
            if not chunk:
                raise NarWriteError(f"file shrank while reading: {left} bytes missing")
            self.write(chunk)
            left -= len(chunk)

    def end_regular(self) -> None:
        """Finish the open regular file."""
        if self._file_left is None:
            raise NarWriteError("no regular file is open")
        if self._file_left:
            raise NarWriteError(f"file contents {self._file_left} bytes short of declared size")
        self._file_left = None
        self._emit(b"\0" * wire.padding(self._file_size))
        self._end_node()

    def file(self, contents: bytes, executable: bool = False) -> None:
        """Write a whole regular file held in memory (small files)."""
        self.regular(len(contents), executable)
        self.write(contents)
        self.end_regular()

    def directory(self) -> None:
        """Open a directory node."""
        self._start_node()
        self._emit(wire.DIRECTORY)
        self._dirs.append(None)
        self._expect_node = False

    def entry(self, name: bytes) -> None:
        """Introduce the next entry of the open directory; a node must follow."""
        if not self._dirs or self._expect_node or self._file_left is not None:
            raise NarWriteError("an entry cannot be written here")
        why = wire.check_name(name)
        if why:
            raise NarWriteError(why)
        last = self._dirs[-1]
        if last is not None and name <= last:
            raise NarWriteError(f"entry {name!r} is not after {last!r}")
        self._dirs[-1] = name
        self._emit(wire.ENTRY_NAME + wire.token(name))
        self._expect_node = True

    def end_directory(self) -> None:
        """Close the innermost open directory."""
        if not self._dirs or self._expect_node or self._file_left is not None:
            raise NarWriteError("no directory can be closed here")
        self._dirs.pop()
        self._end_node()

    def close(self) -> None:
        """Flush, and check that exactly one complete root node was written."""
        if not self._done:
            raise NarWriteError("the NAR is incomplete")
        self.flush()


_SMALL = 1 << 20
_ENTRY_NODE = (wire.ENTRY_NAME, wire.NODE_OPEN_TYPE)
_CLOSE_ENTRY = wire.CLOSE + wire.CLOSE
_ZEROS = b"\0" * 8
_DIR, _FILE, _LINK = 0, 1, 2


def _kind(entry: os.DirEntry[bytes]) -> int:
    """Entry type from ``d_type`` (no extra syscall on most filesystems)."""
    if entry.is_symlink():
        return _LINK
    if entry.is_dir(follow_symlinks=False):
        return _DIR
    if entry.is_file(follow_symlinks=False):
        return _FILE
    mode = entry.stat(follow_symlinks=False).st_mode
    raise NarWriteError(f"{os.fsdecode(entry.path)}: unsupported file type {stat.filemode(mode)}")


def _kind_of_mode(path: bytes, mode: int) -> int:
    if stat.S_ISLNK(mode):
        return _LINK
    if stat.S_ISDIR(mode):
        return _DIR
    if stat.S_ISREG(mode):
        return _FILE
    raise NarWriteError(f"{os.fsdecode(path)}: unsupported file type {stat.filemode(mode)}")


def _copy_fd(fd: int, size: int, sink: Sink, path: bytes) -> None:
    """Stream ``size`` bytes of ``fd`` to ``sink`` (sendfile when the sink is a real fd)."""
    left = size
    out_fd = -1
    fileno = getattr(sink, "fileno", None)
    if fileno is not None and hasattr(sink, "flush"):
        try:
            out_fd = fileno()
            sink.flush()
        except (OSError, ValueError, io.UnsupportedOperation):
            out_fd = -1
    while left and out_fd >= 0:
        try:
            sent = os.sendfile(out_fd, fd, None, min(left, 1 << 30))
        except OSError:
            out_fd = -1  # not supported for this pair: fall back to read/write
            break
        if sent == 0:
            break
        left -= sent
    while left:
        chunk = os.read(fd, min(left, _READ_CHUNK))
        if not chunk:
            break
        sink.write(chunk)
        left -= len(chunk)
    if left:
        raise NarWriteError(f"{os.fsdecode(path)}: file shrank while reading")
    if os.read(fd, 1):
        raise NarWriteError(f"{os.fsdecode(path)}: file grew while reading")


def _list_dir(path: bytes) -> list[tuple[bytes, int]]:
    with os.scandir(path) as it:
        entries = [(e.name, _kind(e)) for e in it]
    entries.sort()
    return entries


def dump_path(path: str | bytes | os.PathLike[str], sink: Sink) -> None:
    """Write the NAR of ``path`` to ``sink``, byte-identical to ``nix-store --dump``.

    Symlinks are never followed; the executable bit is the owner's x bit.
    The walk is iterative (any depth), buffers small pieces into ~1 MiB
    writes and streams large files straight through (``sendfile`` when the
    sink is a file descriptor). This is the hot loop of ``tvix-store dump``
    and imports, so it is written flat, with local names.
    """
    root = os.fsencode(path)
    pack = wire.U64.pack
    zeros = _ZEROS
    regular, executable, symlink = wire.REGULAR, wire.EXECUTABLE, wire.SYMLINK
    directory, close, close_entry = wire.DIRECTORY, wire.CLOSE, _CLOSE_ENTRY
    entry_head, node_head = _ENTRY_NODE
    open_flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    os_open, os_fstat, os_read, os_close = os.open, os.fstat, os.read, os.close
    buf = bytearray(wire.MAGIC + wire.OPEN_TYPE)
    # Open directories: (path, sorted (name, kind) entries, next index).
    stack: list[tuple[bytes, list[tuple[bytes, int]], list[int]]] = []

    p = root
    kind = _kind_of_mode(root, os.lstat(root).st_mode)
    while True:
        # Emit the node at p (of type kind); directories are pushed.
        if kind == _FILE:
            fd = os_open(p, open_flags)
            try:
                st = os_fstat(fd)
                size = st.st_size
                buf += executable if st.st_mode & 0o100 else regular
                buf += pack(size)
                if size <= _SMALL:
                    data = os_read(fd, size + 1)
                    if len(data) != size:
                        raise NarWriteError(f"{os.fsdecode(p)}: file changed while reading")
                    buf += data
                else:
                    sink.write(buf)
                    buf = bytearray()
                    _copy_fd(fd, size, sink, p)
            finally:
                os_close(fd)
            buf += zeros[: -size % 8]
            buf += close_entry if stack else close
        elif kind == _LINK:
            target = os.readlink(p)
            buf += symlink + pack(len(target)) + target + zeros[: -len(target) % 8]
            buf += close_entry if stack else close
        else:
            buf += directory
            stack.append((p, _list_dir(p), [0]))
        if len(buf) >= _FLUSH_AT:
            sink.write(buf)
            buf = bytearray()
        # Find the next node: the next entry of the innermost unfinished directory.
        while stack:
            dir_path, entries, pos = stack[-1]
            i = pos[0]
            if i < len(entries):
                pos[0] = i + 1
                name, kind = entries[i]
                buf += entry_head + pack(len(name)) + name + zeros[: -len(name) % 8] + node_head
                p = dir_path + b"/" + name
                break
            stack.pop()
            buf += close_entry if stack else close
        else:
            break
    if buf:
        sink.write(buf)


def nar_hash_path(path: str | bytes | os.PathLike[str]) -> tuple[int, bytes]:
    """NAR size and sha256 of ``path`` (what ``nix hash path`` reports)."""
    sink = _HashSink()
    dump_path(path, sink)
    return sink.size, sink.hasher.digest()
