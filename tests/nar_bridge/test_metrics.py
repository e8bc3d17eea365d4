"""``/metrics`` of real bridges and daemons: values change as known requests say they must.

Each test scrapes before and after and compares the two (the counters of a
process start at zero, but comparing keeps each check about its own request).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import aiohttp
import grpc
from prometheus_client.parser import text_string_to_metric_families

from nix_compat import nixbase32
from nix_compat.nar import dump_path
from nix_compat.narinfo import NarInfo
from nix_compat.store_path import StorePath
from tvix_castore.protos import rpc_blobstore_pb2, rpc_blobstore_pb2_grpc

from .conftest import TVIX, Bridges, tvix_env

Sample = tuple[str, tuple[tuple[str, str], ...]]
_METRICS_LISTENING = re.compile(r"metrics listening on (http://\S+)/metrics")


async def scrape(url: str) -> dict[Sample, float]:
    """Every sample of ``url``/metrics by (name, sorted labels)."""
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def settled(url: str, done: Callable[[dict[Sample, float]], bool]) -> dict[Sample, float]:
    """A scrape where ``done`` holds, after a few tries.

    The last bytes of a streamed response (and the status of an aborted gRPC
    call) reach the client before the server's handler has returned and
    counted it: a scrape right after may come a moment early.
    """
    for _ in range(200):
        samples = await scrape(url)
        if done(samples):
            break
        await asyncio.sleep(0.01)
    return samples


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def make_nar(tmp: Path, seed: int, size: int = 300_000) -> bytes:
    """The NAR of a directory with one file of ``size`` pseudo-random bytes (several chunks)."""
    root = tmp / f"tree-{seed}"
    root.mkdir()
    (root / "data").write_bytes(hashlib.shake_256(str(seed).encode()).digest(size))
    (root / "small").write_bytes(b"small file %d\n" % seed)
    sink = io.BytesIO()
    dump_path(root, sink)
    return sink.getvalue()


async def put_nar(url: str, nar: bytes) -> int:
    name = nixbase32.encode(hashlib.sha256(nar).digest())
    async with aiohttp.ClientSession() as s, s.put(f"{url}/nar/{name}.nar", data=nar) as r:
        return r.status


async def get(url: str, path: str, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as s, s.get(url + path, headers=headers) as r:
        await r.read()
        return r.status


_NARINFO_404 = {"route": "/{hash}.narinfo", "method": "GET", "status": "404"}


async def test_http_requests_bytes_and_dedup(bridges: Bridges, tmp_path: Path) -> None:
    bridge = bridges.start()
    before = await scrape(bridge.url)
    assert await get(bridge.url, "/" + "0" * 32 + ".narinfo") == 404
    after = await scrape(bridge.url)
    total = "tvix_store_http_requests_total"
    assert value(after, total, **_NARINFO_404) - value(before, total, **_NARINFO_404) == 1
    # The route label is the template, whatever the hash asked for.
    assert await get(bridge.url, "/" + "1" * 32 + ".narinfo") == 404
    again = await scrape(bridge.url)
    assert value(again, total, **_NARINFO_404) - value(after, total, **_NARINFO_404) == 1
    assert not [k for k in again if "1" * 32 in str(k)]
    assert value(again, "tvix_store_http_request_duration_seconds_count",
                 route="/{hash}.narinfo", method="GET") >= 2  # fmt: skip

    nar = make_nar(tmp_path, 1)
    route = {"route": "/nar/{name}", "method": "PUT"}
    received, stored = "tvix_store_blob_received_bytes_total", "tvix_store_blob_stored_bytes_total"
    first = await scrape(bridge.url)
    assert await put_nar(bridge.url, nar) == 200
    second = await scrape(bridge.url)
    assert value(second, "tvix_store_http_request_bytes_total", **route) - value(
        first, "tvix_store_http_request_bytes_total", **route
    ) >= len(nar)
    assert (
        value(second, total, status="200", **route) - value(first, total, status="200", **route)
        == 1
    )
    assert value(second, "tvix_store_nar_ingested_bytes_total", source="upload") - value(
        first, "tvix_store_nar_ingested_bytes_total", source="upload"
    ) == len(nar)
    new_received = value(second, received) - value(first, received)
    new_stored = value(second, stored) - value(first, stored)
    assert new_received >= 300_000 and new_stored >= 300_000
    # The same NAR again: received again, stored not.
    assert await put_nar(bridge.url, nar) == 200
    third = await scrape(bridge.url)
    assert value(third, received) - value(second, received) == new_received
    assert value(third, stored) == value(second, stored)
    # The store's size is read at scrape time.
    assert value(third, "tvix_store_stored_bytes", kind="packs") > 0
    assert value(third, "tvix_store_objects", kind="nar_uploads") == 1

    # A NAR GET counts its body (the NAR, streamed) as bytes out.
    name = nixbase32.encode(hashlib.sha256(nar).digest())
    assert await get(bridge.url, f"/nar/{name}.nar") == 200
    out = "tvix_store_http_response_bytes_total"
    get_route = {"route": "/nar/{name}", "method": "GET"}
    fourth = await settled(bridge.url, lambda now: value(now, out, **get_route) > 0)
    assert value(fourth, out, **get_route) - value(third, out, **get_route) == len(nar)


async def test_gc_runs_are_reported(bridges: Bridges, tmp_path: Path) -> None:
    home = tmp_path / "home"
    bridge = bridges.start(home)
    before = await scrape(bridge.url)
    runs = "tvix_store_gc_runs_total"
    for n in (1, 2):
        gc = subprocess.run(
            [TVIX, "gc", "--json"],
            env=tvix_env(home),
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert gc.returncode in (0, 75), gc.stderr  # (75: deferred by the bridge's lease)
        after = await scrape(bridge.url)
        assert value(after, runs, kind="embedded") - value(before, runs, kind="embedded") == n
    assert value(after, "tvix_store_gc_last_end_timestamp_seconds", kind="embedded") > 0
    assert value(after, "tvix_store_gc_last_duration_seconds", kind="embedded") > 0


async def test_daemon_grpc_calls_by_code_and_own_listener(bridges: Bridges, tmp_path: Path) -> None:
    daemon = bridges.start_daemon(None, "--metrics-listen", "127.0.0.1:0")
    m = _METRICS_LISTENING.search(daemon.log())
    assert m is not None, daemon.log()
    metrics_url = m.group(1)
    # With its own listener, the binary cache serves no /metrics.
    assert await get(daemon.url, "/metrics") == 404
    labels = {"service": "tvix.castore.v1.BlobService", "method": "Stat"}
    before = await scrape(metrics_url)
    assert daemon.grpc_addr is not None
    async with grpc.aio.insecure_channel(daemon.grpc_addr) as channel:
        stub = rpc_blobstore_pb2_grpc.BlobServiceStub(channel)
        for _ in range(3):
            try:
                await stub.Stat(rpc_blobstore_pb2.StatBlobRequest(digest=os.urandom(32)))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
            else:
                raise AssertionError("a random blob was found")
        try:
            await stub.Stat(rpc_blobstore_pb2.StatBlobRequest(digest=b"\x00\x01"))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    total = "tvix_store_grpc_requests_total"
    after = await settled(
        metrics_url,
        lambda now: (
            sum(v for k, v in now.items() if k[0] == total)
            - sum(v for k, v in before.items() if k[0] == total)
            >= 4
        ),
    )
    assert (
        value(after, total, code="NOT_FOUND", **labels)
        - value(before, total, code="NOT_FOUND", **labels)
        == 3
    )
    assert (
        value(after, total, code="INVALID_ARGUMENT", **labels)
        - value(before, total, code="INVALID_ARGUMENT", **labels)
        == 1
    )
    assert value(after, "tvix_store_grpc_request_duration_seconds_count", **labels) >= 4


async def test_metrics_with_tokens_and_switched_off(bridges: Bridges, tmp_path: Path) -> None:
    home = tmp_path / "home"
    made = subprocess.run(
        [TVIX, "token", "create", "--scope", "push"],
        env=tvix_env(home),
        capture_output=True,
        check=True,
    )
    assert made.stdout
    # Tokens enforced: a loopback scraper still needs none.
    bridge = bridges.start(home, "--private")
    assert await get(bridge.url, "/nix-cache-info") == 401
    assert value(await scrape(bridge.url), "tvix_store_http_requests_total",
                 route="/nix-cache-info", method="GET", status="401") == 1  # fmt: skip
    off = bridges.start(None, "--no-metrics")
    assert await get(off.url, "/metrics") == 404


async def test_upstream_fetches_and_failures(bridges: Bridges, tmp_path: Path) -> None:
    """A bridge substituting from another bridge (a real binary cache) counts what it fetched."""
    upstream = bridges.start()
    nar = make_nar(tmp_path, 3)
    nar_hash = hashlib.sha256(nar).digest()
    path = StorePath.from_absolute_path(f"/nix/store/{nixbase32.encode(os.urandom(20))}-up")
    info = NarInfo(
        store_path=path,
        url=f"nar/{nixbase32.encode(nar_hash)}.nar",
        nar_hash=nar_hash,
        nar_size=len(nar),
        compression="none",
    )
    assert await put_nar(upstream.url, nar) == 200
    async with (
        aiohttp.ClientSession() as s,
        s.put(f"{upstream.url}/{path.hash_part}.narinfo", data=info.render().encode()) as r,
    ):
        assert r.status == 200, await r.text()
    bridge = bridges.start(None, env={"PATH_INFO_SERVICE_ADDR": f"nix+{upstream.url}"})
    fetches = "tvix_store_upstream_fetches_total"
    before = await scrape(bridge.url)
    assert await get(bridge.url, f"/{path.hash_part}.narinfo") == 200
    assert await get(bridge.url, "/" + "0" * 32 + ".narinfo") == 404
    after = await scrape(bridge.url)
    for kind, outcome in (("narinfo", "hit"), ("nar", "hit"), ("narinfo", "miss")):
        labels = {"kind": kind, "outcome": outcome}
        assert value(after, fetches, **labels) - value(before, fetches, **labels) == 1, labels
    ingested = "tvix_store_nar_ingested_bytes_total"
    assert value(after, ingested, source="upstream") - value(
        before, ingested, source="upstream"
    ) == len(nar)
    # The upstream gone: every attempt fails (retried), then the fetch.
    upstream.stop()
    assert await get(bridge.url, "/" + "1" * 32 + ".narinfo") == 503
    failed = await scrape(bridge.url)
    assert value(failed, "tvix_store_upstream_failures_total", kind="narinfo") >= 2
    errors = {"kind": "narinfo", "outcome": "error"}
    assert value(failed, fetches, **errors) - value(after, fetches, **errors) == 1


def _outward_address() -> str:
    """This machine's address on its default route (no packet is sent)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))
        except OSError as exc:
            raise AssertionError(f"this test needs a non-loopback IPv4 address: {exc}") from exc
        addr = str(s.getsockname()[0])
    assert not addr.startswith("127."), "this test needs a non-loopback IPv4 address"
    return addr


async def test_metrics_beyond_loopback_need_admin(bridges: Bridges, tmp_path: Path) -> None:
    addr = _outward_address()
    home = tmp_path / "home"

    def token(scope: str) -> str:
        out = subprocess.run(
            [TVIX, "token", "create", "--scope", scope],
            env=tvix_env(home), capture_output=True, check=True,
        )  # fmt: skip
        return out.stdout.decode().splitlines()[-1]

    admin, pull = token("admin"), token("pull")
    bridge = bridges.start(home, "-l", "0.0.0.0:0")
    port = bridge.url.rsplit(":", 1)[1]
    outside = f"http://{addr}:{port}"
    assert await get(outside, "/nix-cache-info") == 200  # (public reads stay anonymous)
    assert await get(outside, "/metrics") == 401
    assert await get(outside, "/metrics", {"Authorization": f"Bearer {pull}"}) == 403
    assert await get(outside, "/metrics", {"Authorization": f"Bearer {admin}"}) == 200
    assert await get(f"http://127.0.0.1:{port}", "/metrics") == 200
