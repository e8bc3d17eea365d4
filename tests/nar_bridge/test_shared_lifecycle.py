"""Pins, deletes and ``gc --keep-since`` on a shared store (moto's S3 + PostgreSQL).

The real Nix 2.8 pushes a closure with references through a nar-bridge over
S3 + PostgreSQL; the CLI then pins, deletes and collects against the same
backends, and a new frontend still serves every kept path byte for byte.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.servers import S3, Postgres

from .conftest import NIX_HTTP_OPTS, TVIX, Bridges, Closure, Keys, copy_to, nix_in, tvix_env
from .test_shared_backends import _flags


def _tvix(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TVIX, *args], env=tvix_env(home), capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _closure_of(closure: Closure, root: str) -> set[str]:
    refs = {p.path: p.references for p in closure.paths}
    out: set[str] = set()
    todo = [root]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(r for r in refs[p] if r in refs)
    return out


def test_pins_deletes_and_keep_since_on_s3_and_postgres(
    bridges: Bridges, closure: Closure, keys: Keys, tmp_path: Path, s3: S3, postgres: Postgres
) -> None:
    flags = _flags(s3, postgres)
    blobs, meta = flags[1], flags[5]
    sign = ("--signing-key", str(keys.one.secret_file))
    bridge = bridges.start(None, *flags, *sign)
    nix = nix_in(tmp_path)
    copy_to(nix, closure, bridge.url)
    bridge.stop()  # (its writer's lease ends: the sweeps below need not wait)
    home = tmp_path / "unused-embedded-home"
    on = ("--path-info-service-addr", meta)
    gc = ("gc", "--json", "--blob-service-addr", blobs, *on)

    top = closure.by_name("top").path
    dep = closure.by_name("dep").path
    single = closure.by_name("single").path
    pinned = _closure_of(closure, top)
    assert dep in pinned and single not in pinned

    assert _ok(_tvix(home, "pin", "add", "release", top, *on)).strip() == "pin release: 1 path(s)"
    assert json.loads(_ok(_tvix(home, "pin", "list", "--json", *on))) == {"release": [top]}
    embedded = _tvix(home, "pin", "list", "--json")  # (the shared store is not the embedded one)
    assert embedded.returncode != 0 and "no embedded store" in embedded.stderr
    missing = _tvix(home, "pin", "add", "x", single.replace(single[11:15], "0000"), *on)
    assert missing.returncode != 0 and "not in this store" in missing.stderr

    # A path others refer to, or a pinned one, stays.
    refused = _tvix(home, "delete", dep, *on)
    assert refused.returncode != 0 and f"{dep} is referred to by" in refused.stderr
    refused = _tvix(home, "delete", top, *on)
    assert refused.returncode != 0 and "is pinned by release" in refused.stderr
    assert _ok(_tvix(home, "delete", single, *on)).strip() == f"deleted {single}"
    again = _tvix(home, "delete", single, *on)
    assert again.returncode != 0 and "not in this store" in again.stderr

    # Everything was put just now: --keep-since 1h keeps it all.
    report = json.loads(_ok(_tvix(home, *gc, "--keep-since", "1h", "--grace", "0", "--dry-run")))
    assert report["deleted_paths"] == [] and report["kept_paths"] == len(closure.paths) - 1
    # --keep-since 0: only the pin's closure stays; the rest and its content go.
    others = sorted({p.path for p in closure.paths} - pinned - {single})
    dry = json.loads(_ok(_tvix(home, *gc, "--keep-since", "0", "--grace", "0", "--dry-run")))
    assert dry["deleted_paths"] == others and dry["pinned_paths"] == len(pinned)
    report = json.loads(_ok(_tvix(home, *gc, "--keep-since", "0", "--grace", "0")))
    assert report["deleted_paths"] == others and report["objects"] >= 1, report
    assert report["kept_paths"] == len(pinned)

    # A new frontend serves the pinned closure byte for byte; the rest is gone.
    fresh = bridges.start(None, *flags, *sign)
    dst = tmp_path / "dst"
    trust = ("--option", "trusted-public-keys", keys.one.public)
    nix.fresh_cache()
    nix.run("nix", "copy", "--from", fresh.url, "--to", dst, *NIX_HTTP_OPTS, *trust, top)
    for p in closure.paths:
        if p.path in pinned:
            out = nix.run("nix", "store", "dump-path", "--store", dst, p.path)
            assert out == p.nar, p.path
    for path in [single, *others]:
        proc = nix.try_run(
            "nix", "copy", "--from", fresh.url, "--to", tmp_path / "dst2", *NIX_HTTP_OPTS,
            *trust, path,
        )  # fmt: skip
        assert proc.returncode != 0, path
    fresh.stop()

    # Unpinned, the closure goes too (--keep-since 0); the history keeps both changes.
    assert "removed pin release" in _ok(_tvix(home, "pin", "rm", "release", *on))
    report = json.loads(_ok(_tvix(home, *gc, "--keep-since", "0", "--grace", "0")))
    assert report["deleted_paths"] == sorted(pinned) and report["kept_paths"] == 0
    history = json.loads(_ok(_tvix(home, "pin", "list", "--history", "--json", *on)))
    assert [(c["name"], c["action"], c["paths"]) for c in history] == [
        ("release", "set", [top]),
        ("release", "removed", [top]),
    ]
    bad = _tvix(home, "pin", "list", *("--path-info-service-addr", "grpc+http://[::1]:1"))
    assert bad.returncode != 0 and "PostgreSQL" in bad.stderr


async def test_named_caches_and_tokens_are_shared_by_frontends(
    bridges: Bridges, closure: Closure, tmp_path: Path, s3: S3, postgres: Postgres
) -> None:
    import aiohttp

    from nix_compat.narinfo import NarInfo

    flags = _flags(s3, postgres)
    blobs, meta = flags[1], flags[5]
    on = ("--path-info-service-addr", meta)
    cli_home = tmp_path / "operator"  # (its own data directory: nothing of it is used)
    key = _ok(_tvix(cli_home, "cache", "create", "team", *on)).strip()
    assert key.startswith("team-1:")
    token = _ok(_tvix(cli_home, "token", "create", "--scope", "push", *on)).splitlines()[-1]
    assert json.loads(_ok(_tvix(cli_home, "cache", "list", "--json"))) == []
    # Two frontends, each with a data directory of its own, over the same S3 + PostgreSQL.
    a = bridges.start(None, *flags)
    b = bridges.start(None, *flags)
    nix = nix_in(tmp_path)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login nix password {token}\n")
    conf = {"NIX_CONFIG": f"experimental-features = nix-command\nnetrc-file = {netrc}"}
    copy_to(nix, closure, f"{a.url}/team", env=conf)

    top = closure.by_name("top")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{b.url}/team/{top.hash_part}.narinfo") as r:
            assert r.status == 200
            info = NarInfo.parse(await r.read())
        assert "team-1" in {sig.name for sig in info.signatures}
        # Without the token, or once it is revoked (by the operator's CLI), pushes are refused
        # by every frontend.
        async with s.put(f"{b.url}/team/nix-cache-info", data=b"") as r:
            assert r.status == 401
        bearer = {"Authorization": f"Bearer {token}"}
        async with s.put(f"{b.url}/team/nix-cache-info", data=b"", headers=bearer) as r:
            assert r.status == 200
        (record,) = json.loads(_ok(_tvix(cli_home, "token", "list", "--json", *on)))
        _ok(_tvix(cli_home, "token", "revoke", record["id"], *on))
        for bridge in (a, b):
            async with s.put(f"{bridge.url}/team/nix-cache-info", data=b"", headers=bearer) as r:
                assert r.status == 401 and "revoked" in await r.text()
    counts = json.loads(_ok(_tvix(cli_home, "cache", "list", "--json", *on)))
    assert [(c["name"], c["paths"]) for c in counts] == [("team", len(closure.paths))]
    a.stop()
    b.stop()

    # The cache's members are roots of the shared collection, whatever --keep-since says.
    gc = ("gc", "--json", "--blob-service-addr", blobs, *on, "--keep-since", "0", "--grace", "0")
    report = json.loads(_ok(_tvix(cli_home, *gc)))
    assert report["deleted_paths"] == [] and report["kept_paths"] == len(closure.paths)
    _ok(_tvix(cli_home, "cache", "destroy", "team", *on))
    report = json.loads(_ok(_tvix(cli_home, *gc)))
    assert report["deleted_paths"] == sorted(p.path for p in closure.paths)


def test_fsck_of_s3_and_postgres(
    bridges: Bridges, closure: Closure, tmp_path: Path, s3: S3, postgres: Postgres
) -> None:
    import urllib.parse

    import obstore
    from obstore.store import S3Store

    flags = _flags(s3, postgres)
    bridge = bridges.start(None, *flags)
    copy_to(nix_in(tmp_path), closure, bridge.url)
    bridge.stop()
    home = tmp_path / "operator"
    fsck = ("fsck", "--json", *flags)
    report = json.loads(_ok(_tvix(home, *fsck, "--deep")))
    assert report["ok"] and report["paths"] == len(closure.paths) and report["deep"]
    assert report["files"] > 0 and report["directories"] > 0

    objects = S3Store(
        s3.bucket, prefix=urllib.parse.urlsplit(flags[1]).path.strip("/"),
        endpoint=s3.endpoint, region="us-east-1", access_key_id="test",
        secret_access_key="test", client_options={"allow_http": True},
    )  # fmt: skip
    keys = sorted(m["path"] for batch in obstore.list(objects, "chunks/") for m in batch)
    # Which path holds which blob: the file "small" of dep (and of the paths that copy it).
    dep = closure.by_name("dep")
    small = b"hello from nar-bridge\n"
    from tvix_castore.digests import B3Digest

    key = next(k for k in keys if k.endswith(B3Digest.of(small).raw.hex()))
    import zstandard

    obstore.put(objects, key, zstandard.compress(b"hello from somewhere else\n"))
    proc = _tvix(home, *fsck)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and not report["ok"], proc.stderr
    damaged = {d["path"]: d["why"] for d in report["damaged"]}
    assert dep.path in damaged and str(B3Digest.of(small)) in damaged[dep.path], damaged

    obstore.delete(objects, key)
    report = json.loads(_tvix(home, *fsck).stdout)
    assert f"blob {B3Digest.of(small)} is missing" in {d["path"]: d["why"] for d in
                                                      report["damaged"]}[dep.path]  # fmt: skip
    bad = _tvix(home, "fsck", "--repair", *flags)
    assert bad.returncode != 0 and "--repair is for the embedded store" in bad.stderr
