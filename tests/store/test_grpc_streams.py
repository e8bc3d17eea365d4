"""Upload streams against a real ``tvix-store daemon``: cut streams commit nothing.

A client that sends a leaf and its parent and then cancels, or is killed,
without half-closing must leave neither stored (issue 12, item 5); the same
messages half-closed are committed. Many concurrent uploads take bounded
memory, given back once they end (item 9).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import blake3
import grpc
import grpc.aio

from tvix_castore.protos import castore_pb2 as cpb
from tvix_castore.protos import rpc_blobstore_pb2 as bpb
from tvix_castore.protos import rpc_blobstore_pb2_grpc as bpb_grpc
from tvix_castore.protos import rpc_directory_pb2 as dpb
from tvix_castore.protos import rpc_directory_pb2_grpc as dpb_grpc
from tvix_castore.rpc.channel import channel_options

from .conftest import Daemon, start_daemon

Code = grpc.StatusCode


def _closure(tag: str) -> tuple[cpb.Directory, cpb.Directory]:
    """A leaf and its parent, unique to ``tag``."""
    leaf = cpb.Directory(
        symlinks=[cpb.SymlinkNode(name=f"link-{tag}".encode(), target=b"/somewhere")]
    )
    raw = leaf.SerializeToString(deterministic=True)
    parent = cpb.Directory(
        directories=[
            cpb.DirectoryNode(
                name=b"child", digest=blake3.blake3(raw).digest(), size=len(leaf.symlinks)
            )
        ]
    )
    return leaf, parent


def _digest(msg: cpb.Directory) -> bytes:
    return blake3.blake3(msg.SerializeToString(deterministic=True)).digest()


def _rx_queues(port: int) -> list[int]:
    """Receive-queue bytes of the daemon's established loopback connections on ``port``."""
    queues = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, queue = fields[1], fields[3], fields[4]
            if int(local.rsplit(":", 1)[1], 16) == port and state == "01":
                queues.append(int(queue.split(":")[1], 16))
    return queues


def wait_read_by_daemon(daemon: Daemon, timeout: float = 20) -> None:
    """Wait until the daemon has read everything clients sent it (kernel queues empty)."""
    port = int(daemon.addr.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queues = _rx_queues(port)
        if queues and not any(queues):
            return
        time.sleep(0.01)
    raise AssertionError(f"daemon did not read its connections: {_rx_queues(port)}")


async def absent_for(daemon: Daemon, *msgs: cpb.Directory, settle: float = 1.0) -> None:
    """Each of ``msgs`` stays NOT_FOUND (checked repeatedly while a cut stream would commit)."""
    async with grpc.aio.insecure_channel(daemon.target, options=channel_options()) as ch:
        stub = dpb_grpc.DirectoryServiceStub(ch)
        deadline = time.monotonic() + settle
        while True:
            for msg in msgs:
                req = dpb.GetDirectoryRequest(digest=_digest(msg))
                try:
                    got = [m async for m in stub.Get(req)]
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == Code.NOT_FOUND, exc
                else:
                    raise AssertionError(f"a cut stream was committed: {got}")
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.05)


async def test_cancelled_directory_put_commits_nothing(daemon: Daemon) -> None:
    leaf, parent = _closure("cancelled")
    async with grpc.aio.insecure_channel(daemon.target, options=channel_options()) as ch:
        call = dpb_grpc.DirectoryServiceStub(ch).Put(None)  # written with call.write()
        await call.write(leaf)
        await call.write(parent)
        await asyncio.to_thread(wait_read_by_daemon, daemon)
        call.cancel()
        assert call.cancelled()
    await absent_for(daemon, leaf, parent)

    # the same stream half-closed is committed
    async with grpc.aio.insecure_channel(daemon.target, options=channel_options()) as ch:
        stub = dpb_grpc.DirectoryServiceStub(ch)
        resp = await stub.Put(iter([leaf, parent]))
        assert resp.root_digest == _digest(parent)
        req = dpb.GetDirectoryRequest(digest=_digest(parent), recursive=True)
        assert [m async for m in stub.Get(req)] == [parent, leaf]


