"""``tvix.store.v1.PathInfoService`` over any PathInfoService (a thin adapter).

A path whose content was found damaged (:meth:`NarService.damage`) is
DATA_LOSS on ``Get`` and ``CalculateNAR`` until it is stored whole again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc.aio

from tvix_castore.blobservice.base import BlobService
from tvix_castore.directoryservice.base import DirectoryService
from tvix_castore.errors import CastoreError, DataCorruption, NotFound, ValidationError
from tvix_castore.nodes import DirectoryNode, FileNode, NameRule, Node, node_from_proto
from tvix_castore.protos import castore_pb2
from tvix_castore.rpc.status import abort_with
from tvix_store.content import check_content
from tvix_store.nar.render import NarRenderError
from tvix_store.nar.service import NarService
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.base import PathInfoService
from tvix_store.protos import pathinfo_pb2, rpc_pathinfo_pb2
from tvix_store.protos import rpc_pathinfo_pb2_grpc as pb_grpc
from tvix_store.verify import UploadPolicy, check_metadata

__all__ = ["PathInfoServiceServicer"]

Ctx = grpc.aio.ServicerContext[object, object]


class PathInfoServiceServicer(pb_grpc.PathInfoServiceServicer):
    """Serves Get/Put/CalculateNAR/List.

    ``Put`` validates the PathInfo (B §2.9) and, unless ``metadata_only``,
    that its content is in ``blobs``/``directories`` (A3); then that its
    metadata is true (:mod:`tvix_store.verify`, as ``policy`` says).
    """

    def __init__(
        self,
        pathinfos: PathInfoService,
        blobs: BlobService,
        directories: DirectoryService,
        *,
        metadata_only: bool = False,
        nar: NarService | None = None,
        policy: UploadPolicy | None = None,
    ) -> None:
        self._infos = pathinfos
        self._blobs = blobs
        self._dirs = directories
        self._metadata_only = metadata_only
        self._nar = nar or NarService(blobs, directories)  # CalculateNAR's cache
        self._policy = policy or UploadPolicy()

    async def Get(
        self, request: rpc_pathinfo_pb2.GetPathInfoRequest, context: Ctx
    ) -> pathinfo_pb2.PathInfo:
        if request.WhichOneof("by_what") != "by_output_hash":
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "by_what needs to be specified")
        digest = request.by_output_hash
        try:
            if len(digest) != 20:
                raise ValidationError("invalid output digest length")
            info = await self._infos.get(digest)
            if info is None:
                raise NotFound("PathInfo not found")
            # (as nar-bridge's narinfo 404: a path found damaged is not served as valid)
            reason = await self._nar.damage(info.node)
            if reason is not None:
                raise DataCorruption(f"{info.store_path}: damaged in this store ({reason})")
        except Exception as exc:
            await abort_with(context, exc)
        return info.to_proto()

    async def Put(self, request: pathinfo_pb2.PathInfo, context: Ctx) -> pathinfo_pb2.PathInfo:
        try:
            try:
                info = PathInfo.from_proto(request)
            except ValidationError as exc:
                raise ValidationError(f"Invalid path info: {exc}") from exc
            if not self._metadata_only:
                # (a lease first: what the check finds stays until the put refers to it)
                await asyncio.to_thread(self._blobs.begin_write)
                try:
                    await check_content(info.node, self._blobs, self._dirs)
                except (NotFound, ValidationError) as exc:  # the client's mistake
                    raise ValidationError(f"Invalid path info: {exc}") from exc
            content = None if self._metadata_only else self._nar
            try:
                await check_metadata(info, self._policy, content)
            except ValidationError as exc:
                raise ValidationError(f"Invalid path info: {exc}") from exc
            stored = await self._infos.put(info)
        except Exception as exc:
            await abort_with(context, exc)
        return stored.to_proto()

    async def CalculateNAR(
        self, request: castore_pb2.Node, context: Ctx
    ) -> rpc_pathinfo_pb2.CalculateNARResponse:
        try:
            try:
                node = node_from_proto(request, name_rule=NameRule.EMPTY)
            except CastoreError as exc:
                raise ValidationError(f"invalid root node: {exc}") from exc
            size, sha = await self._nar.calculate(node)
        except NarRenderError as exc:
            await abort_with(context, await self._missing_root(node) or exc)
        except Exception as exc:
            await abort_with(context, exc)
        return rpc_pathinfo_pb2.CalculateNARResponse(nar_size=size, nar_sha256=sha)

    async def _missing_root(self, node: Node) -> NotFound | None:
        """NOT_FOUND if the root the client named is not stored at all.

        Asked only once rendering failed; damage below a stored root stays DATA_LOSS.
        """
        try:
            if isinstance(node, DirectoryNode):
                found = await self._dirs.get(node.digest) is not None or (
                    await self._nar.has_plans(node)
                )  # (a vouched NAR: it was stored, and is lost)
                what = "directory"
            elif isinstance(node, FileNode):
                found = await self._blobs.has(node.digest)
                what = "blob"
            else:
                return None
        except CastoreError:
            return None  # the render error says more
        return None if found else NotFound(f"{what} {node.digest} not found")

    async def List(
        self, request: rpc_pathinfo_pb2.ListPathInfoRequest, context: Ctx
    ) -> AsyncIterator[pathinfo_pb2.PathInfo]:
        try:
            async for info in self._infos.list():
                yield info.to_proto()
        except Exception as exc:
            await abort_with(context, exc)
