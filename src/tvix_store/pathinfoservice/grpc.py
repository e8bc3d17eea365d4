"""``grpc+http://``, ``grpc+https://``, ``grpc+unix://``: a remote PathInfoService.

Everything received is validated as a PathInfo and must be for the digest
asked for. ``calculate_nar`` uses the server's ``CalculateNAR``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import grpc.aio

from tvix_castore.errors import DataCorruption, ValidationError
from tvix_castore.nodes import Node, node_to_proto
from tvix_castore.rpc.channel import open_channel
from tvix_castore.rpc.status import from_rpc_error
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.base import PathInfoService
from tvix_store.protos import rpc_pathinfo_pb2 as pb
from tvix_store.protos import rpc_pathinfo_pb2_grpc as pb_grpc

__all__ = ["GrpcPathInfoService"]


class GrpcPathInfoService(PathInfoService):
    """A PathInfoService spoken over gRPC."""

    def __init__(self, channel: grpc.aio.Channel, *, own_channel: bool = True) -> None:
        self._channel = channel
        self._own = own_channel
        self._stub: pb_grpc.PathInfoServiceAsyncStub = pb_grpc.PathInfoServiceStub(channel)

    @classmethod
    def from_url(cls, url: str) -> GrpcPathInfoService:
        """Connect (lazily) to a gRPC URL."""
        return cls(open_channel(url))

    async def aclose(self) -> None:
        if self._own:
            await self._channel.close(None)

    @staticmethod
    def _check(msg: object, digest: bytes | None) -> PathInfo:
        try:
            info = PathInfo.from_proto(msg)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise DataCorruption(f"server sent an invalid PathInfo: {exc}") from exc
        if digest is not None and info.digest != digest:
            raise DataCorruption(f"asked for {digest.hex()}, server sent {info.store_path}")
        return info

    async def get(self, digest: bytes) -> PathInfo | None:
        try:
            msg = await self._stub.Get(pb.GetPathInfoRequest(by_output_hash=digest))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise from_rpc_error(exc, f"get path info {digest.hex()}") from exc
        return self._check(msg, digest)

    async def put(self, info: PathInfo) -> PathInfo:
        try:
            msg = await self._stub.Put(info.to_proto())
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, f"put {info.store_path}") from exc
        return self._check(msg, info.digest)

    async def list(self) -> AsyncIterator[PathInfo]:
        call = self._stub.List(pb.ListPathInfoRequest())
        try:
            async for msg in call:
                yield self._check(msg, None)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "list path infos") from exc
        finally:
            call.cancel()

    async def calculate_nar(self, node: Node) -> tuple[int, bytes]:
        """NAR size and sha256 of ``node``, rendered by the server."""
        try:
            resp = await self._stub.CalculateNAR(node_to_proto(node.with_name(b"")))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "calculate NAR") from exc
        if len(resp.nar_sha256) != 32:
            raise DataCorruption("server sent a NAR sha256 of the wrong length")
        return resp.nar_size, resp.nar_sha256
