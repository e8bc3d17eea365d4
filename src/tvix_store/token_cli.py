"""``tvix-store token create|list|revoke``: the store's access tokens, offline."""

from __future__ import annotations

import datetime
import json

import click

from tvix_castore.errors import CastoreError
from tvix_store.lifecycle_cli import _duration, shared_option
from tvix_store.tokens import SCOPES, TokenAuthority

__all__ = ["command"]


def _authority(shared: str | None) -> TokenAuthority:
    """The tokens of the data directory, or of the shared store at ``shared`` (PostgreSQL)."""
    from tvix_store.embedded import data_dir
    from tvix_store.servicedb import shared_url

    try:
        return TokenAuthority(data_dir(), url=shared_url(shared))
    except CastoreError as exc:
        raise click.ClickException(str(exc)) from exc


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@click.group("token")
def token() -> None:
    """Access tokens (JWT, scoped, expiring, revocable) for nar-bridge and the daemon.

    Once the first token exists, pushes need one (HTTP: Bearer, or the password
    of Nix's netrc-file; gRPC: authorization metadata, TVIX_STORE_TOKEN).
    """


@token.command("create")
@click.option(
    "--scope",
    "scopes",
    required=True,
    metavar="SCOPES",
    help=f"Comma-separated, of: {', '.join(SCOPES)} (push and delete include pull, admin all).",
)
@click.option(
    "--cache",
    "caches",
    multiple=True,
    metavar="GLOB",
    help="Cache names the token is good for (repeatable; 'default' is the unnamed one)."
    " Default: every cache.",
)
@click.option("--expires", metavar="DURATION", callback=_duration, help="e.g. 30d, 12h.")
@click.option("--description", default="", help="What the token is for (shown by list).")
@shared_option
def create(
    scopes: str,
    caches: tuple[str, ...],
    expires: float | None,
    description: str,
    shared: str | None,
) -> None:
    """Make a token; its text is the last line of stdout."""
    authority = _authority(shared)
    try:
        record, text = authority.create(
            [s.strip() for s in scopes.split(",") if s.strip()],
            caches or ("*",),
            expires,
            description,
        )
    except CastoreError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        authority.close()
    click.echo(
        f"token {record.id}: scopes {','.join(record.scopes)}, caches {' '.join(record.caches)},"
        f" expires {_when(record.expires)}",
        err=True,
    )
    click.echo(text)


@token.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@shared_option
def list_(as_json: bool, shared: str | None) -> None:
    """Every token made for this store (never the token texts)."""
    authority = _authority(shared)
    try:
        records = authority.list()
    except CastoreError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        authority.close()
    if as_json:
        click.echo(json.dumps([r.as_json() for r in records], indent=1))
        return
    for r in records:
        state = f"revoked {_when(r.revoked)}" if r.revoked is not None else "active"
        click.echo(
            f"{r.id}  {','.join(r.scopes):<20} {' '.join(r.caches):<12} created {_when(r.created)}"
            f"  expires {_when(r.expires)}  {state}  {r.description}"
        )


@token.command("revoke")
@click.argument("token_id", metavar="ID")
@shared_option
def revoke(token_id: str, shared: str | None) -> None:
    """Revoke a token by id: refused from now on by every server of this store."""
    authority = _authority(shared)
    try:
        authority.revoke(token_id)
    except CastoreError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        authority.close()


def command() -> click.Group:
    """The ``token`` group (added to the CLI by ``cli``)."""
    return token
