"""TOML store composition: valid graphs build and work; bad ones fail with clear errors,
in-process and through the CLI (``--store-composition`` / ``TVIX_STORE_COMPOSITION``)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from urllib.parse import quote

import pytest

from tvix_castore.blobservice.combined import CombinedBlobService
from tvix_castore.directoryservice.cache import CacheDirectoryService
from tvix_castore.errors import CompositionError, ConfigError
from tvix_store.composition import Composition, load_composition
from tvix_store.config import open_store
from tvix_store.pathinfoservice.combinators import (
    CachePathInfoService,
    LruPathInfoService,
    SigningPathInfoService,
)
from tvix_store.pathinfoservice.nix_http import NixHttpPathInfoService
from tvix_store.pathinfoservice.sqlite import SqlitePathInfoService

from .conftest import CacheServers, Upstream, ok, tvix
from .test_nix_http import check_info


def upstream_composition(home: Path, base_url: str, public_key: str) -> str:
    return f"""
[blobservices.default]
type = "embedded"
path = "{home}"

[directoryservices.default]
type = "embedded"
path = "{home}"

[pathinfoservices.local]
type = "embedded"
path = "{home}"

[pathinfoservices.upstream]
type = "nix"
base_url = "{base_url}"
public_keys = ["{public_key}"]

[pathinfoservices.default]
type = "cache"
near = "local"
far = "upstream"
"""


def write(tmp_path: Path, text: str, name: str = "store.toml") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


async def test_valid_composition_builds_and_substitutes(
    servers: CacheServers, upstream: Upstream, tmp_path: Path
) -> None:
    server = servers.serve("xz")
    home = tmp_path / "composed"
    f = write(tmp_path, upstream_composition(home, server.base, upstream.public_key))
    async with await open_store(composition=f) as store:
        assert isinstance(store.pathinfos, CachePathInfoService)
        assert isinstance(store.pathinfos.near, SqlitePathInfoService)
        assert isinstance(store.pathinfos.far, NixHttpPathInfoService)
        for p in upstream.paths:
            check_info(await store.pathinfos.get(p.digest), p, upstream)
    assert (home / "store.sqlite").exists()
    # Reopened with the upstream gone: everything comes from the near store.
    server.stop()
    async with await open_store(composition=f) as store:
        for p in upstream.paths:
            check_info(await store.pathinfos.get(p.digest), p, upstream)


async def test_composition_combinators_and_anonymous_urls(
    servers: CacheServers, upstream: Upstream, tmp_path: Path
) -> None:
    server = servers.serve("zstd")
    nix_url = f"nix+{server.base}/?trusted-public-keys={quote(upstream.public_key, safe='')}"
    f = write(
        tmp_path,
        f"""
[blobservices.default]
type = "combined"
local = "memory://"
remote = "fast"

[blobservices.fast]
type = "memory"

[directoryservices.default]
type = "cache"
near = "memory://"
far = "slow"

[directoryservices.slow]
type = "sqlite"
path = "{tmp_path / "dirs.sqlite"}"

[pathinfoservices.lru]
type = "lru"
capacity = 10

[pathinfoservices.cached]
type = "cache"
near = "lru"
far = "{nix_url}"

[pathinfoservices.default]
type = "keyfile-signing"
inner = "cached"
keyfile = "{upstream.other_secret_key}"
""",
    )
    comp = load_composition(f)
    blobs = comp.build("blobservices", "default")
    assert isinstance(blobs, CombinedBlobService)
    assert blobs.remote is comp.build("blobservices", "fast")  # built once, shared
    assert isinstance(comp.build("directoryservices", "default"), CacheDirectoryService)
    pis = comp.build("pathinfoservices", "default")
    assert isinstance(pis, SigningPathInfoService)
    assert isinstance(pis.inner, CachePathInfoService)
    assert isinstance(pis.inner.near, LruPathInfoService) and pis.inner.near.capacity == 10
    assert isinstance(pis.inner.far, NixHttpPathInfoService)
    try:
        dep = upstream.by_name("dep")
        info = check_info(await pis.get(dep.digest), dep, upstream)
        # Signing happens on put: store it again through the signing layer.
        signed = await pis.put(info)
        assert [s.name for s in signed.signatures] == ["upstream-test-1", "upstream-test-other"]
        assert upstream.other_key.verify(signed.fingerprint(), signed.signatures[1])
    finally:
        for close in reversed(comp.closers):
            await close()


MEMORY_DEFAULTS = """
[blobservices.default]
type = "memory"

[directoryservices.default]
type = "memory"
"""

CYCLE = (
    MEMORY_DEFAULTS
    + """
[pathinfoservices.a]
type = "cache"
near = "memory://"
far = "b"

[pathinfoservices.b]
type = "cache"
near = "a"
far = "memory://"

