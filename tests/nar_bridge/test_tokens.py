"""Tokens through the public interfaces: HTTP (Bearer, Nix's netrc), gRPC metadata, the CLI.

Every check runs against real processes: a bridge or daemon on the store,
tokens made with ``tvix-store token create`` on the same data directory.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import aiohttp
import grpc
import pytest

from tests.compat.oracle import NixFailed
from tvix_castore.protos import rpc_blobstore_pb2, rpc_blobstore_pb2_grpc
from tvix_store.tokens import TokenAuthority

from .conftest import TVIX, Bridges, Closure, copy_to, nix_in, store_rows, tvix_env

_INFO = "/nix-cache-info"


def token(home: Path, *args: str) -> str:
    """``tvix-store token create ARGS``: the token (the last line of stdout)."""
    out = subprocess.run(
        [TVIX, "token", "create", *args], env=tvix_env(home), capture_output=True, check=True
    )
    return out.stdout.decode().splitlines()[-1]


def tvix(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TVIX, *args], env={**tvix_env(home), **(env or {})}, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


async def _put(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str | None]:
    async with aiohttp.ClientSession() as s, s.put(url + _INFO, data=b"x", headers=headers) as r:
        return r.status, await r.text(), r.headers.get("WWW-Authenticate")


async def _get(url: str, path: str, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as s, s.get(url + path, headers=headers) as r:
        return r.status


def _bearer(t: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {t}"}


async def test_http_scopes_expiry_revocation(bridges: Bridges, tmp_path: Path) -> None:
    home = tmp_path / "home"
    bridge = bridges.start(home)
    # No token exists yet: the loopback bridge is open, as before.
    assert (await _put(bridge.url))[0] == 200

    pull = token(home, "--scope", "pull")
    push = token(home, "--scope", "push", "--description", "ci")
    # From now on pushes need a token.
    status, text, challenge = await _put(bridge.url)
    assert status == 401 and "scope 'push'" in text
    assert challenge is not None and challenge.startswith("Basic")
    assert (await _put(bridge.url, _bearer("not-a-jwt")))[0] == 401
    assert (await _put(bridge.url, {"Authorization": "Token abc"}))[0] == 401
    # A token signed with another store's key is refused.
    other = TokenAuthority(tmp_path / "other")
    _, foreign = other.create(["admin"])
    other.close()
    assert (await _put(bridge.url, _bearer(foreign)))[0] == 401
    status, text, _ = await _put(bridge.url, _bearer(pull))
    assert status == 403 and "does not allow 'push'" in text
    assert (await _put(bridge.url, _bearer(push)))[0] == 200
    # Nix's netrc form: basic auth, the token as the password.
    basic = base64.b64encode(f"anyone:{push}".encode()).decode()
    assert (await _put(bridge.url, {"Authorization": f"Basic {basic}"}))[0] == 200
    bad = base64.b64encode(b"anyone:").decode()
    assert (await _put(bridge.url, {"Authorization": f"Basic {bad}"}))[0] == 401

    # Expired (made an hour ago for a minute), through the same key and records.
    authority = TokenAuthority(home)
    _, expired = authority.create(["push"], expires_in=60, now=time.time() - 3600)
    authority.close()
    status, text, _ = await _put(bridge.url, _bearer(expired))
    assert status == 401 and "expired" in text

    # Revoked: listed, then refused by the running bridge at once.
    listed = tvix(home, "token", "list", "--json")
    ids = {r["description"]: r["id"] for r in json.loads(listed.stdout)}
    assert tvix(home, "token", "revoke", ids["ci"]).returncode == 0
    status, text, _ = await _put(bridge.url, _bearer(push))
    assert status == 401 and "revoked" in text
    missing = tvix(home, "token", "revoke", "0000")
    assert missing.returncode == 1 and "no token with id" in missing.stderr

    # Reads of a public cache stay anonymous; a bad credential is still refused.
    assert await _get(bridge.url, _INFO) == 200
    assert await _get(bridge.url, _INFO, _bearer(push)) == 401
    assert await _get(bridge.url, _INFO, _bearer(pull)) == 200


async def test_cache_globs_and_private_reads(bridges: Bridges, tmp_path: Path) -> None:
    home = tmp_path / "home"
    elsewhere = token(home, "--scope", "push", "--cache", "team-*")
    everywhere = token(home, "--scope", "pull")
    bridge = bridges.start(home, "--private")
    status, text, _ = await _put(bridge.url, _bearer(elsewhere))
    assert status == 403 and "'default'" in text
    assert await _get(bridge.url, _INFO) == 401
    assert await _get(bridge.url, "/00000000000000000000000000000000.narinfo") == 401
    assert await _get(bridge.url, _INFO, _bearer(everywhere)) == 200
    assert await _get(bridge.url, _INFO, _bearer(elsewhere)) == 403
    assert token(home, "--scope", "pull", "--cache", "default")


def test_bad_token_requests_are_refused_by_the_cli(tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = tvix(home, "token", "create", "--scope", "read")
    assert r.returncode == 1 and "unknown scope 'read'" in r.stderr
    r = tvix(home, "token", "create", "--scope", "pull", "--expires", "soon")
    assert r.returncode == 2 and "expected a duration" in r.stderr
    assert tvix(home, "token", "list").stdout == ""


async def test_nix_copy_with_a_netrc_file(
    bridges: Bridges, closure: Closure, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    push = token(home, "--scope", "push")
    bridge = bridges.start(home)
    nix = nix_in(tmp_path)
    with pytest.raises(NixFailed) as failed:
        copy_to(nix, closure, bridge.url)
    assert b"401" in failed.value.stderr
    assert store_rows(home) == (0, 0)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login nix password {push}\n")
    nix.fresh_cache()
    copy_to(
        nix,
        closure,
        bridge.url,
        env={"NIX_CONFIG": f"experimental-features = nix-command\nnetrc-file = {netrc}"},
    )
    n = len(closure.paths)
    assert store_rows(home) == (n, n)


def _grpc_put(addr: str, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    with grpc.insecure_channel(addr) as channel:
        stub = rpc_blobstore_pb2_grpc.BlobServiceStub(channel)
        reply = stub.Put(
            iter([rpc_blobstore_pb2.BlobChunk(data=b"hello tokens")]), metadata=metadata
        )
        return bytes(reply.digest)


def test_grpc_writes_need_push(bridges: Bridges, tmp_path: Path) -> None:
    home = tmp_path / "home"
    pull = token(home, "--scope", "pull")
    push = token(home, "--scope", "push")
    daemon = bridges.start_daemon(home)
    assert daemon.grpc_addr is not None
    addr = daemon.grpc_addr
    with pytest.raises(grpc.RpcError) as err:
        _grpc_put(addr)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        _grpc_put(addr, (("authorization", f"Bearer {pull}"),))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        _grpc_put(addr, (("authorization", "Bearer junk"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    digest = _grpc_put(addr, (("authorization", f"Bearer {push}"),))
    # Reads stay anonymous without --private.
    with grpc.insecure_channel(addr) as channel:
        stub = rpc_blobstore_pb2_grpc.BlobServiceStub(channel)
        got = b"".join(c.data for c in stub.Read(rpc_blobstore_pb2.ReadBlobRequest(digest=digest)))
    assert got == b"hello tokens"

    # Our own clients send TVIX_STORE_TOKEN.
    tree = tmp_path / "tree"
    tree.write_text("imported through a token\n")
    url = f"grpc+http://{addr}"
    services = {
        k: url for k in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR")
    }
    denied = tvix(tmp_path / "client", "import", str(tree), env=services)
    assert denied.returncode != 0 and "needs a token" in denied.stderr
    ok = tvix(tmp_path / "client", "import", str(tree), env={**services, "TVIX_STORE_TOKEN": push})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("/nix/store/")


def test_private_grpc_reads(bridges: Bridges, tmp_path: Path) -> None:
    home = tmp_path / "home"
    pull = token(home, "--scope", "pull")
    daemon = bridges.start_daemon(home, "--private")
    assert daemon.grpc_addr is not None
    with grpc.insecure_channel(daemon.grpc_addr) as channel:
        stub = rpc_blobstore_pb2_grpc.BlobServiceStub(channel)
        request = rpc_blobstore_pb2.StatBlobRequest(digest=bytes(32))
        with pytest.raises(grpc.RpcError) as err:
            stub.Stat(request)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.Stat(request, metadata=(("authorization", f"Bearer {pull}"),))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_exposed_listener_needs_access_control(tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = tvix(home, "nar-bridge", "-l", "0.0.0.0:0")
    assert r.returncode == 1 and "without access control" in r.stderr
    r = tvix(home, "daemon", "-l", "0.0.0.0:0")
    assert r.returncode == 1 and "without access control" in r.stderr
    for args in (("--insecure-no-auth",), ()):
        if not args:
            token(home, "--scope", "admin")
        proc = subprocess.Popen(
            [TVIX, "nar-bridge", "-l", "0.0.0.0:0", *args], env=tvix_env(home),
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert "nar-bridge listening on http://0.0.0.0:" in line, line
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            assert proc.stderr is not None
            proc.stderr.close()
    assert os.path.exists(home / "token.key")
