"""The process's metrics (prometheus_client), documented in README "Metrics".

Everything is registered in :data:`REGISTRY`, a registry of our own (not the
library's global one), so a test or an embedding program can import this
module without side effects on other code. The hot paths look up a
metric's labelled child once per label set (:class:`Children`), not on
every request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.metrics import MetricWrapperBase

from tvix_castore import observe

__all__ = [
    "BLOB_RECEIVED",
    "BLOB_STORED",
    "GRPC_DURATION",
    "GRPC_REQUESTS",
    "HTTP_DURATION",
    "HTTP_IN_FLIGHT",
    "HTTP_REQUESTS",
    "HTTP_REQUEST_BYTES",
    "HTTP_RESPONSE_BYTES",
    "NAR_INGESTED",
    "REGISTRY",
    "UPSTREAM_FAILURES",
    "UPSTREAM_FETCHES",
    "Children",
    "enable_blob_observer",
]

disable_created_metrics()  # type: ignore[no-untyped-call]  # (no "_created" series)
REGISTRY = CollectorRegistry(auto_describe=True)
# Request latencies: from a narinfo served from memory (~100 µs) to a NAR of gigabytes.
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_FETCH = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

HTTP_REQUESTS = Counter(
    "tvix_store_http_requests",
    "HTTP requests answered, by route template, method and status.",
    ("route", "method", "status"),
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "tvix_store_http_request_duration_seconds",
    "Time from a request's start to its response's last byte.",
    ("route", "method"),
    buckets=_LATENCY,
    registry=REGISTRY,
)
HTTP_REQUEST_BYTES = Counter(
    "tvix_store_http_request_bytes",
    "Request body bytes received (as read by the handler, streamed).",
    ("route", "method"),
    registry=REGISTRY,
)
HTTP_RESPONSE_BYTES = Counter(
    "tvix_store_http_response_bytes",
    "Response body bytes sent.",
    ("route", "method"),
    registry=REGISTRY,
)
HTTP_IN_FLIGHT = Gauge(
    "tvix_store_http_requests_in_flight",
    "HTTP requests being handled now.",
    registry=REGISTRY,
)
GRPC_REQUESTS = Counter(
    "tvix_store_grpc_requests",
    "gRPC calls finished, by service, method and status code.",
    ("service", "method", "code"),
    registry=REGISTRY,
)
GRPC_DURATION = Histogram(
    "tvix_store_grpc_request_duration_seconds",
    "Time from a gRPC call's start to its end (streams included).",
    ("service", "method"),
    buckets=_LATENCY,
    registry=REGISTRY,
)
UPSTREAM_FETCHES = Counter(
    "tvix_store_upstream_fetches",
    "Requests to an upstream binary cache (nix+http), by kind and outcome.",
    ("kind", "outcome"),
    registry=REGISTRY,
)
UPSTREAM_FAILURES = Counter(
    "tvix_store_upstream_failures",
    "Failed upstream attempts (connection errors, 5xx; each retry counts), by kind.",
    ("kind",),
    registry=REGISTRY,
)
UPSTREAM_DURATION = Histogram(
    "tvix_store_upstream_fetch_duration_seconds",
    "Time to fetch from upstream: a narinfo, or a NAR with its ingestion.",
    ("kind",),
    buckets=_FETCH,
    registry=REGISTRY,
)
NAR_INGESTED = Counter(
    "tvix_store_nar_ingested_bytes",
    "NAR bytes ingested (uploads and upstream substitutions).",
    ("source",),
    registry=REGISTRY,
)
BLOB_RECEIVED = Counter(
    "tvix_store_blob_received_bytes",
    "Blob bytes written to the blob service (before deduplication).",
    registry=REGISTRY,
)
BLOB_STORED = Counter(
    "tvix_store_blob_stored_bytes",
    "Blob bytes stored anew (not already in the store), uncompressed.",
    registry=REGISTRY,
)

_M = TypeVar("_M", bound=MetricWrapperBase)


class Children(Generic[_M]):
    """``metric.labels(*key)`` remembered per key (no lock, no tuple checks on a hit)."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: _M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], _M] = {}

    def get(self, *key: str) -> _M:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._metric.labels(*key)
        return child


_observer_lock = threading.Lock()
_observer_on = False


def enable_blob_observer() -> None:
    """Count blob bytes received and stored (:mod:`tvix_castore.observe`); idempotent."""
    global _observer_on
    with _observer_lock:
        if _observer_on:
            return
        received: Callable[[float], None] = BLOB_RECEIVED.inc
        stored: Callable[[float], None] = BLOB_STORED.inc

        def seen(r: int, s: int) -> None:
            received(r)
            if s:
                stored(s)

        observe.set_blob_observer(seen)
        _observer_on = True
