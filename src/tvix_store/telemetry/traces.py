"""OpenTelemetry traces: off unless asked for, and then exported over OTLP/gRPC.

Tracing is on with ``--otlp`` (daemon, nar-bridge) or when the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is
set; ``OTEL_SDK_DISABLED=true`` keeps it off. The other standard variables
apply as the SDK reads them (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``, ``OTEL_TRACES_SAMPLER``).
The packages are the ``otel`` extra (``pip install 'tvix-store-py[otel]'``) and
are imported by :func:`setup` only: with tracing off nothing of OpenTelemetry
is loaded and :func:`span` returns one shared no-op context.

Context travels as W3C ``traceparent``/``tracestate``: read from incoming HTTP
headers and gRPC metadata (:func:`extract`), written into requests to an
upstream cache and into every gRPC call our channels make (:func:`inject`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from tvix_castore.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "ENV_ENDPOINTS",
    "enabled",
    "extract",
    "inject",
    "setup",
    "shutdown",
    "span",
    "wanted",
]

ENV_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_DEFAULT_SERVICE = "tvix-store"
_NULL: AbstractContextManager[None] = contextlib.nullcontext()

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_propagator: Any = None
_kinds: dict[str, Any] = {}


def wanted(otlp: bool, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether tracing is asked for: ``--otlp`` or an OTLP endpoint in the environment."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return otlp or any(environ.get(name, "").strip() for name in ENV_ENDPOINTS)


def enabled() -> bool:
    """Whether spans are recorded (after :func:`setup`)."""
    return _tracer is not None


def setup(service: str = _DEFAULT_SERVICE, exporter: Any = None) -> None:
    """Record spans and export them in batches (OTLP/gRPC unless ``exporter`` is given).

    Raises:
        ConfigError: the OpenTelemetry packages are not installed.
    """
    global _tracer, _provider, _propagator
    if _tracer is not None:
        return
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # (endpoint, headers, TLS: from OTEL_* variables)
    except ImportError as exc:
        raise ConfigError(
            f"traces need the OpenTelemetry packages: pip install 'tvix-store-py[otel]' ({exc})"
        ) from exc
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider
    _propagator = TraceContextTextMapPropagator()
    _kinds.update(
        server=trace.SpanKind.SERVER, client=trace.SpanKind.CLIENT, internal=trace.SpanKind.INTERNAL
    )
    _tracer = provider.get_tracer("tvix_store")
    from tvix_castore.rpc.channel import add_metadata_source

    add_metadata_source(_metadata)


def shutdown() -> None:
    """Export what is pending and stop (spans after this are not recorded)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def span(
    name: str,
    *,
    kind: str = "internal",
    parent: Context | None = None,
    attributes: Mapping[str, str | int] | None = None,
) -> AbstractContextManager[Span | None]:
    """A span made current for the ``with`` block (a shared no-op when tracing is off)."""
    tracer = _tracer
    if tracer is None:
        return _NULL
    return tracer.start_as_current_span(
        name, context=parent, kind=_kinds[kind], attributes=attributes
    )


def extract(carrier: Mapping[str, str]) -> Context | None:
    """The remote parent named by ``carrier``'s ``traceparent`` (``None`` when off)."""
    if _tracer is None:
        return None
    context: Context = _propagator.extract(carrier)
    return context


def inject(carrier: MutableMapping[str, str]) -> None:
    """Write the current span's ``traceparent`` (and ``tracestate``) into ``carrier``."""
    if _tracer is not None:
        _propagator.inject(carrier)


def _metadata() -> Iterator[tuple[str, str]]:
    carrier: dict[str, str] = {}
    inject(carrier)
    return iter(carrier.items())
