"""Fixtures for the nar-bridge tests: real ``tvix-store nar-bridge`` processes, real Nix 2.8.

Every bridge is a subprocess listening on ``127.0.0.1:0`` (the bound URL is
read back from its "listening on" line) with its own ``TVIX_STORE_HOME``;
every test runs Nix with its own ``XDG_CACHE_HOME`` (``Nix.fresh_cache`` for
more). The closure under test is built once per session in a chroot source
store: a content-addressed directory ``dep`` (small, empty, executable, big
multi-chunk files, a symlink, a subdirectory), a derivation output ``mid``
referencing it, a derivation output ``top`` referencing ``mid`` and itself,
plus a single-file and a symlink store path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

from nix_compat import nixbase32
from nix_compat.narinfo import NarInfo
from nix_compat.nixhash import CAHash
from nix_compat.signing import VerifyingKey
from nix_compat.store_path import StorePath
from tests.compat.oracle import DigestSink, Nix

BIN = Path(sys.executable).parent
TVIX = str(BIN / "tvix-store") if (BIN / "tvix-store").exists() else "tvix-store"
SERVICE_ENV = ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR")
BIG_FILE = 1536 * 1024 + 7  # > the 128 KiB inline-blob limit, several FastCDC chunks
# Options for every Nix command talking to a bridge: no retries, no cached misses/hits.
NIX_HTTP_OPTS = (
    "--option",
    "download-attempts",
    "1",
    "--option",
    "narinfo-cache-negative-ttl",
    "0",
    "--option",
    "narinfo-cache-positive-ttl",
    "0",
)
_LISTENING = re.compile(r"nar-bridge listening on (http://\S+)")
_GRPC_LISTENING = re.compile(r"tvix-store listening on (\S+) ")


def tvix_env(home: Path) -> dict[str, str]:
    """The environment of a ``tvix-store`` process using the embedded store at ``home``."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
    env["TVIX_STORE_HOME"] = str(home)
    return env


# -- bridge processes -----------------------------------------------------------------------
@dataclass
class Bridge:
    """A running ``tvix-store`` process serving a binary cache (and maybe gRPC)."""

    proc: subprocess.Popen[bytes]
    home: Path
    url: str
    log_path: Path
    grpc_addr: str | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=60)
        if self._log is not None:
            self._log.close()
            self._log = None


def start_process(
    home: Path,
    log_path: Path,
    argv: Sequence[str],
    grpc: bool = False,
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Bridge:
    """Start ``[*prefix, tvix-store, *argv]`` (``prefix`` must exec it, as ``prlimit`` does).

    ``env``: variables set beside the store's (service addresses, OTEL_*).
    """
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [*prefix, TVIX, *argv],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**tvix_env(home), **(env or {})},
    )
    bridge = Bridge(proc, home, "", log_path, _log=log)
    deadline = time.monotonic() + 120  # bounds a hang; start-up is slow on a busy machine
    while True:
        text = bridge.log()
        m = _LISTENING.search(text)
        g = _GRPC_LISTENING.search(text)
        if m and (g or not grpc):
            bridge.url = m.group(1)
            bridge.grpc_addr = g.group(1) if g else None
            return bridge
        if proc.poll() is not None or time.monotonic() > deadline:
            bridge.stop()
            raise AssertionError(f"tvix-store {' '.join(argv)} did not start:\n{text}")
        time.sleep(0.05)


