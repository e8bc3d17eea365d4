"""A full disk: writes fail with "no space left on device", reads keep working.

Each test gets a real 64 MiB ext4 filesystem on a loop device (default mkfs
options, so 1 KiB blocks: SQLite's memory-mapped ``-shm`` file then has holes,
and touching one through the map on a full filesystem is a SIGBUS). The store
lives on it; the disk is filled by imports of incompressible files until they
fail, then by a filler file (another program taking the last blocks), so even
the 5% ext4 keeps for root is gone. No process may die of a signal.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from nix_compat import nixbase32
from nix_compat.nar import dump_path as _dump_path
from tvix_castore.protos import castore_pb2 as cpb
from tvix_castore.protos import rpc_blobstore_pb2 as bpb
from tvix_castore.protos import rpc_blobstore_pb2_grpc as bpb_grpc
from tvix_castore.protos import rpc_directory_pb2_grpc as dpb_grpc
from tvix_castore.rpc.channel import channel_options

from .conftest import TVIX, service_flags, tvix, tvix_env

NO_SPACE = b"no space left on device"
_BRIDGE = re.compile(rb"nar-bridge listening on (http://\S+)")
_GRPC = re.compile(rb"tvix-store listening on (\S+) ")


def _run(cmd: list[str], **kw: object) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60, **kw)  # type: ignore[call-overload]


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A freshly made 64 MiB ext4 (1 KiB blocks) mounted on a loop device; unmounted after."""
    img, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    with img.open("wb") as f:
        f.truncate(64 << 20)
    _run(["mkfs.ext4", "-q", "-F", str(img)])
    _run(["mount", "-o", "loop", str(img), str(mnt)])
    try:
        assert os.statvfs(mnt).f_bsize == 1024  # the case where -shm pages have holes
        yield mnt
    finally:
        for _ in range(50):  # a process of a failed test may still hold it a moment
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        img.unlink()


@dataclass
class Server:
    """``tvix-store daemon --nar-bridge``: gRPC and HTTP from one process."""

    proc: subprocess.Popen[bytes]
    log: Path
    grpc_addr: str
    http: str

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


_DAEMON = ("daemon", "-l", "127.0.0.1:0", "--nar-bridge", "127.0.0.1:0")


@contextlib.contextmanager
def server(home: Path, log: Path, argv: tuple[str, ...] = _DAEMON) -> Iterator[Server]:
    """A daemon with its nar-bridge (or, with other ``argv``, a nar-bridge alone)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [TVIX, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=tvix_env(home),
        )
    deadline = time.monotonic() + 30
    while True:
        text = log.read_bytes()
        g, b = _GRPC.search(text), _BRIDGE.search(text)
        if b and (g or argv[0] != "daemon"):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"daemon did not start (exit {proc.returncode}):\n{text!r}")
        time.sleep(0.05)
    s = Server(proc, log, g.group(1).decode() if g else "", b.group(1).decode())
    try:
        yield s
    finally:
        s.stop()


def dump_path(path: Path) -> bytes:
    out = io.BytesIO()
    _dump_path(path, out)
    return out.getvalue()


def random_tree(root: Path, size: int) -> Path:
    root.mkdir(parents=True)
    (root / "data").write_bytes(os.urandom(size))
    return root


def check_exit(proc: subprocess.CompletedProcess[bytes]) -> None:
    """Whatever happened, the process exited (no signal: SIGBUS is -7, or 135 via a shell)."""
    assert proc.returncode >= 0, f"{proc.args!r} died of signal {-proc.returncode}"
    assert proc.returncode != 128 + signal.SIGBUS


def fill_by_imports(home: Path, work: Path) -> bytes:
    """Import incompressible trees, smaller and smaller, until even a 1 KiB one fails.

    Returns the stderr of the first failure.
    """
    first: bytes | None = None
    n = 0
    for size in (4 << 20, 1 << 20, 128 << 10, 16 << 10, 1 << 10):
        while True:
            n += 1
            proc = tvix(home, "import", random_tree(work / f"fill{n}", size))
            check_exit(proc)
            if proc.returncode != 0:
                first = first or proc.stderr
                break
    assert first is not None
    return first


def fill_rest(mnt: Path) -> Path:
    """Another program takes every block left (as root: the reserve too)."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        block = b"\0" * 1024
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, block)
    finally:
        os.close(fd)
    return filler


def assert_full_error(proc: subprocess.CompletedProcess[bytes], home: Path) -> None:
    check_exit(proc)
    assert proc.returncode != 0
    assert NO_SPACE in proc.stderr and str(home).encode() in proc.stderr, proc.stderr
    assert b"Traceback" not in proc.stderr, proc.stderr  # one clean error line


