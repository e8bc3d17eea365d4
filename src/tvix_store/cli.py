"""The ``tvix-store`` command line.

Results go to stdout, logs and progress to stderr. Without service flags
every command uses the embedded default store (see :mod:`tvix_store.config`),
so nothing needs a daemon; ``grpc+http://[::1]:8000`` talks to one. Heavy
modules (grpc) are imported only by the commands that need them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import click

from nix_compat.errors import NixCompatError
from tvix_castore.errors import CastoreError
from tvix_castore.rpc import DEFAULT_MAX_UPLOAD_STREAMS
from tvix_store.progress import no_progress_option

__all__ = ["main"]

log = logging.getLogger("tvix_store")
_T = TypeVar("_T")
DEFAULT_DAEMON_LISTEN = "[::1]:8000"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a command's coroutine; our errors become a clean message and exit 1."""
    import asyncio  # here: an export from a NAR plan runs no event loop

    try:
        return asyncio.run(coro)
    except (CastoreError, NixCompatError) as exc:
        raise click.ClickException(str(exc)) from exc


def service_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The three service-address flags (with their tvix environment variables)."""
    f = click.option(
        "--store-composition",
        envvar="TVIX_STORE_COMPOSITION",
        default=None,
        metavar="FILE",
        type=click.Path(dir_okay=False, path_type=str),
        help="TOML file naming and wiring services (env TVIX_STORE_COMPOSITION);"
        " replaces the three URLs.",
    )(f)
    for name, env, what in reversed(
        [
            ("--blob-service-addr", "BLOB_SERVICE_ADDR", "blob service"),
            ("--directory-service-addr", "DIRECTORY_SERVICE_ADDR", "directory service"),
            ("--path-info-service-addr", "PATH_INFO_SERVICE_ADDR", "path info service"),
        ]
    ):
        f = click.option(
            name,
            envvar=env,
            default=None,
            metavar="URL",
            help=f"URL of the {what} (env {env}); default: the embedded store.",
        )(f)
    return f


def nar_bridge_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Binary-cache options: priority, keys, upload bound, connection limits, access."""
    f = click.option(
        "--insecure-no-auth",
        is_flag=True,
        help="Allow listening on a non-loopback address while no token exists (anyone"
        " reaching it can push).",
    )(f)
    f = click.option(
        "--private",
        is_flag=True,
        envvar="TVIX_STORE_PRIVATE",
        help="Reads (HTTP and gRPC) need a token with scope pull too, once any token exists.",
    )(f)
    f = click.option(
        "--trusted-public-keys",
        "trusted_public_keys",
        multiple=True,
        envvar="TVIX_STORE_TRUSTED_PUBLIC_KEYS",
        metavar="KEYS",
        help="Nix public keys (name:base64, space-separated, repeatable; env"
        " TVIX_STORE_TRUSTED_PUBLIC_KEYS): an uploaded signature by one of these names, or"
        " by a --signing-key, must verify, else the upload is refused.",
    )(f)
    f = click.option(
        "--max-connections",
        type=click.IntRange(min=1),
        default=1024,
        show_default=True,
        help="Refuse (503) HTTP connections beyond this many open ones.",
    )(f)
    f = click.option(
        "--body-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=30.0,
        show_default=True,
        metavar="SECONDS",
        help="Answer 408 and close when a request body sends nothing for this long.",
    )(f)
    f = click.option(
        "--header-timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=30.0,
        show_default=True,
        metavar="SECONDS",
        help="Close connections whose request header (or next request, when idle)"
        " has not arrived after this long.",
    )(f)
    f = click.option(
        "--max-nar-size",
        type=int,
        default=64 << 30,
        show_default=True,
        help="Refuse NAR uploads that decompress to more bytes than this.",
    )(f)
    f = click.option(
        "--signing-key",
        "signing_keys",
        multiple=True,
        type=click.Path(exists=True, dir_okay=False, path_type=str),
        help="Nix secret key file; narinfos are signed with it on the fly (repeatable).",
    )(f)
    return click.option(
        "--priority",
        type=int,
        default=39,
        show_default=True,
        help="Priority advertised in /nix-cache-info.",
    )(f)


