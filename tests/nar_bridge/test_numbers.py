"""Client-sized numbers against a real nar-bridge: 400/416, never a 500.

Python's ``int()`` refuses more than 4,300 digits with a ValueError, and
``\\d``/``str.isdigit()`` accept non-ASCII digits (``٣`` is three); every
number a client sends is bounded in length and ASCII-only before conversion.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from nix_compat import nixbase32

from .conftest import Bridge, Bridges, Closure, PathData, store_rows

HUGE = "9" * 5000
ARABIC_THREE = "\u0663"


def _request(bridge: Bridge, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request (head given as text, sent as UTF-8); status, headers, body."""
    u = urlsplit(bridge.url)
    assert u.hostname is not None and u.port is not None
    with socket.create_connection((u.hostname, u.port), timeout=20) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            assert chunk, reply
            reply += chunk
        top, _, rest = reply.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, _, v in (x.partition(": ") for x in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk
            rest += chunk
    return int(lines[0].split()[1]), headers, rest


def _put(bridge: Bridge, path: str, body: bytes) -> tuple[int, bytes]:
    u = urlsplit(bridge.url)
    status, _, text = _request(
        bridge,
        f"PUT {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n",
        body,
    )
    return status, text


def _get(bridge: Bridge, path: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    u = urlsplit(bridge.url)
    extra = "".join(h + "\r\n" for h in headers)
    return _request(
        bridge, f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: close\r\n{extra}"
    )


@pytest.fixture
def with_dep(bridges: Bridges, closure: Closure) -> Iterator[tuple[Bridge, PathData]]:
    """A bridge holding the NAR of ``dep`` (not its narinfo)."""
    bridge = bridges.start(None)
    dep = closure.by_name("dep")
    status, text = _put(bridge, f"/nar/{nixbase32.encode(dep.nar_hash)}.nar", dep.nar)
    assert status == 200, text
    yield bridge, dep


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("NarSize", HUGE),
        ("FileSize", HUGE),
        ("NarSize", "1" + "0" * 20),  # 21 digits: over 64 bits
        ("NarSize", ARABIC_THREE),
        ("FileSize", "1" + ARABIC_THREE),
        ("NarSize", "+5"),
        ("NarSize", " 5"),
        ("NarSize", "5_0"),
    ],
)
def test_narinfo_sizes_out_of_bounds(
    with_dep: tuple[Bridge, PathData], key: str, value: str
) -> None:
    bridge, dep = with_dep
    lines = dep.narinfo().render().splitlines()
    body = "".join(
        f"{key}: {value}\n" if line.startswith(f"{key}: ") else line + "\n" for line in lines
    ).encode()
    assert f"{key}: {value}\n".encode() in body
    status, text = _put(bridge, f"/{dep.hash_part}.narinfo", body)
    assert status == 400, (status, text[:200])
    assert key.encode() in text
    assert store_rows(bridge.home) == (1, 0)
    # The right one still goes in.
    status, text = _put(bridge, f"/{dep.hash_part}.narinfo", dep.narinfo().render().encode())
    assert status == 200, text


@pytest.mark.parametrize(
    "rng",
    [
        f"bytes=0-{HUGE}",
        f"bytes={HUGE}-",
        f"bytes=-{HUGE}",
        f"bytes=0-1{'0' * 20}",  # 21 digits
        f"bytes=0-{ARABIC_THREE}",
        f"bytes={ARABIC_THREE}-",
        f"bytes=-{ARABIC_THREE}",
        "bytes=-",
    ],
)
def test_range_numbers_out_of_bounds(with_dep: tuple[Bridge, PathData], rng: str) -> None:
    bridge, dep = with_dep
    url = f"/nar/{nixbase32.encode(dep.nar_hash)}.nar"
    status, headers, _ = _get(bridge, url, f"Range: {rng}")
    assert status == 416, (rng[:40], status)
    assert headers["content-range"] == f"bytes */{len(dep.nar)}"
    # A sane range still works on the same bridge.
    status, headers, body = _get(bridge, url, "Range: bytes=0-9")
    assert (status, body) == (206, dep.nar[:10])


@pytest.mark.parametrize("narsize", [HUGE, ARABIC_THREE, "1" + "0" * 20, ""])
def test_node_url_narsize_out_of_bounds(with_dep: tuple[Bridge, PathData], narsize: str) -> None:
    bridge, dep = with_dep
    status, text = _put(bridge, f"/{dep.hash_part}.narinfo", dep.narinfo().render().encode())
    assert status == 200, text
    status, _, body = _get(bridge, f"/{dep.hash_part}.narinfo")
    assert status == 200
    (url,) = [line[5:] for line in body.decode().splitlines() if line.startswith("URL: ")]
    base = url.partition("?")[0]
    status, _, body = _get(bridge, f"/{base}?narsize={narsize}")
    assert status == 400, (narsize[:40], status, body[:200])
    status, _, body = _get(bridge, f"/{url}")
    assert (status, body) == (200, dep.nar)


def test_huge_content_length(with_dep: tuple[Bridge, PathData]) -> None:
    bridge, dep = with_dep
    u = urlsplit(bridge.url)
    status, _, _ = _request(
        bridge,
        f"PUT /{dep.hash_part}.narinfo HTTP/1.1\r\nHost: {u.netloc}\r\n"
        f"Content-Length: {HUGE}\r\nConnection: close\r\n",
    )
    assert status == 400
    assert store_rows(bridge.home) == (1, 0)
