"""The ``tvix-store`` CLI on the embedded store, against Nix 2.8 in a scratch store.

Every corpus tree of ``tests/compat/trees.py`` (lone files and symlinks
included) is imported with ``tvix-store import`` and must print exactly what
``nix-store --add`` prints; ``export`` must equal ``nix-store --dump`` of the
original tree and ``info --json`` must carry the hash ``nix hash path`` gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.compat.oracle import DigestSink, Nix, assert_same_nar
from tests.compat.trees import TREES, TREES_BY_NAME, Dir, File, Symlink, Tree, expected, materialize

from .conftest import DATA, TVIX, TreeFarm, export_to, ok, stored_infos, tvix, tvix_env

CORPUS = [pytest.param(t, id=t.name, marks=[pytest.mark.slow] if t.large else []) for t in TREES]
COMMANDS = ["daemon", "import", "export", "ls", "cat", "info", "dump"]


def nix_add_raw(nix: Nix, path: bytes | str | os.PathLike[str]) -> bytes:
    """Exactly what ``nix-store --add PATH`` prints."""
    return nix.run("nix-store", *nix.store_args, "--add", path)


def info_json(home: Path, store_path: str) -> dict[str, object]:
    out = json.loads(ok(tvix(home, "info", "--json", store_path)))
    assert isinstance(out, dict)
    return out


def fails(proc: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    """Assert a clean failure: non-zero, nothing on stdout, no traceback, a message."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, f"{proc.args!r} unexpectedly succeeded: {proc.stdout!r}"
    assert proc.stdout == b"", f"{proc.args!r} printed on stdout: {proc.stdout!r}"
    assert "Traceback" not in err, err
    assert err.strip(), "no error message on stderr"
    for needle in needles:
        assert needle.lower() in err.lower(), f"{needle!r} not in stderr: {err}"
    return err


# -- every corpus tree ----------------------------------------------------------
@pytest.mark.parametrize("tree", CORPUS)
def test_import_export_info_match_nix(home: Path, nix: Nix, farm: TreeFarm, tree: Tree) -> None:
    path = farm.path(tree)
    ours, theirs = DigestSink(keep=not tree.large), DigestSink(keep=not tree.large)
    # Independent processes run side by side (the oracles meanwhile).
    with ThreadPoolExecutor(4) as pool:

        def oracle() -> tuple[bytes, str]:  # one Nix at a time: its store DB is not shared well
            nix.dump(path, theirs)
            return nix_add_raw(nix, path), nix.hash_path(path)

        from_nix = pool.submit(oracle)
        printed = ok(tvix(home, "import", path))
        store_path = printed.decode().strip()
        exported = pool.submit(export_to, home, store_path, ours)
        info = info_json(home, store_path)
        exported.result()
        added, nar_hash = from_nix.result()
        assert printed == added

    assert_same_nar(ours, theirs, f"export of {tree.name}")
    assert info["path"] == store_path
    assert info["narHash"] == f"sha256:{nar_hash}"
    assert info["narSize"] == theirs.size
    assert info["ca"] == f"fixed:r:sha256:{nar_hash}"
    assert info["references"] == []
    assert info["signatures"] == []
    assert info["deriver"] is None


def test_info_narinfo_text(home: Path, nix: Nix, farm: TreeFarm) -> None:
    path = farm.path(TREES_BY_NAME["mixed"])
    store_path = ok(tvix(home, "import", path)).decode().strip()
    nar_hash = nix.hash_path(path)
    sink = DigestSink()
    nix.dump(path, sink)
    text = ok(tvix(home, "info", store_path)).decode()
    lines = text.splitlines()
    assert f"StorePath: {store_path}" in lines
    assert f"NarHash: sha256:{nar_hash}" in lines
    assert f"NarSize: {sink.size}" in lines
    assert f"CA: fixed:r:sha256:{nar_hash}" in lines
    assert text.endswith("\n")


def test_import_is_idempotent_and_takes_many_paths(home: Path, nix: Nix, farm: TreeFarm) -> None:
    names = ["mixed", "lone-file", "lone-symlink-rel", "empty-dir"]
    paths = [farm.path(TREES_BY_NAME[n]) for n in names]
    first = ok(tvix(home, "import", *paths))
    # One line per path, in argument order, each what nix-store --add prints.
    assert first == b"".join(nix_add_raw(nix, p) for p in paths)
    assert ok(tvix(home, "import", *paths)) == first