def grpc_put_blob_result(addr: str, data: bytes) -> grpc.RpcError | None:
    """BlobService.Put of ``data`` in 1 MiB chunks; the error, or ``None`` if stored."""
    with grpc.insecure_channel(addr, options=channel_options()) as ch:
        stub = bpb_grpc.BlobServiceStub(ch)
        chunks = [bpb.BlobChunk(data=data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20)]
        try:
            stub.Put(iter(chunks), timeout=60)
        except grpc.RpcError as exc:
            return exc
    return None


def grpc_put_blob(addr: str, data: bytes) -> grpc.RpcError:
    err = grpc_put_blob_result(addr, data)
    assert err is not None, "the upload was stored"
    return err


def http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as resp:
        assert resp.status == 200
        body: bytes = resp.read()
        return body


def narinfo_nar_url(base: str, store_path: str) -> str:
    text = http_get(f"{base}/{Path(store_path).name[:32]}.narinfo").decode()
    (url,) = [line[5:] for line in text.splitlines() if line.startswith("URL: ")]
    return f"{base}/{url}"


def import_keep(home: Path, tmp_path: Path) -> tuple[str, bytes]:
    """Import a small tree before the disk fills; its store path and NAR."""
    keep = random_tree(tmp_path / "keep", 300_000)
    (keep / "small").write_bytes(b"hello\n")
    store_path = tvix(home, "import", keep).stdout.decode().strip()
    assert store_path.startswith("/nix/store/")
    before = tvix(home, "export", store_path).stdout
    assert before == dump_path(keep)
    return store_path, before


def ballast(disk: Path) -> Path:
    """Another program's file, deleted at the end to free space."""
    path = disk / "ballast"
    path.write_bytes(b"\0" * (8 << 20))
    return path


