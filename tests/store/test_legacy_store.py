"""A store written by an older release (format v1) opens and reads back exactly.

``tests/data/legacy-store-v1.tar.gz`` is an embedded store written by the
commit named in ``legacy-store-v1.json`` (made by
``scripts/make_legacy_store.py``): raw ``packs/*.pack`` indexed by the
``packed``/``pack_segments``/``chunked`` tables, zstd chunk objects under
``blobs/`` and NAR plans. Every store path must read back, through the public
interface only (CLI, daemon over gRPC and HTTP), with the NarHash/NarSize and
export sha256 recorded when it was written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import sqlite3
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import blake3
import pytest

from nix_compat import nixbase32
from nix_compat.narinfo import NarInfo
from tests.store.conftest import DATA, TVIX, check_store, ok, tvix, tvix_env
from tvix_castore import B3Digest
from tvix_castore.registry import blob_service_from_url

LEGACY = "legacy-store-v1"


def legacy_meta() -> dict[str, Any]:
    """The JSON that describes the fixture: every path with its hashes."""
    meta: dict[str, Any] = json.loads((DATA / f"{LEGACY}.json").read_text())
    return meta


def unpack_legacy(dest: Path) -> Path:
    """Unpack the v1 store under ``dest``; return its home (``TVIX_STORE_HOME``)."""
    meta = legacy_meta()
    with tarfile.open(DATA / meta["tarball"]) as tar:
        tar.extractall(dest, filter="data")
    return dest / str(meta["store_dir"])


def nar_sha256(nar_hash: str) -> bytes:
    algo, _, digest = nar_hash.partition(":")
    assert algo == "sha256", nar_hash
    return nixbase32.decode(digest, 32)


def check_exports(home: Path, meta: dict[str, Any] | None = None) -> None:
    """``info --json`` and ``export`` of every recorded path give the recorded hashes."""
    meta = meta or legacy_meta()
    for rec in meta["paths"]:
        sp = rec["store_path"]
        info = json.loads(ok(tvix(home, "info", "--json", sp)))
        assert info["narHash"] == rec["nar_hash"], sp
        assert info["narSize"] == rec["nar_size"], sp
        assert info["references"] == rec["references"], sp
        assert info["ca"] == rec["ca"], sp
        assert info["root"] == rec["root"], sp
        nar = ok(tvix(home, "export", sp))
        assert len(nar) == rec["nar_size"], sp
        assert hashlib.sha256(nar).hexdigest() == rec["export_sha256"], sp
        assert hashlib.sha256(nar).digest() == nar_sha256(rec["nar_hash"]), sp


@pytest.fixture
def legacy_home(tmp_path: Path) -> Path:
    return unpack_legacy(tmp_path)


def test_fixture_is_format_v1(legacy_home: Path) -> None:
    """The tarball holds every part of the old layout that the new store must read."""
    meta = legacy_meta()
    assert meta["format"] == "v1"
    assert re.fullmatch(r"[0-9a-f]{40}", meta["written_by_commit"])
    layout = meta["layout"]
    packs = sorted(str(p.relative_to(legacy_home)) for p in (legacy_home / "packs").iterdir())
    assert packs == layout["packs"]
    assert all(p.endswith(".pack") for p in packs)
    chunk_files = [p for p in (legacy_home / "blobs").rglob("*") if p.is_file()]
    assert len(chunk_files) == layout["chunk_store_files"] > 0
    assert any("/blobs/b3/" in str(p) for p in chunk_files)  # a chunked blob's index object
    conn = sqlite3.connect(f"file:{legacy_home / 'store.sqlite'}?mode=ro", uri=True)
    try:
        for table in ("packed", "pack_segments", "chunked", "nar_plans", "pathinfos"):
            (n,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            assert n == layout["tables"][table] > 0, table
    finally:
        conn.close()
    origins = {rec["origin"] for rec in meta["paths"]}
    assert {"import", "import (TVIX_STORE_CHUNK_ZSTD=3)", "nar-bridge PUT"} <= origins


def test_cli_reads_every_path(legacy_home: Path) -> None:
    check_exports(legacy_home)


def test_cli_reads_with_chunk_zstd_set(legacy_home: Path) -> None:
    """The setting only affects new writes: old blobs read the same either way."""
    for rec in legacy_meta()["paths"]:
        nar = ok(
            tvix(legacy_home, "export", rec["store_path"], extra_env={"TVIX_STORE_CHUNK_ZSTD": "3"})
        )
        assert hashlib.sha256(nar).hexdigest() == rec["export_sha256"]


async def test_content_complete_and_renders(legacy_home: Path) -> None:
    """Every PathInfo's closure is present and renders (no plan) to the recorded NAR."""
    infos = await check_store(legacy_home)
    assert sorted(str(i.store_path.absolute) for i in infos) == sorted(
        rec["store_path"] for rec in legacy_meta()["paths"]
    )


class _Serving:
    """``tvix-store daemon --nar-bridge`` on the store: gRPC and HTTP addresses."""

    def __init__(self, home: Path, log: Path) -> None:
        self._log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [TVIX, "daemon", "-l", "127.0.0.1:0", "--nar-bridge", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=tvix_env(home),
        )
        deadline = time.monotonic() + 120
        while True:
            text = log.read_text(errors="replace")
            g = re.search(r"tvix-store listening on (\S+)", text)
            h = re.search(r"nar-bridge listening on (http://\S+)", text)
            if g and h:
                self.grpc, self.http = g.group(1), h.group(1).rstrip("/")
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"daemon did not start:\n{text}")
            time.sleep(0.05)

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"{self.http}/{path}", timeout=60) as resp:
            assert resp.status == 200, path
            body: bytes = resp.read()
            return body

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=60)
        self._out.close()
        return self.proc.returncode


def check_served(srv: _Serving, meta: dict[str, Any] | None = None) -> None:
    """Every narinfo and NAR over HTTP, and every recorded blob over gRPC, is as recorded."""
    meta = meta or legacy_meta()
    for rec in meta["paths"]:
        sp = rec["store_path"]
        hash_part = sp.removeprefix("/nix/store/")[:32]
        info = NarInfo.parse(srv.get(f"{hash_part}.narinfo").decode())
        assert str(info.store_path.absolute) == sp
        assert info.nar_hash == nar_sha256(rec["nar_hash"]), sp
        assert info.nar_size == rec["nar_size"], sp
        nar = srv.get(info.url)
        assert len(nar) == rec["nar_size"], sp
        assert hashlib.sha256(nar).hexdigest() == rec["export_sha256"], sp

    async def read_blobs() -> None:
        blobs = blob_service_from_url("grpc+http://" + srv.grpc)
        try:
            for rec in meta["paths"]:
                for b in rec["blobs"]:
                    digest = B3Digest.from_hex(b["b3"])
                    data = await blobs.read_all(digest)
                    assert data is not None, (rec["store_path"], b)
                    assert len(data) == b["size"]
                    assert blake3.blake3(data).hexdigest() == b["b3"]
        finally:
            await blobs.aclose()

    asyncio.run(read_blobs())


def test_daemon_serves_every_path(legacy_home: Path, tmp_path: Path) -> None:
    srv = _Serving(legacy_home, tmp_path / "daemon.log")
    try:
        check_served(srv)
    finally:
        assert srv.stop() == 0, (tmp_path / "daemon.log").read_text()
