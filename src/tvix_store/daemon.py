"""``tvix-store daemon``: one gRPC server for the three services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from tvix_castore.errors import ConfigError
from tvix_castore.protos import rpc_blobstore_pb2_grpc, rpc_directory_pb2_grpc
from tvix_castore.rpc import DEFAULT_MAX_UPLOAD_STREAMS
from tvix_castore.rpc.blob_server import BlobServiceServicer
from tvix_castore.rpc.directory_server import DirectoryServiceServicer
from tvix_castore.rpc.server import Registration, start_server
from tvix_store.config import Store
from tvix_store.nar_bridge.app import AppConfig as NarBridgeConfig
from tvix_store.protos import rpc_pathinfo_pb2_grpc
from tvix_store.rpc.pathinfo_server import PathInfoServiceServicer
from tvix_store.verify import UploadPolicy

__all__ = ["check_exposure", "registrations", "serve"]

log = logging.getLogger(__name__)


def registrations(store: Store, policy: UploadPolicy | None = None) -> list[Registration]:
    """The servicers of ``store`` for :func:`start_server` (``policy``: PathInfo Put checks)."""
    blob = BlobServiceServicer(store.blobs)
    directory = DirectoryServiceServicer(store.directories)
    pathinfo = PathInfoServiceServicer(
        store.pathinfos, store.blobs, store.directories, nar=store.nar, policy=policy
    )
    return [
        (
            lambda s: rpc_blobstore_pb2_grpc.add_BlobServiceServicer_to_server(blob, s),
            "tvix.castore.v1.BlobService",
        ),
        (
            lambda s: rpc_directory_pb2_grpc.add_DirectoryServiceServicer_to_server(directory, s),
            "tvix.castore.v1.DirectoryService",
        ),
        (
            lambda s: rpc_pathinfo_pb2_grpc.add_PathInfoServiceServicer_to_server(pathinfo, s),
            "tvix.store.v1.PathInfoService",
        ),
    ]


def _loopback(listen: str) -> bool:
    """Whether ``listen`` (host:port, [v6]:port, a socket path, unix:…) stays on this machine."""
    import ipaddress

    if listen.startswith(("/", "unix:")):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or "" (every address)


def check_exposure(config: NarBridgeConfig, *listens: str | None) -> None:
    """Refuse a non-loopback listener while nothing controls access (no token exists)."""
    if config.insecure_no_auth:
        return
    enforced = config.tokens is not None and config.tokens.enforced()
    for listen in listens:
        if listen is not None and not enforced and not _loopback(listen):
            raise ConfigError(
                f"refusing to listen on {listen} without access control: create a token first"
                " (tvix-store token create --scope admin) or pass --insecure-no-auth"
            )


async def serve(
    store: Store,
    listen: str | None,
    ready: asyncio.Event | None = None,
    *,
    nar_bridge_listen: str | None = None,
    nar_bridge_config: NarBridgeConfig | None = None,
    upload_policy: UploadPolicy | None = None,
    max_upload_streams: int = DEFAULT_MAX_UPLOAD_STREAMS,
    metrics_listen: str | None = None,
) -> None:
    """Serve gRPC on ``listen`` and/or the binary cache on ``nar_bridge_listen``.

    With ``nar_bridge_config.metrics`` (the default), requests and calls are
    counted, and ``/metrics`` is served on ``metrics_listen`` if given, else
    on the binary cache's listener. Runs until SIGINT/SIGTERM (or
    cancellation), then stops gracefully (and exports the pending spans).
    """
    config = nar_bridge_config or NarBridgeConfig()
    check_exposure(config, listen, nar_bridge_listen)
    interceptors: list[object] = []
    if config.metrics:
        from tvix_store.telemetry.grpc import Observe
        from tvix_store.telemetry.metrics import enable_blob_observer
        from tvix_store.telemetry.store import register_store

        enable_blob_observer()
        register_store(store)
        interceptors.append(Observe())  # (first: refused calls are counted too)
        config.metrics_route = metrics_listen is None
    if config.tokens is not None:
        from tvix_store.rpc.auth import TokenCheck

        interceptors.append(TokenCheck(config.tokens, private_reads=config.private))
    server = None
    addr = ""
    runner = None
    bridge_url = ""
    metrics_runner = None
    # Signals are handled from before the first bind: a SIGTERM that arrives as
    # soon as the banner is printed still stops the daemon cleanly (exit 0).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        # Bind everything before announcing anything: a busy port fails the
        # whole command (the finally below stops what had started).
        if listen is not None:
            server, addr = await start_server(
                listen,
                registrations(store, upload_policy),
                max_upload_streams=max_upload_streams,
                interceptors=interceptors,
            )
        if metrics_listen is not None and config.metrics:
            from tvix_store.telemetry.http import start_metrics_listener

            metrics_runner, _ = await start_metrics_listener(metrics_listen)
        if nar_bridge_listen is not None:
            from tvix_store.nar_bridge.server import start_nar_bridge

            runner, bridge_url = await start_nar_bridge(
                store, nar_bridge_listen, config, announce=False
            )
        if listen is not None:
            url = f"grpc+unix://{addr[5:]}" if addr.startswith("unix:") else f"grpc+http://{addr}"
            print(
                f"tvix-store listening on {addr} ({store.description})\n"
                "  talk to it:\n"
                f"    grpcurl -plaintext '{addr}' list\n"
                f"    PATH_INFO_SERVICE_ADDR={url} BLOB_SERVICE_ADDR={url} \\\n"
                f"      DIRECTORY_SERVICE_ADDR={url} tvix-store import PATH",
                file=sys.stderr,
                flush=True,
            )
            log.info("serving gRPC on %s", addr)
        if runner is not None:
            print(f"nar-bridge listening on {bridge_url}", file=sys.stderr, flush=True)
        if runner is not None and not bridge_url.startswith("unix:"):
            print(
                "  use it as a Nix binary cache:\n"
                f"    nix copy --to '{bridge_url}' /nix/store/…\n"
                f"    nix copy --from '{bridge_url}' --no-check-sigs /nix/store/…",
                file=sys.stderr,
                flush=True,
            )
        if ready is not None:
            ready.set()
        await stop.wait()
        print("tvix-store: shutting down", file=sys.stderr, flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if runner is not None:
            from tvix_store.nar_bridge.server import stop_nar_bridge

            await stop_nar_bridge(runner, nar_bridge_listen or "")
        if server is not None:
            await server.stop(2)
            if addr.startswith("unix:"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(addr[len("unix:") :])
        if metrics_runner is not None:
            await metrics_runner.cleanup()
            if (metrics_listen or "").startswith("/"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(metrics_listen or "")
        from tvix_store.telemetry import traces

        if traces.enabled():
            await asyncio.to_thread(traces.shutdown)  # (the spans still pending go out)
