"""The lifecycle commands: ``pin``, ``delete`` and ``gc`` (added to the CLI by ``cli``)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from nix_compat.errors import NixCompatError
from nix_compat.store_path import StorePath
from tvix_castore.errors import CastoreError
from tvix_store.progress import no_progress_option

__all__ = ["COMMANDS", "parse_duration", "shared_option"]

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhdw]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str) -> float:
    """Seconds of ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or a plain number of seconds."""
    total = 0.0
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _DURATION.match(text, pos)
        if m is None:
            raise ValueError(text)
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not text:
        raise ValueError(text)
    return total


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: expected a duration such as 30d, 12h, 90m, 45s or 0"
        ) from None


def _home() -> Path:
    from tvix_store.embedded import data_dir

    home = data_dir()
    if not (home / "store.sqlite").exists():
        raise click.ClickException(f"no embedded store at {home}")
    return home


def _paths(texts: tuple[str, ...]) -> list[StorePath]:
    out = []
    for text in texts:
        try:
            out.append(StorePath.from_absolute_path(text.rstrip("/")))
        except NixCompatError as exc:
            raise click.BadParameter(f"{text}: {exc}") from exc
    return out


def _with_store(body: Callable[[Any], Any]) -> Any:
    from tvix_store.embedded import Embedded

    store = Embedded(_home())
    try:
        return body(store)
    except CastoreError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        store.close()


def shared_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--path-info-service-addr URL`` as ``shared``: a shared store's PostgreSQL."""
    return click.option(
        "--path-info-service-addr",
        "shared",
        envvar="PATH_INFO_SERVICE_ADDR",
        metavar="URL",
        help="postgresql://…: the shared store's (S3 + PostgreSQL) instead of the embedded one.",
    )(f)


def _with_shared(url: str | None, body: Callable[[Any], Any]) -> Any:
    """``body(database)`` of the shared store at ``url``; ``None`` if ``url`` names none."""
    from tvix_castore.postgres import POSTGRES_SCHEMES

    if not url:
        return None
    if url.partition("://")[0] not in POSTGRES_SCHEMES:
        raise click.UsageError(
            f"--path-info-service-addr {url}: pins and deletes are kept in the embedded store"
            " or in PostgreSQL (postgresql://…)"
        )
    from tvix_store.pathinfoservice.postgres import open_database

    try:
        db = open_database(url)
    except CastoreError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        return body(db)
    except CastoreError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        db.release()


@click.group()
def pin() -> None:
    """Named GC roots: a pin keeps the whole closure of its paths."""


@pin.command("add")
@click.argument("name")
@click.argument("store_paths", nargs=-1, required=True)
@shared_option
def pin_add(name: str, store_paths: tuple[str, ...], shared: str | None) -> None:
    """Point pin NAME at STORE_PATHS (in the store), keeping what it pointed at in its history."""
    from tvix_store.pins import Pins
    from tvix_store.sharedlife import SharedPins

    paths = _paths(store_paths)
    if shared:
        _with_shared(shared, lambda db: SharedPins(db).set(name, paths))
        print(f"pin {name}: {len(paths)} path(s)")
        return

    def run(store: Any) -> None:
        Pins.check_name(name)
        pathinfos = store.pathinfos()
        for p in paths:
            info = pathinfos.get_sync(p.digest)
            if info is None or info.store_path != p:
                raise click.ClickException(f"{p.absolute}: not in this store")
        pins = Pins(store.db)
        try:
            pins.set(name, paths)
        finally:
            pins.close()
        print(f"pin {name}: {len(paths)} path(s)")

    _with_store(run)


@pin.command("rm")
@click.argument("name")
@shared_option
def pin_rm(name: str, shared: str | None) -> None:
    """Remove pin NAME (its history stays)."""
    from tvix_store.pins import Pins
    from tvix_store.sharedlife import SharedPins

    def run(store: Any) -> tuple[str, ...]:
        pins = Pins(store.db)
        try:
            return pins.remove(name)
        finally:
            pins.close()

    if shared:
        gone = _with_shared(shared, lambda db: SharedPins(db).remove(name))
    else:
        gone = _with_store(run)
    print(f"removed pin {name} ({len(gone)} path(s))")


@pin.command("list")
@click.option("--history", is_flag=True, help="Every change of every pin, oldest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@shared_option
def pin_list(history: bool, as_json: bool, shared: str | None) -> None:
    """The pins and their paths."""
    import time

    from tvix_store.pins import Pins
    from tvix_store.sharedlife import SharedPins

    def run(store: Any) -> Any:
        pins = Pins(store.db)
        try:
            return [c.__dict__ for c in pins.history()] if history else pins.current()
        finally:
            pins.close()

    if shared:
        result = _with_shared(
            shared, lambda db: SharedPins(db).history() if history else SharedPins(db).current()
        )
    else:
        result = _with_store(run)
    if history:
        if as_json:
            print(json.dumps(result, indent=1))
            return
        for c in result:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(c["at"]))
            print(f"{when} {c['name']} {c['action']} {' '.join(c['paths'])}")
        return
    if as_json:
        print(json.dumps({k: list(v) for k, v in result.items()}, indent=1))
        return
    for name, paths in result.items():
        for p in paths:
            print(f"{name}\t{p}")


