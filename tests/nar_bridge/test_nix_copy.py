"""The real Nix 2.8 against real nar-bridge processes: upload, substitute, verify.

Signatures are always required on the way back (``trusted-public-keys``, never
``--no-check-sigs``); the restored trees must equal the source store's.
"""

from __future__ import annotations

import io
from pathlib import Path

import aiohttp
import pytest

from nix_compat import nixbase32
from nix_compat.narinfo import NarInfo
from nix_compat.store_path import StorePath

from .conftest import (
    NIX_HTTP_OPTS,
    Bridges,
    Closure,
    Keys,
    assert_same_trees,
    copy_to,
    nix_in,
    store_rows,
)


def _trust(public: str) -> tuple[str, ...]:
    return ("--option", "trusted-public-keys", public)


async def _narinfo(session: aiohttp.ClientSession, base: str, hash_part: str) -> NarInfo:
    async with session.get(f"{base}/{hash_part}.narinfo") as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/x-nix-narinfo"
        return NarInfo.parse(await resp.read())


@pytest.mark.parametrize("compression", [None, "none", "xz", "zstd", "bzip2", "gzip"])
async def test_nix_copy_to_and_from(
    compression: str | None, bridges: Bridges, closure: Closure, keys: Keys, tmp_path: Path
) -> None:
    bridge = bridges.start(None, "--signing-key", str(keys.one.secret_file))
    nix = nix_in(tmp_path)
    url = bridge.url if compression is None else f"{bridge.url}?compression={compression}"
    copy_to(nix, closure, url)
    n = len(closure.paths)
    assert store_rows(bridge.home) == (n, n)

    # What the bridge serves is what Nix has, signed by our key.
    async with aiohttp.ClientSession() as session:
        for p in closure.paths:
            info = await _narinfo(session, bridge.url, p.hash_part)
            assert info.store_path == p.store_path
            assert (info.nar_hash, info.nar_size) == (p.nar_hash, len(p.nar))
            assert {r.absolute for r in info.references} == set(p.references)
            assert (info.deriver.absolute + ".drv" if info.deriver else None) == p.deriver
            assert (info.ca.render() if info.ca else None) == p.ca
            assert info.verify([keys.one.verifying])
            assert not info.verify([keys.two.verifying])
            async with session.get(f"{bridge.url}/{info.url}") as resp:
                assert resp.status == 200
                assert await resp.read() == p.nar

    nix.fresh_cache()
    dst = tmp_path / "dst"
    trust = _trust(keys.one.public)
    nix.run(
        "nix", "copy", "--from", bridge.url, "--to", dst, *NIX_HTTP_OPTS, *trust, *closure.roots
    )
    nix.run("nix", "store", "verify", "--store", dst, "--all", *trust)
    assert_same_trees(closure, nix, dst)
    # Control: the signatures are what makes the copy trusted.
    proc = nix.try_run("nix", "store", "verify", "--store", dst, "--all", *_trust(keys.two.public))
    assert proc.returncode != 0


