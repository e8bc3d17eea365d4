"""``tvix-store config show``: the effective store composition, as TOML.

Flags, environment variables and the embedded default become a composition
(:func:`tvix_store.config.config_from_urls`); a composition file is shown as
loaded. Secrets in URLs (passwords, secret keys, tokens) are replaced by
``REDACTED``, so the output can be pasted into a bug report.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import click

__all__ = ["command", "redact", "render_toml"]

_SECRET = re.compile(r"secret|password|passwd|token|account_key|sas_key|service_account_key")
_BARE = re.compile(r"[A-Za-z0-9_-]+")


def redact(url: str) -> str:
    """``url`` with its password and secret-looking query values replaced."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            netloc = f"{user.split(':', 1)[0]}:REDACTED@{host}"
    query = "&".join(
        f"{k}={'REDACTED' if _SECRET.search(k) else quote(v, safe='/:,=')}"
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, dict):  # (an inline table: object_store_options and the like)
        return (
            "{ "
            + ", ".join(
                f"{_key(k)} = {_value('REDACTED' if _SECRET.search(k) else x)}"
                for k, x in v.items()
            )
            + " }"
        )
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # (a TOML basic string)


def _key(k: str) -> str:
    return k if _BARE.fullmatch(k) else json.dumps(k)


def render_toml(config: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """A composition (kind → name → entry) as TOML tables, URLs redacted."""
    out: list[str] = []
    for kind, entries in config.items():
        for name, entry in entries.items():
            out.append(f"[{_key(kind)}.{_key(name)}]")
            for k, v in entry.items():
                shown = redact(v) if isinstance(v, str) and k in ("url", "far", "near") else v
                out.append(f"{_key(k)} = {_value(shown)}")
            out.append("")
    return "\n".join(out)


def command() -> click.Group:
    """The ``config`` group (built on demand: it shares the CLI's service options)."""
    from tvix_store.cli import service_options

    @click.group("config")
    def config() -> None:
        """Show how the store is assembled."""

    @config.command("show")
    @service_options
    def show(**kw: Any) -> None:
        """Print the effective composition (flags, env vars or file) as TOML."""
        from tvix_castore.errors import CastoreError
        from tvix_store.config import config_from_urls, data_dir

        urls = (kw["blob_service_addr"], kw["directory_service_addr"], kw["path_info_service_addr"])
        try:
            if kw.get("store_composition"):
                if any(urls):
                    raise click.UsageError(
                        "give either a store composition file or service URLs, not both"
                    )
                from tvix_store.composition import load_composition

                comp = load_composition(kw["store_composition"])
                click.echo(f"# from {kw['store_composition']}")
                click.echo(render_toml(comp.config()), nl=False)
                return
            config = config_from_urls(*urls, data_dir())
        except CastoreError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo("# from flags, environment variables and the embedded default")
        click.echo(render_toml(config), nl=False)

    return config
