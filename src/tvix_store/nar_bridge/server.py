"""Running the binary cache: listen on TCP or a unix socket until stopped.

What keeps hostile clients from holding the server (see :class:`AppConfig`):
a request header must arrive within ``header_timeout`` of the connection (or
of the previous response: an idle keep-alive connection is closed then too),
and beyond ``max_connections`` open connections a new one is answered ``503``
and closed at once, so a flood never exhausts file descriptors. The listening
socket sets SO_REUSEADDR (a restart right after serving is not blocked by
TIME_WAIT) but not SO_REUSEPORT (a port another server listens on is refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import resource
import sys

from aiohttp import web

from tvix_castore.errors import ConfigError
from tvix_store.config import Store
from tvix_store.nar_bridge.app import AppConfig, make_app

__all__ = ["DEFAULT_LISTEN", "parse_listen", "start_nar_bridge", "stop_nar_bridge"]

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "[::1]:9000"
_PORT = re.compile(r"[0-9]{1,5}")
_FD_RESERVE = 128  # descriptors kept for the store, gRPC and the listening sockets
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 21\r\n\r\ntoo many connections\n"
)


def parse_listen(listen: str) -> tuple[str, int] | str:
    """``host:port`` / ``[v6]:port`` → (host, port); an absolute path → a unix socket."""
    if listen.startswith("/"):
        return listen
    host, sep, port = listen.rpartition(":")
    if not sep or _PORT.fullmatch(port) is None or int(port) > 65535:
        raise ConfigError(f"listen address {listen!r} needs host:port or an absolute socket path")
    return host.strip("[]") or "::", int(port)


def _connection_cap(wanted: int) -> int:
    """``wanted``, raising the soft fd limit for it if needed; less if the hard limit says so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + _FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    if soft != resource.RLIM_INFINITY and soft < need:
        cap = max(1, soft - _FD_RESERVE)
        log.warning("only %d file descriptors: serving at most %d connections", soft, cap)
        return cap
    return wanted


class _Gate:
    """Counts open connections; beyond ``limit`` a new one is refused."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted while it is open."""

    def __init__(self, inner: asyncio.Protocol, gate: _Gate) -> None:
        self._inner = inner
        self._gate = gate
        gate.open += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gate.open -= 1
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _Refused(asyncio.Protocol):
    """A connection over the limit: told so and closed, before it costs anything."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()


class _Site(web.BaseSite):
    """A TCP or unix listener whose connections pass through a :class:`_Gate`."""

    __slots__ = ("_gate", "_where")

    def __init__(self, runner: web.AppRunner, where: tuple[str, int] | str, gate: _Gate) -> None:
        super().__init__(runner)
        self._where = where
        self._gate = gate

    @property
    def name(self) -> str:
        return str(self._where)

    def _protocol(self) -> asyncio.Protocol:
        if self._gate.open >= self._gate.limit:
            log.warning("%d connections open: refusing new ones", self._gate.open)
            return _Refused()
        server = self._runner.server
        assert server is not None
        return _Counted(server(), self._gate)

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        if isinstance(self._where, str):
            self._server = await loop.create_unix_server(self._protocol, self._where)
        else:
            host, port = self._where
            self._server = await loop.create_server(
                self._protocol, host, port, reuse_address=True, reuse_port=False
            )

    @property
    def port(self) -> int:
        """The bound TCP port (useful after listening on port 0)."""
        assert self._server is not None and isinstance(self._server, asyncio.Server)
        return int(self._server.sockets[0].getsockname()[1])


async def start_nar_bridge(
    store: Store, listen: str, config: AppConfig | None = None, *, announce: bool = True
) -> tuple[web.AppRunner, str]:
    """Start serving; return the runner (``await runner.cleanup()`` stops it) and the URL.

    ``announce``: print where it listens (the daemon prints it with its own banner).
    """
    config = config or AppConfig()
    app = make_app(store, config)
    # aiohttp's keep-alive timer also runs from the connection's start, and
    # closes a connection whose next request header has not arrived by then;
    # the rest of a body answered early (413, 408) is drained at most this long.
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=config.header_timeout,
        lingering_time=min(10.0, config.body_timeout),
    )
    await runner.setup()
    where = parse_listen(listen)
    try:
        if isinstance(where, str) and os.path.exists(where):
            raise ConfigError(f"socket {where} already exists")
        site = _Site(runner, where, _Gate(_connection_cap(config.max_connections)))
        await site.start()
        if isinstance(where, str):
            url = f"unix:{where}"
        else:
            host, port = where[0], site.port
            url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    except BaseException:
        await runner.cleanup()
        raise
    if announce:
        print(f"nar-bridge listening on {url}", file=sys.stderr, flush=True)
    return runner, url


async def stop_nar_bridge(runner: web.AppRunner, listen: str) -> None:
    """Stop serving (and remove a unix socket)."""
    await runner.cleanup()
    if listen.startswith("/"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen)