def test_path_spellings(home: Path, nix: Nix, tmp_path: Path) -> None:
    base = tmp_path / "w"
    base.mkdir()
    materialize(Dir({b"a": File(b"a\n"), b"l": Symlink(b"a")}), os.fsencode(base / "foo"))
    (base / "other").mkdir()
    spellings = ["foo", "./foo", "foo/", str(base / "foo"), "other/../foo"]
    ours = subprocess.run(
        [TVIX, "import", *spellings], cwd=base, capture_output=True, env=tvix_env(home), check=False
    )
    theirs = subprocess.run(
        ["nix-store", *nix.store_args, "--add", *spellings],
        cwd=base,
        capture_output=True,
        env=nix.env,
        check=False,
    )
    lines = ok(theirs).splitlines()
    assert len(lines) == len(spellings) and all(x.endswith(b"-foo") for x in lines), lines
    assert ok(ours) == theirs.stdout


# -- the B §3.6 store paths of the three test NARs ------------------------------
@pytest.mark.parametrize(
    ("nar", "expected_path"),
    [
        ("symlink", "/nix/store/y7j0h1s346m08pya3s42nhmx0j0mqidh-foo"),
        ("helloworld", "/nix/store/bppn0r6splkj24pphgcaqj4l44gsbqs3-foo"),
        ("complicated", "/nix/store/bwrpi2jjp97ik4h6im8rpr0v421ac87x-foo"),
    ],
)
def test_import_test_nars_as_foo(
    home: Path, nix: Nix, tmp_path: Path, nar: str, expected_path: str
) -> None:
    nar_bytes = (DATA / f"{nar}.nar").read_bytes()
    dest = tmp_path / nar / "foo"
    dest.parent.mkdir()
    nix.restore(dest, lambda stdin: stdin.write(nar_bytes))
    printed = ok(tvix(home, "import", dest))
    assert printed == f"{expected_path}\n".encode()
    assert printed == nix_add_raw(nix, dest)
    # The export is the original NAR, byte for byte.
    sink = DigestSink()
    export_to(home, expected_path, sink)
    assert sink.data == nar_bytes
    info = info_json(home, expected_path)
    assert info["narSize"] == len(nar_bytes)


