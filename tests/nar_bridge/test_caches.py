"""Named caches over one store, through real bridges and the real Nix 2.8.

Two caches with their own keys: a path pushed to one is 404 in the other,
their signatures differ, the second push stores no new content, and a
narinfo may name only a NAR uploaded to its own cache.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import aiohttp

from nix_compat.narinfo import NarInfo

from .conftest import (
    NIX_HTTP_OPTS,
    TVIX,
    Bridges,
    Closure,
    assert_same_trees,
    copy_to,
    nix_in,
    tvix_env,
)


def tvix(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TVIX, *args], env=tvix_env(home), capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def _stored_bytes(home: Path) -> int:
    """Bytes of the embedded store's pack files (the content)."""
    return sum(p.stat().st_size for p in home.rglob("*.pack"))


async def _narinfo(url: str) -> tuple[int, NarInfo | None]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        body = await r.read()
        return r.status, NarInfo.parse(body) if r.status == 200 else None


async def test_two_caches_over_one_store(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    made = tvix(home, "cache", "create", "team-a")
    assert made.returncode == 0, made.stderr
    key_a = made.stdout.strip()
    key_b = tvix(home, "cache", "create", "team-b", "--priority", "30").stdout.strip()
    assert key_a.startswith("team-a-1:") and key_b.startswith("team-b-1:")
    bridge = bridges.start(home)
    nix = nix_in(tmp_path)
    copy_to(nix, closure, f"{bridge.url}/team-a")
    after_a = _stored_bytes(home)
    p = closure.by_name("top")

    status, info = await _narinfo(f"{bridge.url}/team-a/{p.hash_part}.narinfo")
    assert status == 200 and info is not None
    assert info.store_path == p.store_path and info.nar_hash == p.nar_hash
    assert "team-a-1" in {s.name for s in info.signatures}
    assert (await _narinfo(f"{bridge.url}/team-b/{p.hash_part}.narinfo"))[0] == 404
    assert (await _narinfo(f"{bridge.url}/nobody/{p.hash_part}.narinfo"))[0] == 404
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{bridge.url}/team-b/nix-cache-info") as r:
            assert "Priority: 30" in await r.text()
        # A narinfo for team-b naming a NAR only team-a received is refused.
        async with s.put(f"{bridge.url}/team-b/{p.hash_part}.narinfo", data=info.render()) as r:
            assert r.status == 400 and "not uploaded to this cache" in await r.text()
        # The classic NAR URL of team-a's NAR is not team-b's either.
        async with s.get(f"{bridge.url}/team-b/nar/{_classic(p.nar_hash)}.nar") as r:
            assert r.status == 404
        async with s.get(f"{bridge.url}/team-a/nar/{_classic(p.nar_hash)}.nar") as r:
            assert r.status == 200 and await r.read() == p.nar
        # The web pages are per cache too.
        async with s.get(f"{bridge.url}/team-a/") as r:
            page = await r.text()
            assert r.status == 200 and key_a in page and f"{bridge.url}/team-a" in page
        async with s.get(f"{bridge.url}/team-a/paths") as r:
            assert f'href="/team-a/path/{p.hash_part}"' in await r.text()
        async with s.get(f"{bridge.url}/team-b/paths") as r:
            assert r.status == 200 and p.hash_part not in await r.text()
        async with s.get(f"{bridge.url}/team-b/path/{p.hash_part}") as r:
            assert r.status == 404

    # Pushing the same closure to team-b: the NARs are hashed, nothing new is stored.
    nix.fresh_cache()
    copy_to(nix, closure, f"{bridge.url}/team-b")
    content = sum(len(q.nar) for q in closure.paths)
    assert _stored_bytes(home) - after_a < content // 4
    status, info_b = await _narinfo(f"{bridge.url}/team-b/{p.hash_part}.narinfo")
    assert info_b is not None
    sigs_a = {s.name for s in info.signatures}
    sigs_b = {s.name for s in info_b.signatures}
    assert "team-b-1" in sigs_b and "team-a-1" not in sigs_b and sigs_a != sigs_b

    # Substitute from team-b, checking its key.
    dst = nix.other("dst")
    nix.run(
        "nix", "copy", "--from", f"{bridge.url}/team-b", "--to", str(dst.store),
        *NIX_HTTP_OPTS, "--option", "trusted-public-keys", key_b, *closure.roots,
    )  # fmt: skip
    assert_same_trees(closure, nix, dst.store)

    listed = tvix(home, "cache", "list", "--json")
    counts = {c["name"]: c["paths"] for c in json.loads(listed.stdout)}
    assert counts == {"team-a": len(closure.paths), "team-b": len(closure.paths)}


def _classic(nar_hash: bytes) -> str:
    from nix_compat import nixbase32

    return nixbase32.encode(nar_hash)


async def test_private_cache_and_gc_roots(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    assert tvix(home, "cache", "create", "secret", "--private").returncode == 0
    token = tvix(home, "token", "create", "--scope", "push", "--cache", "secret").stdout
    token = token.splitlines()[-1]
    bridge = bridges.start(home)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{bridge.url}/secret/nix-cache-info") as r:
            assert r.status == 401
        auth = {"Authorization": f"Bearer {token}"}
        async with s.get(f"{bridge.url}/secret/nix-cache-info", headers=auth) as r:
            assert r.status == 200
        async with s.get(f"{bridge.url}/nix-cache-info", headers=auth) as r:
            assert r.status == 200  # the default cache is public
        async with s.put(f"{bridge.url}/nix-cache-info", data=b"", headers=auth) as r:
            assert r.status == 403  # the token is for "secret" only
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login nix password {token}\n")
    nix = nix_in(tmp_path)
    conf = f"experimental-features = nix-command\nnetrc-file = {netrc}"
    copy_to(nix, closure, f"{bridge.url}/secret", env={"NIX_CONFIG": conf})
    bridge.stop()

    # A path imported but in no cache goes with --keep-since 0; the cache's paths stay.
    loose = tmp_path / "loose"
    loose.write_text("in no cache\n")
    imported = tvix(home, "import", str(loose))
    assert imported.returncode == 0, imported.stderr
    gc = tvix(home, "gc", "--keep-since", "0", "--grace", "0", "--json")
    assert gc.returncode == 0, gc.stderr
    report = json.loads(gc.stdout)
    assert report["deleted_paths"] == [imported.stdout.strip()]
    for p in closure.paths:
        assert tvix(home, "info", p.path).returncode == 0


def test_cache_commands_refuse_bad_input(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for name, why in (("nar", "reserved"), ("Team", "1-63 of"), ("a/b", "1-63 of")):
        r = tvix(home, "cache", "create", name)
        assert r.returncode == 1 and why in r.stderr, r.stderr
    assert tvix(home, "cache", "create", "x").returncode == 0
    r = tvix(home, "cache", "create", "x")
    assert r.returncode == 1 and "exists already" in r.stderr
    r = tvix(home, "cache", "configure", "y", "--priority", "1")
    assert r.returncode == 1 and "no cache named 'y'" in r.stderr
    assert tvix(home, "cache", "configure", "x", "--private").returncode == 0
    assert "private" in tvix(home, "cache", "list").stdout
    assert tvix(home, "cache", "destroy", "x").returncode == 0
    assert tvix(home, "cache", "list").stdout == ""
