"""gRPC channels and servers from our URL forms, with sane message limits."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.aio

from tvix_castore.errors import ConfigError

__all__ = ["CHUNK_SIZE", "MAX_MESSAGE", "channel_options", "open_channel", "target_from_url"]

CHUNK_SIZE = 1 << 20  # blob bytes per message: the loopback sweet spot
MAX_MESSAGE = (4 << 20) + (64 << 10)  # 4 MiB payload + framing (SPEC A1.5)


def channel_options(max_message: int = MAX_MESSAGE) -> list[tuple[str, int]]:
    """Options for both channels and servers."""
    return [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
    ]


def target_from_url(url: str) -> tuple[str, bool]:
    """``grpc+http://host:port`` → (``host:port``, tls); ``grpc+unix:///p`` → ``unix:/p``."""
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme == "grpc+unix":
        if parts.netloc:
            raise ConfigError(f"{url}: grpc+unix URLs take no host (use grpc+unix:///abs/path)")
        if not parts.path.startswith("/"):
            raise ConfigError(f"{url}: socket path must be absolute")
        return f"unix:{parts.path}", False
    if scheme in ("grpc+http", "grpc+https"):
        if not parts.netloc:
            raise ConfigError(f"{url}: missing host")
        if parts.path not in ("", "/"):
            raise ConfigError(f"{url}: gRPC URLs take no path")
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "grpc+https" else 80)
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{port}", scheme == "grpc+https"
    raise ConfigError(f"{url}: not a gRPC URL (grpc+http, grpc+https, grpc+unix)")


def _with_token(details: Any, pair: tuple[str, str]) -> Any:
    metadata = grpc.aio.Metadata(*(details.metadata or ()), pair)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


# (grpc.aio files each interceptor under one kind only: one class per kind)
class _BearerUU(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, pair: tuple[str, str]) -> None:
        self.pair = pair

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self.pair), request)


class _BearerUS(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, pair: tuple[str, str]) -> None:
        self.pair = pair

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self.pair), request)


class _BearerSU(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, pair: tuple[str, str]) -> None:
        self.pair = pair

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self.pair), requests)


class _BearerSS(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, pair: tuple[str, str]) -> None:
        self.pair = pair

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self.pair), requests)


def _bearer(token: str) -> list[Any]:
    """Interceptors adding ``authorization: Bearer <token>`` to every call."""
    pair = ("authorization", f"Bearer {token}")
    return [_BearerUU(pair), _BearerUS(pair), _BearerSU(pair), _BearerSS(pair)]


def open_channel(url: str) -> grpc.aio.Channel:
    """An asyncio channel for ``url`` (connects lazily).

    With ``TVIX_STORE_TOKEN`` set, every call carries it as a bearer token.
    """
    target, tls = target_from_url(url)
    token = os.environ.get("TVIX_STORE_TOKEN", "").strip()
    interceptors = _bearer(token) if token else None
    if tls:
        return grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(), channel_options(), interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, channel_options(), interceptors=interceptors)