_CLIENT = """
import sys, time, grpc
from tvix_castore.protos import castore_pb2 as cpb
from tvix_castore.protos import rpc_directory_pb2_grpc as dpb_grpc
msgs = [cpb.Directory.FromString(bytes.fromhex(h)) for h in sys.argv[2:]]
def requests():
    yield from msgs
    print("sent", flush=True)
    time.sleep(3600)  # never half-closes
ch = grpc.insecure_channel(sys.argv[1])
call = dpb_grpc.DirectoryServiceStub(ch).Put.future(requests())  # kept: a dropped future cancels
time.sleep(3600)
"""


async def test_killed_client_directory_put_commits_nothing(daemon: Daemon) -> None:
    leaf, parent = _closure("killed")
    args = [m.SerializeToString().hex() for m in (leaf, parent)]
    client = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, daemon.target, *args], stdout=subprocess.PIPE
    )
    try:
        assert client.stdout is not None
        assert await asyncio.to_thread(client.stdout.readline) == b"sent\n"
        await asyncio.to_thread(wait_read_by_daemon, daemon)
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()
        if client.stdout is not None:
            client.stdout.close()
    await absent_for(daemon, leaf, parent)


async def test_cancelled_blob_put_stores_nothing(daemon: Daemon) -> None:
    data = b"half a blob " * 5_000  # packed in one write on close
    async with grpc.aio.insecure_channel(daemon.target, options=channel_options()) as ch:
        stub = bpb_grpc.BlobServiceStub(ch)
        call = stub.Put(None)  # written with call.write()
        await call.write(bpb.BlobChunk(data=data))
        await asyncio.to_thread(wait_read_by_daemon, daemon)
        call.cancel()
        req = bpb.StatBlobRequest(digest=blake3.blake3(data).digest())
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                await stub.Stat(req)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == Code.NOT_FOUND, exc
            else:
                raise AssertionError("a cut blob stream was stored")
            await asyncio.sleep(0.05)


def _vm(pid: int, field: str) -> int:
    """``VmRSS``/``VmHWM`` of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


STREAMS, MESSAGES, LIMIT = 100, 3, 8
MiB = 1 << 20


async def test_upload_streams_are_bounded_and_memory_comes_back(tmp_path: Path) -> None:
    """100 Put streams of 3 MiB held open: the daemon holds ~1 MiB per waiting stream.

    At most ``--max-concurrent-streams`` run (each holding a few MiB of buffers);
    the others wait, gRPC reading only one message ahead for them. Once all
    have ended, the daemon's RSS returns close to where it started.
    """
    daemon = start_daemon(
        tmp_path / "home", tmp_path / "daemon.log", "127.0.0.1:0",
        "--max-concurrent-streams", str(LIMIT),
    )  # fmt: skip
    pid = daemon.proc.pid
    try:
        idle = _vm(pid, "VmRSS")
        body = os.urandom(MiB - 16)
        release = asyncio.Event()
        written = 0
        channels = [
            grpc.aio.insecure_channel(daemon.target, options=channel_options()) for _ in range(4)
        ]

        async def upload(i: int) -> bytes:
            nonlocal written
            call = bpb_grpc.BlobServiceStub(channels[i % 4]).Put(None)
            for j in range(MESSAGES):
                await call.write(bpb.BlobChunk(data=f"{i:8}{j:8}".encode() + body))
            written += 1
            await release.wait()
            await call.done_writing()
            return (await call).digest

        tasks = [asyncio.create_task(upload(i)) for i in range(STREAMS)]
        deadline = time.monotonic() + 60
        while written < LIMIT:  # the running ones have sent everything
            assert time.monotonic() < deadline, f"only {written} streams got through"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(wait_read_by_daemon, daemon)
        held = _vm(pid, "VmRSS") - idle
        bound = STREAMS * 2 * MiB + LIMIT * 8 * MiB  # base: ~7 MiB per stream
        assert held < bound, f"{held / MiB:.0f} MiB held by {STREAMS} streams"

        release.set()
        digests = await asyncio.gather(*tasks)
        assert len(set(digests)) == STREAMS
        for ch in channels:
            await ch.close(None)
        peak = _vm(pid, "VmHWM") - idle
        assert peak < bound, f"peak {peak / MiB:.0f} MiB"
        deadline = time.monotonic() + 10  # freed memory goes back once uploads stop
        while (after := _vm(pid, "VmRSS") - idle) > 64 * MiB:
            assert time.monotonic() < deadline, f"{after / MiB:.0f} MiB still held"
            await asyncio.sleep(0.1)
    finally:
        daemon.stop()
