"""gRPC calls counted, timed and traced: a ``grpc.aio`` server interceptor.

:class:`Observe` runs first in the daemon's chain, so calls refused by the
token check are counted too (``UNAUTHENTICATED``/``PERMISSION_DENIED``). A
call's code is what the handler aborted with, ``OK`` when it returned,
``CANCELLED`` when the client went away and ``UNKNOWN`` for any other
exception. With tracing on, each call is a server span whose parent is the
caller's ``traceparent`` metadata. (grpc.aio sends an aborted call's status
before the handler returns: the client may see it a moment before it is counted.)
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio

from tvix_store.telemetry import traces
from tvix_store.telemetry.metrics import GRPC_DURATION, GRPC_REQUESTS, Children

__all__ = ["Observe"]

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]

_COUNTS = Children(GRPC_REQUESTS)
_TIMES = Children(GRPC_DURATION)
_OK = grpc.StatusCode.OK.name


def _code(ctx: Ctx, exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    code = ctx.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if exc is not None and not isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN.name
    return _OK


class _Call:
    """One call's bookkeeping: its labels, start time and span."""

    __slots__ = ("_cm", "_method", "_service", "_span", "_start", "ctx")

    def __init__(self, service: str, method: str, ctx: Ctx) -> None:
        self._service = service
        self._method = method
        self.ctx = ctx
        self._start = time.perf_counter()
        self._cm: Any = None
        self._span: Any = None
        if traces.enabled():
            carrier = {k: v for k, v in ctx.invocation_metadata() or () if isinstance(v, str)}
            self._cm = traces.span(
                f"{service}/{method}",
                kind="server",
                parent=traces.extract(carrier),
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
            )
            self._span = self._cm.__enter__()

    def end(self, exc: BaseException | None) -> None:
        code = _code(self.ctx, exc)
        _COUNTS.get(self._service, self._method, code).inc()
        _TIMES.get(self._service, self._method).observe(time.perf_counter() - self._start)
        if self._cm is not None:
            self._span.set_attribute("rpc.grpc.status_code", code)
            self._cm.__exit__(None, None, None)


def _observed(handler: Handler, service: str, method: str) -> Handler:
    options = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    def wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(request: Any, ctx: Ctx) -> Any:
            c = _Call(service, method, ctx)
            try:
                out = await behavior(request, ctx)
            except BaseException as exc:
                c.end(exc)
                raise
            c.end(None)
            return out

        return call

    def wrap_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):
            return wrap_unary(behavior)  # (it writes with ctx.write)

        async def generate(request: Any, ctx: Ctx) -> AsyncIterator[Any]:
            c = _Call(service, method, ctx)
            try:
                async for response in behavior(request, ctx):
                    yield response
            except BaseException as exc:
                c.end(exc)
                raise
            c.end(None)

        return generate

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary), **options)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream), **options)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary), **options)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream), **options)


class Observe(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts (by service, method, code), times and traces every call."""

    def __init__(self) -> None:
        self._names: dict[str, tuple[str, str]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        full = handler_call_details.method or ""
        if handler is None:
            return handler
        names = self._names.get(full)
        if names is None:  # "/tvix.castore.v1.BlobService/Put" → (service, method)
            service, _, method = full.lstrip("/").rpartition("/")
            names = self._names[full] = (service, method)
        return _observed(handler, *names)