# -- looking inside: ls / cat -----------------------------------------------------
def test_ls_and_cat(home: Path, farm: TreeFarm) -> None:
    tree = TREES_BY_NAME["mixed"]
    assert isinstance(tree.root, Dir)
    sp = ok(tvix(home, "import", farm.path(tree))).decode().strip()
    want = expected(tree.root)
    rel = sp.removeprefix("/nix/store/")
    # Read-only commands, run side by side.
    runs = {
        "ls-json": ("ls", "--json", sp),
        "ls": ("ls", sp),
        "ls-bin": ("ls", "--json", f"{sp}/bin"),
        "ls-rel-bin": ("ls", "--json", f"{rel}/bin"),
        "ls-file": ("ls", "--json", f"{sp}/hello.txt"),
        "cat-hello": ("cat", f"{sp}/hello.txt"),
        "cat-data": ("cat", f"{sp}/bin/data"),
        "cat-hard": ("cat", f"{sp}/hard-2"),
        "cat-dots": ("cat", f"{sp}/.../..a"),
        "cat-empty": ("cat", f"{sp}/empty-file"),
        "cat-dir": ("cat", f"{sp}/bin"),
        "cat-link": ("cat", f"{sp}/rel-link"),
        "cat-nope": ("cat", f"{sp}/nope"),
        "ls-deeper": ("ls", f"{sp}/hello.txt/deeper"),
    }
    with ThreadPoolExecutor(4) as pool:
        futures = {k: pool.submit(tvix, home, *args) for k, args in runs.items()}
        r = {k: f.result() for k, f in futures.items()}

    listed = json.loads(ok(r["ls-json"]))
    top = {k: v for k, v in want.items() if k and b"/" not in k}
    assert [e["name"].encode() for e in listed] == sorted(top)
    for e in listed:
        seen = top[e["name"].encode()]
        assert e["type"] == seen.kind, e
        if seen.kind == "regular":
            assert e["size"] == seen.size, e
            assert e["executable"] == seen.executable, e
            assert e["mode"] == ("-r-xr-xr-x" if seen.executable else "-r--r--r--")
        elif seen.kind == "symlink":
            assert e["target"].encode() == seen.data, e

    text = ok(r["ls"]).decode().splitlines()
    assert len(text) == len(top)
    assert any(line.endswith("rel-link -> hello.txt") for line in text), text
    assert any(line.startswith("-r-xr-xr-x") and line.endswith(" run.sh") for line in text), text

    sub = json.loads(ok(r["ls-bin"]))
    assert [(e["name"], e["size"], e["executable"]) for e in sub] == [
        ("data", 4097, False),
        ("tool", 9, True),
    ]
    # A path inside the store path given relative to the store dir works too.
    assert json.loads(ok(r["ls-rel-bin"])) == sub
    # ls of a file describes the file.
    (one,) = json.loads(ok(r["ls-file"]))
    assert (one["type"], one["name"], one["size"]) == ("regular", "hello.txt", 14)

    assert ok(r["cat-hello"]) == b"Hello, World!\n"
    assert ok(r["cat-data"]) == b"d" * 4097
    assert ok(r["cat-hard"]) == b"hardlinked contents\n"
    assert ok(r["cat-dots"]) == b"dots"
    assert ok(r["cat-empty"]) == b""

    fails(r["cat-dir"], "not a regular file")
    fails(r["cat-link"], "not a regular file")
    fails(r["cat-nope"], "no such file")
    fails(r["ls-deeper"], "not a directory")


def test_cat_of_a_lone_file_root(home: Path, farm: TreeFarm) -> None:
    tree = TREES_BY_NAME["lone-exec"]
    sp = ok(tvix(home, "import", farm.path(tree))).decode().strip()
    assert ok(tvix(home, "cat", sp)) == b"#!/bin/sh\nexit 0\n"
    (one,) = json.loads(ok(tvix(home, "ls", "--json", sp)))
    assert one["executable"] is True


def test_ls_and_cat_of_non_utf8_names(home: Path, farm: TreeFarm) -> None:
    # Entry names are bytes; the CLI must accept them as given by the shell
    # (argv is decoded with surrogateescape).
    sp = ok(tvix(home, "import", farm.path(TREES_BY_NAME["name-bytes"]))).decode().strip()
    sub = os.fsencode(sp)
    assert ok(tvix(home, "cat", sub + b"/\xff\xfe")) == b"not utf-8"
    assert ok(tvix(home, "cat", sub + b"/\xfe\xff-dir/\x81\x82")) == b"inner"
    listed = json.loads(ok(tvix(home, "ls", "--json", sub + b"/\xfe\xff-dir")))
    assert [e["size"] for e in listed] == [5]


def test_cat_of_a_big_file(home: Path, farm: TreeFarm) -> None:
    tree = TREES_BY_NAME["large-64MiB"]
    path = farm.path(tree)
    sp = ok(tvix(home, "import", path)).decode().strip()
    want = expected(tree.root)[b"big.bin"]
    got = ok(tvix(home, "cat", f"{sp}/big.bin"))
    assert (len(got), hashlib.sha256(got).digest()) == (want.size, want.data)


# -- errors ---------------------------------------------------------------------
def test_import_of_a_missing_path(home: Path, tmp_path: Path) -> None:
    fails(tvix(home, "import", tmp_path / "does-not-exist"), "does-not-exist", "no such file")


