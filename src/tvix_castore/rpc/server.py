"""Build and start a ``grpc.aio`` server: our servicers, reflection and health.

Every method decodes its requests through ``rpc.decoding``: garbage is
INVALID_ARGUMENT, not UNKNOWN. Uploads are bounded by ``rpc.streams.UploadLimit``
and a read-ahead of one message per stream.

Binding is strict: ``SO_REUSEPORT`` is off, so a busy port raises instead of
silently sharing it (grpc.aio turns it on by default).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tvix_castore.errors import ConfigError
from tvix_castore.rpc import DEFAULT_MAX_UPLOAD_STREAMS
from tvix_castore.rpc.channel import channel_options
from tvix_castore.rpc.decoding import DecodeErrors
from tvix_castore.rpc.streams import UploadLimit

__all__ = ["Registration", "bind_address", "start_server"]

# How much of a request stream gRPC reads ahead of its handler: one 1 MiB message.
# With BDP probing (the default) the window grew to whole uploads, so a
# stream waiting for its turn (``UploadLimit``) still held all its client sent.
# Loopback throughput of one Put is unchanged (issue 12, item 9).
_READ_AHEAD = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1 << 20)]

Registration = tuple[Callable[[grpc.aio.Server], None], str]
"""How to add one servicer to a server, and its full service name (for reflection)."""


def bind_address(listen: str) -> str:
    """``host:port``, ``[::1]:port``, ``unix:/p``, or an absolute socket path → gRPC form."""
    if listen.startswith("unix:"):
        return listen
    if listen.startswith("/"):
        return f"unix:{listen}"
    if ":" not in listen:
        raise ConfigError(f"listen address {listen!r} needs host:port or an absolute socket path")
    return listen


async def start_server(
    listen: str,
    registrations: Iterable[Registration],
    *,
    max_upload_streams: int = DEFAULT_MAX_UPLOAD_STREAMS,
    interceptors: Sequence[Any] = (),
) -> tuple[grpc.aio.Server, str]:
    """Start a server on ``listen``; return it and the address it actually bound.

    Port 0 picks a free port; the returned address names it. At most
    ``max_upload_streams`` client-streaming calls run at once; others wait.
    ``interceptors`` run first (access checks refuse before anything else).
    """
    options: list[tuple[str, int]] = [
        *channel_options(),
        ("grpc.so_reuseport", 0),
        *_READ_AHEAD,
    ]
    chain = [*interceptors, UploadLimit(max_upload_streams), DecodeErrors()]
    server = grpc.aio.server(options=options, interceptors=chain)
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    for add, name in registrations:
        add(server)
        names.append(name)
    checker = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection(names, server)
    addr = bind_address(listen)
    if addr.startswith("unix:"):
        path = addr[len("unix:") :]
        if os.path.exists(path):
            raise ConfigError(f"socket {path} already exists (another daemon running?)")
    try:
        port = server.add_insecure_port(addr)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc}") from exc
    if not addr.startswith("unix:"):
        host = addr.rsplit(":", 1)[0]
        addr = f"{host}:{port}"
    await server.start()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, addr