def telemetry_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Metrics and traces of the serving commands (README "Metrics", "Traces")."""
    f = click.option(
        "--otlp",
        is_flag=True,
        help="Export traces over OTLP/gRPC (to OTEL_EXPORTER_OTLP_ENDPOINT, default"
        " localhost:4317); also on when that variable is set. Needs the otel extra.",
    )(f)
    f = click.option(
        "--no-metrics",
        is_flag=True,
        envvar="TVIX_STORE_NO_METRICS",
        help="Count nothing and serve no /metrics.",
    )(f)
    return click.option(
        "--metrics-listen",
        default=None,
        metavar="ADDR",
        help="Serve /metrics on its own listener (host:port or a socket path; no token"
        " asked) instead of on the binary cache's.",
    )(f)


def _telemetry(kw: dict[str, Any], config: Any) -> str | None:
    """Apply the telemetry options (traces set up now); the metrics listener, if any."""
    from tvix_store.telemetry import traces

    if traces.wanted(kw.pop("otlp")):
        traces.setup()
    config.metrics = not kw.pop("no_metrics")
    listen: str | None = kw.pop("metrics_listen")
    return listen


def _nar_bridge_config(kw: dict[str, Any]) -> Any:
    from nix_compat.signing import SigningKey, VerifyingKey
    from tvix_store.caches import CacheRegistry
    from tvix_store.embedded import data_dir
    from tvix_store.nar_bridge.app import AppConfig
    from tvix_store.servicedb import shared_url
    from tvix_store.tokens import TokenAuthority

    # (over a shared store, its database holds the caches and tokens: every frontend's)
    shared = shared_url(kw.get("path_info_service_addr"))

    keys = [SigningKey.from_file(p) for p in kw.pop("signing_keys", ())]
    trusted = [
        VerifyingKey.parse(k) for arg in kw.pop("trusted_public_keys", ()) for k in arg.split()
    ]
    return AppConfig(
        priority=kw.pop("priority", 39),
        signing_keys=keys,
        max_nar_size=kw.pop("max_nar_size"),
        trusted_keys=trusted,
        header_timeout=kw.pop("header_timeout"),
        body_timeout=kw.pop("body_timeout"),
        max_connections=kw.pop("max_connections"),
        tokens=TokenAuthority(data_dir(), url=shared),
        caches=CacheRegistry(data_dir(), shared),
        private=kw.pop("private"),
        insecure_no_auth=kw.pop("insecure_no_auth"),
        embedded_home=None if _store_named(kw) else data_dir(),
    )


def _store_named(kw: dict[str, Any]) -> bool:
    """Whether service URLs or a composition name the store (else: the embedded default)."""
    keys = ("blob_service_addr", "directory_service_addr", "path_info_service_addr")
    return any(kw.get(k) for k in (*keys, "store_composition"))


async def _open(kw: dict[str, Any]) -> Any:
    from tvix_store.config import open_store

    return await open_store(
        kw.get("blob_service_addr"),
        kw.get("directory_service_addr"),
        kw.get("path_info_service_addr"),
        composition=kw.get("store_composition"),
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tvix-store-py")
@click.option(
    "--log-level",
    type=click.Choice(["TRACE", "DEBUG", "INFO", "WARN", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Log verbosity (logs go to stderr).",
)
@click.option("--json", "json_logs", is_flag=True, help="Log as JSON lines.")
def main(log_level: str, json_logs: bool) -> None:
    """A content-addressed store for Nix (tvix protocols, Nix formats)."""
    level = {"TRACE": "DEBUG", "WARN": "WARNING"}.get(log_level.upper(), log_level.upper())
    from tvix_store.logs import RepeatFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatFilter())
    handler.setFormatter(
        _JsonFormatter() if json_logs else logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


@main.command()
@click.argument("path", type=click.Path(path_type=str))
def dump(path: str) -> None:
    """Write the NAR of a filesystem PATH to stdout (like ``nix-store --dump``)."""
    from nix_compat.nar import dump_path

    out = sys.stdout.buffer
    try:
        dump_path(path, out)
    except FileNotFoundError as exc:
        raise click.ClickException(f"{path}: no such file or directory") from exc
    except OSError as exc:
        raise click.ClickException(f"{path}: {exc.strerror}") from exc
    except NixCompatError as exc:
        raise click.ClickException(str(exc)) from exc
    out.flush()


@main.command()
@click.option(
    "-l",
    "--listen-address",
    default=DEFAULT_DAEMON_LISTEN,
    show_default=True,
    help="host:port, or an absolute unix socket path. Beyond loopback only once a token"
    " exists (or with --insecure-no-auth).",
)
@click.option(
    "--nar-bridge",
    "nar_bridge_listen",
    default=None,
    metavar="ADDR",
    help="Also serve the Nix binary cache (nar-bridge) on ADDR, e.g. [::1]:9000.",
)
@click.option(
    "--trust-uploaded-nar-metadata",
    is_flag=True,
    envvar="TVIX_STORE_TRUST_UPLOADED_NAR_METADATA",
    help="Record PathInfo Puts without reading their content to check NarSize/NarHash"
    " (and a CA's hash), for trusted bulk copies; that a CA fits the store path, and"
    " signatures by known keys, are still checked.",
)
@click.option(
    "--max-concurrent-streams",
    "max_upload_streams",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_UPLOAD_STREAMS,
    show_default=True,
    help="Upload streams (Blob/Directory Put) run at once; more wait their turn."
    " Each running one holds up to about 2 MiB.",
)
@nar_bridge_options
@telemetry_options
@service_options
def daemon(
    listen_address: str,
    nar_bridge_listen: str | None,
    trust_uploaded_nar_metadata: bool,
    max_upload_streams: int,
    **kw: Any,
) -> None:
    """Serve BlobService, DirectoryService and PathInfoService over gRPC.

    Also serves gRPC reflection (grpcurl, evans) and the standard health service,
    and with --nar-bridge the HTTP binary cache from the same process.
    A PathInfo Put is recorded only if its NarSize/NarHash are those of its
    content, its CA fits its store path and its signatures by known keys verify.
    Stops cleanly on SIGINT/SIGTERM.
    """
    from tvix_store.daemon import serve
    from tvix_store.verify import UploadPolicy

    async def run() -> None:
        config = _nar_bridge_config(kw)
        metrics_listen = _telemetry(kw, config)
        policy = UploadPolicy(config.known_keys(), trust_uploaded_nar_metadata)
        store = await _open(kw)
        async with store:
            await serve(
                store,
                listen_address,
                nar_bridge_listen=nar_bridge_listen,
                nar_bridge_config=config,
                upload_policy=policy,
                max_upload_streams=max_upload_streams,
                metrics_listen=metrics_listen,
            )

    _run(run())


@main.command("nar-bridge")
@click.option(
    "-l",
    "--listen-address",
    default="[::1]:9000",
    show_default=True,
    help="host:port, or an absolute unix socket path. Beyond loopback only once a token"
    " exists (or with --insecure-no-auth).",
)
@nar_bridge_options
@telemetry_options
@service_options
def nar_bridge(listen_address: str, **kw: Any) -> None:
    """Serve the store as a Nix HTTP binary cache (nix copy --to/--from, substituters)."""
    from tvix_store.daemon import serve

    async def run() -> None:
        config = _nar_bridge_config(kw)
        metrics_listen = _telemetry(kw, config)
        store = await _open(kw)
        async with store:
            await serve(
                store,
                None,
                nar_bridge_listen=listen_address,
                nar_bridge_config=config,
                metrics_listen=metrics_listen,
            )

    _run(run())


@main.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@no_progress_option
@service_options
def import_(paths: tuple[str, ...], no_progress: bool, **kw: Any) -> None:
    """Import filesystem PATHS; print each store path (as ``nix-store --add`` would)."""
    from tvix_store.importer import base_name_of, import_path
    from tvix_store.progress import Progress, shown

    async def run(progress: Progress) -> None:
        store = await _open(kw)
        async with store:
            for path in paths:
                progress.stage(f"import {base_name_of(path) or path}")
                info = await import_path(path, store, progress)
                progress.result(info.store_path.absolute)

    with shown(no_progress) as progress:
        _run(run(progress))


@main.command()
@click.argument("closure_file", envvar="NIX_ATTRS_JSON_FILE", type=click.Path(path_type=str))
@click.option(
    "--root",
    default="/",
    show_default=True,
    help="Read /nix/store paths below this directory (e.g. a chroot store).",
)
@no_progress_option
@service_options
def copy(closure_file: str, root: str, no_progress: bool, **kw: Any) -> None:
    """Import the closure listed in CLOSURE_FILE, dependencies first.

    CLOSURE_FILE is exportReferencesGraph JSON ({"closure": [...]}) or the output
    of ``nix path-info --json --recursive``. Paths already present are skipped;
    every NarHash/NarSize is recomputed from the files and must match.
    Prints each imported store path.
    """
    from tvix_store.copy import copy_closure, read_closure_file
    from tvix_store.progress import Progress, shown

    async def run(progress: Progress) -> None:
        entries = read_closure_file(closure_file)
        store = await _open(kw)
        async with store:
            progress.stage("copy", unit="paths")
            await copy_closure(
                entries,
                store,
                root=root,
                on_imported=lambda p: progress.result(p.absolute),
                progress=progress,
            )

    with shown(no_progress) as progress:
        _run(run(progress))


def _store_path_arg(text: str) -> tuple[Any, str]:
    from nix_compat.store_path import StorePath

    if text.startswith("/"):
        return StorePath.from_absolute_path_full(text)
    base, _, sub = text.partition("/")
    return StorePath.from_basename(base), sub.strip("/")


async def _lookup(store: Any, text: str) -> tuple[Any, Any, str]:
    sp, sub = _store_path_arg(text)
    info = await store.pathinfos.get(sp.digest)
    if info is None or info.store_path != sp:
        raise click.ClickException(f"{sp.absolute} is not in the store")
    from tvix_store.browse import resolve

    node = await resolve(info.node, sub, store.directories)
    return info, node, sub


@main.command()
@click.argument("store_path")
@service_options
def export(store_path: str, **kw: Any) -> None:
    """Write the NAR of STORE_PATH to stdout (byte-equal to ``nix-store --dump``).

    With the embedded store, a path imported here (or exported once before) has
    a NAR plan, and its NAR is written straight from the pack files, without
    starting an event loop; otherwise it is rendered from castore and checked
    against the recorded NarHash.
    """
    import io

    out = sys.stdout.buffer
    try:
        fd: int | None = out.fileno()
    except (AttributeError, io.UnsupportedOperation):
        fd = None
    if fd is not None and not any(kw.values()):
        with _writing_nar():
            try:
                if _export_planned(store_path, fd):
                    return
            except (CastoreError, NixCompatError) as exc:
                raise click.ClickException(str(exc)) from exc
    _run(_export(store_path, kw, out))


@contextlib.contextmanager
def _writing_nar() -> Iterator[None]:
    """Failures to write the NAR to stdout become a clean error (or a quiet exit)."""
    try:
        yield
    except BrokenPipeError:
        raise SystemExit(1) from None  # the reader went away: nothing left to say
    except OSError as exc:
        raise click.ClickException(
            f"cannot write the NAR to stdout: {exc.strerror or exc}"
        ) from exc


def _export_planned(store_path: str, fd: int) -> bool:
    """The embedded store's fast path (see :func:`tvix_store.embedded.export_planned`)."""
    from tvix_store.embedded import data_dir, export_planned

    try:
        sp, sub = _store_path_arg(store_path)
    except NixCompatError:
        return False  # the general way reports it
    return not sub and export_planned(data_dir(), sp, fd)


