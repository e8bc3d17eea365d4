"""Named caches with an upstream (pull-through) and with retention, through real processes.

A real Nix binary cache (``nix copy --to file://…``, signed) served over
loopback HTTP is the upstream of a named cache of ``tvix-store nar-bridge``;
the real Nix 2.8 substitutes the closure from the named cache trusting only
that cache's own key. Each path is fetched from the upstream once, however
many clients and caches ask; a path the store holds already is not
downloaded again; an upstream narinfo without a trusted signature is never
served; an upstream outage is a 503 that ends when the upstream is back.
Retention: a member that was neither pushed nor fetched for its cache's
retention leaves the cache at the next ``gc``; a fetch restarts the clock.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp

from nix_compat.narinfo import NarInfo

from .conftest import (
    BRIDGE_READY,
    NIX_HTTP_OPTS,
    CacheServer,
    CacheServers,
    Processes,
    Upstream,
    assert_same_tree,
    nix_in,
    ok,
    tvix,
)


def _create(home: Path, name: str, *args: str) -> str:
    """``tvix-store cache create NAME ARGS``: the cache's public key."""
    return ok(tvix(home, "cache", "create", name, *args)).decode().strip()


def _mirror(home: Path, name: str, server: CacheServer, key: str, *args: str) -> str:
    return _create(home, name, "--upstream", server.base, "--upstream-key", key, *args)


def _bridge(processes: Processes, home: Path) -> str:
    return processes.start(home, ["nar-bridge", "-l", "127.0.0.1:0"], BRIDGE_READY).address


def _two_mirrors(
    server: CacheServer, processes: Processes, tmp_path: Path, *caches: tuple[str, str]
) -> tuple[CacheServer, Path, str]:
    """Caches (name, upstream key) pulling from ``server``, and a bridge serving them."""
    home = tmp_path / "home"
    for name, key in caches:
        _mirror(home, name, server, key)
    return server, home, _bridge(processes, home)


async def _get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.read()


def _members(home: Path) -> dict[str, int]:
    listed = json.loads(ok(tvix(home, "cache", "list", "--json")))
    return {c["name"]: c["paths"] for c in listed}


def _nars(server: CacheServer) -> int:
    return sum(1 for r in server.requests if "/nar/" in r)


def test_nix_substitutes_through_a_named_cache(
    upstream: Upstream, servers: CacheServers, processes: Processes, tmp_path: Path
) -> None:
    server = servers.serve("xz")
    home = tmp_path / "home"
    key = _mirror(home, "mirror", server, upstream.public_key)
    _create(home, "local")
    url = _bridge(processes, home)

    nix = nix_in(tmp_path, "nix")
    dst = tmp_path / "dst"
    trust = ("--option", "trusted-public-keys", key)  # this cache's key only
    nix.run(
        "nix", "copy", "--from", f"{url}/mirror", "--to", dst, *NIX_HTTP_OPTS, *trust,
        *upstream.roots,
    )  # fmt: skip
    nix.run("nix", "store", "verify", "--store", dst, "--all", *trust)
    for p in upstream.paths:
        assert_same_tree(upstream.store / p.path.lstrip("/"), dst / p.path.lstrip("/"))
    fetched = {p.hash_part: server.count(f"/{p.hash_part}.narinfo") for p in upstream.paths}
    assert set(fetched.values()) == {1}
    assert _nars(server) == len(upstream.paths)
    assert _members(home) == {"mirror": len(upstream.paths), "local": 0}

    # A second client: served from the store, the upstream is not asked again.
    before = len(server.requests)
    nix2 = nix_in(tmp_path, "nix2")
    nix2.run(
        "nix", "copy", "--from", f"{url}/mirror", "--to", tmp_path / "dst2", *NIX_HTTP_OPTS,
        *trust, *upstream.roots,
    )  # fmt: skip
    assert len(server.requests) == before

    # Served signed by the cache's key and the upstream's; not visible in another cache.
    top = upstream.by_name("top")
    status, body = asyncio.run(_get(f"{url}/mirror/{top.hash_part}.narinfo"))
    info = NarInfo.parse(body)
    assert status == 200 and info.nar_hash == top.nar_hash
    assert {s.name for s in info.signatures} == {"mirror-1", "upstream-test-1"}
    assert asyncio.run(_get(f"{url}/local/{top.hash_part}.narinfo"))[0] == 404
    assert len(server.requests) == before  # (a cache without upstream asks nobody)


def test_concurrent_misses_share_one_fetch_and_stored_paths_are_not_fetched_again(
    upstream: Upstream, servers: CacheServers, processes: Processes, tmp_path: Path
) -> None:
    server, home, url = _two_mirrors(
        servers.serve("zstd"), processes, tmp_path, ("one", upstream.public_key),
        ("two", upstream.public_key),
    )  # fmt: skip
    top = upstream.by_name("top")

    async def many(cache: str) -> list[int]:
        async with aiohttp.ClientSession() as s:

            async def one() -> int:
                async with s.get(f"{url}/{cache}/{top.hash_part}.narinfo") as r:
                    await r.read()
                    return r.status

            return list(await asyncio.gather(*(one() for _ in range(8))))

    assert asyncio.run(many("one")) == [200] * 8
    assert server.count(f"/{top.hash_part}.narinfo") == 1 and _nars(server) == 1

    # Cache "two": the upstream's narinfo is asked for (it proves the path is the
    # upstream's to serve there), its NAR is not: the store has it.
    assert asyncio.run(many("two")) == [200] * 8
    assert server.count(f"/{top.hash_part}.narinfo") == 2 and _nars(server) == 1
    assert _members(home) == {"one": 1, "two": 1}

    # A path the upstream lacks: 404, and asked for once however often it is probed.
    missing = "0" * 32
    for _ in range(3):
        assert asyncio.run(_get(f"{url}/one/{missing}.narinfo"))[0] == 404
    assert server.count(f"/{missing}.narinfo") == 1


