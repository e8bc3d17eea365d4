"""``tvix-store cache create|list|configure|destroy``: named caches over one store."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

import click

from nix_compat.errors import NixCompatError
from nix_compat.signing import SigningKey, VerifyingKey
from tvix_castore.errors import CastoreError
from tvix_store.caches import CacheRegistry, check_name
from tvix_store.lifecycle_cli import parse_duration, shared_option

__all__ = ["command"]
_T = TypeVar("_T")


def _with_registry(body: Callable[[CacheRegistry], _T], shared: str | None = None) -> _T:
    """``body`` on the data directory's caches, or the shared store's at ``shared``."""
    from tvix_store.embedded import data_dir
    from tvix_store.servicedb import shared_url

    try:
        registry = CacheRegistry(data_dir(), shared_url(shared))
    except CastoreError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        return body(registry)
    except (CastoreError, NixCompatError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        registry.close()


def _keys(files: tuple[str, ...]) -> tuple[SigningKey, ...]:
    try:
        return tuple(SigningKey.from_file(f) for f in files)
    except (OSError, NixCompatError) as exc:
        raise click.ClickException(f"signing key: {exc}") from exc


@click.group("cache")
def cache() -> None:
    """Named caches served by nar-bridge at /NAME/: own keys, priority, visibility.

    A path pushed to one cache is visible only there; the bytes are stored once
    for all caches. Members of a cache are GC roots.
    """


_KEY_HELP = "Nix secret key file to sign this cache's narinfos with (repeatable)."


def _verifying(keys: tuple[str, ...]) -> tuple[VerifyingKey, ...]:
    try:
        return tuple(VerifyingKey.parse(k) for k in keys)
    except NixCompatError as exc:
        raise click.BadParameter(f"upstream key: {exc}") from exc


def _retention(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: not a duration (e.g. 30d, 12h)") from None
    if seconds <= 0:
        raise click.BadParameter("must be longer than 0")
    return seconds


_UPSTREAM_HELP = (
    "A Nix binary cache (http(s)://…) to pull paths through from: a path not in this"
    " cache is fetched from there once, stored with the rest and served signed by this"
    " cache's keys."
)
_UPSTREAM_KEY_HELP = "A public key the upstream's narinfos must be signed by (repeatable)."
_RETENTION_HELP = (
    "A path leaves this cache (at the next gc) once it was not pushed or fetched"
    " through it for this long (e.g. 30d). Default: paths stay."
)


@cache.command("create")
@click.argument("name")
@click.option("--priority", type=int, default=40, show_default=True)
@click.option("--private", is_flag=True, help="Reads need a token with scope pull.")
@click.option("--signing-key", "key_files", multiple=True, type=click.Path(dir_okay=False),
              help=_KEY_HELP + " Default: a new key named NAME-1.")  # fmt: skip
@click.option("--upstream", metavar="URL", default=None, help=_UPSTREAM_HELP)
@click.option("--upstream-key", "upstream_keys", multiple=True, metavar="KEY",
              help=_UPSTREAM_KEY_HELP)  # fmt: skip
@click.option("--retention", metavar="DURATION", callback=_retention, help=_RETENTION_HELP)
@shared_option
def create(
    name: str,
    priority: int,
    private: bool,
    key_files: tuple[str, ...],
    upstream: str | None,
    upstream_keys: tuple[str, ...],
    retention: float | None,
    shared: str | None,
) -> None:
    """Create cache NAME; print its public key(s)."""
    try:
        check_name(name)
    except CastoreError as exc:
        raise click.ClickException(str(exc)) from exc
    if upstream_keys and upstream is None:
        raise click.UsageError("--upstream-key is for --upstream")
    trusted = _verifying(upstream_keys)
    keys = _keys(key_files) or (SigningKey.generate(f"{name}-1"),)
    made = _with_registry(
        lambda r: r.create(
            name,
            priority,
            not private,
            keys,
            upstream=upstream,
            upstream_keys=trusted,
            retention=retention,
        ),
        shared,
    )
    for key in made.signing_keys:
        click.echo(str(key.verifying_key()))


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@shared_option
def list_(as_json: bool, shared: str | None) -> None:
    """Every named cache, its settings and number of paths."""
    rows = _with_registry(lambda r: [(c, r.count(c.name)) for c in r.all()], shared)
    if as_json:
        click.echo(json.dumps([c.as_json(n) for c, n in rows], indent=1))
        return
    for c, n in rows:
        keys = " ".join(str(k.verifying_key()) for k in c.signing_keys)
        extra = f"  upstream {c.upstream}" if c.upstream else ""
        if c.retention is not None:
            extra += f"  retention {c.retention:g}s"
        click.echo(
            f"{c.name}  priority {c.priority}  {'public' if c.public else 'private'}"
            f"  {n} paths  {keys}{extra}"
        )


@cache.command("configure")
@click.argument("name")
@click.option("--priority", type=int, default=None)
@click.option("--public/--private", "public", default=None)
@click.option("--signing-key", "key_files", multiple=True, type=click.Path(dir_okay=False),
              help=_KEY_HELP + " Replaces the cache's keys.")  # fmt: skip
@click.option("--upstream", metavar="URL", default=None, help=_UPSTREAM_HELP)
@click.option("--upstream-key", "upstream_keys", multiple=True, metavar="KEY",
              help=_UPSTREAM_KEY_HELP + " Replaces the upstream's keys.")  # fmt: skip
@click.option("--no-upstream", is_flag=True, help="Stop pulling through (members stay).")
@click.option("--retention", metavar="DURATION", callback=_retention, help=_RETENTION_HELP)
@click.option("--keep-forever", is_flag=True, help="No retention: members stay until removed.")
@shared_option
def configure(
    name: str,
    priority: int | None,
    public: bool | None,
    key_files: tuple[str, ...],
    upstream: str | None,
    upstream_keys: tuple[str, ...],
    no_upstream: bool,
    retention: float | None,
    keep_forever: bool,
    shared: str | None,
) -> None:
    """Change cache NAME's priority, visibility, keys, upstream or retention."""
    if no_upstream and (upstream is not None or upstream_keys):
        raise click.UsageError("--no-upstream and --upstream/--upstream-key contradict")
    if keep_forever and retention is not None:
        raise click.UsageError("--keep-forever and --retention contradict")
    changes: dict[str, object] = {}
    if priority is not None:
        changes["priority"] = priority
    if public is not None:
        changes["public"] = public
    if key_files:
        changes["signing_keys"] = _keys(key_files)
    if upstream is not None:
        changes["upstream"] = upstream
    if upstream_keys:
        changes["upstream_keys"] = _verifying(upstream_keys)
    if no_upstream:
        changes["upstream"], changes["upstream_keys"] = None, ()
    if retention is not None:
        changes["retention"] = retention
    if keep_forever:
        changes["retention"] = None
    _with_registry(lambda r: r.configure(name, **changes), shared)


@cache.command("destroy")
@click.argument("name")
@shared_option
def destroy(name: str, shared: str | None) -> None:
    """Remove cache NAME; its paths' content stays until gc finds nothing else needs it."""
    n = _with_registry(lambda r: r.destroy(name), shared)
    click.echo(f"cache {name} destroyed ({n} paths no longer in it)", err=True)


def command() -> click.Group:
    """The ``cache`` group (added to the CLI by ``cli``)."""
    return cache