[pathinfoservices.default]
type = "lru"
capacity = 1
"""
)


def test_cycle_is_named() -> None:
    comp = Composition(tomllib.loads(CYCLE), "cycle.toml")
    with pytest.raises(CompositionError) as err:
        comp.build("pathinfoservices", "a")
    msg = str(err.value)
    assert "cycle" in msg
    assert "pathinfoservices.a -> pathinfoservices.b -> pathinfoservices.a" in msg
    # A self-reference too.
    comp = Composition(
        {"directoryservices": {"me": {"type": "cache", "near": "me", "far": "memory://"}}}
    )
    with pytest.raises(CompositionError, match="cycle"):
        comp.build("directoryservices", "me")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        # unknown name
        (
            '[pathinfoservices.default]\ntype = "cache"\nnear = "nope"\nfar = "memory://"\n',
            "'nope' not found",
        ),
        # unknown field
        ('[blobservices.default]\ntype = "memory"\ncolour = "blue"\n', "colour"),
        # unknown type
        ('[directoryservices.default]\ntype = "redis"\n', "redis"),
        # missing type
        ('[directoryservices.default]\npath = "/x"\n', "type"),
        # wrong field type
        ('[pathinfoservices.default]\ntype = "lru"\ncapacity = "10"\n', "capacity"),
        ('[pathinfoservices.default]\ntype = "lru"\ncapacity = true\n', "capacity"),
        # missing required field
        ('[pathinfoservices.default]\ntype = "cache"\nnear = "memory://"\n', "far"),
        # unknown section
        ('[castles.default]\ntype = "memory"\n', "castles"),
        # not TOML
        ("[blobservices.default\n", "TOML"),
        # zero capacity
        ('[pathinfoservices.default]\ntype = "lru"\ncapacity = 0\n', "capacity"),
        # empty key list is a configuration error, not "trust nothing"
        (
            '[pathinfoservices.default]\ntype = "nix"\nbase_url = "http://127.0.0.1:1/x"\n'
            "public_keys = []\n",
            "empty",
        ),
        # a bad key
        (
            '[pathinfoservices.default]\ntype = "nix"\nbase_url = "http://127.0.0.1:1/x"\n'
            'public_keys = ["nope"]\n',
            "default",
        ),
        # a bad anonymous URL
        (
            '[pathinfoservices.default]\ntype = "cache"\nnear = "memory:///x"\nfar = "memory://"\n',
            "memory",
        ),
        # a missing key file
        (
            '[pathinfoservices.default]\ntype = "keyfile-signing"\ninner = "memory://"\n'
            'keyfile = "/nonexistent/key.sk"\n',
            "/nonexistent/key.sk",
        ),
    ],
)
async def test_bad_compositions(text: str, needle: str, tmp_path: Path) -> None:
    if "[pathinfoservices." in text:
        text = MEMORY_DEFAULTS + text
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        async with await open_store(composition=f):
            pass
    assert isinstance(err.value, CompositionError), repr(err.value)
    assert needle in str(err.value)


async def test_missing_file_and_both_forms(tmp_path: Path) -> None:
    with pytest.raises(CompositionError, match="cannot read"):
        load_composition(tmp_path / "missing.toml")
    f = write(tmp_path, '[blobservices.default]\ntype = "memory"\n')
    with pytest.raises(ConfigError):
        await open_store("memory://", composition=f)


# -- through the CLI ------------------------------------------------------------------------------
def test_cli_bad_composition_exits_with_the_message(tmp_path: Path, upstream: Upstream) -> None:
    home = tmp_path / "home"
    bad = write(
        tmp_path,
        CYCLE.replace("lru", "cache").replace("capacity = 1", 'near = "a"\nfar = "b"'),
        "bad.toml",
    )
    top = upstream.by_name("top").store_path.basename
    proc = tvix(home, "info", "--store-composition", bad, top)
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert "cycle" in err and "bad.toml" in err, err
    assert "Traceback" not in err
    # Same through the environment variable.
    proc = tvix(home, "info", top, extra_env={"TVIX_STORE_COMPOSITION": str(bad)})
    assert proc.returncode != 0
    assert "cycle" in proc.stderr.decode()
    unknown = write(tmp_path, '[blobservices.default]\ntype = "memory"\nfoo = 1\n', "unknown.toml")
    proc = tvix(home, "ls", "--store-composition", unknown, top)
    assert proc.returncode != 0
    assert "'foo'" in proc.stderr.decode() and "Traceback" not in proc.stderr.decode()
    # Nothing was created in the embedded default store.
    assert not (home / "store.sqlite").exists()


def test_cli_valid_composition(servers: CacheServers, upstream: Upstream, tmp_path: Path) -> None:
    """``info`` through a composition substitutes from the upstream cache."""
    server = servers.serve("xz")
    composed = tmp_path / "composed"
    f = write(tmp_path, upstream_composition(composed, server.base, upstream.public_key))
    top = upstream.by_name("top")
    out = ok(tvix(tmp_path / "default-home", "info", "--json", "--store-composition", f, top.path))
    data = json.loads(out)
    assert top.path in json.dumps(data)
    assert server.count(".narinfo") == 1
    assert not (tmp_path / "default-home" / "store.sqlite").exists()
    assert (composed / "store.sqlite").exists()
    # The URL flags and a composition together are refused.
    proc = tvix(
        tmp_path / "default-home",
        "info",
        "--store-composition",
        f,
        "--blob-service-addr",
        "memory://",
        top.path,
    )
    assert proc.returncode != 0
