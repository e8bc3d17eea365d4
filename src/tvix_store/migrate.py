"""``tvix-store migrate``: create or upgrade the PostgreSQL tables a store names.

Frontends migrate on start as well (under the same advisory lock), so this
command is for operators who want the schema change done, and reported,
before rolling out a new release.
"""

from __future__ import annotations

from typing import Any

import click

__all__ = ["command", "migrate_urls"]


def migrate_urls(urls: list[str]) -> list[str]:
    """Migrate every PostgreSQL database among ``urls``; one report line per component."""
    from tvix_castore.postgres import POSTGRES_SCHEMES, Database
    from tvix_store.pathinfoservice.postgres import components

    lines: list[str] = []
    for url in dict.fromkeys(urls):
        if url.partition("://")[0] not in POSTGRES_SCHEMES:
            continue
        db = Database(url)
        try:
            for component, migrations in components():
                before = db.migrate(component, migrations)
                after = len(migrations)
                state = f"{before} -> {after}" if before != after else f"{after} (current)"
                lines.append(f"{db.where}: {component}: version {state}")
        finally:
            db.close()
    return lines


def command() -> click.Command:
    """The ``migrate`` command (built on demand: it shares the CLI's service options)."""
    from tvix_store.cli import _run, service_options

    @click.command("migrate")
    @service_options
    def migrate(**kw: Any) -> None:
        """Create or upgrade the PostgreSQL tables of the configured services."""

        async def run() -> list[str]:
            import asyncio

            urls = [kw.get("directory_service_addr"), kw.get("path_info_service_addr")]
            found = [u for u in urls if u]
            if kw.get("store_composition"):
                from tvix_store.composition import load_composition

                found += load_composition(kw["store_composition"]).service_urls()
            return await asyncio.to_thread(migrate_urls, found)

        lines = _run(run())
        if not lines:
            raise click.ClickException(
                "no PostgreSQL service is configured (give --directory-service-addr or"
                " --path-info-service-addr postgresql://…, or a composition naming one)"
            )
        for line in lines:
            click.echo(line)

    return migrate
