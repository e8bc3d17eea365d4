"""Requests that do not decode are the client's mistake: INVALID_ARGUMENT.

grpc.aio decodes a unary request before any handler runs and reports a
``DecodeError`` as UNKNOWN; in a request stream the error surfaces inside the
handler as an unexpected exception (INTERNAL). :class:`DecodeErrors`, a
server interceptor, hands every method its raw bytes instead and decodes them
itself, so an undecodable message becomes a :class:`ValidationError` naming
the message type, which ``rpc.status`` maps to INVALID_ARGUMENT.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio

from tvix_castore.errors import ValidationError
from tvix_castore.rpc.status import abort_with

__all__ = ["DecodeErrors"]

if TYPE_CHECKING:  # (generic in the stubs only, which type the sync server's handlers)
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Ctx: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Decode = Callable[[bytes], Any]
Behavior = Callable[..., Any]


def _decode(decode: Decode, raw: bytes) -> Any:
    try:
        return decode(raw)
    except Exception as exc:  # DecodeError, or whatever a deserializer raises
        what = getattr(getattr(decode, "__self__", None), "__name__", "request")
        raise ValidationError(f"cannot decode the {what} message: {exc}") from exc


async def _decoded(requests: AsyncIterator[bytes], decode: Decode) -> AsyncIterator[Any]:
    async for raw in requests:
        yield _decode(decode, raw)


def _streaming(
    behavior: Callable[..., Any], prepare: Callable[[Any, Ctx], Awaitable[Any]]
) -> Callable[..., Any]:
    """``behavior``, its request prepared by ``prepare`` first.

    Handlers stream responses as async generators or write with ``context.write``.
    """
    if inspect.isasyncgenfunction(behavior):

        async def generate(request: Any, ctx: Ctx) -> AsyncIterator[Any]:
            async for response in behavior(await prepare(request, ctx), ctx):
                yield response

        return generate

    async def write(request: Any, ctx: Ctx) -> Any:
        return await behavior(await prepare(request, ctx), ctx)

    return write


def _strict(handler: Handler, decode: Decode) -> Handler:
    """``handler`` taking raw bytes and decoding them with ``decode``."""

    async def one(raw: bytes, ctx: Ctx) -> Any:
        try:
            return _decode(decode, raw)
        except ValidationError as exc:
            await abort_with(ctx, exc)

    async def many(requests: AsyncIterator[bytes], ctx: Ctx) -> AsyncIterator[Any]:
        return _decoded(requests, decode)  # errors raised in the handler's loop

    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        unary_unary: Behavior = handler.unary_unary

        async def uu(raw: bytes, ctx: Ctx) -> Any:
            return await unary_unary(await one(raw, ctx), ctx)

        return grpc.unary_unary_rpc_method_handler(uu, response_serializer=serialize)
    if handler.unary_stream is not None:
        us = _streaming(handler.unary_stream, one)
        return grpc.unary_stream_rpc_method_handler(us, response_serializer=serialize)
    if handler.stream_unary is not None:
        stream_unary: Behavior = handler.stream_unary

        async def su(requests: AsyncIterator[bytes], ctx: Ctx) -> Any:
            return await stream_unary(await many(requests, ctx), ctx)

        return grpc.stream_unary_rpc_method_handler(su, response_serializer=serialize)
    assert handler.stream_stream is not None
    ss = _streaming(handler.stream_stream, many)
    return grpc.stream_stream_rpc_method_handler(ss, response_serializer=serialize)


class DecodeErrors(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Decode requests inside the handler, so a bad one gets INVALID_ARGUMENT."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        decode = None if handler is None else handler.request_deserializer
        if handler is None or decode is None:
            return handler
        return _strict(handler, decode)