@click.command()
@click.argument("store_paths", nargs=-1, required=True)
@click.option(
    "--with-referrers",
    is_flag=True,
    help="Also delete every path that refers to these (transitively).",
)
@shared_option
def delete(store_paths: tuple[str, ...], with_referrers: bool, shared: str | None) -> None:
    """Delete paths from the store (e.g. a secret pushed by mistake).

    Refuses if a path that stays refers to one of them (unless
    --with-referrers), or a pin holds one. Their content is reclaimed by the
    next `tvix-store gc`, which also rewrites the packs holding it (embedded)
    or deletes its objects (shared), so the bytes leave the disk.
    """
    from tvix_store.gc import delete_paths
    from tvix_store.sharedlife import delete_shared

    paths = _paths(store_paths)
    if shared:
        deleted = _with_shared(
            shared, lambda db: delete_shared(db, paths, with_referrers=with_referrers)
        )
    else:
        deleted = _with_store(
            lambda store: delete_paths(store, paths, with_referrers=with_referrers)
        )
    for p in deleted:
        print(f"deleted {p}")


@click.command()
@click.option("--dry-run", is_flag=True, help="Say what would be removed; change nothing.")
@click.option(
    "--keep-since",
    metavar="DURATION",
    callback=_duration,
    default=None,
    help="Also delete paths not uploaded, imported or served within this long (e.g. 30d),"
    " unless pinned or in the closure of a path kept. Default: keep every path.",
)
@click.option(
    "--grace",
    metavar="DURATION",
    callback=_duration,
    default="1h",
    show_default=True,
    help="Keep unreferenced content written within this long, and NAR uploads whose narinfo"
    " may still come.",
)
@click.option(
    "--wait",
    metavar="DURATION",
    callback=_duration,
    default="0",
    show_default=True,
    help="How long to wait for writers' leases to end before deferring the sweep.",
)
@click.option(
    "--min-garbage",
    type=click.FloatRange(0.0, 1.0),
    default=0.2,
    show_default=True,
    help="After the sweep, rewrite a pack when at least this fraction of it is garbage.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--blob-service-addr",
    envvar="BLOB_SERVICE_ADDR",
    metavar="URL",
    help="With --path-info-service-addr postgresql://…: the shared store's object storage.",
)
@click.option(
    "--path-info-service-addr",
    envvar="PATH_INFO_SERVICE_ADDR",
    metavar="URL",
    help="postgresql://…: collect the shared store (S3 + PostgreSQL) instead of the embedded one.",
)
@no_progress_option
def gc(
    dry_run: bool,
    keep_since: float | None,
    grace: float,
    wait: float,
    min_garbage: float,
    as_json: bool,
    blob_service_addr: str | None,
    path_info_service_addr: str | None,
    no_progress: bool,
) -> None:
    """Collect garbage: mark from pins and kept paths, sweep the rest, compact the packs.

    One collection at a time; safe while other processes upload (the sweep
    waits for writers' leases) and when killed at any point. Exits 75 if the
    sweep was deferred.
    """
    from tvix_store.gc import collect
    from tvix_store.progress import shown

    if path_info_service_addr or blob_service_addr:
        _gc_shared(
            blob_service_addr,
            path_info_service_addr,
            keep_since,
            grace,
            dry_run,
            as_json,
            no_progress,
        )
        return

    with shown(no_progress) as progress:
        report = _with_store(
            lambda store: collect(
                store,
                keep_since=keep_since,
                grace=grace,
                dry_run=dry_run,
                wait=wait,
                min_garbage=min_garbage,
                progress=progress,
            )
        )
    _print_gc_report(report, as_json)


def _print_gc_report(report: Any, as_json: bool) -> None:
    """The report on stdout; exit 75 if the sweep was deferred."""
    if as_json:
        print(json.dumps(report.as_json(), indent=1))
    else:
        print(report.summary())
    if report.deferred:
        raise SystemExit(75)


def _gc_shared(
    blob_url: str | None,
    pathinfo_url: str | None,
    keep_since: float | None,
    grace: float,
    dry_run: bool,
    as_json: bool,
    no_progress: bool,
) -> None:
    from tvix_castore.postgres import POSTGRES_SCHEMES

    if not blob_url or not pathinfo_url or pathinfo_url.partition("://")[0] not in POSTGRES_SCHEMES:
        raise click.UsageError(
            "gc of a shared store needs --blob-service-addr objectstore+s3://… and"
            " --path-info-service-addr postgresql://… (without them: the embedded store)"
        )
    from tvix_castore.registry import blob_service_from_url
    from tvix_store.progress import shown
    from tvix_store.sharedgc import collect_shared

    try:
        blobs = blob_service_from_url(blob_url)
        with shown(no_progress) as progress:
            report = collect_shared(
                blobs,
                pathinfo_url,
                grace=grace,
                keep_since=keep_since,
                dry_run=dry_run,
                progress=progress,
            )
    except CastoreError as exc:
        raise click.ClickException(str(exc)) from exc
    _print_gc_report(report, as_json)


COMMANDS: list[click.Command] = [pin, delete, gc]
