"""``tvix-store mount``: every store path as a directory of a read-only FUSE mount, fetched lazily.

The filesystem itself is castore's (:mod:`tvix_castore.fs`); this module
gives it its top level: ``<hash>-<name>`` is looked up in the PathInfoService
by digest, and only a PathInfo whose store path has exactly that basename
answers (the reference resolves any ``<hash>-whatever`` to the path with
that hash). The listing of the top level streams ``PathInfoService.list``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from nix_compat.errors import NixCompatError
from nix_compat.store_path import StorePath

if TYPE_CHECKING:  # (the CLI registers the command without loading the store or asyncio)
    from tvix_castore.nodes import Node
    from tvix_store.config import Store
    from tvix_store.pathinfoservice.base import PathInfoService

__all__ = ["PathInfoRoots", "command", "mount_store"]


class PathInfoRoots:
    """The mount's top level: store path basenames → their root nodes."""

    def __init__(self, pathinfos: PathInfoService) -> None:
        self._pathinfos = pathinfos

    async def get(self, name: bytes) -> Node | None:
        try:
            path = StorePath.from_basename(name)
        except NixCompatError:
            return None
        info = await self._pathinfos.get(path.digest)
        if info is None or info.store_path.basename.encode() != name:
            return None
        return info.node

    async def list(self) -> AsyncIterator[tuple[bytes, Node]]:
        async for info in self._pathinfos.list():
            yield info.store_path.basename.encode(), info.node


async def mount_store(
    store: Store,
    mountpoint: Path,
    *,
    list_root: bool = False,
    show_xattr: bool = True,
    allow_other: bool = False,
    threads: int = 64,
    timeout: float = 120.0,
) -> None:
    """Serve ``store`` at ``mountpoint`` until SIGINT/SIGTERM or an unmount."""
    from tvix_castore.fs.mount import serve
    from tvix_castore.fs.ops import CastoreFs, MountOptions

    options = MountOptions(list_root=list_root, show_xattr=show_xattr, timeout=timeout)
    fs = CastoreFs(PathInfoRoots(store.pathinfos), store.blobs, store.directories, options)
    await serve(fs, mountpoint, allow_other=allow_other, max_tasks=threads)


def _fuse_missing(exc: ImportError) -> click.ClickException:
    return click.ClickException(
        f"tvix-store mount needs pyfuse3 (pip install 'tvix-store-py[fuse]', which builds"
        f" against libfuse3-dev): {exc}"
    )


def command() -> click.Command:
    """The ``mount`` command (built on demand: it shares the CLI's service options)."""
    from tvix_store.cli import _open, _run, service_options

    @click.command("mount")
    @click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
    @click.option(
        "-l",
        "--list-root",
        is_flag=True,
        help="Let the top level be listed (streams every PathInfo); without it, listing the"
        " top level is EPERM while lookups of store paths work.",
    )
    @click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=64,
        show_default=True,
        envvar="THREADS",
        help="Requests served at once (env THREADS).",
    )
    @click.option(
        "--allow-other",
        is_flag=True,
        envvar="ALLOW_OTHER",
        help="Let other users see the mount (env ALLOW_OTHER; non-root mounts need"
        " user_allow_other in /etc/fuse.conf).",
    )
    @click.option(
        "--show-xattr/--no-show-xattr",
        default=True,
        show_default=True,
        help="Expose user.tvix.castore.{blob,directory}.digest xattrs.",
    )
    @click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=120.0,
        show_default=True,
        metavar="SECONDS",
        help="A backend call taking longer fails its operation with EIO.",
    )
    @service_options
    def mount(mountpoint: Path, **kw: Any) -> None:
        """Mount the store read-only at MOUNTPOINT, every store path a directory, fetched lazily.

        Runs until Ctrl-C, SIGTERM or `fusermount3 -u MOUNTPOINT`, then exits 0
        with the mount gone.
        """
        flags = {k: kw.pop(k) for k in ("list_root", "threads", "allow_other", "show_xattr")}
        timeout = kw.pop("timeout")
        try:
            import pyfuse3  # noqa: F401
        except ImportError as exc:
            raise _fuse_missing(exc) from exc

        async def run() -> None:
            from tvix_castore.fs.mount import check_mountpoint

            check_mountpoint(mountpoint)  # (before opening the store: a clear error first)
            store = await _open(kw)
            try:
                await mount_store(store, mountpoint, timeout=timeout, **flags)
            finally:
                await store.aclose()

        _run(run())

    return mount
