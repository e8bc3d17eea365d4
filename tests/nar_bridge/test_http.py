"""HTTP-level behaviour of a real nar-bridge process, with a plain client.

Read-only checks share one bridge populated by a real ``nix copy --to
…?compression=none``; every upload check gets a fresh bridge (and store) so
"the store is unchanged" can be checked on the SQLite tables themselves.
"""

from __future__ import annotations

import asyncio
import base64
import bz2
import fcntl
import gzip
import hashlib
import io
import lzma
import socket
import struct
import termios
import time
from collections.abc import AsyncIterator, Callable, Iterator
from urllib.parse import urlsplit

import aiohttp
import pytest
import zstandard

from nix_compat import nixbase32
from nix_compat.nar.writer import NarWriter
from nix_compat.narinfo import NarInfo
from tvix_castore.protos import castore_pb2

from .conftest import (
    Bridge,
    Bridges,
    Closure,
    Keys,
    PathData,
    copy_to,
    nix_in,
    start_process,
    store_rows,
)

PRIORITY = "17"
MAX_NAR = 10 << 20


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, closure: Closure, keys: Keys
) -> Iterator[Bridge]:
    """One bridge holding the whole closure, uploaded by Nix without compression."""
    tmp = tmp_path_factory.mktemp("served")
    bridge = start_process(
        tmp / "home",
        tmp / "bridge.log",
        [
            "nar-bridge",
            "-l",
            "127.0.0.1:0",
            "--priority",
            PRIORITY,
            "--signing-key",
            str(keys.one.secret_file),
        ],
    )
    try:
        copy_to(nix_in(tmp), closure, f"{bridge.url}?compression=none")
        yield bridge
    finally:
        bridge.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


@pytest.fixture
def fresh(bridges: Bridges, keys: Keys) -> Bridge:
    """An empty bridge with a 10 MiB decompression bound."""
    return bridges.start(
        None, "--signing-key", str(keys.one.secret_file), "--max-nar-size", str(MAX_NAR)
    )


def _nar_name(digest: bytes, suffix: str = ".nar") -> str:
    return f"nar/{nixbase32.encode(digest)}{suffix}"