async def _export(store_path: str, kw: dict[str, Any], out: Any) -> None:
    store = await _open(kw)
    async with store:
        info, _, sub = await _lookup(store, store_path)
        if sub:
            raise click.ClickException("export takes a store path, not a path inside one")
        with _writing_nar():
            await _write_nar(store, info, out)


async def _write_nar(store: Any, info: Any, out: Any) -> None:
    import hashlib
    import io

    from tvix_castore.errors import DataCorruption
    from tvix_store.nar.layout import build_layout
    from tvix_store.nar.render import NarRenderError, fetch_closure, render_nar

    out.flush()
    try:
        fd: int | None = out.fileno()
    except (AttributeError, io.UnsupportedOperation):
        fd = None
    node = info.node
    nar = store.nar
    if fd is not None and await nar.export(node, info.nar_size, info.nar_sha256, fd):
        return
    try:
        closure = await fetch_closure(node, store.directories)
    except NarRenderError as exc:
        if not isinstance(exc.__cause__, DataCorruption):
            raise
        # (Directories live in the packs too: a damaged pack can hide them)
        await nar.mark_damaged(node, str(exc.__cause__))
        raise click.ClickException(
            f"{info.store_path}: stored content is damaged: {exc.__cause__}"
        ) from exc
    # Before writing anything: are the bytes of every indexed blob there?
    problem = await nar.unreadable([f.digest for f in build_layout(node, closure).files])
    if problem is not None:
        await nar.mark_damaged(node, problem)
        raise click.ClickException(f"{info.store_path}: stored content is damaged: {problem}")
    h = hashlib.sha256()
    size = 0
    try:
        async for piece in render_nar(node, store.blobs, store.directories, closure=closure):
            h.update(piece)
            size += len(piece)
            out.write(piece)
    except DataCorruption as exc:
        await nar.mark_damaged(node, str(exc))
        raise
    out.flush()
    if size != info.nar_size or h.digest() != info.nar_sha256:
        raise click.ClickException(
            f"{info.store_path}: rendered NAR does not match its recorded NarHash/NarSize"
        )
    await nar.record(node, closure, size, info.nar_sha256)
    await nar.clear_damage(node)


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@service_options
def ls(path: str, as_json: bool, **kw: Any) -> None:
    """List a directory (or describe a file/symlink) inside the store: STORE_PATH[/sub]."""
    from tvix_store.browse import describe, listing

    async def run() -> None:
        store = await _open(kw)
        async with store:
            _, node, _ = await _lookup(store, path)
            entries = await listing(node, store.directories)
            if as_json:
                print(json.dumps([describe(e) for e in entries], indent=1))
                return
            for e in entries:
                d = describe(e)
                line = f"{d['mode']} {d['size']:>12} {d['name']}"
                if d["type"] == "symlink":
                    line += f" -> {d['target']}"
                print(line)

    _run(run())


