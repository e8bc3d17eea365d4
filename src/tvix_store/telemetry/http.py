"""HTTP requests counted, timed and traced; ``/metrics``, on the cache or its own listener.

:func:`observe` is the outermost middleware of nar-bridge: it sees the status
the error middleware chose. The route label is the route's template
(``/{hash}.narinfo``, ``/{cache}/nar/{name}``), never the raw path, and
``(unmatched)`` for requests no route took, so the label sets stay few.
Request bytes are those the handler read from the streamed body; response
bytes the bodies sent (a streamed NAR is counted once it ends; one cut short
is not counted).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractResource
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tvix_store.telemetry import traces
from tvix_store.telemetry.metrics import (
    HTTP_DURATION,
    HTTP_IN_FLIGHT,
    HTTP_REQUEST_BYTES,
    HTTP_REQUESTS,
    HTTP_RESPONSE_BYTES,
    REGISTRY,
    Children,
)

__all__ = ["METRICS_PATH", "METRICS_ROUTE", "metrics", "observe", "start_metrics_listener"]

METRICS_PATH = "/metrics"
METRICS_ROUTE = "metrics"
_UNMATCHED = "(unmatched)"
_CLIENT_GONE = 499  # (nginx's "client closed request": no response was sent)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Route:
    """The children of one (route, method): looked up once, used by every request."""

    __slots__ = ("bytes_in", "bytes_out", "duration", "method", "name", "statuses")

    def __init__(self, name: str, method: str) -> None:
        self.name = name
        self.method = method
        self.duration = HTTP_DURATION.labels(name, method)
        self.bytes_in = HTTP_REQUEST_BYTES.labels(name, method)
        self.bytes_out = HTTP_RESPONSE_BYTES.labels(name, method)
        self.statuses = Children(HTTP_REQUESTS)

    def count(self, status: int) -> None:
        self.statuses.get(self.name, self.method, str(status)).inc()


_routes: dict[tuple[AbstractResource | None, str], _Route] = {}


_METHODS = frozenset(("GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH"))


def _route(request: web.Request) -> _Route:
    resource = request.match_info.route.resource
    method = request.method
    if method not in _METHODS:
        method = "other"  # (the method is the client's choice: keep the labels bounded)
    route = _routes.get((resource, method))
    if route is None:
        name = _UNMATCHED if resource is None else resource.canonical
        route = _routes[(resource, method)] = _Route(name, method)
    return route


def _sent(resp: web.StreamResponse | None) -> int:
    if resp is None:
        return 0
    if resp.prepared and not resp.body_length:
        return 0  # (cut short: the connection was closed before its end)
    # (a Response is sent after the middlewares, from its body; a finished stream's
    # body_length counts its header too, so its Content-Length is the body's size)
    if resp.content_length is not None:
        return resp.content_length
    return resp.body_length


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count, time and (with tracing on) trace one request."""
    route = _route(request)
    start = time.perf_counter()
    status = 500
    resp: web.StreamResponse | None = None
    HTTP_IN_FLIGHT.inc()
    span = None
    if traces.enabled():
        cm = traces.span(
            f"{route.method} {route.name}",
            kind="server",
            parent=traces.extract(request.headers),
            attributes={"http.request.method": request.method, "http.route": route.name},
        )
        span = cm.__enter__()
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = _CLIENT_GONE
        raise
    finally:
        HTTP_IN_FLIGHT.dec()
        route.count(status)
        route.duration.observe(time.perf_counter() - start)
        received = request.content.total_bytes
        if received:
            route.bytes_in.inc(received)
        sent = _sent(resp)
        if sent:
            route.bytes_out.inc(sent)
        if span is not None:
            span.set_attribute("http.response.status_code", status)
            cm.__exit__(None, None, None)


async def metrics(request: web.Request) -> web.Response:
    """The Prometheus text exposition of every metric (collected in a thread: it stats files)."""
    body = await asyncio.to_thread(generate_latest, REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_metrics_listener(listen: str) -> tuple[web.AppRunner, str]:
    """Serve ``/metrics`` alone on ``listen`` (``host:port`` or a socket path), without auth.

    Returns the runner (``await runner.cleanup()`` stops it) and the URL.
    """
    from tvix_castore.errors import ConfigError
    from tvix_store.nar_bridge.server import parse_listen

    app = web.Application()
    app.router.add_get(METRICS_PATH, metrics, name=METRICS_ROUTE)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    where = parse_listen(listen)
    site: Any
    try:
        if isinstance(where, str):
            site = web.UnixSite(runner, where)
            await site.start()
            url = f"unix:{where}"
        else:
            host, port = where
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
            bound = runner.addresses[0][1]
            url = f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    print(f"metrics listening on {url}{METRICS_PATH}", file=sys.stderr, flush=True)
    return runner, url
