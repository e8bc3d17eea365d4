"""Running the binary cache: listen on TCP or a unix socket until stopped."""

from __future__ import annotations

import contextlib
import os
import sys

from aiohttp import web

from tvix_castore.errors import ConfigError
from tvix_store.config import Store
from tvix_store.nar_bridge.app import AppConfig, make_app

__all__ = ["DEFAULT_LISTEN", "parse_listen", "start_nar_bridge"]

DEFAULT_LISTEN = "[::1]:9000"


def parse_listen(listen: str) -> tuple[str, int] | str:
    """``host:port`` / ``[v6]:port`` → (host, port); an absolute path → a unix socket."""
    if listen.startswith("/"):
        return listen
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"listen address {listen!r} needs host:port or an absolute socket path")
    return host.strip("[]") or "::", int(port)


async def start_nar_bridge(
    store: Store, listen: str, config: AppConfig | None = None
) -> tuple[web.AppRunner, str]:
    """Start serving; return the runner (``await runner.cleanup()`` stops it) and the URL."""
    app = make_app(store, config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    where = parse_listen(listen)
    try:
        if isinstance(where, str):
            if os.path.exists(where):
                raise ConfigError(f"socket {where} already exists")
            site: web.BaseSite = web.UnixSite(runner, where)
            await site.start()
            url = f"unix:{where}"
        else:
            host, port = where
            site = web.TCPSite(runner, host, port, reuse_port=False, reuse_address=False)
            await site.start()
            server = getattr(site, "_server", None)
            sockets = getattr(server, "sockets", None) or []
            if port == 0 and sockets:
                port = sockets[0].getsockname()[1]
            url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    except BaseException:
        await runner.cleanup()
        raise
    print(f"nar-bridge listening on {url}", file=sys.stderr, flush=True)
    return runner, url


async def stop_nar_bridge(runner: web.AppRunner, listen: str) -> None:
    """Stop serving (and remove a unix socket)."""
    await runner.cleanup()
    if listen.startswith("/"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(listen)
