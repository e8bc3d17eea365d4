"""``tvix-store copy`` refuses a closure entry whose ``ca`` does not fit its store path."""

from __future__ import annotations

import json
from pathlib import Path

from nix_compat.nixhash import CAHash, CAKind, HashAlgo, NixHash
from tvix_store.config import open_store

from .conftest import Upstream, ok, tvix


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
