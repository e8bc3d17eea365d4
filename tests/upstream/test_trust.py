"""Metadata from upstream is checked too: a ``ca`` must fit its store path.

``tvix-store copy`` refuses a closure entry whose ``ca`` does not, and a
``nix+http`` substituter refuses such a narinfo even when it is correctly
signed (signatures do not cover the CA).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from urllib.parse import quote

from nix_compat.narinfo import NarInfo
from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from tvix_store.config import open_store

from .conftest import CacheServers, Upstream, ok, tvix
from .test_nix_http import narinfo_file


async def test_copy_refuses_a_ca_that_does_not_fit_the_path(
    upstream: Upstream, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    dep, mid = upstream.by_name("dep"), upstream.by_name("mid")
    assert dep.ca is not None and mid.ca is None
    # The NAR hash of mid's files is right, but mid is input-addressed: no such CA.
    claimed = CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, mid.nar_hash)).render()
    infos = json.loads(upstream.path_info_json)
    for i in infos:
        if i["path"] == mid.path:
            i["ca"] = claimed
    f = tmp_path / "bad-ca.json"
    f.write_text(json.dumps(infos))
    proc = tvix(home, "copy", "--root", upstream.store, f)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert mid.path in err and claimed in err, err
    async with await open_store(home=home) as store:
        assert await store.pathinfos.get(mid.digest) is None
        assert await store.pathinfos.get(dep.digest) is not None  # imported before it
    # The closure as Nix lists it goes in.
    f.write_text(upstream.path_info_json)
    ok(tvix(home, "copy", "--root", upstream.store, f))


async def test_substituter_refuses_a_signed_narinfo_with_a_forged_ca(
    servers: CacheServers, upstream: Upstream, tmp_path: Path
) -> None:
    server = servers.serve("xz")
    mid = upstream.by_name("mid")
    info = NarInfo.parse(narinfo_file(server, mid).read_bytes())
    assert info.ca is None and info.verify([upstream.key])
    forged = dataclasses.replace(
        info, ca=CAHash(CAKind.NAR, NixHash(HashAlgo.SHA256, info.nar_hash))
    )
    assert forged.verify([upstream.key])  # the signature still holds
    narinfo_file(server, mid).write_text(forged.render())
    home = tmp_path / "home"
    url = f"nix+{server.base}?trusted-public-keys={quote(upstream.public_key, safe='')}"
    proc = tvix(home, "info", "--path-info-service-addr", url, mid.path)
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert "CA fixed:r:sha256:" in err and mid.path in err, err
    assert server.count(".nar.xz") == 0  # refused before fetching the NAR
    async with await open_store(home=home) as store:  # nothing cached
        assert await store.pathinfos.get(mid.digest) is None
    narinfo_file(server, mid).write_text(info.render())
    ok(tvix(home, "info", "--path-info-service-addr", url, mid.path))
