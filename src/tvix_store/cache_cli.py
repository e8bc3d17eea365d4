"""``tvix-store cache create|list|configure|destroy``: named caches over one store."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

import click

from nix_compat.errors import NixCompatError
from nix_compat.signing import SigningKey
from tvix_castore.errors import CastoreError
from tvix_store.caches import CacheRegistry, check_name

__all__ = ["command"]
_T = TypeVar("_T")


def _with_registry(body: Callable[[CacheRegistry], _T]) -> _T:
    from tvix_store.embedded import data_dir

    registry = CacheRegistry(data_dir())
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


@cache.command("create")
@click.argument("name")
@click.option("--priority", type=int, default=40, show_default=True)
@click.option("--private", is_flag=True, help="Reads need a token with scope pull.")
@click.option("--signing-key", "key_files", multiple=True, type=click.Path(dir_okay=False),
              help=_KEY_HELP + " Default: a new key named NAME-1.")  # fmt: skip
def create(name: str, priority: int, private: bool, key_files: tuple[str, ...]) -> None:
    """Create cache NAME; print its public key(s)."""
    _with_registry(lambda _: check_name(name))
    keys = _keys(key_files) or (SigningKey.generate(f"{name}-1"),)
    made = _with_registry(lambda r: r.create(name, priority, not private, keys))
    for key in made.signing_keys:
        click.echo(str(key.verifying_key()))


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(as_json: bool) -> None:
    """Every named cache, its settings and number of paths."""
    rows = _with_registry(lambda r: [(c, r.count(c.name)) for c in r.all()])
    if as_json:
        click.echo(json.dumps([c.as_json(n) for c, n in rows], indent=1))
        return
    for c, n in rows:
        keys = " ".join(str(k.verifying_key()) for k in c.signing_keys)
        click.echo(
            f"{c.name}  priority {c.priority}  {'public' if c.public else 'private'}"
            f"  {n} paths  {keys}"
        )


@cache.command("configure")
@click.argument("name")
@click.option("--priority", type=int, default=None)
@click.option("--public/--private", "public", default=None)
@click.option("--signing-key", "key_files", multiple=True, type=click.Path(dir_okay=False),
              help=_KEY_HELP + " Replaces the cache's keys.")  # fmt: skip
def configure(
    name: str, priority: int | None, public: bool | None, key_files: tuple[str, ...]
) -> None:
    """Change cache NAME's priority, visibility or keys."""
    keys = _keys(key_files) or None
    _with_registry(lambda r: r.configure(name, priority, public, keys))


@cache.command("destroy")
@click.argument("name")
def destroy(name: str) -> None:
    """Remove cache NAME; its paths' content stays until gc finds nothing else needs it."""
    n = _with_registry(lambda r: r.destroy(name))
    click.echo(f"cache {name} destroyed ({n} paths no longer in it)", err=True)


def command() -> click.Group:
    """The ``cache`` group (added to the CLI by ``cli``)."""
    return cache
