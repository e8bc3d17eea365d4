"""The one table between our errors and gRPC status codes (SPEC A2).

Servers call :func:`abort_with` for any exception; clients call
:func:`from_rpc_error` to turn a failed call back into our error classes.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
import grpc.aio

from tvix_castore.errors import (
    CastoreError,
    DataCorruption,
    NotFound,
    StorageError,
    StorageFull,
    StorageUnavailable,
    ValidationError,
)

__all__ = ["abort_with", "code_for", "from_rpc_error"]

_NO_SPACE = "no space left on device"  # in every StorageFull message

# Most specific first.
_TABLE: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (DataCorruption, grpc.StatusCode.DATA_LOSS),
    (StorageUnavailable, grpc.StatusCode.UNAVAILABLE),
    (StorageFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StorageError, grpc.StatusCode.INTERNAL),
]


def code_for(exc: BaseException) -> grpc.StatusCode:
    """The status code reported for ``exc``."""
    for cls, code in _TABLE:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


async def abort_with(
    context: grpc.aio.ServicerContext[object, object], exc: BaseException
) -> NoReturn:
    """Abort the call with the status that ``exc`` maps to."""
    code = code_for(exc)
    message = str(exc) if isinstance(exc, CastoreError) else f"internal error: {exc!r}"
    await context.abort(code, message)
    raise AssertionError("unreachable")  # pragma: no cover  (abort raises)


def from_rpc_error(exc: grpc.aio.AioRpcError, what: str) -> CastoreError:
    """Our error for a failed call; ``what`` names the operation for the message."""
    code = exc.code()
    msg = f"{what}: {code.name}: {exc.details()}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValidationError(msg)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(msg)
    if code == grpc.StatusCode.DATA_LOSS:
        return DataCorruption(msg)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return StorageUnavailable(msg)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and _NO_SPACE in (exc.details() or ""):
        # gRPC uses the code for oversized messages too: only a server's full disk
        # (its StorageFull message) is one here.
        return StorageFull(what, None, message=msg)
    return StorageError(msg)
