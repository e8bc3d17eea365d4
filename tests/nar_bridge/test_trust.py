"""A narinfo PUT to a real nar-bridge is recorded only if its metadata is true (issue 12, 11).

Its CA must give its store path (and be the hash of its content), and a
``Sig:`` by a key the bridge knows (its ``--signing-key``, or one of
``--trusted-public-keys``) must verify: otherwise 400 with a message, and
nothing recorded. Signatures by unknown keys are kept. (That real ``nix copy``
uploads still go in, CA paths and input-addressed ones alike, is what
``test_nix_copy.py`` checks.)
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from nix_compat import nixbase32
from nix_compat.narinfo import NarInfo
from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from nix_compat.signing import Signature, SigningKey
from nix_compat.store_path import build_ca_path

from .conftest import (
    NIX_HTTP_OPTS,
    Bridge,
    Bridges,
    Closure,
    Key,
    Keys,
    PathData,
    nix_in,
    store_rows,
)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


@pytest.fixture
def bridge(bridges: Bridges, keys: Keys) -> Bridge:
    """Signs with key one."""
    return bridges.start(None, "--signing-key", str(keys.one.secret_file))


@pytest.fixture(params=["signing-key", "trusted-public-keys"])
def keyed(request: pytest.FixtureRequest, bridges: Bridges, keys: Keys) -> tuple[Bridge, Key]:
    """A bridge signing with key one, and the key a test signs with: key one, or key two
    (which the bridge is told to trust)."""
    args = ["--signing-key", str(keys.one.secret_file)]
    if request.param == "signing-key":
        return bridges.start(None, *args), keys.one
    return bridges.start(None, *args, "--trusted-public-keys", keys.two.public), keys.two


async def _put(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, str]:
    async with session.put(url, data=io.BytesIO(body)) as resp:
        return resp.status, await resp.text()


async def _upload_nar(session: aiohttp.ClientSession, bridge: Bridge, p: PathData) -> None:
    url = f"{bridge.url}/nar/{nixbase32.encode(p.nar_hash)}.nar"
    status, text = await _put(session, url, p.nar)
    assert status == 200, text


async def _narinfo(session: aiohttp.ClientSession, bridge: Bridge, p: PathData) -> NarInfo | None:
    async with session.get(f"{bridge.url}/{p.hash_part}.narinfo") as resp:
        if resp.status == 404:
            return None
        assert resp.status == 200
        return NarInfo.parse(await resp.read())


async def _refused(
    session: aiohttp.ClientSession, bridge: Bridge, p: PathData, info: NarInfo, *needles: str
) -> None:
    rows = store_rows(bridge.home)
    status, text = await _put(
        session, f"{bridge.url}/{p.hash_part}.narinfo", info.render().encode()
    )
    assert status == 400, (status, text)
    for needle in needles:
        assert needle in text, (needle, text)
    assert store_rows(bridge.home) == rows
    assert await _narinfo(session, bridge, p) is None


async def test_narinfo_ca_must_fit_the_store_path(
    bridges: Bridges, bridge: Bridge, session: aiohttp.ClientSession, closure: Closure,
    tmp_path: Path,
) -> None:  # fmt: skip
    dep, mid = closure.by_name("dep"), closure.by_name("mid")
    for p in (dep, mid):
        await _upload_nar(session, bridge, p)
    assert store_rows(bridge.home) == (2, 0)
    good = dep.narinfo()
    assert good.ca is not None and good.ca.kind is CAKind.NAR  # nix-store --add
    # The CA of another NAR (and so not this one's NarHash).
    other = CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, mid.nar_hash))
    await _refused(session, bridge, dep, dataclasses.replace(good, ca=other), "CA", "NarHash")
    # An input-addressed path claiming to be content-addressed by its NarHash.
    own = CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, mid.nar_hash))
    right = build_ca_path(mid.store_path.name, own, sorted(mid.narinfo().references))
    await _refused(session, bridge, mid, dataclasses.replace(mid.narinfo(), ca=own), right.absolute)
    # A flat CA (a file's hash) for a directory.
    flat = CAHash(CAKind.FLAT, NixHash(HashAlgo.SHA256, dep.nar_hash))
    await _refused(session, bridge, dep, dataclasses.replace(good, ca=flat), "CA")
    # The true narinfos go in.
    for p in (dep, mid):
        status, text = await _put(
            session, f"{bridge.url}/{p.hash_part}.narinfo", p.narinfo().render().encode()
        )
        assert status == 200, text
    assert store_rows(bridge.home) == (2, 2)

    # Text CAs with references: real Nix uploads derivations (and builtins.toFile).
    top = closure.by_name("top")
    assert top.deriver is not None
    nix = nix_in(tmp_path)
    nix.run(
        "nix", "copy", "--store", closure.store, "--to", f"{bridge.url}?compression=none",
        *NIX_HTTP_OPTS, "--derivation", top.deriver,
    )  # fmt: skip
    drv = PathData(top.deriver, b"", bytes(32), (), None, None)
    served = await _narinfo(session, bridge, drv)
    assert served is not None and served.ca is not None and served.ca.kind is CAKind.TEXT
    assert served.references
    # Uploaded elsewhere without a reference its path was computed with: refused.
    other_bridge = bridges.start()
    async with session.get(f"{bridge.url}/{served.url}") as resp:
        assert resp.status == 200
        nar = await resp.read()
    drv = dataclasses.replace(drv, nar=nar, nar_hash=served.nar_hash)
    await _upload_nar(session, other_bridge, drv)
    truncated = dataclasses.replace(served, references=served.references[1:], signatures=())
    await _refused(session, other_bridge, drv, truncated, "store path")


async def test_narinfo_with_bad_signature_by_a_known_key_is_refused(
    keyed: tuple[Bridge, Key], session: aiohttp.ClientSession, closure: Closure, keys: Keys
) -> None:
    bridge, known = keyed
    top = closure.by_name("top")
    await _upload_nar(session, bridge, top)
    good = top.narinfo()
    key = SigningKey.from_file(known.secret_file)
    # Signed over other metadata (a NarSize off by one), or garbage.
    other = dataclasses.replace(good, nar_size=good.nar_size + 1).signed(key).signatures[0]
    for sig in (other, Signature(key.name, bytes(64))):
        bad = dataclasses.replace(good, signatures=(sig,))
        await _refused(session, bridge, top, bad, key.name, "does not verify")
    both = (good.signed(key).signatures[0], other)
    await _refused(session, bridge, top, dataclasses.replace(good, signatures=both), key.name)
    # A valid signature by the known key, and any by an unknown key, are kept.
    stranger = Signature("someone-else-1", bytes(64))
    signed = good.signed(key)
    body = dataclasses.replace(signed, signatures=(*signed.signatures, stranger))
    status, text = await _put(
        session, f"{bridge.url}/{top.hash_part}.narinfo", body.render().encode()
    )
    assert status == 200, text
    served = await _narinfo(session, bridge, top)
    assert served is not None
    names = [s.name for s in served.signatures]
    assert names[:2] == [known.name, stranger.name] and set(names) == {
        keys.one.name,
        known.name,
        stranger.name,
    }
    assert served.verify([keys.one.verifying]) and served.verify([known.verifying])
