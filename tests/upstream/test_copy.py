"""``tvix-store copy``: import a closure from a chroot Nix store, dependencies first, verified."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from nix_compat import nixbase32
from nix_compat.store_path import StorePath
from tvix_store.config import open_store

from .conftest import Upstream, ok, tvix
from .test_nix_http import check_info


def _check_order(printed: list[str], upstream: Upstream) -> None:
    refs = {p.path: p.references for p in upstream.paths}
    for i, path in enumerate(printed):
        for r in refs[path]:
            if r != path:
                assert r in printed[:i], f"{path} printed before its reference {r}"


async def _stored(home: Path, upstream: Upstream) -> dict[str, bool]:
    out = {}
    async with await open_store(home=home) as store:
        for p in upstream.paths:
            out[p.name] = await store.pathinfos.get(p.digest) is not None
    return out


async def test_copy_path_info_json(upstream: Upstream, tmp_path: Path) -> None:
    home = tmp_path / "home"
    closure = tmp_path / "closure.json"
    closure.write_text(upstream.path_info_json)
    out = ok(tvix(home, "copy", "--root", upstream.store, closure)).decode()
    printed = out.split()
    assert sorted(printed) == sorted(p.path for p in upstream.paths)
    _check_order(printed, upstream)
    # Byte-equal NARs, and the metadata came along.
    for p in upstream.paths:
        nar = ok(tvix(home, "export", p.path))
        assert nar == p.nar, p.path
    # Each directory got a NAR plan vouching for its verified NarHash.
    with contextlib.closing(sqlite3.connect(home / "store.sqlite")) as conn:
        planned = conn.execute("SELECT count(*) FROM nar_roots").fetchone()[0]
    assert planned == sum(1 for p in upstream.paths if b"directory" in p.nar[40:80])
    assert planned > 0
    async with await open_store(home=home) as store:
        for p in upstream.paths:
            info = await store.pathinfos.get(p.digest)
            assert info is not None
            assert [r.absolute for r in info.references] == sorted(p.references)
            assert (info.nar_size, info.nar_sha256) == (len(p.nar), p.nar_hash)
            assert (info.deriver.absolute + ".drv" if info.deriver else None) == p.deriver
            assert (info.ca.render() if info.ca else None) == p.ca
    # Second run: everything is present, nothing imported, nothing printed.
    assert ok(tvix(home, "copy", "--root", upstream.store, closure)) == b""


def _closure_entry(p: Any) -> dict[str, Any]:
    return {
        "closureSize": 0,
        "narHash": "sha256:" + nixbase32.encode(p.nar_hash),
        "narSize": len(p.nar),
        "path": p.path,
        "references": list(p.references),
    }


async def test_copy_export_references_graph_form(upstream: Upstream, tmp_path: Path) -> None:
    home = tmp_path / "home"
    # Dependents first in the file: the command must reorder.
    entries = [_closure_entry(p) for p in reversed(upstream.paths)]
    f = tmp_path / "attrs.json"
    f.write_text(json.dumps({"closure": entries, "other": "attributes are ignored"}))
    printed = ok(tvix(home, "copy", "--root", upstream.store, f)).decode().split()
    assert sorted(printed) == sorted(p.path for p in upstream.paths)
    _check_order(printed, upstream)
    for p in upstream.paths:
        assert ok(tvix(home, "export", p.path)) == p.nar
    # Through NIX_ATTRS_JSON_FILE, with one path already there: only the rest.
    home2 = tmp_path / "home2"
    dep = upstream.by_name("dep")
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"closure": [_closure_entry(dep)]}))
    assert ok(tvix(home2, "copy", "--root", upstream.store, one)).decode().split() == [dep.path]
    printed = (
        ok(
            tvix(
                home2,
                "copy",
                "--root",
                str(upstream.store),
                extra_env={"NIX_ATTRS_JSON_FILE": str(f)},
            )
        )
        .decode()
        .split()
    )
    assert sorted(printed) == sorted(p.path for p in upstream.paths if p.name != "dep")


async def test_copy_wrong_nar_hash_records_nothing_for_that_path(
    upstream: Upstream, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    infos = json.loads(upstream.path_info_json)
    mid = upstream.by_name("mid")
    for i in infos:
        if i["path"] == mid.path:
            wrong = hashlib.sha256(b"not the NAR").digest()
            i["narHash"] = "sha256-" + base64.b64encode(wrong).decode()
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(infos))
    proc = tvix(home, "copy", "--root", upstream.store, f)
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert mid.path in err and "Traceback" not in err, err
    stored = await _stored(home, upstream)
    assert stored["mid"] is False
    assert stored["top"] is False  # depends on mid: never reached
    # What was imported before the bad path is complete and correct.
    for name in [n for n, ok_ in stored.items() if ok_]:
        p = upstream.by_name(name)
        assert ok(tvix(home, "export", p.path)) == p.nar
    # Wrong narSize too.
    infos = json.loads(upstream.path_info_json)
    for i in infos:
        if i["path"] == mid.path:
            i["narSize"] += 8
    f.write_text(json.dumps(infos))
    proc = tvix(home, "copy", "--root", upstream.store, f)
    assert proc.returncode != 0
    assert (await _stored(home, upstream))["mid"] is False
    # Corrected: the rest goes in.
    f.write_text(upstream.path_info_json)
    ok(tvix(home, "copy", "--root", upstream.store, f))
    assert all((await _stored(home, upstream)).values())


async def test_copy_refuses_dangling_references_and_bad_json(
    upstream: Upstream, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    top = upstream.by_name("top")
    f = tmp_path / "top-only.json"
    f.write_text(json.dumps([_closure_entry(top)]))
    proc = tvix(home, "copy", "--root", upstream.store, f)
    assert proc.returncode != 0
    assert "mid" in proc.stderr.decode()
    assert not any((await _stored(home, upstream)).values())
    for text in ["not json", "{}", '{"closure": [{"path": "/nix/store/x"}]}', "[1]"]:
        f.write_text(text)
        proc = tvix(home, "copy", "--root", upstream.store, f)
        assert proc.returncode != 0, text
        assert "Traceback" not in proc.stderr.decode(), proc.stderr.decode()


async def test_copied_paths_substitute_like_upstream(upstream: Upstream, tmp_path: Path) -> None:
    """What ``copy`` stores is indistinguishable from what ``nix+http`` substitutes."""
    home = tmp_path / "home"
    f = tmp_path / "closure.json"
    f.write_text(upstream.path_info_json)
    ok(tvix(home, "copy", "--root", upstream.store, f))
    async with await open_store(home=home) as store:
        for p in upstream.paths:
            info = await store.pathinfos.get(p.digest)
            assert info is not None
            assert info.store_path == StorePath.from_absolute_path(p.path)
            # No signatures in path-info output for locally built paths; the
            # rest matches the narinfo data.
            assert info.signatures == ()
            info = info.signed(upstream.signing_key)
            check_info(info, p, upstream)