async def _get(
    session: aiohttp.ClientSession, url: str, method: str = "GET", **headers: str
) -> tuple[int, dict[str, str], bytes]:
    async with session.request(method, url, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def _put(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, str]:
    async with session.put(url, data=io.BytesIO(body)) as resp:
        return resp.status, await resp.text()


async def _narinfo_url(session: aiohttp.ClientSession, bridge: Bridge, p: PathData) -> str:
    status, _, body = await _get(session, f"{bridge.url}/{p.hash_part}.narinfo")
    assert status == 200
    return f"{bridge.url}/{NarInfo.parse(body).url}"


async def _still_serving(session: aiohttp.ClientSession, bridge: Bridge) -> None:
    assert bridge.alive(), bridge.log()
    status, _, body = await _get(session, f"{bridge.url}/nix-cache-info")
    assert status == 200 and b"StoreDir: /nix/store\n" in body


# -- reading --------------------------------------------------------------------------------
async def test_cache_info(served: Bridge, session: aiohttp.ClientSession) -> None:
    status, headers, body = await _get(session, f"{served.url}/nix-cache-info")
    assert status == 200
    assert headers["Content-Type"].startswith("text/x-nix-cache-info")
    lines = body.decode().splitlines()
    assert "StoreDir: /nix/store" in lines
    assert "WantMassQuery: 1" in lines
    assert f"Priority: {PRIORITY}" in lines


async def test_narinfo_get_and_head(
    served: Bridge, session: aiohttp.ClientSession, closure: Closure, keys: Keys
) -> None:
    for p in closure.paths:
        url = f"{served.url}/{p.hash_part}.narinfo"
        status, headers, body = await _get(session, url)
        assert status == 200
        assert headers["Content-Type"].startswith("text/x-nix-narinfo")
        info = NarInfo.parse(body)
        assert info.store_path == p.store_path
        assert (info.nar_hash, info.nar_size) == (p.nar_hash, len(p.nar))
        assert {r.absolute for r in info.references} == set(p.references)
        assert info.verify([keys.one.verifying])
        assert not info.verify([keys.two.verifying])
        status, headers, body = await _get(session, url, "HEAD")
        assert (status, body) == (200, b"")
        assert headers["Content-Type"].startswith("text/x-nix-narinfo")


@pytest.mark.parametrize(
    "name",
    [
        "00000000000000000000000000000000",  # valid, but not in the store
        "abc",
        "e" * 32,  # 'e' is not a nixbase32 digit
        "A" * 32,
        "0" * 31,
        "0" * 33,
        "0" * 32 + "-name",
        "",
    ],
)
async def test_narinfo_404(served: Bridge, session: aiohttp.ClientSession, name: str) -> None:
    for method in ("GET", "HEAD"):
        status, _, _ = await _get(session, f"{served.url}/{name}.narinfo", method)
        assert status == 404, (method, name)


async def test_nar_get_and_head(
    served: Bridge, session: aiohttp.ClientSession, closure: Closure
) -> None:
    for p in closure.paths:
        node_url = await _narinfo_url(session, served, p)
        classic = f"{served.url}/{_nar_name(p.nar_hash)}"
        for url in (node_url, classic):
            status, headers, body = await _get(session, url)
            assert status == 200, url
            assert body == p.nar
            assert headers["Content-Type"] == "application/x-nix-nar"
            assert int(headers["Content-Length"]) == len(p.nar)
            status, headers, body = await _get(session, url, "HEAD")
            assert (status, body) == (200, b"")
            assert int(headers["Content-Length"]) == len(p.nar)
            assert headers["Content-Type"] == "application/x-nix-nar"


async def test_nar_ranges(served: Bridge, session: aiohttp.ClientSession, closure: Closure) -> None:
    p = closure.by_name("dep")  # holds a multi-chunk file
    nar = p.nar
    size = len(nar)
    big_at = size // 2
    cases = {
        "bytes=0-0": (0, 1),
        "bytes=0-99": (0, 100),
        "bytes=100-": (100, size),
        "bytes=-50": (size - 50, size),
        f"bytes=-{size + 10}": (0, size),
        f"bytes={size - 1}-{size - 1}": (size - 1, size),
        f"bytes=10-{size + 1000}": (10, size),
        f"bytes={big_at - 1000}-{big_at + 300_000}": (big_at - 1000, big_at + 300_001),
        f"bytes=200000-{size - 200000}": (200000, size - 199999),
    }
    node_url = await _narinfo_url(session, served, p)
    for url in (node_url, f"{served.url}/{_nar_name(p.nar_hash)}"):
        for rng, (start, end) in cases.items():
            status, headers, body = await _get(session, url, Range=rng)
            assert status == 206, rng
            assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}", rng
            assert int(headers["Content-Length"]) == end - start, rng
            assert body == nar[start:end], rng
        for rng in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
            status, headers, _ = await _get(session, url, Range=rng)
            assert status == 416, rng
            assert headers["Content-Range"] == f"bytes */{size}", rng
        # Several ranges at once may be ignored (whole NAR) but never answered wrongly.
        status, _, body = await _get(session, url, Range="bytes=0-1,5-6")
        assert status in (200, 206)
        if status == 200:
            assert body == nar


async def test_nar_404(served: Bridge, session: aiohttp.ClientSession, closure: Closure) -> None:
    unknown = hashlib.sha256(b"never uploaded").digest()
    for name in (
        _nar_name(unknown),
        "nar/garbage.nar",
        "nar/" + "e" * 52 + ".nar",
        "nar/tvix-castore/%21%21not-base64%21%21?narsize=1",
    ):
        for method in ("GET", "HEAD"):
            status, _, _ = await _get(session, f"{served.url}/{name}", method)
            assert status == 404, (method, name)


async def test_nar_with_missing_content_is_refused(
    served: Bridge, session: aiohttp.ClientSession
) -> None:
    node = castore_pb2.Node(
        file=castore_pb2.FileNode(name=b"", digest=hashlib.sha256(b"x").digest(), size=5)
    )
    b64 = base64.urlsafe_b64encode(node.SerializeToString()).rstrip(b"=").decode()
    status, headers, _ = await _get(session, f"{served.url}/nar/tvix-castore/{b64}?narsize=120")
    assert status >= 400
    assert headers.get("Content-Type") != "application/x-nix-nar"
    await _still_serving(session, served)


