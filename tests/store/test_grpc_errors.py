"""Client mistakes against a real ``tvix-store daemon`` get the client's status codes.

Undecodable protobuf in any request of any method is INVALID_ARGUMENT naming
the message type (issue 12, item 10); a message that does decode still works.
"""

from __future__ import annotations

import blake3
import grpc
import grpc.aio
import pytest

from tvix_castore.protos import castore_pb2 as cpb
from tvix_castore.protos import rpc_blobstore_pb2 as bpb
from tvix_castore.protos import rpc_directory_pb2 as dpb
from tvix_castore.rpc.channel import channel_options

from .conftest import Daemon

Code = grpc.StatusCode
GARBAGE = b"\xff\xff\xff\xff\xff"  # field 0x1fffffff... with a truncated varint tag

# (method path, streams its requests, the request message type)
METHODS = [
    ("/tvix.castore.v1.BlobService/Stat", False, "StatBlobRequest"),
    ("/tvix.castore.v1.BlobService/Read", False, "ReadBlobRequest"),
    ("/tvix.castore.v1.BlobService/Put", True, "BlobChunk"),
    ("/tvix.castore.v1.DirectoryService/Get", False, "GetDirectoryRequest"),
    ("/tvix.castore.v1.DirectoryService/Put", True, "Directory"),
    ("/tvix.store.v1.PathInfoService/Get", False, "GetPathInfoRequest"),
    ("/tvix.store.v1.PathInfoService/Put", False, "PathInfo"),
    ("/tvix.store.v1.PathInfoService/CalculateNAR", False, "Node"),
    ("/tvix.store.v1.PathInfoService/List", False, "ListPathInfoRequest"),
]


def _streams_responses(path: str) -> bool:
    return path.rsplit("/", 1)[1] in {"Read", "List"} or path.endswith("DirectoryService/Get")


async def _call(ch: grpc.aio.Channel, path: str, streaming: bool, *requests: bytes) -> list[bytes]:
    """Call ``path`` with raw request bytes; the raw responses."""
    if streaming:
        return [await ch.stream_unary(path, None, None)(iter(requests))]
    (request,) = requests
    if _streams_responses(path):
        return [r async for r in ch.unary_stream(path, None, None)(request)]
    return [await ch.unary_unary(path, None, None)(request)]


@pytest.mark.parametrize(("path", "streaming", "message"), METHODS)
async def test_undecodable_request_is_invalid_argument(
    daemon: Daemon, path: str, streaming: bool, message: str
) -> None:
    async with grpc.aio.insecure_channel(daemon.target, options=channel_options()) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(ch, path, streaming, GARBAGE)
        assert info.value.code() == Code.INVALID_ARGUMENT, info.value
        assert f"cannot decode the {message} message" in (info.value.details() or "")


async def test_garbage_after_good_stream_messages_commits_nothing(daemon: Daemon) -> None:
    leaf = cpb.Directory(symlinks=[cpb.SymlinkNode(name=b"a", target=b"b")])
    path = "/tvix.castore.v1.DirectoryService/Put"
    async with grpc.aio.insecure_channel(daemon.target, options=channel_options()) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(ch, path, True, leaf.SerializeToString(), GARBAGE)
        assert info.value.code() == Code.INVALID_ARGUMENT, info.value
        assert "cannot decode the Directory message" in (info.value.details() or "")
        get = ch.unary_stream("/tvix.castore.v1.DirectoryService/Get", None, None)
        req = dpb.GetDirectoryRequest(digest=blake3.blake3(leaf.SerializeToString()).digest())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [r async for r in get(req.SerializeToString())]
        assert info.value.code() == Code.NOT_FOUND, info.value
        # the same bytes without the garbage are accepted: decoding in the handler works
        (raw,) = await _call(ch, path, True, leaf.SerializeToString())
        assert dpb.PutDirectoryResponse.FromString(raw).root_digest == req.digest
        blob = bpb.BlobChunk(data=b"x").SerializeToString()
        (raw,) = await _call(ch, "/tvix.castore.v1.BlobService/Put", True, blob)
        assert len(bpb.PutBlobResponse.FromString(raw).digest) == 32