@main.command()
@click.argument("path")
@service_options
def cat(path: str, **kw: Any) -> None:
    """Write the contents of a file inside the store (STORE_PATH/sub/file) to stdout."""
    from tvix_castore.nodes import FileNode

    async def run() -> None:
        store = await _open(kw)
        async with store:
            _, node, _ = await _lookup(store, path)
            if not isinstance(node, FileNode):
                raise click.ClickException(f"{path} is not a regular file")
            reader = await store.blobs.open_read(node.digest)
            if reader is None:
                raise click.ClickException(f"{path}: blob {node.digest} is missing")
            out = sys.stdout.buffer
            left = node.size
            async with reader:
                while left and (data := await reader.read(min(left, 1 << 20))):
                    out.write(data)
                    left -= len(data)
            out.flush()
            if left:
                raise click.ClickException(f"{path}: blob is shorter than the file size")

    _run(run())


@main.command()
@click.argument("store_path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of narinfo text.")
@service_options
def info(store_path: str, as_json: bool, **kw: Any) -> None:
    """Show the metadata of STORE_PATH (narinfo text, or --json)."""
    from nix_compat import nixbase32

    async def run() -> None:
        store = await _open(kw)
        async with store:
            pi, _, _ = await _lookup(store, store_path)
            if as_json:
                from tvix_store.browse import describe

                print(
                    json.dumps(
                        {
                            "path": pi.store_path.absolute,
                            "narHash": "sha256:" + nixbase32.encode(pi.nar_sha256),
                            "narSize": pi.nar_size,
                            "references": [r.absolute for r in pi.references],
                            "deriver": pi.deriver.absolute + ".drv" if pi.deriver else None,
                            "ca": pi.ca.render() if pi.ca else None,
                            "signatures": [s.render() for s in pi.signatures],
                            "root": describe(pi.node),
                        },
                        indent=1,
                    )
                )
            else:
                url = f"nar/{nixbase32.encode(pi.nar_sha256)}.nar"
                sys.stdout.write(pi.to_narinfo(url).render())

    _run(run())


