"""Seeing what the servers do: Prometheus metrics and OpenTelemetry traces.

- :mod:`~tvix_store.telemetry.metrics`: every metric (one registry per process).
- :mod:`~tvix_store.telemetry.http`: the aiohttp middleware, ``/metrics`` and its
  own listener (``--metrics-listen``).
- :mod:`~tvix_store.telemetry.grpc`: the gRPC server interceptor.
- :mod:`~tvix_store.telemetry.store`: the store's size and GC runs, read at scrape time.
- :mod:`~tvix_store.telemetry.traces`: spans, off unless ``--otlp`` (or
  ``OTEL_EXPORTER_OTLP_ENDPOINT``) turns them on; OpenTelemetry is imported only then.

Nothing here imports ``prometheus_client`` (tens of milliseconds) for a
command that serves nothing: code shared with such commands counts through
:func:`upstream_fetch`, a no-op until a server has loaded the metrics.
"""

from __future__ import annotations

import sys

__all__ = ["nar_ingested", "upstream_fetch"]

_METRICS = "tvix_store.telemetry.metrics"


def upstream_fetch(kind: str, outcome: str, seconds: float | None = None) -> None:
    """Count one request to an upstream cache (``kind``: narinfo, nar; ``outcome``: see README).

    ``outcome`` ``failure`` counts a failed attempt (a retry follows, or the fetch fails).
    """
    metrics = sys.modules.get(_METRICS)
    if metrics is None:
        return
    if outcome == "failure":
        metrics.UPSTREAM_FAILURES.labels(kind).inc()
        return
    metrics.UPSTREAM_FETCHES.labels(kind, outcome).inc()
    if seconds is not None:
        metrics.UPSTREAM_DURATION.labels(kind).observe(seconds)


def nar_ingested(source: str, size: int) -> None:
    """Count ``size`` NAR bytes ingested from ``source`` (``upload``, ``upstream``)."""
    metrics = sys.modules.get(_METRICS)
    if metrics is not None:
        metrics.NAR_INGESTED.labels(source).inc(size)
