"""Tokens on the daemon's gRPC services: a server interceptor, not code in each method.

Once the store enforces tokens (:mod:`tvix_store.tokens`), every ``Put``
(blobs, Directories, PathInfos) needs a token with scope ``push``; reads
need ``pull`` only with ``private_reads``. The token comes as
``authorization: Bearer <token>`` metadata (``TVIX_STORE_TOKEN`` on our
clients). Health and reflection stay open.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
import grpc.aio

from tvix_castore.errors import CastoreError
from tvix_castore.rpc.status import code_for
from tvix_store.tokens import AccessDenied, TokenAuthority, Unauthenticated

__all__ = ["TokenCheck", "bearer"]

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
_OPEN = ("/grpc.health.", "/grpc.reflection.")


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization`` value (``Bearer …``), else ``None``."""
    if value is None:
        return None
    kind, _, token = value.strip().partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization must be 'Bearer <token>'")
    return token.strip()


def _denied(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler of ``handler``'s kind that only refuses."""

    async def refuse(_request: Any, ctx: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await ctx.abort(code, message)

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse)


class TokenCheck(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls without the token their method needs (UNAUTHENTICATED / PERMISSION_DENIED)."""

    def __init__(self, authority: TokenAuthority, private_reads: bool = False) -> None:
        self.authority = authority
        self.private_reads = private_reads

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(_OPEN):
            return handler
        write = method.rpartition("/")[2] == "Put"
        value = None
        for key, val in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                value = val if isinstance(val, str) else val.decode(errors="replace")
        try:
            needed = self.authority.enforced() and (write or self.private_reads)
            self.authority.authorize(bearer(value), "push" if write else "pull", "", needed)
        except AccessDenied as exc:
            code = (
                grpc.StatusCode.UNAUTHENTICATED
                if isinstance(exc, Unauthenticated)
                else grpc.StatusCode.PERMISSION_DENIED
            )
            return _denied(handler, code, str(exc))
        except CastoreError as exc:  # (the token tables unreachable: a shared store's database)
            return _denied(handler, code_for(exc), str(exc))
        return handler
