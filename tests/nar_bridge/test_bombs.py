"""Decompression bombs against a real nar-bridge: refused with 413, memory stays flat.

Each upload is a small compressed stream generated while it is sent (zstd or
xz of a NAR holding one huge file of zeros); the bridge's peak RSS (VmHWM of
the server process) must stay under ``RSS_BOUND`` whatever the ratio. The
generator stops early if the server's RSS already passed the bound, so a
failing run does not take the machine's memory with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import lzma
import socket
import struct
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import zstandard

from nix_compat import nixbase32

from .conftest import Bridge, Bridges, store_rows

RSS_BOUND = 300 << 20
MAX_UPLOAD = 1 << 20  # compressed bytes any of these bombs may send
_ZEROS = b"\x00" * (8 << 20)
_PIECE = 1 << 16


def _nar_str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s + b"\x00" * (-len(s) % 8)


def nar_file_header(size: int) -> bytes:
    """The start of a NAR whose root is a regular file of ``size`` bytes."""
    head = b"".join(_nar_str(s) for s in (b"nix-archive-1", b"(", b"type", b"regular"))
    return head + _nar_str(b"contents") + struct.pack("<Q", size)


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class _Zstd:
    def __init__(self) -> None:
        self._c = zstandard.ZstdCompressor(level=1).compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

    def flush(self) -> bytes:
        return self._c.flush()


class _Xz:
    def __init__(self) -> None:
        self._c = lzma.LZMACompressor(preset=0)

    def compress(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush()


COMPRESSORS: dict[str, tuple[str, Callable[[], _Zstd | _Xz]]] = {
    "zstd": (".nar.zst", _Zstd),
    "xz": (".nar.xz", _Xz),
}


class Bomb:
    """A compressed body: ``head`` then ``zeros`` zero bytes, generated as it is sent."""

    def __init__(self, kind: str, head: bytes, zeros: int, server_pid: int) -> None:
        self.suffix, make = COMPRESSORS[kind]
        self._make = make
        self._head = head
        self._zeros = zeros
        self._pid = server_pid
        self.sent = 0

    def body(self, stop: threading.Event) -> Iterator[bytes]:
        """Compressed pieces of at least 64 KiB (what a server reads at once), until ``stop``."""
        c = self._make()
        piece = c.compress(self._head)
        left = self._zeros
        while left > 0 and not stop.is_set():
            if len(piece) >= _PIECE:
                self.sent += len(piece)
                yield piece
                piece = b""
                if _status_kb(self._pid, "VmRSS") > RSS_BOUND:
                    return  # already failed; do not feed the server more
            n = min(left, len(_ZEROS))
            piece += c.compress(_ZEROS[:n])
            left -= n
        piece += c.flush()
        self.sent += len(piece)
        yield piece


def _put_bomb(bridge: Bridge, bomb: Bomb) -> tuple[int, str]:
    """PUT the bomb chunked from a thread while reading the reply; stop sending at the reply."""
    # The URL names some file hash: a bomb is refused before the hash could be compared.
    name = f"/nar/{nixbase32.encode(hashlib.sha256(b'bomb').digest())}{bomb.suffix}"
    u = urlsplit(bridge.url)
    assert u.hostname is not None and u.port is not None
    stop = threading.Event()
    with socket.create_connection((u.hostname, u.port), timeout=120) as sock:
        sock.sendall(
            f"PUT {name} HTTP/1.1\r\nHost: {u.netloc}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        )

        def send() -> None:
            with contextlib.suppress(OSError):
                for piece in bomb.body(stop):
                    sock.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
                sock.sendall(b"0\r\n\r\n")

        sender = threading.Thread(target=send)
        sender.start()
        try:
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = sock.recv(65536)
                assert chunk, f"connection closed without a reply: {reply!r}"
                reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next(
                int(v)
                for k, _, v in (x.partition(": ") for x in lines[1:])
                if k.lower() == "content-length"
            )
            while len(body) < length:
                chunk = sock.recv(65536)
                assert chunk, "reply cut short"
                body += chunk
        finally:
            stop.set()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sender.join()
    return int(lines[0].split()[1]), body.decode(errors="replace")


def _still_serving(bridge: Bridge) -> None:
    assert bridge.alive(), bridge.log()
    with urllib.request.urlopen(f"{bridge.url}/nix-cache-info", timeout=20) as r:
        assert r.status == 200


@pytest.mark.parametrize(
    ("kind", "limit"),
    [("zstd", 1 << 30), ("xz", 384 << 20)],
)
def test_bomb_with_a_low_limit(bridges: Bridges, kind: str, limit: int) -> None:
    """Zeros that fill the limit exactly, then more: 413 as soon as it is crossed."""
    bridge = bridges.start(None, "--max-nar-size", str(limit))
    head = nar_file_header(0)
    # The file ends exactly at the limit: its closing ')' lies beyond it.
    bomb = Bomb(kind, nar_file_header(limit - len(head)), 10 << 30, bridge.proc.pid)
    status, text = _put_bomb(bridge, bomb)
    peak = _status_kb(bridge.proc.pid, "VmHWM")
    assert status == 413, (status, text)
    assert str(limit) in text
    assert peak < RSS_BOUND, f"server peaked at {peak >> 20} MiB"
    assert bomb.sent < MAX_UPLOAD
    assert store_rows(bridge.home) == (0, 0)
    _still_serving(bridge)


@pytest.mark.parametrize("kind", ["zstd", "xz"])
def test_bomb_with_the_default_limit(bridges: Bridges, kind: str) -> None:
    """A NAR announcing a 100 GiB file is refused on its header (default limit 64 GiB)."""
    bridge = bridges.start(None)
    bomb = Bomb(kind, nar_file_header(100 << 30), 100 << 30, bridge.proc.pid)
    status, text = _put_bomb(bridge, bomb)
    peak = _status_kb(bridge.proc.pid, "VmHWM")
    assert status == 413, (status, text)
    assert peak < RSS_BOUND, f"server peaked at {peak >> 20} MiB"
    assert bomb.sent < MAX_UPLOAD
    assert store_rows(bridge.home) == (0, 0)
    _still_serving(bridge)


def test_bomb_of_plain_zeros(bridges: Bridges) -> None:
    """8 GiB of zeros is no NAR: 400 at the magic, without inflating the first chunk."""
    bridge = bridges.start(None)
    bomb = Bomb("zstd", b"", 8 << 30, bridge.proc.pid)
    status, text = _put_bomb(bridge, bomb)
    peak = _status_kb(bridge.proc.pid, "VmHWM")
    assert status == 400, (status, text)
    assert peak < RSS_BOUND, f"server peaked at {peak >> 20} MiB"
    assert store_rows(bridge.home) == (0, 0)
    _still_serving(bridge)


def test_uncompressed_nar_over_the_limit_refused_up_front(bridges: Bridges) -> None:
    """An uncompressed NAR whose Content-Length is over the limit gets 413 before its body."""
    bridge = bridges.start(None, "--max-nar-size", str(10 << 20))
    u = urlsplit(bridge.url)
    assert u.hostname is not None and u.port is not None
    name = f"/nar/{nixbase32.encode(hashlib.sha256(b'big').digest())}.nar"
    with socket.create_connection((u.hostname, u.port), timeout=20) as sock:
        sock.sendall(
            f"PUT {name} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Length: {11 << 20}\r\n\r\n".encode()
            + nar_file_header((11 << 20) - 120)
        )
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(4096)
            assert chunk, reply
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert store_rows(bridge.home) == (0, 0)
