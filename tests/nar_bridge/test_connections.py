"""Connections against a real nar-bridge: restarts on a port, timeouts, a connection cap.

Raw loopback sockets play the hostile clients (a request header never
finished, a body that stalls, more connections than allowed); every wait is
a socket timeout or a bounded poll, never a sleep that orders events.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from nix_compat import nixbase32

from .conftest import TVIX, Bridge, Bridges, Closure, start_process, store_rows, tvix_env

DEADLINE = 30.0  # seconds any single wait may take before the test fails


def _addr(bridge: Bridge) -> tuple[str, int]:
    u = urlsplit(bridge.url)
    assert u.hostname is not None and u.port is not None
    return u.hostname, u.port


def _connect(bridge: Bridge) -> socket.socket:
    return socket.create_connection(_addr(bridge), timeout=DEADLINE)


def _reply(sock: socket.socket) -> bytes:
    """One response (headers and Content-Length body), or what came before the server closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b": ")
        if k.lower() == b"content-length":
            length = int(v)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _get(sock: socket.socket, path: str = "/nix-cache-info", close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bridge\r\n{extra}\r\n".encode())
    return _reply(sock)


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` (reads until EOF or reset) within the deadline."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def _time_wait_ports() -> set[int]:
    """Local ports of IPv4 loopback sockets in TIME_WAIT (from /proc/net/tcp)."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state = line.split()[1:4]
        if state == "06":
            ports.add(int(local.rpartition(":")[2], 16))
    return ports


# -- restarts (issue 12, item 3) -------------------------------------------------------------
def test_restart_on_the_same_port_after_serving(bridges: Bridges, tmp_path: Path) -> None:
    first = bridges.start(None)
    host, port = _addr(first)
    for _ in range(3):  # the server closes first: its side of each connection is in TIME_WAIT
        with _connect(first) as sock:
            assert _get(sock, close=True).startswith(b"HTTP/1.1 200")
            assert _closed_by_server(sock)
    first.stop()
    assert port in _time_wait_ports()
    again = bridges.start(first.home, "-l", f"{host}:{port}")
    assert _addr(again) == (host, port)
    with _connect(again) as sock:
        assert _get(sock).startswith(b"HTTP/1.1 200")


def test_busy_port_is_refused(bridges: Bridges, tmp_path: Path) -> None:
    live = bridges.start(None)
    host, port = _addr(live)
    for argv in (
        ["nar-bridge", "-l", f"{host}:{port}"],
        ["daemon", "-l", "127.0.0.1:0", "--nar-bridge", f"{host}:{port}"],
    ):
        done = subprocess.run(
            [TVIX, *argv],
            env=tvix_env(tmp_path / argv[0]),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            check=False,
        )
        err = done.stderr.decode(errors="replace")
        assert done.returncode == 1, (argv, done.returncode, err)
        assert f"cannot listen on {host}:{port}" in err and "in use" in err, err
    with _connect(live) as sock:  # the live server never noticed
        assert _get(sock).startswith(b"HTTP/1.1 200")


def test_daemon_with_a_busy_bridge_port_releases_its_grpc_port(
    bridges: Bridges, tmp_path: Path
) -> None:
    live = bridges.start(None)
    host, port = _addr(live)
    with socket.socket() as probe:  # a free port for gRPC
        probe.bind(("127.0.0.1", 0))
        grpc_port = probe.getsockname()[1]
    done = subprocess.run(
        [TVIX, "daemon", "-l", f"127.0.0.1:{grpc_port}", "--nar-bridge", f"{host}:{port}"],
        env=tvix_env(tmp_path / "daemon"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    # The gRPC side had bound; it was shut down: its port is free again.
    with socket.socket() as again:
        again.bind(("127.0.0.1", grpc_port))


# -- timeouts (issue 12, item 8) -------------------------------------------------------------
def test_unfinished_request_headers_are_closed(bridges: Bridges) -> None:
    bridge = bridges.start(None, "--header-timeout", "1")
    with contextlib.ExitStack() as stack:
        silent = stack.enter_context(_connect(bridge))
        partial = stack.enter_context(_connect(bridge))
        partial.sendall(b"GET /nix-cache-info HT")
        headers = stack.enter_context(_connect(bridge))
        headers.sendall(b"GET /nix-cache-info HTTP/1.1\r\nHost: bridge\r\nX-Slow: ")
        after = stack.enter_context(_connect(bridge))  # a second request never finished
        assert _get(after).startswith(b"HTTP/1.1 200")
        after.sendall(b"GET /nix-cache-info HTTP/1.1\r\n")
        for sock in (silent, partial, headers, after):
            assert _closed_by_server(sock)
    with _connect(bridge) as sock:  # a prompt client is served
        assert _get(sock).startswith(b"HTTP/1.1 200")


def test_stalled_bodies_get_408_and_are_closed(bridges: Bridges, closure: Closure) -> None:
    bridge = bridges.start(None, "--body-timeout", "1")
    dep = closure.by_name("dep")
    nar_path = f"/nar/{nixbase32.encode(dep.nar_hash)}.nar"
    for path, body in (
        (nar_path, dep.nar),
        (f"/{dep.hash_part}.narinfo", dep.narinfo().render().encode()),
        (f"/{dep.hash_part}.ls", b"{}" * 100),
    ):
        with _connect(bridge) as sock:
            sock.sendall(
                f"PUT {path} HTTP/1.1\r\nHost: bridge\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body[: len(body) // 2]
            )
            reply = _reply(sock)
            assert reply.startswith(b"HTTP/1.1 408"), (path, reply[:200])
            assert _closed_by_server(sock), path
    assert store_rows(bridge.home) == (0, 0)
    with _connect(bridge) as sock:  # an upload that keeps going is fine
        sock.sendall(
            f"PUT {nar_path} HTTP/1.1\r\nHost: bridge\r\nContent-Length: {len(dep.nar)}\r\n\r\n".encode()
            + dep.nar
        )
        assert _reply(sock).startswith(b"HTTP/1.1 200")
    assert store_rows(bridge.home) == (1, 0)


# -- the connection cap (issue 12, item 8) ---------------------------------------------------
@contextlib.contextmanager
def _held(bridge: Bridge, n: int) -> Iterator[list[socket.socket]]:
    """``n`` keep-alive connections, each served once (so the server counts them), then idle."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(_connect(bridge)) for _ in range(n)]
        for sock in socks:
            assert _get(sock).startswith(b"HTTP/1.1 200")
        yield socks


def _refused(bridge: Bridge) -> bool:
    """Whether a new connection is turned away (503, closed or reset) rather than served."""
    with _connect(bridge) as sock:
        try:
            reply = _get(sock)
        except ConnectionError:
            return True
        if reply.startswith(b"HTTP/1.1 200"):
            return False
        assert reply == b"" or reply.startswith(b"HTTP/1.1 503"), reply[:200]
        return True


def _served_within_deadline(bridge: Bridge) -> bool:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if not _refused(bridge):
            return True
        time.sleep(0.05)
    return False


def test_connections_beyond_the_cap_are_refused(bridges: Bridges) -> None:
    bridge = bridges.start(None, "--max-connections", "5")
    with _held(bridge, 5) as socks:
        for _ in range(3):
            assert _refused(bridge)
        for sock in socks:  # the ones inside the cap are still served
            assert _get(sock).startswith(b"HTTP/1.1 200")
        socks[0].close()
        socks[1].close()
        assert _served_within_deadline(bridge)
        assert _get(socks[2]).startswith(b"HTTP/1.1 200")
    assert _served_within_deadline(bridge)


def test_a_flood_of_refused_connections_logs_a_few_lines(bridges: Bridges) -> None:
    bridge = bridges.start(None, "--max-connections", "5")
    with _held(bridge, 5):
        before = len(bridge.log().splitlines())
        for _ in range(500):
            assert _refused(bridge)
        assert len(bridge.log().splitlines()) - before < 10
    assert _served_within_deadline(bridge)


def test_cap_fits_the_file_descriptor_limit(tmp_path: Path) -> None:
    """With 256 descriptors the default cap (1024) shrinks: a flood meets 503s, not EMFILE."""
    bridge = start_process(
        tmp_path / "home",
        tmp_path / "bridge.log",
        ["nar-bridge", "-l", "127.0.0.1:0"],
        prefix=["prlimit", "--nofile=256:256"],
    )
    try:
        lines = len(bridge.log().splitlines())
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(_connect(bridge)) for _ in range(400)]
            served = refused = 0
            for sock in socks:
                sock.sendall(b"GET /nix-cache-info HTTP/1.1\r\nHost: bridge\r\n\r\n")
            for sock in socks:
                try:
                    reply = _reply(sock)
                except ConnectionError:
                    reply = b""
                if reply.startswith(b"HTTP/1.1 200"):
                    served += 1
                else:
                    assert reply == b"" or reply.startswith(b"HTTP/1.1 503"), reply[:200]
                    refused += 1
            assert served >= 1 and refused >= 1, (served, refused)
        assert _served_within_deadline(bridge)
        assert bridge.alive()
        assert len(bridge.log().splitlines()) - lines < 20
    finally:
        bridge.stop()