# -- uploading ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("suffix", "compression", "compress"),
    [
        (".nar.xz", "xz", lambda b: lzma.compress(b, preset=0)),
        (".nar.bz2", "bzip2", lambda b: bz2.compress(b, 1)),
        (".nar.gz", "gzip", gzip.compress),
        (".nar.zst", "zstd", zstandard.ZstdCompressor().compress),
    ],
)
async def test_compressed_upload(
    fresh: Bridge,
    session: aiohttp.ClientSession,
    closure: Closure,
    keys: Keys,
    suffix: str,
    compression: str,
    compress: Callable[[bytes], bytes],
) -> None:
    p = closure.by_name("dep")
    data = compress(p.nar)
    file_hash = hashlib.sha256(data).digest()
    status, text = await _put(session, f"{fresh.url}/{_nar_name(file_hash, suffix)}", data)
    assert status == 200, text
    info = p.narinfo()
    info = NarInfo(
        store_path=info.store_path,
        url=_nar_name(file_hash, suffix),
        compression=compression,
        file_hash=file_hash,
        file_size=len(data),
        nar_hash=info.nar_hash,
        nar_size=info.nar_size,
        references=info.references,
        ca=info.ca,
    )
    status, text = await _put(session, f"{fresh.url}/{p.hash_part}.narinfo", info.render().encode())
    assert status == 200, text
    assert store_rows(fresh.home) == (1, 1)
    url = await _narinfo_url(session, fresh, p)
    status, _, body = await _get(session, url)
    assert (status, body) == (200, p.nar)


async def test_nar_hash_mismatch(
    fresh: Bridge, session: aiohttp.ClientSession, closure: Closure
) -> None:
    p = closure.by_name("dep")
    wrong = hashlib.sha256(p.nar + b"x").digest()
    status, text = await _put(session, f"{fresh.url}/{_nar_name(wrong)}", p.nar)
    assert status == 400 and text.strip()
    # Compressed: the URL names the file hash.
    data = lzma.compress(p.nar)
    status, text = await _put(session, f"{fresh.url}/{_nar_name(p.nar_hash, '.nar.xz')}", data)
    assert status == 400 and text.strip()
    assert store_rows(fresh.home) == (0, 0)
    # Nothing refers to the rejected bytes: its narinfo is refused, and nothing is served.
    status, _ = await _put(
        session, f"{fresh.url}/{p.hash_part}.narinfo", p.narinfo().render().encode()
    )
    assert status == 400
    for url in (f"{p.hash_part}.narinfo", _nar_name(p.nar_hash), _nar_name(wrong)):
        status, _, _ = await _get(session, f"{fresh.url}/{url}")
        assert status == 404, url
    assert store_rows(fresh.home) == (0, 0)


async def test_narinfo_for_unknown_nar(
    fresh: Bridge, session: aiohttp.ClientSession, closure: Closure
) -> None:
    p = closure.by_name("top")
    status, text = await _put(
        session, f"{fresh.url}/{p.hash_part}.narinfo", p.narinfo().render().encode()
    )
    assert status == 400 and text.strip()
    status, _, _ = await _get(session, f"{fresh.url}/{p.hash_part}.narinfo")
    assert status == 404
    assert store_rows(fresh.home) == (0, 0)


async def test_narinfo_url_hash_and_narsize_checked(
    fresh: Bridge, session: aiohttp.ClientSession, closure: Closure
) -> None:
    dep, top = closure.by_name("dep"), closure.by_name("top")
    status, text = await _put(session, f"{fresh.url}/{_nar_name(dep.nar_hash)}", dep.nar)
    assert status == 200, text
    assert store_rows(fresh.home) == (1, 0)
    good = dep.narinfo().render().encode()
    # The URL names another store path than the narinfo's StorePath.
    status, text = await _put(session, f"{fresh.url}/{top.hash_part}.narinfo", good)
    assert status == 400 and text.strip()
    # NarSize disagrees with the uploaded NAR (both directions).
    for size in (len(dep.nar) + 1, len(dep.nar) - 8):
        bad = dep.narinfo(nar_size=size).render().encode()
        status, text = await _put(session, f"{fresh.url}/{dep.hash_part}.narinfo", bad)
        assert status == 400 and text.strip()
    for name in (top.hash_part, dep.hash_part):
        status, _, _ = await _get(session, f"{fresh.url}/{name}.narinfo")
        assert status == 404
    assert store_rows(fresh.home) == (1, 0)
    # The right one still goes in.
    status, text = await _put(session, f"{fresh.url}/{dep.hash_part}.narinfo", good)
    assert status == 200, text
    assert store_rows(fresh.home) == (1, 1)