def test_import_of_a_fifo(home: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "a-fifo"
    os.mkfifo(fifo)
    fails(tvix(home, "import", fifo, timeout=120), "a-fifo")


def test_import_of_a_tree_containing_a_fifo_records_nothing(home: Path, tmp_path: Path) -> None:
    root = tmp_path / "has-fifo"
    materialize(Dir({b"a": File(b"a"), b"sub": Dir({b"b": File(b"b")})}), os.fsencode(root))
    os.mkfifo(root / "sub" / "pipe")
    fails(tvix(home, "import", root, timeout=120), "pipe")
    os.unlink(root / "sub" / "pipe")
    sp = ok(tvix(home, "import", root)).decode().strip()
    # Only the successful import is in the store.
    assert [i.store_path.absolute for i in stored_infos(home)] == [sp]


@pytest.mark.parametrize("name", ["foo bar", "f\u00fcr", "x" * 212])
def test_import_of_an_invalid_store_path_name(
    home: Path, nix: Nix, tmp_path: Path, name: str
) -> None:
    root = tmp_path / name
    root.mkdir()
    (root / "f").write_bytes(b"x")
    err = fails(tvix(home, "import", root))
    assert "name" in err.lower(), err
    # Nix refuses it too.
    assert nix.try_run("nix-store", *nix.store_args, "--add", root).returncode != 0


@pytest.mark.parametrize("command", ["export", "info", "ls", "cat"])
def test_unknown_store_path(home: Path, command: str) -> None:
    sp = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432"
    fails(tvix(home, command, sp), f"{sp} is not in the store")


@pytest.mark.parametrize("arg", ["notastorepath", "/nix/store/abc", "/tmp/x-foo", ""])
def test_malformed_store_path(home: Path, arg: str) -> None:
    fails(tvix(home, "info", arg))


def test_dump_matches_nix(home: Path, nix: Nix, farm: TreeFarm) -> None:
    path = farm.path(TREES_BY_NAME["mixed"])
    theirs = DigestSink()
    nix.dump(path, theirs)
    ours = DigestSink()
    ours.write(ok(tvix(home, "dump", path)))
    assert_same_nar(ours, theirs)


# -- help -------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help(home: Path, command: str) -> None:
    args = [command, "--help"] if command else ["--help"]
    out = ok(tvix(home, *args)).decode()
    assert out.startswith("Usage: tvix-store"), out
    if command:
        assert f"tvix-store {command}" in out
    if command and command != "dump":
        for flag in ("--blob-service-addr", "--directory-service-addr", "--path-info-service-addr"):
            assert flag in out, (command, flag)
    if not command:
        for c in COMMANDS:
            assert c in out
        assert "--log-level" in out and "--json" in out
    # --help must not touch the store.
    assert not home.exists()


def test_global_log_options(home: Path, farm: TreeFarm) -> None:
    path = farm.path(TREES_BY_NAME["lone-file"])
    plain = ok(tvix(home, "import", path))
    assert ok(tvix(home, "--log-level", "ERROR", "--json", "import", path)) == plain
    proc = tvix(home, "--json", "--log-level", "DEBUG", "import", path)
    assert ok(proc) == plain
    for line in proc.stderr.decode().splitlines():
        json.loads(line)  # every log line is JSON


def test_zstd_level_setting(home: Path, nix: Nix, tmp_path: Path) -> None:
    """Packs are zstd-compressed by default; TVIX_STORE_ZSTD_LEVEL=0 stores them raw. Either
    store exports the same NAR, whatever the setting is when reading."""
    root = tmp_path / "compressible"
    root.mkdir()
    (root / "text").write_bytes(b"a line of text that compresses well\n" * 40_000)
    (root / "small").write_bytes(b"small and compressible " * 100)

    def packed_bytes(h: Path) -> int:
        return sum(p.stat().st_size for p in (h / "packs").iterdir())

    sp = ok(tvix(home, "import", root)).decode().strip()
    other = tmp_path / "home-raw"
    raw = ok(tvix(other, "import", root, extra_env={"TVIX_STORE_ZSTD_LEVEL": "0"}))
    assert raw.decode().strip() == sp
    assert packed_bytes(home) * 5 < packed_bytes(other)
    want = nix_add_raw(nix, root)
    assert want.decode().strip() == sp
    a = ok(tvix(home, "export", sp, extra_env={"TVIX_STORE_ZSTD_LEVEL": "0"}))
    b = ok(tvix(other, "export", sp))
    assert a == b

    err = fails(tvix(home, "import", root, extra_env={"TVIX_STORE_ZSTD_LEVEL": "fast"}))
    assert "TVIX_STORE_ZSTD_LEVEL='fast': expected a zstd level 0-22" in err
