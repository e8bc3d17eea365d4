"""Streaming, validating NAR reader.

:func:`read_nar` yields one event per node in NAR order. A :class:`NarFile`
carries a reader for its contents, valid until the next event is requested;
contents left unread are skipped (and still checked for padding). Every
violation of the format raises :class:`~nix_compat.errors.NarError` with the
byte offset where it was detected; exceptions raised by the source itself
(I/O errors) propagate unchanged.

>>> import io
>>> from nix_compat.nar.writer import NarWriter
>>> buf = io.BytesIO()
>>> w = NarWriter(buf)
>>> w.file(b"Hello World!")
>>> w.close()
>>> [type(e).__name__ for e in read_nar(io.BytesIO(buf.getvalue()))]
['NarFile']
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from nix_compat.errors import NarError
from nix_compat.nar import wire

__all__ = [
    "NarDirectory",
    "NarDirectoryEnd",
    "NarEvent",
    "NarFile",
    "NarFileReader",
    "NarReader",
    "NarSymlink",
    "Source",
    "read_nar",
]

_BUFSIZE = 1 << 20
_MAX_TOKEN = 64  # longest fixed token we ever expect
_ZEROS = bytes(8)
# The common token sequences are each matched with one comparison (``take``);
# anything else goes the token-by-token way, which says precisely what is wrong.
_CLOSE_ENTRY = wire.CLOSE + wire.CLOSE  # ')' of a node, then ')' of its entry
_NODE_REGULAR = wire.NODE_OPEN_TYPE + wire.REGULAR  # after an entry's name
_NODE_EXECUTABLE = wire.NODE_OPEN_TYPE + wire.EXECUTABLE


class Source(Protocol):
    """Anything with a binary ``read(n)`` returning up to ``n`` bytes (b"" at EOF)."""

    def read(self, n: int = -1, /) -> bytes: ...


class _Input:
    """A small read buffer with an absolute offset, so errors can say where."""

    def __init__(self, source: Source, bufsize: int = _BUFSIZE) -> None:
        self._src = source
        self._bufsize = bufsize
        self._buf = b""
        self._pos = 0
        self.offset = 0  # bytes consumed

    def _fill(self, want: int) -> bool:
        """Make at least ``want`` bytes available; False at EOF."""
        have = len(self._buf) - self._pos
        parts = [self._buf[self._pos :]] if have else []
        while have < want:
            # Errors of the source itself (I/O, network) are not format errors:
            # they propagate unchanged, so callers can tell them apart.
            chunk = self._src.read(max(self._bufsize, want - have))
            if not chunk:
                self._buf = b"".join(parts)
                self._pos = 0
                return False
            parts.append(chunk)
            have += len(chunk)
        self._buf = b"".join(parts)
        self._pos = 0
        return True

    def read_exact(self, n: int) -> bytes:
        if len(self._buf) - self._pos < n:
            if n > self._bufsize:
                return self._gather(n)
            if not self._fill(n):
                raise NarError("unexpected end of NAR", self.offset + len(self._buf) - self._pos)
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        self.offset += n
        return out

    def _gather(self, n: int) -> bytes:
        """``read_exact`` of more than is buffered: the pieces are copied once."""
        parts: list[bytes | memoryview] = [memoryview(self._buf)[self._pos :]]
        have = len(self._buf) - self._pos
        while have < n:
            chunk = self._src.read(max(self._bufsize, n - have))
            if not chunk:
                self._buf = b"".join(parts)
                self._pos = 0
                raise NarError("unexpected end of NAR", self.offset + have)
            take = min(len(chunk), n - have)
            parts.append(memoryview(chunk)[:take] if take < len(chunk) else chunk)
            self._buf, self._pos = chunk, take
            have += take
        self.offset += n
        return b"".join(parts)

    def read_some(self, n: int) -> bytes:
        """Up to ``n`` (> 0) bytes, at least one; error at EOF."""
        if self._pos >= len(self._buf) and not self._fill(1):
            raise NarError("unexpected end of NAR", self.offset)
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        self.offset += len(out)
        return out

    def at_eof(self) -> bool:
        return self._pos >= len(self._buf) and not self._fill(1)

    def expect(self, tok: bytes, what: str) -> None:
        start = self.offset
        got = self.read_exact(len(tok))
        if got != tok:
            raise NarError(f"expected {what}", start)

    def take(self, tok: bytes) -> bool:
        """Consume ``tok`` if the input continues with it; otherwise consume nothing."""
        n = len(tok)
        if len(self._buf) - self._pos < n:
            self._fill(n)  # (at EOF there are fewer bytes, and the match fails)
        if self._buf.startswith(tok, self._pos):
            self._pos += n
            self.offset += n
            return True
        return False

    def take_str(self, limit: int) -> bytes | None:
        """:meth:`read_str`'s fast path: the string, or ``None`` with nothing consumed.

        ``None`` if it is longer than ``limit``, truncated or badly padded: the
        caller then reads it with :meth:`read_str`, which raises the right error.
        """
        if len(self._buf) - self._pos < 8 and not self._fill(8):
            return None
        n: int = wire.U64.unpack_from(self._buf, self._pos)[0]
        if n > limit:
            return None
        end = 8 + n + (-n % 8)
        if len(self._buf) - self._pos < end and not self._fill(end):
            return None
        buf, pos = self._buf, self._pos
        if not buf.startswith(_ZEROS[: end - 8 - n], pos + 8 + n):
            return None
        self._pos = pos + end
        self.offset += end
        return buf[pos + 8 : pos + 8 + n]

    def read_u64(self) -> int:
        value: int = wire.U64.unpack(self.read_exact(8))[0]
        return value

    def read_padded(self, n: int) -> bytes | None:
        """``n`` buffered bytes and their zero padding, else ``None`` (nothing consumed)."""
        pos = self._pos
        end = pos + n + (-n % 8)
        buf = self._buf
        if end > len(buf) or not buf.startswith(_ZEROS[: end - pos - n], pos + n):
            return None
        self._pos = end
        self.offset += end - pos
        return buf[pos : pos + n]

    def read_padding(self, n: int) -> None:
        pad = wire.padding(n)
        if pad:
            start = self.offset
            if self.read_exact(pad) != b"\0" * pad:
                raise NarError("non-zero padding", start)

    def read_str(self, limit: int, what: str) -> bytes:
        start = self.offset
        n = self.read_u64()
        if n > limit:
            raise NarError(f"{what} of {n} bytes exceeds the limit of {limit}", start)
        data = self.read_exact(n)
        self.read_padding(n)
        return data


@dataclass(frozen=True, slots=True)
class NarDirectory:
    """Start of a directory; its entries follow until the matching end."""

    path: bytes


@dataclass(frozen=True, slots=True)
class NarDirectoryEnd:
    """End of the directory at ``path``."""

    path: bytes


@dataclass(frozen=True, slots=True)
class NarSymlink:
    """A symlink at ``path``."""

    path: bytes
    target: bytes


class NarFileReader:
    """The contents of one regular file, read straight from the NAR stream."""

    def __init__(self, inp: _Input, size: int) -> None:
        self._inp = inp
        self.size = size
        self.remaining = size
        self._padded = False  # padding read (with the contents)

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that is left if ``n < 0``); b"" at the end."""
        if self.remaining == 0:
            return b""
        if n < 0:  # all of it, gathered by one read
            out = self._inp.read_padded(self.remaining) if self.remaining == self.size else None
            if out is None:
                out = self._inp.read_exact(self.remaining)
            else:
                self._padded = True
            self.remaining = 0
            return out
        out = self._inp.read_some(min(n, self.remaining))
        self.remaining -= len(out)
        return out

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        """Iterate over the rest of the contents."""
        while self.remaining:
            yield self.read(size)

    def _finish(self) -> None:
        while self.remaining:  # contents left unread: skipped
            self.read(_BUFSIZE)
        if not self._padded:
            self._inp.read_padding(self.size)


