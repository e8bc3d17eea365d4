"""gRPC channels and servers from our URL forms, with sane message limits."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.aio

from tvix_castore.errors import ConfigError

__all__ = [
    "CHUNK_SIZE",
    "MAX_MESSAGE",
    "add_metadata_source",
    "channel_options",
    "open_channel",
    "target_from_url",
]

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


_sources: list[Callable[[], Iterable[tuple[str, str]]]] = []


def add_metadata_source(source: Callable[[], Iterable[tuple[str, str]]]) -> None:
    """Add ``source()``'s pairs to every call of channels opened from now on.

    The store's tracing passes its ``traceparent`` on this way (castore
    itself knows nothing of traces).
    """
    _sources.append(source)


def _with_metadata(details: Any, pairs: Sequence[tuple[str, str]]) -> Any:
    extra = [*pairs]
    for source in _sources:
        extra += source()
    if not extra:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()), *extra)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


# (grpc.aio files each interceptor under one kind only: one class per kind)
class _MetadataUU(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = pairs

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_metadata(details, self.pairs), request)


class _MetadataUS(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = pairs

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_metadata(details, self.pairs), request)


class _MetadataSU(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = pairs

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_metadata(details, self.pairs), requests)


class _MetadataSS(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = pairs

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_metadata(details, self.pairs), requests)


def _metadata(pairs: Sequence[tuple[str, str]]) -> list[Any]:
    """Interceptors adding ``pairs`` (and the sources' pairs) to every call."""
    return [_MetadataUU(pairs), _MetadataUS(pairs), _MetadataSU(pairs), _MetadataSS(pairs)]


def open_channel(url: str) -> grpc.aio.Channel:
    """An asyncio channel for ``url`` (connects lazily).

    With ``TVIX_STORE_TOKEN`` set, every call carries it as a bearer token;
    every call carries the pairs of the :func:`add_metadata_source` sources.
    """
    target, tls = target_from_url(url)
    token = os.environ.get("TVIX_STORE_TOKEN", "").strip()
    pairs = [("authorization", f"Bearer {token}")] if token else []
    interceptors = _metadata(pairs) if pairs or _sources else None
    if tls:
        return grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(), channel_options(), interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, channel_options(), interceptors=interceptors)
