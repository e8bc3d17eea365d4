"""Traces of real processes, exported over OTLP/gRPC to a collector stand-in in the test.

A nar-bridge on top of a daemon (its three services over gRPC), both with
``OTEL_EXPORTER_OTLP_ENDPOINT`` naming the collector: a request carrying a
``traceparent`` is a span of that trace in the bridge, and the gRPC calls it
makes are spans of the same trace in the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from nix_compat import nixbase32

from .conftest import Bridges
from .test_metrics import make_nar


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    parent_id: str
    attributes: dict[str, Any]


@dataclass
class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it."""

    spans: list[Span] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    endpoint: str = ""

    async def Export(self, request: Any, context: Any) -> Any:
        for rs in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    values = {
                        a.key: a.value.string_value or a.value.int_value for a in s.attributes
                    }
                    self.spans.append(
                        Span(
                            attrs.get("service.name", ""),
                            s.name,
                            s.trace_id.hex(),
                            s.parent_span_id.hex(),
                            values,
                        )
                    )
        self.arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, trace_id: str, service: str, name: str) -> Span:
        """The span named so, of that trace and service (waiting for its export)."""
        for _ in range(600):  # (bounds a hang: batches go out every 50 ms)
            for s in self.spans:
                if (s.trace_id, s.service, s.name) == (trace_id, service, name):
                    return s
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), 0.1)
        found = sorted({(s.service, s.name, s.trace_id) for s in self.spans})
        raise AssertionError(f"no span {service}/{name} of trace {trace_id}; got {found}")


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    server = grpc.aio.server()
    c = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(c, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    c.endpoint = f"http://127.0.0.1:{port}"
    try:
        yield c
    finally:
        await server.stop(0)


def _otel(collector: Collector, service: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }


async def test_trace_crosses_http_and_grpc(
    bridges: Bridges, collector: Collector, tmp_path: Path
) -> None:
    daemon = bridges.start_daemon(None, env=_otel(collector, "test-daemon"))
    assert daemon.grpc_addr is not None
    url = f"grpc+http://{daemon.grpc_addr}"
    services = {
        "BLOB_SERVICE_ADDR": url,
        "DIRECTORY_SERVICE_ADDR": url,
        "PATH_INFO_SERVICE_ADDR": url,
    }
    bridge = bridges.start(None, env={**services, **_otel(collector, "test-bridge")})

    trace_id, parent = os.urandom(16).hex(), os.urandom(8).hex()
    headers = {"traceparent": f"00-{trace_id}-{parent}-01"}
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{bridge.url}/{'0' * 32}.narinfo", headers=headers) as r:
            assert r.status == 404
        span = await collector.wait_for(trace_id, "test-bridge", "GET /{hash}.narinfo")
        assert span.parent_id == parent
        assert span.attributes["http.response.status_code"] == 404
        call = await collector.wait_for(
            trace_id, "test-daemon", "tvix.store.v1.PathInfoService/Get"
        )
        assert call.attributes["rpc.grpc.status_code"] in ("OK", "NOT_FOUND")

        # An upload: the bridge's ingest span, the daemon's blob Puts, one trace.
        nar = make_nar(tmp_path, 7)
        name = nixbase32.encode(hashlib.sha256(nar).digest())
        upload_id = os.urandom(16).hex()
        headers = {"traceparent": f"00-{upload_id}-{os.urandom(8).hex()}-01"}
        async with s.put(f"{bridge.url}/nar/{name}.nar", data=nar, headers=headers) as r:
            assert r.status == 200
    await collector.wait_for(upload_id, "test-bridge", "PUT /nar/{name}")
    ingest = await collector.wait_for(upload_id, "test-bridge", "nar.ingest")
    assert ingest.attributes["nar.size"] == len(nar)
    await collector.wait_for(upload_id, "test-daemon", "tvix.castore.v1.BlobService/Put")


async def test_no_traces_without_otlp(
    bridges: Bridges, collector: Collector, tmp_path: Path
) -> None:
    """Without an endpoint or --otlp, nothing is exported (the env names none here)."""
    bridge = bridges.start(None, env={"OTEL_SERVICE_NAME": "silent"})
    async with aiohttp.ClientSession() as s, s.get(f"{bridge.url}/nix-cache-info") as r:
        assert r.status == 200
    bridge.stop()  # (a bridge exporting would flush its spans now)
    assert not [sp for sp in collector.spans if sp.service == "silent"]