def test_untrusted_or_unreachable_upstream(
    upstream: Upstream, servers: CacheServers, processes: Processes, tmp_path: Path
) -> None:
    server, home, url = _two_mirrors(
        servers.serve("xz"), processes, tmp_path, ("wrongkey", upstream.other_public_key),
        ("mirror", upstream.public_key),
    )  # fmt: skip
    top = upstream.by_name("top")

    status, body = asyncio.run(_get(f"{url}/wrongkey/{top.hash_part}.narinfo"))
    assert status == 502 and b"no valid signature by a trusted key" in body
    assert _nars(server) == 0 and _members(home) == {"wrongkey": 0, "mirror": 0}
    assert tvix(home, "info", top.path).returncode != 0  # nothing was stored

    server.stop()
    status, body = asyncio.run(_get(f"{url}/mirror/{top.hash_part}.narinfo"))
    assert status == 503 and b"unreachable" in body
    server.start()
    assert asyncio.run(_get(f"{url}/mirror/{top.hash_part}.narinfo"))[0] == 200


def test_cache_settings_are_checked(upstream: Upstream, tmp_path: Path) -> None:
    home = tmp_path / "home"
    cases = [
        (["--upstream", "http://127.0.0.1:1/c"], "needs at least one trusted key"),
        (["--upstream", "ftp://x/", "--upstream-key", upstream.public_key], "not an http(s)"),
        (["--upstream-key", upstream.public_key], "--upstream-key is for --upstream"),
        (["--upstream", "http://x/", "--upstream-key", "garbage"], "upstream key"),
        (["--retention", "0"], "longer than 0"),
        (["--retention", "soon"], "not a duration"),
    ]
    for args, message in cases:
        proc = tvix(home, "cache", "create", "c", *args)
        assert proc.returncode != 0 and message in proc.stderr.decode(), (args, proc.stderr)
    assert _members(home) == {}
    _create(home, "c")
    proc = tvix(home, "cache", "configure", "c", "--upstream", "http://127.0.0.1:1/")
    assert proc.returncode != 0 and "needs at least one trusted key" in proc.stderr.decode()
    ok(tvix(home, "cache", "configure", "c", "--upstream", "http://127.0.0.1:1/",
            "--upstream-key", upstream.public_key, "--retention", "2d"))  # fmt: skip
    (c,) = json.loads(ok(tvix(home, "cache", "list", "--json")))
    assert c["upstream"] == "http://127.0.0.1:1/" and c["retention"] == 2 * 86400
    assert c["upstream_keys"] == [upstream.public_key]
    ok(tvix(home, "cache", "configure", "c", "--no-upstream", "--keep-forever"))
    (c,) = json.loads(ok(tvix(home, "cache", "list", "--json")))
    assert c["upstream"] is None and c["retention"] is None and c["upstream_keys"] == []


def test_retention_ends_membership_unless_fetched(
    upstream: Upstream, servers: CacheServers, processes: Processes, tmp_path: Path
) -> None:
    server = servers.serve("none")
    home = tmp_path / "home"
    _mirror(home, "mirror", server, upstream.public_key, "--retention", "20s")
    # (its lease, as a writer, lasts a second after its last write: gc then need not wait)
    url = processes.start(
        home, ["nar-bridge", "-l", "127.0.0.1:0"], BRIDGE_READY, {"TVIX_STORE_LEASE_TTL": "1"}
    ).address
    top, single = upstream.by_name("top"), upstream.by_name("single")
    start = time.monotonic()
    for p in (top, single):
        assert asyncio.run(_get(f"{url}/mirror/{p.hash_part}.narinfo"))[0] == 200
    # Fetching "single" again after a quarter of the retention restarts its clock.
    # (Retention is wall-clock time, so the test waits for it; the margins are seconds.)
    time.sleep(max(0.0, start + 6 - time.monotonic()))
    assert asyncio.run(_get(f"{url}/mirror/{single.hash_part}.narinfo"))[0] == 200
    time.sleep(max(0.0, start + 21 - time.monotonic()))
    dry = json.loads(ok(tvix(home, "gc", "--dry-run", "--keep-since", "0", "--json")))
    assert dry["expired_members"] == [f"mirror: {top.path}"]
    assert dry["deleted_paths"] == [top.path]
    assert _members(home) == {"mirror": 2}  # (a dry run changes nothing)

    report = json.loads(ok(tvix(home, "gc", "--keep-since", "0", "--grace", "0", "--json")))
    assert report["expired_members"] == [f"mirror: {top.path}"]
    assert report["deleted_paths"] == [top.path]
    assert _members(home) == {"mirror": 1}
    assert tvix(home, "info", top.path).returncode != 0
    ok(tvix(home, "info", single.path))

    # Asked for again, it is pulled through again.
    nars = _nars(server)
    status, body = asyncio.run(_get(f"{url}/mirror/{top.hash_part}.narinfo"))
    assert status == 200 and NarInfo.parse(body).nar_hash == top.nar_hash
    assert _nars(server) == nars + 1 and _members(home) == {"mirror": 2}
