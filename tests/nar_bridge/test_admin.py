"""Deletes, pins and gc over HTTP (the ``delete`` and ``admin`` scopes), through real bridges.

Every call without a token (even before any token exists), with a token of
too little scope or for another cache, and with enough; the store's state
checked afterwards with the CLI. A path still referred to or pinned is a
``409`` and stays.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import TVIX, Bridges, Closure, copy_to, nix_in, tvix_env


def tvix(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TVIX, *args], env=tvix_env(home), capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip


def _token(home: Path, *args: str) -> str:
    made = tvix(home, "token", "create", *args)
    assert made.returncode == 0, made.stderr
    return made.stdout.splitlines()[-1]


async def _call(
    method: str, url: str, token: str | None = None, body: Any = None
) -> tuple[int, str]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    data = None if body is None else json.dumps(body)
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, headers=headers, data=data) as r,
    ):
        return r.status, await r.text()


def _present(home: Path, path: str) -> bool:
    return tvix(home, "info", path).returncode == 0


async def test_deletes_need_a_delete_token_even_before_any_exists(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    bridge = bridges.start(home)
    nix = nix_in(tmp_path)
    copy_to(nix, closure, bridge.url)  # (no token exists yet: pushes are open)
    single, top, dep = (closure.by_name(n) for n in ("single", "top", "dep"))

    status, text = await _call("DELETE", f"{bridge.url}/{single.hash_part}.narinfo")
    assert status == 401 and "tvix-store token create --scope delete" in text
    assert _present(home, single.path)

    pull = _token(home, "--scope", "pull")
    push = _token(home, "--scope", "push")
    delete = _token(home, "--scope", "delete")
    for weak in (pull, push):
        status, text = await _call("DELETE", f"{bridge.url}/{single.hash_part}.narinfo", weak)
        assert status == 403 and "does not allow 'delete'" in text
    assert _present(home, single.path)
    status, text = await _call("DELETE", f"{bridge.url}/{single.hash_part}.narinfo", delete)
    assert status == 200 and json.loads(text) == {"deleted": [single.path]}
    assert not _present(home, single.path)
    assert (await _call("GET", f"{bridge.url}/{single.hash_part}.narinfo"))[0] == 404
    status, text = await _call("DELETE", f"{bridge.url}/{single.hash_part}.narinfo", delete)
    assert status == 404

    # A path others refer to stays, unless its referrers go too.
    status, text = await _call("DELETE", f"{bridge.url}/{dep.hash_part}.narinfo", delete)
    assert status == 409 and f"{dep.path} is referred to by" in text
    assert _present(home, dep.path)
    status, text = await _call(
        "DELETE", f"{bridge.url}/{dep.hash_part}.narinfo?referrers=1", delete
    )
    assert status == 200
    gone = json.loads(text)["deleted"]
    assert dep.path in gone and top.path in gone
    assert not _present(home, top.path) and not _present(home, dep.path)


async def test_delete_from_a_named_cache_only_ends_membership(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    for name in ("team-a", "team-b"):
        assert tvix(home, "cache", "create", name).returncode == 0
    admin = _token(home, "--scope", "admin")
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login nix password {admin}\n")
    bridge = bridges.start(home)
    nix = nix_in(tmp_path)
    conf = f"experimental-features = nix-command\nnetrc-file = {netrc}"
    copy_to(nix, closure, f"{bridge.url}/team-a", env={"NIX_CONFIG": conf})
    top = closure.by_name("top")
    url = f"{bridge.url}/team-a/{top.hash_part}.narinfo"

    only_b = _token(home, "--scope", "delete", "--cache", "team-b")
    status, text = await _call("DELETE", url, only_b)
    assert status == 403 and "team-a" in text
    a_delete = _token(home, "--scope", "delete", "--cache", "team-a")
    status, text = await _call("DELETE", url, a_delete)
    assert status == 200 and json.loads(text) == {"cache": "team-a", "removed": top.hash_part}
    assert (await _call("GET", url))[0] == 404
    assert (await _call("DELETE", url, a_delete))[0] == 404
    # The store keeps the path (the default cache still serves it).
    assert (await _call("GET", f"{bridge.url}/{top.hash_part}.narinfo"))[0] == 200
    counts = {
        c["name"]: c["paths"] for c in json.loads(tvix(home, "cache", "list", "--json").stdout)
    }
    assert counts == {"team-a": len(closure.paths) - 1, "team-b": 0}


async def test_pins_and_gc_over_http(bridges: Bridges, tmp_path: Path) -> None:
    home = tmp_path / "home"
    files = []
    for name in ("kept", "loose"):
        f = tmp_path / name
        f.write_text(f"{name}\n")
        made = tvix(home, "import", str(f))
        assert made.returncode == 0, made.stderr
        files.append(made.stdout.strip())
    kept, loose = files
    bridge = bridges.start(home)
    pins = f"{bridge.url}/_admin/pins"
    assert (await _call("GET", pins))[0] == 401
    push = _token(home, "--scope", "push,delete")
    admin = _token(home, "--scope", "admin")
    status, text = await _call("PUT", f"{pins}/keep", push, [kept])
    assert status == 403 and "does not allow 'admin'" in text

    for bad, message in (
        ({"paths": [kept]}, "expected a JSON list of store paths"),
        (["/nix/store/not-a-path"], "expected a JSON list of store paths"),
        ([kept.replace(kept.split("/")[3][:4], "0000", 1)], "not in this store"),
    ):
        status, text = await _call("PUT", f"{pins}/keep", admin, bad)
        assert status in (400, 404) and message in text, (bad, status, text)
    status, text = await _call("PUT", f"{pins}/bad name", admin, [kept])
    assert status == 400 and "pin name" in text

    assert (await _call("PUT", f"{pins}/keep", admin, [kept]))[0] == 200
    status, text = await _call("GET", pins, admin)
    assert status == 200 and json.loads(text) == {"keep": [kept]}
    assert json.loads(tvix(home, "pin", "list", "--json").stdout) == {"keep": [kept]}
    # A pinned path is not deleted.
    digest = kept.split("/")[3][:32]
    status, text = await _call("DELETE", f"{bridge.url}/{digest}.narinfo", push)
    assert status == 409 and "keep" in text

    gc = f"{bridge.url}/_admin/gc"
    assert (await _call("POST", f"{gc}?keep-since=0", push))[0] == 403
    status, text = await _call("POST", f"{gc}?keep-since=soon", admin)
    assert status == 400 and "not a duration" in text
    status, text = await _call("POST", f"{gc}?keep-since=0&dry-run=1", admin)
    report = json.loads(text)
    assert status == 200 and report["dry_run"] and report["deleted_paths"] == [loose]
    assert _present(home, loose)
    status, text = await _call("POST", f"{gc}?keep-since=0&grace=0", admin)
    report = json.loads(text)
    assert status == 200 and report["deleted_paths"] == [loose] and report["deferred"] is None
    assert not _present(home, loose) and _present(home, kept)

    status, text = await _call("DELETE", f"{pins}/keep", admin)
    assert status == 200 and json.loads(text) == {"pin": "keep", "removed": [kept]}
    assert (await _call("DELETE", f"{pins}/keep", admin))[0] == 404


async def test_store_wide_calls_need_the_embedded_store(bridges: Bridges, tmp_path: Path) -> None:
    home = tmp_path / "home"
    admin = _token(home, "--scope", "admin")
    bridge = bridges.start(home, "--path-info-service-addr", "memory://")
    status, text = await _call("POST", f"{bridge.url}/_admin/gc", admin)
    assert status == 501 and "use the CLI" in text