async def test_unparsable_narinfo(
    fresh: Bridge, session: aiohttp.ClientSession, closure: Closure
) -> None:
    p = closure.by_name("dep")
    status, _ = await _put(session, f"{fresh.url}/{_nar_name(p.nar_hash)}", p.nar)
    assert status == 200
    good = p.narinfo().render()
    bodies = [
        b"",
        b"garbage",
        b"\xff\xfe\x00narinfo",
        good.replace("NarHash: ", "NarHash: md5:").encode(),
        "".join(line for line in good.splitlines(True) if not line.startswith("NarSize")).encode(),
        (good + "\n").encode(),  # an empty line
        (good + f"StorePath: {p.path}\n").encode(),  # a duplicate key
        good.replace("StorePath: /nix/store/", "StorePath: /gnu/store/").encode(),
    ]
    for body in bodies:
        status, text = await _put(session, f"{fresh.url}/{p.hash_part}.narinfo", body)
        assert status == 400, (body[:60], status, text)
        assert text.strip()
    assert store_rows(fresh.home) == (1, 0)


async def test_oversized_narinfo(
    fresh: Bridge, session: aiohttp.ClientSession, closure: Closure
) -> None:
    p = closure.by_name("dep")
    status, _ = await _put(session, f"{fresh.url}/{_nar_name(p.nar_hash)}", p.nar)
    assert status == 200
    body = (p.narinfo().render() + "X-Padding: " + "x" * (2 << 20) + "\n").encode()
    url = f"{fresh.url}/{p.hash_part}.narinfo"
    status, _ = await _put(session, url, body)
    assert status == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked encoding
        for i in range(0, len(body), 1 << 16):
            yield body[i : i + (1 << 16)]

    async with session.put(url, data=chunks()) as resp:
        assert resp.status == 413
    assert store_rows(fresh.home) == (1, 0)
    await _still_serving(session, fresh)


