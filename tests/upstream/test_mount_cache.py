"""``tvix-store mount`` over the cache composition: a path not yet local is substituted on first lookup.

The mount's PathInfoService is ``nix+http://`` (the binary cache made by real
``nix copy``), cached in the embedded store; the first lookup of a store path
fetches its narinfo and NAR (verified against the NarHash and the trusted
key), later lookups ask nothing upstream, and the files read back as Nix
has them.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from tests.fs.conftest import Mounts, run

from .conftest import CacheServers, Upstream


def test_first_lookup_substitutes(
    upstream: Upstream, servers: CacheServers, tmp_path: Path
) -> None:
    server = servers.serve("zstd")
    keys = quote(upstream.public_key, safe="")
    mounts = Mounts(tmp_path)
    try:
        m = mounts.start(
            tmp_path / "home",
            "--path-info-service-addr",
            f"nix+{server.base}?trusted-public-keys={keys}",
        )
        assert server.count(".narinfo") == 0
        dep = upstream.by_name("dep")
        there = m.at / Path(dep.path).name
        assert (there / "hello").read_bytes() == b"hello from upstream\n"
        assert server.count(".narinfo") == 1
        run(["diff", "-r", "--no-dereference", upstream.store / dep.path.lstrip("/"), there])
        assert (there / "run.sh").stat().st_mode & 0o777 == 0o555
        assert server.count(".narinfo") == 1  # (local now)
        with pytest.raises(FileNotFoundError):
            (m.at / ("0" * 32 + "-not-upstream")).stat()
        assert m.stop() == 0
    finally:
        mounts.cleanup()
