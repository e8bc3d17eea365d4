"""One assembly path: the embedded store opened with no flags, by flags or env vars
(``embedded:///dir``), or by a TOML composition (``type = "embedded"``) is the same
store, and behaves the same (its exports come from NAR plans in every case)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from tests.compat.oracle import DigestSink, Nix, assert_same_nar
from tvix_store.config import STORE_DB, config_from_urls

from .conftest import TVIX, ok, tvix

WAYS = ["default", "flags", "env", "composition"]


def _tree(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha\n" * 100)
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "sub" / "deeper" / "b").write_bytes(b"beta" * 1000)
    (root / "sub" / "deeper" / "empty").write_bytes(b"")
    (root / "sub" / "link").symlink_to("../a.txt")
    return root


def _args(way: str, home: Path, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """Extra CLI arguments and environment that open the embedded store at ``home``."""
    url = f"embedded://{home}"
    if way == "flags":
        flags = []
        for kind in ("blob", "directory", "path-info"):
            flags += [f"--{kind}-service-addr", url]
        return flags, {}
    if way == "env":
        names = ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR")
        return [], dict.fromkeys(names, url)
    if way == "composition":
        toml = tmp_path / "store.toml"
        toml.write_text(
            "".join(
                f'[{kind}.default]\ntype = "embedded"\npath = "{home}"\n\n'
                for kind in ("blobservices", "directoryservices", "pathinfoservices")
            )
        )
        return ["--store-composition", str(toml)], {}
    return [], {}


@pytest.mark.parametrize("way", WAYS)
def test_every_way_gives_the_same_store_with_plans(way: str, tmp_path: Path, nix: Nix) -> None:
    tree = _tree(tmp_path / "tree")
    home = tmp_path / "home"
    # The CLI's own default store is elsewhere: every way but "default" must name ``home``.
    cli_home = home if way == "default" else tmp_path / "unused"
    flags, env = _args(way, home, tmp_path)

    def run(*args: str | Path) -> bytes:
        return ok(tvix(cli_home, args[0], *flags, *args[1:], extra_env=env))

    store_path = run("import", tree).decode().strip()
    assert (home / STORE_DB).is_file()
    assert not (tmp_path / "unused").exists()
    info = json.loads(run("info", "--json", store_path))
    want = DigestSink()
    nix.dump(tree, want)
    # Exports come from the NAR plan recorded at import: they read no Directory at all.
    # (Directories are in the packs: their index rows go, so none can be found.)
    with sqlite3.connect(home / STORE_DB) as conn:
        gone = conn.execute(
            "DELETE FROM pack_blobs WHERE frame IN (SELECT id FROM pack_frames WHERE kind = 2)"
        )
        assert gone.rowcount > 0
    ours = DigestSink()
    ours.write(run("export", store_path))
    assert_same_nar(ours, want, f"export ({way}) from its plan")
    assert info["narSize"] == want.size
    # The same store through another way: the path, and its plan, are there.
    other = "composition" if way != "composition" else "flags"
    flags, env = _args(other, home, tmp_path)
    again = DigestSink()
    again.write(ok(tvix(cli_home, "export", *flags, store_path, extra_env=env)))
    assert again.digest == want.digest


def test_urls_become_the_composition_a_file_gives(tmp_path: Path) -> None:
    home = tmp_path / "h"
    same = {"type": "embedded", "path": str(home)}
    assert config_from_urls(None, None, None, home) == {
        "blobservices": {"default": same},
        "directoryservices": {"default": same},
        "pathinfoservices": {"default": same},
    }
    url = f"embedded://{tmp_path / 'x'}"
    got = config_from_urls(url, "memory://", None, home)
    assert got["blobservices"] == {"default": {"type": "embedded", "path": str(tmp_path / "x")}}
    assert got["directoryservices"] == {"default": {"type": "url", "url": "memory://"}}


@pytest.mark.parametrize(
    ("url", "needle"),
    [("embedded://host/x", "host"), ("embedded:///x?a=1", "a"), ("embedded://", "absolute")],
)
def test_bad_embedded_urls(tmp_path: Path, url: str, needle: str) -> None:
    proc = tvix(tmp_path / "h", "info", "--blob-service-addr", url, "/nix/store/x")
    err = proc.stderr.decode()
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert url in err and needle in err, err
    assert TVIX