class Bridges:
    """Starts bridges for one test and stops them all at its end."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._all: list[Bridge] = []

    def start(
        self, home: Path | None = None, *args: str, env: Mapping[str, str] | None = None
    ) -> Bridge:
        """``tvix-store nar-bridge -l 127.0.0.1:0 ARGS`` on ``home`` (default: a new one)."""
        n = len(self._all)
        home = home or self._tmp / f"home-{n}"
        b = start_process(
            home,
            self._tmp / f"bridge-{n}.log",
            ["nar-bridge", "-l", "127.0.0.1:0", *args],
            env=env,
        )
        self._all.append(b)
        return b

    def start_daemon(
        self, home: Path | None = None, *args: str, env: Mapping[str, str] | None = None
    ) -> Bridge:
        """``tvix-store daemon -l 127.0.0.1:0 --nar-bridge 127.0.0.1:0 ARGS``."""
        n = len(self._all)
        home = home or self._tmp / f"home-{n}"
        argv = ["daemon", "-l", "127.0.0.1:0", "--nar-bridge", "127.0.0.1:0", *args]
        b = start_process(home, self._tmp / f"daemon-{n}.log", argv, grpc=True, env=env)
        self._all.append(b)
        return b

    def stop_all(self) -> None:
        for b in self._all:
            b.stop()


@pytest.fixture
def bridges(tmp_path: Path) -> Iterator[Bridges]:
    b = Bridges(tmp_path / "bridges")
    (tmp_path / "bridges").mkdir()
    try:
        yield b
    finally:
        b.stop_all()


def store_rows(home: Path) -> tuple[int, int]:
    """(rows in ``nar_index``, rows in ``pathinfos``) of the embedded store at ``home``."""
    db = home / "store.sqlite"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        (idx,) = conn.execute("SELECT count(*) FROM nar_index").fetchone()
        (infos,) = conn.execute("SELECT count(*) FROM pathinfos").fetchone()
    return int(idx), int(infos)


# -- keys -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    name: str
    secret_file: Path
    public: str

    @property
    def verifying(self) -> VerifyingKey:
        return VerifyingKey.parse(self.public)


@dataclass(frozen=True)
class Keys:
    one: Key
    two: Key


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """Two binary-cache key pairs made by ``nix-store --generate-binary-cache-key``."""
    d = tmp_path_factory.mktemp("keys")
    nix = Nix(d / "nix")
    out = []
    for name in ("nar-bridge-test-1", "nar-bridge-test-2"):
        sk, pk = d / f"{name}.sk", d / f"{name}.pk"
        nix.run("nix-store", "--generate-binary-cache-key", name, sk, pk)
        out.append(Key(name, sk, pk.read_text().strip()))
    return Keys(*out)


# -- the closure under test -----------------------------------------------------------------
@dataclass(frozen=True)
class PathData:
    """One store path of the source store, as Nix sees it."""

    path: str
    nar: bytes
    nar_hash: bytes
    references: tuple[str, ...]
    deriver: str | None
    ca: str | None

    @property
    def store_path(self) -> StorePath:
        return StorePath.from_absolute_path(self.path)

    @property
    def hash_part(self) -> str:
        return self.store_path.basename[:32]

    def narinfo(self, url: str | None = None, nar_size: int | None = None) -> NarInfo:
        """An unsigned, uncompressed narinfo as ``nix copy`` would upload it."""
        return NarInfo(
            store_path=self.store_path,
            url=url or f"nar/{nixbase32.encode(self.nar_hash)}.nar",
            compression="none",
            file_hash=self.nar_hash,
            file_size=len(self.nar),
            nar_hash=self.nar_hash,
            nar_size=len(self.nar) if nar_size is None else nar_size,
            references=tuple(StorePath.from_absolute_path(r) for r in self.references),
            deriver=StorePath.from_absolute_path(self.deriver[: -len(".drv")])
            if self.deriver
            else None,
            ca=CAHash.parse(self.ca) if self.ca else None,
        )


@dataclass(frozen=True)
class Closure:
    """The source chroot store and its paths (dependencies before dependents)."""

    store: Path
    paths: tuple[PathData, ...]
    roots: tuple[str, ...]

    def by_name(self, name: str) -> PathData:
        (p,) = [p for p in self.paths if p.path.endswith("-" + name)]
        return p


_EXPR = """
let
  dep = builtins.storePath "@DEP@";
  note = builtins.toFile "note" "see ${dep}/small";
  sh = s: { system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/bin:/usr/bin"; args = ["-c" s]; };
  mid = builtins.derivation (sh "mkdir $out; echo ${dep} > $out/ref; cp ${note} $out/note; ln -s ${dep}/small $out/link; printf x > $out/exe; chmod +x $out/exe" // { name = "mid"; });
in builtins.derivation (sh "mkdir $out $out/sub; echo ${mid} > $out/sub/mid; echo self $out > $out/self" // { name = "top"; })
"""


def _make_dep(root: Path) -> None:
    root.mkdir()
    (root / "small").write_bytes(b"hello from nar-bridge\n")
    (root / "empty").write_bytes(b"")
    exe = root / "run.sh"
    exe.write_bytes(b"#!/bin/sh\necho hi\n")
    exe.chmod(0o755)
    (root / "big").write_bytes(random.Random(20240611).randbytes(BIG_FILE))
    (root / "sub").mkdir()
    (root / "sub" / "deeper").mkdir()
    (root / "sub" / "deeper" / "file").write_bytes(b"x" * 1000)
    (root / "link").symlink_to("sub/deeper/file")


@pytest.fixture(scope="session")
def closure(tmp_path_factory: pytest.TempPathFactory) -> Closure:
    work = tmp_path_factory.mktemp("source")
    nix = Nix(work / "nix")
    src = ["--store", str(nix.store)]
    _make_dep(work / "dep")
    dep = nix.run("nix-store", *src, "--add", work / "dep").decode().strip()
    (work / "single").write_bytes(b"a single-file store path\n")
    single = nix.run("nix-store", *src, "--add", work / "single").decode().strip()
    (work / "alink").symlink_to("/nix/store/somewhere-else")
    alink = nix.run("nix-store", *src, "--add", work / "alink").decode().strip()
    (work / "expr.nix").write_text(_EXPR.replace("@DEP@", dep))
    top = (
        nix.run(
            "nix-build",
            *src,
            "--option",
            "substituters",
            "",
            "--option",
            "extra-sandbox-paths",
            "/bin /lib /lib64 /usr",
            "--no-out-link",
            work / "expr.nix",
        )
        .decode()
        .strip()
    )
    roots = (top, single, alink)
    infos = json.loads(nix.run("nix", "path-info", *src, "--json", "-r", *roots))
    by_path = {i["path"]: i for i in infos}
    # Dependencies first (nix path-info sorts by name): a topological order.
    order: list[str] = []

    def visit(p: str) -> None:
        if p in order:
            return
        for r in by_path[p]["references"]:
            if r != p:
                visit(r)
        order.append(p)

    for p in sorted(by_path):
        visit(p)
    paths = []
    for p in order:
        sink = DigestSink()
        nix.dump_store_path(p, sink)
        info = by_path[p]
        nar_hash = hashlib.sha256(sink.data).digest()
        assert info["narSize"] == sink.size
        paths.append(
            PathData(
                path=p,
                nar=sink.data,
                nar_hash=nar_hash,
                references=tuple(info["references"]),
                deriver=info.get("deriver"),
                ca=info.get("ca"),
            )
        )
    assert {p.path.rsplit("-", 1)[1] for p in paths} == {"dep", "mid", "top", "single", "alink"}
    return Closure(nix.store, tuple(paths), roots)


# -- running Nix against a bridge ------------------------------------------------------------
def nix_in(tmp_path: Path, name: str = "nix") -> Nix:
    """A Nix with its own scratch store and a fresh XDG cache."""
    return Nix(tmp_path / name)


def copy_to(nix: Nix, closure: Closure, url: str, env: Mapping[str, str] | None = None) -> None:
    """``nix copy --to URL`` of the closure's roots from the source store."""
    nix.run(
        "nix",
        "copy",
        "--store",
        closure.store,
        "--to",
        url,
        *NIX_HTTP_OPTS,
        *closure.roots,
        env=dict(env or {}),
    )


def assert_same_trees(closure: Closure, nix: Nix, store: Path) -> None:
    """Every path of the closure is in ``store`` with the same NAR and the same tree."""
    for p in closure.paths:
        sink = DigestSink()
        nix.stream_out(["nix", "store", "dump-path", "--store", str(store), p.path], sink)
        assert sink.data == p.nar, p.path
        a = closure.store / p.path.lstrip("/")
        b = store / p.path.lstrip("/")
        diff = subprocess.run(
            ["diff", "-r", "--no-dereference", a, b], capture_output=True, check=False
        )
        assert diff.returncode == 0, diff.stdout.decode(errors="replace")
