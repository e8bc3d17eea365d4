"""Fixtures for the upstream-substitution tests: real Nix 2.8 binary caches over loopback HTTP.

Once per session a chroot source store gets a small closure with references
(``dep`` added from the filesystem, ``mid`` built referencing ``dep``, ``top``
built referencing ``mid`` and itself, and an unrelated single file), and
``nix copy --to file://…?secret-key=…`` writes it into three binary caches:
xz (Nix's default), zstd and uncompressed. Each test serves its own copy of a
cache with :class:`CacheServer` (``http.server`` in a thread on 127.0.0.1,
under ``/prefix/``), which counts requests, can answer 500 on demand and can
be stopped and restarted on the same port.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from nix_compat.nixhash import CAHash
from nix_compat.signing import SigningKey, VerifyingKey
from nix_compat.store_path import StorePath
from tests.compat.oracle import DigestSink, Nix

BIN = Path(sys.executable).parent
TVIX = str(BIN / "tvix-store") if (BIN / "tvix-store").exists() else "tvix-store"
SERVICE_ENV = (
    "BLOB_SERVICE_ADDR",
    "DIRECTORY_SERVICE_ADDR",
    "PATH_INFO_SERVICE_ADDR",
    "TVIX_STORE_COMPOSITION",
)
BIG = 1024 * 1024 + 11  # cut into several chunks by the embedded store (FastCDC, 256 KiB average)
PREFIX = "/prefix"
# Nix talking to a local cache: no retries, nothing remembered between commands.
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
    "--option",
    "substituters",
    "",
)


# -- the source closure and its binary caches -------------------------------------------------
@dataclass(frozen=True)
class PathData:
    """One store path of the source store, as Nix sees it."""

    path: str
    nar: bytes
    references: tuple[str, ...]
    deriver: str | None
    ca: str | None

    @property
    def store_path(self) -> StorePath:
        return StorePath.from_absolute_path(self.path)

    @property
    def digest(self) -> bytes:
        return self.store_path.digest

    @property
    def hash_part(self) -> str:
        return self.store_path.basename[:32]

    @property
    def nar_hash(self) -> bytes:
        return hashlib.sha256(self.nar).digest()

    @property
    def name(self) -> str:
        return self.store_path.name


@dataclass(frozen=True)
class Upstream:
    """The source store, its key pairs, and the three binary caches made from it."""

    work: Path
    nix: Nix
    paths: tuple[PathData, ...]  # dependencies before dependents
    roots: tuple[str, ...]
    path_info_json: str  # ``nix path-info --json --recursive ROOTS`` as printed
    secret_key: Path
    public_key: str
    other_secret_key: Path
    other_public_key: str
    caches: Mapping[str, Path]  # "xz" | "zstd" | "none" -> cache directory

    @property
    def store(self) -> Path:
        return self.nix.store

    @property
    def key(self) -> VerifyingKey:
        return VerifyingKey.parse(self.public_key)

    @property
    def other_key(self) -> VerifyingKey:
        return VerifyingKey.parse(self.other_public_key)

    @property
    def signing_key(self) -> SigningKey:
        return SigningKey.from_file(self.secret_key)

    def by_name(self, name: str) -> PathData:
        (p,) = [p for p in self.paths if p.name == name]
        return p


_EXPR = """
let
  dep = builtins.storePath "@DEP@";
  sh = s: { system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/bin:/usr/bin"; args = ["-c" s]; };
  mid = builtins.derivation (sh "mkdir $out; echo ${dep} > $out/ref; printf x > $out/exe; chmod +x $out/exe; ln -s ${dep}/hello $out/link" // { name = "mid"; });
in builtins.derivation (sh "mkdir $out $out/sub; echo ${mid} > $out/sub/mid; echo self $out > $out/self" // { name = "top"; })
"""


def _make_dep(root: Path) -> None:
    root.mkdir()
    (root / "hello").write_bytes(b"hello from upstream\n")
    (root / "empty").write_bytes(b"")
    run = root / "run.sh"
    run.write_bytes(b"#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    (root / "big").write_bytes(random.Random(6).randbytes(BIG))
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "file").write_bytes(b"y" * 1000)
    (root / "link").symlink_to("sub/deeper/file")


def _dependency_order(infos: Sequence[Mapping[str, Any]]) -> list[str]:
    by_path = {i["path"]: i for i in infos}
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
    return order


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Upstream:
    work = tmp_path_factory.mktemp("upstream")
    nix = Nix(work / "nix")
    src = ("--store", str(nix.store), "--option", "substituters", "")
    keys = []
    for name in ("upstream-test-1", "upstream-test-other"):
        sk, pk = work / f"{name}.sk", work / f"{name}.pk"
        nix.run("nix-store", "--generate-binary-cache-key", name, sk, pk)
        keys.append((sk, pk.read_text().strip()))
    _make_dep(work / "dep")
    dep = nix.run("nix-store", *src, "--add", work / "dep").decode().strip()
    (work / "single").write_bytes(b"a single-file store path\n")
    single = nix.run("nix-store", *src, "--add", work / "single").decode().strip()
    (work / "expr.nix").write_text(_EXPR.replace("@DEP@", dep))
    top = (
        nix.run(
            "nix-build",
            *src,
            "--option",
            "extra-sandbox-paths",
            "/bin /lib /lib64 /usr",
            "--no-out-link",
            work / "expr.nix",
        )
        .decode()
        .strip()
    )
    roots = (top, single)
    text = nix.run("nix", "path-info", *src, "--json", "--recursive", *roots).decode()
    infos = json.loads(text)
    paths = []
    for p in _dependency_order(infos):
        (info,) = [i for i in infos if i["path"] == p]
        sink = DigestSink()
        nix.dump_store_path(p, sink)
        assert sink.size == info["narSize"]
        paths.append(
            PathData(
                path=p,
                nar=sink.data,
                references=tuple(info["references"]),
                deriver=info.get("deriver"),
                ca=info.get("ca"),
            )
        )
    assert sorted(p.name for p in paths) == ["dep", "mid", "single", "top"]
    caches = {}
    for kind in ("xz", "zstd", "none"):
        cache = work / f"cache-{kind}"
        query = f"secret-key={keys[0][0]}" + ("" if kind == "xz" else f"&compression={kind}")
        nix.run("nix", "copy", *src, "--to", f"file://{cache}?{query}", *roots)
        caches[kind] = cache
    return Upstream(
        work=work,
        nix=nix,
        paths=tuple(paths),
        roots=roots,
        path_info_json=text,
        secret_key=keys[0][0],
        public_key=keys[0][1],
        other_secret_key=keys[1][0],
        other_public_key=keys[1][1],
        caches=caches,
    )


def ca_of(p: PathData) -> CAHash | None:
    return CAHash.parse(p.ca) if p.ca else None


# -- a local binary-cache server ----------------------------------------------------------------
class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: CacheServer, addr: tuple[str, int]) -> None:
        self.owner = owner
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.conns_lock:
            self.conns.discard(request)
        super().shutdown_request(request)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, head: bool) -> None:
        owner = self.server.owner
        status, body = owner._respond(self.command, self.path)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        if self.path in owner.cut_short:
            # Announce everything, send half, drop the connection.
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(False)

    def do_HEAD(self) -> None:
        self._answer(True)


class CacheServer:
    """Serves a binary-cache directory under ``/prefix/`` on 127.0.0.1.

    ``requests`` lists every request path seen; :meth:`fail` makes the next
    N requests (whose path ends with a suffix) answer 500; ``status`` forces
    the status of given paths; paths in ``cut_short`` get half their body and a
    dropped connection; while ``gate`` is set to an unset Event, each request
    is recorded and then waits for it (so a test decides when answers come:
    no timing); :meth:`stop` releases the gate, closes the listener and every
    open connection, :meth:`start` listens again on the same port.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self.status: dict[str, int] = {}
        self.cut_short: set[str] = set()
        self.gate: threading.Event | None = None  # answers wait for it (see above)
        self._fail_next = 0
        self._fail_suffix = ""
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base(self) -> str:
        """The cache's base URL, without a trailing slash."""
        return self.url + PREFIX

    def _respond(self, method: str, path: str) -> tuple[int, bytes]:
        with self._lock:
            self.requests.append(path)
        gate = self.gate
        if gate is not None:
            assert gate.wait(timeout=120), "the test never released the cache server's gate"
        with self._lock:
            if self._fail_next > 0 and path.endswith(self._fail_suffix):
                self._fail_next -= 1
                return 500, b"injected failure\n"
            if path in self.status:
                return self.status[path], b"forced status\n"
        rel = path.split("?", 1)[0]
        if not rel.startswith(PREFIX + "/"):
            return 404, b"outside the prefix\n"
        rel = rel[len(PREFIX) + 1 :]
        if not rel or ".." in rel.split("/"):
            return 404, b"no\n"
        f = self.root / rel
        if not f.is_file():
            return 404, b"not found\n"
        return 200, f.read_bytes()

    def fail(self, n: int, suffix: str = "") -> None:
        """Answer 500 to the next ``n`` requests whose path ends with ``suffix``."""
        with self._lock:
            self._fail_next, self._fail_suffix = n, suffix

    def count(self, suffix: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.split("?", 1)[0].endswith(suffix))

    def start(self) -> None:
        assert self._httpd is None
        self._httpd = _Server(self, ("127.0.0.1", self.port))
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self.gate is not None:
            self.gate.set()
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with httpd.conns_lock:
            conns = list(httpd.conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        assert self._thread is not None
        self._thread.join(timeout=60)


class CacheServers:
    """Per-test cache servers, each over its own copy of a cache directory."""

    def __init__(self, upstream: Upstream, tmp: Path) -> None:
        self._upstream = upstream
        self._tmp = tmp
        self._all: list[CacheServer] = []

    def serve(self, kind: str = "xz") -> CacheServer:
        copy = self._tmp / f"served-{len(self._all)}-{kind}"
        shutil.copytree(self._upstream.caches[kind], copy)
        server = CacheServer(copy)
        self._all.append(server)
        return server

    def stop_all(self) -> None:
        for s in self._all:
            s.stop()


@pytest.fixture
def servers(upstream: Upstream, tmp_path: Path) -> Iterator[CacheServers]:
    s = CacheServers(upstream, tmp_path)
    try:
        yield s
    finally:
        s.stop_all()


# -- tvix-store processes -----------------------------------------------------------------------
def tvix_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
    env["TVIX_STORE_HOME"] = str(home)
    env.update(extra or {})
    return env


def tvix(
    home: Path, *args: str | os.PathLike[str], extra_env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [TVIX, *args],
        capture_output=True,
        env=tvix_env(home, extra_env),
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def ok(proc: subprocess.CompletedProcess[bytes]) -> bytes:
    assert proc.returncode == 0, (
        f"{proc.args!r} exited {proc.returncode}:\n{proc.stderr.decode(errors='replace')}"
    )
    return proc.stdout


def filled(upstream: Upstream, home: Path) -> Path:
    """An embedded store at ``home`` holding the upstream closure (``tvix-store copy``)."""
    closure = home.parent / f"{home.name}-closure.json"
    closure.write_text(upstream.path_info_json)
    ok(tvix(home, "copy", "--root", upstream.store, closure))
    return home


def fsck_json(home: Path, *flags: str) -> tuple[int, dict[str, Any]]:
    """``tvix-store fsck --json FLAGS``: its exit status and report."""
    proc = tvix(home, "fsck", "--json", *flags)
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    return proc.returncode, json.loads(proc.stdout)


@dataclass
class Process:
    """A long-running ``tvix-store`` subprocess (nar-bridge or daemon)."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    address: str = ""
    _log: IO[bytes] | None = field(default=None, repr=False)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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


class Processes:
    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._all: list[Process] = []

    def start(
        self,
        home: Path,
        argv: Sequence[str],
        ready: str,
        extra_env: Mapping[str, str] | None = None,
    ) -> Process:
        """Start ``tvix-store ARGV``; wait for the regex ``ready`` (group 1 = address)."""
        log_path = self._tmp / f"proc-{len(self._all)}.log"
        log = log_path.open("wb")
        proc = subprocess.Popen(
            [TVIX, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=tvix_env(home, extra_env),
        )
        p = Process(proc, log_path, _log=log)
        self._all.append(p)
        deadline = time.monotonic() + 120  # bounds a hang; start-up is slow on a busy machine
        while True:
            m = re.search(ready, p.log())
            if m:
                p.address = m.group(1)
                return p
            if proc.poll() is not None or time.monotonic() > deadline:
                p.stop()
                raise AssertionError(f"tvix-store {' '.join(argv)} did not start:\n{p.log()}")
            time.sleep(0.05)

    def stop_all(self) -> None:
        for p in self._all:
            p.stop()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


BRIDGE_READY = r"nar-bridge listening on (http://\S+)"
DAEMON_READY = r"tvix-store listening on (\S+) "


def nix_in(tmp_path: Path, name: str) -> Nix:
    """A Nix with its own scratch store and a fresh XDG cache."""
    return Nix(tmp_path / name)


def assert_same_tree(a: Path, b: Path) -> None:
    diff = subprocess.run(
        ["diff", "-r", "--no-dereference", a, b], capture_output=True, check=False
    )
    assert diff.returncode == 0, diff.stdout.decode(errors="replace")
