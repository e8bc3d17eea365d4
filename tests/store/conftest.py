"""Fixtures for the store-layer tests: real ``tvix-store`` processes, real Nix.

Every test gets its own ``TVIX_STORE_HOME`` (and Nix scratch store with a
fresh ``XDG_CACHE_HOME``) under its ``tmp_path``; daemons listen on loopback
only, on a port the kernel picks (``-l 127.0.0.1:0``, the bound address is
read back from the "listening on" line).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.compat.oracle import DigestSink, Nix
from tests.compat.trees import Tree, materialize
from tvix_store.config import STORE_DB, open_store
from tvix_store.content import check_content
from tvix_store.nar.render import calculate_nar
from tvix_store.pathinfo import PathInfo
from tvix_store.pathinfoservice.sqlite import SqlitePathInfoService

BIN = Path(sys.executable).parent
TVIX = str(BIN / "tvix-store") if (BIN / "tvix-store").exists() else "tvix-store"
GRPCURL = str(BIN / "grpcurl") if (BIN / "grpcurl").exists() else (shutil.which("grpcurl") or "")
DATA = Path(__file__).resolve().parent.parent / "data"
SERVICE_ENV = ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR")


def tvix_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``tvix-store`` process using the embedded store at ``home``."""
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_ENV}
    env["TVIX_STORE_HOME"] = str(home)
    env.pop("RUST_LOG", None)
    env.update(extra or {})
    return env


def tvix(
    home: Path,
    *args: str | bytes | os.PathLike[str],
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``tvix-store ARGS`` against the embedded store at ``home``."""
    return subprocess.run(
        [TVIX, *args],
        capture_output=True,
        env=tvix_env(home, extra_env),
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def ok(proc: subprocess.CompletedProcess[bytes]) -> bytes:
    """stdout of a successful run (the failure shows the command's stderr)."""
    assert proc.returncode == 0, (
        f"{proc.args!r} exited {proc.returncode}:\n{proc.stderr.decode(errors='replace')}"
    )
    return proc.stdout


def export_to(home: Path, store_path: str, sink: DigestSink, *flags: str) -> None:
    """``tvix-store export [FLAGS] STORE_PATH`` streamed into ``sink``."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [TVIX, "export", *flags, store_path],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=tvix_env(home),
        )
        assert proc.stdout is not None
        with proc.stdout:
            while chunk := proc.stdout.read(1 << 20):
                sink.write(chunk)
        rc = proc.wait(timeout=120)
        err.seek(0)
        assert rc == 0, f"export {store_path} exited {rc}: {err.read().decode(errors='replace')}"


def grpc_url(addr: str) -> str:
    """The ``grpc+…`` URL of a daemon address as printed by the daemon."""
    if addr.startswith("unix:"):
        return "grpc+unix://" + addr[len("unix:") :]
    return "grpc+http://" + addr


def service_flags(url: str) -> list[str]:
    return [
        "--blob-service-addr",
        url,
        "--directory-service-addr",
        url,
        "--path-info-service-addr",
        url,
    ]


async def list_infos(home: Path) -> list[PathInfo]:
    """Every PathInfo in the embedded store at ``home``, read directly from SQLite."""
    svc = SqlitePathInfoService(home / STORE_DB)
    try:
        return [info async for info in svc.list()]
    finally:
        await svc.aclose()


def stored_infos(home: Path) -> list[PathInfo]:
    """Every PathInfo in the embedded store at ``home`` (read directly from SQLite)."""
    if not (home / STORE_DB).exists():
        return []
    return asyncio.run(list_infos(home))


async def check_store(home: Path, *, render: bool = True) -> list[PathInfo]:
    """Every PathInfo of the embedded store at ``home`` has its whole content.

    With ``render``, each NAR is also rendered from the store and must match
    the recorded NarSize/NarHash. Returns the PathInfos checked.
    """
    infos = await list_infos(home)
    async with await open_store(home=home) as store:
        for info in infos:
            await check_content(info.node, store.blobs, store.directories)
            if render:
                size, sha = await calculate_nar(
                    info.node.with_name(b""), store.blobs, store.directories
                )
                assert (size, sha) == (info.nar_size, info.nar_sha256), info.store_path
    return infos


_LISTENING = re.compile(rb"listening on (\S+)")


class Daemon:
    """A ``tvix-store daemon`` subprocess; stderr is kept in a file."""

    def __init__(self, home: Path, listen: str, log: Path, *args: str) -> None:
        self.home = home
        self.log = log
        self._err = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [TVIX, "daemon", "-l", listen, *args],
            stdout=subprocess.PIPE,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
            env=tvix_env(home),
        )
        self.addr = ""
        self.returncode: int | None = None

    @property
    def stderr(self) -> bytes:
        return self.log.read_bytes()

    def wait_listening(self, timeout: float = 120) -> str:
        """Wait for the "listening on ADDR" line; return ADDR."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = _LISTENING.search(self.stderr)
            if m:
                self.addr = m.group(1).decode()
                return self.addr
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited {self.proc.returncode} before listening:\n"
                    + self.stderr.decode(errors="replace")
                )
            time.sleep(0.02)
        raise AssertionError("daemon did not report listening:\n" + self.stderr.decode())

    @property
    def url(self) -> str:
        return grpc_url(self.addr)

    @property
    def target(self) -> str:
        """The target for a grpc channel."""
        return self.addr

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the daemon and wait for it; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"daemon ignored signal {sig} for {timeout}s") from None
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._err.close()
        self.returncode = self.proc.returncode
        return self.proc.returncode


def start_daemon(home: Path, log: Path, listen: str = "127.0.0.1:0", *args: str) -> Daemon:
    d = Daemon(home, listen, log, *args)
    try:
        d.wait_listening()
    except BaseException:
        d.stop(signal.SIGKILL)
        raise
    return d


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """This test's own ``TVIX_STORE_HOME`` (created by the store on first use)."""
    return tmp_path / "tvix-home"


@pytest.fixture
def nix(tmp_path: Path) -> Nix:
    """Nix confined to a fresh scratch store and a fresh XDG cache."""
    return Nix(tmp_path / "nix")


@pytest.fixture
def daemon(home: Path, tmp_path: Path) -> Iterator[Daemon]:
    """A daemon on 127.0.0.1 (kernel-chosen port) over this test's store."""
    d = start_daemon(home, tmp_path / "daemon.log")
    yield d
    d.stop()


class TreeFarm:
    """Corpus trees materialized once per session; the root's basename is the tree name."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self._made: dict[str, bytes] = {}

    def path(self, tree: Tree) -> bytes:
        if tree.name not in self._made:
            parent = self._base / tree.name
            parent.mkdir()
            p = os.fsencode(parent / tree.name)
            materialize(tree.root, p)
            self._made[tree.name] = p
        return self._made[tree.name]


@pytest.fixture(scope="session")
def farm(tmp_path_factory: pytest.TempPathFactory) -> TreeFarm:
    return TreeFarm(tmp_path_factory.mktemp("store-trees"))
