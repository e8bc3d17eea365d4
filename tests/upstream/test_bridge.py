"""The store as a verified read-through cache of a real Nix binary cache, seen from outside.

* ``tvix-store nar-bridge --store-composition`` with
  ``cache(near=embedded, far=nix(...))``: Nix 2.8 copies the closure from the
  bridge with signatures required, the trees equal the source, and a second
  fetch never touches the upstream.
* Upstream failures reach HTTP and gRPC callers as the right status.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import aiohttp

from tvix_castore.errors import DataCorruption, StorageUnavailable
from tvix_store.pathinfoservice.grpc import GrpcPathInfoService

from .conftest import (
    BRIDGE_READY,
    DAEMON_READY,
    NIX_HTTP_OPTS,
    PREFIX,
    CacheServer,
    CacheServers,
    Processes,
    Upstream,
    assert_same_tree,
    nix_in,
)
from .test_composition import upstream_composition, write
from .test_nix_http import check_info, nar_file


def _trust(*keys: str) -> tuple[str, ...]:
    return ("--option", "trusted-public-keys", " ".join(keys))


def _copy_from_bridge(
    tmp_path: Path, name: str, bridge_url: str, upstream: Upstream, *keys: str
) -> Path:
    nix = nix_in(tmp_path, name)  # its own store dir and a fresh XDG cache
    dst = tmp_path / f"{name}-dst"
    nix.run(
        "nix",
        "copy",
        "--from",
        bridge_url,
        "--to",
        dst,
        *NIX_HTTP_OPTS,
        *_trust(*keys),
        *upstream.roots,
    )
    nix.run("nix", "store", "verify", "--store", dst, "--all", *_trust(*keys))
    for p in upstream.paths:
        assert_same_tree(upstream.store / p.path.lstrip("/"), dst / p.path.lstrip("/"))
        out = nix.run("nix", "store", "dump-path", "--store", dst, p.path)
        assert out == p.nar, p.path
    # Control: an unrelated key does not verify what was copied.
    proc = nix.try_run(
        "nix", "store", "verify", "--store", dst, "--all", *_trust("x:" + "A" * 43 + "=")
    )
    assert proc.returncode != 0
    return dst


def _start_bridge(
    processes: Processes, tmp_path: Path, server: CacheServer, upstream: Upstream, base: str
) -> tuple[str, Path]:
    home = tmp_path / "composed"
    f = write(tmp_path, upstream_composition(home, base, upstream.public_key))
    bridge = processes.start(
        tmp_path / "unused-default-home",
        [
            "nar-bridge",
            "-l",
            "127.0.0.1:0",
            "--store-composition",
            str(f),
            "--signing-key",
            str(upstream.other_secret_key),
        ],
        BRIDGE_READY,
    )
    return bridge.address, home


def test_nix_copy_through_composed_bridge(
    servers: CacheServers, upstream: Upstream, processes: Processes, tmp_path: Path
) -> None:
    server = servers.serve("xz")
    url, home = _start_bridge(processes, tmp_path, server, upstream, server.base)
    # Signatures required; the upstream's own signatures were kept.
    _copy_from_bridge(tmp_path, "first", url, upstream, upstream.public_key)
    n = len(upstream.paths)
    assert server.count(".narinfo") == n
    assert server.count(".nar.xz") == n
    assert all(r.startswith(PREFIX + "/") for r in server.requests)
    assert (home / "store.sqlite").exists()
    assert not (tmp_path / "unused-default-home" / "store.sqlite").exists()
    seen = len(server.requests)
    # Second fetch, fresh store and cache, trusting only the bridge's own key:
    # everything comes from the near store.
    _copy_from_bridge(tmp_path, "second", url, upstream, upstream.other_public_key)
    assert len(server.requests) == seen, server.requests[seen:]
    # Even with the upstream gone.
    server.stop()
    _copy_from_bridge(tmp_path, "third", url, upstream, upstream.public_key)
    assert len(server.requests) == seen


def test_bridge_with_trailing_slash_base_and_zstd(
    servers: CacheServers, upstream: Upstream, processes: Processes, tmp_path: Path
) -> None:
    server = servers.serve("zstd")
    url, _ = _start_bridge(processes, tmp_path, server, upstream, server.base + "/")
    _copy_from_bridge(tmp_path, "first", url, upstream, upstream.public_key)
    assert server.count(".nar.zst") == len(upstream.paths)


async def test_upstream_failures_over_http(
    servers: CacheServers, upstream: Upstream, processes: Processes, tmp_path: Path
) -> None:
    server = servers.serve("none")
    dep, top, single = (upstream.by_name(n) for n in ("dep", "top", "single"))
    f = nar_file(server, dep)
    data = f.read_bytes()
    i = data.index(b"hello from upstream")
    f.write_bytes(data[:i] + b"J" + data[i + 1 :])
    url, _ = _start_bridge(processes, tmp_path, server, upstream, server.base)
    async with aiohttp.ClientSession() as session:

        async def status(p: str) -> tuple[int, str]:
            async with session.get(f"{url}/{p}.narinfo") as resp:
                return resp.status, await resp.text()

        assert (await status(top.hash_part))[0] == 200
        code, text = await status(dep.hash_part)
        assert code == 500 and "NarHash" in text, (code, text)
        assert (await status("0" * 32))[0] == 404
        server.stop()
        code, text = await status(single.hash_part)
        assert code == 503, (code, text)
        assert (await status(top.hash_part))[0] == 200  # cached


async def test_upstream_failures_over_grpc(
    servers: CacheServers, upstream: Upstream, processes: Processes, tmp_path: Path
) -> None:
    """A ``nix+http`` path-info URL flag: wrapped in a local cache, errors mapped to gRPC codes."""
    server = servers.serve("none")
    dep, top, single = (upstream.by_name(n) for n in ("dep", "top", "single"))
    f = nar_file(server, dep)
    data = f.read_bytes()
    i = data.index(b"hello from upstream")
    f.write_bytes(data[:i] + b"J" + data[i + 1 :])
    pi_url = f"nix+{server.base}?trusted-public-keys={quote(upstream.public_key, safe='')}"
    daemon = processes.start(
        tmp_path / "home",
        ["daemon", "-l", "127.0.0.1:0", "--path-info-service-addr", pi_url],
        DAEMON_READY,
    )
    client = GrpcPathInfoService.from_url(f"grpc+http://{daemon.address}")
    try:
        check_info(await client.get(top.digest), top, upstream)
        try:
            await client.get(dep.digest)
        except DataCorruption as exc:  # DATA_LOSS
            assert "NarHash" in str(exc)
        else:
            raise AssertionError("a tampered upstream NAR was accepted")
        assert await client.get(bytes(20)) is None
        server.stop()
        try:
            await client.get(single.digest)
        except StorageUnavailable:  # UNAVAILABLE
            pass
        else:
            raise AssertionError("upstream down but no UNAVAILABLE")
        check_info(await client.get(top.digest), top, upstream)  # cached in the embedded store
        # Back up: the path that failed is fetched now.
        server.start()
        check_info(await client.get(single.digest), single, upstream)
    finally:
        await client.aclose()
