"""The ``tvix-store`` command line.

Heavy modules (grpc, aiohttp) are imported inside the commands that need them,
so ``tvix-store --help`` and quick commands start fast.
"""

from __future__ import annotations

import sys

import click

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tvix-store-py")
def main() -> None:
    """A content-addressed store for Nix (tvix protocols, Nix formats)."""


@main.command()
@click.argument("path", type=click.Path(exists=False, dir_okay=True, path_type=str))
def dump(path: str) -> None:
    """Write the NAR of PATH to stdout (like ``nix-store --dump``)."""
    from nix_compat.nar import dump_path

    out = sys.stdout.buffer
    try:
        dump_path(path, out)
    except FileNotFoundError as exc:
        raise click.ClickException(f"{path}: no such file or directory") from exc
    except OSError as exc:
        raise click.ClickException(f"{path}: {exc.strerror}") from exc
    out.flush()


@main.command()
def daemon() -> None:
    """Serve the store over gRPC (not implemented yet)."""
    raise click.ClickException("the gRPC daemon is not implemented yet (see issue 4)")