async def test_invalid_nar_body(
    fresh: Bridge, session: aiohttp.ClientSession, closure: Closure
) -> None:
    nar = closure.by_name("dep").nar
    for body in (
        b"not a NAR at all",
        nar[: len(nar) // 2],  # a NAR cut short, named by its own hash
        nar + b"\x00" * 8,  # trailing data
        nar.replace(b"regular", b"irregular", 1),
    ):
        name = _nar_name(hashlib.sha256(body).digest())
        status, text = await _put(session, f"{fresh.url}/{name}", body)
        assert status == 400, (status, text)
        assert text.strip()
    assert store_rows(fresh.home) == (0, 0)
    await _still_serving(session, fresh)


async def test_uncompressed_nar_over_the_limit_by_its_bytes(
    fresh: Bridge, session: aiohttp.ClientSession
) -> None:
    """No header names a size over the limit, no Content-Length either: 413 once crossed."""
    buf = io.BytesIO()
    w = NarWriter(buf)
    w.directory()
    for i in range(MAX_NAR // 4000 + 10):  # symlinks with long targets: no file sizes at all
        w.entry(b"%08d" % i)
        w.symlink(b"t" * 4000)
    w.end_directory()
    w.close()
    nar = buf.getvalue()
    assert len(nar) > MAX_NAR

    async def chunks() -> AsyncIterator[bytes]:  # chunked encoding
        for i in range(0, len(nar), 1 << 16):
            yield nar[i : i + (1 << 16)]

    name = _nar_name(hashlib.sha256(nar).digest())
    async with session.put(f"{fresh.url}/{name}", data=chunks()) as resp:
        assert resp.status == 413, (resp.status, await resp.text())
        assert str(MAX_NAR) in await resp.text()
    assert store_rows(fresh.home) == (0, 0)
    await _still_serving(session, fresh)


def _nar_str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s + b"\x00" * (-len(s) % 8)


async def test_decompression_bomb(fresh: Bridge, session: aiohttp.ClientSession) -> None:
    size = 200 << 20
    head = b"".join(_nar_str(s) for s in (b"nix-archive-1", b"(", b"type", b"regular"))
    head += _nar_str(b"contents") + struct.pack("<Q", size)
    cobj = zstandard.ZstdCompressor(level=3).compressobj()
    parts = [cobj.compress(head)]
    zeros = b"\x00" * (8 << 20)
    for _ in range(size // len(zeros)):
        parts.append(cobj.compress(zeros))
    parts.append(cobj.compress(_nar_str(b")")))
    parts.append(cobj.flush())
    data = b"".join(parts)
    assert len(data) < 1 << 20
    name = _nar_name(hashlib.sha256(data).digest(), ".nar.zst")
    status, text = await _put(session, f"{fresh.url}/{name}", data)
    assert status == 413, (status, text)
    assert store_rows(fresh.home) == (0, 0)
    await _still_serving(session, fresh)


def _read_by_peer(sock: socket.socket) -> bool:
    """Whether the process at the other end of a loopback TCP ``sock`` has read all it was sent.

    Nothing left in our send queue (``SIOCOUTQ``), and nothing in the peer socket's
    receive queue (``rx_queue`` of its ``/proc/net/tcp`` row).
    """
    unsent = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    if unsent:
        return False
    ours, theirs = sock.getsockname()[1], sock.getpeername()[1]
    with open("/proc/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            local, remote, queues = row.split()[1], row.split()[2], row.split()[4]
            if int(local.split(":")[1], 16) == theirs and int(remote.split(":")[1], 16) == ours:
                return int(queues.split(":")[1], 16) == 0
    return False


def _raw_put(bridge: Bridge, path: str, body: bytes, declared: int, in_two: bool = False) -> bytes:
    """PUT with ``Content-Length: declared``; send ``body``, read, close.

    ``in_two``: the second half of ``body`` is sent only once the bridge has read the
    first (an event polled for, not a pause).
    """
    u = urlsplit(bridge.url)
    assert u.hostname is not None and u.port is not None
    with socket.create_connection((u.hostname, u.port), timeout=60) as sock:
        head = (
            f"PUT {path} HTTP/1.1\r\nHost: {u.netloc}\r\n"
            f"Content-Length: {declared}\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        if in_two:
            mid = len(body) // 2
            sock.sendall(head + body[:mid])
            deadline = time.monotonic() + 60
            while not _read_by_peer(sock):
                assert time.monotonic() < deadline, "the bridge read nothing for 60 s"
                time.sleep(0.005)
            sock.sendall(body[mid:])
        else:
            sock.sendall(head + body)
        if declared > len(body):
            sock.shutdown(socket.SHUT_WR)  # the client goes away mid-upload
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
                if declared <= len(body) and b"\r\n\r\n" in reply:
                    break
        except (ConnectionError, TimeoutError):
            pass
        return reply


async def test_truncated_upload(
    fresh: Bridge, bridges: Bridges, session: aiohttp.ClientSession, closure: Closure
) -> None:
    """Uploads cut short store nothing: a NAR, and a narinfo even when the part sent
    parses on its own. The store is read once the bridge has exited (no handler can
    still commit then), not after some time."""
    top, dep = closure.by_name("top"), closure.by_name("dep")
    top_nar = "/" + _nar_name(top.nar_hash)
    await asyncio.to_thread(_raw_put, fresh, top_nar, top.nar[: len(top.nar) // 2], len(top.nar))
    status, text = await _put(session, f"{fresh.url}/{_nar_name(dep.nar_hash)}", dep.nar)
    assert status == 200, text
    full = dep.narinfo().render().encode()
    assert dep.ca is not None  # the cut drops the last line (CA)
    cut = full[: full.index(b"CA: ")]
    await asyncio.to_thread(_raw_put, fresh, f"/{dep.hash_part}.narinfo", cut, len(full))
    await _still_serving(session, fresh)
    fresh.stop()
    assert store_rows(fresh.home) == (1, 0)  # dep's NAR, nothing else
    again = bridges.start(fresh.home)
    status, _, _ = await _get(session, f"{again.url}{top_nar}")
    assert status == 404
    status, _, _ = await _get(session, f"{again.url}/{dep.hash_part}.narinfo")
    assert status == 404


async def test_narinfo_arriving_in_pieces(
    fresh: Bridge, session: aiohttp.ClientSession, closure: Closure
) -> None:
    """A slow client: the whole narinfo is stored, not the part that arrived first."""
    p = closure.by_name("top")
    status, _ = await _put(session, f"{fresh.url}/{_nar_name(p.nar_hash)}", p.nar)
    assert status == 200
    full = p.narinfo().render().encode()
    reply = await asyncio.to_thread(
        _raw_put, fresh, f"/{p.hash_part}.narinfo", full, len(full), True
    )
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    status, _, body = await _get(session, f"{fresh.url}/{p.hash_part}.narinfo")
    assert status == 200
    info = NarInfo.parse(body)
    assert {r.absolute for r in info.references} == set(p.references)
    assert info.deriver is not None