async def test_signatures_required_and_uploaded_ones_kept(
    bridges: Bridges, closure: Closure, keys: Keys, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    unsigned = bridges.start(home)
    nix = nix_in(tmp_path)
    copy_to(nix, closure, f"{unsigned.url}?compression=none&secret-key={keys.two.secret_file}")
    top = closure.by_name("top")

    # Without a key the bridge serves exactly the signature Nix uploaded.
    async with aiohttp.ClientSession() as session:
        info = await _narinfo(session, unsigned.url, top.hash_part)
    assert [s.name for s in info.signatures] == [keys.two.name]
    assert info.verify([keys.two.verifying])

    # Trusting another key: `top` lacks a valid signature, so Nix refuses it.
    nix.fresh_cache()
    proc = nix.try_run(
        "nix",
        "copy",
        "--from",
        unsigned.url,
        "--to",
        tmp_path / "refused",
        *NIX_HTTP_OPTS,
        *_trust(keys.one.public),
        top.path,
    )
    assert proc.returncode != 0
    assert b"signature" in proc.stderr

    nix.fresh_cache()
    nix.run(
        "nix",
        "copy",
        "--from",
        unsigned.url,
        "--to",
        tmp_path / "by-two",
        *NIX_HTTP_OPTS,
        *_trust(keys.two.public),
        *closure.roots,
    )
    assert_same_trees(closure, nix, tmp_path / "by-two")

    # A second bridge on the same store signs on the fly and keeps the uploaded signature.
    signing = bridges.start(home, "--signing-key", str(keys.one.secret_file))
    async with aiohttp.ClientSession() as session:
        info = await _narinfo(session, signing.url, top.hash_part)
    assert sorted(s.name for s in info.signatures) == sorted([keys.one.name, keys.two.name])
    assert info.verify([keys.one.verifying]) and info.verify([keys.two.verifying])
    nix.fresh_cache()
    nix.run(
        "nix",
        "copy",
        "--from",
        signing.url,
        "--to",
        tmp_path / "by-one",
        *NIX_HTTP_OPTS,
        *_trust(keys.one.public),
        *closure.roots,
    )
    nix.run(
        "nix", "store", "verify", "--store", tmp_path / "by-one", "--all", *_trust(keys.one.public)
    )


async def test_substitution_with_nix_store_r(
    bridges: Bridges, closure: Closure, keys: Keys, tmp_path: Path
) -> None:
    bridge = bridges.start(None, "--signing-key", str(keys.one.secret_file))
    nix = nix_in(tmp_path)
    copy_to(nix, closure, f"{bridge.url}?compression=zstd")
    nix.fresh_cache()
    dst = tmp_path / "dst"
    out = nix.run(
        "nix-store",
        "--store",
        dst,
        "-r",
        *closure.roots,
        "--option",
        "substituters",
        bridge.url,
        *_trust(keys.one.public),
        *NIX_HTTP_OPTS,
    )
    assert set(out.decode().split()) == set(closure.roots)
    nix.run("nix", "store", "verify", "--store", dst, "--all", *_trust(keys.one.public))
    assert_same_trees(closure, nix, dst)


async def test_two_bridges_on_one_store(
    bridges: Bridges, closure: Closure, keys: Keys, tmp_path: Path
) -> None:
    home = tmp_path / "shared"
    a = bridges.start(home, "--signing-key", str(keys.one.secret_file))
    b = bridges.start(home, "--signing-key", str(keys.two.secret_file))
    async with aiohttp.ClientSession() as session:
        for p in closure.paths:
            name = f"nar/{nixbase32.encode(p.nar_hash)}.nar"
            async with session.put(f"{a.url}/{name}", data=io.BytesIO(p.nar)) as resp:
                assert resp.status == 200, await resp.text()
            # The other process finds it through the persistent index.
            async with session.get(f"{b.url}/{name}") as resp:
                assert resp.status == 200
                assert await resp.read() == p.nar
            text = p.narinfo().render()
            async with session.put(f"{b.url}/{p.hash_part}.narinfo", data=text) as resp:
                assert resp.status == 200, await resp.text()
    n = len(closure.paths)
    assert store_rows(home) == (n, n)

    nix = nix_in(tmp_path)
    for bridge, key in ((a, keys.one), (b, keys.two)):
        nix.fresh_cache()
        dst = tmp_path / f"dst-{key.name}"
        nix.run(
            "nix",
            "copy",
            "--from",
            bridge.url,
            "--to",
            dst,
            *NIX_HTTP_OPTS,
            *_trust(key.public),
            *closure.roots,
        )
        nix.run("nix", "store", "verify", "--store", dst, "--all", *_trust(key.public))
        assert_same_trees(closure, nix, dst)

    # The index survives the processes: a NAR uploaded before a restart is still usable.
    a.stop()
    b.stop()
    c = bridges.start(home, "--signing-key", str(keys.one.secret_file))
    top = closure.by_name("top")
    async with aiohttp.ClientSession() as session:
        info = await _narinfo(session, c.url, top.hash_part)
        assert info.store_path == StorePath.from_absolute_path(top.path)
        assert info.verify([keys.one.verifying])
        async with session.get(f"{c.url}/nar/{nixbase32.encode(top.nar_hash)}.nar") as resp:
            assert resp.status == 200
            assert await resp.read() == top.nar