@main.command()
@click.option(
    "--min-garbage",
    type=click.FloatRange(0.0, 1.0),
    default=0.2,
    show_default=True,
    help="Rewrite a pack when at least this fraction of it is garbage.",
)
@click.option("--recompress", is_flag=True, help="Rewrite every pack (at TVIX_STORE_ZSTD_LEVEL).")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def compact(min_garbage: float, recompress: bool, as_json: bool) -> None:
    """Compact the embedded store: rewrite packs that are mostly garbage, convert old layouts.

    Runs while other processes read and write the store (packs being
    written are skipped); a crash at any point loses nothing. Exits 2 if it
    found damaged data (left as it was, listed).
    """
    import dataclasses

    from tvix_castore.packstore.compact import compact as run_compaction
    from tvix_store.embedded import Embedded, data_dir

    home = data_dir()
    if not (home / "store.sqlite").exists():
        raise click.ClickException(f"no embedded store at {home}")
    try:
        store = Embedded(home)
        try:
            stats = run_compaction(
                store.blobs(),
                min_garbage=min_garbage,
                recompress=recompress,
                live_records=store.live_records,
            )
        finally:
            store.close()
    except CastoreError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        print(json.dumps(dataclasses.asdict(stats), indent=1))
    else:
        print(stats.summary())
    if stats.damaged:
        raise SystemExit(2)


