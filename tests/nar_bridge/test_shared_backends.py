"""Stateless frontends over shared storage: S3 (moto) for blobs, PostgreSQL for metadata.

Two daemons and two nar-bridges run over the same bucket prefix and the same
database schema; ``nix copy --to`` one, ``nix copy --from`` another, and
``tvix-store import`` through a fifth process: every frontend sees it all.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import signal
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

import aiohttp
import pytest

from nix_compat import nixbase32
from nix_compat.nar import NarWriter
from nix_compat.narinfo import NarInfo
from nix_compat.store_path import StorePath
from tests.servers import S3, Postgres
from tvix_store.pathinfoservice.grpc import GrpcPathInfoService

from .conftest import (
    NIX_HTTP_OPTS,
    TVIX,
    Bridge,
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


def _chunk_objects(s3: S3, blob_url: str) -> int:
    """How many chunk objects the store at ``blob_url`` holds (listed straight from S3)."""
    import obstore
    from obstore.store import S3Store

    prefix = urllib.parse.urlsplit(blob_url).path.strip("/")
    store = S3Store(
        s3.bucket,
        prefix=prefix,
        endpoint=s3.endpoint,
        region="us-east-1",
        access_key_id="test",
        secret_access_key="test",
        client_options={"allow_http": True},
    )
    return sum(len(batch) for batch in obstore.list(store, "chunks/"))


async def _upload_partly(
    victim: Bridge, s3: S3, blob_url: str, seed: int
) -> tuple[str, socket.socket]:
    """PUT 3/4 of a 4 MiB NAR (cut into chunks) to ``victim``; return once chunks of it
    are in S3: the NAR's URL path and the open connection."""
    before = _chunk_objects(s3, blob_url)
    nar_buf = io.BytesIO()
    w = NarWriter(nar_buf)
    w.file(random.Random(seed).randbytes(4 << 20))
    w.close()
    nar = nar_buf.getvalue()
    name = f"nar/{nixbase32.encode(hashlib.sha256(nar).digest())}.nar"
    host, port = urllib.parse.urlsplit(victim.url).netloc.split(":")
    sock = socket.create_connection((host, int(port)))
    head = f"PUT /{name} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(nar)}\r\n\r\n"
    sock.sendall(head.encode() + nar[: len(nar) * 3 // 4])
    deadline = time.monotonic() + 60
    while _chunk_objects(s3, blob_url) == before:  # (its ingest has begun writing to S3)
        assert time.monotonic() < deadline, victim.log()
        await asyncio.sleep(0.05)
    return name, sock


async def test_concurrent_writers_and_a_frontend_killed_mid_upload(
    bridges: Bridges, closure: Closure, keys: Keys, tmp_path: Path, s3: S3, postgres: Postgres
) -> None:
    flags = _flags(s3, postgres)
    blob_url = flags[1]
    sign = ("--signing-key", str(keys.one.secret_file))
    a = bridges.start(None, *flags, *sign)
    b = bridges.start(None, *flags, *sign)
    victim = bridges.start(None, *flags, *sign)

    # The victim gets 3/4 of a NAR, then (once the writers below start) kill -9.
    name, sock = await _upload_partly(victim, s3, blob_url, seed=16)

    # Meanwhile: uploads to both other frontends at once, and four CLI imports of one tree.
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f").write_bytes(b"shared by every writer\n" * 1000)
    (tree / "g").write_bytes(bytes(range(256)) * 5000)
    imports = [
        subprocess.Popen(
            [TVIX, "import", *flags, str(tree)],
            stdout=subprocess.PIPE,
            env=tvix_env(tmp_path / f"cli-{i}"),
        )
        for i in range(4)
    ]
    victim.proc.send_signal(signal.SIGKILL)
    # Every NAR and narinfo of the closure PUT to both frontends at the same moment.
    # (Not two `nix copy` at once: Nix 2.8 then fails with "coroutine has finished"
    # when a path it is about to upload becomes valid meanwhile.)
    async with aiohttp.ClientSession() as session:

        async def put(url: str, body: bytes) -> None:
            async with session.put(url, data=io.BytesIO(body)) as resp:
                assert resp.status == 200, await resp.text()

        for p in closure.paths:  # (dependencies first)
            nar_url = f"nar/{nixbase32.encode(p.nar_hash)}.nar"
            await asyncio.gather(*(put(f"{f.url}/{nar_url}", p.nar) for f in (a, b, a, b)))
            text = p.narinfo().render().encode()
            await asyncio.gather(
                *(put(f"{f.url}/{p.hash_part}.narinfo", text) for f in (a, b, a, b))
            )
    outs = [p.communicate(timeout=120)[0].decode().split()[-1] for p in imports]
    assert all(p.returncode == 0 for p in imports)
    assert len(set(outs)) == 1
    victim.proc.wait(timeout=30)
    sock.close()

    async with aiohttp.ClientSession() as session:
        async with session.get(f"{a.url}/{name}") as resp:  # nothing of the killed upload
            assert resp.status == 404, await resp.text()
        hash_part = StorePath.from_absolute_path(outs[0]).basename[:32]
        async with session.get(f"{b.url}/{hash_part}.narinfo") as resp:
            assert resp.status == 200
    nix = nix_in(tmp_path)
    dst = tmp_path / "dst"
    trust = ("--option", "trusted-public-keys", keys.one.public)
    nix.run("nix", "copy", "--from", a.url, "--to", dst, *NIX_HTTP_OPTS, *trust, *closure.roots)
    nix.run("nix", "store", "verify", "--store", dst, "--all", *trust)
    assert_same_trees(closure, nix, dst)


def _gc(flags: tuple[str, ...], *args: str) -> tuple[int, dict[str, object]]:
    import json

    proc = subprocess.run(
        [TVIX, "gc", "--json", "--blob-service-addr", flags[1], "--path-info-service-addr", flags[5],
         *args],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode in (0, 75), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


async def test_gc_of_a_shared_store_sweeps_only_what_nothing_refers_to(
    bridges: Bridges,
    closure: Closure,
    keys: Keys,
    tmp_path: Path,
    s3: S3,
    postgres: Postgres,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TVIX_STORE_LEASE_TTL", "3")  # (a killed writer's lease ends soon)
    flags = _flags(s3, postgres)
    sign = ("--signing-key", str(keys.one.secret_file))
    a = bridges.start(None, *flags, *sign)
    victim = bridges.start(None, *flags, *sign)
    nix = nix_in(tmp_path)
    copy_to(nix, closure, a.url)
    live = _chunk_objects(s3, flags[1])

    # Garbage: the chunks of an upload killed half way.
    _, sock = await _upload_partly(victim, s3, flags[1], seed=17)
    deadline = time.monotonic() + 60
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=30)
    sock.close()
    a.stop()  # (its lease ends when it closes the store)
    garbage = _chunk_objects(s3, flags[1]) - live
    assert garbage > 0

    # Within the grace period nothing is garbage.
    code, report = _gc(flags, "--grace", "1h")
    assert (code, report["objects"]) == (0, 0)
    assert report["kept_young"] == garbage
    # The killed writer's lease defers the sweep until it expires (exit 75).
    while True:
        code, report = _gc(flags, "--grace", "0")
        if code == 0:
            break
        assert report["deferred"] and time.monotonic() < deadline + 60
        await asyncio.sleep(0.5)
    assert report["objects"] == garbage, report
    assert _chunk_objects(s3, flags[1]) == live
    code, report = _gc(flags, "--grace", "0")
    assert (code, report["objects"], report["directories"]) == (0, 0, 0)

    # Everything that was referenced is still there, byte for byte.
    b = bridges.start(None, *flags, *sign)
    nix.fresh_cache()
    dst = tmp_path / "dst"
    trust = ("--option", "trusted-public-keys", keys.one.public)
    nix.run("nix", "copy", "--from", b.url, "--to", dst, *NIX_HTTP_OPTS, *trust, *closure.roots)
    nix.run("nix", "store", "verify", "--store", dst, "--all", *trust)
    assert_same_trees(closure, nix, dst)
