"""``tvix-store daemon --nar-bridge``: gRPC and the binary cache from one process, one store."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nix_compat.narinfo import NarInfo
from tvix_castore.rpc.channel import channel_options
from tvix_store.protos import rpc_pathinfo_pb2, rpc_pathinfo_pb2_grpc

from .conftest import Bridges, Closure, Keys, copy_to, nix_in, store_rows


async def test_daemon_serves_grpc_and_nar_bridge(
    bridges: Bridges, closure: Closure, keys: Keys, tmp_path: Path
) -> None:
    d = bridges.start_daemon(None, "--priority", "23", "--signing-key", str(keys.one.secret_file))
    assert d.grpc_addr is not None
    async with grpc.aio.insecure_channel(d.grpc_addr, options=channel_options()) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        async with aiohttp.ClientSession() as session:
            async with session.get(f"{d.url}/nix-cache-info") as resp:
                assert resp.status == 200
                assert "Priority: 23\n" in await resp.text()

            # What Nix uploads over HTTP is what gRPC clients see.
            copy_to(nix_in(tmp_path), closure, f"{d.url}?compression=xz")
            n = len(closure.paths)
            assert store_rows(d.home) == (n, n)
            top = closure.by_name("top")
            async with session.get(f"{d.url}/{top.hash_part}.narinfo") as resp:
                assert resp.status == 200
                assert NarInfo.parse(await resp.read()).verify([keys.one.verifying])

        pathinfos = rpc_pathinfo_pb2_grpc.PathInfoServiceStub(channel)
        info = await pathinfos.Get(
            rpc_pathinfo_pb2.GetPathInfoRequest(by_output_hash=top.store_path.digest), timeout=60
        )
        assert info.narinfo.nar_size == len(top.nar)
        assert info.narinfo.nar_sha256 == top.nar_hash
        assert sorted(info.narinfo.reference_names) == sorted(
            r.rsplit("/", 1)[1] for r in top.references
        )
