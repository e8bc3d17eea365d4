"""Client-streaming calls: commit only what a client finished sending.

grpc.aio ends a servicer's request iterator in the same way whether the
client half-closed the stream (it sent everything) or cancelled it, or died
and its connection dropped: the failed read of a cancelled call is reported
as end-of-stream, and ``context.cancelled()`` is still false at that point.
A Put that committed on end-of-stream would store a closure the client never
finished (issue 12, item 5).

What tells the two apart is the call itself: core has already failed a
cancelled call when its last read comes back, so any further operation on it
fails too, while a half-closed call still waits for its response. So after
the iterator ends, :func:`require_half_close` sends the response headers;
on an abandoned call that raises (``CancelledError`` once grpc.aio cancels
the handler, or the failed batch), and the caller's commit never runs.
"""

from __future__ import annotations

import grpc.aio

__all__ = ["require_half_close"]


async def require_half_close(context: grpc.aio.ServicerContext[object, object]) -> None:
    """Return only if the client half-closed its request stream; raise if it left.

    Call it after the request iterator ended, before committing anything.
    """
    await context.send_initial_metadata(())