@main.command()
@click.option(
    "--deep",
    is_flag=True,
    help="Also render each path's NAR from its Directories and blobs and compare it with"
    " the recorded NarSize and NarHash.",
)
@click.option(
    "--repair",
    is_flag=True,
    help="Drop the index rows of damaged content (so an upload or import of it stores it"
    " again) and fetch each damaged path from --upstream.",
)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    metavar="URL",
    help="Where --repair fetches damaged paths: a Nix binary cache (http(s)://,"
    " nix+http(s)://), a tvix daemon (grpc+http(s)://, grpc+unix://) or another embedded"
    " store (embedded:///DIR); repeatable, tried in order. The NAR must hash to the NarHash"
    " this store recorded.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@no_progress_option
@service_options
def fsck(
    deep: bool,
    repair: bool,
    upstreams: tuple[str, ...],
    as_json: bool,
    no_progress: bool,
    **kw: Any,
) -> None:
    """Check the store for damaged content and say which paths it breaks.

    With service URLs or a composition (S3 + PostgreSQL, a daemon …), every
    path's Directories, blobs and (--deep) NAR are checked through the
    services, and damage is reported. Without, the embedded store:

    Verifies every pack frame and index row, every path's closure (Directories
    and blobs), and with --deep every NAR. Damaged paths are marked: nar-bridge
    then answers their narinfo 404 and refuses their NAR, until the same
    content is uploaded or imported again, or --repair fetches it. Exits 1 if
    it found damage (with --repair: damage it could not repair).
    """
    from tvix_store.embedded import Embedded, data_dir
    from tvix_store.fsck import fsck as run_fsck
    from tvix_store.progress import shown
    from tvix_store.repair import Source, open_source
    from tvix_store.repair import repair as run_repair

    if upstreams and not repair:
        raise click.UsageError("--upstream is for --repair")
    if _store_named(kw):
        if repair:
            raise click.UsageError(
                "--repair is for the embedded store; repair a shared one by uploading the"
                " damaged paths again"
            )
        _fsck_services(kw, deep, as_json, no_progress)
        return

    home = data_dir()
    if not (home / "store.sqlite").exists():
        raise click.ClickException(f"no embedded store at {home}")

    async def run() -> Any:
        store = Embedded(home)
        sources: list[Source] = []
        try:
            for url in upstreams:  # (a bad URL is an error before anything is checked)
                sources.append(await open_source(url, store))
            with shown(no_progress) as progress:
                report = await run_fsck(store, deep=deep, progress=progress)
            if repair:
                await run_repair(store, report, sources)
            return report
        finally:
            for source in sources:
                with contextlib.suppress(Exception):
                    await source.aclose()
            store.close()

    try:
        report = _run(run())
    except CastoreError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        print(json.dumps(report.as_json(), indent=1))
    else:
        print(report.summary())
    if not report.ok:
        raise SystemExit(1)


def _fsck_services(kw: dict[str, Any], deep: bool, as_json: bool, no_progress: bool) -> None:
    from tvix_store.progress import shown
    from tvix_store.servicefsck import fsck_services

    async def run() -> Any:
        store = await _open(kw)
        async with store:
            with shown(no_progress) as progress:
                return await fsck_services(store, deep=deep, progress=progress)

    try:
        report = _run(run())
    except CastoreError as exc:
        raise click.ClickException(str(exc)) from exc
    print(json.dumps(report.as_json(), indent=1) if as_json else report.summary())
    if not report.ok:
        raise SystemExit(1)


def _add_lifecycle_commands() -> None:
    from tvix_store.lifecycle_cli import COMMANDS

    for command in COMMANDS:
        main.add_command(command)
    from tvix_store import mount

    main.add_command(mount.command())
    from tvix_store import migrate

    main.add_command(migrate.command())
    from tvix_store import config_cli

    main.add_command(config_cli.command())
    from tvix_store import token_cli

    main.add_command(token_cli.command())
    from tvix_store import cache_cli

    main.add_command(cache_cli.command())


_add_lifecycle_commands()
