"""Stateless frontends over shared storage: S3 (moto) for blobs, PostgreSQL for metadata.

Two daemons and two nar-bridges run over the same bucket prefix and the same
database schema; ``nix copy --to`` one, ``nix copy --from`` another, and
``tvix-store import`` through a fifth process: every frontend sees it all.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import aiohttp

from nix_compat.narinfo import NarInfo
from nix_compat.store_path import StorePath
from tests.servers import S3, Postgres
from tvix_store.pathinfoservice.grpc import GrpcPathInfoService

from .conftest import (
    NIX_HTTP_OPTS,
    TVIX,
    Bridges,
    Closure,
    Keys,
    assert_same_trees,
    copy_to,
    nix_in,
    tvix_env,
)


def _flags(s3: S3, postgres: Postgres) -> tuple[str, ...]:
    meta = postgres.fresh_url()
    return (
        "--blob-service-addr",
        s3.fresh_url(),
        "--directory-service-addr",
        meta,
        "--path-info-service-addr",
        meta,
    )


async def test_frontends_share_s3_and_postgres(
    bridges: Bridges, closure: Closure, keys: Keys, tmp_path: Path, s3: S3, postgres: Postgres
) -> None:
    flags = _flags(s3, postgres)
    sign = ("--signing-key", str(keys.one.secret_file))
    d1 = bridges.start_daemon(None, *flags, *sign)
    d2 = bridges.start_daemon(None, *flags, *sign)
    b1 = bridges.start(None, *flags, *sign)
    b2 = bridges.start(None, *flags, *sign)

    nix = nix_in(tmp_path)
    copy_to(nix, closure, d1.url)
    for frontend in (d2, b1, b2):  # (each has an embedded home of its own: nothing is there)
        assert not (frontend.home / "store.sqlite").exists()

    nix.fresh_cache()
    dst = tmp_path / "dst"
    trust = ("--option", "trusted-public-keys", keys.one.public)
    nix.run("nix", "copy", "--from", b2.url, "--to", dst, *NIX_HTTP_OPTS, *trust, *closure.roots)
    nix.run("nix", "store", "verify", "--store", dst, "--all", *trust)
    assert_same_trees(closure, nix, dst)

    # A third kind of process writes: the CLI imports a tree; the others serve it.
    tree = tmp_path / "imported"
    tree.mkdir()
    (tree / "a").write_bytes(b"imported through the CLI\n")
    (tree / "b").write_bytes(bytes(range(256)) * 3000)
    out = subprocess.run(
        [TVIX, "import", *flags, str(tree)],
        capture_output=True,
        env=tvix_env(tmp_path / "cli-home"),
        check=True,
    )
    imported = StorePath.from_absolute_path(out.stdout.decode().split()[-1])
    async with aiohttp.ClientSession() as session:
        for frontend in (d1, d2, b1, b2):
            async with session.get(f"{frontend.url}/{imported.basename[:32]}.narinfo") as resp:
                assert resp.status == 200, await resp.text()
                info = NarInfo.parse(await resp.read())
            assert info.store_path == imported
            async with session.get(f"{frontend.url}/{info.url}") as resp:
                assert resp.status == 200
                nar = await resp.read()
            assert len(nar) == info.nar_size
    for daemon in (d1, d2):
        assert daemon.grpc_addr is not None
        client = GrpcPathInfoService.from_url(f"grpc+http://{daemon.grpc_addr}")
        try:
            got = await client.get(imported.digest)
            assert got is not None and got.store_path == imported
            listed = {i.store_path.absolute async for i in client.list()}
        finally:
            await client.aclose()
        assert listed == {p.path for p in closure.paths} | {imported.absolute}