@dataclass(frozen=True, slots=True)
class NarFile:
    """A regular file at ``path``; read ``contents`` before asking for the next event."""

    path: bytes
    executable: bool
    size: int
    contents: NarFileReader


NarEvent = NarDirectory | NarDirectoryEnd | NarSymlink | NarFile


class NarReader:
    """Iterator of :data:`NarEvent` over one NAR stream; see :func:`read_nar`."""

    def __init__(self, source: Source) -> None:
        self._inp = _Input(source)

    @property
    def offset(self) -> int:
        """Bytes of the NAR consumed so far."""
        return self._inp.offset

    def __iter__(self) -> Iterator[NarEvent]:
        inp = self._inp
        inp.expect(wire.MAGIC, "NAR magic 'nix-archive-1'")
        inp.expect(wire.OPEN_TYPE, "'(' 'type'")
        yield from self._node(b"")
        if not inp.at_eof():
            raise NarError("trailing bytes after the root node", inp.offset)

    def _node(self, path: bytes) -> Iterator[NarEvent]:
        """Parse one node after its ``( type``; iterative over directories."""
        inp = self._inp
        # Stack of (directory path, last entry name) for open directories.
        stack: list[tuple[bytes, bytes | None]] = []
        cur = path
        seen = 0  # a file's header already read with its entry's: 1 regular, 2 executable
        while True:
            start = inp.offset
            node_open = True  # a file's ')' still to read
            if seen == 1 or (not seen and inp.take(wire.REGULAR)):
                yield from self._contents(cur, False)
            elif seen == 2 or (not seen and inp.take(wire.EXECUTABLE)):
                yield from self._contents(cur, True)
            elif inp.take(wire.DIRECTORY):
                yield NarDirectory(cur)
                stack.append((cur, None))
                node_open = False
            else:
                kind = inp.read_str(_MAX_TOKEN, "node type")
                if kind == b"regular":
                    yield from self._regular(cur, start)
                elif kind == b"symlink":
                    inp.expect(wire.token(b"target"), "'target'")
                    tstart = inp.offset
                    target = inp.read_str(wire.MAX_TARGET_LEN, "symlink target")
                    why = wire.check_target(target)
                    if why:
                        raise NarError(why, tstart)
                    yield NarSymlink(cur, target)
                elif kind == b"directory":
                    yield NarDirectory(cur)
                    stack.append((cur, None))
                    node_open = False
                else:
                    raise NarError(f"unknown node type {kind[:32]!r}", start)
            if node_open and not (stack and inp.take(_CLOSE_ENTRY)):
                inp.expect(wire.CLOSE, "')'")
                if stack:
                    inp.expect(wire.CLOSE, "')' closing the entry")
            # Finish directories until one has another entry (or we are done).
            while stack:
                dpath, last = stack[-1]
                tstart = inp.offset
                if not inp.take(wire.ENTRY_NAME):
                    if inp.take(wire.CLOSE):
                        tag = b")"
                    else:
                        tag = inp.read_str(_MAX_TOKEN, "directory token")
                    if tag == b")":
                        stack.pop()
                        yield NarDirectoryEnd(dpath)
                        if stack:
                            inp.expect(wire.CLOSE, "')' closing the entry")
                        continue
                    if tag != b"entry":
                        raise NarError("expected 'entry' or ')'", tstart)
                    inp.expect(wire.token(b"(", b"name"), "'(' 'name'")
                nstart = inp.offset
                name = inp.take_str(wire.MAX_NAME_LEN)
                if name is None:
                    name = inp.read_str(wire.MAX_NAME_LEN, "entry name")
                why = wire.check_name(name)
                if why:
                    raise NarError(why, nstart)
                if last is not None and name <= last:
                    what = "duplicate" if name == last else "unsorted"
                    raise NarError(f"{what} entry name {name!r} after {last!r}", nstart)
                stack[-1] = (dpath, name)
                if inp.take(_NODE_REGULAR):
                    seen = 1
                elif inp.take(_NODE_EXECUTABLE):
                    seen = 2
                else:
                    seen = 0
                    inp.expect(wire.NODE_OPEN_TYPE, "'node' '(' 'type'")
                cur = dpath + b"/" + name if dpath else name
                break
            else:
                return

    def _regular(self, path: bytes, start: int) -> Iterator[NarEvent]:
        """A regular file after its ``regular`` token, read token by token."""
        inp = self._inp
        tstart = inp.offset
        tag = inp.read_str(_MAX_TOKEN, "file token")
        executable = False
        if tag == b"executable":
            estart = inp.offset
            if inp.read_u64() != 0:
                raise NarError("'executable' must be followed by an empty string", estart)
            executable = True
            tstart = inp.offset
            tag = inp.read_str(_MAX_TOKEN, "file token")
        if tag != b"contents":
            raise NarError("expected 'contents'", tstart)
        yield from self._contents(path, executable)

    def _contents(self, path: bytes, executable: bool) -> Iterator[NarEvent]:
        """A regular file from its size to its padding (``contents`` already read)."""
        inp = self._inp
        size = inp.read_u64()
        contents = NarFileReader(inp, size)
        yield NarFile(path, executable, size, contents)
        contents._finish()


def read_nar(source: Source) -> Iterator[NarEvent]:
    """Iterate over the nodes of the NAR read from ``source`` (see module docs)."""
    return iter(NarReader(source))
