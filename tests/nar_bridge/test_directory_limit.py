"""The largest Directory a store accepts is one every gRPC client can fetch (issue 12, item 10).

A Directory must encode to less than ``MAX_DIRECTORY_BYTES`` (4 MiB, the gRPC
message limit). Through ``tvix-store daemon --nar-bridge``: a NAR whose
directory is just under it is accepted and its Directory fetched over gRPC
(Get and recursive Get); one entry more is refused with 400 naming the
directory and the limit, through nar-bridge and through gRPC Put alike.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import pytest

from nix_compat import nixbase32
from nix_compat.nar import dump_path
from tvix_castore.digests import EMPTY_DIGEST
from tvix_castore.nodes import Directory, DirectoryNode, FileNode
from tvix_castore.protos import rpc_directory_pb2 as dpb
from tvix_castore.protos import rpc_directory_pb2_grpc as dpb_grpc
from tvix_castore.rpc.channel import channel_options

from .conftest import Bridges

MAX_DIRECTORY_BYTES = 4 << 20  # tvix_castore.nodes.MAX_DIRECTORY_BYTES, as documented
NAME = 100  # bytes per file name: each entry of empty files then encodes to the same size


def _name(i: int) -> bytes:
    return b"%08d" % i + b"x" * (NAME - 8)


def _directory(n: int) -> Directory:
    return Directory(files=tuple(FileNode(_name(i), EMPTY_DIGEST, 0) for i in range(n)))


def _largest() -> int:
    """Entries of the largest accepted directory of such files."""
    entry = len(_directory(1).encode())
    n = (MAX_DIRECTORY_BYTES - 1) // entry
    assert len(_directory(n).encode()) < MAX_DIRECTORY_BYTES <= len(_directory(n + 1).encode())
    return n


def _nar_of(tmp: Path, n: int) -> bytes:
    root = tmp / f"dir-{n}"
    root.mkdir()
    for i in range(n):
        (root / os.fsdecode(_name(i))).touch()
    out = io.BytesIO()
    dump_path(root, out)
    return out.getvalue()


async def _put_nar(session: aiohttp.ClientSession, url: str, nar: bytes) -> tuple[int, str]:
    name = nixbase32.encode(hashlib.sha256(nar).digest())
    async with session.put(f"{url}/nar/{name}.nar", data=io.BytesIO(nar)) as resp:
        return resp.status, await resp.text()


async def test_largest_directory_round_trips_and_one_more_entry_is_refused(
    bridges: Bridges, tmp_path: Path
) -> None:
    daemon = bridges.start_daemon()
    assert daemon.grpc_addr is not None
    n = _largest()
    largest, over = _directory(n), _directory(n + 1)
    async with aiohttp.ClientSession() as session:
        status, text = await _put_nar(session, daemon.url, _nar_of(tmp_path, n))
        assert status == 200, text
        status, text = await _put_nar(session, daemon.url, _nar_of(tmp_path, n + 1))
    assert status == 400, text
    assert "directory too large" in text and str(MAX_DIRECTORY_BYTES) in text, text
    assert str(over.digest) in text and f"{n + 1} entries" in text, text

    async with grpc.aio.insecure_channel(daemon.grpc_addr, options=channel_options()) as ch:
        stub = dpb_grpc.DirectoryServiceStub(ch)
        for recursive in (False, True):
            req = dpb.GetDirectoryRequest(digest=largest.digest.raw, recursive=recursive)
            got = [Directory.from_proto(m) async for m in stub.Get(req)]
            assert got == [largest]
        parent = Directory(directories=(DirectoryNode(b"big", largest.digest, n),))
        resp = await stub.Put(iter([largest.to_proto(), parent.to_proto()]))
        assert resp.root_digest == parent.digest.raw
        req = dpb.GetDirectoryRequest(digest=parent.digest.raw, recursive=True)
        assert [Directory.from_proto(m) async for m in stub.Get(req)] == [parent, largest]

        # over the limit (but within the message limit): INVALID_ARGUMENT, nothing stored
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Put(iter([over.to_proto()]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        details = info.value.details() or ""
        assert "directory too large" in details and str(MAX_DIRECTORY_BYTES) in details
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [m async for m in stub.Get(dpb.GetDirectoryRequest(digest=over.digest.raw))]
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value
