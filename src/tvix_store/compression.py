"""Streaming decompression for every compression Nix produces, with an output bound.

Each decompressor is fed compressed pieces and yields output lazily, in pieces
of at most ``_OUT`` bytes (zstd: one bounded step at a time), and
:class:`DecompressingReader` pulls one piece per ``read``: whatever the ratio,
only one step's output is in memory, and the total output is capped by
``limit`` (:class:`TooLarge` as soon as it is crossed).
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import zlib
from collections.abc import Awaitable, Callable, Iterator

import zstandard

from tvix_castore.errors import ValidationError

__all__ = [
    "COMPRESSIONS",
    "DecompressingReader",
    "Decompressor",
    "InvalidCompressedData",
    "TooLarge",
    "decompressor",
]

_OUT = 1 << 20
# zstd's decompressobj has no output cap per call, and a frame may inflate
# ~32000:1 (an RLE block: 4 bytes for 128 KiB): feeding 512 bytes at a time
# bounds one call's output to ~16 MiB.
_ZSTD_IN = 1 << 9

COMPRESSIONS = ("none", "xz", "bzip2", "gzip", "zstd")
SUFFIXES = {
    ".nar": "none",
    ".nar.xz": "xz",
    ".nar.bz2": "bzip2",
    ".nar.gz": "gzip",
    ".nar.zst": "zstd",
}


class InvalidCompressedData(ValidationError):
    """The data is not valid for its declared compression."""


class TooLarge(ValidationError):
    """Decompressed output exceeds the allowed size."""


class Decompressor:
    """Feed compressed pieces, iterate decompressed ones; call :meth:`finish` at the end."""

    def __init__(self, kind: str, limit: int) -> None:
        if kind not in COMPRESSIONS:
            raise ValidationError(f"unsupported compression {kind!r}")
        self.kind = kind
        self.limit = limit
        self.out_size = 0
        self._zstd = zstandard.ZstdDecompressor().decompressobj() if kind == "zstd" else None
        self._obj: lzma.LZMADecompressor | bz2.BZ2Decompressor | zlib._Decompress | None
        if kind == "xz":
            self._obj = lzma.LZMADecompressor()
        elif kind == "bzip2":
            self._obj = bz2.BZ2Decompressor()
        elif kind == "gzip":
            self._obj = zlib.decompressobj(wbits=47)  # gzip or zlib header
        else:
            self._obj = None
        self._ended = False

    def _count(self, data: bytes) -> bytes:
        self.out_size += len(data)
        if self.out_size > self.limit:
            raise TooLarge(f"decompressed data exceeds {self.limit} bytes")
        return data

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decompress ``data`` lazily: each piece is produced when asked for (≤ 1 MiB)."""
        try:
            if self.kind == "none":
                if data:
                    yield self._count(data)
            elif self._zstd is not None:
                yield from self._zstd_feed(data)
            elif isinstance(self._obj, (lzma.LZMADecompressor, bz2.BZ2Decompressor)):
                obj = self._obj
                pending = data
                while True:
                    if obj.eof:
                        if pending or obj.unused_data:
                            raise InvalidCompressedData(
                                f"trailing data after the {self.kind} stream"
                            )
                        return
                    out = obj.decompress(pending, max_length=_OUT)
                    pending = b""
                    if out:
                        yield self._count(out)
                    if obj.needs_input:
                        return
            else:
                z = self._obj
                assert z is not None
                pending = data
                while pending:
                    out = z.decompress(pending, _OUT)
                    pending = z.unconsumed_tail
                    if out:
                        yield self._count(out)
                    if z.eof and (pending or z.unused_data):
                        raise InvalidCompressedData("trailing data after the gzip stream")
        except (lzma.LZMAError, OSError, zlib.error, zstandard.ZstdError, EOFError) as exc:
            raise InvalidCompressedData(f"invalid {self.kind} data: {exc}") from exc

    def _zstd_feed(self, data: bytes) -> Iterator[bytes]:
        """Small input steps (bounded output each), gathered into pieces of about ``_OUT``."""
        assert self._zstd is not None
        held: list[bytes] = []
        size = 0
        for i in range(0, len(data), _ZSTD_IN):
            out = self._count(self._zstd.decompress(data[i : i + _ZSTD_IN]))
            if out:
                held.append(out)
                size += len(out)
            if size >= _OUT or (held and i + _ZSTD_IN >= len(data)):
                joined = b"".join(held) if len(held) > 1 else held[0]
                held, size = [], 0
                for j in range(0, len(joined), _OUT):
                    yield joined[j : j + _OUT]

    def finish(self) -> Iterator[bytes]:
        """Flush; raise if the compressed stream was truncated."""
        if self.kind == "none":
            return
        if self.kind == "gzip":
            z = self._obj
            assert z is not None and not isinstance(z, (lzma.LZMADecompressor, bz2.BZ2Decompressor))
            out = z.flush()
            if out:
                yield self._count(out)
            if not z.eof:
                raise InvalidCompressedData("truncated gzip stream")
        elif self.kind in ("xz", "bzip2"):
            assert isinstance(self._obj, (lzma.LZMADecompressor, bz2.BZ2Decompressor))
            if not self._obj.eof:
                raise InvalidCompressedData(f"truncated {self.kind} stream")
        elif self._zstd is not None:
            out = self._zstd.flush()
            if out:
                yield self._count(out)
            if not self._zstd.eof:
                raise InvalidCompressedData("truncated zstd stream")


class DecompressingReader:
    """``read(n)`` of decompressed bytes over an async source of compressed ones.

    What :func:`~tvix_store.nar.ingest.ingest_nar` consumes; the compressed
    bytes are sha256-hashed on the way (a narinfo's FileHash). Output is pulled
    from the decompressor one piece per ``read``, never a whole network chunk's
    worth: a bomb costs one decompression step of memory.
    """

    def __init__(
        self, read: Callable[[int], Awaitable[bytes]], dec: Decompressor, first: bytes = b""
    ) -> None:
        self._read = read
        self.decompressor = dec
        self.file_hash = hashlib.sha256()
        self._pieces: Iterator[bytes] = iter(())
        self._first = first
        self._eof = False

    async def read(self, n: int) -> bytes:
        """Some decompressed bytes (b"" at the end); raises at a truncated stream."""
        while True:
            for piece in self._pieces:
                if piece:
                    return piece
            if self._eof:
                return b""
            chunk, self._first = self._first or await self._read(max(n, 1 << 16)), b""
            if chunk:
                self.file_hash.update(chunk)
                self._pieces = self.decompressor.feed(chunk)
            else:
                self._eof = True
                self._pieces = self.decompressor.finish()


def decompressor(kind: str, limit: int) -> Decompressor:
    """A decompressor for a Nix compression name (none, xz, bzip2, gzip, zstd)."""
    return Decompressor(kind, limit)