def assert_reads_work(home: Path, store_path: str, before: bytes, *via: str) -> None:
    """info, ls, cat and export of what is stored (byte-equal) all succeed."""
    for args in (["info", store_path], ["ls", store_path], ["cat", f"{store_path}/small"]):
        proc = tvix(home, *args, *via)
        check_exit(proc)
        assert proc.returncode == 0, proc.stderr
        if args[0] == "ls":
            assert b"small" in proc.stdout and b"data" in proc.stdout
        if args[0] == "cat":
            assert proc.stdout == b"hello\n"
    proc = tvix(home, "export", store_path, *via)
    check_exit(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == before


def assert_grpc_put_refused(addr: str) -> None:
    err = grpc_put_blob(addr, os.urandom(3 << 20))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert "no space left on device" in (err.details() or "")


def test_cli_on_a_full_disk(disk: Path, tmp_path: Path) -> None:
    """Imports fill the disk: the one that does not fit fails cleanly; reads keep working."""
    home = disk / "store"
    store_path, before = import_keep(home, tmp_path)
    freeable = ballast(disk)
    stderr = fill_by_imports(home, tmp_path / "fill")
    assert NO_SPACE in stderr and str(home).encode() in stderr, stderr
    filler = fill_rest(disk)

    # Nothing holds the database open: every command starts on the full disk.
    assert_reads_work(home, store_path, before)
    tree = random_tree(tmp_path / "late", 64 << 10)
    assert_full_error(tvix(home, "import", tree), home)

    # A daemon started on the full disk serves reads and refuses writes.
    with server(home, tmp_path / "daemon.log") as daemon:
        assert http_get(narinfo_nar_url(daemon.http, store_path)) == before
        assert_reads_work(
            home, store_path, before, *service_flags(f"grpc+http://{daemon.grpc_addr}")
        )
        assert_grpc_put_refused(daemon.grpc_addr)
        assert daemon.alive()
        assert daemon.stop() == 0

    # Space is freed: writes work again, and what was stored is whole.
    filler.unlink()
    freeable.unlink()
    added = tvix(home, "import", tree)
    check_exit(added)
    assert added.returncode == 0, added.stderr
    assert tvix(home, "export", added.stdout.decode().strip()).stdout == dump_path(tree)
    assert_reads_work(home, store_path, before)


def test_running_daemon_on_a_full_disk(disk: Path, tmp_path: Path) -> None:
    """Uploads fill the disk under a running daemon: it refuses writes with the reason,
    keeps serving reads, and the CLI next to it keeps working."""
    home = disk / "store"
    store_path, before = import_keep(home, tmp_path)
    freeable = ballast(disk)
    with server(home, tmp_path / "daemon.log") as daemon:
        nar_url = narinfo_nar_url(daemon.http, store_path)
        assert http_get(nar_url) == before
        # gRPC uploads until the disk is full.
        for _ in range(40):
            err = grpc_put_blob_result(daemon.grpc_addr, os.urandom(4 << 20))
            if err is not None:
                break
        else:
            raise AssertionError("40 uploads of 4 MiB fit on a 64 MiB disk")
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert "no space left on device" in (err.details() or "")
        filler = fill_rest(disk)
        assert_grpc_put_refused(daemon.grpc_addr)
        with grpc.insecure_channel(daemon.grpc_addr, options=channel_options()) as ch:
            # A Directory (only SQLite rows) is refused the same way.
            files = [
                cpb.FileNode(name=b"f%03d" % i, digest=os.urandom(32), size=1) for i in range(200)
            ]
            with pytest.raises(grpc.RpcError) as dir_err:
                dpb_grpc.DirectoryServiceStub(ch).Put(
                    iter([cpb.Directory(files=files)]), timeout=60
                )
            assert dir_err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, dir_err.value
            assert "no space left on device" in (dir_err.value.details() or "")

        # nar-bridge: 507 Insufficient Storage, with the reason.
        tree = random_tree(tmp_path / "put", 2 << 20)
        nar = dump_path(tree)
        name = nixbase32.encode(hashlib.sha256(nar).digest())
        req = urllib.request.Request(f"{daemon.http}/nar/{name}.nar", data=nar, method="PUT")
        with pytest.raises(urllib.error.HTTPError) as http_err:
            urllib.request.urlopen(req, timeout=60)
        assert http_err.value.code == 507
        assert NO_SPACE in http_err.value.read()
        # So does a nar-bridge in front of the daemon: the reason crosses gRPC.
        via = service_flags(f"grpc+http://{daemon.grpc_addr}")
        front = ("nar-bridge", "-l", "127.0.0.1:0", *via)
        with server(home, tmp_path / "bridge.log", front) as bridge:
            req = urllib.request.Request(f"{bridge.http}/nar/{name}.nar", data=nar, method="PUT")
            with pytest.raises(urllib.error.HTTPError) as http_err:
                urllib.request.urlopen(req, timeout=60)
            assert http_err.value.code == 507
            assert NO_SPACE in http_err.value.read()
            assert http_get(narinfo_nar_url(bridge.http, store_path)) == before
        # An import through the daemon fails with the reason too.
        proc = tvix(home, "import", tree, *via)
        check_exit(proc)
        assert_full_error(proc, home)

        # It still serves what is stored, over gRPC and HTTP; the CLI beside it works.
        assert daemon.alive()
        assert http_get(nar_url) == before
        assert_reads_work(home, store_path, before, *via)
        assert_reads_work(home, store_path, before)
        assert_full_error(tvix(home, "import", tree), home)
        assert daemon.alive()

        # Space is freed: the same daemon takes writes again.
        filler.unlink()
        freeable.unlink()
        with grpc.insecure_channel(daemon.grpc_addr, options=channel_options()) as ch:
            data = os.urandom(1 << 20)
            put = bpb_grpc.BlobServiceStub(ch).Put(iter([bpb.BlobChunk(data=data)]), timeout=60)
            got = bpb_grpc.BlobServiceStub(ch).Read(
                bpb.ReadBlobRequest(digest=put.digest), timeout=60
            )
            assert b"".join(c.data for c in got) == data
        assert daemon.alive()
        assert daemon.stop() == 0
    assert_reads_work(home, store_path, before)


_WAL_GROWTH = """
import os, sys
from tvix_castore.directoryservice.sqlite import connect, write_tables
from tvix_castore.errors import StorageError

db, free = sys.argv[1], int(sys.argv[2])
conn = connect(db)
conn.execute("CREATE TABLE t (k BLOB PRIMARY KEY, v BLOB)")

def put(n):
    rows = [(os.urandom(16), os.urandom(3000)) for _ in range(n)]  # a page each
    write_tables(conn, [("INSERT INTO t VALUES (?, ?)", rows)], "test rows")

# Just short of the WAL frame (4062) whose index needs the -shm's second 32 KiB.
while os.path.getsize(db + "-wal") < 32 + 4040 * (4096 + 24):
    put(1)
fd = os.open(os.path.dirname(db) + "/filler", os.O_WRONLY | os.O_CREAT, 0o644)
try:
    while True:
        os.write(fd, bytes(1024))
except OSError:
    pass
os.ftruncate(fd, os.fstat(fd).st_size - free)  # leave exactly this much
os.close(fd)
try:
    for _ in range(1000):
        put(3)
except StorageError as exc:
    print(type(exc).__name__, exc)
"""


@pytest.mark.parametrize("free_kib", [100, 106, 112, 118, 124, 130])
def test_wal_index_growth_on_a_full_disk(disk: Path, tmp_path: Path, free_kib: int) -> None:
    """A long-lived connection whose WAL index grows into a new 32 KiB region of the
    -shm just as the disk fills: a clean StorageFull, never a SIGBUS.

    (Measured with SQLite 3.40 on this ext4: with 106-124 KiB left, SQLite's
    one-byte extension of the -shm still fits, zeroing the new region's holes
    through the map does not, and the process died of SIGBUS.)
    """
    script = tmp_path / "wal_growth.py"
    script.write_text(_WAL_GROWTH)
    proc = subprocess.run(
        [sys.executable, str(script), str(disk / "t.sqlite"), str(free_kib << 10)],
        capture_output=True,
        timeout=300,
        check=False,
    )
    check_exit(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"StorageFull test rows: no space left on device: "), proc
